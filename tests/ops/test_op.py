"""effkern.ops._op: the entry points reach the implementation directly only in plain eager code (autograd through
their own Function); everything else (the op called with grad-requiring inputs, fake tensors, dispatch modes, jit
tracing, torch.export) goes through the registered custom op."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from effkern.nn import LowRankLinear
from effkern.ops import kv_append, low_rank_linear
from effkern.ops._backend import extension, use_backend
from effkern.ops._op import FUNCTION, IMPL, route

lrl = importlib.import_module("effkern.ops.low_rank_linear")  # the module (the package exports the function)


def inputs(requires_grad=False):
    torch.manual_seed(0)
    ts = [torch.randn(5, 8), torch.randn(3, 8), torch.randn(3), torch.randn(6, 3), torch.randn(6)]
    return [t.requires_grad_(requires_grad) for t in ts]


class Counting(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def op_calls(monkeypatch):
    """Counts the calls that reach the registered custom op of low_rank_linear."""
    calls = []
    registered = lrl.op.registered

    def counted(*args):
        calls.append(args)
        return registered(*args)

    monkeypatch.setattr(lrl.op, "registered", counted)
    return calls


def test_plain_eager_calls_the_implementation_directly(op_calls):
    x, u, b1, v, b2 = inputs()
    y = lrl.op(x, u, b1, v, b2, 0, 1)
    assert op_calls == []
    torch.testing.assert_close(y, lrl.reference(x, u, b1, v, b2, 0, 1))
    xg, ug, b1g, vg, b2g = inputs(requires_grad=True)
    low_rank_linear(xg, ug, vg, b1g, b2g).sum().backward()  # the entry's Function runs the op with grad off
    assert op_calls == [] and ug.grad is not None


def test_the_op_itself_with_grad_goes_through_its_autograd(op_calls):
    x, u, b1, v, b2 = inputs(requires_grad=True)
    y = lrl.op(x, u, b1, v, b2, 0, 0)
    assert len(op_calls) == 1 and y.grad_fn is not None
    (du,) = torch.autograd.grad(y.sum(), u)
    with torch.no_grad():
        assert route([u]) == IMPL  # grad off: no autograd needed...
    assert route([u]) == FUNCTION  # ...but with grad on, an input requiring it needs autograd
    torch.testing.assert_close(du, torch.func.grad(lambda w: lrl.reference(x, w, b1, v, b2, 0, 0).sum())(u))


def test_the_profiler_sees_the_ops_by_name():
    """Under torch.profiler the entry points take the registered op, so a profile attributes the time to
    effkern::low_rank_linear and its backward instead of leaving it unnamed."""
    x, u, b1, v, b2 = inputs(requires_grad=True)
    with torch.profiler.profile() as prof:
        low_rank_linear(x, u, v, b1, b2).sum().backward()
    names = {event.key for event in prof.key_averages()}
    assert {"effkern::low_rank_linear", "effkern::low_rank_linear_bwd"} <= names


def test_modes_and_fake_tensors_go_through_the_op(op_calls):
    x, u, b1, v, b2 = inputs()
    with Counting() as mode:
        lrl.op(x, u, b1, v, b2, 0, 0)
    assert len(op_calls) == 1 and "effkern.low_rank_linear.default" in mode.ops
    with FakeTensorMode() as fake:
        y = lrl.op(*(fake.from_tensor(t) for t in (x, u, b1, v, b2)), 0, 0)
    assert len(op_calls) == 2 and y.shape == (5, 6)


def test_modules_with_parameters_take_the_direct_route(op_calls):
    layer = LowRankLinear(8, 6, 3, out_activation="relu")
    x = torch.randn(5, 8)
    with torch.no_grad():
        y = layer(x)
    layer(x).sum().backward()
    assert op_calls == [] and layer.u.grad is not None
    torch.testing.assert_close(y, lrl.reference(x, layer.u, layer.b1, layer.v, layer.b2, 0, 1))


@pytest.mark.filterwarnings("ignore:`torch.jit.trace", "ignore::torch.jit.TracerWarning")  # deprecated in 2.13+
def test_jit_trace_and_export_record_the_op():
    layer = LowRankLinear(8, 6, 3)
    x = torch.randn(5, 8)
    traced = torch.jit.trace(layer, x)
    assert "effkern::low_rank_linear" in str(traced.graph)
    exported = torch.export.export(layer, (x,))
    assert "effkern.low_rank_linear" in str(exported.graph)
    y = exported.module()(x)
    assert y.requires_grad
    torch.testing.assert_close(y, layer(x))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_a_mutating_op_called_directly_bumps_the_version_counters(backend):
    """kv_append writes its caches in place; called directly (the IMPL route), it bumps their version counters as
    the registered op would, so autograd still refuses a backward through a cache overwritten since it was saved."""
    if backend == "cpu" and extension() is None:
        pytest.skip("effkern._C is not built")
    k_cache, v_cache = torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 4, 8)
    w = torch.ones(8, requires_grad=True)
    y = (k_cache * w).sum()  # saves k_cache for w's gradient
    before = (k_cache._version, v_cache._version)
    assert route([k_cache, v_cache]) == IMPL
    with use_backend(backend):
        kv_append(k_cache, v_cache, torch.ones(1, 2, 8), torch.ones(1, 2, 8), torch.tensor([1]))
    assert k_cache._version > before[0] and v_cache._version > before[1] and k_cache[0, :, 1].eq(1).all()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()
