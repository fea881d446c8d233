"""The MIET configs: the edge's training (`effkern miet train`) and the cloud's feature server (`effkern miet
serve`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from effkern.data.vision import MINI_VTAB_TASKS
from effkern.methods.common import Config, MethodConfig, arg

WIRE_DTYPES = ("float32", "float16")


@dataclass
class MIETConfig(MethodConfig):
    """MIET on mini-VTAB-1k: a feature server (the cloud, frozen backbone) returns per image only the sum of the
    chosen intermediate features; the edge caches them and trains a light low-rank-attention network on them, K
    learning rates at once. Without --server a local server is started for the run (loopback)."""

    name: ClassVar[str] = "miet"
    QUICK: ClassVar[dict] = dict(tasks=("digits", "lfw_face", "rotation"), epochs=5)
    SMOKE: ClassVar[dict] = dict(tasks=("digits",), epochs=1, cost_steps=0)
    # where the features come from and in what chunks changes no number: a moved server keeps the run's rows
    PRESENTATION: ClassVar[tuple[str, ...]] = ("out", "progress", "server", "fetch_batch")

    out: str = arg("runs/miet", "output folder: config.json, results.json, accuracy.png, features/ (the cache)")
    server: str | None = arg(None, "feature server URL, e.g. http://10.0.0.5:8000 (none: start one on loopback)")
    tasks: tuple[str, ...] = arg(tuple(MINI_VTAB_TASKS), "mini-VTAB tasks", choices=tuple(MINI_VTAB_TASKS))
    backbone: str | None = arg(None, "backbone weights file of the local server and the cost step (default: packaged)")
    layers: tuple[int, ...] = arg((), "[RECON] features summed: 0 the embedded tokens, i block i's output "
                                  "(empty: all, 0..depth)")
    wire_dtype: str = arg("float32", "dtype of the features on the wire", choices=WIRE_DTYPES)
    edge_blocks: int = arg(2, "[RECON] LSA blocks of the edge network")
    rank: int = arg(16, "[RECON] rank r of every LSA block")
    heads: int = arg(2, "attention heads inside the rank-r space")
    pool: str = arg("cls", "[RECON] pooled token(s)", choices=("cls", "mean"))
    parallel_lrs: tuple[float, ...] = arg((1e-3, 3e-3, 1e-2, 3e-2), "learning rates trained at once (K networks)")
    epochs: int = arg(20, "training epochs")
    batch_size: int = arg(32, "batch size")
    fetch_batch: int = arg(100, "images per request to the server")
    cost_steps: int = arg(10, "timed steps for step_time_s / peak_mem_bytes (0: not measured)")

    def validate(self) -> None:
        for name in ("tasks", "parallel_lrs"):
            if not getattr(self, name):
                raise ValueError(f"{name} must not be empty")
        for name in ("rank", "heads", "epochs", "batch_size", "fetch_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.rank % self.heads:
            raise ValueError(f"heads must divide rank {self.rank}, got {self.heads}")
        if self.edge_blocks < 0 or self.cost_steps < 0:
            raise ValueError(f"edge_blocks and cost_steps must be >= 0, got {self.edge_blocks}, {self.cost_steps}")
        if min(self.parallel_lrs) <= 0:
            raise ValueError(f"parallel_lrs must be > 0, got {self.parallel_lrs}")
        if self.server is not None and not self.server.startswith(("http://", "https://")):
            raise ValueError(f"server must be an http(s):// URL, got {self.server!r}")
        if len(set(self.layers)) != len(self.layers) or min(self.layers, default=0) < 0:
            raise ValueError(f"layers must be distinct indices >= 0, got {self.layers}")


@dataclass
class ServeConfig(Config):
    """The cloud's feature server (FastAPI on uvicorn): runs the frozen backbone and answers, per image, the sum of
    the requested intermediate features (or all of them, or the final one) as safetensors. GET /health,
    POST /features?layers=0,..,6&reduce=true&dtype=float32 with a safetensors body of uint8 images."""

    host: str = arg("127.0.0.1", "address to listen on (0.0.0.0: every interface)")
    port: int = arg(8000, "TCP port")
    workers: int = arg(1, "uvicorn worker processes, each with its own copy of the backbone")
    backbone: str | None = arg(None, "backbone weights file (default: the packaged one)")
    max_images: int = arg(256, "images per request at most (more: 413)")
    max_body_mb: float = arg(4.0, "request body limit in MiB (more: 413)")
    max_pending: int = arg(32, "requests held at once per worker: reading, queued or running (more: 503, retried "
                           "by the client)")
    threads: int | None = arg(None, "torch threads per worker (none: cores / workers)")
    log_level: str = arg("warning", "uvicorn log level", choices=("critical", "error", "warning", "info", "debug"))

    def validate(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535] (0: any free port), got {self.port}")
        for name in ("workers", "max_images", "max_pending", "threads"):
            if (getattr(self, name) or 1) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_body_mb <= 0:
            raise ValueError(f"max_body_mb must be > 0, got {self.max_body_mb}")
        if self.backbone is not None and not Path(self.backbone).expanduser().is_file():
            raise ValueError(f"backbone={self.backbone!r}: no such weights file")
