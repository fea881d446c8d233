"""Plots the flows write (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

from effkern.methods.common.distributed import main_only


@main_only
def plot_grouped_bars(path: Path, groups: list[str], series: dict[str, list[float]], *, ylabel: str, title: str,
                      ymin: float | None = None) -> None:
    """A bar chart with one group of bars per entry of ``groups``, one bar per series."""
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
