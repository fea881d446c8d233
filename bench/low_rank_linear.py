"""Microbenchmark of effkern.ops.low_rank_linear (``out_act(act(x U^T + b1) V^T + b2)``) against the unfused torch
ops ``out_act(F.linear(act(F.linear(x, U, b1)), V, b2))`` that a compressed model runs without effkern, on the CTR
models' shapes: the 400-wide DNN layers at ranks 16 / 32 / 64 and the first layers after the embedding fold
(MovieLens: 8 fields x 8 -> 400, KDD-04: 74 x 8 -> 400), at the inference batch 4096 and the training batch 1024.
The compressed DNN's layers (exact variant) are ``act = none, out_act = relu``: the factorised linear and the
MLP's own ReLU; the rows with ``act = relu, out_act = none`` time the op as the bare torch pair.

Rows: median time of the forward (no autograd) and of forward + backward (gradients of x and all weights), the
candidates timed in turn (``interleaved_times``: this VM's speed drifts), the speedups over the torch ops, the
forward's FLOP rate as a fraction of this machine's fp32 matmul rate (a 2048^3 torch.mm) measured in the same run,
and ``fwd_ceiling``: the speedup over the torch ops of a kernel running at that matmul rate (both do the same
FLOPs, so a fused kernel beats the torch ops by more only by beating the machine's GEMM).

    python bench/low_rank_linear.py [--quick] [--batches M ...] [--json PATH]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import interleaved_times, median_time, op_bench_args, run_shapes  # noqa: E402

from effkern.ops import low_rank_linear  # noqa: E402
from effkern.ops._backend import use_backend  # noqa: E402

ACT = {"none": lambda t: t, "relu": F.relu, "gelu": F.gelu}


def matmul_flops(device: str) -> float:
    a = torch.randn(2048, 2048, device=device)
    return 2 * 2048**3 / median_time(lambda: a @ a, device)


def bench_shape(m, d_in, r, d_out, act, out_act, device, peak, backends):
    torch.manual_seed(0)
    x = torch.randn(m, d_in, device=device, requires_grad=True)
    u = (torch.randn(r, d_in, device=device) / d_in**0.5).requires_grad_()
    v = (torch.randn(d_out, r, device=device) / r**0.5).requires_grad_()
    b1 = torch.randn(r, device=device, requires_grad=True)
    b2 = torch.randn(d_out, device=device, requires_grad=True)
    g = torch.randn(m, d_out, device=device)
    inputs = (x, u, v, b1, b2)

    def torch_pair():
        return ACT[out_act](F.linear(ACT[act](F.linear(x, u, b1)), v, b2))

    def fused():
        return low_rank_linear(x, u, v, b1, b2, act, out_act)

    candidates = {"torch": torch_pair, **{name: fused for name in backends}}

    def backend(name):  # forced for the forward and the backward alike
        return use_backend(None if name == "torch" else name)

    def forward(fn):
        def run():
            with torch.no_grad():
                return fn()
        return run

    fwd = interleaved_times({name: forward(fn) for name, fn in candidates.items()}, device, around=backend)
    both = interleaved_times({name: lambda fn=fn: torch.autograd.grad(fn(), inputs, g)
                              for name, fn in candidates.items()}, device, around=backend)
    flops = 2 * m * r * (d_in + d_out)
    rows = [dict(backend=name, M=m, d_in=d_in, r=r, d_out=d_out, act=act, out_act=out_act, fwd_ms=fwd[name] * 1e3,
                 fwd_bwd_ms=both[name] * 1e3, fwd_gflops=flops / fwd[name] / 1e9,
                 frac_of_matmul=flops / fwd[name] / peak, fwd_ceiling=peak * fwd["torch"] / flops)
            for name in candidates]
    base = rows[0]
    for row in rows:
        row["fwd_speedup"] = base["fwd_ms"] / row["fwd_ms"]
        row["fwd_bwd_speedup"] = base["fwd_bwd_ms"] / row["fwd_bwd_ms"]
    return rows


def main(argv=None) -> list[dict]:
    def add_batches(parser):
        parser.add_argument("--batches", type=int, nargs="+", default=[4096, 1024], metavar="M",
                            help="batches of the 400-wide layers at ranks 16 / 32 / 64 (default: 4096 1024; "
                                 "e.g. 1 64 256 for online serving)")

    args, backends = op_bench_args(__doc__, "only the 400-wide layer at rank 32, batch 4096", argv, add_batches)
    peak = matmul_flops(args.device)
    print(f"device {args.device}, threads {torch.get_num_threads()}, fp32 matmul {peak / 1e9:.0f} GFLOP/s, "
          f"effkern backends {backends}")
    if args.quick:
        grid = [(4096, 400, 32, 400, "none", "relu")]
    else:
        grid = [(m, 400, r, 400, "none", "relu") for m in args.batches for r in (16, 32, 64)]
        grid += [(4096, 64, 32, 400, "none", "relu"), (4096, 592, 32, 400, "none", "relu")]
        grid += [(4096, 400, r, 400, "relu", "none") for r in (16, 32, 64)]
    return run_shapes(grid, lambda *shape: bench_shape(*shape, args.device, peak, backends),
                      ["backend", "M", "d_in", "r", "d_out", "act", "out_act", "fwd_ms", "fwd_speedup",
                       "fwd_bwd_ms", "fwd_bwd_speedup", "fwd_gflops", "frac_of_matmul", "fwd_ceiling"], args.json)


if __name__ == "__main__":
    main()
