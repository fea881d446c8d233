"""One table and one plot from several side-tuning runs (`effkern report runs/last runs/dtl runs/miet`): the rows
every flow of LAST's harness writes (:func:`effkern.methods.last.flow.run_tasks`), side by side."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from effkern.methods.common import plot_grouped_bars, read_json, write_json

NAMES = {"linear_probe": "linear probe", "last": "LAST", "lora": "LoRA (peft)", "full": "full fine-tuning",
         "dtl": "DTL", "dtl_plus": "DTL+", "miet": "MIET"}


def _cell(value, scale: float = 1.0, digits: int = 1) -> str:
    return "-" if value is None else f"{value * scale:,.{digits}f}"


def report(runs: Sequence[str | Path], out: str | Path | None = None) -> str:
    """The markdown table of ``runs`` (run folders of LAST's harness): test accuracy per task and mean, trainable
    parameters, peak training memory, step time, bytes per image on the wire (MIET). Tasks are those every run has.
    With ``out``: also ``out/report.md``, ``out/rows.json`` (the runs' rows) and ``out/accuracy.png``."""
    rows = []
    for run in runs:
        path = Path(run) / "results.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no results (run the flow with --out {run} first)")
        rows += read_json(path)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    per_method = {m: {r["dataset"]: r for r in rows if r["method"] == m} for m in methods}
    tasks = [t for t in dict.fromkeys(r["dataset"] for r in rows) if t != "mean"
             and all(t in per_method[m] for m in methods)]
    if not tasks:
        raise ValueError(f"the runs {list(map(str, runs))} share no task")
    head = ["method", *tasks, "mean", "trainable params", "peak MB", "step ms", "features on the wire, bytes / image"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    series = {}
    for m in methods:
        acc = [100 * per_method[m][t]["accuracy"] for t in tasks]
        series[NAMES.get(m, m)] = [*acc, sum(acc) / len(acc)]
        first = per_method[m][tasks[0]]
        wire = [per_method[m][t].get("wire_response_body_per_image") for t in tasks]
        wire = [w for w in wire if w is not None]
        lines.append("| " + " | ".join([
            NAMES.get(m, m), *(f"{a:.2f}" for a in series[NAMES.get(m, m)]),
            _cell(first.get("trainable_params"), digits=0), _cell(first.get("peak_mem_bytes"), 2**-20),
            _cell(first.get("step_time_s"), 1e3), _cell(sum(wire) / len(wire) if wire else None, digits=0)]) + " |")
    table = "\n".join(lines)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.md").write_text(table + "\n")
        write_json(out / "rows.json", rows)
        plot_grouped_bars(out / "accuracy.png", [*tasks, "mean"], series, ylabel="test accuracy (%)",
                          title="mini-VTAB-1k: side-tuning methods on a frozen ViT")
    return table
