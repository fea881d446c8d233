"""``GQADecodeAttention``: a layer's KV cache plus decode attention, for token-by-token generation."""

from __future__ import annotations

import torch
from torch import nn

from effkern.ops import Rope, gqa_decode, kv_append
from effkern.ops._checks import FLOAT_DTYPES, INDEX_DTYPES, check_index_range, check_tensor
from effkern.ops.rope import STYLES, apply_rope

PROJECTIONS = ("q_proj", "k_proj")


class GQADecodeAttention(nn.Module):
    """Owns one attention layer's KV cache and runs each decode step as ``kv_append`` + ``gqa_decode``.

    Positions equal cache indices (prompts are right-padded: a sequence's tokens sit at ``0..len-1``).

    Args:
        num_q_heads: query heads Hq.
        num_kv_heads: KV heads Hkv in the cache (``Hq % Hkv == 0``).
        head_dim: D of queries and of the incoming keys.
        max_seq_len: cache capacity S_max per sequence.
        max_batch: sequences the cache holds.
        v_head_dim: Dv (default D).
        rope: RoPE applied to queries and keys (None: none).
        q_proj: ``[Hq, D, Dk]`` per-query-head projection after RoPE (post-RoPE compressed keys).
        k_proj: ``[Hkv, g*D, Dk]`` per-group projection of ``g`` incoming key heads after RoPE.
        scale, softcap: as in :func:`effkern.ops.gqa_decode`.
        dtype, device: of the cache.

    The cache (``k_cache``, ``v_cache``, ``lengths``) is runtime state: it follows the module's device and dtype
    (``.to(torch.bfloat16)``) but is not in the ``state_dict``. ``q_proj`` / ``k_proj`` are weights (in the
    ``state_dict``) and stay float32 whatever the module's dtype, as the ops take them.
    """

    def __init__(
        self,
        num_q_heads: int,
        num_kv_heads: int,
        head_dim: int,
        max_seq_len: int,
        *,
        max_batch: int = 1,
        v_head_dim: int | None = None,
        rope: Rope | None = None,
        q_proj: torch.Tensor | None = None,
        k_proj: torch.Tensor | None = None,
        scale: float | None = None,
        softcap: float | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if (q_proj is None) != (k_proj is None):
            raise ValueError("q_proj and k_proj must be given together (post-RoPE compressed keys need both)")
        if num_kv_heads <= 0 or num_q_heads % num_kv_heads:
            raise ValueError(f"num_q_heads={num_q_heads} must be a multiple of num_kv_heads={num_kv_heads}")
        if k_proj is not None:
            check_tensor("q_proj", q_proj, ndim=3, shape=(num_q_heads, head_dim), dims="[Hq, D, Dk]")
            check_tensor("k_proj", k_proj, ndim=3, shape=(num_kv_heads, None, q_proj.shape[-1]), dims="[Hkv, g*D, Dk]")
            if k_proj.shape[1] % head_dim:
                raise ValueError(f"k_proj [Hkv, g*D, Dk] must have a multiple of head_dim={head_dim} in dim 1, got "
                                 f"shape {tuple(k_proj.shape)}")
        dk = head_dim if k_proj is None else k_proj.shape[-1]
        dv = v_head_dim or head_dim
        self.rope, self.scale, self.softcap = rope, scale, softcap
        self.head_dim = head_dim
        cache = dict(dtype=dtype, device=device)
        self.register_buffer("k_cache", torch.zeros(max_batch, num_kv_heads, max_seq_len, dk, **cache),
                             persistent=False)
        self.register_buffer("v_cache", torch.zeros(max_batch, num_kv_heads, max_seq_len, dv, **cache),
                             persistent=False)
        self.register_buffer("lengths", torch.zeros(max_batch, dtype=torch.int32, device=device), persistent=False)
        self.register_buffer("q_proj", None if q_proj is None else q_proj.to(device, torch.float32).contiguous())
        self.register_buffer("k_proj", None if k_proj is None else k_proj.to(device, torch.float32).contiguous())

    def _apply(self, fn, recurse=True):
        # .to(dtype) / .half() cast every floating buffer; the projections must stay float32 (the ops' contract),
        # so a cast one is replaced by the original moved to the new device: no rounding through the new dtype.
        before = {name: self._buffers[name] for name in PROJECTIONS}
        super()._apply(fn, recurse)
        for name, proj in before.items():
            now = self._buffers[name]
            if proj is not None and now.dtype != proj.dtype:
                self._buffers[name] = proj.to(now.device)
        return self

    def reset(self) -> None:
        """Forget every cached token."""
        self.lengths.zero_()

    @torch.no_grad()
    def prefill(self, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor | None = None) -> None:
        """Load a prompt's keys ``[B, Hk, T, D]`` (not yet rotated) and values ``[B, Hkv, T, Dv]``.

        ``lengths [B]`` (int32 / int64, within ``[0, T]``) gives each sequence's real length (default T); padded
        positions are ignored.
        """
        dev, hkv, d = self.k_cache.device, self.k_cache.shape[1], self.head_dim
        hk = hkv if self.k_proj is None else hkv * (self.k_proj.shape[1] // d)
        check_tensor("k", k, ndim=4, dtypes=FLOAT_DTYPES, device=dev, shape=(None, hk, None, d), dims="[B, Hk, T, D]")
        b, _, t, _ = k.shape
        check_tensor("v", v, ndim=4, dtypes=FLOAT_DTYPES, device=dev, shape=(b, hkv, t, self.v_cache.shape[-1]),
                     dims="[B, Hkv, T, Dv]")
        if t > self.k_cache.shape[2] or b > self.k_cache.shape[0]:
            raise ValueError(f"prefill of {b} x {t} tokens exceeds the cache ({tuple(self.k_cache.shape[:3])})")
        if lengths is not None:
            check_tensor("lengths", lengths, ndim=1, dtypes=INDEX_DTYPES, device=dev, shape=(b,), dims="[B]")
            # a length past T would expose rows a previous sequence left in the cache
            check_index_range("lengths", lengths, 0, t, f"the prompt length T={t}")
        kf = k.float()
        if self.rope is not None:
            cos, sin = self.rope.cos_sin(torch.arange(t, device=k.device), d)
            kf = apply_rope(kf, cos, sin, STYLES[self.rope.style], self.rope.dim(d))
        if self.k_proj is not None:
            kf = torch.einsum("bjte,jef->bjtf", kf.reshape(b, hkv, -1, t, d).transpose(2, 3).reshape(b, hkv, t, -1),
                              self.k_proj)
        self.k_cache[:b, :, :t] = kf.to(self.k_cache.dtype)
        self.v_cache[:b, :, :t] = v.to(self.v_cache.dtype)
        self.lengths[:b] = t if lengths is None else lengths.to(self.lengths)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """One decode step: append the new token's ``k [B, Hk, D]``, ``v [B, Hkv, Dv]`` and attend with
        ``q [B, Hq, D]`` over each sequence's cache. Returns ``[B, Hq, Dv]``."""
        b = q.shape[0]
        if b > self.k_cache.shape[0]:
            raise ValueError(f"q has {b} sequences but the cache holds max_batch={self.k_cache.shape[0]}")
        slots = self.lengths[:b]
        # The friendly message needs a host sync, which a compiled graph cannot hold; there kv_append's launcher
        # still rejects a slot past the cache.
        if not torch.compiler.is_compiling() and int(slots.max()) >= self.k_cache.shape[2]:
            raise RuntimeError(f"the KV cache is full (max_seq_len={self.k_cache.shape[2]}); call reset()")
        kv_append(self.k_cache[:b], self.v_cache[:b], k, v, slots, rope=self.rope, k_proj=self.k_proj)
        slots += 1
        return gqa_decode(q, self.k_cache[:b], self.v_cache[:b], slots, rope=self.rope, q_proj=self.q_proj,
                          scale=self.scale, softcap=self.softcap)
