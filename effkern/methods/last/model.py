"""LAST (PAPERS.md A): a side network of low-rank self-attention (LSA) blocks over a frozen timm ViT's features.

The backbone is frozen in parameters and outputs: :func:`group_features` runs it once (no autograd) and returns
``z_0`` (the embedded tokens) and ``z_i`` (the output of each group of ``group_size`` blocks). The side network
(:class:`LASTSide`) then never touches the backbone again, so features can be cached and K side networks
(K hyper-parameter settings) trained at once over the same features.

Side stream [RECON, switches]: ``u_0 = z_0``; ``h_i = u_{i-1} + z_i``; ``u_i = h_i + LSA_i(LN(h_i))``. The bias
correction (``bias_correction=True``) returns ``u_m - sum_{i<m} z_i = z_m + sum_i LSA_i(.)``: the frozen final
feature plus learned deltas (computed as ``u_m`` minus the running sum of the z's, on the pooled tokens only);
then the backbone's own head path (frozen: ``norm``, the pool (``"cls"`` or ``"mean"`` of the patch tokens),
``fc_norm``) and a linear head per side network. ``LN`` has no affine parameters: an affine would be folded
into the LSA down-projection anyway, and without it the first block's K networks read the same normalised
tokens, so their down-projections are one GEMM (effkern.ops.low_rank_attention). ``Wo`` starts at zero, so
training starts from the linear-probe model on the final feature.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from effkern.nn import LowRankAttentionBlock

TIMM_POOLS = {"token": "cls", "avg": "mean"}  # timm's global_pool -> LASTSide's pool


@torch.no_grad()
def group_features(vit: nn.Module, images: torch.Tensor, group_size: int) -> list[torch.Tensor]:
    """``[z_0, z_1, ..., z_m]`` (each ``[B, N, d]``) of a timm ``VisionTransformer``: the embedded tokens and the
    output of every ``group_size``-th block (``m = depth / group_size``)."""
    depth = len(vit.blocks)
    if group_size < 1 or depth % group_size:
        raise ValueError(f"group_size must divide the backbone depth {depth}, got {group_size}")
    x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(images))))
    feats = [x]
    for i, block in enumerate(vit.blocks):
        x = block(x)
        if (i + 1) % group_size == 0:
            feats.append(x)
    return feats


class LASTSide(nn.Module):
    """K LAST side networks (LSA blocks + heads) for a timm ``VisionTransformer``, over its ``m + 1`` features.

    Everything about the backbone is read from ``vit``: the width, the depth, its prefix tokens (cls and register
    tokens, ``vit.num_prefix_tokens``) and its head path, which the side network repeats on its corrected
    feature: ``vit.norm`` on the tokens, the pool, ``vit.fc_norm`` on the pooled feature (timm's
    ``forward_features`` + ``forward_head``; a ``global_pool='avg'`` ViT normalises after pooling, a
    ``'token'`` one before). The norms are copied and frozen; ``vit`` itself is not kept.

    Args:
        vit: the frozen backbone (a timm ``VisionTransformer``).
        num_classes: classes of the task.
        rank: r of every LSA block; heads: attention heads inside r.
        group_size: backbone blocks per LSA block (m = depth / group_size).
        num_networks: K side networks trained together (e.g. K learning rates).
        probe: no LSA block, reading only ``[z_m]``: the linear probe on the final feature.
        pool: ``"cls"`` (the cls token) or ``"mean"`` (mean of the patch tokens); None: the backbone's own
            (``global_pool`` ``'token'`` or ``'avg'``).
        bias_correction: subtract ``sum_{i<m} z_i`` from the side stream (LAST); False keeps ``u_m``.
    """

    def __init__(self, vit: nn.Module, num_classes: int, *, rank: int = 16, heads: int = 1, group_size: int = 1,
                 num_networks: int = 1, probe: bool = False, pool: str | None = None, bias_correction: bool = True):
        super().__init__()
        depth = len(vit.blocks)
        if group_size < 1 or depth % group_size:
            raise ValueError(f"group_size must divide the backbone depth {depth}, got {group_size}")
        if pool is None:
            pool = TIMM_POOLS.get(vit.global_pool)
            if pool is None:
                raise ValueError(f"the backbone's global_pool={vit.global_pool!r} has no LAST counterpart: pass "
                                 "pool='cls' or 'mean'")
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")
        if pool == "cls" and getattr(vit, "cls_token", None) is None:
            raise ValueError("pool='cls' needs a backbone with a cls token (class_token=True)")
        self.pool, self.bias_correction, self.num_networks = pool, bias_correction, num_networks
        # timm's mean pool skips the prefix tokens (cls, registers) unless the model says otherwise
        self.pool_start = 0 if getattr(vit, "pool_include_prefix", False) else vit.num_prefix_tokens
        dim = vit.embed_dim
        self.blocks = nn.ModuleList(LowRankAttentionBlock(dim, rank, heads=heads, num_networks=num_networks)
                                    for _ in range(0 if probe else depth // group_size))
        self.norm = copy.deepcopy(vit.norm).requires_grad_(False)
        self.fc_norm = copy.deepcopy(getattr(vit, "fc_norm", nn.Identity())).requires_grad_(False)
        self.head_weight = nn.Parameter(torch.zeros(num_networks, dim, num_classes))
        self.head_bias = nn.Parameter(torch.zeros(num_networks, num_classes))

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """Logits ``[K, B, classes]`` from ``[z_0, ..., z_m]`` (each ``[B, N, d]``, e.g. cached)."""
        if len(feats) != len(self.blocks) + 1:
            raise ValueError(f"expected {len(self.blocks) + 1} features [z_0..z_m], got {len(feats)}")
        dtype = self.head_weight.dtype
        feats = [f.to(dtype) for f in feats]
        u = feats[0]
        for block, z in zip(self.blocks, feats[1:], strict=True):
            u = block(u, z)  # [B, N, d] (z_0, shared by all K) before the first block, then [K, B, N, d]
        # Only the pooled tokens are normalised and read: the cls row, or the patch rows for the mean.
        rows = slice(0, 1) if self.pool == "cls" else slice(self.pool_start, None)
        out = u[..., rows, :]
        if self.bias_correction:  # u_m - sum_{i<m} z_i = z_m + sum_i LSA_i(.): the frozen final feature + deltas
            out = out - sum(z[:, rows] for z in feats[:-1])
        pooled = self.fc_norm(self.norm(out).mean(-2))  # the mean of the one cls row is that row
        if pooled.dim() == 2:  # no LSA block (the linear probe): every network reads the same feature
            pooled = pooled.expand(self.num_networks, -1, -1)
        return torch.baddbmm(self.head_bias[:, None], pooled, self.head_weight)
