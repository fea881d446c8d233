"""Low-rank compression of a trained CTR model by its output statistics (PAPERS.md E, "atomic feature mimicking").

1. :func:`collect_stats` streams the TRAINING data through the model once: for every compressible linear layer
   (the DNN's, DCN-v2's cross layers) the fp64 sum and Gram matrix of its outputs ``y = W x + b`` (before the
   activation), and per field the lookup count of every embedding row (``FieldStats``: mean and covariance of the
   rows a field actually serves, weighted by how often).
2. Per layer, the top-k eigenvectors ``U_k`` of the output covariance give ``y ~= U_k U_k^T (y - mu) + mu``, i.e.
   two linears ``L1 = (U_k^T W, U_k^T b)`` and ``L2 = (U_k, (I - U_k U_k^T) mu)``, one fused
   :class:`~effkern.nn.LowRankLinear`. ``variant="exact"`` keeps nothing between them (exact at full rank);
   ``"act"`` inserts the layer's own ReLU (the paper's ``_Act``; no longer exact, recovered by fine-tuning) in
   the DNN's layers; DCN-v2's cross layers have no activation of their own and stay exact.
3. Per field, ``E'_f = (E_f - mu_f) U_f`` with the reconstruction ``e = U_f e' + mu_f``
   (:class:`~effkern.nn.LowRankEmbedding`); the DNN reads ``e'`` directly, ``U_f`` and ``mu_f`` folded into its first
   layer (``W' = W blockdiag(U_f)``, ``b' = b + W [mu_1 .. mu_F]``); the interaction part reads the reconstruction.

:func:`save_compressed` / :func:`load_compressed` store a compressed model as one safetensors file with its recipe.
Statistics, compression, training and evaluation run on the model's device (batches moved there); this project's
machines are CPU-only, so the CUDA path of these functions is untested.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from effkern.methods.common import write_safetensors
from effkern.methods.ctr_compress.models import MODEL_CLASSES, CTRModel, DCNv2, make_model
from effkern.nn import LowRankEmbedding, LowRankLinear
from effkern.ops.low_rank_embedding import bag_rows

VARIANTS = ("exact", "act")
RECIPE_KEY = "effkern.ctr_compress"  # save_compressed's metadata entry


@dataclass
class OutputStats:
    """Streaming fp64 first and second moments of a layer's outputs (rows of ``[n, d]``)."""

    sum: torch.Tensor
    gram: torch.Tensor
    count: int = 0

    @classmethod
    def empty(cls, dim: int) -> OutputStats:
        return cls(torch.zeros(dim, dtype=torch.float64), torch.zeros(dim, dim, dtype=torch.float64))

    def update(self, y: torch.Tensor) -> None:
        y = y.detach().reshape(-1, y.shape[-1]).double()
        self.sum, self.gram = self.sum.to(y.device), self.gram.to(y.device)  # accumulated where the outputs are
        self.sum += y.sum(0)
        self.gram += y.T @ y
        self.count += y.shape[0]

    def mean_cov(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.count == 0:
            raise ValueError("no outputs were accumulated")
        mu = self.sum / self.count
        return mu, self.gram / self.count - torch.outer(mu, mu)


@dataclass
class FieldStats:
    """How often each row of the concatenated embedding table was looked up (bags: every id counts)."""

    counts: torch.Tensor

    def update(self, ids: torch.Tensor, offsets: torch.Tensor) -> None:
        rows, valid = bag_rows(ids, offsets)
        self.counts = self.counts.to(rows.device)
        self.counts += torch.bincount(rows[valid], minlength=self.counts.numel()).double()


@dataclass
class ModelStats:
    layers: dict[str, OutputStats] = field(default_factory=dict)
    fields: FieldStats | None = None


def compressible_layers(model: CTRModel) -> dict[str, nn.Linear]:
    """The linear layers the compression may factorise: ``dnn.<i>`` (hidden layers), ``cross.<i>`` (DCN-v2)."""
    layers = {f"dnn.{i}": m for i, m in enumerate(model.dnn) if isinstance(m, nn.Linear)}
    if isinstance(model, DCNv2):
        layers.update({f"cross.{i}": m for i, m in enumerate(model.cross)})
    return layers


@torch.no_grad()
def collect_stats(model: CTRModel, ids: torch.Tensor, batch_size: int = 4096,
                  stats: ModelStats | None = None) -> ModelStats:
    """Accumulate the output statistics of every compressible layer and the embedding lookup counts over ``ids``
    (the training split), into ``stats`` when given (chunks of a data set accumulate as one pass does)."""
    layers = compressible_layers(model)
    stats = stats or ModelStats()
    for name, layer in layers.items():
        stats.layers.setdefault(name, OutputStats.empty(layer.out_features))
    if stats.fields is None:
        stats.fields = FieldStats(torch.zeros(model.embedding.weight.shape[0], dtype=torch.float64))
    hooks = [layer.register_forward_hook(lambda _m, _i, out, name=name: stats.layers[name].update(out))
             for name, layer in layers.items()]
    was_training = model.training
    model.eval()
    try:
        for chunk in ids.split(batch_size):
            chunk = chunk.to(model.embedding.offsets.device)
            model(chunk)
            stats.fields.update(chunk, model.embedding.offsets)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return stats


def top_eigenvectors(cov: torch.Tensor, rank: int) -> torch.Tensor:
    """``[d, rank]`` eigenvectors of the ``rank`` largest eigenvalues (fp64)."""
    _, vectors = torch.linalg.eigh(cov)
    return vectors[:, -rank:].flip(1)


def _check_rank(name: str, rank: int, dim: int) -> None:
    if not 1 <= rank <= dim:
        raise ValueError(f"{name}: rank must be in [1, {dim}] (the layer's output width), got {rank}")


def compress_linear(layer: nn.Linear, stats: OutputStats, rank: int, variant: str = "exact") -> LowRankLinear:
    """The layer as ``L2(act(L1(x)))`` through its top-``rank`` output eigenvectors (see the module docstring), on
    the layer's device."""
    _check_rank("compress_linear", rank, layer.out_features)
    w = layer.weight.detach().double()
    mu, cov = (t.to(w.device) for t in stats.mean_cov())
    basis = top_eigenvectors(cov, rank)
    b = layer.bias.detach().double() if layer.bias is not None else w.new_zeros(layer.out_features)
    dtype = layer.weight.dtype
    return LowRankLinear.from_factors((basis.T @ w).to(dtype), basis.to(dtype), (basis.T @ b).to(dtype),
                                      (mu - basis @ (basis.T @ mu)).to(dtype),
                                      activation="relu" if variant == "act" else "none")


def compress_embedding(weight: torch.Tensor, offsets: torch.Tensor, vocab_sizes: tuple[int, ...],
                       counts: torch.Tensor, rank: int) -> LowRankEmbedding:
    """Per field, the frequency-weighted mean and covariance of its rows, their top-``rank`` eigenvectors, and the
    compressed rows ``(E_f - mu_f) U_f`` (bags averaged, as :class:`FieldEmbedding` does)."""
    dim = weight.shape[1]
    _check_rank("compress_embedding", rank, dim)
    emb = LowRankEmbedding(list(vocab_sizes), dim, rank, mode="mean", device=weight.device, dtype=weight.dtype)
    w, counts = weight.detach().double(), counts.to(weight.device)
    with torch.no_grad():
        for f, (start, size) in enumerate(zip(offsets.tolist(), vocab_sizes, strict=True)):
            rows, n = w[start : start + size], counts[start : start + size]
            if n.sum() == 0:
                n = torch.ones_like(n)  # a field never looked up: weigh its rows equally
            p = n / n.sum()
            mu = p @ rows
            centred = rows - mu
            basis = top_eigenvectors(centred.T @ (centred * p[:, None]), rank)
            emb.table[start : start + size] = (centred @ basis).to(weight.dtype)
            emb.u[f], emb.mu[f] = basis.to(weight.dtype), mu.to(weight.dtype)
    return emb


def _fold_reconstruction(first: nn.Module, emb: LowRankEmbedding) -> nn.Module:
    """The DNN's first layer reading ``[e'_1 .. e'_F]`` instead of ``[e_1 .. e_F]``: W' = W blockdiag(U_f),
    b' = b + W [mu_1 .. mu_F] (for a LowRankLinear, its first factor U and b1)."""
    fields, dim, rank = emb.u.shape
    with torch.no_grad():
        w = (first.u if isinstance(first, LowRankLinear) else first.weight).double()
        folded_w = torch.einsum("ofd,fdk->ofk", w.view(-1, fields, dim), emb.u.double()).reshape(w.shape[0], -1)
        shift = w @ emb.mu.double().reshape(-1)
        if isinstance(first, LowRankLinear):  # compress_linear's: it has both biases
            return LowRankLinear.from_factors(folded_w.to(first.u.dtype), first.v.detach(),
                                              (first.b1.double() + shift).to(first.u.dtype), first.b2.detach(),
                                              activation=first.activation, out_activation=first.out_activation)
        layer = nn.Linear(fields * rank, first.out_features, device=first.weight.device, dtype=first.weight.dtype)
        layer.weight.copy_(folded_w)
        layer.bias.copy_(first.bias.double() + shift)
        return layer


def _fuse_relus(mlp: nn.Sequential) -> None:
    """Each LowRankLinear of the MLP followed by its ReLU applies the ReLU as it stores its output (the ReLU's slot
    becomes an Identity, so the parameter names do not change): one pass over the layer's output instead of two."""
    for i, (layer, after) in enumerate(zip(mlp, mlp[1:], strict=False)):
        if isinstance(layer, LowRankLinear) and layer.out_activation == "none" and isinstance(after, nn.ReLU):
            layer.out_activation = "relu"
            mlp[i + 1] = nn.Identity()


def compress_model(model: CTRModel, stats: ModelStats, *, emb_rank: int, ranks: dict[str, int],
                   variant: str = "exact") -> CTRModel:
    """A compressed copy of ``model``: the embedding at ``emb_rank`` (0 keeps it), every layer named in ``ranks``
    (:func:`compressible_layers` names; 0 keeps the layer) factorised, the DNN's ReLUs fused into them; the first
    DNN layer reads the compressed rows when the embedding is compressed (and the DNN reads the embeddings)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    layers = compressible_layers(model)
    unknown = set(ranks) - set(layers)
    if unknown:
        raise ValueError(f"ranks name layers {sorted(unknown)} the model does not have; it has {sorted(layers)}")
    out = copy.deepcopy(model)
    for name, rank in ranks.items():
        if rank:
            parent, index = name.split(".")
            getattr(out, parent)[int(index)] = compress_linear(layers[name], stats.layers[name], rank,
                                                               variant if parent == "dnn" else "exact")
    if emb_rank:
        emb = compress_embedding(model.embedding.weight, model.embedding.offsets, model.embedding.vocab_sizes,
                                 stats.fields.counts, emb_rank)
        out.embedding = emb
        if model.DNN_READS_EMBEDDINGS:
            out.dnn[0] = _fold_reconstruction(out.dnn[0], emb)
            out.dnn_reads_compressed = True
    _fuse_relus(out.dnn)
    out.compression = dict(emb_rank=emb_rank, ranks=dict(ranks), variant=variant)
    return out


def _placeholder_stats(model: CTRModel) -> ModelStats:
    """Statistics under which :func:`compress_model` builds the compressed structure (identity output
    covariances, every embedding row looked up once), for :func:`load_compressed` to fill with saved weights."""
    f64 = torch.float64
    layers = {name: OutputStats(torch.zeros(m.out_features, dtype=f64), torch.eye(m.out_features, dtype=f64), 1)
              for name, m in compressible_layers(model).items()}
    return ModelStats(layers, FieldStats(torch.ones(model.embedding.weight.shape[0], dtype=f64)))


def save_compressed(path: str | os.PathLike, model: CTRModel) -> None:
    """Save a :func:`compress_model` result as safetensors (atomically), its recipe (model, vocabulary sizes,
    widths, ranks, variant) in the file's metadata: :func:`load_compressed` rebuilds it from the file alone."""
    if not hasattr(model, "compression"):
        raise ValueError("model must come from compress_model (it carries the compression recipe)")
    name = next(n for n, cls in MODEL_CLASSES.items() if type(model) is cls)
    hidden = [m.out_features for m in model.dnn if isinstance(m, nn.Linear | LowRankLinear)]
    recipe = dict(model=name, vocab_sizes=list(model.embedding.vocab_sizes), dim=model.dim, hidden=hidden,
                  **model.compression)
    write_safetensors(Path(path), model.state_dict(), metadata={RECIPE_KEY: json.dumps(recipe)})


def load_compressed(path: str | os.PathLike) -> CTRModel:
    """The compressed model :func:`save_compressed` wrote to ``path`` (in eval mode)."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if RECIPE_KEY not in metadata:
        raise ValueError(f"{path} holds no compression recipe: not written by save_compressed")
    recipe = json.loads(metadata[RECIPE_KEY])
    base = make_model(recipe["model"], tuple(recipe["vocab_sizes"]), recipe["dim"], tuple(recipe["hidden"]))
    model = compress_model(base, _placeholder_stats(base), emb_rank=recipe["emb_rank"], ranks=recipe["ranks"],
                           variant=recipe["variant"])
    model.load_state_dict(load_file(str(path)))
    return model.eval()
