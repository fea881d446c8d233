"""Hard inputs against every backend that runs here (the reference, the C++ kernels at every SIMD level, the Triton
kernels under the interpreter): out-of-range indices on every route (in subprocesses, so a crash is a failure),
NaN / Inf semantics equal to torch's, LayerNorm statistics on constant and large-mean rows, sharp softmax and long
contexts against float64, and float64 gradchecks through the reference."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import env, requires_ext, supported_cpu_isas

from effkern.ops import (
    gqa_decode,
    kv_append,
    low_rank_attention,
    low_rank_attention_block,
    low_rank_embedding,
    low_rank_linear,
    residual_layer_norm,
)
from effkern.ops._backend import BackendUnavailableError, extension, why_unavailable

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import route_cases  # noqa: E402

# NaN and Inf inputs make numpy (the Triton interpreter) warn about the invalid values it computes on purpose
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

TRITON = why_unavailable("triton", torch.device("cpu")) is None
NATIVE = [*(["cpu"] if extension() is not None else []), *(["triton"] if TRITON else [])]
# (backend, C++ SIMD level): every compiled path of the C++ kernels, and the others once
BACKEND_ISAS = [("reference", None), *(("cpu", isa) for isa in supported_cpu_isas()),
                *([("triton", None)] if TRITON else [])]
IDS = [b if isa is None else f"{b}-{isa}" for b, isa in BACKEND_ISAS]


# ---- out-of-range indices and malformed arguments, every route ----------------------------------------------------

ROUTES = ["eager", "compile", "export", "ops"]
INDEX_ARGUMENT = {"slots": "slots", "seq_lens": "seq_lens", "kv_start": "kv_start", "id ": "ids"}


def _case_names(route: str) -> list[str]:
    cases = route_cases.ops_cases() if route == "ops" else route_cases.entry_cases()
    names = [name for name, _, _ in cases]
    if route == "export":
        names = [n for n in names if "low_rank_embedding" in n or "gqa_decode" in n]
    return names


_RUNS: dict[tuple[str, str], tuple[int, dict, str]] = {}


def _run_route(route: str, backend: str) -> tuple[int, dict, str]:
    """route_cases.py ROUTE in a subprocess with EFFKERN_BACKEND=backend, once per (route, backend)."""
    if (route, backend) not in _RUNS:
        environ = dict(os.environ, EFFKERN_BACKEND=backend, TRITON_INTERPRET="1")  # effkern imported as here
        proc = subprocess.run([sys.executable, str(HERE / "route_cases.py"), route], capture_output=True, text=True,
                              env=environ, timeout=600)
        lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        _RUNS[route, backend] = proc.returncode, {line["case"]: line["error"] for line in lines}, proc.stderr[-2000:]
    return _RUNS[route, backend]


@pytest.mark.parametrize("backend", ["reference", *NATIVE])
@pytest.mark.parametrize(("route", "case"), [(r, c) for r in ROUTES for c in _case_names(r)])
def test_bad_arguments_raise_on_every_route(route, case, backend):
    if backend == "triton" and route == "compile":
        pytest.skip("compiling Triton-interpreted ops adds minutes and no route the eager / ops cases miss")
    returncode, errors, stderr = _run_route(route, backend)
    assert case in errors, f"the subprocess died before this case (exit code {returncode}): {stderr}"
    error = errors[case]
    assert error is not None, f"{case} on {route} / {backend} raised nothing"
    kind, message = error
    assert kind in ("ValueError", "RuntimeError", "IndexError", "TypeError"), error
    argument = next((arg for key, arg in INDEX_ARGUMENT.items() if key in case), None)
    if argument is not None:  # index errors are ValueErrors naming the argument, on every route
        assert kind == "ValueError" and argument in message, error


# ---- NaN / Inf semantics ------------------------------------------------------------------------------------------

def _torch_low_rank_linear(x, u, v, b1, b2, act, out_act):
    a = F.linear(x.double(), u.double(), b1.double())
    a = {"none": a, "relu": F.relu(a), "gelu": F.gelu(a)}[act]
    y = F.linear(a, v.double(), b2.double())
    return F.relu(y) if out_act == "relu" else y


@pytest.mark.parametrize(("backend", "isa"), BACKEND_ISAS, ids=IDS)
@pytest.mark.parametrize("act", ["none", "relu", "gelu"])
@pytest.mark.parametrize("out_act", ["none", "relu"])
@pytest.mark.parametrize("rows", [3, 40])  # the few-rows dot-product path and the tiled one
def test_low_rank_linear_keeps_nan_and_inf(backend, isa, act, out_act, rows):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, 20, generator=g)
    x[0] = float("nan")
    x[1, 3] = float("inf")
    x[2, 5] = float("-inf")
    u, v = torch.randn(8, 20, generator=g), torch.randn(12, 8, generator=g)
    b1, b2 = torch.randn(8, generator=g), torch.randn(12, generator=g)
    with env(EFFKERN_BACKEND=backend, EFFKERN_CPU_ISA=isa):
        y = low_rank_linear(x, u, v, b1, b2, act, out_act)
    expected = _torch_low_rank_linear(x, u, v, b1, b2, act, out_act)
    torch.testing.assert_close(y.double(), expected, equal_nan=True, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("backend", "isa"), BACKEND_ISAS, ids=IDS)
@pytest.mark.parametrize("rows", [3, 40])
def test_low_rank_linear_relu_of_minus_inf_is_finite(backend, isa, rows):
    """An infinite input that the hidden ReLU maps to 0 leaves a finite output: no padded hidden column (x . 0 =
    NaN for an infinite x) may reach it."""
    g = torch.Generator().manual_seed(1)
    x, u = torch.randn(rows, 20, generator=g), torch.randn(8, 20, generator=g)
    u[:, 3] = -u[:, 3].abs() - 0.1
    x[0, 3] = float("inf")  # every hidden unit of row 0 is -inf before the ReLU
    v, b1, b2 = torch.randn(12, 8, generator=g), torch.randn(8, generator=g), torch.randn(12, generator=g)
    with env(EFFKERN_BACKEND=backend, EFFKERN_CPU_ISA=isa):
        y = low_rank_linear(x, u, v, b1, b2, "relu")
    assert y.isfinite().all()
    torch.testing.assert_close(y.double(), _torch_low_rank_linear(x, u, v, b1, b2, "relu", "none"), atol=1e-4,
                               rtol=1e-4)


@pytest.mark.parametrize(("backend", "isa"), BACKEND_ISAS, ids=IDS)
@pytest.mark.parametrize("out_act", ["none", "relu"])
def test_low_rank_linear_backward_through_nan_as_torch(backend, isa, out_act):
    """relu's backward keeps the gradient where its input is NaN (torch's threshold_backward), hidden and output."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(40, 20, generator=g)
    x[5] = float("nan")
    params = [torch.randn(8, 20, generator=g), torch.randn(12, 8, generator=g), torch.randn(8, generator=g),
              torch.randn(12, generator=g)]
    weight = torch.randn(40, 12, generator=g)
    grads = []
    for fn in (lambda *a: low_rank_linear(*a, "relu", out_act), lambda *a: _torch_low_rank_linear(*a, "relu", out_act)):
        leaves = [t.clone().requires_grad_() for t in (x, *params)]
        with env(EFFKERN_BACKEND=backend, EFFKERN_CPU_ISA=isa):
            out = fn(leaves[0], leaves[1], leaves[2], leaves[3], leaves[4])
            grads.append(torch.autograd.grad((out * weight).sum(), leaves))
    for got, expected in zip(*grads, strict=True):
        torch.testing.assert_close(got.double(), expected.double(), equal_nan=True, atol=1e-3, rtol=1e-4)


def _decode_inputs(s=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, 16, generator=g)
    kc, vc = torch.randn(2, 2, s, 16, generator=g), torch.randn(2, 2, s, 16, generator=g)
    return q, kc, vc, torch.tensor([s - 5, s // 2], dtype=torch.int32), torch.tensor([3, 0], dtype=torch.int32)


@pytest.mark.parametrize(("backend", "isa"), BACKEND_ISAS, ids=IDS)
@pytest.mark.parametrize("s", [64, 2048])  # 2048: the C++ kernel splits the context and merges the splits
def test_gqa_decode_special_values(backend, isa, s):
    if backend == "triton" and s > 64:
        pytest.skip("the interpreter's cost grows with the context; 64 covers the Triton masking")
    q, kc, vc, lens, start = _decode_inputs(s)
    with env(EFFKERN_BACKEND=backend, EFFKERN_CPU_ISA=isa):
        clean = gqa_decode(q, kc, vc, lens, kv_start=start)
        # padding rows (t >= seq_lens, t < kv_start) are never read
        dirty_k, dirty_v = kc.clone(), vc.clone()
        for cache in (dirty_k, dirty_v):
            cache[0, :, lens[0]:] = float("nan")
            cache[0, :, : start[0]] = float("inf")
            cache[1, :, lens[1]:] = float("nan")
        torch.testing.assert_close(gqa_decode(q, dirty_k, dirty_v, lens, kv_start=start), clean)
        # softcap=inf is the limit: no cap
        torch.testing.assert_close(gqa_decode(q, kc, vc, lens, kv_start=start, softcap=float("inf")), clean)
        # a NaN query head gives NaN for that head only
        nan_q = q.clone()
        nan_q[1, 2, 7] = float("nan")
        out = gqa_decode(nan_q, kc, vc, lens, kv_start=start)
        assert out[1, 2].isnan().all()
        keep = torch.ones(2, 4, dtype=torch.bool)
        keep[1, 2] = False
        torch.testing.assert_close(out[keep], clean[keep])
        # a NaN in a valid key row (late in the context: another split than the first) reaches its group
        nan_k = kc.clone()
        nan_k[0, 1, lens[0] - 2, 0] = float("nan")
        out = gqa_decode(q, nan_k, vc, lens, kv_start=start)
        assert out[0, 2:].isnan().all() and not out[0, :2].isnan().any() and not out[1].isnan().any()
        # a NaN in q_proj reaches the heads it projects
        proj = torch.eye(16).repeat(4, 1, 1)
        proj[3, 4, 4] = float("nan")
        out = gqa_decode(q, kc, vc, lens, kv_start=start, q_proj=proj)
        assert out[:, 3].isnan().all() and not out[:, :3].isnan().any()
        # an empty range gives zeros, never NaN
        out = gqa_decode(q, kc, vc, torch.tensor([4, 0], dtype=torch.int32),
                         kv_start=torch.tensor([4, 0], dtype=torch.int32))
        assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize(("backend", "isa"), BACKEND_ISAS, ids=IDS)
def test_nan_rows_stay_nan_and_alone(backend, isa):
    """residual_layer_norm, low_rank_attention and low_rank_embedding: a NaN reaches exactly what depends on it."""
    g = torch.Generator().manual_seed(0)
    u, z = torch.randn(3, 5, 24, generator=g), torch.randn(5, 24, generator=g)
    u[1, 2, 7] = float("nan")
    w_qkv, w_o = torch.randn(2, 24, 12, generator=g) / 5, torch.randn(2, 4, 24, generator=g) / 5
    emb_table = torch.randn(9, 3, generator=g)
    emb_table[4, 1] = float("nan")  # field 1's first row (offsets 0, 4)
    offsets, eu, emu = torch.tensor([0, 4]), torch.randn(2, 6, 3, generator=g), torch.randn(2, 6, generator=g)
    ids = torch.tensor([[1, 0], [2, 3]])
    with env(EFFKERN_BACKEND=backend, EFFKERN_CPU_ISA=isa):
        _, x = residual_layer_norm(u, z)
        attn = low_rank_attention(u[1:2], w_qkv, w_o, heads=2)
        emb = low_rank_embedding(ids, emb_table, offsets, eu, emu)
    rows_nan = x.isnan().any(-1)
    assert rows_nan[1, 2] and rows_nan.sum() == 1 and x[1, 2].isnan().all()
    assert attn[:, 0, 2].isnan().all()  # the NaN token's own output; softmax carries it to every query
    assert emb[0, 1].isnan().all() and not emb[0, 0].isnan().any() and not emb[1].isnan().any()


# ---- LayerNorm statistics -----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("backend", "isa"), BACKEND_ISAS, ids=IDS)
@pytest.mark.parametrize("d", [7, 1000, 4096])
@pytest.mark.parametrize("value", [1000.1, 9999.3, -1e4, 0.0])
def test_residual_layer_norm_constant_rows_are_exactly_zero(backend, isa, d, value):
    u = torch.full((2, d), value).requires_grad_()
    z = torch.zeros(d)
    dx = torch.randn(2, d, generator=torch.Generator().manual_seed(0))
    with env(EFFKERN_BACKEND=backend, EFFKERN_CPU_ISA=isa):
        h, x = residual_layer_norm(u, z)
        (du,) = torch.autograd.grad((x * dx).sum() + h.sum(), u)
    assert torch.equal(x, torch.zeros_like(x))
    ut = u.detach().double().requires_grad_()  # float64: torch's own fp32 variance of such rows is not exactly 0
    xt = F.layer_norm(ut + z.double(), (d,))
    (expected,) = torch.autograd.grad((xt * dx.double()).sum() + ut.sum(), ut)
    torch.testing.assert_close(du.double(), expected, rtol=1e-5, atol=1e-6 * expected.abs().max().item())


@pytest.mark.parametrize(("backend", "isa"), BACKEND_ISAS, ids=IDS)
@pytest.mark.parametrize("d", [7, 1000, 4096])
def test_residual_layer_norm_large_mean_rows_within_torch_error(backend, isa, d):
    g = torch.Generator().manual_seed(d)
    u = 1e4 + torch.randn(16, d, generator=g)
    z = torch.randn(d, generator=g)
    with env(EFFKERN_BACKEND=backend, EFFKERN_CPU_ISA=isa):
        h, x = residual_layer_norm(u, z)
    exact = F.layer_norm(h.double(), (d,))  # of the same fp32 h both computations normalise
    ours = (x.double() - exact).abs().max().item()
    torch_error = (F.layer_norm(h, (d,)).double() - exact).abs().max().item()
    assert ours <= 2 * torch_error, f"error {ours:.3g} vs torch's {torch_error:.3g}"


# ---- sharp softmax and long contexts against float64 ---------------------------------------------------------------

@pytest.mark.parametrize(("backend", "isa"), BACKEND_ISAS, ids=IDS)
def test_sharp_softmax_and_long_context_match_float64(backend, isa):
    s = 64 if backend == "triton" else 8192
    q, kc, vc, lens, start = _decode_inputs(s, seed=1)
    q = q * 30  # logits of several hundred: one key takes nearly all the weight
    lens = torch.tensor([s, s - 1000 if s > 1000 else s - 3], dtype=torch.int32)
    with env(EFFKERN_BACKEND=backend, EFFKERN_CPU_ISA=isa):
        out = gqa_decode(q, kc, vc, lens, kv_start=start)
        x = torch.randn(2, 3, 40, 24, generator=torch.Generator().manual_seed(2)) * 8
        w_qkv, w_o = torch.randn(2, 24, 12) / 2, torch.randn(2, 4, 24) / 2
        attn = low_rank_attention(x[0], w_qkv, w_o, heads=2)
    with env(EFFKERN_BACKEND="reference"):
        exact = gqa_decode(q.double(), kc.double(), vc.double(), lens, kv_start=start)
        attn_exact = low_rank_attention(x[0].double(), w_qkv.double(), w_o.double(), heads=2)
    torch.testing.assert_close(out.double(), exact, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(attn.double(), attn_exact, atol=1e-4 * attn_exact.abs().max().item(), rtol=1e-4)


# ---- float64 through the reference: gradcheck ----------------------------------------------------------------------

def _f64(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).requires_grad_()


@pytest.mark.parametrize("act", ["none", "relu", "gelu"])
@pytest.mark.parametrize("out_act", ["none", "relu"])
def test_gradcheck_low_rank_linear(act, out_act):
    args = (_f64(5, 7), _f64(3, 7, seed=1), _f64(4, 3, seed=2), _f64(3, seed=3), _f64(4, seed=4))
    assert torch.autograd.gradcheck(lambda x, u, v, b1, b2: low_rank_linear(x, u, v, b1, b2, act, out_act), args)


@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_gradcheck_low_rank_embedding(mode):
    ids = torch.tensor([[[0, -1], [2, 0]], [[3, 1], [-1, -1]]])
    offsets = torch.tensor([0, 4])
    args = (_f64(7, 3), _f64(2, 5, 3, seed=1), _f64(2, 5, seed=2))
    assert torch.autograd.gradcheck(lambda t, u, mu: low_rank_embedding(ids, t, offsets, u, mu, mode), args)


def test_gradcheck_residual_layer_norm_and_attention():
    assert torch.autograd.gradcheck(lambda u, z: residual_layer_norm(u, z), (_f64(2, 3, 6), _f64(3, 6, seed=1)))
    w_qkv, w_o = _f64(2, 6, 12, seed=2), _f64(2, 4, 6, seed=3)
    assert torch.autograd.gradcheck(lambda x, a, b: low_rank_attention(x, a, b, heads=2),
                                    (_f64(2, 3, 6, seed=4), w_qkv, w_o))
    assert torch.autograd.gradcheck(lambda u, z, a, b: low_rank_attention_block(u, z, a, b, heads=2),
                                    (_f64(2, 2, 3, 6, seed=5), _f64(2, 3, 6, seed=6), w_qkv, w_o))


def test_float64_decode_matches_float32():
    q, kc, vc, lens, start = _decode_inputs()
    kc64, vc64 = kc.double(), vc.double()
    kv_append(kc64, vc64, kc64[:, :, 0], vc64[:, :, 0], lens)
    kv_append(kc, vc, kc[:, :, 0].clone(), vc[:, :, 0].clone(), lens)
    out64 = gqa_decode(q.double(), kc64, vc64, lens + 1, kv_start=start)
    assert out64.dtype == torch.float64
    torch.testing.assert_close(out64.float(), gqa_decode(q, kc, vc, lens + 1, kv_start=start))


@requires_ext
def test_forcing_a_kernel_on_float64_is_a_clear_error():
    with env(EFFKERN_BACKEND="cpu"), pytest.raises(BackendUnavailableError, match="float64 runs on the reference"):
        low_rank_linear(_f64(2, 3), _f64(2, 3), _f64(4, 2))


# ---- argument types ------------------------------------------------------------------------------------------------

def test_numpy_heads_and_zero_head_dim():
    x, w_qkv, w_o = torch.randn(2, 3, 8), torch.randn(1, 8, 12), torch.randn(1, 4, 8)
    torch.testing.assert_close(low_rank_attention(x, w_qkv, w_o, heads=np.int64(2)),
                               low_rank_attention(x, w_qkv, w_o, heads=2))
    with pytest.raises(TypeError, match="heads must be an integer"):
        low_rank_attention(x, w_qkv, w_o, heads=2.0)
    q, kc = torch.randn(1, 2, 0), torch.randn(1, 1, 4, 0)
    with pytest.raises(ValueError, match="head dim D >= 1"):
        gqa_decode(q, kc, kc, torch.tensor([2]))


# ---- GPU: the error word (runs where a GPU is lent) ----------------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_kernels_report_bad_indices_without_a_sync(backend):
    if why_unavailable(backend, torch.device("cuda")) is not None:
        pytest.skip(why_unavailable(backend, torch.device("cuda")))
    from effkern.ops import check_device_errors

    dev = torch.device("cuda")
    q, kc, vc = torch.randn(2, 4, 16, device=dev), torch.randn(2, 2, 8, 16, device=dev), torch.randn(2, 2, 8, 16,
                                                                                                  device=dev)
    bad = torch.tensor([3, 10**8], dtype=torch.int32, device=dev)
    with env(EFFKERN_BACKEND=backend):
        torch.ops.effkern.gqa_decode(q, kc, vc, bad, None, None, None, None, 0.25, 0.0, 0, 0)
        with pytest.raises(ValueError, match="seq_lens must be within"):
            check_device_errors()
        check_device_errors()  # raised once, then cleared
        torch.ops.effkern.kv_append(kc, vc, kc[:, :, 0], vc[:, :, 0], bad, None, None, None, 0, 0)
        torch.cuda.synchronize()
        with pytest.raises(ValueError, match="slots must be within"):  # the next launch raises it
            torch.ops.effkern.gqa_decode(q, kc, vc, bad.clamp_max(8), None, None, None, None, 0.25, 0.0, 0, 0)
