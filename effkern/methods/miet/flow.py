"""The MIET flow (`effkern miet train`): the edge side of MIET on mini-VTAB-1k in LAST's harness
(:func:`effkern.methods.last.flow.run_tasks`: same tasks, backbone, learning-rate pick on val, cost rows).

The edge talks to a feature server (``--server URL``; none: :class:`~effkern.methods.miet.client.LocalServer`
starts one on loopback for the run): per task, the summed features of the train / val / test images are fetched
once, through the resumable cache ``<out>/features/`` (a killed run re-requests only what it lacks), then K edge
networks (one per learning rate of ``parallel_lrs``) train at once on them with LAST's trainer, and the best on val
is reported. Rows: the standard row (method miet, dataset = the task, model = the backbone, variant = the wire
dtype, seed, trainable_params, peak_mem_bytes, step_time_s: the step with the backbone's forward, as LAST's), then
group, accuracy, val_accuracy, lr, layers, and per image fetched for the task the bytes on the wire:
wire_response_body_per_image (the features: safetensors, framing included), wire_request_body_per_image (the
image upload), wire_response_headers_per_image, wire_request_headers_per_image (HTTP/1.1 lines; absent when every
feature came from the cache, e.g. a rerun with other learning rates); plus ``dataset = "mean"``
rows and ``accuracy.png``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import torch
from torch import nn

from effkern.methods.common.distributed import barrier, is_main
from effkern.methods.last.costs import SideTuningShape
from effkern.methods.last.flow import fit_side, run_tasks
from effkern.methods.last.train import side_optimizer, side_step
from effkern.methods.miet.client import FeatureClient, LocalServer, fetch_all
from effkern.methods.miet.config import MIETConfig
from effkern.methods.miet.model import EdgeNetwork, check_layers, gather_features


def make_edge(dim: int, num_classes: int, options: dict, num_networks: int = 1) -> EdgeNetwork:
    return EdgeNetwork(dim, num_classes, blocks=options["edge_blocks"], rank=options["rank"], heads=options["heads"],
                       pool=options["pool"], num_networks=num_networks, num_prefix_tokens=options["prefix_tokens"])


def edge_options(cfg: MIETConfig, depth: int, prefix_tokens: int) -> dict:
    """What the edge network and the cost step need from ``cfg`` for a backbone of ``depth`` blocks."""
    return dict(edge_blocks=cfg.edge_blocks, rank=cfg.rank, heads=cfg.heads, pool=cfg.pool,
                layers=check_layers(cfg.layers or range(depth + 1), depth), prefix_tokens=prefix_tokens)


def run(cfg: MIETConfig) -> list[dict]:
    cfg.check()
    server = (contextlib.nullcontext(cfg.server) if cfg.server is not None
              else LocalServer(backbone=cfg.backbone, max_images=max(256, cfg.fetch_batch)))
    with server as url, FeatureClient(url) as client:
        health = client.health()
        tokens, dim = health["token_shape"]
        options = edge_options(cfg, health["depth"], health["prefix_tokens"])
        layers = options["layers"]

        def fetch(task) -> dict:
            return {split: fetch_all(client, getattr(task, f"{split}_x"), Path(cfg.out) / "features", layers,
                                     batch_size=cfg.fetch_batch, dtype=cfg.wire_dtype, progress=cfg.progress)
                    for split in ("train", "val", "test")}

        def solve(method: str, task) -> dict:
            before = dataclasses.replace(client.features_total)
            # under a launcher the main process fetches; the others then read its cache (no second download)
            feats = fetch(task) if is_main() else None
            barrier()
            feats = feats or fetch(task)
            torch.manual_seed(cfg.seed)
            edge = make_edge(dim, task.num_classes, options, len(cfg.parallel_lrs))
            result = fit_side(edge, {split: [f] for split, f in feats.items()}, task, cfg)
            # the images fetched now (a resumed task's cached features crossed no wire: no byte count then)
            now = {f.name: getattr(client.features_total, f.name) - getattr(before, f.name)
                   for f in dataclasses.fields(before)}
            wire = {}
            if now["images"]:
                wire = {f"wire_{key}_per_image": now[key] / now["images"]
                        for key in ("response_body", "request_body", "response_headers", "request_headers")}
            return dict(variant=cfg.wire_dtype, **result, layers=list(layers), **wire)

        shape = SideTuningShape(batch_size=cfg.batch_size, backbone=cfg.backbone, options=options)
        return run_tasks(cfg, ("miet",), solve, shape, title=f"mini-VTAB-1k: MIET edge network ({tokens} tokens)",
                         model=health["model"])


def cost_step(method: str, shape: SideTuningShape, vit: nn.Module, images: torch.Tensor, labels: torch.Tensor):
    """The cost harness's step (:mod:`effkern.methods.last.costs`): the cloud's summed features (no autograd) and
    the edge network's forward, backward and AdamW step."""
    options = shape.options
    edge = make_edge(vit.embed_dim, shape.num_classes, options, shape.num_networks)
    opt = side_optimizer(edge, [1e-3] * shape.num_networks)

    def step():
        side_step(edge, opt, [gather_features(vit, images, options["layers"])], labels)

    return step, sum(p.numel() for p in edge.parameters()) // shape.num_networks
