"""Triton kernels of ``effkern.ops.residual_layer_norm``: ``h = u + z``, ``x = LayerNorm(h)`` (no affine) and its
one-pass backward. A block of ``BLOCK_ROWS`` rows per program, a whole row (``BLOCK_D`` = next power of two >= d)
in registers; statistics in fp32 (two-pass variance). Row r of u reads row ``r % z_rows`` of z.

The statistics are those of ``h - K`` with ``K = h[row, 0]``: the shift leaves the variance unchanged but takes the
row's mean out of the sums, so a constant row gives exactly 0 (as ``F.layer_norm``) and a row of mean 1e4 does not
lose the mantissa bits its values differ in (a plain ``sum(h) / d`` rounds the mean, and ``h - mean`` then
leaves that rounding error in every element).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _checks as chk

NUM_WARPS = 4


def _block_rows(d: int) -> int:
    """Rows per program: about 4096 values in flight (32 fp32 registers per thread at 4 warps)."""
    return max(1, min(64, 4096 // triton.next_power_of_2(d)))


@triton.jit
def _rows(n_rows, d, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows < n_rows)[:, None] & (cols < d)[None, :]
    return rows, rows[:, None].to(tl.int64) * d + cols[None, :], mask


@triton.jit
def _rln_fwd_kernel(u_ptr, z_ptr, h_ptr, x_ptr, rstd_ptr, n_rows, z_rows, d, eps,
                BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    rows, offs, mask = _rows(n_rows, d, BLOCK_ROWS, BLOCK_D)
    z_offs = (rows % z_rows)[:, None].to(tl.int64) * d + tl.arange(0, BLOCK_D)[None, :]
    h = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32) + tl.load(z_ptr + z_offs, mask=mask,
                                                                               other=0.0).to(tl.float32)
    first = tl.sum(tl.where(tl.arange(0, BLOCK_D)[None, :] == 0, h, 0.0), axis=1)  # K = h[row, 0]
    shifted = tl.where(mask, h - first[:, None], 0.0)
    centred = tl.where(mask, shifted - (tl.sum(shifted, axis=1) / d)[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / d + eps)
    tl.store(h_ptr + offs, h.to(h_ptr.dtype.element_ty), mask=mask)
    tl.store(x_ptr + offs, (centred * rstd[:, None]).to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=rows < n_rows)


@triton.jit
def _rln_bwd_kernel(x_ptr, rstd_ptr, dh_ptr, dx_ptr, du_ptr, n_rows, d, BLOCK_ROWS: tl.constexpr,
                BLOCK_D: tl.constexpr):
    rows, offs, mask = _rows(n_rows, d, BLOCK_ROWS, BLOCK_D)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(dx_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.load(rstd_ptr + rows, mask=rows < n_rows, other=0.0)
    mean_g = tl.sum(g, axis=1) / d
    mean_gx = tl.sum(g * x, axis=1) / d
    du = tl.load(dh_ptr + offs, mask=mask, other=0.0).to(tl.float32) + rstd[:, None] * (
        g - mean_g[:, None] - x * mean_gx[:, None])
    tl.store(du_ptr + offs, du.to(du_ptr.dtype.element_ty), mask=mask)


def _grid(n_rows: int, d: int) -> tuple[tuple[int], dict]:
    rows = _block_rows(d)
    return (triton.cdiv(n_rows, rows),), dict(BLOCK_ROWS=rows, BLOCK_D=triton.next_power_of_2(d),
                                              num_warps=NUM_WARPS)


def residual_layer_norm_fwd_triton(u: torch.Tensor, z: torch.Tensor, eps: float):
    """u contiguous [..., d], z contiguous (u's trailing dims) -> (h, x, rstd fp32 [...])."""
    op = "residual_layer_norm_fwd_triton"
    chk.require(u.dim() >= 1 and u.dtype in chk.FLOAT_DTYPES and u.is_contiguous() and u.shape[-1] > 0, op,
                lambda: f"u must be a contiguous float32 / float16 / bfloat16 [..., d >= 1] tensor, got {u.dtype} "
                f"{tuple(u.shape)}")
    chk.require(1 <= z.dim() <= u.dim() and z.shape == u.shape[u.dim() - z.dim():] and z.is_contiguous() and
                z.dtype == u.dtype and z.device == u.device, op,
                lambda: f"z must be a contiguous tensor of u's dtype and trailing dims, got {z.dtype} {tuple(z.shape)}")
    d = u.shape[-1]
    n_rows, z_rows = u.numel() // d, z.numel() // d
    h, x = torch.empty_like(u), torch.empty_like(u)
    rstd = torch.empty(u.shape[:-1], dtype=torch.float32, device=u.device)
    if n_rows:
        grid, meta = _grid(n_rows, d)
        _rln_fwd_kernel[grid](u, z, h, x, rstd, n_rows, z_rows, d, eps, **meta)
    return h, x, rstd


def residual_layer_norm_bwd_triton(x: torch.Tensor, rstd: torch.Tensor, dh: torch.Tensor, dx: torch.Tensor):
    """du from contiguous x, rstd, dh, dx."""
    op = "residual_layer_norm_bwd_triton"
    chk.require(x.dim() >= 1 and x.dtype in chk.FLOAT_DTYPES and x.is_contiguous() and x.shape[-1] > 0, op,
                lambda: f"x must be a contiguous float32 / float16 / bfloat16 [..., d >= 1] tensor, got {x.dtype} "
                f"{tuple(x.shape)}")
    chk.require(chk.dense(rstd, torch.float32, x.shape[:-1]), op, lambda: f"rstd must be a contiguous float32 "
                f"{tuple(x.shape[:-1])} tensor")
    chk.require(chk.dense(dh, x.dtype, x.shape) and chk.dense(dx, x.dtype, x.shape), op,
                "dh and dx must be contiguous tensors of x's shape and dtype")
    chk.on_device(op, x.device, rstd=rstd, dh=dh, dx=dx)
    d = x.shape[-1]
    n_rows = x.numel() // d
    du = torch.empty_like(x)
    if n_rows:
        grid, meta = _grid(n_rows, d)
        _rln_bwd_kernel[grid](x, rstd, dh, dx, du, n_rows, d, **meta)
    return du
