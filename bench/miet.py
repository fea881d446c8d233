"""MIET's cloud/edge split over a real network stack: a feature server in a subprocess (LocalServer) on loopback.

(a) Bytes on the wire per image, from real responses (body bytes: safetensors framing included, per image of a
    batch; HTTP headers apart): the raw image the edge uploads, the final feature only (layers=depth), every
    intermediate feature (layers 0..depth unreduced: what LAST's side network would need over a network) and MIET's
    sum (layers 0..depth reduced), at fp32 and fp16; then all/sum against k+1, the ratio MIET claims.
(b) A load test: 1 and 8 concurrent clients (threads, one keep-alive httpx client each) sending ``--requests``
    requests of ``--batch-size`` images for MIET's sum; errors, requests/s, images/s, p50 / p99 latency. Server and
    clients share this machine's cores, so the rates are those of a loopback setup, not of a cloud.

    python bench/miet.py [--quick] [--json PATH] [--batch-size 32] [--requests 50]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import print_table, write_json  # noqa: E402

from effkern.methods.miet.client import FeatureClient, LocalServer  # noqa: E402


def wire_bytes(client: FeatureClient, images: torch.Tensor, depth: int) -> list[dict]:
    """Per-image bytes of each payload at fp32 and fp16, measured from the server's answers."""
    n, every = len(images), list(range(depth + 1))
    rows = []
    for dtype in ("float32", "float16"):
        answers = {}
        for payload, layers, reduce in [("final feature (layers=depth)", [depth], True),
                                        ("all features (0..depth, unreduced)", every, False),
                                        ("MIET sum (0..depth)", every, True)]:
            client.features(images, layers, reduce=reduce, dtype=dtype)
            answers[payload] = client.last
        upload = client.last  # the same images every time
        rows.append(dict(payload="raw image (request)", dtype=dtype, batch=n, body_bytes=upload.request_body,
                         bytes_per_image=round(upload.request_body / n), header_bytes=upload.request_headers))
        rows += [dict(payload=payload, dtype=dtype, batch=n, body_bytes=s.response_body,
                      bytes_per_image=round(s.response_body / n), header_bytes=s.response_headers)
                 for payload, s in answers.items()]
        rows.append(dict(payload="ratio all / sum", dtype=dtype, batch=n, k_plus_1=depth + 1,
                         ratio=answers["all features (0..depth, unreduced)"].response_body /
                         answers["MIET sum (0..depth)"].response_body))
    return rows


def load_test(url: str, images: torch.Tensor, depth: int, clients: int, requests: int) -> dict:
    """``clients`` threads, each with its own client, each sending ``requests`` requests of ``images``."""
    latencies, errors, lock = [], [], threading.Lock()
    layers = list(range(depth + 1))

    def worker() -> None:
        # retries=0: a failure is counted, not hidden behind a retry
        with FeatureClient(url, retries=0, timeout=120) as client:
            for _ in range(requests):
                start = time.perf_counter()
                try:
                    client.features(images, layers)
                except Exception as e:  # noqa: BLE001 (any failure is an error of the load test, never a dead thread)
                    with lock:
                        errors.append(repr(e))
                    continue
                with lock:
                    latencies.append(time.perf_counter() - start)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    q = statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) > 1 else latencies * 99
    return dict(clients=clients, requests=clients * requests, batch=len(images), errors=len(errors),
                wall_s=wall, requests_per_s=len(latencies) / wall, images_per_s=len(latencies) * len(images) / wall,
                p50_ms=q[49] * 1e3, p99_ms=q[98] * 1e3, first_error=errors[0] if errors else None)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=32, help="images per request")
    p.add_argument("--requests", type=int, default=50, help="requests per client in the load test")
    p.add_argument("--quick", action="store_true", help="15 requests per client (well under a minute in all)")
    p.add_argument("--json", help="write the rows to this path")
    args = p.parse_args(argv)
    requests = 15 if args.quick else args.requests
    images = torch.randint(0, 256, (args.batch_size, 1, 32, 32), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    with LocalServer() as url, FeatureClient(url) as client:
        health = client.health()
        depth = health["depth"]
        print(f"server {url}: {health['model']}, images {health['image_shape']}, tokens {health['token_shape']}, "
              f"depth {depth}, {health['threads']} torch threads; client and server share this machine")
        rows = [dict(section="bytes", **r) for r in wire_bytes(client, images, depth)]
        print_table(rows, ["payload", "dtype", "batch", "body_bytes", "bytes_per_image", "header_bytes", "k_plus_1",
                           "ratio"])
        for _ in range(3):  # warm-up: first-call allocations and lazy imports on both sides
            client.features(images, list(range(depth + 1)))
        load = [dict(section="load", **load_test(url, images, depth, clients, requests)) for clients in (1, 8)]
        print_table(load, ["clients", "requests", "batch", "errors", "wall_s", "requests_per_s", "images_per_s",
                           "p50_ms", "p99_ms"])
    rows += load
    write_json(rows, args.json)
    return rows


if __name__ == "__main__":
    main()
