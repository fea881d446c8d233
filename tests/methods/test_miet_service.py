"""MIET's feature service: the server's answers equal the in-process features, every malformed request gets its 4xx
and leaves the server serving, the client retries what is transient and only that, and fetch_all resumes."""

from __future__ import annotations

import hashlib
import socket
import threading

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save

from effkern.methods.backbone.model import PACKAGED_PATH, load_backbone
from effkern.methods.common.run import RunFileError
from effkern.methods.miet.client import FeatureClient, FeatureServerError, LocalServer, fetch_all, free_port
from effkern.methods.miet.model import gather_features
from effkern.methods.miet.protocol import (
    ProtocolError,
    decode_features,
    decode_images,
    encode_features,
    encode_images,
    read_metadata,
)
from effkern.methods.miet.server import create_app

MAX_IMAGES, MAX_BODY = 16, 64 * 1024  # 16 images are 16 KiB: too many images is reachable below the body limit
ALL = list(range(7))


def images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 1, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def vit():
    return load_backbone()


@pytest.fixture(scope="module")
def app_client():
    with TestClient(create_app(max_images=MAX_IMAGES, max_body_bytes=MAX_BODY)) as client:
        yield client


@pytest.fixture(scope="module")
def live():
    server = LocalServer(max_images=MAX_IMAGES, max_body_mb=MAX_BODY / 2**20, startup_timeout=60)
    with server:
        yield server


def assert_good(post, vit) -> None:
    """A good request right after a bad one is answered with the right features."""
    x = images(3, seed=7)
    response = post("/features?layers=0,6", content=encode_images(x))
    assert response.status_code == 200, response.text
    torch.testing.assert_close(decode_features(response.content), gather_features(vit, x, [0, 6]), rtol=1e-6,
                               atol=1e-6)


# ---- the wire format alone ------------------------------------------------------------------------------------------

def test_protocol_round_trip():
    x = images(5)
    assert torch.equal(decode_images(encode_images(x[:, :, ::2, ::2]), (1, 16, 16), 5), x[:, :, ::2, ::2])
    feats = torch.randn(5, 7, 65, 128)
    body = encode_features(feats, ALL, "float16")
    assert torch.equal(decode_features(body), feats.half())
    assert read_metadata(body) == dict(layers="0,1,2,3,4,5,6", reduce="false", dtype="float16")
    with pytest.raises(ProtocolError, match="at most max_images=4") as e:
        decode_images(encode_images(x), (1, 32, 32), 4)
    assert e.value.status == 413
    with pytest.raises(ValueError, match="uint8"):
        encode_images(x.float())


# ---- the server in process (TestClient) -----------------------------------------------------------------------------

def test_health(app_client):
    health = app_client.get("/health").json()
    assert health["status"] == "ok" and health["model"] == "vit-mini-32"
    assert health["image_shape"] == [1, 32, 32] and health["depth"] == 6 and health["token_shape"] == [65, 128]
    assert health["layers"] == ALL and health["limits"] == dict(max_images=MAX_IMAGES, max_body_bytes=MAX_BODY,
                                                                max_pending=32)
    assert health["weights_sha256"] == hashlib.sha256(PACKAGED_PATH.read_bytes()).hexdigest()


@pytest.mark.parametrize("layers", [None, [6], [0, 2, 5]])
@pytest.mark.parametrize("reduce", [True, False])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_features_equal_in_process(app_client, vit, layers, reduce, dtype):
    x = images(5, seed=1)
    query = f"reduce={str(reduce).lower()}&dtype={dtype}" + (f"&layers={','.join(map(str, layers))}" if layers else "")
    response = app_client.post(f"/features?{query}", content=encode_images(x))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    got, ref = decode_features(response.content), gather_features(vit, x, layers or ALL, reduce=reduce)
    assert got.shape == ((5, 65, 128) if reduce else (5, len(layers or ALL), 65, 128))
    if dtype == "float32":
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    else:  # the fp32 features rounded once to fp16
        assert got.dtype == torch.float16
        torch.testing.assert_close(got.float(), ref, rtol=2**-11, atol=1e-4)
        assert (got.float() - ref).abs().max() > 0  # a real rounding happened, not fp32 sent as fp16's name


BAD = [  # (body, query, status, words in the detail)
    (b"these are not tensors", "", 400, "not a safetensors"),
    (encode_images(images(2))[:-5], "", 400, "not a safetensors"),
    (save({"pixels": images(2)}), "", 400, "'images'"),
    (save({"images": images(2), "labels": torch.zeros(2)}), "", 400, "exactly one tensor"),
    (save({"images": images(2).float()}), "", 422, "uint8"),
    (save({"images": torch.zeros(2, 3, 32, 32, dtype=torch.uint8)}), "", 422, "shape"),
    (save({"images": torch.zeros(2, 32, 32, dtype=torch.uint8)}), "", 422, "shape"),
    (save({"images": torch.zeros(0, 1, 32, 32, dtype=torch.uint8)}), "", 422, "n >= 1"),
    (encode_images(images(MAX_IMAGES + 1)), "", 413, f"max_images={MAX_IMAGES}"),
    (encode_images(images(70)), "", 413, f"max_body_bytes={MAX_BODY}"),
    (encode_images(images(2)), "?layers=7", 422, "[0, 6]"),
    (encode_images(images(2)), "?layers=1,1", 422, "distinct"),
    (encode_images(images(2)), "?layers=a,b", 422, "comma-separated integers"),
    (encode_images(images(2)), "?dtype=int8", 422, "float16"),
    (encode_images(images(2)), "?reduce=maybe", 422, "reduce"),
]


@pytest.mark.parametrize("body,query,status,words", BAD, ids=[b[3] + b[1] for b in BAD])
def test_bad_request_then_good(app_client, vit, body, query, status, words):
    response = app_client.post(f"/features{query}", content=body)
    assert response.status_code == status, response.text
    assert words in str(response.json()["detail"])
    assert_good(app_client.post, vit)


# ---- the server over TCP (a subprocess) -----------------------------------------------------------------------------

def raw_exchange(server: LocalServer, data: bytes, close_after_send: bool = False) -> bytes:
    """Send raw bytes to the server; what it answers until it closes or goes quiet (nothing if we hang up)."""
    with socket.create_connection((server.host, server.port), timeout=10) as s:
        s.sendall(data)
        if close_after_send:
            return b""
        answer = b""  # no half-close: uvicorn takes one for a client gone and would drop the answer
        try:
            while chunk := s.recv(65536):
                answer += chunk
        except (ConnectionResetError, TimeoutError):
            pass
        return answer


def request_head(path: str, length: int) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


def test_oversized_bodies(live, vit):
    """A Content-Length over the limit is refused before the body is read (uvicorn drops the body the client still
    sends, and the connection serves on); with no Content-Length (chunked) the limit is enforced while reading."""
    def chunks():
        for _ in range(40):
            yield b"\0" * 8192

    with httpx.Client(base_url=live.url) as http:
        response = http.post("/features", content=encode_images(images(100)))
        assert response.status_code == 413 and "request body of 102" in response.json()["detail"]
        assert_good(http.post, vit)
        response = http.post("/features", content=chunks())
        assert response.request.headers.get("transfer-encoding") == "chunked"
        assert response.status_code == 413 and "streamed past it" in response.json()["detail"]
        assert_good(http.post, vit)


def test_lying_content_length(live, vit):
    """Content-Length says 1000 bytes and 70 KiB follow: the server reads 1000 (not a safetensors blob: 400), takes
    the rest for a malformed next request (uvicorn's 400 and a closed connection) and serves on."""
    answer = raw_exchange(live, request_head("/features", 1000) + b"\1" * (70 * 1024))
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    assert b"not a safetensors blob" in answer
    with httpx.Client(base_url=live.url) as http:
        assert_good(http.post, vit)


@pytest.mark.parametrize("sent", ["part of the body", "the whole body"])
def test_client_hangs_up(live, vit, sent):
    body = encode_images(images(MAX_IMAGES))
    data = request_head("/features?reduce=false", len(body)) + (body[:5000] if sent == "part of the body" else body)
    raw_exchange(live, data, close_after_send=True)
    with httpx.Client(base_url=live.url) as http:
        assert_good(http.post, vit)
        assert http.get("/health").json()["status"] == "ok"


def test_client_features_and_bytes(live, vit):
    x = images(6, seed=3)
    with FeatureClient(live.url) as client:
        for layers, reduce, dtype in [(ALL, True, "float32"), (ALL, False, "float16"), ([6], True, "float32")]:
            got = client.features(x, layers, reduce=reduce, dtype=dtype)
            ref = gather_features(vit, x, layers, reduce=reduce)
            # the subprocess runs the same kernels on the same thread count; fp16 is the same fp32 rounded once
            torch.testing.assert_close(got.float(), ref, rtol=1e-6 if dtype == "float32" else 2**-11,
                                       atol=1e-6 if dtype == "float32" else 1e-4)
            assert client.last.request_body == len(encode_images(x))
            assert client.last.response_body == len(encode_features(ref, layers, dtype))
            assert client.last.attempts == 1 and client.last.request_headers > 0
        with pytest.raises(FeatureServerError, match=f"413.*max_images={MAX_IMAGES}") as e:
            client.features(images(MAX_IMAGES + 1), ALL)
        assert e.value.status == 413 and client.last.attempts == 1  # a 4xx is never retried


def test_client_retries_5xx_not_4xx():
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.url.path)
        if len(calls) < 3:
            return httpx.Response(503, json={"detail": "warming up"})
        return httpx.Response(422, json={"detail": "layers must be distinct"})

    client = FeatureClient("http://mock", retries=5, backoff=0.001, transport=httpx.MockTransport(handler))
    with pytest.raises(FeatureServerError, match="422.*layers must be distinct"):
        client.features(images(1), ALL)
    assert len(calls) == 3 and client.last.attempts == 3

    always_down = FeatureClient("http://mock", retries=2, backoff=0.001,
                                transport=httpx.MockTransport(lambda r: httpx.Response(503, text="busy")))
    with pytest.raises(FeatureServerError, match="failed 3 times.*503: busy") as e:
        always_down.health()
    assert e.value.status == 503


def test_client_gives_up_on_no_server():
    with FeatureClient(f"http://127.0.0.1:{free_port()}", retries=2, backoff=0.001) as client:
        with pytest.raises(FeatureServerError, match="failed 3 times.*ConnectError") as e:
            client.health()
    assert e.value.status is None and client.last.attempts == 3


def test_client_retry_survives_a_server_restart(live, vit):
    x = images(4, seed=5)
    with FeatureClient(live.url, retries=12, backoff=0.2, max_backoff=1.0) as client:
        client.health()  # a kept-alive connection that the restart will break
        live.stop()
        restart = threading.Thread(target=live.start)
        restart.start()  # the client's first attempts find nobody listening and back off
        try:
            got = client.features(x, ALL)
        finally:
            restart.join()
        assert client.last.attempts > 1
        torch.testing.assert_close(got, gather_features(vit, x, ALL), rtol=1e-6, atol=1e-6)


def test_fetch_all_resumes(live, vit, tmp_path, monkeypatch):
    x = images(37, seed=11)  # 5 batches of 8, the last one of 5
    client = FeatureClient(live.url)
    real, calls = client.features, []

    def counted(batch, *args, fail_after=None, **kwargs):
        if fail_after is not None and len(calls) == fail_after:
            raise RuntimeError("killed")
        calls.append(len(batch))
        return real(batch, *args, **kwargs)

    monkeypatch.setattr(client, "features", lambda *a, **k: counted(*a, fail_after=2, **k))
    with pytest.raises(RuntimeError, match="killed"):
        fetch_all(client, x, tmp_path, ALL, batch_size=8, progress=False)
    assert calls == [8, 8]
    monkeypatch.setattr(client, "features", counted)
    got = fetch_all(client, x, tmp_path, ALL, batch_size=8, progress=False)
    assert calls == [8, 8, 8, 8, 5]  # only the three missing batches were requested
    torch.testing.assert_close(got, gather_features(vit, x, ALL), rtol=1e-6, atol=1e-6)
    assert torch.equal(fetch_all(client, x, tmp_path, ALL, batch_size=8, progress=False), got)
    assert len(calls) == 5  # everything cached now

    chunk = sorted(tmp_path.rglob("*.safetensors"))[2]
    chunk.write_bytes(chunk.read_bytes()[:100])  # a half-written file (not one write_safetensors leaves)
    with pytest.raises(RunFileError, match=chunk.name):
        fetch_all(client, x, tmp_path, ALL, batch_size=8, progress=False)
    chunk.unlink()
    assert torch.equal(fetch_all(client, x, tmp_path, ALL, batch_size=8, progress=False), got)
    assert len(calls) == 6  # the deleted batch alone was fetched again

    half = fetch_all(client, x, tmp_path, ALL, batch_size=8, dtype="float16", progress=False)
    assert half.dtype == torch.float16 and len(calls) == 11  # another setting never reads those files
    with pytest.raises(ValueError, match="batch_size"):
        fetch_all(client, x, tmp_path, ALL, batch_size=MAX_IMAGES + 1, progress=False)
    client.close()


def test_local_server_reports_a_dying_server(tmp_path):
    with pytest.raises(RuntimeError, match=r"(?s)exited with code 2.*no such weights file"):
        LocalServer(backbone=tmp_path / "missing.safetensors", startup_timeout=60).start()


def test_busy_server_answers_503_and_the_client_retries(vit):
    """Past max_pending requests held at once the server sheds load (503 + Retry-After) instead of queueing without
    bound; the client's retries turn that into delay, not failure."""
    x = images(MAX_IMAGES, seed=5)
    expected = gather_features(vit, x, ALL)
    with LocalServer(max_images=MAX_IMAGES, max_pending=1, startup_timeout=60) as url:
        statuses, answers, errors = [], [], []

        def no_retry():
            for _ in range(10):
                statuses.append(httpx.post(f"{url}/features", content=encode_images(x), timeout=60).status_code)

        def retrying():
            try:
                with FeatureClient(url, retries=20, backoff=0.05) as client:
                    answers.extend(client.features(x, ALL) for _ in range(5))
            except Exception as e:  # noqa: BLE001 (every failure counts)
                errors.append(repr(e))

        threads = [threading.Thread(target=no_retry) for _ in range(4)]
        threads += [threading.Thread(target=retrying) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert set(statuses) == {200, 503} and not errors and len(answers) == 20
        for got in answers:
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
