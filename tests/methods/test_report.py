"""`effkern report`: the side-tuning runs' rows side by side, on the tasks every run has."""

from __future__ import annotations

import pytest

from effkern import cli
from effkern.methods.common import row, write_json
from effkern.methods.last.report import report


def _run(folder, method, accuracies, **costs):
    rows = [row(method, dataset=t, model="vit-mini-32", seed=0, accuracy=a, **costs) for t, a in accuracies.items()]
    write_json(folder / "results.json", rows)
    return folder


def test_table_has_every_method_the_shared_tasks_and_the_costs(tmp_path):
    last = _run(tmp_path / "last", "last", {"digits": 0.9, "rotation": 0.5, "count": 0.4}, trainable_params=50442,
                peak_mem_bytes=20 * 2**20, step_time_s=0.0835)
    miet = _run(tmp_path / "miet", "miet", {"digits": 0.8, "rotation": 0.3}, trainable_params=1000,
                wire_response_body_per_image=33284.75)
    table = report([last, miet], tmp_path / "out").splitlines()
    assert table[0] == ("| method | digits | rotation | mean | trainable params | peak MB | step ms | "
                        "features on the wire, bytes / image |")
    assert table[2] == "| LAST | 90.00 | 50.00 | 70.00 | 50,442 | 20.0 | 83.5 | - |"
    assert table[3] == "| MIET | 80.00 | 30.00 | 55.00 | 1,000 | - | - | 33,285 |"
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"report.md", "rows.json", "accuracy.png"}


def test_missing_run_is_one_clear_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["report", str(tmp_path / "nothing")])
    assert stop.value.code == 1 and "no results (run the flow with --out" in capsys.readouterr().err
