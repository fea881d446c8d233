"""Training cost of one step of each side-tuning method: step time and peak memory at one batch, on the CPU.

Step time: all requested runs are built in one process and their steps interleaved (one step of each in turn,
after warm-up steps); a run's time is the median of its steps. A shared VM's speed drifts by tens of percent
within a minute (measured here), and interleaving makes every run see the same drift, so ratios between runs
hold. The process's default allocator is used (what a user gets).

Peak memory: what training adds (activations kept for the backward, transient buffers, gradients, optimiser
state), the CPU counterpart of ``torch.cuda.max_memory_allocated`` growth, measured in a second process started
with ``MALLOC_MMAP_THRESHOLD_=65536`` (glibc gives every allocation of 64 KiB or more its own mapping and returns it
when freed): a throwaway copy of the model runs ``MEMORY_STEPS`` steps first (library pages, thread pools and
BLAS buffers are loaded once per process), then a fresh copy's peak resident set (``VmHWM``, reset through
``/proc/self/clear_refs``) during ``MEMORY_STEPS`` steps minus its resident set right before them. Without
these two precautions the resident set also counts memory the allocator keeps after frees and the first step's
library pages, which no method needs and which outweigh a small side network's tensors. Linux only.

Methods:
- ``last``: the frozen backbone's forward (no autograd) + the side networks' forward, backward and AdamW step;
- ``last_cached``: the same step on features computed beforehand (the flow's setting; never compared with the
  others, whose step includes the backbone);
- ``linear_probe``: backbone forward + a linear head on the final feature (a side network without LSA blocks);
- ``lora`` / ``full``: forward, backward and AdamW step through the whole backbone;
- the methods of :data:`STEP_BUILDERS` (DTL, DTL+, MIET): their flow's own step on the same batch.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

# methods measured by a step their own package builds: "module:function" taking (method, shape, vit, images, labels)
# and returning (step() -> None, trainable parameters)
STEP_BUILDERS = {"dtl": "effkern.methods.dtl.flow:cost_step", "dtl_plus": "effkern.methods.dtl.flow:cost_step",
                 "miet": "effkern.methods.miet.flow:cost_step"}
METHODS = ("last", "last_cached", "linear_probe", "lora", "full", *STEP_BUILDERS)


@dataclass(frozen=True)
class SideTuningShape:
    """What the cost depends on; defaults are the ``effkern last`` flow's."""

    batch_size: int = 32
    num_classes: int = 10
    num_networks: int = 1  # K side networks (LAST / linear probe) trained at once
    rank: int = 16
    heads: int = 2
    group_size: int = 1
    lora_rank: int = 8
    backbone: str | None = None  # weights file (None: the packaged backbone)
    options: dict = field(default_factory=dict)  # a STEP_BUILDERS method's own settings (JSON values)


def _proc_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def _make_step(method: str, shape: SideTuningShape):
    """Build the method's model on a random batch; returns ``(step() -> None, trainable parameters)``."""
    import torch

    from effkern.methods.backbone import load_backbone, normalize
    from effkern.methods.last.baselines import make_baseline, make_optimizer, train_step, trainable_parameters
    from effkern.methods.last.model import LASTSide, group_features
    from effkern.methods.last.train import side_optimizer, side_step

    torch.manual_seed(0)
    vit = load_backbone(shape.backbone).requires_grad_(False)
    images = torch.randint(0, 256, (shape.batch_size, 1, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, shape.num_classes, (shape.batch_size,))
    if method in STEP_BUILDERS:
        module, name = STEP_BUILDERS[method].split(":")
        return getattr(importlib.import_module(module), name)(method, shape, vit, images, labels)
    if method in ("lora", "full"):
        model = make_baseline(method, vit, shape.num_classes, lora_rank=shape.lora_rank)
        opt = make_optimizer(model, 1e-3, 0.05)
        return lambda: train_step(model, opt, images, labels), trainable_parameters(model)
    probe = method == "linear_probe"
    side = LASTSide(vit, shape.num_classes, rank=shape.rank, heads=shape.heads, group_size=shape.group_size,
                    num_networks=shape.num_networks, probe=probe)
    opt = side_optimizer(side, [1e-3] * shape.num_networks)
    trainable = sum(p.numel() for p in side.parameters() if p.requires_grad) // shape.num_networks

    def features():
        feats = group_features(vit, normalize(images), shape.group_size)
        return feats[-1:] if probe else feats

    if method == "last_cached":
        cached = features()
        return lambda: side_step(side, opt, cached, labels), trainable
    return lambda: side_step(side, opt, features(), labels), trainable


MEMORY_STEPS = 3  # the first creates the optimiser state, the later ones run with it


def _step_times(runs: list[tuple[str, SideTuningShape]], steps: int, warmup: int) -> list[dict]:
    built = [_make_step(method, shape) for method, shape in runs]
    times = [[] for _ in runs]
    for i in range(warmup + steps):
        for (step, _), mine in zip(built, times, strict=True):
            start = time.perf_counter()
            step()
            if i >= warmup:
                mine.append(time.perf_counter() - start)
    return [dict(trainable_params=trainable, step_time_s=statistics.median(mine))
            for (_, trainable), mine in zip(built, times, strict=True)]


def _peak_memory(method: str, shape: SideTuningShape) -> dict:
    import gc

    for _copy in range(2):  # a throwaway copy first, then the measured one
        step, _ = _make_step(method, shape)
        gc.collect()
        rss = _proc_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        for _ in range(MEMORY_STEPS):
            step()
        del step
    return dict(peak_mem_bytes=(_proc_kib("VmHWM") - rss) * 1024)


def _run_child(what: str, request: dict, env: dict | None = None):
    code = "import sys; from effkern.methods.last.costs import _child; _child(sys.argv[1], sys.argv[2])"
    proc = subprocess.run([sys.executable, "-c", code, what, json.dumps(request)], capture_output=True, text=True,
                          env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"measuring the step {what} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_steps(runs: Sequence[tuple[str, SideTuningShape]], *, steps: int = 10, warmup: int = 3) -> list[dict]:
    """One row per ``(method, shape)`` run: the shape's fields, method, trainable_params (per network),
    peak_mem_bytes, step_time_s (see the module docstring for how each is measured)."""
    for method, _ in runs:
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if steps < 1 or warmup < 0:
        raise ValueError(f"steps must be >= 1 and warmup >= 0, got {steps} and {warmup}")
    requests = [dict(method=method, shape=asdict(shape)) for method, shape in runs]
    timed = _run_child("time", dict(runs=requests, steps=steps, warmup=warmup))
    memory_env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    return [dict(method=method, **asdict(shape), **t, **_run_child("memory", request, env=memory_env))
            for (method, shape), t, request in zip(runs, timed, requests, strict=True)]


def _child(what: str, request: str) -> None:
    args = json.loads(request)
    if what == "time":
        runs = [(run["method"], SideTuningShape(**run["shape"])) for run in args["runs"]]
        result = _step_times(runs, args["steps"], args["warmup"])
    else:
        result = _peak_memory(args["method"], SideTuningShape(**args["shape"]))
    print(json.dumps(result))
