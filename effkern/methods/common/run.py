"""The run folder every method writes, and its files: config.json (the config and its hash), results.json
(standard rows, rewritten atomically after every finished unit of work, resumed when the same config reruns),
checkpoints (safetensors, atomic, kept per config hash) and plots.

A file that cannot be read (truncated by a crash, edited by hand) raises :class:`RunFileError` naming it and what to
do, never a deep stack trace or silent garbage.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from effkern.methods.common.config import MethodConfig
from effkern.methods.common.distributed import barrier, main_only

# The standard results row: these keys first (None where not measured), then the method's own metrics.
ROW_KEYS = ("method", "dataset", "model", "variant", "seed")
COST_KEYS = ("params", "trainable_params", "peak_mem_bytes", "step_time_s", "throughput_per_s")


class RunFileError(RuntimeError):
    """A run folder's file that cannot be read; the message names it and what to do."""


def _unreadable(path: Path, why: object) -> RunFileError:
    return RunFileError(f"{path} cannot be read ({why}); delete it (the stage that wrote it runs again) or pass a "
                        "fresh --out")


@main_only
def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (temp file + rename): a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _unreadable(path, e) from None


def row(method: str, *, dataset: str | None = None, model: str | None = None, variant: str | None = None,
        seed: int | None = None, **metrics) -> dict:
    """A standard results row: ``method, dataset, model, variant, seed``, the cost keys that were measured, then the
    method's own metrics."""
    costs = {k: metrics.pop(k) for k in COST_KEYS if k in metrics}
    return dict(method=method, dataset=dataset, model=model, variant=variant, seed=seed, **costs, **metrics)


class RunDir:
    """``cfg.out`` for one config: ``config.json`` holds the config and its hash; the rows of ``results.json``
    resume only when that hash matches (a different config starts over and never reuses this one's files:
    checkpoints live under ``checkpoints/<hash>/``)."""

    def __init__(self, cfg: MethodConfig):
        self.path = Path(cfg.out)
        self.path.mkdir(parents=True, exist_ok=True)
        self.digest = cfg.digest()
        config_path, results_path = self.path / "config.json", self.path / "results.json"
        self.rows: list[dict] = []
        if config_path.exists() and results_path.exists():
            old = read_json(config_path)
            if isinstance(old, dict) and old.get("hash") == self.digest:
                self.rows = read_json(results_path)
                if not isinstance(self.rows, list) or not all(isinstance(r, dict) for r in self.rows):
                    raise _unreadable(results_path, "not a list of rows")
        barrier()  # every process has read the folder before the main one rewrites config.json
        if not self.rows:  # another config's rows must not outlive its config.json
            write_json(results_path, [])
        write_json(config_path, dict(method=cfg.name, hash=self.digest, config=cfg.identity()))

    def done(self, **keys) -> bool:
        """Whether a row with these key values was written already (a finished unit of work)."""
        return any(all(r.get(k) == v for k, v in keys.items()) for r in self.rows)

    def add(self, rows: Iterable[dict]) -> None:
        """Append a finished unit's rows and rewrite results.json (atomically)."""
        self.rows += list(rows)
        write_json(self.path / "results.json", self.rows)

    def checkpoint(self, name: str) -> Path:
        """Where a stage of this config keeps its state (``checkpoints/<hash>/<name>.safetensors``)."""
        return self.path / "checkpoints" / self.digest / f"{name}.safetensors"


# ---- training state as safetensors: tensors stored natively, everything else as JSON in the metadata ----------------

def _flatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = obj.detach().cpu().contiguous().clone()  # clone: safetensors refuses shared storage
        return {"__tensor__": key}
    if isinstance(obj, dict):  # keys keep their type (optimizer states are keyed by int)
        return {"__dict__": [[k, _flatten(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"__list__": [_flatten(v, tensors) for v in obj], "tuple": isinstance(obj, tuple)}
    return obj


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {k: _unflatten(v, tensors) for k, v in obj["__dict__"]}
        items = [_unflatten(v, tensors) for v in obj["__list__"]]
        return tuple(items) if obj["tuple"] else items
    return obj


@main_only
def save_state(path: Path, state: dict) -> None:
    """Save a training state (nested dicts / lists of tensors, numbers, strings: a model's and an optimizer's
    state_dict, a generator's state, a history) to ``path`` as safetensors, atomically (temp file + rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    meta = json.dumps(_flatten(state, tensors))
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"effkern_state": meta})
    os.replace(tmp, path)


def load_state(path: Path) -> dict:
    """The state :func:`save_state` wrote; :class:`RunFileError` naming the file when it is truncated or not one."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        return _unflatten(json.loads(meta["effkern_state"]), tensors)
    except (SafetensorError, OSError, KeyError, ValueError) as e:
        raise _unreadable(Path(path), e) from None


@main_only
def write_safetensors(path: Path, tensors: dict, metadata: dict | None = None) -> None:
    """Save a flat dict of tensors (weights) to ``path`` atomically, creating its folder."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: t.contiguous() for k, t in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file; :class:`RunFileError` naming it when it is truncated or not one."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise _unreadable(Path(path), e) from None
