"""``effkern.ops.low_rank_embedding``: lookup in compressed per-field embedding tables with the low-rank
reconstruction applied in the same pass.

CTR low-rank compression (PAPERS.md E) replaces field f's table ``E_f [V_f, d]`` by ``E'_f = (E_f - mu_f) U_f``
``[V_f, k]`` and reconstructs ``e = U_f e' + mu_f``. All fields' compressed rows live in one table ``[V, k]``
(field f's ids start at row ``offsets[f]``); a field may be multi-valued (a bag of ids, padded with -1), whose
rows are summed (or averaged) BEFORE the reconstruction, since ``sum_j (U e'_j + mu) = U sum_j e'_j + n mu``::

    out[b, f] = U_f (sum_j table[offsets[f] + ids[b, f, j]]) + n mu_f       # mode "sum"; "mean" divides by n

Backends (op contract): ``cpu`` = C++ kernel (per row and field: a gather-sum of k-wide rows in fp32, then k
broadcast-FMAs along d; the backward accumulates the table, U and mu gradients per thread); on CUDA tensors the
CUDA kernels for k <= 32 (a warp per row and field, a lane per component), else the Triton kernels: both fuse the
forward, and compute the backward's per-bag gradient de in a kernel, its scatter into the table and the U / mu
reductions over the batch as torch ops; the reference everywhere else.
"""

from __future__ import annotations

import torch

from effkern.ops import _backend
from effkern.ops._checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    acc_dtype,
    bounds_checkable,
    check_same_dtype,
    check_tensor,
    native,
)
from effkern.ops._device_errors import guarded
from effkern.ops._op import custom_op, register_autograd

MODES = ("sum", "mean")
CUDA_MAX_RANK = 32  # csrc/cuda/low_rank_embedding.cuh: kLowRankEmbeddingMaxRank


def bag_rows(ids: torch.Tensor, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(table rows ``[B, F, L]`` of ids ``[B, F]`` or ``[B, F, L]`` in one table of all fields, which of them are
    real ids ``[B, F, L]``; -1 pads a bag)."""
    ids = ids if ids.dim() == 3 else ids[..., None]
    return offsets.view(1, -1, 1) + ids.clamp_min(0).long(), ids >= 0


def bag_lookup(table: torch.Tensor, ids: torch.Tensor, offsets: torch.Tensor, mean: bool) -> torch.Tensor:
    """Each bag's table rows summed (or averaged; an empty bag gives zeros), ``[B, F, k]``: plain torch, for the
    uncompressed tables and the compressed rows a layer reads directly."""
    rows, valid = bag_rows(ids, offsets)
    out = (table[rows] * valid[..., None]).sum(2)
    return out / valid.sum(-1, keepdim=True).clamp_min(1) if mean else out


def _bags(ids, table, offsets, mean: bool):
    """(rows [B, F, L] table rows, valid [B, F, L], scaled bag sums [B, F, k] fp32 (fp64 for a fp64 table),
    c [B, F], s [B, F])."""
    rows, valid = bag_rows(ids, offsets)
    n = valid.sum(-1).to(acc_dtype(table))
    c = (n > 0).to(n.dtype) if mean else n
    s = 1 / n.clamp_min(1) if mean else torch.ones_like(n)
    return rows, valid, bag_lookup(table.to(n.dtype), ids, offsets, mean), c, s


def reference(ids, table, offsets, u, mu, mean: bool) -> torch.Tensor:
    """Ground truth: ``out [B, F, d]`` in the table's dtype."""
    check_ids(ids, offsets, table.shape[0])  # torch.ops callers reach this without the entry point's checks
    _, _, e, c, _ = _bags(ids, table, offsets, mean)
    out = torch.einsum("fdk,bfk->bfd", u.to(e.dtype), e) + c[..., None] * mu.to(e.dtype)
    return out.to(table.dtype)


def _grads(bags, table, u, mu, g, de):
    """(dtable, du, dmu) from the bags (:func:`_bags`) and each bag's gradient de [B, F, k] (fp32)."""
    rows, valid, e, c, _ = bags
    dtable = torch.zeros(table.shape, dtype=e.dtype, device=table.device)
    dtable.index_add_(0, rows[valid], de[:, :, None].expand(*rows.shape, de.shape[-1])[valid].to(e.dtype))
    gf = g.to(e.dtype)
    return (dtable.to(table.dtype), torch.einsum("bfd,bfk->fdk", gf, e).to(u.dtype),
            (c[..., None] * gf).sum(0).to(mu.dtype))


def bwd_reference(ids, table, offsets, u, mu, g, mean: bool):
    """``(dtable, du, dmu)`` from ``g = dL/dout [B, F, d]``: de = s U_f^T g scattered to the bag's rows,
    dU_f = sum_b g e^T, dmu_f = sum_b c g."""
    check_ids(ids, offsets, table.shape[0])
    bags = _bags(ids, table, offsets, mean)
    de = torch.einsum("fdk,bfd->bfk", u.to(bags[2].dtype), g.to(bags[2].dtype)) * bags[4][..., None]
    return _grads(bags, table, u, mu, g, de)


def _cpu(ids, table, offsets, u, mu, mean):
    return _backend.extension().low_rank_embedding_fwd_cpu(ids, table, offsets, u.contiguous(), mu.contiguous(), mean)


@guarded
def _cuda(ids, table, offsets, u, mu, mean, err):
    return _backend.extension().low_rank_embedding_fwd_cuda(ids, table, offsets, u.contiguous(), mu.contiguous(),
                                                            mean, err)


def _cpu_bwd(ids, table, offsets, u, mu, g, mean):
    return tuple(_backend.extension().low_rank_embedding_bwd_cpu(ids, table, offsets, u, mu, g, mean))


def _cuda_bwd(ids, table, offsets, u, mu, g, mean):
    de = _backend.extension().low_rank_embedding_de_cuda(ids, u.contiguous(), g, mean)
    return _grads(_bags(ids, table, offsets, mean), table, u, mu, g, de)


@guarded
def _triton(*args):
    from effkern.triton_kernels.low_rank_embedding import low_rank_embedding_fwd_triton

    return low_rank_embedding_fwd_triton(*args)


def _triton_bwd(ids, table, offsets, u, mu, g, mean):
    from effkern.triton_kernels.low_rank_embedding import low_rank_embedding_de_triton

    de = low_rank_embedding_de_triton(ids, u, g, table.shape[1], mean)
    return _grads(_bags(ids, table, offsets, mean), table, u, mu, g, de)


_IMPLS = {"reference": reference, "cpu": _cpu, "cuda": _cuda, "triton": _triton}
_BWD_IMPLS = {"reference": bwd_reference, "cpu": _cpu_bwd, "cuda": _cuda_bwd, "triton": _triton_bwd}


def _preferred(table: torch.Tensor) -> list[str]:
    if table.device.type == "cpu":
        return native(table, ["cpu"])
    return native(table, ["cuda", "triton"] if table.shape[1] <= CUDA_MAX_RANK else ["triton"])


@custom_op("effkern::low_rank_embedding")
def op(ids: torch.Tensor, table: torch.Tensor, offsets: torch.Tensor, u: torch.Tensor, mu: torch.Tensor,
       mean: bool) -> torch.Tensor:
    """ids int64 [B, F, L] (-1 = padding), table contiguous [V, k], offsets int64 [F], u [F, d, k], mu [F, d]."""
    return _backend.run("low_rank_embedding", table.device, _preferred(table), _IMPLS, ids, table, offsets, u, mu,
                        mean)


@op.register_fake
def _(ids, table, offsets, u, mu, mean):
    return table.new_empty((ids.shape[0], ids.shape[1], u.shape[1]))


@custom_op("effkern::low_rank_embedding_bwd")
def bwd_op(ids: torch.Tensor, table: torch.Tensor, offsets: torch.Tensor, u: torch.Tensor, mu: torch.Tensor,
           g: torch.Tensor, mean: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dtable, du, dmu) from g = dL/dout (contiguous [B, F, d])."""
    return _backend.run("low_rank_embedding", table.device, _preferred(table), _BWD_IMPLS, ids, table, offsets, u, mu,
                        g, mean)


@bwd_op.register_fake
def _(ids, table, offsets, u, mu, g, mean):
    return torch.empty_like(table), torch.empty_like(u), torch.empty_like(mu)


def _setup_context(ctx, inputs, output):
    ids, table, offsets, u, mu, mean = inputs
    ctx.save_for_backward(ids, table, offsets, u, mu)
    ctx.mean = mean


def _backward(ctx, g):
    ids, table, offsets, u, mu = ctx.saved_tensors
    dtable, du, dmu = bwd_op(ids, table, offsets, u, mu, g.contiguous(), ctx.mean)
    return None, dtable, None, du, dmu, None


_differentiable = register_autograd(op, _backward, _setup_context)


def low_rank_embedding(ids: torch.Tensor, table: torch.Tensor, offsets: torch.Tensor, u: torch.Tensor,
                       mu: torch.Tensor, mode: str = "sum") -> torch.Tensor:
    """Reconstructed embeddings ``[B, F, d]`` of F fields from one compressed table.

    Args:
        ids: ``[B, F]`` (one id per field) or ``[B, F, L]`` (bags, padded with -1), int32/int64; field f's ids
            must lie in ``[0, V_f)``, ``V_f = offsets[f + 1] - offsets[f]`` (the last field runs to the table's end).
        table: ``[V, k]`` compressed rows of every field.
        offsets: ``[F]`` int, the first table row of each field (``offsets[0] == 0``, non-decreasing).
        u: ``[F, d, k]`` reconstruction bases; mu: ``[F, d]`` field means.
        mode: ``"sum"`` or ``"mean"`` over a bag's ids (an empty bag gives zeros).

    Returns:
        ``[B, F, d]`` in the table's dtype. Differentiable in table, u and mu.
    """
    check_tensor("ids", ids, dtypes=INDEX_DTYPES, dims="[B, F] or [B, F, L]")
    if ids.dim() not in (2, 3):
        raise ValueError(f"ids must be [B, F] or [B, F, L], got shape {tuple(ids.shape)}")
    check_tensor("table", table, ndim=2, dtypes=FLOAT_DTYPES, device=ids.device, dims="[V, k]")
    n_fields = ids.shape[1]
    check_tensor("offsets", offsets, ndim=1, dtypes=INDEX_DTYPES, device=ids.device, shape=(n_fields,), dims="[F]")
    check_tensor("u", u, ndim=3, device=ids.device, shape=(n_fields, None, table.shape[1]), dims="[F, d, k]")
    check_tensor("mu", mu, ndim=2, device=ids.device, shape=(n_fields, u.shape[1]), dims="[F, d]")
    check_same_dtype("u", u, "table", table)
    check_same_dtype("mu", mu, "table", table)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    ids = ids if ids.dim() == 3 else ids[..., None]
    check_ids(ids, offsets, table.shape[0])
    return _differentiable(ids.long().contiguous(), table.contiguous(), offsets.long().contiguous(), u, mu,
                           mode == "mean")


def check_ids(ids: torch.Tensor, offsets: torch.Tensor, n_rows: int) -> None:
    """Field f of ids ``[B, F]`` or ``[B, F, L]`` must hold ids in ``[0, V_f)`` or -1 (padding), with ``V_f`` from
    the offsets of a table of ``n_rows`` rows (one host sync; skipped while compiling)."""
    if not bounds_checkable(ids) or not ids.numel():
        return
    ids = ids if ids.dim() == 3 else ids[..., None]
    offsets = offsets.long()
    sizes = torch.cat([offsets[1:], offsets.new_tensor([n_rows])]) - offsets
    if int(offsets[0]) != 0 or bool((sizes < 0).any()):
        raise ValueError(f"offsets must start at 0 and not decrease up to the table's {n_rows} rows, got "
                         f"{offsets.tolist()}")
    bad = (ids < -1) | (ids >= sizes.view(1, -1, 1))
    if bool(bad.any()):
        b, f, j = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"ids[{b}, {f}, {j}] = {int(ids[b, f, j])} is outside field {f}'s ids [0, {int(sizes[f])}) "
                         f"(-1 pads a bag): an id unseen when the table was built?")
