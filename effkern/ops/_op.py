"""How the ops' Python entry points reach their implementations: every op is a ``torch.library`` custom op (for
``torch.ops.effkern.*`` callers, opcheck and torch.compile), and in plain eager code the entry points skip the
dispatcher between them and the implementation.

Per call, from Python into the implementation: the custom op's dispatch (the C++ dispatcher calling back into
Python, the autograd wrapper, the aliasing checks) measured 13-15 us on a tiny low_rank_linear and ~26 us right
after a batch-1024 kernel (that Python runs with cold caches after every large kernel); the autograd wrapper's
forward + backward added ~130 us a step at a tiny shape.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def plain_eager(args) -> bool:
    """True when nothing between an entry point and its op's implementation needs the dispatcher: not compiling or
    jit-tracing, no functorch transform, no Python dispatch or function mode, plain tensors only (no fake,
    functional or other subclass) and none that would need the op's autograd (grad enabled and an input requiring
    it)."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    if (torch._C._are_functorch_transforms_active() or torch._C._len_torch_dispatch_stack()
            or torch._C._is_torch_function_mode_enabled()):
        return False
    grad = torch.is_grad_enabled()
    for a in args:
        if isinstance(a, torch.Tensor) and (type(a) is not torch.Tensor or (grad and a.requires_grad)):
            return False
    return True


class Op:
    """A non-mutating custom op ``op`` and its implementation ``impl``: calling it runs ``impl`` directly when
    :func:`plain_eager`, else ``op`` (with its fake implementation and autograd)."""

    def __init__(self, op, impl: Callable):
        self.op, self.impl = op, impl
        self.register_fake = op.register_fake

    def __call__(self, *args):
        return self.impl(*args) if plain_eager(args) else self.op(*args)


def custom_op(name: str) -> Callable[[Callable], Op]:
    """``torch.library.custom_op(name, mutates_args=())`` as a decorator that returns an :class:`Op`."""
    return lambda impl: Op(torch.library.custom_op(name, impl, mutates_args=()), impl)


def register_autograd(op: Op, backward: Callable, setup_context: Callable) -> Callable:
    """Register ``backward`` and ``setup_context`` as the autograd of ``op`` and return the differentiable call for
    the op's Python entry point: the implementation directly when :func:`plain_eager` (no autograd needed), else an
    autograd.Function built from the same two, which runs the op with grad off (so in plain eager code, again
    straight into the implementation), skipping the custom op's autograd wrapper."""
    op.op.register_autograd(backward, setup_context=setup_context)

    def forward(ctx, *inputs):  # not the setup_context form: its apply binds defaults through inspect per call
        output = op(*inputs)
        setup_context(ctx, inputs, output)
        return output

    function = type("Autograd", (torch.autograd.Function,), {"forward": staticmethod(forward),
                                                              "backward": staticmethod(backward),
                                                              "__qualname__": f"{backward.__module__}.Autograd"})

    def call(*inputs):
        return op.impl(*inputs) if plain_eager(inputs) else function.apply(*inputs)

    return call
