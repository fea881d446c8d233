"""Training cost of one step of each side-tuning method: step time and peak memory at one batch, on the CPU.

Each measurement runs in a fresh Python process (a subprocess, so callers need no ``__main__`` guard), so one
method's freed memory cannot hide the next one's peak.
Peak memory = the process's peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs``) during the
training steps minus its resident set right before them, when the backbone, the trainable model, the batch (and
for ``last_cached`` its features) already exist: it is what training adds, i.e. activations kept for the backward,
gradients and optimiser state (Linux only). Step time is the median of the timed steps, after warm-up steps.

Methods:
- ``last``: the frozen backbone's forward (no autograd) + the side networks' forward, backward and AdamW step;
- ``last_cached``: the same step on features computed beforehand (the flow's setting; never compared with the
  others, whose step includes the backbone);
- ``linear_probe``: backbone forward + a linear head on the final feature (a side network without LSA blocks);
- ``lora`` / ``full``: forward, backward and AdamW step through the whole backbone.
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

METHODS = ("last", "last_cached", "linear_probe", "lora", "full")


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


def _proc_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def _make_step(method: str, shape: SideTuningShape):
    """Build the method's model on a random batch; returns ``(step() -> None, trainable parameters)``."""
    import torch

    from effkern.methods.backbone import load_backbone, normalize
    from effkern.methods.last.baselines import make_baseline, make_optimizer, train_step, trainable_parameters
    from effkern.methods.last.flow import make_side
    from effkern.methods.last.model import group_features
    from effkern.methods.last.train import side_optimizer, side_step

    torch.manual_seed(0)
    vit = load_backbone(shape.backbone).requires_grad_(False)
    images = torch.randint(0, 256, (shape.batch_size, 1, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, shape.num_classes, (shape.batch_size,))
    if method in ("lora", "full"):
        model = make_baseline(method, vit, shape.num_classes, lora_rank=shape.lora_rank)
        opt = make_optimizer(model, 1e-3, 0.05)
        return lambda: train_step(model, opt, images, labels), trainable_parameters(model)
    probe = method == "linear_probe"
    side = make_side(vit, shape.num_classes, rank=shape.rank, heads=shape.heads, group_size=shape.group_size,
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


def _measure(method: str, shape: SideTuningShape, steps: int, warmup: int) -> dict:
    import gc

    step, trainable = _make_step(method, shape)
    gc.collect()
    rss = _proc_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return dict(method=method, **asdict(shape), trainable_params=trainable,
                peak_mem_bytes=(_proc_kib("VmHWM") - rss) * 1024, step_time_s=statistics.median(times))


def measure_step(method: str, shape: SideTuningShape = SideTuningShape(), *, steps: int = 10,
                 warmup: int = 3) -> dict:
    """One row: the shape's fields, method, trainable_params (per network), peak_mem_bytes, step_time_s."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if steps < 1 or warmup < 0:
        raise ValueError(f"steps must be >= 1 and warmup >= 0, got {steps} and {warmup}")
    code = "import json, sys; from effkern.methods.last.costs import _child; _child(sys.argv[1])"
    request = json.dumps(dict(method=method, shape=asdict(shape), steps=steps, warmup=warmup))
    proc = subprocess.run([sys.executable, "-c", code, request], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"measuring {method} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _child(request: str) -> None:
    args = json.loads(request)
    print(json.dumps(_measure(args["method"], SideTuningShape(**args["shape"]), args["steps"], args["warmup"])))
