"""Rotary position embedding (RoPE) configuration and the reference rotation.

Kernels never see a RoPE configuration: the entry points turn it into per-row ``cos``/``sin`` tables
``[B, R/2]`` (fp32) for the one position each row is rotated at, and pass the style and rotary dim ``R``.
Computing those B x R/2 values in PyTorch is negligible next to a decode step, and it lets one kernel serve
a plain theta, any pre-scaled ``inv_freq`` (e.g. HF's llama3 / linear / dynamic variants) and explicit tables.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from effkern.ops._checks import INDEX_DTYPES, check_index_range, check_tensor

STYLES = {"half": 0, "interleaved": 1}


@dataclass
class Rope:
    """How to rotate query/key heads.

    style: ``"half"`` (rotate_half: Llama, NeoX, HF) pairs dims ``i`` and ``i + R/2``; ``"interleaved"``
        (GPT-J) pairs dims ``2i`` and ``2i + 1``.
    rotary_dim: the first ``R`` dims of a head are rotated, the rest pass through (None: the whole head).
    theta: base of the inverse frequencies ``theta ** (-2i / R)``.
    inv_freq: ``[R/2]`` inverse frequencies; overrides ``theta`` (take HF's ``rotary_emb.inv_freq``).
    cos, sin: ``[P, R/2]`` tables indexed by position; override both of the above.
    scaling: multiplies cos and sin (HF's ``attention_scaling``).
    """

    style: str = "half"
    rotary_dim: int | None = None
    theta: float = 10000.0
    inv_freq: torch.Tensor | None = None
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None
    scaling: float = 1.0

    def __post_init__(self) -> None:
        if self.style not in STYLES:
            raise ValueError(f"rope.style must be one of {sorted(STYLES)}, got {self.style!r}")
        if (self.cos is None) != (self.sin is None):
            raise ValueError("rope.cos and rope.sin must be given together")

    def dim(self, head_dim: int) -> int:
        """The rotary dim R for heads of size ``head_dim``, checked."""
        r = head_dim if self.rotary_dim is None else self.rotary_dim
        if r <= 0 or r % 2 or r > head_dim:
            raise ValueError(f"rope.rotary_dim must be even and in [2, head_dim={head_dim}], got {r}")
        return r

    def cos_sin(self, positions: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 ``cos, sin`` of shape ``positions.shape + [R/2]`` on positions' device."""
        r = self.dim(head_dim)
        dev = positions.device
        if self.cos is not None:
            for name, t in (("rope.cos", self.cos), ("rope.sin", self.sin)):
                if t.dim() != 2 or t.shape[1] != r // 2:
                    raise ValueError(f"{name} must be [P, R/2={r // 2}], got shape {tuple(t.shape)}")
            if positions.numel() and int(positions.max()) >= self.cos.shape[0]:
                raise ValueError(f"positions must be < the rope table length {self.cos.shape[0]}")
            idx = positions.long()
            cos, sin = self.cos.to(dev, torch.float32)[idx], self.sin.to(dev, torch.float32)[idx]
        else:
            if self.inv_freq is not None:
                if self.inv_freq.shape != (r // 2,):
                    raise ValueError(f"rope.inv_freq must be [R/2={r // 2}], got {tuple(self.inv_freq.shape)}")
                inv_freq = self.inv_freq.to(dev, torch.float32)
            else:
                inv_freq = self.theta ** -(torch.arange(0, r, 2, device=dev, dtype=torch.float32) / r)
            angle = positions.to(torch.float32)[..., None] * inv_freq
            cos, sin = angle.cos(), angle.sin()
        if self.scaling != 1.0:
            cos, sin = cos * self.scaling, sin * self.scaling
        return cos.contiguous(), sin.contiguous()


def rope_args(rope: Rope | None, positions: torch.Tensor | None, default: Callable[[], torch.Tensor], batch: int,
              head_dim: int, device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None, int, int]:
    """An entry point's RoPE arguments as the normalised ops take them: ``(cos, sin, style, rotary_dim)`` for one
    position per sequence, ``(None, None, 0, 0)`` without ``rope``. ``positions`` (``[B]`` non-negative integers,
    checked) or, when None, ``default()`` (the op's own positions, valid by construction)."""
    if rope is None:
        return None, None, 0, 0
    if positions is None:
        positions = default()
    else:
        check_tensor("positions", positions, ndim=1, dtypes=INDEX_DTYPES, device=device, shape=(batch,), dims="[B]")
        check_index_range("positions", positions, 0, 2**31 - 1, "non-negative positions")
    cos, sin = rope.cos_sin(positions, head_dim)
    return cos, sin, STYLES[rope.style], rope.dim(head_dim)


def check_tables(cos: torch.Tensor | None, sin: torch.Tensor | None, batch: int, rotary_dim: int) -> None:
    """The normalised ops' per-row tables: cos and sin ``[B, R/2]`` when ``rotary_dim`` R > 0 (the references
    would broadcast a wrong shape silently; the kernels' launchers check the same)."""
    if rotary_dim:
        for name, t in (("cos", cos), ("sin", sin)):
            if t is None or tuple(t.shape) != (batch, rotary_dim // 2):
                raise ValueError(f"{name} must be [B, R/2] = [{batch}, {rotary_dim // 2}] when rotary_dim > 0, got "
                                 f"{None if t is None else tuple(t.shape)}")


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: int, rotary_dim: int) -> torch.Tensor:
    """Reference rotation of the first ``rotary_dim`` dims of ``x [..., D]``; ``cos``/``sin`` broadcast to
    ``[..., R/2]``. ``style`` is ``STYLES[name]``. Returns fp32 (float64 for float64 x)."""
    x = x if x.dtype == torch.float64 else x.float()
    r, h = rotary_dim, rotary_dim // 2
    rot, rest = x[..., :r], x[..., r:]
    if style == STYLES["half"]:
        a, b = rot[..., :h], rot[..., h:]
        out = torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)
    else:
        a, b = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack((a * cos - b * sin, b * cos + a * sin), dim=-1).flatten(-2)
    return torch.cat((out, rest), dim=-1)
