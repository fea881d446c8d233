"""Shared benchmark plumbing: timing (torch.utils.benchmark on CPU, triton's do_bench on GPU), the machine's
roofline measured in the same run, the printed table and the --json rows."""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

import torch
import torch.utils.benchmark as tb

from effkern.ops._backend import BackendUnavailableError, usable_backends, use_backend


def keep_freed_memory() -> None:
    """Make glibc keep freed memory for reuse (no mmap per large block, no trimming of the heap's top), as a caching
    allocator does. By default glibc returns large freed blocks to the system and the next allocation faults every
    page in again; whether a given op pays that depends on the heap's history (measured here: the same
    residual_layer_norm call 1.2 ms with no faults, 7.1 ms with 3,900 faults per call), which would bury the
    kernels' own times in noise. Microbenchmarks call it first; bench/last.py does not (its step times are
    what a training loop gets with the default allocator)."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    libc.mallopt(m_mmap_max, 0)
    libc.mallopt(m_trim_threshold, 2**31 - 1)


def op_bench_args(doc: str, quick_help: str, argv, add_arguments=None) -> tuple[argparse.Namespace, list[str]]:
    """The op microbenchmarks' command line (``--quick``, ``--device``, ``--json``, and what ``add_arguments(parser)``
    adds); keeps freed memory (:func:`keep_freed_memory`). Returns the arguments and the native effkern backends to
    time on the device (Triton only on a GPU: on the CPU it would be its interpreter)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", help="write the rows to this path")
    if add_arguments:
        add_arguments(p)
    args = p.parse_args(argv)
    keep_freed_memory()
    backends = [b for b in usable_backends(torch.device(args.device))
                if b != "reference" and not (b == "triton" and args.device == "cpu")]
    return args, backends


def runnable_backends(backends: list[str], call) -> list[str]:
    """The backends of ``backends`` on which ``call()`` runs when forced: a backend usable on the device may have no
    kernel for the op (residual_layer_norm has no CUDA kernel; its Triton kernels serve CUDA tensors)."""
    runnable = []
    for name in backends:
        try:
            with use_backend(name):
                call()
            runnable.append(name)
        except BackendUnavailableError as e:
            print(f"skipping backend {name}: {e}")
    return runnable


def median_time(fn, device: str, min_run_time: float = 0.5) -> float:
    """Median seconds per call of ``fn``."""
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    fn()  # warm up (first-call allocations, lazy imports)
    # torch.utils.benchmark runs on ONE thread unless told otherwise
    timer = tb.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def interleaved_times(fns: dict, device: str, rounds: int = 30, min_time: float = 0.01,
                      around=lambda name: contextlib.nullcontext()) -> dict:
    """Median seconds per call of each function, the functions timed in turn each round (a round calls each one
    enough times to take ~min_time), so a drift of the machine's speed during the run hits all of them alike; the
    op benchmarks comparing a kernel with its torch baseline use it on the CPU (this VM drifts by tens of
    percent within a minute). ``around(name)``: a context manager entered around each function's calls (e.g.
    forcing its backend: entered per call, ``use_backend`` added ~15 us a call on the CPU VM to whatever it timed).
    On a GPU: median_time per function (triton's do_bench)."""
    import statistics
    import time

    if device == "cuda":
        times = {}
        for name, fn in fns.items():
            with around(name):
                times[name] = median_time(fn, device)
        return times
    reps = {}
    for name, fn in fns.items():
        with around(name):
            fn()
            start = time.perf_counter()
            fn()
            reps[name] = max(1, int(min_time / max(time.perf_counter() - start, 1e-7)))
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            with around(name):
                start = time.perf_counter()
                for _ in range(reps[name]):
                    fn()
                times[name].append((time.perf_counter() - start) / reps[name])
    return {name: statistics.median(t) for name, t in times.items()}


def ceiling_time(fn, device: str, trials: int = 3) -> float:
    """Seconds per call of a roofline measurement: the best of ``trials`` medians. A ceiling is the best rate the
    machine reaches (STREAM reports the best of its trials); one median can catch other tenants' load (on the
    shared CPU VM one start-of-run read measured 22 GB/s, 48 GB/s a minute later) and would then let a kernel
    "beat" its roofline."""
    return min(median_time(fn, device, min_run_time=0.2) for _ in range(trials))


def copy_bandwidth(device: str, nbytes: int = 1 << 30) -> float:
    """Copy bandwidth in bytes/s, counting bytes read plus bytes written (the STREAM copy convention): the roofline
    of kernels that write about as much as they read (residual_layer_norm, kv_append)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    return 2 * nbytes / ceiling_time(lambda: dst.copy_(src), device)


def read_bandwidth(device: str, nbytes: int = 1 << 30) -> float:
    """Read bandwidth in bytes/s: ``x.sum()`` over ``nbytes`` of fp32 (1 GiB: far past any last-level cache, and
    past a GPU's L2), which reads every byte once and writes one number. The roofline of read-only kernels
    (gqa_decode reads the KV cache and writes one row per query head): on these CPUs a plain read runs up to ~1.5x
    the copy figure (ENVIRONMENT.md), so the copy bandwidth would flatter them."""
    x = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    return nbytes / ceiling_time(lambda: x.sum(), device)


def print_table(rows: list[dict], columns: list[str]) -> None:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)))


def run_shapes(grid, bench_shape, columns: list[str], json_path: str | None) -> list[dict]:
    """Benchmark every shape of ``grid`` (``bench_shape(*shape)`` returns its rows), print a table per shape, write
    all rows with ``--json``; returns them."""
    rows = []
    for shape in grid:
        shape_rows = bench_shape(*shape)
        print_table(shape_rows, columns)
        rows += shape_rows
    write_json(rows, json_path)
    return rows


def write_json(rows: list[dict], path: str | None) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(rows, indent=1))
        print(f"wrote {len(rows)} rows to {path}")
