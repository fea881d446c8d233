"""Test-wide setup: Triton kernels run under the interpreter on CPU tensors, no hub is ever contacted, and the
hypothesis property tests draw the same examples on every run (derandomized: a CI run is reproducible; a random
draw once found a tolerance edge in CI that no rerun could show).

TRITON_INTERPRET must be set before triton decorates any kernel, so it is set here, before test modules
import anything (unless set already). The GPU compile checks run in subprocesses without it.

On a GPU: ``TRITON_INTERPRET=0 pytest -m cuda tests`` runs every GPU test with the Triton kernels compiled for the
card (bench/gpu_check.py does it): a test that skips without a CUDA GPU gets the ``cuda`` marker here, marked by
hand or not.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.pop("EFFKERN_BACKEND", None)  # tests choose backends explicitly
os.environ.pop("EFFKERN_CPU_ISA", None)


import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

settings.register_profile("effkern", derandomize=True, database=None)
settings.load_profile("effkern")


def pytest_collection_modifyitems(items):
    for item in items:
        if any("CUDA GPU" in str(m.kwargs.get("reason", "")) for m in item.iter_markers("skipif")):
            item.add_marker(pytest.mark.cuda)


@pytest.fixture(scope="session")
def bpe_tokenizer():
    """A real byte-level BPE (600-token vocab) trained in ~0.1 s on packaged prose, so text and model tests
    run on merged tokens without loading a model's tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from effkern.data.text import pydoc_text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([pydoc_text()[:200_000]], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok)
