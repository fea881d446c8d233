"""Triton kernels of ``effkern.ops.low_rank_embedding``, grid ``(F, cdiv(B, BLOCK_B))``: one field's
reconstruction basis ``U_f [d, k]`` and mean stay in registers while a block of rows gathers and sums its bags'
k-wide compressed rows.

- ``_lre_fwd_kernel``: out[b, f] = U_f e_b + c_b mu_f (e = the bag's sum, or mean), written once.
- ``_lre_de_kernel``: the backward's per-bag gradient de[b, f] = s_b U_f^T g[b, f] (the op scatters it into the
  table and reduces the U / mu gradients over the batch with torch: reductions over all rows).
k and d are small (CTR: k 2-16, d 8-64), so the products are broadcast-multiply-sums, not tl.dot.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

NUM_WARPS = 4
BLOCK_B = 32


@triton.jit
def _bag(ids_ptr, table_ptr, off, f, rows, n_rows, n_fields, bag_len, k, offs_k, BLOCK_B: tl.constexpr,
         BLOCK_K: tl.constexpr):
    """(fp32 sums [BLOCK_B, BLOCK_K] of the rows' bags of field f, their sizes [BLOCK_B])."""
    e = tl.zeros([BLOCK_B, BLOCK_K], dtype=tl.float32)
    n = tl.zeros([BLOCK_B], dtype=tl.float32)
    for j in range(0, bag_len):
        idx = tl.load(ids_ptr + (rows.to(tl.int64) * n_fields + f) * bag_len + j, mask=rows < n_rows, other=-1)
        ok = idx >= 0
        e += tl.load(table_ptr + (off + idx)[:, None] * k + offs_k[None, :], mask=ok[:, None] & (offs_k < k)[None, :],
                     other=0.0).to(tl.float32)
        n += ok.to(tl.float32)
    return e, n


@triton.jit
def _scales(n, MEAN: tl.constexpr):
    """(c: the scale of mu, s: the scale of the bag sum)."""
    if MEAN:
        return tl.where(n > 0, 1.0, 0.0), 1.0 / tl.maximum(n, 1.0)
    return n, tl.full(n.shape, 1.0, tl.float32)


@triton.jit
def _basis(u_ptr, f, d, k, offs_d, offs_k):
    return tl.load(u_ptr + (f * d + offs_d[:, None]) * k + offs_k[None, :],
                   mask=(offs_d < d)[:, None] & (offs_k < k)[None, :], other=0.0).to(tl.float32)


@triton.jit
def _lre_fwd_kernel(ids_ptr, table_ptr, off_ptr, u_ptr, mu_ptr, out_ptr, n_rows, n_fields, bag_len, k, d,
                    MEAN: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    f = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_k = tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    e, n = _bag(ids_ptr, table_ptr, tl.load(off_ptr + f), f, rows, n_rows, n_fields, bag_len, k, offs_k, BLOCK_B,
                BLOCK_K)
    c, s = _scales(n, MEAN)
    u = _basis(u_ptr, f, d, k, offs_d, offs_k)
    mu = tl.load(mu_ptr + f * d + offs_d, mask=offs_d < d, other=0.0).to(tl.float32)
    out = tl.sum((e * s[:, None])[:, None, :] * u[None, :, :], axis=2) + c[:, None] * mu[None, :]
    tl.store(out_ptr + (rows.to(tl.int64)[:, None] * n_fields + f) * d + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=(rows < n_rows)[:, None] & (offs_d < d)[None, :])


@triton.jit
def _lre_de_kernel(ids_ptr, u_ptr, g_ptr, de_ptr, n_rows, n_fields, bag_len, k, d, MEAN: tl.constexpr,
                   BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    f = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_k = tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    n = tl.zeros([BLOCK_B], dtype=tl.float32)
    for j in range(0, bag_len):
        idx = tl.load(ids_ptr + (rows.to(tl.int64) * n_fields + f) * bag_len + j, mask=rows < n_rows, other=-1)
        n += (idx >= 0).to(tl.float32)
    _, s = _scales(n, MEAN)
    g = tl.load(g_ptr + (rows.to(tl.int64)[:, None] * n_fields + f) * d + offs_d[None, :],
                mask=(rows < n_rows)[:, None] & (offs_d < d)[None, :], other=0.0).to(tl.float32)
    de = tl.sum(g[:, :, None] * _basis(u_ptr, f, d, k, offs_d, offs_k)[None, :, :], axis=1) * s[:, None]
    tl.store(de_ptr + (rows.to(tl.int64)[:, None] * n_fields + f) * k + offs_k[None, :], de,
             mask=(rows < n_rows)[:, None] & (offs_k < k)[None, :])


def _launch(kernel, ids, *args, k: int, d: int, mean: bool):
    b, n_fields, bag_len = ids.shape
    if b:
        grid = (n_fields, triton.cdiv(b, BLOCK_B))
        kernel[grid](ids, *args, b, n_fields, bag_len, k, d, MEAN=mean, BLOCK_B=BLOCK_B,
                     BLOCK_K=triton.next_power_of_2(k), BLOCK_D=triton.next_power_of_2(d), num_warps=NUM_WARPS)


def low_rank_embedding_fwd_triton(ids, table, offsets, u, mu, mean: bool) -> torch.Tensor:
    """out [B, F, d] from int64 ids [B, F, L], a contiguous table [V, k], offsets [F], u [F, d, k], mu [F, d]."""
    k, d = table.shape[1], u.shape[1]
    out = torch.empty((ids.shape[0], ids.shape[1], d), dtype=table.dtype, device=table.device)
    _launch(_lre_fwd_kernel, ids, table, offsets, u.contiguous(), mu.contiguous(), out, k=k, d=d, mean=mean)
    return out


def low_rank_embedding_de_triton(ids, u, g, k: int, mean: bool) -> torch.Tensor:
    """de fp32 [B, F, k]: each bag's gradient of its (scaled) compressed-row sum."""
    de = torch.empty((ids.shape[0], ids.shape[1], k), dtype=torch.float32, device=g.device)
    _launch(_lre_de_kernel, ids, u.contiguous(), g, de, k=k, d=u.shape[1], mean=mean)
    return de
