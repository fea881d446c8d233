"""The LAST flow (`effkern last`): mini-VTAB-1k with LAST, the linear probe, LoRA and full fine-tuning.

Per task: the frozen backbone's features ``z_0..z_m`` of the train / val / test images are computed once (kept in
memory for that task); the linear probe and LAST each train K learning rates in parallel over them
(``parallel_lrs``); LoRA and full fine-tuning train end to end on the images, one run per learning rate of theirs.
Every method's learning rate is picked by val accuracy (the 200 val images, never trained on) and its test
accuracy reported. Training cost per method (trainable parameters, peak memory, step time at ``batch_size``) is
measured once by :mod:`effkern.methods.last.costs` (step time includes the backbone's forward pass, as in the
paper) and repeated in that method's rows.

Writes the standard rows (effkern.methods.common.row: method, dataset = the task, model = the backbone, seed,
trainable_params, peak_mem_bytes, step_time_s, then group, accuracy, val_accuracy, lr; plus ``dataset = "mean"``
rows) to ``results.json`` after each task, and ``accuracy.png``; a rerun of the same config resumes after the last
finished task.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from effkern.data.vision import VisionTask, load_task
from effkern.methods.backbone import load_backbone, normalize
from effkern.methods.common import RunDir, plot_grouped_bars, row, write_json
from effkern.methods.common.distributed import from_main, is_main
from effkern.methods.last.baselines import make_baseline, model_accuracy, train_model
from effkern.methods.last.config import LastConfig
from effkern.methods.last.costs import SideTuningShape, measure_steps
from effkern.methods.last.model import LASTSide, group_features
from effkern.methods.last.train import accuracy, train_side


def _features(vit: nn.Module, images: torch.Tensor, group_size: int, batch: int = 250) -> list[torch.Tensor]:
    chunks = [group_features(vit, normalize(images[i : i + batch]), group_size) for i in range(0, len(images), batch)]
    return [torch.cat(parts) for parts in zip(*chunks, strict=True)]


def fit_side(side: nn.Module, feats: dict[str, list[torch.Tensor]], task: VisionTask, cfg) -> dict:
    """Train ``side`` (K networks over cached features, one per learning rate of ``cfg.parallel_lrs``) on
    ``feats["train"]``; the row values of the network best on ``feats["val"]``: test and val accuracy, its lr."""
    lrs = cfg.parallel_lrs
    train_side(side, feats["train"], task.train_y, lrs=lrs, epochs=cfg.epochs, batch_size=cfg.batch_size,
               seed=cfg.seed, progress=cfg.progress)
    val = accuracy(side, feats["val"], task.val_y)
    best = int(val.argmax())
    test = accuracy(side, feats["test"], task.test_y)
    return dict(accuracy=float(test[best]), val_accuracy=float(val[best]), lr=lrs[best])


def fit_best(build: Callable[[], nn.Module], task: VisionTask, lrs: Sequence[float], cfg,
             **train_kwargs) -> tuple[nn.Module, dict]:
    """One model per learning rate of ``lrs`` (``build()`` after seeding with ``cfg.seed``) trained end to end on
    the task's images; the model best on val and its row values (test and val accuracy, lr)."""
    best = None
    for lr in lrs:
        torch.manual_seed(cfg.seed)
        model = build()
        train_model(model, task.train_x, task.train_y, lr=lr, epochs=cfg.epochs, batch_size=cfg.batch_size,
                    seed=cfg.seed, progress=cfg.progress, **train_kwargs)
        val = model_accuracy(model, task.val_x, task.val_y)
        if best is None or val > best[0]:
            best = (val, lr, model)
    val, lr, model = best
    return model, dict(accuracy=model_accuracy(model, task.test_x, task.test_y), val_accuracy=val, lr=lr)


def _side_rows(method: str, cfg: LastConfig, vit, task, feats: dict) -> dict:
    probe = method == "linear_probe"
    torch.manual_seed(cfg.seed)
    side = LASTSide(vit, task.num_classes, rank=cfg.rank, heads=cfg.heads, group_size=cfg.group_size,
                    num_networks=len(cfg.parallel_lrs), probe=probe, pool=cfg.pool, bias_correction=cfg.bias_correction)
    return fit_side(side, {split: feats[split][-1:] if probe else feats[split] for split in ("train", "val", "test")},
                    task, cfg)


def _baseline_rows(method: str, cfg: LastConfig, vit, task) -> dict:
    lrs = cfg.lora_lrs if method == "lora" else cfg.full_lrs
    return fit_best(lambda: make_baseline(method, vit, task.num_classes, lora_rank=cfg.lora_rank), task, lrs, cfg)[1]


def run(cfg: LastConfig) -> list[dict]:
    cfg.check()
    vit = load_backbone(cfg.backbone).requires_grad_(False)
    feats: dict = {}

    def solve(method: str, task) -> dict:
        if method in ("lora", "full"):
            return _baseline_rows(method, cfg, vit, task)
        if feats.get("task") != task.name:  # once per task, shared by the probe and LAST
            feats.clear()
            feats.update(task=task.name, **{split: _features(vit, getattr(task, f"{split}_x"), cfg.group_size)
                                            for split in ("train", "val", "test")})
        return _side_rows(method, cfg, vit, task, feats)

    shape = SideTuningShape(batch_size=cfg.batch_size, rank=cfg.rank, heads=cfg.heads, group_size=cfg.group_size,
                            lora_rank=cfg.lora_rank, backbone=cfg.backbone)
    return run_tasks(cfg, cfg.methods, solve, shape, title="mini-VTAB-1k: LAST vs baselines (frozen ViT backbone)")


def run_tasks(cfg, methods: Sequence[str], solve: Callable[[str, VisionTask], dict], shape: SideTuningShape, *,
              title: str, model: str | None = None) -> list[dict]:
    """The mini-VTAB-1k harness every side-tuning flow (LAST, DTL, MIET) runs in: for each of ``cfg.tasks`` and
    ``methods``, ``solve(method, task) -> {accuracy, val_accuracy, lr, ...}`` unless the run folder already
    holds that row; the training cost of each method (``cfg.cost_steps`` steps of ``shape``, measured once) in its
    rows (measured by the main process alone under a launcher); ``dataset = "mean"`` rows; the printed table and
    ``accuracy.png``. ``cfg``: a checked config with ``out, seed, progress, tasks, backbone, cost_steps``;
    ``model``: the rows' model name (default: the backbone file's)."""
    run_dir = RunDir(cfg)
    cost_keys = ("trainable_params", "peak_mem_bytes", "step_time_s")
    costs = {r["method"]: {k: r[k] for k in cost_keys} for r in run_dir.rows}  # measured by an interrupted run
    unmeasured = [m for m in methods if m not in costs and any(not run_dir.done(method=m, dataset=t)
                                                                   for t in cfg.tasks)]
    if cfg.cost_steps and unmeasured:
        measured = measure_steps([(m, shape) for m in unmeasured], steps=cfg.cost_steps) if is_main() else None
        for cost in from_main(measured):
            costs[cost["method"]] = {k: cost[k] for k in cost_keys}
    model = model or ("vit-mini-32" if cfg.backbone is None else Path(cfg.backbone).stem)
    for name in cfg.tasks:
        todo = [m for m in methods if not run_dir.done(method=m, dataset=name)]
        if not todo:
            continue
        task = load_task(name, seed=cfg.seed)
        rows = []
        for method in todo:
            result = solve(method, task)
            rows.append(row(method, dataset=name, model=model, seed=cfg.seed,
                            **costs.get(method, dict.fromkeys(cost_keys)), group=task.group, **result))
            print(f"{method:>13} {name:>14}: test {result['accuracy']:.4f} (val {result['val_accuracy']:.4f}, "
                  f"lr {result['lr']:g})", flush=True)
        run_dir.add(rows)
    rows = [r for r in run_dir.rows if r["method"] in methods and r["dataset"] in cfg.tasks]
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        means = {k: sum(r[k] for r in mine) / len(mine) for k in mine[0]
                 if all(isinstance(r.get(k), float) for r in mine) and k not in cost_keys and k != "lr"}
        first = mine[0]  # the mean row keeps no task's own metric: the standard keys, the costs, the means
        rows.append(row(method, dataset="mean", model=first["model"], variant=first["variant"], seed=first["seed"],
                        **{k: first[k] for k in cost_keys}, group="all", **means))
    write_json(run_dir.path / "results.json", rows)
    _print_table(rows, cfg.tasks, methods)
    _plot(rows, cfg.tasks, methods, run_dir.path / "accuracy.png", title)
    return rows


def _print_table(rows: list[dict], tasks: Sequence[str], methods: Sequence[str]) -> None:
    tasks = [*tasks, "mean"]
    print(f"{'method':>13} " + " ".join(f"{t[:9]:>9}" for t in tasks) + "   trainable  peak MB  step ms")
    for method in methods:
        acc = {r["dataset"]: r for r in rows if r["method"] == method}
        cost = acc["mean"]
        mem = "-" if cost["peak_mem_bytes"] is None else f"{cost['peak_mem_bytes'] / 2**20:.1f}"
        ms = "-" if cost["step_time_s"] is None else f"{cost['step_time_s'] * 1e3:.1f}"
        print(f"{method:>13} " + " ".join(f"{100 * acc[t]['accuracy']:9.2f}" for t in tasks)
              + f"   {cost['trainable_params'] or '-':>9}  {mem:>7}  {ms:>7}")


def _plot(rows: list[dict], tasks: Sequence[str], methods: Sequence[str], path: Path, title: str) -> None:
    tasks = [*tasks, "mean"]
    series = {m: [100 * next(r["accuracy"] for r in rows if r["method"] == m and r["dataset"] == t) for t in tasks]
              for m in methods}
    plot_grouped_bars(path, tasks, series, ylabel="test accuracy (%)", title=title)
