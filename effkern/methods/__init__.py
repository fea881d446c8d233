"""Full flows for the efficiency methods of PAPERS.md, one subpackage per paper, all on the shared plumbing of
:mod:`effkern.methods.common`.

A method ``<name>`` is a package ``effkern/methods/<name>/`` with a config (a
:class:`~effkern.methods.common.MethodConfig` subclass) and a flow ``run(cfg) -> rows``; registering it below makes
it ``effkern <name>`` on the command line (every config field a flag), ``bench/<name>.py`` its end-to-end benchmark
and ``runs/<name>/`` its default output folder.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    """A registered method: where its config class and its flow live ("module:attribute"), one line of help."""

    config: str
    run: str
    help: str
    # a method with a service has subcommands: ``effkern <name> <command>`` runs this flow, ``extra`` the others
    command: str | None = None
    extra: tuple[tuple[str, Method], ...] = ()

    def load(self, which: str):
        module, attr = getattr(self, which).split(":")
        return getattr(importlib.import_module(module), attr)


METHODS = {
    "backbone": Method("effkern.methods.backbone.config:BackboneConfig", "effkern.methods.backbone.flow:run",
                       "pretrain the small ViT backbone the side-tuning flows share (supervised stand-in)"),
    "last": Method("effkern.methods.last.config:LastConfig", "effkern.methods.last.flow:run",
                   "LAST side-tuning vs linear probe, LoRA and full fine-tuning on mini-VTAB-1k (PAPERS.md A)"),
    "dtl": Method("effkern.methods.dtl.config:DTLConfig", "effkern.methods.dtl.flow:run",
                  "DTL / DTL+ compact side networks on mini-VTAB-1k (PAPERS.md B)"),
    "miet": Method("effkern.methods.miet.config:MIETConfig", "effkern.methods.miet.flow:run",
                   "MIET: a feature server (cloud) and light edge tuning on summed features (PAPERS.md C)",
                   command="train",
                   extra=(("serve", Method("effkern.methods.miet.config:ServeConfig",
                                           "effkern.methods.miet.server:serve",
                                           "run the cloud's feature server (FastAPI + uvicorn)")),)),
    "kv_compress": Method("effkern.methods.kv_compress.config:KVCompressConfig", "effkern.methods.kv_compress.flow:run",
                          "KV-head compression of a Llama-family LM to fewer KV heads, RoPE-aware (PAPERS.md D)"),
    "ctr_compress": Method("effkern.methods.ctr_compress.config:CTRCompressConfig",
                           "effkern.methods.ctr_compress.flow:run",
                           "low-rank compression of CTR models: embeddings and MLPs (PAPERS.md E)"),
}
