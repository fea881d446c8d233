"""Triton kernels on hard inputs, run by the Triton interpreter on CPU tensors (as test_triton_kernels.py).

- Out-of-range indices through ``torch.ops.effkern.*`` (no Python entry checks): the kernels clamp or skip them,
  never touch memory outside the tensors, and record the error the guarded op raises
  (effkern/ops/_device_errors.py); the valid neighbours of each bound still match the reference.
- Decode with split contexts: rows outside the range are never read, NaN in used inputs stays NaN (the
  interpreter's max / min drop NaN as the GPU's do, np.fmax, so NaN handling is tested here).
The same NaN / Inf, LayerNorm and route cases for every backend (this one included) are in test_hard_inputs.py.
"""

import os
import re

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton import

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import TOL, assert_close, env  # noqa: E402

from effkern.ops import _device_errors as dev_err  # noqa: E402
from effkern.ops.kv_append import reference as kv_append_reference  # noqa: E402
from effkern.ops.low_rank_embedding import reference as lre_reference  # noqa: E402

pytest.importorskip("triton")

from effkern.triton_kernels import _checks as chk  # noqa: E402
from effkern.triton_kernels import gqa_decode as gqa  # noqa: E402


def error_word() -> torch.Tensor:
    """A fresh int32 [1] error word (the ops pass effkern.ops._device_errors.error_word's)."""
    return torch.zeros(1, dtype=torch.int32)


def test_error_bits_match_the_device_error_contract():
    assert (chk.ERR_SEQ_LENS, chk.ERR_KV_START, chk.ERR_SLOTS, chk.ERR_IDS) == (
        dev_err.SEQ_LENS, dev_err.KV_START, dev_err.SLOTS, dev_err.IDS)


nan_inputs = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, inside kernels


def raises_index_error(code: int):
    """The error the guarded op raises after its kernel recorded ``code`` (the interpreter runs synchronously)."""
    return pytest.raises(ValueError, match=re.escape(dev_err.MESSAGES[code]))


def decode_case(lens, starts=None, s_max=8):
    torch.manual_seed(0)
    b = len(lens)
    q, k_cache, v_cache = torch.randn(b, 4, 16), torch.randn(b, 2, s_max, 16), torch.randn(b, 2, s_max, 16)
    starts = None if starts is None else torch.tensor(starts, dtype=torch.int32)
    return q, k_cache, v_cache, torch.tensor(lens, dtype=torch.int32), starts, None, None, None, 0.25, 0.0, 0, 0


@pytest.mark.parametrize("lens, starts, code", [
    ([10**8, 3], None, dev_err.SEQ_LENS), ([9, 3], None, dev_err.SEQ_LENS), ([-1, 3], None, dev_err.SEQ_LENS),
    ([5, 3], [6, 0], dev_err.KV_START), ([5, 3], [0, -1], dev_err.KV_START)])
def test_registered_gqa_decode_rejects_lengths_outside_the_cache(lens, starts, code):
    with env(EFFKERN_BACKEND="triton"), raises_index_error(code):
        torch.ops.effkern.gqa_decode(*decode_case(lens, starts))


def test_registered_gqa_decode_full_cache_is_valid():
    args = decode_case([8, 0], [3, 0])  # seq_lens == S_max, kv_start == seq_lens (empty)
    with env(EFFKERN_BACKEND="triton"):
        assert_close(torch.ops.effkern.gqa_decode(*args), decode_expected(*args[:5], args[8]))


def append_case(slots, s_max=8):
    torch.manual_seed(0)
    caches = torch.randn(2, 2, 2, s_max, 16).unbind(0)
    return (*caches, torch.randn(2, 2, 16), torch.randn(2, 2, 16), torch.tensor(slots, dtype=torch.int32), None,
            None, None, 0, 0)


@pytest.mark.parametrize("slots", [[10**8, 1], [8, 1], [-1, 1]])
def test_registered_kv_append_skips_slots_outside_the_cache(slots):
    args = append_case(slots)
    original = [c.clone() for c in args[:2]]
    expected = [c.clone() for c in args[:2]]
    kv_append_reference(*expected, *args[2:4], args[4].clamp(0, 7), *args[5:])
    with env(EFFKERN_BACKEND="triton"), raises_index_error(dev_err.SLOTS):
        torch.ops.effkern.kv_append(*args)
    for got, old, want in zip(args[:2], original, expected, strict=True):  # sequence 0 untouched, 1 written
        assert torch.equal(got[0], old[0]) and torch.equal(got[1], want[1])


def test_registered_kv_append_last_slot_is_valid():
    args = append_case([7, 0])
    expected = [c.clone() for c in args[:2]]
    kv_append_reference(*expected, *args[2:])
    with env(EFFKERN_BACKEND="triton"):
        torch.ops.effkern.kv_append(*args)
    assert torch.equal(args[0], expected[0]) and torch.equal(args[1], expected[1])


def embedding_case(ids):
    torch.manual_seed(0)  # LowRankEmbedding([4, 3, 5], 6, 3): offsets 0, 4, 7 into a table of 12 rows
    return (torch.tensor(ids), torch.randn(12, 3), torch.tensor([0, 4, 7]), torch.randn(3, 6, 3), torch.randn(3, 6),
            False)


@pytest.mark.parametrize("ids", [[[[10**9], [0], [0]]], [[[4], [0], [0]]], [[[0], [3], [0]]], [[[0], [0], [5]]],
                                 [[[-2], [0], [0]]]])
def test_registered_low_rank_embedding_rejects_ids_outside_their_field(ids):
    with env(EFFKERN_BACKEND="triton"), raises_index_error(dev_err.IDS):
        torch.ops.effkern.low_rank_embedding(*embedding_case(ids))


def test_registered_low_rank_embedding_last_ids_are_valid():
    args = embedding_case([[[3, -1], [2, 0], [4, -1]]])  # V_f - 1 in every field, padding
    with env(EFFKERN_BACKEND="triton"):
        assert_close(torch.ops.effkern.low_rank_embedding(*args), lre_reference(*args))


def _bad_shapes():
    """(registered op, arguments that are wrong in one shape or dtype), the cases issue 17 ran into."""
    q, k, v, lens = decode_case([3, 3])[:4]
    table_case = embedding_case([[[0], [0], [0]]])
    x, u, v = torch.randn(3, 8), torch.randn(4, 8), torch.randn(6, 4)
    return {
        "cos/sin": ("gqa_decode", (q, k, v, lens, None, torch.randn(2, 3), torch.randn(2, 3), None, 0.3, 0.0, 0, 8)),
        "q_proj": ("gqa_decode", (q, k, v, lens, None, None, None, torch.randn(4, 16, 8), 0.3, 0.0, 0, 0)),
        "int64 seq_lens": ("gqa_decode", (q, k, v, lens.long(), None, None, None, None, 0.3, 0.0, 0, 0)),
        "k_proj": ("kv_append", (k, v, torch.randn(2, 2, 16), torch.randn(2, 2, 16), lens, None, None,
                                 torch.randn(2, 16, 8), 0, 0)),
        "b1": ("low_rank_linear", (x, u, torch.randn(5), v, None, 1, 0)),
        "b2": ("low_rank_linear", (x, u, None, v, torch.randn(7), 1, 1)),
        "int32 offsets": ("low_rank_embedding", (*table_case[:2], table_case[2].int(), *table_case[3:])),
        "u": ("low_rank_embedding", (*table_case[:3], torch.randn(3, 6, 2), *table_case[4:])),
        "z": ("residual_layer_norm", (torch.randn(3, 8), torch.randn(7), 1e-5)),
    }


@pytest.mark.parametrize("case", list(_bad_shapes()))
def test_registered_ops_check_what_the_kernels_rely_on(case):
    op, args = _bad_shapes()[case]
    with env(EFFKERN_BACKEND="triton"), pytest.raises(ValueError, match=r"_triton: .* must "):
        getattr(torch.ops.effkern, op)(*args)


def decode_expected(q, k_cache, v_cache, seq_lens, kv_start, scale, q_proj=None):
    """torch's answer in fp64, sequence by sequence: a softmax over the valid rows only (no other row is even
    read), zeros for an empty range."""
    g = q.shape[1] // k_cache.shape[1]
    out = torch.zeros(*q.shape[:2], v_cache.shape[-1], dtype=torch.float64)
    for i, hi in enumerate(seq_lens.tolist()):
        lo = 0 if kv_start is None else int(kv_start[i])
        if hi > lo:
            qi = q[i].double() if q_proj is None else torch.einsum("hd,hde->he", q[i].double(), q_proj.double())
            k, v = (c[i, :, lo:hi].double().repeat_interleave(g, 0) for c in (k_cache, v_cache))
            out[i] = torch.einsum("hs,hsd->hd", torch.softmax(torch.einsum("hd,hsd->hs", qi, k) * scale, -1), v)
    return out.to(q.dtype)


@nan_inputs
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_never_reads_rows_outside_the_range(num_splits):
    q, k_cache, v_cache, lens, starts = decode_case([40, 17, 0], [5, 17, 0], s_max=48)[:5]
    for c in (k_cache, v_cache):  # NaN / Inf in every row outside [kv_start, seq_lens)
        for i, (lo, hi) in enumerate(zip(starts.tolist(), lens.tolist(), strict=True)):
            c[i, :, :lo] = float("nan")
            c[i, :, hi:] = float("inf")
    out = gqa.gqa_decode_triton(q, k_cache, v_cache, lens, starts, None, None, None, 0.25, 0.0, 0, 0, error_word(),
                                num_splits=num_splits)
    assert out.isfinite().all()
    assert_close(out, decode_expected(q, k_cache, v_cache, lens, starts, 0.25))


@nan_inputs
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("where", ["q", "q_proj", "k", "v"])
def test_decode_nan_in_used_inputs_gives_nan(where, num_splits):
    q, k_cache, v_cache, lens, _ = decode_case([40, 17, 0], s_max=48)[:5]
    q_proj = torch.randn(4, 16, 16) / 4
    nan = float("nan")
    if where == "q":
        q[0, 1, 3] = q[2, 0, 0] = nan  # sequence 2 is empty: still zeros
    elif where == "q_proj":
        q_proj[2, 5, 7] = nan
    elif where == "k":
        k_cache[1, 0, 16, 2] = nan  # the last valid row of sequence 1
    else:
        v_cache[0, 1, 20, 4] = nan
    out = gqa.gqa_decode_triton(q, k_cache, v_cache, lens, None, None, None, q_proj, 0.25, 0.0, 0, 0, error_word(),
                                num_splits=num_splits)
    expected = decode_expected(q, k_cache, v_cache, lens, None, 0.25, q_proj)
    assert expected.isnan().any()
    torch.testing.assert_close(out, expected, equal_nan=True, **TOL[torch.float32])
