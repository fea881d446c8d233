"""The CTR compression flow (`effkern ctr_compress`): train, compress by output statistics, fine-tune, measure.

Per data set x model: train the original (Adam, early stopping on val AUC; its weights kept, so a rerun with the same
training settings reuses them), collect its statistics over the train split once, then per variant (``exact``: L1
L2 with nothing between; ``act``: ReLU between) compress (embedding rank ``emb_rank``, DNN hidden layers
``mlp_ranks``, DCN-v2 cross layers ``cross_rank``) and fine-tune ``finetune_epochs``. As a control, the original is
fine-tuned with the same budget (``original_finetuned``): the compressed models must be judged against the better
of the two.

Rows of ``results.json``: the standard row (effkern.methods.common.row: method original / low_rank, dataset, model,
variant original / original_finetuned / compressed_<v>_init / compressed_<v>, seed, params, throughput_per_s (CPU
inference at ``throughput_batch``, measured for original and every compressed variant, the latter through
effkern's kernels)), then auc, logloss (test split), epochs. Finished (dataset, model) rows are kept and reused on a
rerun of the same config; every training run (original, each variant's and the control's fine-tune) saves its state
after each epoch until its pair's rows are written, so an interrupted run loses at most one epoch (the files carry
a hash of the settings they depend on, so another config never resumes them). The fine-tuned compressed models are
kept as ``models/<dataset>-<model>-<variant>.safetensors``
(:func:`~effkern.methods.ctr_compress.compress.load_compressed` rebuilds one from its file; ids as
``effkern.data.ctr.load_ctr`` encodes them). Also ``auc.png``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import torch

from effkern.data.ctr import load_ctr
from effkern.methods.common import RunDir, plot_grouped_bars, read_safetensors, row, write_safetensors
from effkern.methods.ctr_compress.compress import collect_stats, compress_model, save_compressed
from effkern.methods.ctr_compress.config import CTRCompressConfig
from effkern.methods.ctr_compress.models import count_params, make_model
from effkern.methods.ctr_compress.train import evaluate, throughputs, train_ctr


def layer_ranks(cfg: CTRCompressConfig, model_name: str) -> dict[str, int]:
    """Rank per compressible layer name (effkern.methods.ctr_compress.compress.compressible_layers)."""
    cfg.check()
    ranks = {f"dnn.{2 * i}": r for i, r in enumerate(cfg.mlp_ranks)}
    if model_name == "dcnv2":
        ranks.update({f"cross.{i}": cfg.cross_rank for i in range(3)})
    return ranks


ORIGINAL_FIELDS = ("dim", "hidden", "epochs", "lr", "batch_size", "patience", "seed")  # what trains the originals


def _checkpoints(cfg: CTRCompressConfig, out: Path, dataset: str, model_name: str) -> tuple[Path, Callable]:
    """The original's weights file (kept: a rerun with the same training config reuses it) and, per training run
    (original, each variant's fine-tune, the control), where train_ctr keeps its per-epoch state (run() deletes
    the pair's once its rows are written)."""
    folder, pair = out / "checkpoints", f"{dataset}-{model_name}"
    original = cfg.digest(ORIGINAL_FIELDS)
    whole = cfg.digest(tuple(f for f in cfg.identity() if f not in ("datasets", "models")))

    def state(run: str) -> Path:
        return folder / f"{pair}-{original if run == 'original' else whole}-{run}.train.safetensors"

    return folder / f"{pair}-{original}.safetensors", state


def _original(cfg: CTRCompressConfig, data, name: str, weights: Path, checkpoint: Path):
    torch.manual_seed(cfg.seed)
    model = make_model(name, data.vocab_sizes, cfg.dim, cfg.hidden)
    if weights.exists():
        model.load_state_dict(read_safetensors(weights))
        return model, None
    history = train_ctr(model, data, epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size, patience=cfg.patience,
                        seed=cfg.seed, progress=cfg.progress, checkpoint=checkpoint)
    write_safetensors(weights, model.state_dict())
    return model, len(history)


def _rows(cfg: CTRCompressConfig, dataset: str, model_name: str, out: Path) -> list[dict]:
    data = load_ctr(dataset, seed=cfg.seed)
    test = (data.ids["test"], data.labels["test"])
    weights, ckpt = _checkpoints(cfg, out, dataset, model_name)
    model, epochs = _original(cfg, data, model_name, weights, ckpt("original"))
    rows = [dict(method="original", variant="original", **evaluate(model, *test), params=count_params(model),
                 epochs=epochs)]
    stats = collect_stats(model, data.ids["train"])
    finetune = dict(epochs=cfg.finetune_epochs, lr=cfg.finetune_lr, batch_size=cfg.batch_size,
                    patience=cfg.finetune_epochs, seed=cfg.seed, progress=cfg.progress)
    timed = {"original": model}
    for variant in cfg.variants:
        compressed = compress_model(model, stats, emb_rank=cfg.emb_rank, ranks=layer_ranks(cfg, model_name),
                                    variant=variant)
        rows.append(dict(method="low_rank", variant=f"compressed_{variant}_init", **evaluate(compressed, *test),
                         params=count_params(compressed), epochs=0))
        history = train_ctr(compressed, data, **finetune, checkpoint=ckpt(variant))
        save_compressed(out / "models" / f"{dataset}-{model_name}-{variant}.safetensors", compressed)
        rows.append(dict(method="low_rank", variant=f"compressed_{variant}", **evaluate(compressed, *test),
                         params=count_params(compressed), epochs=len(history)))
        timed[f"compressed_{variant}"] = compressed
    control = copy.deepcopy(model)
    history = train_ctr(control, data, **finetune, checkpoint=ckpt("finetuned"))
    rows.append(dict(method="original", variant="original_finetuned", **evaluate(control, *test),
                     params=count_params(control),
                     epochs=len(history)))
    speed = throughputs(timed, data.ids["test"], cfg.throughput_batch)
    out = []
    for r in rows:
        method, variant, params = r.pop("method"), r.pop("variant"), r.pop("params")
        out.append(row(method, dataset=dataset, model=model_name, variant=variant, seed=cfg.seed, params=params,
                       throughput_per_s=speed.get(variant), **r))
    return out


def run(cfg: CTRCompressConfig) -> list[dict]:
    cfg.check()
    run_dir = RunDir(cfg)
    for dataset in cfg.datasets:
        for model_name in cfg.models:
            if run_dir.done(dataset=dataset, model=model_name):
                continue
            new = _rows(cfg, dataset, model_name, run_dir.path)
            run_dir.add(new)
            for done in (run_dir.path / "checkpoints").glob(f"{dataset}-{model_name}-*.train.safetensors"):
                done.unlink(missing_ok=True)  # every process may get here
            _print_rows(new)
    _plot(run_dir.rows, run_dir.path / "auc.png")
    return run_dir.rows


def _print_rows(rows: list[dict]) -> None:
    base = next(r for r in rows if r["variant"] == "original")
    for r in rows:
        speed = "" if r["throughput_per_s"] is None else (
            f"  {r['throughput_per_s']:9.0f}/s ({r['throughput_per_s'] / base['throughput_per_s']:.2f}x)")
        print(f"{r['dataset']:>9} {r['model']:>7} {r['variant']:>24}: AUC {r['auc']:.4f} logloss {r['logloss']:.4f} "
              f"params {r['params']:>8} ({base['params'] / r['params']:.2f}x fewer){speed}", flush=True)


def _plot(rows: list[dict], path: Path) -> None:
    pairs = sorted({(r["dataset"], r["model"]) for r in rows})
    variants = [v for v in dict.fromkeys(r["variant"] for r in rows) if not v.endswith("_init")]
    auc = {(r["dataset"], r["model"], r["variant"]): r["auc"] for r in rows}
    plot_grouped_bars(path, [f"{d}/{m}" for d, m in pairs], {v: [auc[(*p, v)] for p in pairs] for v in variants},
                      ylabel="test AUC", title="CTR low-rank compression: original vs compressed (fine-tuned)",
                      ymin=min(auc[(*p, v)] for p in pairs for v in variants) - 0.01)
