"""The ``effkern`` command: ``effkern info`` and ``effkern bench <op>``; method subcommands join as they land."""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
import runpy
import sys
from pathlib import Path

import torch

from effkern.ops import _backend

CPU_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_fp16", "amx_tile")


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    have = set(line.split(":", 1)[-1].split())
    return [f for f in CPU_FLAGS if f in have]


def info() -> dict:
    """Versions, built extensions, usable backends per device, CPU features and GPUs."""
    ext = _backend.extension()
    out = {
        "effkern": _version("effkern"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "timm": _version("timm"),
        "transformers": _version("transformers"),
        "extension": "not built" if ext is None else ext.__file__,
        "cuda_kernels_built": bool(getattr(ext, "HAS_CUDA", False)),
        "cpu_kernel_isa": ext.cpu_isa() if ext is not None else None,
        "cpu": platform.processor() or platform.machine(),
        "cpu_flags": _cpu_flags(),
        "threads": torch.get_num_threads(),
        "backends_cpu": _backend.usable_backends(torch.device("cpu")),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available() else [],
    }
    if out["gpus"]:
        out["backends_cuda"] = _backend.usable_backends(torch.device("cuda"))
    return out


def floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(",") if v)


def names(text: str, default: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(v for v in text.split(",") if v) or default


def _bench(name: str, rest: list[str]) -> None:
    script = Path(__file__).resolve().parent.parent / "bench" / f"{name}.py"
    if not script.exists():
        raise SystemExit(f"no benchmark {script}: `effkern bench` needs a source checkout (bench/ is not installed)")
    sys.argv = [str(script), *rest]
    runpy.run_path(str(script), run_name="__main__")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="effkern", description="effkern kernels and method flows")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, built kernels, usable backends, CPU/GPU")
    bench = sub.add_parser("bench", help="run bench/<op>.py from the source checkout, e.g. `effkern bench gqa_decode`")
    bench.add_argument("name")
    kv = sub.add_parser("kv-compress", help="KV-head compression of a Llama-family LM (PAPERS.md D)")
    kv.add_argument("--model", default="smollm2", choices=["smollm2", "mha"])
    kv.add_argument("--target-kv-heads", type=int, default=1)
    kv.add_argument("--calib-tokens", type=int, default=16384)
    kv.add_argument("--eval-tokens", type=int, default=16384)
    kv.add_argument("--grouping", default="consecutive", choices=["consecutive", "similarity"])
    kv.add_argument("--out", default="runs/kv_heads")
    kv.add_argument("--finetune-steps", type=int, default=0,
                    help="LoRA recovery steps for mean_pool and ours/rope_commuting (equal compute for both)")
    kv.add_argument("--finetune-loss", default="distill", choices=["distill", "ce"],
                    help="distill: KL to the original model's next-token distributions; ce: next-token labels")
    kv.add_argument("--finetune-text", default="wiki_train", choices=["wiki_train", "pydoc"])
    kv.add_argument("--decode-context", type=int, default=2048, help="context for decode tokens/s (0: skip)")
    kv.add_argument("--decode-batch", type=int, default=8)
    kv.add_argument("--budget-layers", default="", help="KV-budget mode, e.g. 0,10,20,30: compress that many layers")
    kv.add_argument("--quick", action="store_true", help="4k calibration and 4k evaluation tokens")
    pre = sub.add_parser("pretrain-backbone", help="pretrain the small ViT the side-tuning flows share")
    pre.add_argument("--out", default=None, help="weights file (default ~/.cache/effkern/vit-mini-32.safetensors)")
    pre.add_argument("--epochs", type=int, default=4)
    pre.add_argument("--max-images", type=int, default=None, help="subsample the 120k pretraining images")
    last = sub.add_parser("last", help="LAST side-tuning vs linear probe, LoRA, full fine-tuning on mini-VTAB-1k")
    last.add_argument("--tasks", default="", help="comma-separated mini-VTAB tasks (default: all)")
    last.add_argument("--methods", default="", help="comma-separated among linear_probe,last,lora,full (default: all)")
    last.add_argument("--backbone", default=None, help="backbone weights (default: the packaged one)")
    last.add_argument("--parallel-lrs", default="1e-3,3e-3,1e-2,3e-2",
                      help="learning rates trained at once (K side networks) for LAST and the linear probe")
    last.add_argument("--lora-lrs", default="1e-3")
    last.add_argument("--full-lrs", default="1e-4")
    last.add_argument("--rank", type=int, default=16)
    last.add_argument("--heads", type=int, default=2)
    last.add_argument("--group-size", type=int, default=1)
    last.add_argument("--pool", default="cls", choices=["cls", "mean"])
    last.add_argument("--no-bias-correction", action="store_true")
    last.add_argument("--epochs", type=int, default=20)
    last.add_argument("--batch-size", type=int, default=32)
    last.add_argument("--out", default="runs/last")
    last.add_argument("--quick", action="store_true", help="3 tasks, 5 epochs")
    ctr = sub.add_parser("ctr-compress", help="low-rank compression of CTR models (PAPERS.md E)")
    ctr.add_argument("--datasets", default="", help="comma-separated among movielens,kdd04,adult (default: all)")
    ctr.add_argument("--models", default="", help="comma-separated among deepfm,dcnv2,autoint,fibinet (default: "
                     "deepfm,dcnv2,autoint; fibinet is slow to train on KDD-04's 74 fields)")
    ctr.add_argument("--variants", default="", help="comma-separated among exact,act (default: both)")
    ctr.add_argument("--emb-rank", type=int, default=8, help="compressed embedding width k (0: keep the tables)")
    ctr.add_argument("--mlp-ranks", default="32,32,32", help="rank per DNN hidden layer (0: keep the layer)")
    ctr.add_argument("--cross-rank", type=int, default=16, help="rank of DCN-v2's cross layers (0: keep them)")
    ctr.add_argument("--epochs", type=int, default=10, help="training epochs of the originals (early stopping)")
    ctr.add_argument("--finetune-epochs", type=int, default=3)
    ctr.add_argument("--out", default="runs/ctr_lowrank")
    ctr.add_argument("--quick", action="store_true", help="MovieLens, DeepFM, exact variant, 2 + 1 epochs")
    args, rest = parser.parse_known_args(argv)
    if args.command == "info":
        for key, value in info().items():
            print(f"{key:>20}: {value}")
    elif args.command == "bench":
        _bench(args.name, rest)
    elif args.command == "pretrain-backbone":
        from effkern.methods.backbone import pretrain_backbone

        print(pretrain_backbone(args.out, epochs=args.epochs, max_images=args.max_images))
    elif args.command == "last":
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        from effkern.methods.last.flow import LastConfig
        from effkern.methods.last.flow import run as run_last

        base = LastConfig()
        quick = dict(tasks=("digits", "lfw_face", "rotation"), epochs=5) if args.quick else {}
        run_last(LastConfig(**{**dict(
            tasks=names(args.tasks, base.tasks), methods=names(args.methods, base.methods), backbone=args.backbone,
            parallel_lrs=floats(args.parallel_lrs), lora_lrs=floats(args.lora_lrs), full_lrs=floats(args.full_lrs),
            rank=args.rank, heads=args.heads, group_size=args.group_size, pool=args.pool,
            bias_correction=not args.no_bias_correction, epochs=args.epochs, batch_size=args.batch_size,
            out=args.out), **quick}))
    elif args.command == "ctr-compress":
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        from effkern.methods.ctr_lowrank.flow import CTRCompressConfig
        from effkern.methods.ctr_lowrank.flow import run as run_ctr

        base = CTRCompressConfig()
        quick = dict(datasets=("movielens",), models=("deepfm",), variants=("exact",), epochs=2,
                     finetune_epochs=1) if args.quick else {}
        run_ctr(CTRCompressConfig(**{**dict(
            datasets=names(args.datasets, base.datasets), models=names(args.models, base.models),
            variants=names(args.variants, base.variants), emb_rank=args.emb_rank,
            mlp_ranks=tuple(int(r) for r in args.mlp_ranks.split(",") if r), cross_rank=args.cross_rank,
            epochs=args.epochs, finetune_epochs=args.finetune_epochs, out=args.out), **quick}))
    elif args.command == "kv-compress":
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        from effkern.methods.kv_heads.flow import KVCompressConfig, run

        tokens = 4096 if args.quick else None
        run(KVCompressConfig(model=args.model, target_kv_heads=args.target_kv_heads,
                             calib_tokens=tokens or args.calib_tokens, eval_tokens=tokens or args.eval_tokens,
                             grouping=args.grouping, finetune_steps=args.finetune_steps,
                             finetune_loss=args.finetune_loss, finetune_text=args.finetune_text,
                             decode_context=args.decode_context, decode_batch=args.decode_batch,
                             budget_layers=tuple(int(n) for n in args.budget_layers.split(",") if n), out=args.out))


if __name__ == "__main__":
    main()
