"""Microbenchmark of effkern.ops.gqa_decode against what PyTorch users run today.

Baselines: ``reference`` = SDPA over KV heads repeated to Hq (what a plain model does); ``torch_best`` = the
faster of SDPA with ``enable_gqa=True`` and a grouped matmul + softmax that never repeats heads. effkern rows
call the public op (RoPE on the query included) with each native backend usable here. Every row reports the
bytes of K and V read per second and, measured in the same run, its fraction of the read bandwidth
(``read_fraction``: the op's roofline, since decode reads the cache and writes a row per query head; a large
``x.sum()``) and of the copy bandwidth (``copy_fraction``: read + write, kept for comparison with earlier runs).

    python bench/gqa_decode.py [--quick] [--json PATH]
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import copy_bandwidth, median_time, op_bench_args, read_bandwidth, run_shapes  # noqa: E402

from effkern.ops import Rope, gqa_decode  # noqa: E402
from effkern.ops._backend import use_backend  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def sdpa_repeated(q, k, v):
    g = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q[:, :, None], k.repeat_interleave(g, 1), v.repeat_interleave(g, 1))[:, :, 0]


def sdpa_gqa(q, k, v):
    return F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)[:, :, 0]


def grouped_matmul(q, k, v):
    b, hq, d = q.shape
    hkv = k.shape[1]
    qg = q.view(b, hkv, hq // hkv, d)
    probs = torch.softmax((qg @ k.transpose(-1, -2)).float() * d**-0.5, dim=-1).to(v.dtype)
    return (probs @ v).view(b, hq, -1)


def bench_shape(b, ctx, hq, hkv, d, dtype_name, device, read_bw, copy_bw, backends):
    dtype = DTYPES[dtype_name]
    torch.manual_seed(0)
    q = torch.randn(b, hq, d, device=device).to(dtype)
    k = torch.randn(b, hkv, ctx, d, device=device).to(dtype)
    v = torch.randn(b, hkv, ctx, d, device=device).to(dtype)
    lens = torch.full((b,), ctx, dtype=torch.int32, device=device)
    rope = Rope(theta=1e4)
    kv_bytes = 2 * k.numel() * k.element_size()
    t_ref = median_time(lambda: sdpa_repeated(q, k, v), device)
    t_gqa = median_time(lambda: sdpa_gqa(q, k, v), device)
    t_grouped = median_time(lambda: grouped_matmul(q, k, v), device)
    timed = [("reference", t_ref, "sdpa over repeated heads"),
             ("torch_best", min(t_gqa, t_grouped), "sdpa enable_gqa" if t_gqa <= t_grouped else "grouped matmul")]
    for backend in backends:
        with use_backend(backend):
            timed.append((backend, median_time(lambda: gqa_decode(q, k, v, lens, rope=rope), device), "effkern"))
    rows = []
    for name, t, note in timed:
        gbps = kv_bytes / t / 1e9
        rows.append(dict(op="gqa_decode", backend=name, B=b, ctx=ctx, hq=hq, hkv=hkv, d=d, dtype=dtype_name,
                         time_s=t, time_ms=t * 1e3, speedup_vs_reference=t_ref / t, gbps=gbps,
                         read_fraction=gbps * 1e9 / read_bw, copy_fraction=gbps * 1e9 / copy_bw, note=note,
                         read_bw_gbps=read_bw / 1e9, copy_bw_gbps=copy_bw / 1e9, device=device))
    return rows


def main(argv=None) -> list[dict]:
    args, backends = op_bench_args(__doc__, "only B=8, ctx 4096, 32q/8kv (the acceptance shape)", argv)
    device = args.device
    read_bw, copy_bw = read_bandwidth(device), copy_bandwidth(device)
    print(f"device {device}, threads {torch.get_num_threads()}, read bandwidth {read_bw / 1e9:.1f} GB/s (x.sum), "
          f"copy bandwidth {copy_bw / 1e9:.1f} GB/s (read + write), effkern backends {backends}")
    if args.quick:
        grid = [(8, 4096, 32, 8, "fp32"), (8, 4096, 32, 8, "bf16")]
    else:
        grid = [(b, ctx, hq, hkv, dt) for b, ctx, (hq, hkv), dt in itertools.product(
            (1, 8), (1024, 4096, 16384), ((32, 8), (32, 32), (9, 3)), ("fp32", "bf16"))]
    def shape_rows(b, ctx, hq, hkv, dt):
        return bench_shape(b, ctx, hq, hkv, 128, dt, device, read_bw, copy_bw, backends)

    return run_shapes(grid, shape_rows,
                      ["backend", "B", "ctx", "hq", "hkv", "dtype", "time_ms", "speedup_vs_reference", "gbps",
                       "read_fraction", "copy_fraction", "note"], args.json)


if __name__ == "__main__":
    main()
