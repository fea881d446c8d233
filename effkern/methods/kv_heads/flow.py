"""The KV-head compression flow (`effkern kv-compress`): calibrate, convert with every method, measure.

Writes ``results.json`` (a list of flat rows) and ``ppl.png`` to the output folder. Rows carry: model,
method (original / mean_pool / svd_w / ours), strategy, kv_heads, finetuned, ppl, kv_bytes_per_token,
decode_tokens_per_s (measured for the original model with SDPA and the standard-GQA compressed model with the
effkern kernel, at ``decode_context`` tokens and batch ``decode_batch``; null elsewhere).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from pathlib import Path

from effkern.data.text import pydoc_text, token_blocks, wiki_text
from effkern.methods import write_json
from effkern.methods.kv_heads.attention import use_effkern_attention
from effkern.methods.kv_heads.budget import compress_by_budget, layer_sensitivity
from effkern.methods.kv_heads.calibrate import collect_stats
from effkern.methods.kv_heads.convert import compress_kv_heads
from effkern.methods.kv_heads.evaluate import decode_tokens_per_s, perplexity
from effkern.methods.kv_heads.finetune import lora_finetune

# (method, key strategy) rows of the table; the "ours" rows differ only in how keys are handled.
VARIANTS = (
    ("mean_pool", "mean_pool"),
    ("svd_w", "rope_commuting"),
    ("ours", "mean_pool"),
    ("ours", "pre_rope"),
    ("ours", "rope_commuting"),
    ("ours", "post_rope"),
)


@dataclass
class KVCompressConfig:
    """Defaults run SmolLM2-135M 3 -> 1 KV heads on the packaged text in a few minutes on 2 CPU cores.

    Calibration text (Python docs prose, pydoc_data) and evaluation text (Wikipedia sample, gensim) differ.
    """

    model: str = "smollm2"  # "smollm2" (packaged GQA 9q/3kv) or "mha" (the project's small MHA Llama)
    target_kv_heads: int = 1
    calib_tokens: int = 16384
    eval_tokens: int = 16384
    block_len: int = 512
    batch_size: int = 4
    grouping: str = "consecutive"  # or "similarity" (PAPERS.md D leaves the grouping open)
    finetune_steps: int = 0  # LoRA recovery steps (batch_size x block_len tokens each) per variant (0: none)
    finetune_tokens: int = 262144  # distinct fine-tuning tokens (cycled)
    finetune_text: str = "wiki_train"  # "wiki_train" (Wikipedia articles disjoint from the eval ones) or "pydoc"
    finetune_loss: str = "distill"  # "distill" (KL to the original model) or "ce" (next-token cross-entropy)
    decode_context: int = 2048  # decode_tokens_per_s: cached tokens per sequence (0: not measured)
    decode_batch: int = 8
    finetune_variants: tuple[tuple[str, str], ...] = (("mean_pool", "mean_pool"), ("ours", "rope_commuting"))
    budget_layers: tuple[int, ...] = ()  # KV-budget mode: numbers of (least sensitive) layers to compress
    sensitivity_tokens: int = 2048  # calibration-source tokens that rank the layers
    variants: tuple[tuple[str, str], ...] = VARIANTS
    out: str = "runs/kv_heads"
    progress: bool = True


FINETUNE_TEXTS = {"wiki_train": lambda: wiki_text("train"), "pydoc": pydoc_text}


def load_model(name: str):
    from effkern.methods.kv_heads.model import load_smollm2, train_mha_llama

    if name == "smollm2":
        return load_smollm2()
    if name == "mha":
        _, tokenizer = load_smollm2()
        return train_mha_llama(tokenizer), tokenizer
    raise ValueError(f"model must be 'smollm2' or 'mha', got {name!r}")


def kv_bytes_per_token(model) -> int:
    """KV-cache bytes one token costs across all layers, at the model's dtype (keys as cached: projected)."""
    total = 0
    for layer in model.model.layers:
        attn = layer.self_attn
        kv_heads = attn.v_proj.weight.shape[0] // attn.head_dim  # values are always stored compressed
        total += 2 * kv_heads * attn.head_dim * attn.v_proj.weight.element_size()
    return total


def write_results(all_rows: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", all_rows)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budget = [r for r in all_rows if "budget_layers" in r]
    if budget:
        fig, ax = plt.subplots(figsize=(5, 4))
        for method in dict.fromkeys(r["method"] for r in budget):
            pts = sorted((r["kv_bytes_per_token"], r["ppl"]) for r in budget if r["method"] == method)
            ax.plot(*zip(*pts, strict=True), marker="o", label=method)
        ax.set_xlabel("KV-cache bytes per token")
        ax.set_ylabel("perplexity (log)")
        ax.set_yscale("log")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "budget.png", dpi=120)
        plt.close(fig)
    rows = [r for r in all_rows if "budget_layers" not in r]

    labels = [f"{r['method']}\n{r['strategy']}" + ("\n+LoRA" if r["finetuned"] else "") for r in rows]
    fig, ax = plt.subplots(figsize=(1.3 * len(rows) + 2, 4))
    ax.bar(range(len(rows)), [r["ppl"] for r in rows], color=["gray"] + ["C0"] * (len(rows) - 1))
    ax.set_xticks(range(len(rows)), labels, fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("perplexity (log)")
    ax.set_title(f"{rows[0]['model']}: {rows[0]['kv_heads']} -> {rows[-1]['kv_heads']} KV heads")
    fig.tight_layout()
    fig.savefig(out / "ppl.png", dpi=120)
    plt.close(fig)


def run(cfg: KVCompressConfig) -> list[dict]:
    """Calibrate once, then convert a copy of the model per variant and measure perplexity."""
    model, tokenizer = load_model(cfg.model)
    model.eval()
    calib = token_blocks(tokenizer, pydoc_text(), cfg.calib_tokens, cfg.block_len)
    evalb = token_blocks(tokenizer, wiki_text("eval"), cfg.eval_tokens, cfg.block_len)
    if cfg.finetune_steps > 0:
        if cfg.finetune_text not in FINETUNE_TEXTS or cfg.finetune_loss not in ("distill", "ce"):
            raise ValueError(f"finetune_text must be one of {sorted(FINETUNE_TEXTS)} and finetune_loss 'distill' "
                             f"or 'ce', got {cfg.finetune_text!r}, {cfg.finetune_loss!r}")
        tune_blocks = token_blocks(tokenizer, FINETUNE_TEXTS[cfg.finetune_text](), cfg.finetune_tokens,
                                   cfg.block_len)
    out = Path(cfg.out)
    stats = collect_stats(model, calib, batch_size=cfg.batch_size, checkpoint=out / "kv_stats.safetensors",
                          progress=cfg.progress)
    base = dict(model=cfg.model, finetuned=False, decode_tokens_per_s=None, calib_tokens=stats.tokens,
                eval_tokens=evalb.numel())
    ppl = perplexity(model, evalb, cfg.batch_size, cfg.progress)
    rows = [dict(base, method="original", strategy="none", kv_heads=model.config.num_key_value_heads, ppl=ppl,
                 kv_bytes_per_token=kv_bytes_per_token(model), decode_tokens_per_s=decode_speed(cfg, model))]
    print(f"original: ppl {rows[0]['ppl']:.2f}, decode {rows[0]['decode_tokens_per_s']} tokens/s (sdpa)")
    for method, strategy in cfg.variants:
        compressed = copy.deepcopy(model)
        compress_kv_heads(compressed, cfg.target_kv_heads, method=method, key_strategy=strategy, stats=stats,
                          grouping=cfg.grouping)
        use_effkern_attention(compressed)
        ppl = perplexity(compressed, evalb, cfg.batch_size, cfg.progress)
        speed = decode_speed(cfg, compressed) if strategy == "rope_commuting" and method == "ours" else None
        row = dict(base, method=method, strategy=strategy, kv_heads=cfg.target_kv_heads, ppl=ppl,
                   kv_bytes_per_token=kv_bytes_per_token(compressed), decode_tokens_per_s=speed)
        rows.append(row)
        print(f"{method} / {strategy}: ppl {ppl:.2f}" + (f", decode {speed:.1f} tokens/s (effkern)" if speed else ""))
        if cfg.finetune_steps > 0 and (method, strategy) in cfg.finetune_variants:
            teacher = model if cfg.finetune_loss == "distill" else None
            tuned, info = lora_finetune(compressed, tune_blocks, steps=cfg.finetune_steps, teacher=teacher,
                                        batch_size=cfg.batch_size, progress=cfg.progress)
            ppl = perplexity(tuned, evalb, cfg.batch_size, cfg.progress)
            rows.append(dict(row, finetuned=True, ppl=ppl, decode_tokens_per_s=None, finetune_steps=info["steps"],
                             finetune_tokens=info["tokens"], finetune_seconds=round(info["seconds"], 1),
                             finetune_loss=cfg.finetune_loss, finetune_text=cfg.finetune_text))
            print(f"{method} / {strategy} + LoRA {info['steps']} steps ({info['seconds']:.0f} s): ppl {ppl:.2f}")
        del compressed
    if cfg.budget_layers:
        rows += budget_rows(cfg, model, stats, calib[: max(1, cfg.sensitivity_tokens // cfg.block_len)], evalb, base)
    write_results(rows, out)
    write_json(out / "config.json", asdict(cfg))
    return rows


def decode_speed(cfg: KVCompressConfig, model) -> float | None:
    """Decode tokens/s at the configured context and batch (None when ``decode_context`` is 0)."""
    if cfg.decode_context <= 0:
        return None
    return round(decode_tokens_per_s(model, batch=cfg.decode_batch, context=cfg.decode_context), 2)


def budget_rows(cfg: KVCompressConfig, model, stats, sens_blocks, evalb, base: dict) -> list[dict]:
    """KV bytes per token vs perplexity when only the n least sensitive layers are compressed, for our
    standard-GQA conversion and for mean-pooling (each ranked by its own sensitivity)."""
    rows = []
    for method, strategy in (("ours", "rope_commuting"), ("mean_pool", "mean_pool")):
        kwargs = dict(target_kv_heads=cfg.target_kv_heads, method=method, key_strategy=strategy)
        sens = layer_sensitivity(model, stats, sens_blocks, batch_size=cfg.batch_size, progress=cfg.progress,
                                 **kwargs)
        for n in cfg.budget_layers:
            budgeted = copy.deepcopy(model)
            layers = compress_by_budget(budgeted, sens, n, stats=stats, grouping=cfg.grouping, **kwargs)
            rows.append(dict(base, method=method, strategy=strategy, kv_heads=cfg.target_kv_heads,
                             budget_layers=n, compressed_layers=layers,
                             ppl=perplexity(budgeted, evalb, cfg.batch_size, cfg.progress),
                             kv_bytes_per_token=kv_bytes_per_token(budgeted)))
            print(f"budget {method}: {n} layers -> {rows[-1]['kv_bytes_per_token']} B/token, ppl {rows[-1]['ppl']:.2f}")
            del budgeted
    return rows
