"""CPU inference throughput of CTR models, original (torch) vs low-rank compressed (effkern's fused kernels), at
batch 4096, for each data set and model of `effkern ctr_compress` and a Criteo-shaped synthetic set (size and
speed scaling only: its ids are random, so it says nothing about accuracy).

Throughput does not depend on the weights' values, so the models here are untrained: each is compressed with the
flow's default ranks from statistics of a few batches of its data (the compression path is the flow's own).
Batches of every model are timed in turn (interleaved), median per model, with the default allocator (as the
flow measures them).

    python bench/ctr_compress.py [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import print_table, write_json  # noqa: E402

from effkern.methods.ctr_compress.compress import collect_stats, compress_model  # noqa: E402
from effkern.methods.ctr_compress.flow import CTRCompressConfig, layer_ranks  # noqa: E402
from effkern.methods.ctr_compress.models import MODELS, count_params, make_model  # noqa: E402
from effkern.methods.ctr_compress.train import throughputs  # noqa: E402

# Criteo's shape: 13 dense fields (bucketised) + 26 categorical ones with long-tailed vocabularies
CRITEO_VOCAB = (64,) * 13 + (1460, 583, 100_000, 100_000, 305, 24, 12_517, 633, 3, 93_145, 5_683, 100_000, 3_194,
                             27, 14_992, 100_000, 10, 5_652, 2_173, 4, 100_000, 18, 15, 100_000, 105, 100_000)


def criteo_ids(n: int, seed: int = 0) -> torch.Tensor:
    """Zipf-like ids (rank ~ u^3 of each vocabulary): a few ids take most lookups, as in click logs."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, len(CRITEO_VOCAB), generator=g)
    return (u.pow(3) * torch.tensor(CRITEO_VOCAB)).long().clamp_max(torch.tensor(CRITEO_VOCAB) - 1)[..., None].int()


def data_ids(name: str, n: int) -> tuple[tuple[int, ...], torch.Tensor]:
    if name == "criteo_synthetic":
        return CRITEO_VOCAB, criteo_ids(n)
    from effkern.data.ctr import load_ctr

    data = load_ctr(name)
    return data.vocab_sizes, data.ids["train"][:n]


def bench(dataset: str, model_name: str, batch: int, cfg: CTRCompressConfig) -> list[dict]:
    torch.manual_seed(0)
    vocab, ids = data_ids(dataset, 4 * batch)
    model = make_model(model_name, vocab, cfg.dim, cfg.hidden)
    stats = collect_stats(model, ids[: 2 * batch])
    compressed = compress_model(model, stats, emb_rank=cfg.emb_rank, ranks=layer_ranks(cfg, model_name))
    speed = throughputs({"original": model, "compressed": compressed}, ids[2 * batch :], batch)
    return [dict(dataset=dataset, model=model_name, variant=v, batch=batch, params=count_params(m),
                 throughput_per_s=speed[v], speedup=speed[v] / speed["original"])
            for v, m in (("original", model), ("compressed", compressed))]


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="MovieLens DeepFM only")
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--json", help="write the rows to this path")
    args = p.parse_args(argv)
    cfg = CTRCompressConfig()
    print(f"threads {torch.get_num_threads()}, batch {args.batch}, embedding {cfg.dim} -> {cfg.emb_rank}, "
          f"DNN {cfg.hidden} at ranks {cfg.mlp_ranks}, cross rank {cfg.cross_rank}")
    grid = [("movielens", "deepfm")] if args.quick else [
        (d, m) for d in ("movielens", "kdd04", "adult", "criteo_synthetic") for m in MODELS]
    rows = [row for d, m in grid for row in bench(d, m, args.batch, cfg)]
    print_table(rows, ["dataset", "model", "variant", "batch", "params", "throughput_per_s", "speedup"])
    write_json(rows, args.json)
    return rows


if __name__ == "__main__":
    main()
