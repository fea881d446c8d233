"""MIET's edge side of the wire: :class:`FeatureClient` asks a feature server (:mod:`~effkern.methods.miet.server`)
for the frozen backbone's features, retrying what a network or a restarting server breaks and counting the bytes
it moves; :func:`fetch_all` fetches a whole data set through a resumable on-disk cache; :class:`LocalServer` runs
a server in a subprocess for a flow given no ``--server``.

    with LocalServer() as url, FeatureClient(url) as client:
        sums = fetch_all(client, images, "runs/miet/features", layers=range(7))   # [n, N, d]
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import httpx
import torch
from tqdm.auto import tqdm

from effkern.methods.common.run import RunFileError, read_safetensors, write_safetensors
from effkern.methods.miet.model import check_layers
from effkern.methods.miet.protocol import decode_features, encode_images, format_layers, read_metadata

# failures a retry can cure: no connection yet (server starting or restarting), one dropped mid-exchange, a timeout
TRANSIENT = (httpx.NetworkError, httpx.TimeoutException, httpx.RemoteProtocolError)


class FeatureServerError(RuntimeError):
    """The server refused a request (``status`` 4xx, its ``detail`` in the message) or stayed unreachable or
    failing (``status`` the last 5xx, or None) through every retry."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


@dataclass
class WireStats:
    """Bytes one call moved: bodies exactly as sent and received (safetensors framing included), HTTP/1.1 request
    and status lines plus header fields as h11 writes them; ``attempts``: HTTP attempts the call took; ``images``:
    images whose features came back."""

    request_body: int = 0
    response_body: int = 0
    request_headers: int = 0
    response_headers: int = 0
    attempts: int = 0
    images: int = 0

    def add(self, other: WireStats) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


def _header_bytes(start_line: str, headers: httpx.Headers) -> int:
    return len(start_line) + 2 + sum(len(k) + len(v) + 4 for k, v in headers.raw) + 2


class FeatureClient:
    """A persistent HTTP client (keep-alive connections) for one feature server at ``url``.

    Transient failures (connection refused or reset, timeouts, 5xx) are retried ``retries`` times, sleeping
    ``backoff * 2**i`` seconds (at most ``max_backoff``) times a random factor in [0.5, 1.5) so that many clients
    do not retry in step; a 4xx is the request's fault and raises :class:`FeatureServerError` at once, with the
    server's detail. ``last`` holds the :class:`WireStats` of the latest call, ``total`` their sum (error answers
    included; bytes lost with a dropped connection are not known and not counted). ``transport``: httpx's (e.g. a
    ``MockTransport`` in tests; default: TCP)."""

    def __init__(self, url: str, timeout: float = 60.0, retries: int = 5, backoff: float = 0.5,
                 max_backoff: float = 8.0, transport: httpx.BaseTransport | None = None):
        if retries < 0 or backoff < 0:
            raise ValueError(f"retries and backoff must be >= 0, got {retries} and {backoff}")
        self.url = url.rstrip("/")
        self.retries, self.backoff, self.max_backoff = retries, backoff, max_backoff
        self._http = httpx.Client(base_url=self.url, timeout=timeout, transport=transport)
        self._rng = random.Random()
        # every call / the /features calls only (what the edge pays per image: no /health)
        self.last, self.total, self.features_total = WireStats(), WireStats(), WireStats()

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> FeatureClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _request(self, method: str, path: str, **kwargs) -> httpx.Response:
        stats, error, status = WireStats(), None, None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(self.max_backoff, self.backoff * 2 ** (attempt - 1)) * self._rng.uniform(0.5, 1.5))
            stats.attempts += 1
            try:
                response = self._http.request(method, path, **kwargs)
            except TRANSIENT as e:
                error, status = f"{type(e).__name__}: {e}", None
                continue
            request = response.request
            target = request.url.raw_path.decode("ascii")
            stats.request_body += len(request.content)
            stats.request_headers += _header_bytes(f"{method} {target} HTTP/1.1", request.headers)
            stats.response_body += len(response.content)
            stats.response_headers += _header_bytes(f"HTTP/1.1 {response.status_code} {response.reason_phrase}",
                                                    response.headers)
            if response.status_code < 400:
                self.last = stats
                self.total.add(stats)
                return response
            detail = _detail(response)
            if response.status_code < 500:
                self.last = stats
                self.total.add(stats)
                raise FeatureServerError(f"{self.url}{path} refused the request ({response.status_code}): {detail}",
                                         response.status_code)
            error, status = f"{response.status_code}: {detail}", response.status_code
        self.last = stats
        self.total.add(stats)
        raise FeatureServerError(f"{self.url}{path} failed {stats.attempts} times (retries={self.retries}); last: "
                                 f"{error}", status)

    def health(self) -> dict:
        """The server's /health: ``model``, ``weights_sha256``, ``image_shape`` [C, H, W], ``depth``,
        ``token_shape`` [N, d], ``layers``, ``dtypes``, ``limits`` (max_images, max_body_bytes)."""
        return self._request("GET", "/health").json()

    def features(self, images: torch.Tensor, layers: Sequence[int], reduce: bool = True,
                 dtype: str = "float32") -> torch.Tensor:
        """The backbone's features of uint8 ``images [n, C, H, W]`` at ``layers``: their sum ``[n, N, d]``
        (``reduce``) or stacked ``[n, len(layers), N, d]``, in ``dtype`` (float32 | float16) as sent."""
        body = encode_images(images)
        layers = tuple(sorted(layers))
        params = dict(layers=format_layers(layers), reduce=str(bool(reduce)).lower(), dtype=dtype)
        response = self._request("POST", "/features", content=body, params=params,
                                 headers={"content-type": "application/octet-stream"})
        features = decode_features(response.content)
        meta = read_metadata(response.content)
        if (meta.get("layers"), meta.get("reduce"), meta.get("dtype")) != tuple(params.values()) or \
                features.shape[0] != images.shape[0]:
            raise FeatureServerError(f"{self.url} answered features {list(features.shape)} with {meta} to a request "
                                     f"for {images.shape[0]} images with {params}")
        self.last.images = images.shape[0]
        self.features_total.add(self.last)
        self.total.images += images.shape[0]
        return features


def _detail(response: httpx.Response) -> str:
    try:
        return str(response.json()["detail"])
    except (ValueError, KeyError, TypeError):
        return response.text[:500] or response.reason_phrase


def fetch_all(client: FeatureClient, images: torch.Tensor, cache_dir: str | os.PathLike, layers: Sequence[int],
              batch_size: int = 64, dtype: str = "float32", progress: bool = True, reduce: bool = True) -> torch.Tensor:
    """The features of every uint8 image of ``images [n, C, H, W]`` (``[n, N, d]``, or ``[n, len(layers), N, d]``
    without ``reduce``), fetched ``batch_size`` images per request through an on-disk cache.

    Each batch's answer is written atomically to ``cache_dir/<settings>/<batch>.safetensors``, named by a hash of
    the request settings (the server's weights, ``layers``, ``reduce``, ``dtype``) and of the batch's pixels, so
    a killed run that restarts re-requests only the batches it has no file for, and another backbone or setting
    never reads these. A cached file that cannot be read (truncated, edited) raises :class:`RunFileError` naming it
    (delete it and it is fetched again): a cache that silently re-fetched would hide a disk that corrupts files.
    Bytes moved are counted in ``client.total``. Under ``accelerate launch`` only the main process writes files
    (:func:`write_safetensors`): fetch there first, then let the other processes read the filled cache."""
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"images must be uint8 [n, C, H, W], got {images.dtype} {list(images.shape)}")
    health = client.health()
    if list(images.shape[1:]) != health["image_shape"]:
        raise ValueError(f"images are [n, {', '.join(map(str, images.shape[1:]))}] but the server's backbone takes "
                         f"[n, {', '.join(map(str, health['image_shape']))}]")
    max_images = health["limits"]["max_images"]
    if not 1 <= batch_size <= max_images:
        raise ValueError(f"batch_size must be in [1, {max_images}] (the server's max_images), got {batch_size}")
    layers = check_layers(layers, health["depth"])
    settings = json.dumps(dict(weights=health["weights_sha256"], layers=layers, reduce=reduce, dtype=dtype))
    folder = Path(cache_dir) / hashlib.sha256(settings.encode()).hexdigest()[:16]
    chunks, fetched = [], 0
    bar = tqdm(total=len(images), unit="img", desc="features", disable=not progress)
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size].contiguous()
        digest = hashlib.sha256(str(list(batch.shape)).encode() + batch.numpy().tobytes()).hexdigest()[:24]
        path = folder / f"{digest}.safetensors"
        if path.exists():
            chunk = read_safetensors(path).get("features")
            if chunk is None or len(chunk) != len(batch):
                raise RunFileError(f"{path} holds no features for its {len(batch)} images; delete it (it is fetched "
                                   "again)")
        else:
            chunk = client.features(batch, layers, reduce=reduce, dtype=dtype)
            write_safetensors(path, {"features": chunk}, metadata=dict(settings=settings))
            fetched += 1
        chunks.append(chunk)
        bar.update(len(batch))
        bar.set_postfix(fetched=fetched, cached=len(chunks) - fetched, MB=f"{client.total.response_body / 1e6:.1f}")
    bar.close()
    return torch.cat(chunks)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on now (the OS picks it; another process could take it before it is used)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class LocalServer:
    """A feature server in a subprocess (``effkern miet serve``) on ``host:port`` (``port=0``: a free port), as a
    context manager yielding its URL. ``settings``: the server's options (``backbone``, ``max_images``,
    ``max_body_mb``, ``max_pending``, ``workers``, ``threads``, ``log_level``). Startup waits until /health answers,
    at most ``startup_timeout`` seconds; a server that dies first raises RuntimeError with the end of its output.
    :meth:`stop` then :meth:`start` restarts it on the same port."""

    OPTIONS = ("backbone", "max_images", "max_body_mb", "max_pending", "workers", "threads", "log_level")

    def __init__(self, port: int = 0, host: str = "127.0.0.1", startup_timeout: float = 120.0, **settings):
        unknown = set(settings) - set(self.OPTIONS)
        if unknown:
            raise TypeError(f"unknown server settings {sorted(unknown)}; known: {list(self.OPTIONS)}")
        self.host, self.port = host, port or free_port(host)
        self.startup_timeout, self.settings = startup_timeout, settings
        self.url = f"http://{host}:{self.port}"
        self._proc: subprocess.Popen | None = None
        self._log = None

    def start(self) -> str:
        """Start the server and wait for its /health; returns its URL."""
        if self._proc is not None:
            raise RuntimeError(f"the server at {self.url} is running already")
        cmd = [sys.executable, "-m", "effkern", "miet", "serve", "--host", self.host, "--port", str(self.port)]
        for key, value in self.settings.items():
            if value is not None:
                cmd += [f"--{key.replace('_', '-')}", str(value)]
        env = dict(os.environ)  # the child imports this effkern even when it is not installed
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[3]),
                                                          env.get("PYTHONPATH")]))
        self._log = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self._proc.poll() is not None:
                rc, tail = self._proc.returncode, self._tail()
                self.stop()
                raise RuntimeError(f"the feature server ({' '.join(cmd)}) exited with code {rc} before answering "
                                   f"/health; its output ends:\n{tail}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200:
                    return self.url
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                tail = self._tail()
                self.stop()
                raise TimeoutError(f"the feature server at {self.url} did not answer /health within "
                                   f"{self.startup_timeout} s; its output ends:\n{tail}")
            time.sleep(0.1)

    def _tail(self, chars: int = 3000) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-chars:]

    def stop(self) -> None:
        """Terminate the server (SIGTERM, then SIGKILL after 10 s) and wait for it."""
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
