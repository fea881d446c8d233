"""The KV-head compression flow's config (`effkern kv_compress`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from effkern.methods.common import MethodConfig, arg

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
class KVCompressConfig(MethodConfig):
    """KV-head compression of a Llama-family LM to fewer KV heads (PAPERS.md D). Defaults run SmolLM2-135M 3 -> 1 KV
    heads in a few minutes on 2 CPU cores; calibration text (Python docs prose) and evaluation text (a Wikipedia
    sample) differ."""

    name: ClassVar[str] = "kv_compress"
    QUICK: ClassVar[dict] = dict(calib_tokens=4096, eval_tokens=4096)
    SMOKE: ClassVar[dict] = dict(calib_tokens=1024, eval_tokens=512, batch_size=2, decode_context=0,
                                 variants=(("mean_pool", "mean_pool"), ("ours", "rope_commuting")))

    out: str = arg("runs/kv_compress", "output folder: config.json, results.json, ppl.png, kv_stats.safetensors")
    model: str = arg("smollm2", "smollm2 (packaged, GQA 9q/3kv) or mha (the project's small MHA Llama)",
                     choices=("smollm2", "mha"))
    target_kv_heads: int = arg(1, "KV heads after compression")
    calib_tokens: int = arg(16384, "calibration tokens")
    eval_tokens: int = arg(16384, "evaluation tokens (perplexity)")
    block_len: int = arg(512, "tokens per sequence")
    batch_size: int = arg(4, "sequences per batch")
    grouping: str = arg("consecutive", "[RECON] which query heads share a KV head",
                        choices=("consecutive", "similarity"))
    finetune_steps: int = arg(0, "LoRA recovery steps per fine-tuned variant (equal compute for each; 0: none)")
    finetune_tokens: int = arg(262144, "distinct fine-tuning tokens (cycled)")
    finetune_text: str = arg("wiki_train", "fine-tuning text: Wikipedia articles disjoint from the eval ones, or "
                             "the Python docs", choices=("wiki_train", "pydoc"))
    finetune_loss: str = arg("distill", "distill: KL to the original model's next-token distributions; ce: "
                             "next-token labels", choices=("distill", "ce"))
    decode_context: int = arg(2048, "cached tokens per sequence for decode tokens/s (0: not measured)")
    decode_batch: int = arg(8, "sequences for decode tokens/s")
    variants: tuple[tuple[str, str], ...] = arg(VARIANTS, "method:key_strategy pairs converted and measured",
                                                 choices=VARIANTS)
    finetune_variants: tuple[tuple[str, str], ...] = arg((("mean_pool", "mean_pool"), ("ours", "rope_commuting")),
                                                          "method:key_strategy pairs that get the LoRA recovery",
                                                          choices=VARIANTS)
    budget_layers: tuple[int, ...] = arg((), "KV-budget mode: numbers of (least sensitive) layers to compress")
    sensitivity_tokens: int = arg(2048, "calibration tokens that rank the layers (budget mode)")

    def validate(self) -> None:
        if not self.variants:
            raise ValueError("variants must not be empty")
        for name in ("target_kv_heads", "calib_tokens", "eval_tokens", "block_len", "batch_size", "decode_batch",
                     "sensitivity_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.finetune_steps < 0 or self.decode_context < 0 or min(self.budget_layers, default=0) < 0:
            raise ValueError("finetune_steps, decode_context and budget_layers must be >= 0")
