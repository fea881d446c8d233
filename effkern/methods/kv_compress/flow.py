"""The KV-head compression flow (`effkern kv_compress`): calibrate, convert with every method, measure.

Writes ``results.json`` and ``ppl.png`` (``budget.png`` in KV-budget mode) to the output folder. Rows: the standard
row (effkern.methods.common.row: method original / mean_pool / svd_w / ours, dataset ``wiki`` (the evaluation
text), model, variant = the key strategy, seed), then kv_heads, finetuned, ppl, kv_bytes_per_token,
decode_tokens_per_s (measured for the original model with SDPA and the standard-GQA compressed model with the
effkern kernel, at ``decode_context`` tokens and batch ``decode_batch``; null elsewhere), calib_tokens,
eval_tokens. Each row is written as soon as it is measured and a rerun of the same config skips the rows it has;
the calibration statistics are kept (``kv_stats.safetensors``).
"""

from __future__ import annotations

import copy
from pathlib import Path

from effkern.data.text import pydoc_text, token_blocks, wiki_text
from effkern.methods.common import RunDir, main_only, row
from effkern.methods.kv_compress.attention import use_effkern_attention
from effkern.methods.kv_compress.budget import compress_by_budget, layer_sensitivity
from effkern.methods.kv_compress.calibrate import collect_stats
from effkern.methods.kv_compress.config import KVCompressConfig
from effkern.methods.kv_compress.convert import compress_kv_heads
from effkern.methods.kv_compress.evaluate import decode_tokens_per_s, perplexity
from effkern.methods.kv_compress.finetune import lora_finetune

FINETUNE_TEXTS = {"wiki_train": lambda: wiki_text("train"), "pydoc": pydoc_text}


def load_model(name: str):
    from effkern.methods.kv_compress.model import load_smollm2, train_mha_llama

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


@main_only
def plot_results(all_rows: list[dict], out: Path) -> None:
    """ppl.png (perplexity per variant) and, with KV-budget rows, budget.png (KV bytes per token vs perplexity)."""
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

    labels = [f"{r['method']}\n{r['variant']}" + ("\n+LoRA" if r["finetuned"] else "") for r in rows]
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
    """Calibrate once, then convert a copy of the model per variant and measure perplexity; every row is written
    to results.json as soon as it is measured, and a rerun of the same config skips the rows it has."""
    cfg.check()
    run_dir = RunDir(cfg)
    model, tokenizer = load_model(cfg.model)
    model.eval()
    calib = token_blocks(tokenizer, pydoc_text(), cfg.calib_tokens, cfg.block_len)
    evalb = token_blocks(tokenizer, wiki_text("eval"), cfg.eval_tokens, cfg.block_len)
    if cfg.finetune_steps > 0:
        tune_blocks = token_blocks(tokenizer, FINETUNE_TEXTS[cfg.finetune_text](), cfg.finetune_tokens,
                                   cfg.block_len)
    stats = collect_stats(model, calib, batch_size=cfg.batch_size, checkpoint=run_dir.path / "kv_stats.safetensors",
                          progress=cfg.progress)
    base = dict(kv_heads=cfg.target_kv_heads, finetuned=False, decode_tokens_per_s=None, calib_tokens=stats.tokens,
                eval_tokens=evalb.numel())

    def measured(method: str, variant: str, **metrics) -> dict:
        new = row(method, dataset="wiki", model=cfg.model, variant=variant, seed=cfg.seed, **{**base, **metrics})
        run_dir.add([new])
        return new

    if not run_dir.done(method="original"):
        new = measured("original", "none", kv_heads=model.config.num_key_value_heads,
                       ppl=perplexity(model, evalb, cfg.batch_size, cfg.progress),
                       kv_bytes_per_token=kv_bytes_per_token(model), decode_tokens_per_s=decode_speed(cfg, model))
        print(f"original: ppl {new['ppl']:.2f}, decode {new['decode_tokens_per_s']} tokens/s (sdpa)")
    for method, strategy in cfg.variants:
        tune = cfg.finetune_steps > 0 and (method, strategy) in cfg.finetune_variants
        done = run_dir.done(method=method, variant=strategy, finetuned=False)
        if done and (not tune or run_dir.done(method=method, variant=strategy, finetuned=True)):
            continue
        compressed = copy.deepcopy(model)
        compress_kv_heads(compressed, cfg.target_kv_heads, method=method, key_strategy=strategy, stats=stats,
                          grouping=cfg.grouping)
        use_effkern_attention(compressed)
        if not done:
            speed = decode_speed(cfg, compressed) if strategy == "rope_commuting" and method == "ours" else None
            new = measured(method, strategy, ppl=perplexity(compressed, evalb, cfg.batch_size, cfg.progress),
                           kv_bytes_per_token=kv_bytes_per_token(compressed), decode_tokens_per_s=speed)
            print(f"{method} / {strategy}: ppl {new['ppl']:.2f}"
                  + (f", decode {speed:.1f} tokens/s (effkern)" if speed else ""))
        if tune:
            teacher = model if cfg.finetune_loss == "distill" else None
            tuned, info = lora_finetune(compressed, tune_blocks, steps=cfg.finetune_steps, teacher=teacher,
                                        batch_size=cfg.batch_size, progress=cfg.progress)
            new = measured(method, strategy, finetuned=True, ppl=perplexity(tuned, evalb, cfg.batch_size, cfg.progress),
                           kv_bytes_per_token=kv_bytes_per_token(tuned), finetune_steps=info["steps"],
                           finetune_tokens=info["tokens"], finetune_seconds=round(info["seconds"], 1),
                           finetune_loss=cfg.finetune_loss, finetune_text=cfg.finetune_text)
            print(f"{method} / {strategy} + LoRA {info['steps']} steps ({info['seconds']:.0f} s): ppl {new['ppl']:.2f}")
        del compressed
    if cfg.budget_layers and not any("budget_layers" in r for r in run_dir.rows):
        run_dir.add(budget_rows(cfg, model, stats, calib[: max(1, cfg.sensitivity_tokens // cfg.block_len)], evalb,
                                base))
    plot_results(run_dir.rows, run_dir.path)
    return run_dir.rows


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
            rows.append(row(method, dataset="wiki", model=cfg.model, variant=strategy, seed=cfg.seed,
                            **{**base, **dict(budget_layers=n, compressed_layers=layers,
                                              ppl=perplexity(budgeted, evalb, cfg.batch_size, cfg.progress),
                                              kv_bytes_per_token=kv_bytes_per_token(budgeted))}))
            print(f"budget {method}: {n} layers -> {rows[-1]['kv_bytes_per_token']} B/token, ppl {rows[-1]['ppl']:.2f}")
            del budgeted
    return rows
