"""How the ops' Python entry points reach their implementations: every op is a ``torch.library`` custom op (for
``torch.ops.effkern.*`` callers, opcheck, torch.compile / export and jit tracing), and in plain eager code the entry
points skip the dispatcher between them and the implementation.

Why: the custom op's dispatch (the C++ dispatcher calling back into Python, the autograd kernel, the aliasing
checks) costs Python time on every call that the kernels' small shapes feel (a decode step, a few rows of a layer);
README "Backends" has the measurements and the shapes where it matters.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import torch

# Bound once: the route is decided on every call, and right after a large kernel every attribute lookup and frame
# runs with cold caches.
_compiling = torch.compiler.is_compiling  # dynamo knows the function itself, whatever it is called here
_tracing = torch._C._is_tracing
_profiling = torch._C._autograd._profiler_enabled
_functorch = torch._C._are_functorch_transforms_active
_dispatch_modes = torch._C._len_torch_dispatch_stack
_function_modes = torch._C._is_torch_function_mode_enabled
_grad_enabled = torch.is_grad_enabled
_increment_version = torch._C._increment_version
_Tensor = torch.Tensor
_PLAIN = (torch.Tensor, torch.nn.Parameter)
OP, FUNCTION, IMPL = 0, 1, 2  # the routes of route()


def route(args) -> int:
    """IMPL in plain eager code: not compiling, exporting or jit-tracing, no profiler running (it records the op by
    name, forward and backward), no functorch transform, no Python dispatch or function mode, the tensor arguments
    plain (``torch.Tensor`` or ``nn.Parameter``: no fake, functional or other subclass) and not on the meta device,
    and no autograd needed; FUNCTION when all that holds but grad mode is on and an argument requires grad; else
    OP (the registered custom op)."""
    if _compiling() or _tracing() or _profiling() or _functorch() or _dispatch_modes() or _function_modes():
        return OP
    grad = False
    for a in args:
        if isinstance(a, _Tensor):
            if type(a) not in _PLAIN or a.is_meta:
                return OP
            grad = grad or a.requires_grad
    return FUNCTION if grad and _grad_enabled() else IMPL


class Op:
    """A custom op ``registered`` and its implementation ``impl``; called (positional arguments only), it runs
    ``impl`` directly on the IMPL :func:`route`, else ``registered`` (with its fake implementation and autograd).
    ``mutated``: the positions of the arguments the op writes in place; the direct call bumps their version
    counters as the registered op does (a kernel writing through the data pointer would not), so autograd still
    catches a tensor saved for backward and overwritten since."""

    def __init__(self, registered, impl: Callable, mutated: tuple[int, ...] = ()):
        self.registered, self.impl, self.mutated = registered, impl, mutated
        self.register_fake = registered.register_fake

    def __call__(self, *args):
        if route(args) != IMPL:
            return self.registered(*args)
        out = self.impl(*args)
        if self.mutated:
            _increment_version([args[i] for i in self.mutated])
        return out


def custom_op(name: str, mutates_args: Sequence[str] = ()) -> Callable[[Callable], Op]:
    """``torch.library.custom_op(name, mutates_args=mutates_args)`` as a decorator that returns an :class:`Op`."""

    def wrap(impl: Callable) -> Op:
        params = list(inspect.signature(impl).parameters)
        registered = torch.library.custom_op(name, impl, mutates_args=tuple(mutates_args))
        return Op(registered, impl, tuple(params.index(arg) for arg in mutates_args))

    return wrap


def register_autograd(op: Op, backward: Callable, setup_context: Callable) -> Callable:
    """Register ``backward`` and ``setup_context`` as the autograd of ``op`` and return the call for the op's Python
    entry point. By :func:`route`: the implementation directly (IMPL), an autograd.Function built from the same
    two (FUNCTION: its forward calls the implementation, grad being off there), skipping the custom op's autograd
    wrapper, or the registered op (OP)."""
    op.registered.register_autograd(backward, setup_context=setup_context)

    def forward(ctx, *inputs):  # not the setup_context form: its apply binds defaults through inspect per call
        output = op.impl(*inputs)  # only call() applies it, in eager code, and forward runs with grad off
        setup_context(ctx, inputs, output)
        return output

    name = "".join(word.title() for word in op.impl.__module__.rsplit(".", 1)[-1].split("_"))  # LowRankLinear
    function = type(name, (torch.autograd.Function,), {"forward": staticmethod(forward),
                                                       "backward": staticmethod(backward)})

    def call(*inputs):
        way = route(inputs)
        return (op.impl(*inputs) if way == IMPL else function.apply(*inputs) if way == FUNCTION
                else op.registered(*inputs))

    return call
