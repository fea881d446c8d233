"""The LAST flow (`effkern last`): mini-VTAB-1k with LAST, the linear probe, LoRA and full fine-tuning.

Per task: the frozen backbone's features ``z_0..z_m`` of the train / val / test images are computed once (kept in
memory for that task); the linear probe and LAST each train K learning rates in parallel over them
(``parallel_lrs``); LoRA and full fine-tuning train end to end on the images, one run per learning rate of theirs.
Every method's learning rate is picked by val accuracy (the 200 val images, never trained on) and its test
accuracy reported. Training cost per method (trainable parameters, peak memory, step time at ``batch_size``) is
measured once by :mod:`effkern.methods.last.costs` (step time includes the backbone's forward pass, as in the
paper) and repeated in that method's rows.

Writes ``results.json`` (flat rows: method, task, group, accuracy, val_accuracy, lr, trainable_params,
peak_mem_bytes, step_time_s; plus ``task = "mean"`` rows) and ``accuracy.png``. Finished (method, task) rows are
saved after each task and reused when the same config is rerun, so an interruption loses at most one task.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from effkern.data.vision import MINI_VTAB_TASKS, load_task
from effkern.methods import plot_grouped_bars, resume_rows, write_json
from effkern.methods.backbone import load_backbone, normalize
from effkern.methods.last.baselines import make_baseline, model_accuracy, train_model
from effkern.methods.last.costs import SideTuningShape, measure_steps
from effkern.methods.last.model import LASTSide, group_features
from effkern.methods.last.train import accuracy, train_side

METHODS = ("linear_probe", "last", "lora", "full")


@dataclass
class LastConfig:
    """Defaults: every mini-VTAB task, the packaged backbone, the DTL recipe (AdamW, wd 0.05, batch 32, warm-up +
    cosine) shortened to ``epochs`` for 2 CPU cores."""

    tasks: tuple[str, ...] = tuple(MINI_VTAB_TASKS)
    methods: tuple[str, ...] = METHODS
    backbone: str | None = None  # weights file (None: the packaged backbone, see effkern.methods.backbone)
    group_size: int = 1  # backbone blocks per LSA block (m = depth / group_size)
    rank: int = 16
    heads: int = 2
    pool: str = "cls"  # [RECON] "cls" or "mean"
    bias_correction: bool = True  # [RECON] switch of PAPERS.md A
    parallel_lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2)  # LAST and linear probe: K networks at once
    lora_lrs: tuple[float, ...] = (1e-3,)
    full_lrs: tuple[float, ...] = (1e-4,)
    lora_rank: int = 8
    epochs: int = 20
    batch_size: int = 32
    seed: int = 0
    out: str = "runs/last"
    progress: bool = True
    cost_steps: int = 10  # timed steps per method for step_time_s / peak_mem_bytes (0: not measured)


def _features(vit: nn.Module, images: torch.Tensor, group_size: int, batch: int = 250) -> list[torch.Tensor]:
    chunks = [group_features(vit, normalize(images[i : i + batch]), group_size) for i in range(0, len(images), batch)]
    return [torch.cat(parts) for parts in zip(*chunks, strict=True)]


def _side_rows(method: str, cfg: LastConfig, vit, task, feats: dict) -> dict:
    probe = method == "linear_probe"
    pick = (lambda f: f[-1:]) if probe else (lambda f: f)
    torch.manual_seed(cfg.seed)
    side = LASTSide(vit, task.num_classes, rank=cfg.rank, heads=cfg.heads, group_size=cfg.group_size,
                    num_networks=len(cfg.parallel_lrs), probe=probe, pool=cfg.pool, bias_correction=cfg.bias_correction)
    train_side(side, pick(feats["train"]), task.train_y, lrs=cfg.parallel_lrs, epochs=cfg.epochs,
               batch_size=cfg.batch_size, seed=cfg.seed, progress=cfg.progress)
    val = accuracy(side, pick(feats["val"]), task.val_y)
    best = int(val.argmax())
    test = accuracy(side, pick(feats["test"]), task.test_y)
    return dict(accuracy=float(test[best]), val_accuracy=float(val[best]), lr=cfg.parallel_lrs[best])


def _baseline_rows(method: str, cfg: LastConfig, vit, task) -> dict:
    best = None
    for lr in cfg.lora_lrs if method == "lora" else cfg.full_lrs:
        torch.manual_seed(cfg.seed)
        model = make_baseline(method, vit, task.num_classes, lora_rank=cfg.lora_rank)
        train_model(model, task.train_x, task.train_y, lr=lr, epochs=cfg.epochs, batch_size=cfg.batch_size,
                    seed=cfg.seed, progress=cfg.progress)
        val = model_accuracy(model, task.val_x, task.val_y)
        if best is None or val > best[0]:
            best = (val, lr, model)
    val, lr, model = best
    return dict(accuracy=model_accuracy(model, task.test_x, task.test_y), val_accuracy=val, lr=lr)


def run(cfg: LastConfig) -> list[dict]:
    unknown = set(cfg.methods) - set(METHODS)
    if unknown:
        raise ValueError(f"methods must be among {', '.join(METHODS)}, got {sorted(unknown)}")
    if not cfg.parallel_lrs:
        raise ValueError("parallel_lrs must hold at least one learning rate")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in asdict(cfg).items() if k not in ("out", "progress")}
    results_path = out / "results.json"
    done = [r for r in resume_rows(out, config) if r["task"] != "mean"]
    costs = {}
    shape = SideTuningShape(batch_size=cfg.batch_size, rank=cfg.rank, heads=cfg.heads, group_size=cfg.group_size,
                            lora_rank=cfg.lora_rank, backbone=cfg.backbone)
    if cfg.cost_steps:
        for row in measure_steps([(method, shape) for method in cfg.methods], steps=cfg.cost_steps):
            costs[row["method"]] = {k: row[k] for k in ("trainable_params", "peak_mem_bytes", "step_time_s")}
    vit = load_backbone(cfg.backbone).requires_grad_(False)
    rows = list(done)
    for name in cfg.tasks:
        todo = [m for m in cfg.methods if not any(r["task"] == name and r["method"] == m for r in done)]
        if not todo:
            continue
        task = load_task(name, seed=cfg.seed)
        feats = {}
        if {"linear_probe", "last"} & set(todo):
            feats = {split: _features(vit, getattr(task, f"{split}_x"), cfg.group_size)
                     for split in ("train", "val", "test")}
        for method in todo:
            result = (_side_rows(method, cfg, vit, task, feats) if method in ("linear_probe", "last")
                      else _baseline_rows(method, cfg, vit, task))
            rows.append(dict(method=method, task=name, group=task.group, **result,
                             **costs.get(method, dict(trainable_params=None, peak_mem_bytes=None, step_time_s=None))))
            print(f"{method:>13} {name:>14}: test {result['accuracy']:.4f} (val {result['val_accuracy']:.4f}, "
                  f"lr {result['lr']:g})", flush=True)
        write_json(results_path, rows)
    rows = [r for r in rows if r["method"] in cfg.methods and r["task"] in cfg.tasks]
    for method in cfg.methods:
        mine = [r for r in rows if r["method"] == method]
        rows.append(dict(mine[0], task="mean", group="all", lr=None,
                         accuracy=sum(r["accuracy"] for r in mine) / len(mine),
                         val_accuracy=sum(r["val_accuracy"] for r in mine) / len(mine)))
    write_json(results_path, rows)
    _print_table(rows, cfg)
    _plot(rows, cfg, out / "accuracy.png")
    return rows


def _print_table(rows: list[dict], cfg: LastConfig) -> None:
    tasks = [*cfg.tasks, "mean"]
    print(f"{'method':>13} " + " ".join(f"{t[:9]:>9}" for t in tasks) + "   trainable  peak MB  step ms")
    for method in cfg.methods:
        acc = {r["task"]: r for r in rows if r["method"] == method}
        cost = acc["mean"]
        mem = "-" if cost["peak_mem_bytes"] is None else f"{cost['peak_mem_bytes'] / 2**20:.1f}"
        ms = "-" if cost["step_time_s"] is None else f"{cost['step_time_s'] * 1e3:.1f}"
        print(f"{method:>13} " + " ".join(f"{100 * acc[t]['accuracy']:9.2f}" for t in tasks)
              + f"   {cost['trainable_params'] or '-':>9}  {mem:>7}  {ms:>7}")


def _plot(rows: list[dict], cfg: LastConfig, path: Path) -> None:
    tasks = [*cfg.tasks, "mean"]
    series = {m: [100 * next(r["accuracy"] for r in rows if r["method"] == m and r["task"] == t) for t in tasks]
              for m in cfg.methods}
    plot_grouped_bars(path, tasks, series, ylabel="test accuracy (%)",
                      title="mini-VTAB-1k: LAST vs baselines (frozen ViT backbone)")
