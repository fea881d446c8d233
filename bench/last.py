"""Per-step training cost on the CPU of every side-tuning method of the harness (LAST, the linear probe, LoRA, full
fine-tuning, DTL, DTL+, MIET's edge with the cloud's forward) at the same batch, the cost of training K LAST
configurations at once, and the low-rank attention op (forward + backward) it runs on.

Every cost row comes from ``effkern.methods.last.costs.measure_steps`` (see its docstring): step time = median
of each run's steps, all runs interleaved in one process (a shared VM's speed drifts; every run sees the same
drift); peak memory = what the training steps add to the resident set (activations, gradients, optimiser state),
in a fresh process per run with allocator retention and first-step library loading excluded. Every step but
``last_cached`` includes the backbone's forward pass; ``last_cached`` (features
computed beforehand, the `effkern last` flow's setting) is a separate row, never compared with the others.

    python bench/last.py [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import print_table, write_json  # noqa: E402
from low_rank_attention import TESTBED, bench_shape  # noqa: E402

from effkern.methods.backbone import load_backbone  # noqa: E402
from effkern.methods.dtl.config import DTLConfig  # noqa: E402
from effkern.methods.dtl.flow import dtl_options  # noqa: E402
from effkern.methods.last.costs import SideTuningShape, measure_steps  # noqa: E402
from effkern.methods.miet.config import MIETConfig  # noqa: E402
from effkern.methods.miet.flow import edge_options  # noqa: E402
from effkern.ops._backend import usable_backends  # noqa: E402


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--quick", action="store_true", help="fewer timed steps")
    p.add_argument("--json", help="write the rows to this path")
    args = p.parse_args(argv)
    steps = 5 if args.quick else 20
    print(f"threads {torch.get_num_threads()}, batch {args.batch_size}, {steps} timed steps per row")
    vit = load_backbone()
    options = {"dtl": dtl_options(DTLConfig()), "dtl_plus": dtl_options(DTLConfig()),  # the flows' defaults
               "miet": edge_options(MIETConfig(), len(vit.blocks), vit.num_prefix_tokens)}
    rows = measure_steps([(method, SideTuningShape(batch_size=args.batch_size, num_networks=k,
                                                   options=options.get(method, {})))
                          for method, k in [("last", 1), ("linear_probe", 1), ("lora", 1), ("full", 1), ("dtl", 1),
                                            ("dtl_plus", 1), ("miet", 1), ("last", 8), ("last_cached", 1),
                                            ("last_cached", 8)]], steps=steps)
    print_table(rows, ["method", "num_networks", "batch_size", "trainable_params", "peak_mem_bytes", "step_time_s"])
    cost = {(r["method"], r["num_networks"]): r for r in rows}
    ratios = [
        dict(method="last/lora", peak_mem_ratio=cost["last", 1]["peak_mem_bytes"] / cost["lora", 1]["peak_mem_bytes"],
             step_time_ratio=cost["last", 1]["step_time_s"] / cost["lora", 1]["step_time_s"]),
        dict(method="last/full", peak_mem_ratio=cost["last", 1]["peak_mem_bytes"] / cost["full", 1]["peak_mem_bytes"],
             step_time_ratio=cost["last", 1]["step_time_s"] / cost["full", 1]["step_time_s"]),
        *(dict(method=f"{m} K=8 / K=1", peak_mem_ratio=cost[m, 8]["peak_mem_bytes"] / cost[m, 1]["peak_mem_bytes"],
               step_time_ratio=cost[m, 8]["step_time_s"] / cost[m, 1]["step_time_s"])
          for m in ("last", "last_cached")),
    ]
    print_table(ratios, ["method", "peak_mem_ratio", "step_time_ratio"])
    backends = [b for b in usable_backends(torch.device("cpu")) if b not in ("reference", "triton")]
    attention = [row for kk in (1, 8) for row in bench_shape(kk, *TESTBED, "cpu", backends)]
    print_table(attention, ["backend", "K", "B", "N", "d", "r", "heads", "time_ms", "speedup_vs_reference",
                            "speedup_vs_sdpa"])
    rows += ratios + attention
    write_json(rows, args.json)
    return rows


if __name__ == "__main__":
    main()
