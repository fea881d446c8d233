"""Text that ships with installed packages, and cutting it into token blocks for language-model flows.

Sources (DATA.md):
- ``pydoc_text``: the stdlib's ``pydoc_data.topics`` prose (~465k characters, every machine). Calibration source.
- ``wiki_text``: the Wikipedia sample inside the gensim package, markup stripped. Evaluation source (its held-out
  head, ``split="eval"``); the rest (``split="train"``) is training text for the project's own small model.

Packages are located with ``importlib.metadata`` and never imported (gensim's import pulls in scipy and more).
"""

from __future__ import annotations

import bz2
import functools
import html
import importlib.metadata
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

_WIKI_PACKAGE = "gensim"
_WIKI_PIP = "pip install --no-deps gensim==4.4.0"
_WIKI_FILE = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def packaged_file(package: str, path: str, pip_command: str) -> Path:
    """Path of a data file shipped inside an installed distribution, found without importing the package.

    Raises ModuleNotFoundError naming the package and ``pip_command`` when the distribution is not installed,
    and FileNotFoundError when it is installed but lacks ``path`` (another version).
    """
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise ModuleNotFoundError(
            f"this needs the data-only package {package!r}, which is not installed; install it with: {pip_command}"
        ) from None
    file = Path(dist.locate_file(path))
    if not file.is_file():
        raise FileNotFoundError(
            f"{package} {dist.version} is installed but has no {path}; install the expected version: {pip_command}"
        )
    return file


@functools.lru_cache(maxsize=1)
def pydoc_text() -> str:
    """The prose of ``pydoc_data.topics.topics`` (the help() topics of the language reference), in sorted-key order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key].strip() for key in sorted(topics))


# --- Wikipedia sample -------------------------------------------------------------------------------------------

# Trailing sections that hold link lists and citations, not prose: the article is cut at the first of them.
_TAIL_SECTION = re.compile(
    r"^==+[ \t]*(references|external links|see also|notes|further reading|bibliography|sources|footnotes|citations"
    r"|notes and references)[ \t]*==+[ \t]*$",
    re.MULTILINE | re.IGNORECASE,
)
_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
_REF = re.compile(r"<ref[^>]*?/>|<ref[^>]*>.*?</ref\s*>", re.DOTALL | re.IGNORECASE)
# Tags whose content is not prose (formulas, image galleries, ...): dropped with their content.
_DROP_BLOCK = re.compile(
    r"<(math|gallery|timeline|imagemap|score|hiero|chem|syntaxhighlight|source|code)\b[^>]*>.*?</\1\s*>",
    re.DOTALL | re.IGNORECASE,
)
_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")  # innermost template; nesting is removed by repeating
_TABLE = re.compile(r"\{\|(?:(?!\{\|).)*?\|\}", re.DOTALL)  # innermost table
# Innermost wiki link: no '[[' or ']]' inside, single brackets allowed (captions hold nested links and "[1.1.0]",
# and "[x]]]" closes a bracketed word, then the link).
_LINK = re.compile(r"\[\[((?:[^\[\]]|\[(?!\[)|\](?!\])|\](?=\]\]))*)\]\]")
_NON_TEXT_LINK = re.compile(r"^\s*(file|image|category|media)\s*:|^\s*[a-z]{2,3}(-[a-z]+)?\s*:", re.IGNORECASE)
_EXTERNAL_LINK = re.compile(r"\[(?:https?|ftp)://[^\s\]]*\s*([^\]]*)\]")
_HTML_TAG = re.compile(r"</?[a-zA-Z][^<>]*>")
_BOLD_ITALIC = re.compile(r"'{2,}")
_HEADING = re.compile(r"^(=+)[ \t]*(.*?)[ \t]*\1[ \t]*$", re.MULTILINE)
_LIST_MARK = re.compile(r"^[*#:;]+[ \t]*", re.MULTILINE)
_MAGIC_WORD = re.compile(r"__[A-Z]+__")
_LEFTOVER = re.compile(r"\{\{|\}\}|\[\[|\]\]|\{\||\|\}")


def _sub_until_stable(pattern: re.Pattern[str], repl, text: str) -> str:
    """Apply ``pattern.sub`` until nothing changes, so nested constructs are removed innermost first."""
    while True:
        text, n = pattern.subn(repl, text)
        if n == 0:
            return text


def _link_text(match: re.Match[str]) -> str:
    target, _, label = match.group(1).partition("|")
    if _NON_TEXT_LINK.match(target):
        return ""  # files, categories and interlanguage links carry no running text
    return (label or target).strip().lstrip(":")


def strip_wiki_markup(wikitext: str) -> str:
    """Plain prose from MediaWiki markup: templates, tables, refs, files, categories and HTML removed, links kept
    as their text, headings as plain lines, bold/italic marks and list bullets dropped."""
    text = _TAIL_SECTION.split(wikitext, maxsplit=1)[0]
    text = _COMMENT.sub("", text)
    text = _REF.sub("", text)
    text = _DROP_BLOCK.sub("", text)
    text = _sub_until_stable(_TEMPLATE, "", text)
    text = _sub_until_stable(_TABLE, "", text)
    text = _sub_until_stable(_LINK, _link_text, text)
    text = _EXTERNAL_LINK.sub(r"\1", text)
    text = _HTML_TAG.sub("", text)
    text = _BOLD_ITALIC.sub("", text)
    text = _HEADING.sub(r"\2", text)
    text = _LIST_MARK.sub("", text)
    text = _MAGIC_WORD.sub("", text)
    text = _LEFTOVER.sub("", text)  # unbalanced openers/closers the nesting passes could not pair
    text = html.unescape(text)
    lines = (re.sub(r"[ \t\u00a0]+", " ", line).strip() for line in text.splitlines())
    # Table rows and infobox fragments that escaped the passes start with '|' or '!'.
    kept = [line for line in lines if not line.startswith(("|", "!"))]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(kept)).strip()


# Articles shorter than this after stripping are stubs or disambiguation lists, not running prose.
_WIKI_MIN_CHARS = 500
# The sample is split at the first article boundary past this many characters (~228k SmolLM2 tokens): evaluation
# reads from the start of ``wiki_text()`` and must stay within this head; the project's own model trains on the rest.
WIKI_HELD_OUT_CHARS = 1_000_000


@functools.lru_cache(maxsize=1)
def _wiki_articles() -> tuple[str, ...]:
    path = packaged_file(_WIKI_PACKAGE, _WIKI_FILE, _WIKI_PIP)
    articles: list[str] = []
    title, namespace = "", ""
    with bz2.open(path, "rb") as stream:
        for _, elem in ET.iterparse(stream, events=("end",)):
            tag = elem.tag.rsplit("}", 1)[-1]  # drop the export-schema namespace
            if tag == "title":
                title = elem.text or ""
            elif tag == "ns":
                namespace = elem.text or ""
            elif tag == "text":
                raw = elem.text or ""
                if namespace == "0" and not raw.lstrip().upper().startswith("#REDIRECT"):
                    prose = strip_wiki_markup(raw)
                    if len(prose) >= _WIKI_MIN_CHARS:
                        articles.append(f"{title}\n\n{prose}")
            elif tag == "page":
                elem.clear()  # keep memory flat while streaming the 6 MB dump
    return tuple(articles)


def wiki_text(split: str = "all") -> str:
    """English Wikipedia articles from gensim's packaged dump sample, markup stripped, in dump order.

    Only main-namespace, non-redirect pages with at least 500 characters of prose are kept, each as
    ``title\\n\\nprose``, joined by blank lines (~2.8M characters, ~625k SmolLM2 tokens). Licence: CC BY-SA.

    Args:
        split: ``"all"``; ``"eval"``, the held-out head: the articles starting within the first
            ``WIKI_HELD_OUT_CHARS`` characters (``wiki_text()`` begins with exactly this text); or ``"train"``, the
            remaining articles, disjoint from ``"eval"``.
    """
    articles = _wiki_articles()
    if split == "all":
        return "\n\n".join(articles)
    if split not in ("eval", "train"):
        raise ValueError(f"split must be 'all', 'eval' or 'train', got {split!r}")
    n_eval, chars = 0, 0
    while n_eval < len(articles) and chars < WIKI_HELD_OUT_CHARS:
        chars += len(articles[n_eval]) + 2
        n_eval += 1
    return "\n\n".join(articles[:n_eval] if split == "eval" else articles[n_eval:])


# --- token blocks -----------------------------------------------------------------------------------------------

# Tokens kept clear of the cut when only a prefix of the text is tokenized: a token near the cut could merge with
# characters after it, so the prefix must reach well past the tokens that are kept.
_CUT_MARGIN = 64


def _first_tokens(tokenizer: PreTrainedTokenizerBase, text: str, n_tokens: int) -> list[int]:
    """The first ``n_tokens`` token ids of ``text`` (fewer if the text is shorter), without special tokens.

    Tokenizes a growing prefix instead of the whole text, because evaluation needs a few thousand tokens of a
    multi-megabyte text.
    """
    chars = max(4096, 8 * n_tokens)
    while True:
        prefix = text[:chars]
        ids = tokenizer(prefix, add_special_tokens=False, verbose=False)["input_ids"]
        if chars >= len(text) or len(ids) >= n_tokens + _CUT_MARGIN:
            return ids[:n_tokens]
        chars *= 2


def token_blocks(tokenizer: PreTrainedTokenizerBase, text: str, n_tokens: int, block_len: int) -> torch.LongTensor:
    """Cut the first ``n_tokens`` tokens of ``text`` into independent blocks.

    Args:
        tokenizer: a Hugging Face tokenizer; no special tokens are added.
        text: the source text.
        n_tokens: how many leading tokens to use; a text with fewer tokens yields the whole blocks it has.
        block_len: tokens per block.

    Returns:
        ``[n_blocks, block_len]`` int64 with ``n_blocks = min(n_tokens, tokens in text) // block_len``; the
        remainder is dropped.

    Raises:
        ValueError: ``block_len < 2``, ``n_tokens < block_len``, or a text with fewer tokens than one block.
    """
    if block_len < 2:
        raise ValueError(f"block_len must be at least 2 (one input and one target), got {block_len}")
    if n_tokens < block_len:
        raise ValueError(f"n_tokens ({n_tokens}) is smaller than one block ({block_len})")
    ids = _first_tokens(tokenizer, text, n_tokens)
    if len(ids) < block_len:
        raise ValueError(f"the text has only {len(ids)} tokens, fewer than one block of {block_len}")
    n_blocks = len(ids) // block_len
    return torch.tensor(ids[: n_blocks * block_len], dtype=torch.long).view(n_blocks, block_len)
