"""One autograd registration per op, for both of its callers."""

from __future__ import annotations

from collections.abc import Callable

import torch


def register_autograd(op, backward: Callable, setup_context: Callable) -> type[torch.autograd.Function]:
    """Register ``backward`` and ``setup_context`` as the autograd of custom op ``op`` (for callers of
    ``torch.ops.effkern.*``, opcheck and torch.compile) and return an autograd.Function built from the same two,
    for the op's Python entry point to call (``.apply``).

    The Function runs the op with grad off, through its plain dispatch, so the entry point skips the custom op's
    autograd wrapper: its Python per call (the wrapper's generated Function, argument defaults filled in, the
    backward's count checks) cost low_rank_linear ~130 us a forward + backward at a tiny shape (260 us instead of
    390 us; the torch ops it replaces take 135 us), and more at real sizes, where caches are cold after each
    kernel (at batch 1024, 400 -> 32 -> 400: ~400 us of 2.6 ms)."""
    op.register_autograd(backward, setup_context=setup_context)

    def forward(ctx, *inputs):  # not the setup_context form: its apply binds defaults through inspect per call
        output = op(*inputs)
        setup_context(ctx, inputs, output)
        return output

    return type("Autograd", (torch.autograd.Function,), {"forward": staticmethod(forward),
                                                          "backward": staticmethod(backward),
                                                          "__qualname__": f"{backward.__module__}.Autograd"})
