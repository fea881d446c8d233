"""How the ops' Python entry points reach their implementations: every op is a ``torch.library`` custom op (for
``torch.ops.effkern.*`` callers, opcheck, torch.compile / export and jit tracing), and in plain eager code the entry
points skip the dispatcher between them and the implementation.

Measured on the CPU VM with timeit (session notes of issue 5): the custom op's dispatch (the C++ dispatcher calling
back into Python, the autograd kernel, the aliasing checks) cost 13-15 us a call on a tiny low_rank_linear and ~26
us right after a batch-1024 kernel (Python runs with cold caches after a large kernel); its autograd wrapper's
forward + backward ~130 us a step at a tiny shape.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def eager(args) -> bool:
    """True when nothing around a call needs the dispatcher: not compiling, exporting or jit-tracing, no profiler
    running (it records the op by name, forward and backward), no functorch transform, no Python dispatch or
    function mode, and the tensor arguments plain (``torch.Tensor`` or ``nn.Parameter``: no fake, functional or
    other subclass) and not on the meta device."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch._C._autograd._profiler_enabled():
        return False
    if (torch._C._are_functorch_transforms_active() or torch._C._len_torch_dispatch_stack()
            or torch._C._is_torch_function_mode_enabled()):
        return False
    return all(type(a) in (torch.Tensor, torch.nn.Parameter) and not a.is_meta
               for a in args if isinstance(a, torch.Tensor))


def needs_grad(args) -> bool:
    """Grad mode is on and a tensor argument requires grad."""
    return torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)


def plain_eager(args) -> bool:
    """:func:`eager` and no autograd needed: the implementation can run directly."""
    return eager(args) and not needs_grad(args)


class Op:
    """A non-mutating custom op ``op`` and its implementation ``impl``; called (positional arguments only), it runs
    ``impl`` directly when :func:`plain_eager`, else ``op`` (with its fake implementation and autograd)."""

    def __init__(self, op, impl: Callable):
        self.op, self.impl = op, impl
        self.register_fake = op.register_fake

    def __call__(self, *args):
        return self.impl(*args) if plain_eager(args) else self.op(*args)


def custom_op(name: str) -> Callable[[Callable], Op]:
    """``torch.library.custom_op(name, mutates_args=())`` as a decorator that returns an :class:`Op`."""
    return lambda impl: Op(torch.library.custom_op(name, impl, mutates_args=()), impl)


def register_autograd(op: Op, backward: Callable, setup_context: Callable) -> Callable:
    """Register ``backward`` and ``setup_context`` as the autograd of ``op`` and return the call for the op's Python
    entry point. In :func:`eager` code: the implementation directly when no autograd is needed, else an
    autograd.Function built from the same two (its forward calls the implementation, grad being off there),
    skipping the custom op's autograd wrapper. Anywhere else: the registered op."""
    op.op.register_autograd(backward, setup_context=setup_context)

    def forward(ctx, *inputs):  # not the setup_context form: its apply binds defaults through inspect per call
        output = op.impl(*inputs)  # only call() applies it, in eager code, and forward runs with grad off
        setup_context(ctx, inputs, output)
        return output

    name = "".join(word.title() for word in op.impl.__module__.rsplit(".", 1)[-1].split("_"))  # LowRankLinear
    function = type(name, (torch.autograd.Function,), {"forward": staticmethod(forward),
                                                       "backward": staticmethod(backward)})

    def call(*inputs):
        if not eager(inputs):
            return op.op(*inputs)
        return function.apply(*inputs) if needs_grad(inputs) else op.impl(*inputs)

    return call
