"""CTR models over categorical fields (``ids [B, F, L]``, bags averaged): DeepFM, DCN-v2, AutoInt+ and FiBiNET.

Every model has the same two parts the compression (PAPERS.md E) rewrites:

- ``embedding``: all fields' tables in one ``[sum V_f, d]`` table (:class:`FieldEmbedding`), replaced by an
  :class:`effkern.nn.LowRankEmbedding` (compressed rows + per-field reconstruction).
- ``dnn``: an MLP on the flattened field embeddings ``[B, F d]`` (Linear + ReLU per hidden layer) and its output
  layer ``dnn_out``. After compression the DNN reads the compressed ``[B, F k]`` rows directly, the reconstruction
  folded into its first layer (``dnn_reads_compressed``). FiBiNET's DNN reads its bilinear interactions instead
  (``DNN_READS_EMBEDDINGS = False``): nothing to fold, its embeddings are reconstructed.

and an interaction part that reads the (reconstructed) ``[B, F, d]`` embeddings: DeepFM's first-order weights and
FM, DCN-v2's cross network (``x_{l+1} = x_0 * (W_l x_l + b_l) + x_l``, parallel to the DNN, as DCN-v2's "parallel"
structure), AutoInt's multi-head self-attention over fields (with residual projections, ReLU), FiBiNET's
first-order weights.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from effkern.ops.low_rank_embedding import bag_lookup, check_ids

# The flow's default: FiBiNET is opt-in, its DNN reading F (F - 1) d interaction features is far the slowest to
# train on many fields (KDD-04's 74: 86,432 features, 35M parameters, ~6 s a training step of 1024 on 2 cores).
DEFAULT_MODELS = ("deepfm", "dcnv2", "autoint")


class FieldEmbedding(nn.Module):
    """F fields' embedding tables in one ``[sum V_f, dim]`` table; ``forward(ids [B, F] or [B, F, L])`` returns
    ``[B, F, dim]``, a bag's rows averaged (-1 pads; an id outside its field's range is an error, as it is for the
    compressed model's LowRankEmbedding)."""

    def __init__(self, vocab_sizes: tuple[int, ...], dim: int, std: float = 0.01):
        super().__init__()
        self.vocab_sizes, self.dim = tuple(vocab_sizes), dim
        self.weight = nn.Parameter(torch.randn(sum(vocab_sizes), dim) * std)
        self.register_buffer("offsets", torch.tensor([0, *vocab_sizes[:-1]]).cumsum(0), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        check_ids(ids, self.offsets, self.weight.shape[0])
        return bag_lookup(self.weight, ids, self.offsets, mean=True)


def mlp(d_in: int, hidden: tuple[int, ...]) -> nn.Sequential:
    layers = []
    for width in hidden:
        layers += [nn.Linear(d_in, width), nn.ReLU()]
        d_in = width
    return nn.Sequential(*layers)


class CTRModel(nn.Module):
    """The shared embedding + DNN; subclasses add ``interaction(ids, e) -> [B]`` logits."""

    DNN_READS_EMBEDDINGS = True  # the DNN's input is the flattened embeddings (compression folds into its first layer)

    def __init__(self, vocab_sizes: tuple[int, ...], dim: int = 16, hidden: tuple[int, ...] = (400, 400, 400),
                 dnn_width: int | None = None):
        super().__init__()
        self.num_fields, self.dim = len(vocab_sizes), dim
        self.embedding = FieldEmbedding(vocab_sizes, dim)
        self.dnn = mlp(dnn_width or self.num_fields * dim, hidden)
        self.dnn_out = nn.Linear(hidden[-1], 1)
        self.dnn_reads_compressed = False

    def interaction(self, ids: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dnn_input(self, ids: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """``[B, dnn width]``: the flattened embeddings (the compressed rows once the reconstruction is folded)."""
        if not self.dnn_reads_compressed:
            return e.flatten(1)
        empty = (ids < 0).all(-1) if ids.dim() == 3 else None
        if empty is not None and bool(empty.any()):
            b, f = (int(i) for i in empty.nonzero()[0])
            raise ValueError(f"ids[{b}, {f}] is an empty bag: this compressed model's first DNN layer holds every "
                             "field's mean in its bias (the reconstruction folded in), exact only when each field has "
                             "an id; compress with emb_rank=0 to keep the embedding for data with empty bags")
        return self.embedding.compressed(ids).flatten(1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Click logits ``[B]``."""
        e = self.embedding(ids)
        return self.interaction(ids, e) + self.dnn_out(self.dnn(self.dnn_input(ids, e)))[:, 0]


class DeepFM(CTRModel):
    """Guo et al. 2017: first-order weights + factorisation machine on the field embeddings + DNN."""

    def __init__(self, vocab_sizes, dim=16, hidden=(400, 400, 400)):
        super().__init__(vocab_sizes, dim, hidden)
        self.first_order = FieldEmbedding(vocab_sizes, 1)

    def interaction(self, ids, e):
        fm = 0.5 * (e.sum(1).square() - e.square().sum(1)).sum(-1)
        return self.first_order(ids).sum((1, 2)) + fm


class DCNv2(CTRModel):
    """Wang et al. 2021 (parallel): a cross network of full-rank ``cross_layers`` on ``x_0 = [e_1 .. e_F]`` beside
    the DNN; the logit adds a linear read-out of each."""

    def __init__(self, vocab_sizes, dim=16, hidden=(400, 400, 400), cross_layers: int = 3):
        super().__init__(vocab_sizes, dim, hidden)
        width = len(vocab_sizes) * dim
        self.cross = nn.ModuleList(nn.Linear(width, width) for _ in range(cross_layers))
        self.cross_out = nn.Linear(width, 1)

    def interaction(self, ids, e):
        x0 = x = e.flatten(1)
        for layer in self.cross:
            x = x0 * layer(x) + x
        return self.cross_out(x)[:, 0]


class AutoInt(CTRModel):
    """Song et al. 2019 (AutoInt+): ``layers`` of multi-head self-attention over the F field embeddings, each with a
    residual projection and ReLU, read out linearly; plus the DNN."""

    def __init__(self, vocab_sizes, dim=16, hidden=(400, 400, 400), layers: int = 3, heads: int = 2,
                 head_dim: int = 16):
        super().__init__(vocab_sizes, dim, hidden)
        self.heads, self.head_dim = heads, head_dim
        width = heads * head_dim
        self.attention = nn.ModuleList(
            nn.ModuleDict(dict(q=nn.Linear(d, width, bias=False), k=nn.Linear(d, width, bias=False),
                               v=nn.Linear(d, width, bias=False), res=nn.Linear(d, width, bias=False)))
            for d in [dim] + [width] * (layers - 1))
        self.attention_out = nn.Linear(len(vocab_sizes) * width, 1)

    def interaction(self, ids, e):
        x = e
        b, f, _ = x.shape
        for layer in self.attention:
            q, k, v = (layer[n](x).view(b, f, self.heads, self.head_dim).transpose(1, 2) for n in "qkv")
            attended = F.scaled_dot_product_attention(q, k, v, scale=1 / math.sqrt(self.head_dim))
            x = F.relu(attended.transpose(1, 2).reshape(b, f, -1) + layer["res"](x))
        return self.attention_out(x.flatten(1))[:, 0]


class FiBiNET(CTRModel):
    """Huang et al. 2019: a SENET re-weights the field embeddings (squeeze = each embedding's mean, excitation =
    two ReLU layers through ``F / reduction``); "field-each" bilinear interactions ``(e_i W_i) * e_j`` for every
    pair i < j, of the embeddings and of the re-weighted ones, concatenated and flattened are the DNN's input;
    plus first-order weights."""

    DNN_READS_EMBEDDINGS = False

    def __init__(self, vocab_sizes, dim=16, hidden=(400, 400, 400), reduction: int = 3):
        fields = len(vocab_sizes)
        super().__init__(vocab_sizes, dim, hidden, dnn_width=fields * (fields - 1) * dim)
        squeezed = max(1, fields // reduction)
        self.senet = nn.Sequential(nn.Linear(fields, squeezed), nn.ReLU(), nn.Linear(squeezed, fields), nn.ReLU())
        self.bilinear = nn.Parameter(torch.randn(fields, dim, dim) / math.sqrt(dim))
        self.first_order = FieldEmbedding(vocab_sizes, 1)

    def dnn_input(self, ids, e):
        weights = self.senet(e.mean(-1))
        both = torch.stack([e, e * weights[..., None]], 1)  # [B, 2, F, d]: the embeddings, the re-weighted ones
        projected = torch.einsum("bsfd,fde->bsfe", both, self.bilinear)
        # (e_i W_i) * e_j for j > i, field i's pairs as one product of slices: no gathers, one concatenation for
        # both sets (with index gathers and a cat per set, KDD-04's 74 fields took 0.64-1.07 s a batch of 1024,
        # this 0.20 s; same values)
        pairs = [projected[:, :, i, None] * both[:, :, i + 1 :] for i in range(both.shape[2] - 1)]
        return torch.cat(pairs, 2).flatten(1)

    def interaction(self, ids, e):
        return self.first_order(ids).sum((1, 2))


MODEL_CLASSES = {"deepfm": DeepFM, "dcnv2": DCNv2, "autoint": AutoInt, "fibinet": FiBiNET}
MODELS = tuple(MODEL_CLASSES)


def make_model(name: str, vocab_sizes: tuple[int, ...], dim: int = 16,
               hidden: tuple[int, ...] = (400, 400, 400)) -> CTRModel:
    if name not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {name!r}")
    return MODEL_CLASSES[name](vocab_sizes, dim, hidden)


def count_params(model: nn.Module) -> int:
    """Parameters the model stores (its weights; index buffers are not counted)."""
    return sum(p.numel() for p in model.parameters())
