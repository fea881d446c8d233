"""Out-of-range indices and malformed arguments on every route to the kernels, run in a subprocess by
test_hard_inputs.py (a kernel that reads out of bounds may crash the process: the test then fails instead of the
whole run dying).

``python route_cases.py ROUTE`` runs every case of ROUTE (eager | compile | export | ops) on the backend that
``EFFKERN_BACKEND`` names and prints one JSON line per case: its name, and the error raised (type and message) or
None. Routes: the public entry point; ``torch.compile(fullgraph=True)`` of it (the entry's value checks are skipped
while compiling, so the op's own launcher has to catch the value); ``torch.export`` of a module calling it; the
registered op ``torch.ops.effkern.*`` on normalised arguments (no entry point at all).
"""

from __future__ import annotations

import json
import sys

import torch

from effkern.nn import LowRankEmbedding
from effkern.ops import gqa_decode, kv_append

B, H, S, D = 2, 2, 16, 8
FIELDS = [4, 3, 5]
I32 = torch.int32


def caches():
    return torch.zeros(B, H, S, D), torch.zeros(B, H, S, D)


def lens(*values):
    return torch.tensor(values, dtype=I32)


def entry_cases():
    """(name, fn, args): fn is a public entry point taking only tensors, so every route can wrap it."""
    q, k = torch.randn(B, 2 * H, D), torch.randn(B, H, D)
    emb = LowRankEmbedding(FIELDS, 6, 3)
    ids = torch.tensor([[0, 0, 0], [1, 2, 4]])

    def append(kc, vc, new, slots):
        kv_append(kc, vc, new, new, slots)
        return kc

    def decode(q, kc, vc, seq_lens):
        return gqa_decode(q, kc, vc, seq_lens)

    def decode_from(q, kc, vc, seq_lens, kv_start):
        return gqa_decode(q, kc, vc, seq_lens, kv_start=kv_start)

    bad_field0 = ids.clone()
    bad_field0[0, 0] = FIELDS[0]  # the first row of field 1 if nothing checks it
    huge = ids.clone()
    huge[1, 2] = 10**9
    return [
        ("kv_append slots 10**8", append, (*caches(), k, lens(0, 10**8))),
        ("kv_append slots S_max", append, (*caches(), k, lens(S, 0))),
        ("kv_append slots -1", append, (*caches(), k, lens(-1, 0))),
        ("gqa_decode seq_lens 10**8", decode, (q, *caches(), lens(10**8, 1))),
        ("gqa_decode seq_lens S_max + 1", decode, (q, *caches(), lens(1, S + 1))),
        ("gqa_decode kv_start > seq_lens", decode_from, (q, *caches(), lens(3, 4), lens(4, 0))),
        ("low_rank_embedding id 10**9", emb, (huge,)),
        ("low_rank_embedding id V_0 in field 0", emb, (bad_field0,)),
        ("low_rank_embedding id -2", emb, (torch.where(ids == 2, -2, ids),)),
    ]


def ops_cases():
    """(name, fn, args) on the registered ops directly: the entry cases plus malformed shapes the entry rejects."""
    ops = torch.ops.effkern
    q, k = torch.randn(B, 2 * H, D), torch.randn(B, H, D)
    emb = LowRankEmbedding(FIELDS, 6, 3)
    table, offsets, u, mu = emb.table.detach(), emb.offsets, emb.u.detach(), emb.mu.detach()
    ids = torch.tensor([[0, 0, 0], [1, 2, 4]])[..., None]
    x, lu, lv = torch.randn(3, 5), torch.randn(4, 5), torch.randn(6, 4)
    cos = sin = torch.ones(B, D // 2)

    def decode(q, kc, vc, seq_lens, kv_start=None, cos=None, sin=None, q_proj=None, rotary_dim=0):
        return ops.gqa_decode(q, kc, vc, seq_lens, kv_start, cos, sin, q_proj, 0.3, 0.0, 0, rotary_dim)

    def append(kc, vc, new, slots, cos=None, sin=None, k_proj=None, rotary_dim=0):
        ops.kv_append(kc, vc, new, new, slots, cos, sin, k_proj, 0, rotary_dim)
        return kc

    def embed(ids, offsets=offsets):
        return ops.low_rank_embedding(ids, table, offsets, u, mu, False)

    def with_id(b, f, value):
        bad = ids.clone()
        bad[b, f, 0] = value
        return bad

    return [
        ("kv_append slots 10**8", append, (*caches(), k, lens(0, 10**8))),
        ("kv_append slots S_max", append, (*caches(), k, lens(S, 0))),
        ("kv_append slots -1", append, (*caches(), k, lens(-1, 0))),
        ("kv_append k_proj of the wrong shape", lambda: append(*caches(), k, lens(0, 0),
                                                               k_proj=torch.randn(H, D + 1, D)), ()),
        ("kv_append cos of the wrong shape", lambda: append(*caches(), k, lens(0, 0), cos[:, :2], sin[:, :2],
                                                            rotary_dim=D), ()),
        ("gqa_decode seq_lens 10**8", decode, (q, *caches(), lens(10**8, 1))),
        ("gqa_decode seq_lens S_max + 1", decode, (q, *caches(), lens(1, S + 1))),
        ("gqa_decode kv_start > seq_lens", lambda: decode(q, *caches(), lens(3, 4), lens(4, 0)), ()),
        ("gqa_decode cos of the wrong shape", lambda: decode(q, *caches(), lens(3, 4), None, cos[:1], sin[:1],
                                                             rotary_dim=D), ()),
        ("gqa_decode q_proj of the wrong shape", lambda: decode(q, *caches(), lens(3, 4), None, None, None,
                                                                torch.randn(2 * H, D, D + 1)), ()),
        ("low_rank_embedding id 10**9", embed, (with_id(1, 2, 10**9),)),
        ("low_rank_embedding id V_0 in field 0", embed, (with_id(0, 0, FIELDS[0]),)),
        ("low_rank_embedding id -2", embed, (with_id(0, 1, -2),)),
        ("low_rank_linear b1 of the wrong length", ops.low_rank_linear, (x, lu, torch.randn(5), lv, None, 0, 0)),
        ("low_rank_linear b2 of the wrong length", ops.low_rank_linear, (x, lu, None, lv, torch.randn(5), 0, 0)),
    ]


class Call(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def run(route: str) -> None:
    cases = ops_cases() if route == "ops" else entry_cases()
    for name, fn, args in cases:
        if route == "compile":
            fn = torch.compile(fn, fullgraph=True, backend="aot_eager")
        elif route == "export":
            if "low_rank_embedding" not in name and "gqa_decode" not in name:
                continue  # kv_append mutates its inputs: export's input-mutation rules are not what is tested here
            module = fn if isinstance(fn, torch.nn.Module) else Call(fn)
            fn = torch.export.export(module, args).module()
        try:
            fn(*args)
            error = None
        except Exception as e:  # noqa: BLE001 - every outcome is reported, the test judges it
            error = [type(e).__name__, str(e).split("\n")[0]]
        print(json.dumps({"case": name, "error": error}), flush=True)


if __name__ == "__main__":
    run(sys.argv[1])
