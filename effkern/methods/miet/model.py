"""MIET (PAPERS.md C): the cloud's frozen-backbone features and the edge's light network over their sum.

The cloud runs the frozen timm ``VisionTransformer`` and sends, per image, only ``s = sum_{i in layers} z_i``
(``z_0`` the embedded tokens, ``z_i`` block i's output): one ``[N, d]`` tensor instead of one per layer
(:func:`gather_features`). The edge trains :class:`EdgeNetwork` on ``s``: LSA blocks ``u <- u + LSA(LN(u))``
from ``u = s``, then LayerNorm, the pool and a linear head, K networks (K learning rates) at once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from effkern.methods.backbone.model import normalize
from effkern.nn import LowRankAttention


def check_layers(layers: Sequence[int], depth: int) -> tuple[int, ...]:
    """``layers`` as a sorted tuple of distinct indices in ``[0, depth]`` (0: the embedded tokens); ValueError
    otherwise."""
    picked = tuple(sorted(set(layers)))
    if not picked or picked[0] < 0 or picked[-1] > depth or len(picked) != len(layers):
        raise ValueError(f"layers must be distinct indices in [0, {depth}] (0: the embedded tokens, i: block i's "
                         f"output), got {tuple(layers)}")
    return picked


@torch.no_grad()
def gather_features(vit: nn.Module, images: torch.Tensor, layers: Sequence[int], *,
                    reduce: bool = True) -> torch.Tensor:
    """The frozen backbone's features of uint8 ``images [n, C, H, W]`` at ``layers`` (indices into
    ``[z_0, ..., z_depth]``): their sum ``[n, N, d]`` (``reduce``, MIET's payload) or all of them stacked
    ``[n, len(layers), N, d]`` (what a side network like LAST's would need). Blocks after the last requested
    layer are not run."""
    layers = check_layers(layers, len(vit.blocks))
    x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(normalize(images)))))
    picked = [x] if layers[0] == 0 else []  # reduce: only the running sum is kept, not k + 1 features
    for i, block in enumerate(vit.blocks[: layers[-1]], start=1):
        x = block(x)
        if i in layers:
            picked = [picked[0] + x] if reduce and picked else [*picked, x]
    return picked[0] if reduce else torch.stack(picked, 1)


class EdgeNetwork(nn.Module):
    """MIET's edge network (LAE) for K networks at once: ``u <- u + LSA_j(LN(u))`` for ``blocks`` LSA blocks from
    ``u = s`` (the cloud's summed feature), then LN, the pool and a linear head per network.

    [RECON] switches: the depth (``blocks``), rank and pool, and that s is not rescaled (the LayerNorms see it
    normalised anyway). LN has no affine parameters (the head absorbs it); ``W_o`` starts at zero, so training
    starts from a linear probe on ``LN(s)``.

    ``forward([s])``: ``s [B, N, d]`` (a one-element list, as LAST's trainer passes features) -> logits
    ``[K, B, num_classes]``.
    """

    def __init__(self, dim: int, num_classes: int, *, blocks: int = 2, rank: int = 16, heads: int = 2,
                 num_networks: int = 1, pool: str = "cls", num_prefix_tokens: int = 1):
        super().__init__()
        if blocks < 0 or pool not in ("cls", "mean"):
            raise ValueError(f"blocks must be >= 0 and pool 'cls' or 'mean', got {blocks}, {pool!r}")
        if pool == "cls" and num_prefix_tokens < 1:
            raise ValueError("pool='cls' needs a cls token (num_prefix_tokens >= 1)")
        self.pool, self.num_prefix_tokens, self.num_networks = pool, num_prefix_tokens, num_networks
        self.blocks = nn.ModuleList(LowRankAttention(dim, rank, heads=heads, num_networks=num_networks)
                                    for _ in range(blocks))
        self.head_weight = nn.Parameter(torch.zeros(num_networks, dim, num_classes))
        self.head_bias = nn.Parameter(torch.zeros(num_networks, num_classes))

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(feats) != 1:
            raise ValueError(f"EdgeNetwork reads one feature (the sum s), got {len(feats)}")
        u = feats[0].to(self.head_weight.dtype)
        for lsa in self.blocks:
            u = u + lsa(F.layer_norm(u, u.shape[-1:]))  # [B, N, d] shared by the K networks, then [K, B, N, d]
        rows = u[..., :1, :] if self.pool == "cls" else u[..., self.num_prefix_tokens:, :]
        pooled = F.layer_norm(rows, u.shape[-1:]).mean(-2)  # the mean of the one cls row is that row
        if pooled.dim() == 2:  # no LSA block: every network reads the same feature
            pooled = pooled.expand(self.num_networks, -1, -1)
        return torch.baddbmm(self.head_bias[:, None], pooled, self.head_weight)
