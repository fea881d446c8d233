"""Full flows for the efficiency methods of PAPERS.md, one subpackage per paper."""

from __future__ import annotations

import json
import os
from pathlib import Path


def save_atomic(path: Path, state: dict) -> None:
    """``torch.save`` a training checkpoint to ``path`` atomically (temp file + rename), creating its folder: an
    interruption leaves the previous checkpoint whole."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def write_json(path: Path, obj) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (temp file + rename): a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def write_safetensors(path: Path, tensors: dict, metadata: dict | None = None) -> None:
    """Save ``tensors`` (made contiguous) to ``path`` atomically (temp file + rename), creating its folder."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: t.contiguous() for k, t in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def resume_rows(out: Path, config: dict) -> list[dict]:
    """The rows of ``out/results.json`` when ``out/config.json`` holds the same ``config`` (a rerun of the same
    flow resumes from them), else none; then writes ``config`` there (atomically)."""
    config_path, results_path = out / "config.json", out / "results.json"
    rows = []
    if config_path.exists() and results_path.exists() and json.loads(config_path.read_text()) == json.loads(
            json.dumps(config)):
        rows = json.loads(results_path.read_text())
    write_json(config_path, config)
    return rows


def plot_grouped_bars(path: Path, groups: list[str], series: dict[str, list[float]], *, ylabel: str, title: str,
                      ymin: float | None = None) -> None:
    """A bar chart (matplotlib, Agg) with one group of bars per entry of ``groups``, one bar per series."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(1.2 * len(groups) + 2, 4))
    for i, (name, values) in enumerate(series.items()):
        ax.bar([g + i * width for g in range(len(groups))], values, width, label=name)
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], groups, rotation=20, fontsize=8)
    if ymin is not None:
        ax.set_ylim(ymin, None)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
