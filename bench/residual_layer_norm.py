"""Microbenchmark of effkern.ops.residual_layer_norm (h = u + z, x = LayerNorm(h), forward + backward) on K side
streams sharing one backbone feature, against what PyTorch users write: ``torch`` = ``h = u + z`` and
``F.layer_norm`` with autograd. Rows report the median time of forward + backward (gradient of u from both
outputs) and the bytes moved per second (forward: u, z, h, x; backward: x, dh, dx, du) as a fraction of the
copy bandwidth measured in the same run (``copy_fraction``): the op is memory-bound, and it writes about as much
as it reads (reads 4 u-sized tensors + z, writes 3), the mix a copy moves (bench/common.py ``copy_bandwidth``;
read-only kernels such as gqa_decode are held to ``read_bandwidth`` instead). The copy is timed on 1 GiB, far
past the last-level cache, while the testbed shapes move 1-9 MB per tensor: a fraction near or above 1 there
means the op ran from the cache, not that it beat the memory.

    python bench/residual_layer_norm.py [--quick] [--json PATH]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import copy_bandwidth, median_time, op_bench_args, run_shapes, runnable_backends  # noqa: E402

from effkern.ops import residual_layer_norm  # noqa: E402
from effkern.ops._backend import use_backend  # noqa: E402


def torch_version(u, z):
    h = u + z
    return h, F.layer_norm(h, h.shape[-1:])


def bench_shape(kk, b, n, d, device, copy_bw, backends):
    torch.manual_seed(0)
    u = torch.randn(kk, b, n, d, device=device, requires_grad=True)
    z = torch.randn(b, n, d, device=device)
    dh, dx = torch.randn_like(u), torch.randn_like(u)

    def step(fn):
        return lambda: torch.autograd.grad(fn(u, z), u, (dh, dx))

    candidates = {"torch": step(torch_version)}
    for name in ["reference", *runnable_backends(backends, lambda: residual_layer_norm(u, z))]:
        def run(name=name):
            with use_backend(name):
                return torch.autograd.grad(residual_layer_norm(u, z), u, (dh, dx))
        candidates[name] = run
    moved = (7 * u.numel() + z.numel()) * u.element_size()
    times = {name: median_time(fn, device) for name, fn in candidates.items()}
    return [dict(backend=name, K=kk, B=b, N=n, d=d, time_ms=t * 1e3, speedup_vs_torch=times["torch"] / t,
                 gbytes_per_s=moved / t / 1e9, copy_fraction=moved / t / copy_bw) for name, t in times.items()]


def main(argv=None) -> list[dict]:
    args, backends = op_bench_args(__doc__, "only the testbed shape", argv)
    copy_bw = copy_bandwidth(args.device)
    print(f"device {args.device}, threads {torch.get_num_threads()}, copy bandwidth {copy_bw / 1e9:.1f} GB/s, "
          f"effkern backends {backends}")
    # the `effkern last` testbed side streams (K 1 and 8, batch 32, 65 tokens, d 128) and a ViT-B/16 one
    grid = [(1, 32, 65, 128), (8, 32, 65, 128)] + ([] if args.quick else [(8, 16, 197, 768)])
    return run_shapes(grid, lambda *shape: bench_shape(*shape, args.device, copy_bw, backends),
                      ["backend", "K", "B", "N", "d", "time_ms", "speedup_vs_torch", "gbytes_per_s",
                       "copy_fraction"], args.json)


if __name__ == "__main__":
    main()
