"""Decode throughput and KV-cache size of SmolLM2-135M before and after KV-head compression (3 -> 1 KV heads).

For each model (original 9q/3kv, compressed 9q/1kv = ours/rope_commuting, a standard GQA model), attention
implementation (transformers' ``sdpa``; ``effkern`` = decode steps through ``effkern.ops.gqa_decode``),
context and batch: new tokens per second of single-token decode steps over a static cache holding ``ctx``
tokens per sequence (``effkern.methods.kv_compress.evaluate.decode_tokens_per_s``: the cache is filled with
random keys/values instead of a prefill; the whole model runs, weights and LM head included), and the KV-cache
bytes per token and in total. The compressed model's calibration uses a few packaged-text blocks (speed does
not depend on quality). Each configuration's throughput is the median of ``--repeats`` measurements.

    python bench/kv_compress.py [--quick] [--dtype fp32|bf16] [--json PATH]
"""

from __future__ import annotations

import argparse
import copy
import itertools
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import run_shapes  # noqa: E402

from effkern.data.text import pydoc_text, token_blocks  # noqa: E402
from effkern.methods.kv_compress.attention import use_effkern_attention  # noqa: E402
from effkern.methods.kv_compress.calibrate import collect_stats  # noqa: E402
from effkern.methods.kv_compress.convert import compress_kv_heads  # noqa: E402
from effkern.methods.kv_compress.evaluate import decode_tokens_per_s  # noqa: E402
from effkern.methods.kv_compress.flow import kv_bytes_per_token  # noqa: E402
from effkern.methods.kv_compress.model import load_smollm2  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def models(dtype: torch.dtype) -> dict:
    """{(model, attention): module} for the original and the 1-KV-head model, each with sdpa and effkern."""
    original, tokenizer = load_smollm2()
    original.eval()
    compressed = copy.deepcopy(original)
    calib = token_blocks(tokenizer, pydoc_text(), 2048, 512)
    compress_kv_heads(compressed, 1, method="ours", key_strategy="rope_commuting",
                      stats=collect_stats(original, calib, progress=False))
    out = {}
    for name, model in (("original", original), ("compressed", compressed)):
        model = model.to(dtype)
        fast = copy.deepcopy(model)
        use_effkern_attention(fast)
        out[(name, "sdpa")], out[(name, "effkern")] = model, fast
    return out


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="only context 2048, batch 8 (the acceptance shape)")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--steps", type=int, default=8, help="timed decode steps per measurement")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", help="write the rows to this path")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    variants = models(DTYPES[args.dtype])
    grid = [(2048, 8)] if args.quick else list(itertools.product((512, 2048), (1, 8)))
    print(f"threads {torch.get_num_threads()}, dtype {args.dtype}")

    def bench_shape(ctx: int, batch: int) -> list[dict]:
        rows = []
        for (name, attn), model in variants.items():
            speed = statistics.median(decode_tokens_per_s(model, batch=batch, context=ctx, steps=args.steps)
                                      for _ in range(args.repeats))
            per_token = kv_bytes_per_token(model)
            rows.append(dict(model=name, attention=attn, kv_heads=model.model.layers[0].self_attn.v_proj
                             .weight.shape[0] // model.config.head_dim, ctx=ctx, batch=batch, dtype=args.dtype,
                             tokens_per_s=speed, ms_per_step=1e3 * batch / speed, kv_bytes_per_token=per_token,
                             kv_cache_mb=per_token * ctx * batch / 2**20))
        base = next(r["tokens_per_s"] for r in rows if r["model"] == "original" and r["attention"] == "sdpa")
        for r in rows:
            r["speedup_vs_original_sdpa"] = r["tokens_per_s"] / base
        return rows

    return run_shapes(grid, bench_shape, ["model", "attention", "kv_heads", "ctx", "batch", "tokens_per_s",
                                          "ms_per_step", "speedup_vs_original_sdpa", "kv_cache_mb"], args.json)


if __name__ == "__main__":
    main()
