"""MIET's cloud side: a feature server that runs the frozen backbone and answers, per image, the sum of its
features (:func:`~effkern.methods.miet.model.gather_features`), or all of them stacked. Wire format:
:mod:`~effkern.methods.miet.protocol`. It imports no training code.

    GET  /health                                   -> JSON: model, image and token shapes, depth, limits
    POST /features?layers=0,..,6&reduce=true&dtype=float32   (body: safetensors ``images`` uint8 [n, C, H, W])
                                                   -> safetensors ``features`` [n, N, d] or [n, len(layers), N, d]

Start it with ``effkern miet serve --port 8000 [--workers N]``, from Python with :func:`serve` (blocks) or
:class:`~effkern.methods.miet.client.LocalServer` (a subprocess), or mount :func:`create_app` in any ASGI server.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect

from effkern.methods.backbone.model import PACKAGED_PATH, load_backbone
from effkern.methods.miet.config import ServeConfig
from effkern.methods.miet.model import gather_features
from effkern.methods.miet.protocol import (
    ProtocolError,
    check_dtype,
    decode_images,
    encode_features,
    parse_layers,
)

DEFAULTS = ServeConfig()
# serve() hands its settings to every uvicorn worker process through these (workers > 1 need an import string)
ENV = dict(backbone="EFFKERN_MIET_BACKBONE", max_images="EFFKERN_MIET_MAX_IMAGES",
           max_body_bytes="EFFKERN_MIET_MAX_BODY_BYTES", threads="EFFKERN_MIET_THREADS",
           max_pending="EFFKERN_MIET_MAX_PENDING")


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) a declared Content-Length over ``limit`` before reading anything and a
    streamed (chunked) body as soon as it passes ``limit``: nothing past ``limit + one chunk`` is buffered. Bytes a
    client keeps sending after the 413 are read and dropped by uvicorn, not kept."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ProtocolError(f"Content-Length must be a byte count, got {declared!r}", 400)
        if int(declared) > limit:
            raise ProtocolError(f"request body of {int(declared)} bytes exceeds max_body_bytes={limit}", 413)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ProtocolError(f"request body exceeds max_body_bytes={limit} (streamed past it)", 413)
    return bytes(body)


def create_app(backbone: str | os.PathLike | None = None, max_images: int = DEFAULTS.max_images,
               max_body_bytes: int = int(DEFAULTS.max_body_mb * 2**20), threads: int | None = None,
               max_pending: int = DEFAULTS.max_pending) -> FastAPI:
    """The feature server's app, with the frozen backbone (``backbone``: a weights file, default the packaged
    one) loaded once. ``max_images`` per request and ``max_body_bytes`` per request body bound what one request
    can make it hold, ``max_pending`` how many requests it holds at once (reading, queued or running; more get 503
    with Retry-After, which the client retries with backoff): memory stays bounded under any load. ``threads``:
    torch's intra-op threads (None: torch's default, every core)."""
    if min(max_images, max_body_bytes, max_pending) < 1:
        raise ValueError(f"max_images, max_body_bytes and max_pending must be >= 1, got {max_images}, "
                         f"{max_body_bytes} and {max_pending}")
    if threads is not None:
        torch.set_num_threads(threads)
    path = Path(backbone or PACKAGED_PATH).expanduser()
    vit = load_backbone(path)
    for p in vit.parameters():
        p.requires_grad_(False)
    depth = len(vit.blocks)
    image_shape = [vit.patch_embed.proj.in_channels, *vit.patch_embed.img_size]
    token_shape = [vit.patch_embed.num_patches + vit.num_prefix_tokens, vit.embed_dim]
    health = dict(status="ok", model=path.stem, weights_sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
                  image_shape=image_shape, depth=depth, token_shape=token_shape,
                  prefix_tokens=vit.num_prefix_tokens, layers=list(range(depth + 1)),
                  dtypes=["float32", "float16"], limits=dict(max_images=max_images, max_body_bytes=max_body_bytes,
                                                                   max_pending=max_pending),
                  threads=torch.get_num_threads())
    # One thread runs the backbone: each forward pass already uses every torch thread, so concurrent passes would
    # only oversubscribe the cores; requests queue here while the event loop keeps serving /health and errors.
    model_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="miet-backbone")
    pending = 0  # requests admitted now (the event loop is one thread: a plain counter)

    def infer(images: torch.Tensor, layers: tuple[int, ...], reduce: bool, dtype: str) -> bytes:
        with torch.inference_mode():
            features = gather_features(vit, images, layers, reduce=reduce)
        return encode_features(features, layers, dtype)

    app = FastAPI(title="effkern MIET feature server", summary="frozen-backbone features for MIET's edge network")

    @app.exception_handler(ProtocolError)
    async def protocol_error(request: Request, e: ProtocolError) -> JSONResponse:
        return JSONResponse({"detail": str(e)}, status_code=e.status)

    @app.get("/health")
    def get_health() -> dict:
        return health

    @app.post("/features", response_class=Response)
    async def post_features(request: Request, layers: str | None = None, reduce: bool = True,
                            dtype: str = "float32") -> Response:
        nonlocal pending
        picked = parse_layers(layers, depth)
        check_dtype(dtype)
        if pending >= max_pending:
            return JSONResponse({"detail": f"busy: {pending} requests in progress (max_pending={max_pending}); "
                                           "retry later"}, status_code=503, headers={"Retry-After": "1"})
        pending += 1
        try:
            try:
                body = await _read_body(request, max_body_bytes)
            except ClientDisconnect:  # the client went away mid-upload: nobody reads an answer
                return Response(status_code=400)
            images = await run_in_threadpool(decode_images, body, image_shape, max_images)
            if await request.is_disconnected():  # gone while its body was decoded: skip the forward pass
                return Response(status_code=400)
            out = await asyncio.get_running_loop().run_in_executor(model_pool, infer, images, picked, reduce, dtype)
        finally:
            pending -= 1
        return Response(out, media_type="application/octet-stream")

    return app


def app_from_env() -> FastAPI:
    """:func:`create_app` with the settings :func:`serve` put in the environment (:data:`ENV`): the factory each
    uvicorn worker process calls."""
    def get(key: str, cast, default):
        value = os.environ.get(ENV[key])
        return cast(value) if value else default

    return create_app(get("backbone", str, None), get("max_images", int, DEFAULTS.max_images),
                      get("max_body_bytes", int, int(DEFAULTS.max_body_mb * 2**20)), get("threads", int, None),
                      get("max_pending", int, DEFAULTS.max_pending))


def serve(cfg: ServeConfig) -> None:
    """Run the feature server under uvicorn until interrupted (`effkern miet serve`). ``cfg.workers`` processes each
    load the backbone and (unless ``cfg.threads`` is given) share the cores evenly."""
    import uvicorn

    cfg.check()
    threads = cfg.threads
    if threads is None and cfg.workers > 1:
        threads = max(1, (os.cpu_count() or 1) // cfg.workers)
    settings = dict(backbone=cfg.backbone, max_images=cfg.max_images, max_body_bytes=int(cfg.max_body_mb * 2**20),
                    threads=threads, max_pending=cfg.max_pending)
    os.environ.update({ENV[k]: str(v) for k, v in settings.items() if v is not None})
    uvicorn.run("effkern.methods.miet.server:app_from_env", factory=True, host=cfg.host, port=cfg.port,
                workers=cfg.workers, log_level=cfg.log_level)
