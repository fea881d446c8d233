"""MIET's edge side: the edge network starts as a probe on the summed feature, the flow resumes a killed run from
its feature cache, the wire carries about k + 1 times fewer bytes than every feature would, and the server takes
8 concurrent clients without an error."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest
import torch
import torch.nn.functional as F
from helpers import requires_ext

from effkern.methods.backbone import load_backbone
from effkern.methods.miet.client import FeatureClient, LocalServer
from effkern.methods.miet.config import MIETConfig
from effkern.methods.miet.flow import run
from effkern.methods.miet.model import EdgeNetwork, check_layers, gather_features

pytestmark = requires_ext


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 1, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def server():
    with LocalServer(startup_timeout=60) as url:
        yield url


def test_edge_network_starts_as_a_probe_on_the_normalised_sum():
    vit = load_backbone()
    s = gather_features(vit, _images(4), range(7))
    edge = EdgeNetwork(128, 5, blocks=2, num_networks=3)
    edge.head_weight.data.normal_()
    expected = F.layer_norm(s[:, 0], (128,)) @ edge.head_weight + edge.head_bias[:, None]
    torch.testing.assert_close(edge([s]), expected)  # W_o = 0: the LSA blocks add nothing yet
    edge([s]).square().sum().backward()
    assert all(p.grad is not None for p in edge.parameters())


def test_gather_features_against_timm():
    """The sum and the stack against timm's own computation: ``forward_features`` (the last block's output, normed)
    and ``forward_intermediates`` (every block's output)."""
    from effkern.methods.backbone import normalize

    vit, x = load_backbone(), _images(3)
    torch.testing.assert_close(vit.norm(gather_features(vit, x, [6])), vit.forward_features(normalize(x)))
    _, blocks = vit.forward_intermediates(normalize(x), norm=False, output_fmt="NLC", return_prefix_tokens=True)
    blocks = [torch.cat([prefix, tokens], 1) for tokens, prefix in blocks]  # z_1 .. z_6
    torch.testing.assert_close(gather_features(vit, x, [2, 4, 5]), blocks[1] + blocks[3] + blocks[4])
    stacked = gather_features(vit, x, range(1, 7), reduce=False)
    torch.testing.assert_close(stacked, torch.stack(blocks, 1))
    torch.testing.assert_close(gather_features(vit, x, range(7)) - stacked.sum(1),
                               gather_features(vit, x, [0]), rtol=1e-4, atol=1e-4)


def test_layers_are_checked():
    assert check_layers([6, 0, 3], 6) == (0, 3, 6)
    for bad in ([], [7], [-1], [1, 1]):
        with pytest.raises(ValueError, match="layers must be distinct indices"):
            check_layers(bad, 6)


def test_killed_run_resumes_from_its_feature_cache(server, tmp_path, monkeypatch):
    cfg = MIETConfig.preset("smoke", server=server, out=str(tmp_path), progress=False, fetch_batch=200)
    calls, real = [], FeatureClient.features

    def dies_after_three(self, *args, **kwargs):
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed mid-fetch
        calls.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(FeatureClient, "features", dies_after_three)
    with pytest.raises(KeyboardInterrupt):
        run(cfg)
    cached = list((tmp_path / "features").rglob("*.safetensors"))
    assert len(cached) == 3
    monkeypatch.setattr(FeatureClient, "features", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    rows = run(cfg)
    requests = len(calls) - 3  # after the restart: only what the cache lacks
    total = len(list((tmp_path / "features").rglob("*.safetensors")))
    assert requests == total - 3 > 0
    row = rows[0]
    assert row["method"] == "miet" and row["variant"] == "float32" and 0 < row["accuracy"] <= 1
    # the bytes of the run's requests after the restart: a [65, 128] fp32 sum per image, plus framing
    assert 65 * 128 * 4 <= row["wire_response_body_per_image"] < 65 * 128 * 4 * 1.01
    assert 32 * 32 <= row["wire_request_body_per_image"] < 32 * 32 * 1.05  # the uint8 image, framing included


def test_wire_bytes_sum_vs_every_feature(server):
    """At the same dtype the sum of k + 1 features costs about 1 / (k + 1) of sending each of them (framing
    included): the issue's bar is 0.9 k times fewer bytes."""
    with FeatureClient(server) as client:
        for dtype in ("float32", "float16"):
            client.features(_images(32), range(7), reduce=True, dtype=dtype)
            summed = client.last.response_body
            client.features(_images(32), range(7), reduce=False, dtype=dtype)
            every = client.last.response_body
            assert every / summed >= 0.9 * 6 and every / summed <= 7, (dtype, every, summed)


def test_eight_concurrent_clients_get_every_answer_right(server):
    vit = load_backbone()
    x = _images(4, seed=3)
    expected = gather_features(vit, x, range(7))
    errors, done = [], []

    def client_loop():
        try:
            with FeatureClient(server, timeout=60, retries=0) as client:
                for _ in range(50):
                    torch.testing.assert_close(client.features(x, range(7)), expected, rtol=1e-6, atol=1e-6)
                    done.append(1)
        except Exception as e:  # noqa: BLE001 (every failure counts)
            errors.append(repr(e))

    threads = [threading.Thread(target=client_loop) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and len(done) == 400, errors[:3]


def test_server_imports_no_training_code():
    """No flow, trainer, fine-tuning library or other method: the backbone's model, MIET's model and protocol, the
    shared plumbing (effkern.methods.common) only."""
    code = ("import sys, effkern.methods.miet.server; print(sorted(m for m in sys.modules if m in ('peft', "
            "'accelerate', 'transformers') or m.startswith(('effkern.methods.last', 'effkern.methods.dtl')) or "
            "(m.startswith('effkern.methods.') and m.endswith(('.flow', '.train', '.client')) "
            "and '.common.' not in m)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
