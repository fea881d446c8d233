"""Microbenchmark of effkern.ops.low_rank_attention, forward + backward (a LAST side-network training step's
attention), against what PyTorch users write.

Baselines, all with the same shared-x down-projection GEMM and up-projection: ``reference`` = the op's
pure-PyTorch core (materialised logits, softmax, closed-form backward); ``torch_sdpa`` = the core as
``F.scaled_dot_product_attention`` with autograd (PyTorch's fused CPU/GPU attention). effkern rows run the op
with each native backend usable here. Rows report the median time of forward + backward (gradients of x and
both weights) and the attention core's FLOP rate (4 N^2 r multiply-adds forward, 10 N^2 r total).

    python bench/low_rank_attention.py [--quick] [--json PATH]
"""

from __future__ import annotations

import itertools
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import median_time, op_bench_args, run_shapes  # noqa: E402

from effkern.ops import low_rank_attention  # noqa: E402
from effkern.ops._backend import use_backend  # noqa: E402

# the `effkern last` side network on the packaged backbone: batch 32, 8x8 patches + cls, d 128, rank 16 in 2 heads
TESTBED = (32, 65, 128, 16, 2)


def sdpa_version(x, w_qkv, w_o, heads):
    """The same computation with PyTorch's fused attention for the core."""
    kk, d, three_r = w_qkv.shape
    b, n, _ = x.shape
    r = three_r // 3
    qkv = (x.reshape(b * n, d) @ w_qkv.permute(1, 0, 2).reshape(d, kk * three_r)).view(b, n, kk, 3, heads, r // heads)
    q, k, v = qkv.permute(3, 2, 0, 4, 1, 5).unbind(0)  # [K, B, H, N, dh]
    o = F.scaled_dot_product_attention(q, k, v).permute(0, 1, 3, 2, 4).reshape(kk, b, n, r)
    return torch.matmul(o, w_o[:, None])


def bench_shape(kk, b, n, d, r, heads, device, backends):
    torch.manual_seed(0)
    x = torch.randn(b, n, d, device=device, requires_grad=True)
    w_qkv = (torch.randn(kk, d, 3 * r, device=device) / math.sqrt(d)).requires_grad_()
    w_o = (torch.randn(kk, r, d, device=device) / math.sqrt(r)).requires_grad_()
    dy = torch.randn(kk, b, n, d, device=device)
    inputs = (x, w_qkv, w_o)

    def step(fn):
        return lambda: torch.autograd.grad(fn(), inputs, dy)

    candidates = {"torch_sdpa": step(lambda: sdpa_version(x, w_qkv, w_o, heads))}
    for name in ["reference", *backends]:
        def run(name=name):
            with use_backend(name):
                return torch.autograd.grad(low_rank_attention(x, w_qkv, w_o, heads=heads), inputs, dy)
        candidates[name] = run
    core_flops = 2 * 10 * kk * b * n * n * r  # multiply-adds x 2
    times = {name: median_time(fn, device) for name, fn in candidates.items()}
    return [dict(backend=name, K=kk, B=b, N=n, d=d, r=r, heads=heads, time_ms=t * 1e3,
                 speedup_vs_reference=times["reference"] / t, speedup_vs_sdpa=times["torch_sdpa"] / t,
                 core_gflops=core_flops / t / 1e9) for name, t in times.items()]


def main(argv=None) -> list[dict]:
    args, backends = op_bench_args(__doc__, "only the testbed ViT shape with K = 1 and 8", argv)
    print(f"device {args.device}, threads {torch.get_num_threads()}, effkern backends {backends}")
    if args.quick:
        grid = [(kk, *TESTBED) for kk in (1, 8)]
    else:  # the testbed ViT and a ViT-B/16 side network (d 768, 197 tokens)
        grid = [(kk, b, n, d, r, h) for kk, (b, n, d), (r, h) in itertools.product(
            (1, 8), (TESTBED[:3], (16, 197, 768)), (TESTBED[3:], (64, 4)))]
    return run_shapes(grid, lambda *shape: bench_shape(*shape, args.device, backends),
                      ["backend", "K", "B", "N", "d", "r", "heads", "time_ms", "speedup_vs_reference",
                       "speedup_vs_sdpa", "core_gflops"], args.json)


if __name__ == "__main__":
    main()
