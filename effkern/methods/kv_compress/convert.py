"""KV-head compression of a Llama-family model: fold a per-group basis into the attention weights.

Old KV heads are partitioned into groups of ``g``; each group becomes one new KV head (PAPERS.md D).

Values (every method folds them, no inference cost): with ``A [g*D, D]`` and ``B_j [D, D]``::

    W_v' = A^T W_v[group]          v_j ~= B_j v'           W_o[:, h] <- W_o[:, h] B_{j(h)}

``ours``/``svd_w``: ``A`` = top-D eigenvectors ``Phi`` of the group's value second moment (from calibration
caches, "SVD-a", or from the weights' Gram matrix ``W W^T``, "SVD-w") and ``B_j = Phi_j`` (its rows of head j).
``mean_pool``: ``A = [I .. I] / g``, ``B_j = I`` (the GQA-uptraining initialisation).

Keys, by ``key_strategy``:
  * ``rope_commuting``: per rotary frequency i, the top eigenvector ``u_i`` of the complex moment of the group's
    (k[i] + j k[i + D/2]); new key = sum_j conj(u_ij) z_j, query of head h scaled by conj(u_i,j(h)). Complex
    scalars per frequency commute with RoPE: the result is a standard GQA model.
  * ``pre_rope``: the value construction on pre-RoPE keys (``W_k' = A^T W_k``, ``W_q[h] <- B_j^T W_q[h]``);
    exact without RoPE, an initialisation for fine-tuning with it.
  * ``post_rope``: PCA ``Psi`` of the rotated keys; keys stay as they are in the weights and the attention
    projects them after RoPE (``k' = RoPE(k_group) Psi``, ``q'_h = RoPE(q_h) Psi_j``): buffers ``kv_k_basis``
    ``[Hkv', g*D, D]`` and ``kv_q_basis [Hq, D, D]`` on the attention module, used by effkern's attention.
  * ``mean_pool`` (forced for method ``mean_pool``): ``W_k'`` = mean of the group's ``W_k``, queries unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from effkern.methods.kv_compress.calibrate import KVStats, _attention_layers

METHODS = ("ours", "svd_w", "mean_pool")
KEY_STRATEGIES = ("rope_commuting", "post_rope", "pre_rope", "mean_pool")
GROUPINGS = ("consecutive", "similarity")


@dataclass
class LayerPlan:
    """Which old KV heads form each new KV head, and the order of query heads that follows from it."""

    groups: list[list[int]]

    def query_order(self, q_per_kv: int) -> list[int]:
        """Old query heads in new order: the heads served by group 0's KV heads first, and so on."""
        return [j * q_per_kv + r for group in self.groups for j in group for r in range(q_per_kv)]


def plan_groups(hkv: int, target: int, grouping: str = "consecutive", moment: torch.Tensor | None = None,
                head_dim: int | None = None) -> LayerPlan:
    """Partition ``hkv`` heads into ``target`` groups of equal size.

    ``similarity`` puts together heads whose caches are most correlated (|cross-moment| normalised by the
    heads' energies, from ``moment [hkv*D, hkv*D]``), greedily: the strongest remaining head picks its partners.
    """
    if target <= 0 or hkv % target:
        raise ValueError(f"target KV heads must divide the model's {hkv} KV heads, got {target}")
    g = hkv // target
    if grouping == "consecutive" or g == 1 or target == 1:
        return LayerPlan([list(range(k * g, (k + 1) * g)) for k in range(target)])
    if grouping != "similarity":
        raise ValueError(f"grouping must be one of {GROUPINGS}, got {grouping!r}")
    if moment is None or head_dim is None:
        raise ValueError("similarity grouping needs the calibration moment and head_dim")
    blocks = moment.reshape(hkv, head_dim, hkv, head_dim).permute(0, 2, 1, 3)
    cross = torch.linalg.matrix_norm(blocks)  # [hkv, hkv] Frobenius norms of the cross-moments
    energy = torch.diagonal(cross).sqrt()
    sim = cross / (energy[:, None] * energy[None, :])
    left, groups = list(range(hkv)), []
    while left:
        seed = max(left, key=lambda j: energy[j])
        partners = sorted((j for j in left if j != seed), key=lambda j: -sim[seed, j])[: g - 1]
        group = sorted([seed, *partners])
        groups.append(group)
        left = [j for j in left if j not in group]
    return LayerPlan(sorted(groups))


def top_eigvecs(moment: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` leading eigenvectors (columns, descending eigenvalue) of a Hermitian PSD ``moment``."""
    _, vecs = torch.linalg.eigh(moment)
    return vecs[:, -k:].flip(-1)


def _block(m: torch.Tensor, heads: list[int], d: int) -> torch.Tensor:
    idx = torch.cat([torch.arange(j * d, (j + 1) * d) for j in heads])
    return m[idx][:, idx]


def _heads(w: torch.Tensor, heads: list[int], d: int) -> torch.Tensor:
    """Rows of ``w [H*D, in]`` belonging to ``heads``, stacked."""
    return torch.cat([w[j * d : (j + 1) * d] for j in heads])


def _served_queries(heads: list[int], q_per_kv: int):
    """(p, h) for every query head h served by the group's p-th old KV head."""
    for p, j in enumerate(heads):
        for r in range(q_per_kv):
            yield p, j * q_per_kv + r


def _value_maps(method: str, moment: torch.Tensor, g: int, d: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(A [g*D, D], [B_j [D, D]] per head in the group) for a value or pre-RoPE key fold."""
    if method == "mean_pool":
        eye = torch.eye(d, dtype=torch.float64)
        return torch.cat([eye] * g) / g, [eye] * g
    phi = top_eigvecs(moment, d)
    return phi, [phi[p * d : (p + 1) * d] for p in range(g)]


def _rope_commuting(w_k: torch.Tensor, freq_moment: torch.Tensor, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """New key rows ``[D, in]`` from the group's ``w_k [g*D, in]`` and per-frequency query factors ``c [D/2, g]``
    (complex; query head of group member p is multiplied by ``c[:, p]``)."""
    half, g = d // 2, freq_moment.shape[-1]
    u = torch.stack([top_eigvecs(freq_moment[i], 1)[:, 0] for i in range(half)])  # [D/2, g]
    z = torch.complex(w_k.reshape(g, d, -1)[:, :half], w_k.reshape(g, d, -1)[:, half:])  # [g, D/2, in]
    z_new = torch.einsum("ip,pin->in", u.conj(), z)
    return torch.cat([z_new.real, z_new.imag]), u.conj()


def _scale_query_pairs(w_q: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Multiply query rows ``w_q [D, in]`` as complex pairs (i, i + D/2) by ``c [D/2]``."""
    half = w_q.shape[0] // 2
    z = torch.complex(w_q[:half], w_q[half:]) * c[:, None]
    return torch.cat([z.real, z.imag])


@torch.no_grad()
def compress_layer(attn, plan: LayerPlan, *, method: str, key_strategy: str, stats: KVStats | None, layer: int,
                   hq: int) -> None:
    """Rewrite one attention module in place for ``len(plan.groups)`` KV heads (see the module docstring)."""
    d = attn.head_dim
    hkv_old = attn.k_proj.weight.shape[0] // d
    g, target = len(plan.groups[0]), len(plan.groups)
    q_per_kv = hq // hkv_old
    dtype = attn.q_proj.weight.dtype
    w_q, w_k = attn.q_proj.weight.double(), attn.k_proj.weight.double()
    w_v, w_o = attn.v_proj.weight.double(), attn.o_proj.weight.double()
    if any(lin.bias is not None for lin in (attn.q_proj, attn.k_proj, attn.v_proj)):
        raise NotImplementedError("KV-head compression of q/k/v projections with biases is not implemented")

    def moment(name: str, heads: list[int]) -> torch.Tensor:
        if method == "svd_w":  # SVD of the weights = SVD-a with a white input covariance
            w = {"v": w_v, "k_pre": w_k}.get(name)
            if w is None:
                raise ValueError(f"method svd_w has no {name} statistics (use rope_commuting or pre_rope keys)")
            rows = _heads(w, heads, d)
            return rows @ rows.T
        if stats is None:
            raise ValueError(f"method {method!r} needs calibration statistics")
        return _block(getattr(stats, name)[layer], heads, d)

    new_q = w_q.clone()
    new_o = w_o.clone()
    new_k, new_v, k_bases, q_bases = [], [], [], [None] * hq
    for heads in plan.groups:
        a, b = _value_maps(method, moment("v", heads) if method != "mean_pool" else None, g, d)
        new_v.append(a.T @ _heads(w_v, heads, d))
        for p, h in _served_queries(heads, q_per_kv):
            new_o[:, h * d : (h + 1) * d] = w_o[:, h * d : (h + 1) * d] @ b[p]
        strategy = "mean_pool" if method == "mean_pool" else key_strategy
        if strategy == "rope_commuting":
            if method == "svd_w":
                rows = _heads(w_k, heads, d).reshape(g, d, -1)
                z = torch.complex(rows[:, : d // 2], rows[:, d // 2 :])  # [g, D/2, in]
                freq = torch.einsum("pin,qin->ipq", z, z.conj())
            else:
                freq = stats.k_freq[layer][:, heads][:, :, heads]
            k_rows, c = _rope_commuting(_heads(w_k, heads, d), freq, d)
            new_k.append(k_rows)
            for p, h in _served_queries(heads, q_per_kv):
                new_q[h * d : (h + 1) * d] = _scale_query_pairs(w_q[h * d : (h + 1) * d], c[:, p])
        elif strategy in ("pre_rope", "mean_pool"):
            ka, kb = _value_maps(strategy, moment("k_pre", heads) if strategy == "pre_rope" else None, g, d)
            new_k.append(ka.T @ _heads(w_k, heads, d))
            for p, h in _served_queries(heads, q_per_kv):
                new_q[h * d : (h + 1) * d] = kb[p].T @ w_q[h * d : (h + 1) * d]
        elif strategy == "post_rope":
            psi = top_eigvecs(moment("k_post", heads), d)  # [g*D, D]
            k_bases.append(psi)
            for p, h in _served_queries(heads, q_per_kv):
                q_bases[h] = psi[p * d : (p + 1) * d]
        else:
            raise ValueError(f"key_strategy must be one of {KEY_STRATEGIES}, got {key_strategy!r}")

    order = plan.query_order(q_per_kv)  # query heads of a new KV head must be contiguous for GQA
    q_rows = torch.cat([new_q[h * d : (h + 1) * d] for h in order])
    o_cols = torch.cat([new_o[:, h * d : (h + 1) * d] for h in order], dim=1)
    attn.q_proj.weight.data = q_rows.to(dtype)
    attn.o_proj.weight.data = o_cols.to(dtype)
    attn.v_proj.weight.data = torch.cat(new_v).to(dtype)
    attn.v_proj.out_features = target * d
    if k_bases:  # post-RoPE: the module keeps all key heads (grouped in `plan` order) and projects them
        key_order = [j for heads in plan.groups for j in heads]
        attn.k_proj.weight.data = _heads(w_k, key_order, d).to(dtype)
        attn.register_buffer("kv_k_basis", torch.stack(k_bases).float())
        attn.register_buffer("kv_q_basis", torch.stack([q_bases[h] for h in order]).float())
    else:
        attn.k_proj.weight.data = torch.cat(new_k).to(dtype)
        attn.k_proj.out_features = target * d
    attn.num_key_value_groups = hq // target


def compress_kv_heads(model, target_kv_heads: int, *, method: str = "ours", key_strategy: str = "rope_commuting",
                      stats: KVStats | None = None, grouping: str = "consecutive",
                      layers: list[int] | None = None) -> list[LayerPlan]:
    """Compress the KV heads of ``layers`` (default all) of a Llama-family ``model`` to ``target_kv_heads``.

    Returns the per-layer plans (None for layers left as they are). When every layer is converted with a
    standard-GQA strategy, ``model.config.num_key_value_heads`` is updated so the model saves and loads with
    plain transformers.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if key_strategy not in KEY_STRATEGIES:
        raise ValueError(f"key_strategy must be one of {KEY_STRATEGIES}, got {key_strategy!r}")
    attns = _attention_layers(model)
    cfg = model.config
    if getattr(cfg, "rope_parameters", None) is None and getattr(cfg, "rope_theta", None) is None:
        raise ValueError(f"{type(model).__name__} has no RoPE configuration: only RoPE Llama-family models work")
    hq, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    if target_kv_heads <= 0 or hkv % target_kv_heads:
        raise ValueError(f"target_kv_heads must divide num_key_value_heads={hkv}, got {target_kv_heads}")
    needed = 4 * (hkv // target_kv_heads) * attns[0].head_dim
    if stats is not None and method != "mean_pool" and stats.tokens < needed:
        raise ValueError(f"calibration covered {stats.tokens} tokens; at least {needed} (4 x g*D) are needed for "
                         "well-conditioned group moments")
    layers = list(range(len(attns))) if layers is None else layers
    plans: list[LayerPlan | None] = [None] * len(attns)
    for i in layers:
        moment = None if stats is None else stats.v[i] + stats.k_pre[i]
        plans[i] = plan_groups(hkv, target_kv_heads, grouping, moment, attns[i].head_dim)
        compress_layer(attns[i], plans[i], method=method, key_strategy=key_strategy, stats=stats, layer=i, hq=hq)
    if len(layers) == len(attns) and (method == "mean_pool" or key_strategy != "post_rope"):
        cfg.num_key_value_heads = target_kv_heads
    return plans
