"""MIET's wire format between the cloud's feature server (:mod:`~effkern.methods.miet.server`) and the edge's
client (:mod:`~effkern.methods.miet.client`); no web framework here, both sides import it.

- Request body: a safetensors blob holding one tensor ``images``, uint8 ``[n, C, H, W]``.
- Query: ``layers`` (comma-separated indices into ``[z_0, ..., z_depth]``), ``reduce`` (true: their sum, MIET's
  payload), ``dtype`` (``float32`` | ``float16``).
- Response body: a safetensors blob holding one tensor ``features``: ``[n, N, d]`` (reduced) or
  ``[n, len(layers), N, d]`` (unreduced), in ``dtype``; the header's metadata repeats ``layers``, ``reduce`` and
  ``dtype`` so a response can be checked against what was asked.

Every malformed payload raises :class:`ProtocolError` with the HTTP status the server answers it with.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence

import torch
from safetensors.torch import load, save

from effkern.methods.miet.model import check_layers

DTYPES = {"float32": torch.float32, "float16": torch.float16}
IMAGES_KEY, FEATURES_KEY = "images", "features"


class ProtocolError(ValueError):
    """A payload or query that breaks the wire format; ``status`` is the HTTP status the server answers with
    (400 unreadable, 413 too large, 422 well-formed but wrong)."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


def _load(body: bytes, what: str) -> dict[str, torch.Tensor]:
    if not isinstance(body, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"{what} must be bytes, got {type(body).__name__}", 400)
    try:
        return load(bytes(body))
    except Exception as e:  # untrusted bytes: SafetensorError, KeyError (a dtype torch lacks), ...
        raise ProtocolError(f"{what} is not a safetensors blob ({type(e).__name__}: {e})", 400) from None


def _only(tensors: dict[str, torch.Tensor], key: str, what: str) -> torch.Tensor:
    if set(tensors) != {key}:
        raise ProtocolError(f"{what} must hold exactly one tensor named {key!r}, got {sorted(tensors)}", 400)
    return tensors[key]


def encode_images(images: torch.Tensor) -> bytes:
    """The request body for uint8 ``images [n, C, H, W]`` (CPU, any strides)."""
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError("images must be a uint8 tensor [n, C, H, W], got "
                         f"{getattr(images, 'dtype', type(images).__name__)} {tuple(getattr(images, 'shape', ()))}")
    return save({IMAGES_KEY: images.detach().cpu().contiguous()})


def decode_images(body: bytes, expected_shape: Sequence[int], max_images: int) -> torch.Tensor:
    """The uint8 ``images [n, C, H, W]`` of a request body; :class:`ProtocolError` when it is not safetensors (400),
    lacks ``images`` or holds other tensors (400), has the wrong dtype or shape (422: ``[C, H, W]`` must equal
    ``expected_shape``, ``n >= 1``) or more than ``max_images`` images (413)."""
    images = _only(_load(body, "request body"), IMAGES_KEY, "request body")
    if images.dtype != torch.uint8:
        raise ProtocolError(f"images must be uint8 (raw pixels), got {images.dtype}")
    expected = tuple(expected_shape)
    if images.dim() != 4 or tuple(images.shape[1:]) != expected or images.shape[0] < 1:
        raise ProtocolError(f"images must have shape [n >= 1, {', '.join(map(str, expected))}] "
                            f"([n, C, H, W]), got {list(images.shape)}")
    if images.shape[0] > max_images:
        raise ProtocolError(f"{images.shape[0]} images in one request, the server takes at most max_images="
                            f"{max_images}: send smaller batches", 413)
    return images


def parse_layers(text: str | None, depth: int) -> tuple[int, ...]:
    """The ``layers`` query (``"0,1,6"``; None or empty: every layer ``0..depth``) as a sorted tuple;
    :class:`ProtocolError` (422) naming it otherwise."""
    if text is None or not text.strip():
        return tuple(range(depth + 1))
    try:
        picked = [int(v) for v in text.split(",")]
    except ValueError:
        raise ProtocolError(f"layers must be comma-separated integers in [0, {depth}], got {text!r}") from None
    try:
        return check_layers(picked, depth)
    except ValueError as e:
        raise ProtocolError(str(e)) from None


def format_layers(layers: Sequence[int]) -> str:
    return ",".join(str(int(i)) for i in layers)


def check_dtype(dtype: str) -> torch.dtype:
    """The torch dtype of a wire dtype name; :class:`ProtocolError` (422) naming the choices otherwise."""
    if dtype not in DTYPES:
        raise ProtocolError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def encode_features(features: torch.Tensor, layers: Sequence[int], dtype: str = "float32") -> bytes:
    """The response body for ``features`` (``[n, N, d]`` summed over ``layers`` or ``[n, len(layers), N, d]``),
    cast to ``dtype``; the metadata records ``layers``, ``reduce`` (from the rank) and ``dtype``."""
    if features.dim() not in (3, 4) or (features.dim() == 4 and features.shape[1] != len(layers)):
        raise ValueError(f"features must be [n, N, d] or [n, len(layers)={len(layers)}, N, d], got "
                         f"{list(features.shape)}")
    meta = dict(layers=format_layers(layers), reduce=str(features.dim() == 3).lower(), dtype=dtype)
    return save({FEATURES_KEY: features.detach().to("cpu", check_dtype(dtype)).contiguous()}, metadata=meta)


def read_metadata(body: bytes) -> dict[str, str]:
    """The string metadata of a safetensors blob's header (``{}`` if none). The format (safetensors' spec): an
    8-byte little-endian header length, then the JSON header whose ``__metadata__`` holds it; only read after
    :func:`safetensors.torch.load` accepted the blob."""
    (size,) = struct.unpack("<Q", bytes(body[:8]))
    return json.loads(bytes(body[8:8 + size])).get("__metadata__") or {}


def decode_features(body: bytes) -> torch.Tensor:
    """The ``features`` tensor of a response body (``[n, N, d]`` or ``[n, len(layers), N, d]``, in the dtype the
    metadata names); :class:`ProtocolError` when the body is not one the server writes."""
    features = _only(_load(body, "response body"), FEATURES_KEY, "response body")
    meta = read_metadata(body)
    dtype = meta.get("dtype")
    if dtype not in DTYPES or features.dtype != DTYPES[dtype] or features.dim() not in (3, 4):
        raise ProtocolError(f"response body: features {features.dtype} {list(features.shape)} do not match its "
                            f"metadata {meta}", 502)
    return features
