"""Index errors found by the GPU kernels (CUDA and Triton), reported without a host sync per call.

The C++ CPU launchers check index arguments before their kernels run (one pass over B lengths or the ids). A GPU
launcher cannot read device values without a sync, so the GPU kernels check each index as they use it: an index
out of range is never dereferenced (lengths are clamped, a bad slot is not written, a bad id reads nothing) and the
kernel stores its error code into an int32 "error word". On CUDA the word lives in pinned host memory, which under
unified virtual addressing every kernel can write through the same pointer and the host can read at any time
without a sync: every effkern GPU launch first raises what earlier kernels on that device recorded, and
:func:`check_device_errors` synchronises and raises at once. Kernels that run on the CPU (Triton's interpreter)
are synchronous, so their launch raises right after the kernel. What a bad call returned is undefined (computed
from clamped indices), as after torch's own device-side asserts, but nothing outside the tensors is touched.

The codes are bits; csrc/cuda/common.cuh names the same bits for the CUDA kernels.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import torch

SEQ_LENS, KV_START, SLOTS, IDS = 1, 2, 4, 8
MESSAGES = {
    SEQ_LENS: "effkern.gqa_decode: seq_lens must be within [0, S_max] (the cache length)",
    KV_START: "effkern.gqa_decode: kv_start must be within [0, seq_lens]",
    SLOTS: "effkern.kv_append: slots must be within [0, S_max)",
    IDS: "effkern.low_rank_embedding: ids must be within their field's [0, V_f) or be -1 (padding)",
}


@functools.cache
def _word(device: torch.device) -> tuple[torch.Tensor, np.ndarray]:
    if device.type == "cuda":
        with torch.cuda.device(device):
            word = torch.zeros(1, dtype=torch.int32, pin_memory=True)
    else:
        word = torch.zeros(1, dtype=torch.int32)
    return word, word.numpy()


def _device_key(device: torch.device) -> torch.device:
    """One key per word: ``cuda`` without an index is the current CUDA device; every CPU device is ``cpu``."""
    if device.type != "cuda":
        return torch.device(device.type)
    return torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)


def error_word(device: torch.device) -> torch.Tensor:
    """The int32 ``[1]`` word the kernels running on ``device`` store their error codes into."""
    return _word(_device_key(device))[0]


def raise_pending(device: torch.device) -> None:
    """Raise (and clear) the errors recorded by the kernels that ran on ``device`` so far."""
    view = _word(_device_key(device))[1]
    code = int(view[0])
    if code:
        view[0] = 0
        found = [text for bit, text in MESSAGES.items() if code & bit] or [f"unknown error code {code}"]
        when = "" if device.type == "cpu" else " (found by a kernel of an earlier call on this device)"
        raise ValueError("; ".join(found) + when)


def check_device_errors(device: torch.device | str | None = None) -> None:
    """Wait for ``device``'s kernels (default: the current CUDA device) and raise any index error they found."""
    device = torch.device("cuda" if device is None else device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    raise_pending(device)


def guarded(launch: Callable) -> Callable:
    """A GPU backend's implementation from ``launch(*args, err)``: the device's error word passed last, earlier
    errors raised before the launch and, on the CPU (Triton's interpreter), the launch's own errors after it."""

    def call(*args):
        device = args[0].device
        raise_pending(device)
        out = launch(*args, error_word(device))
        if device.type == "cpu":
            raise_pending(device)
        return out

    return call
