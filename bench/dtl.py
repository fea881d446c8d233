"""DTL on the CPU: the training step of DTL / DTL+ vs the linear probe and LoRA at the same batch (the cost harness,
``effkern.methods.last.costs``: interleaved step times, peak memory in fresh processes), and whether its low-rank
maps pay for running on effkern's fused ``low_rank_linear``: the six maps alone (forward + backward) and the whole
DTL step, effkern's op vs the torch pair ``F.linear(F.linear(x, U), V)``, timed interleaved in one process.

    python bench/dtl.py [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import interleaved_times, print_table, write_json  # noqa: E402

from effkern.methods.backbone import load_backbone  # noqa: E402
from effkern.methods.dtl.config import DTLConfig  # noqa: E402
from effkern.methods.dtl.flow import cost_step, dtl_options  # noqa: E402
from effkern.methods.last.costs import SideTuningShape, measure_steps  # noqa: E402
from effkern.nn import LowRankLinear  # noqa: E402

OPTIONS = dtl_options(DTLConfig())  # the flow's defaults


def torch_pair(self, x):
    return F.linear(F.linear(x, self.u), self.v)


def map_rows(batch: int, rounds: int) -> list[dict]:
    """The six maps (forward + backward) and the whole DTL step, effkern's low_rank_linear vs the torch pair."""
    torch.manual_seed(0)
    vit = load_backbone()
    shape = SideTuningShape(batch_size=batch, options=OPTIONS)
    images = torch.randint(0, 256, (batch, 1, 32, 32), dtype=torch.uint8)
    step, _ = cost_step("dtl", shape, vit, images, torch.randint(0, 10, (batch,)))
    maps = [LowRankLinear(128, 128, 2, bias=False) for _ in range(6)]
    x = torch.randn(batch, 65, 128)

    def maps_fwd_bwd():
        sum(m(x) for m in maps).sum().backward()

    original = LowRankLinear.forward

    def with_torch(fn):
        def call():
            LowRankLinear.forward = torch_pair
            try:
                fn()
            finally:
                LowRankLinear.forward = original
        return call

    times = interleaved_times({"maps effkern": maps_fwd_bwd, "maps torch": with_torch(maps_fwd_bwd),
                               "step effkern": step, "step torch": with_torch(step)}, "cpu", rounds=rounds)
    return [dict(what=what, batch=batch, effkern_ms=times[f"{what} effkern"] * 1e3,
                 torch_ms=times[f"{what} torch"] * 1e3, speedup=times[f"{what} torch"] / times[f"{what} effkern"])
            for what in ("maps", "step")]


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--quick", action="store_true", help="fewer timed steps and rounds")
    p.add_argument("--json", help="write the rows to this path")
    args = p.parse_args(argv)
    steps = 5 if args.quick else 20
    print(f"threads {torch.get_num_threads()}, batch {args.batch_size}, {steps} timed steps per cost row")
    shape = SideTuningShape(batch_size=args.batch_size, options=OPTIONS)
    rows = measure_steps([(m, shape) for m in ("dtl", "dtl_plus", "linear_probe", "lora")], steps=steps)
    lora = next(r for r in rows if r["method"] == "lora")
    for r in rows:
        r.update(peak_mem_vs_lora=r["peak_mem_bytes"] / lora["peak_mem_bytes"],
                 step_time_vs_lora=r["step_time_s"] / lora["step_time_s"])
    print_table(rows, ["method", "batch_size", "trainable_params", "peak_mem_bytes", "step_time_s", "peak_mem_vs_lora",
                       "step_time_vs_lora"])
    maps = map_rows(args.batch_size, rounds=10 if args.quick else 30)
    print_table(maps, ["what", "batch", "effkern_ms", "torch_ms", "speedup"])
    rows += maps
    write_json(rows, args.json)
    return rows


if __name__ == "__main__":
    main()
