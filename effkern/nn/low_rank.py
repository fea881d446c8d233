"""``LowRankLinear`` and ``LowRankEmbedding``: drop-in compressed layers on effkern.ops.low_rank_linear /
low_rank_embedding (CTR low-rank compression, PAPERS.md E)."""

from __future__ import annotations

import math

import torch
from torch import nn

from effkern.ops import low_rank_embedding, low_rank_linear
from effkern.ops.low_rank_embedding import MODES, bag_lookup, check_ids
from effkern.ops.low_rank_linear import ACTIVATIONS, OUT_ACTIVATIONS


class LowRankLinear(nn.Module):
    """``out_act(act(x U^T + b1) V^T + b2)``: a ``d_in -> d_out`` linear through rank ``rank``, fused (the rank-r
    hidden layer never reaches memory). ``activation="none"`` is an exact factorisation of a linear map;
    ``out_activation="relu"`` is that map followed by a ReLU (an MLP layer and its activation in one pass).

    Parameters ``u [rank, d_in]``, ``b1 [rank]``, ``v [d_out, rank]``, ``b2 [d_out]`` (biases optional).
    :meth:`from_factors` builds one from given tensors (e.g. a compressed ``nn.Linear``).
    """

    def __init__(self, in_features: int, out_features: int, rank: int, activation: str = "none", bias: bool = True,
                 device=None, dtype=None, out_activation: str = "none"):
        super().__init__()
        if min(in_features, out_features, rank) < 1:
            raise ValueError(f"in_features, out_features and rank must be >= 1, got {in_features}, {out_features}, "
                             f"{rank}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if out_activation not in OUT_ACTIVATIONS:
            raise ValueError(f"out_activation must be one of {OUT_ACTIVATIONS}, got {out_activation!r}")
        kw = dict(device=device, dtype=dtype)
        self.in_features, self.out_features, self.rank, self.activation = in_features, out_features, rank, activation
        self.out_activation = out_activation
        self.u = nn.Parameter(torch.empty(rank, in_features, **kw))
        self.v = nn.Parameter(torch.empty(out_features, rank, **kw))
        self.b1 = nn.Parameter(torch.zeros(rank, **kw)) if bias else None
        self.b2 = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None
        nn.init.kaiming_uniform_(self.u, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.v, a=math.sqrt(5))

    @classmethod
    def from_factors(cls, u: torch.Tensor, v: torch.Tensor, b1: torch.Tensor | None = None,
                     b2: torch.Tensor | None = None, activation: str = "none",
                     out_activation: str = "none") -> LowRankLinear:
        """A layer holding copies of ``u [r, d_in]``, ``v [d_out, r]`` and the biases (both or neither)."""
        if (b1 is None) != (b2 is None):
            raise ValueError("give both biases b1 and b2 or neither")
        layer = cls(u.shape[1], v.shape[0], u.shape[0], activation, bias=b1 is not None, device=u.device,
                    dtype=u.dtype, out_activation=out_activation)
        with torch.no_grad():
            for name, t in (("u", u), ("v", v), ("b1", b1), ("b2", b2)):
                if t is not None:
                    getattr(layer, name).copy_(t)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return low_rank_linear(x, self.u, self.v, self.b1, self.b2, self.activation, self.out_activation)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"activation={self.activation}, out_activation={self.out_activation}, bias={self.b1 is not None}")


class LowRankEmbedding(nn.Module):
    """F compressed embedding fields in one table ``[sum V_f, k]`` with per-field reconstruction ``U_f [d, k]``,
    ``mu_f [d]``: ``forward(ids)`` returns ``[B, F, d]`` (ids ``[B, F]`` or bags ``[B, F, L]`` padded with -1,
    reduced by ``mode``), :meth:`compressed` the k-wide bag sums ``[B, F, k]`` for consumers that fold the
    reconstruction into their own first layer."""

    def __init__(self, vocab_sizes: list[int], dim: int, rank: int, mode: str = "sum", device=None, dtype=None):
        super().__init__()
        if not vocab_sizes or min(vocab_sizes) < 1 or min(dim, rank) < 1:
            raise ValueError(f"vocab_sizes must be positive and dim, rank >= 1, got {vocab_sizes}, {dim}, {rank}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        kw = dict(device=device, dtype=dtype)
        self.vocab_sizes, self.dim, self.rank, self.mode = list(vocab_sizes), dim, rank, mode
        self.table = nn.Parameter(torch.randn(sum(vocab_sizes), rank, **kw) * 0.01)
        self.u = nn.Parameter(torch.eye(dim, rank, **kw).expand(len(vocab_sizes), dim, rank).clone())
        self.mu = nn.Parameter(torch.zeros(len(vocab_sizes), dim, **kw))
        offsets = torch.tensor([0, *vocab_sizes[:-1]], device=device).cumsum(0)
        self.register_buffer("offsets", offsets, persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return low_rank_embedding(ids, self.table, self.offsets, self.u, self.mu, self.mode)

    def compressed(self, ids: torch.Tensor) -> torch.Tensor:
        """The bags' k-wide compressed rows ``[B, F, k]`` (sum or mean, as ``forward`` reduces them)."""
        check_ids(ids, self.offsets, self.table.shape[0])
        return bag_lookup(self.table, ids, self.offsets, self.mode == "mean")

    def extra_repr(self) -> str:
        return f"fields={len(self.vocab_sizes)}, rows={sum(self.vocab_sizes)}, dim={self.dim}, rank={self.rank}"
