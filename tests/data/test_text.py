"""Packaged text loaders and token blocks: real text comes back clean, blocks are the text's leading tokens."""

from __future__ import annotations

import importlib.metadata
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from helpers import installed

from effkern.data import text as text_mod
from effkern.data.text import (
    WIKI_HELD_OUT_CHARS,
    packaged_file,
    pydoc_text,
    strip_wiki_markup,
    token_blocks,
    wiki_text,
)

requires_gensim = pytest.mark.skipif(
    not installed("gensim"), reason="the Wikipedia sample ships in gensim: pip install --no-deps gensim==4.4.0"
)


def test_pydoc_text_is_the_topics_in_sorted_order():
    from pydoc_data.topics import topics

    text = pydoc_text()
    assert len(text) > 300_000
    first, last = sorted(topics)[0], sorted(topics)[-1]
    assert text.startswith(topics[first].strip()[:200])
    assert text.endswith(topics[last].strip()[-200:])


@requires_gensim
def test_wiki_text_is_clean_prose():
    text = wiki_text()
    assert len(text) > 1_000_000
    assert text.startswith("Anarchism\n\nAnarchism is a political philosophy")
    for markup in ("{{", "}}", "[[", "]]", "{|", "|}", "<ref", "</ref", "'''", "<!--", "#REDIRECT", "&nbsp;"):
        assert markup not in text, markup
    # Section headings survive as plain lines, link labels as text.
    assert "\nEtymology and terminology\n" in text


@requires_gensim
def test_wiki_and_calibration_text_are_disjoint():
    wiki = wiki_text()
    # A long run of the calibration text would appear verbatim in the evaluation text if the sources overlapped.
    for start in range(0, 400_000, 50_000):
        assert pydoc_text()[start : start + 200] not in wiki


@requires_gensim
def test_wiki_splits_are_the_held_out_head_and_the_rest():
    held_out, train = wiki_text("eval"), wiki_text("train")
    assert wiki_text() == held_out + "\n\n" + train  # evaluation reading from the start stays in the head
    assert WIKI_HELD_OUT_CHARS <= len(held_out) < WIKI_HELD_OUT_CHARS + 200_000
    assert len(train) > 1_000_000
    first_train_article = train[: train.index("\n\n")]
    assert first_train_article + "\n\n" not in held_out
    with pytest.raises(ValueError, match="split must be"):
        wiki_text("test")


def test_strip_wiki_markup_on_every_construct():
    raw = (
        "{{Infobox person|name={{nowrap|A B}}|born=1900}}\n"
        "'''Ada''' was a [[mathematician|maths person]] from [[London]].<ref name=x>Cite {{cite|y}}</ref> "
        "See [http://example.org the site] and [[de:Ada]].<ref name=z/>\n"
        "<!-- hidden -->\n"
        "== Early life ==\n"
        "[[File:Ada.jpg|thumb|Ada in [[1840]] with a [ruler]]]\n"
        "{| class=\"wikitable\"\n|-\n| cell || {{x}}\n|}\n"
        "* She wrote ''notes'' on &amp; <b>about</b> engines.<br />\n"
        "[[Category:Mathematicians]]\n"
        "== References ==\n"
        "* a citation list\n"
    )
    assert strip_wiki_markup(raw) == (
        "Ada was a maths person from London. See the site and .\n\nEarly life\n\nShe wrote notes on & about engines."
    )


def test_missing_package_names_the_pip_command(monkeypatch):
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps nothing-here==1"):
        packaged_file("effkern-no-such-distribution", "x.bin", "pip install --no-deps nothing-here==1")

    def no_gensim(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(text_mod.importlib.metadata, "distribution", no_gensim)
    with pytest.raises(ModuleNotFoundError, match=r"gensim.*pip install --no-deps gensim==4\.4\.0"):
        text_mod._wiki_articles.__wrapped__()  # bypass the cache of an earlier successful call


def test_token_blocks_are_the_leading_tokens(bpe_tokenizer):
    text = pydoc_text()
    full = bpe_tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    blocks = token_blocks(bpe_tokenizer, text, n_tokens=1000, block_len=96)
    assert blocks.dtype == torch.long and blocks.shape == (10, 96)  # 1000 // 96 full blocks, remainder dropped
    # Only a prefix of the text is tokenized; the kept tokens must still match tokenizing all of it.
    assert blocks.flatten().tolist() == full[:960]


def test_token_blocks_short_text_and_errors(bpe_tokenizer):
    text = pydoc_text()[:3000]
    n_text = len(bpe_tokenizer(text, add_special_tokens=False)["input_ids"])
    blocks = token_blocks(bpe_tokenizer, text, n_tokens=10 * n_text, block_len=100)
    assert blocks.shape == (n_text // 100, 100)  # a shorter text gives the whole blocks it has

    with pytest.raises(ValueError, match="fewer than one block"):
        token_blocks(bpe_tokenizer, "tiny text", n_tokens=1000, block_len=100)
    with pytest.raises(ValueError, match="smaller than one block"):
        token_blocks(bpe_tokenizer, text, n_tokens=50, block_len=100)
    with pytest.raises(ValueError, match="at least 2"):
        token_blocks(bpe_tokenizer, text, n_tokens=50, block_len=1)
