"""The `effkern last` flow end to end on one real task with the packaged backbone, the baselines, the cost rows."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import requires_ext

from effkern.data.vision import load_task
from effkern.methods.backbone import load_backbone
from effkern.methods.last import LastConfig, flow
from effkern.methods.last.baselines import make_baseline, model_accuracy, train_model, trainable_parameters
from effkern.methods.last.config import METHODS
from effkern.methods.last.costs import SideTuningShape, measure_steps

pytestmark = requires_ext

BLOCK_PARAMS = 128 * 3 * 16 + 16 * 128  # one LSA block of the packaged backbone's side network: W_qkv, W_o (r 16)
HEAD_PARAMS = 128 * 10 + 10


def test_flow_writes_rows_for_every_method_and_resumes(tmp_path, monkeypatch):
    cfg = LastConfig(tasks=("digits",), epochs=1, parallel_lrs=(1e-3, 1e-2), cost_steps=0, out=str(tmp_path),
                     progress=False)
    rows = flow.run(cfg)
    per_task = {r["method"]: r for r in rows if r["dataset"] == "digits"}
    means = {r["method"]: r for r in rows if r["dataset"] == "mean"}
    assert set(per_task) == set(means) == set(METHODS)
    for method, row in per_task.items():
        assert 0.0 <= row["accuracy"] <= 1.0 and row["group"] == "natural"
        assert means[method]["accuracy"] == row["accuracy"]
    assert per_task["last"]["lr"] in (1e-3, 1e-2) and per_task["lora"]["lr"] == cfg.lora_lrs[0]
    assert per_task["linear_probe"]["accuracy"] > 0.3  # 10 classes: after 1 epoch the features already carry digits
    assert json.loads((tmp_path / "results.json").read_text()) == rows
    assert (tmp_path / "accuracy.png").stat().st_size > 0

    def no_training(*args, **kwargs):
        raise AssertionError("a finished (method, task) row was trained again")

    monkeypatch.setattr(flow, "train_side", no_training)
    monkeypatch.setattr(flow, "train_model", no_training)
    assert flow.run(cfg) == rows


def test_package_exports_the_flow():
    import effkern.methods.last as last

    assert last.run is flow.run and last.LastConfig is LastConfig
    assert all(hasattr(last, name) for name in last.__all__)


def test_bad_flow_config(tmp_path):
    with pytest.raises(ValueError, match="methods must be among"):
        flow.run(LastConfig(methods=("prompt",), out=str(tmp_path)))
    with pytest.raises(ValueError, match="parallel_lrs must not be empty"):
        flow.run(LastConfig(parallel_lrs=(), out=str(tmp_path)))


def test_lora_trains_adapters_and_head_only_and_leaves_the_backbone_alone():
    vit = load_backbone()
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    task = load_task("digits")
    lora = make_baseline("lora", vit, 10)
    # rank 8 on qkv (128 -> 384), proj (128 -> 128), fc1 (128 -> 512), fc2 (512 -> 128) of 6 blocks, + the head
    assert trainable_parameters(lora) == 6 * 8 * (128 + 384 + 128 + 128 + 128 + 512 + 512 + 128) + HEAD_PARAMS
    assert trainable_parameters(make_baseline("full", vit, 10)) == sum(p.numel() for p in vit.parameters()) \
        + HEAD_PARAMS
    train_model(lora, task.train_x[:256], task.train_y[:256], lr=1e-3, epochs=2, progress=False)
    assert model_accuracy(lora, task.val_x, task.val_y) > 0.3
    assert all(torch.equal(before[k], v) for k, v in vit.state_dict().items())
    with pytest.raises(ValueError, match="method must be 'full' or 'lora'"):
        make_baseline("bitfit", vit, 10)


def test_cost_rows_count_parameters_and_show_last_lighter_than_lora():
    last, lora = measure_steps([("last_cached", SideTuningShape()), ("lora", SideTuningShape())], steps=2, warmup=1)
    assert last["trainable_params"] == 6 * BLOCK_PARAMS + HEAD_PARAMS
    assert last["step_time_s"] > 0 and lora["step_time_s"] > 0
    assert 0 < last["peak_mem_bytes"] < lora["peak_mem_bytes"]
    with pytest.raises(ValueError, match="method must be one of"):
        measure_steps([("bitfit", SideTuningShape())])


@pytest.mark.slow
def test_last_beats_the_linear_probe_on_structured_tasks(tmp_path):
    """The claim direction on real data: where the final cls feature is not enough (object location, rotation),
    the side network's attention over all intermediate features adds accuracy. Both train K=4 learning rates,
    pick by val, and are scored on the held-out test images."""
    cfg = LastConfig(tasks=("location", "rotation"), methods=("linear_probe", "last"), epochs=10, cost_steps=0,
                          out=str(tmp_path), progress=False)
    acc = {(r["method"], r["dataset"]): r["accuracy"] for r in flow.run(cfg)}
    for task in cfg.tasks:
        assert acc["last", task] > acc["linear_probe", task] + 0.02, acc
