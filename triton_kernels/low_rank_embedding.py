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

from . import _checks as chk
from ._checks import ERR_IDS

NUM_WARPS = 4
BLOCK_B = 32


@triton.jit
def _bag(ids_ptr, table_ptr, off_ptr, f, rows, n_rows, n_fields, bag_len, n_table, k, offs_k, BLOCK_B: tl.constexpr,
         BLOCK_K: tl.constexpr):
    """(fp32 sums [BLOCK_B, BLOCK_K] of the rows' bags of field f, their sizes [BLOCK_B], the number of bad ids).
    An id outside the field's [0, V_f) (V_f = offsets[f + 1] - offsets[f], the last field up to the table's n_table
    rows), or whose row falls outside the table (offsets that do not fit it), reads nothing and counts as padding."""
    first = tl.load(off_ptr + f)
    has_next = f + 1 < n_fields
    size = tl.where(has_next, tl.load(off_ptr + f + 1, mask=has_next, other=0), n_table) - first
    e = tl.zeros([BLOCK_B, BLOCK_K], dtype=tl.float32)
    n = tl.zeros([BLOCK_B], dtype=tl.float32)
    n_bad = tl.zeros([BLOCK_B], dtype=tl.int32)
    for j in range(0, bag_len):
        idx = tl.load(ids_ptr + (rows.to(tl.int64) * n_fields + f) * bag_len + j, mask=rows < n_rows, other=-1)
        row = first + idx
        ok = (idx >= 0) & (idx < size) & (row >= 0) & (row < n_table)
        n_bad += tl.where(ok | (idx == -1), 0, 1)
        e += tl.load(table_ptr + tl.where(ok, row, 0)[:, None] * k + offs_k[None, :],
                     mask=ok[:, None] & (offs_k < k)[None, :], other=0.0).to(tl.float32)
        n += ok.to(tl.float32)
    return e, n, tl.max(n_bad, axis=0)


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
def _lre_fwd_kernel(ids_ptr, table_ptr, off_ptr, u_ptr, mu_ptr, out_ptr, err_ptr, n_table, n_rows, n_fields, bag_len,
                    k, d, MEAN: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    f = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_k = tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    e, n, n_bad = _bag(ids_ptr, table_ptr, off_ptr, f, rows, n_rows, n_fields, bag_len, n_table, k, offs_k, BLOCK_B,
                       BLOCK_K)
    tl.store(err_ptr, ERR_IDS, mask=n_bad > 0)  # effkern/ops/_device_errors.py
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
    if b and n_fields:
        grid = (n_fields, triton.cdiv(b, BLOCK_B))
        kernel[grid](ids, *args, b, n_fields, bag_len, k, d, MEAN=mean, BLOCK_B=BLOCK_B,
                     BLOCK_K=max(1, triton.next_power_of_2(k)), BLOCK_D=max(1, triton.next_power_of_2(d)),
                     num_warps=NUM_WARPS)


def low_rank_embedding_fwd_triton(ids, table, offsets, u, mu, mean: bool, err: torch.Tensor) -> torch.Tensor:
    """out [B, F, d] from int64 ids [B, F, L], a contiguous table [V, k], offsets int64 [F], u [F, d, k], mu [F, d];
    err: the int32 [1] error word that gets IDS for an id outside its field (which then reads nothing;
    effkern/ops/_device_errors.py). The shapes are checked here again: the registered op can be called without
    ``effkern.ops.low_rank_embedding``'s checks."""
    op = "low_rank_embedding_fwd_triton"
    _check_ids_u(op, ids, u)
    n_fields, d, k = u.shape
    chk.require(table.dim() == 2 and table.is_contiguous() and table.dtype == u.dtype and table.shape[1] == k, op,
                lambda: f"table must be a contiguous [V, k={k}] tensor of u's dtype {u.dtype}")
    chk.require(chk.dense(offsets, torch.int64, (n_fields,)), op,
                lambda: f"offsets must be a contiguous int64 [F={n_fields}]")
    chk.require(mu.dim() == 2 and tuple(mu.shape) == (n_fields, d) and mu.dtype == u.dtype, op,
                lambda: f"mu must be [F, d] = [{n_fields}, {d}] in u's dtype")
    chk.on_device(op, ids.device, table=table, offsets=offsets, mu=mu)
    chk.error_word(op, err, ids.device)
    out = torch.empty((ids.shape[0], n_fields, d), dtype=table.dtype, device=table.device)
    _launch(_lre_fwd_kernel, ids, table, offsets, u.contiguous(), mu.contiguous(), out, err, table.shape[0], k=k, d=d,
            mean=mean)
    return out


def low_rank_embedding_de_triton(ids, u, g, k: int, mean: bool) -> torch.Tensor:
    """de fp32 [B, F, k]: each bag's gradient of its (scaled) compressed-row sum (ids are only counted, never
    dereferenced: no error word)."""
    op = "low_rank_embedding_de_triton"
    _check_ids_u(op, ids, u)
    chk.require(u.shape[2] == k, op, lambda: f"u must be [F, d, k={k}], got {tuple(u.shape)}")
    chk.require(chk.dense(g, u.dtype, (ids.shape[0], u.shape[0], u.shape[1])), op,
                lambda: f"g must be a contiguous [B, F, d] tensor of u's dtype {u.dtype}")
    chk.on_device(op, ids.device, g=g)
    de = torch.empty((ids.shape[0], ids.shape[1], k), dtype=torch.float32, device=g.device)
    _launch(_lre_de_kernel, ids, u.contiguous(), g, de, k=k, d=u.shape[1], mean=mean)
    return de


def _check_ids_u(op: str, ids: torch.Tensor, u: torch.Tensor) -> None:
    chk.require(ids.dim() == 3 and ids.dtype == torch.int64 and ids.is_contiguous(), op,
                lambda: f"ids must be a contiguous int64 [B, F, L] tensor, got {ids.dtype} {tuple(ids.shape)}")
    chk.float_tensor(op, "u", u, 3)
    chk.require(u.shape[0] == ids.shape[1], op, lambda: f"u must be [F={ids.shape[1]}, d, k], got {tuple(u.shape)}")
    chk.on_device(op, ids.device, u=u)
