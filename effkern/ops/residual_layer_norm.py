"""``effkern.ops.residual_layer_norm``: ``h = u + z`` and ``x = LayerNorm(h)`` (no affine) in one pass.

The input step of a residual side stream (LAST's LSA block, PAPERS.md A): the stream ``u`` of K side networks
``[K, B, N, d]`` plus a frozen backbone feature ``z [B, N, d]`` shared by all K (z's rows repeat over u's
leading dims; z may also have u's shape). Both results are needed: ``x`` feeds the block, ``h`` is its residual.

Why an op: in torch it is an add, a layer_norm that saves h, and a backward of several passes plus the add of
the residual's gradient. Here the forward reads u and z once and writes h and x; only x and the fp32 inverse
standard deviation are saved (``x`` is the normalised h, so LayerNorm's backward needs nothing else), and the
backward is one pass: ``du = dh + rstd * (dx - mean(dx) - x * mean(dx * x))``. That drops one saved d-wide
tensor per block and about half the memory passes of the side stream.

Backends (op contract, DESIGN.md): ``cpu`` = C++ kernel (rows in parallel, SIMD inside a row, statistics in fp32
with the two-pass variance); on CUDA tensors the Triton kernels (a memory-bound row op: one program per block of
rows, Triton reaches the bandwidth, so there is no separate CUDA kernel); the reference everywhere else.
"""

from __future__ import annotations

import torch

from effkern.ops import _backend
from effkern.ops._checks import FLOAT_DTYPES, acc_dtype, check_same_dtype, check_tensor, native
from effkern.ops._op import custom_op, register_autograd


def reference(u: torch.Tensor, z: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ground truth: ``(h, x)`` in u's dtype and ``rstd`` fp32 (float64 for float64 u) of shape ``u.shape[:-1]``.
    The statistics are those of ``h - h[..., :1]``: a constant row gives exactly 0 (as F.layer_norm), and a large
    mean cancels in that shift rather than in sums of the mean's size."""
    acc = acc_dtype(u)
    h = u.to(acc) + z.to(acc)
    shifted = h - h[..., :1]
    centred = shifted - shifted.mean(-1, keepdim=True)
    rstd = torch.rsqrt(centred.square().mean(-1) + eps)
    return h.to(u.dtype), (centred * rstd[..., None]).to(u.dtype), rstd


def bwd_reference(x: torch.Tensor, rstd: torch.Tensor, dh: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """``du`` (u's dtype) from the saved x and rstd and the gradients of h and x."""
    acc = acc_dtype(x)
    xf, dxf = x.to(acc), dx.to(acc)
    dn = dxf - dxf.mean(-1, keepdim=True) - xf * (dxf * xf).mean(-1, keepdim=True)
    return (dh.to(acc) + rstd[..., None] * dn).to(x.dtype)


def _cpu(u, z, eps):
    return tuple(_backend.extension().residual_layer_norm_fwd_cpu(u, z, eps))


def _cpu_bwd(x, rstd, dh, dx):
    return _backend.extension().residual_layer_norm_bwd_cpu(x, rstd, dh, dx)


def _triton(u, z, eps):
    from effkern.triton_kernels.residual_layer_norm import residual_layer_norm_fwd_triton

    return residual_layer_norm_fwd_triton(u, z, eps)


def _triton_bwd(x, rstd, dh, dx):
    from effkern.triton_kernels.residual_layer_norm import residual_layer_norm_bwd_triton

    return residual_layer_norm_bwd_triton(x, rstd, dh, dx)


_IMPLS = {"reference": reference, "cpu": _cpu, "triton": _triton}
_BWD_IMPLS = {"reference": bwd_reference, "cpu": _cpu_bwd, "triton": _triton_bwd}


def _preferred(t: torch.Tensor) -> list[str]:
    return native(t, ["cpu"] if t.device.type == "cpu" else ["triton"])


@custom_op("effkern::residual_layer_norm")
def op(u: torch.Tensor, z: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """u contiguous ``[..., d]``, z contiguous with ``u.shape[-z.dim():] == z.shape`` -> (h, x, rstd)."""
    return _backend.run("residual_layer_norm", u.device, _preferred(u), _IMPLS, u, z, eps)


@op.register_fake
def _(u, z, eps):
    return torch.empty_like(u), torch.empty_like(u), u.new_empty(u.shape[:-1], dtype=acc_dtype(u))


@custom_op("effkern::residual_layer_norm_bwd")
def bwd_op(x: torch.Tensor, rstd: torch.Tensor, dh: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """du (contiguous, x's shape) from contiguous x, rstd, dh and dx."""
    return _backend.run("residual_layer_norm", x.device, _preferred(x), _BWD_IMPLS, x, rstd, dh, dx)


@bwd_op.register_fake
def _(x, rstd, dh, dx):
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    _, z, _ = inputs
    _, x, rstd = output
    ctx.mark_non_differentiable(rstd)
    ctx.save_for_backward(x, rstd)
    ctx.z_shape, ctx.z_needs_grad = z.shape, z.requires_grad


def _backward(ctx, dh, dx, _drstd):
    x, rstd = ctx.saved_tensors
    du = bwd_op(x, rstd, dh.contiguous(), dx.contiguous())
    dz = du.view(-1, *ctx.z_shape).sum(0) if ctx.z_needs_grad else None
    return du, dz, None


_differentiable = register_autograd(op, _backward, _setup_context)


def check_eps(eps: float) -> float:
    """LayerNorm's epsilon, > 0, as a Python float."""
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    return float(eps)


def residual_layer_norm(u: torch.Tensor, z: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = u + z`` and ``x = (h - mean(h)) / sqrt(var(h) + eps)`` over the last dim, in one pass.

    Args:
        u: ``[..., d]`` (e.g. K side streams ``[K, B, N, d]``).
        z: u's trailing dims (e.g. ``[B, N, d]``, added to every leading slice of u) or u's shape.
        eps: added to the variance.

    Returns:
        ``(h, x)``, both u's shape and dtype. Differentiable in u and z; accumulation is fp32.
    """
    check_tensor("u", u, dtypes=FLOAT_DTYPES, dims="[..., d]")
    check_tensor("z", z, dtypes=FLOAT_DTYPES, device=u.device, dims="u's trailing dims")
    check_same_dtype("z", z, "u", u)
    if u.dim() == 0 or u.shape[-1] == 0:
        raise ValueError(f"u must be [..., d] with d >= 1, got shape {tuple(u.shape)}")
    if z.dim() == 0 or z.dim() > u.dim() or z.shape != u.shape[u.dim() - z.dim():]:
        raise ValueError(f"z must have u's trailing dims {tuple(u.shape[-max(z.dim(), 1):])} (u is "
                         f"{tuple(u.shape)}), got {tuple(z.shape)}")
    h, x, _ = _differentiable(u.contiguous(), z.contiguous(), check_eps(eps))
    return h, x
