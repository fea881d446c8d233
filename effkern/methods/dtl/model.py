"""DTL (PAPERS.md B): a compact side network (CSN) of low-rank maps that disentangles the trainable part from a
frozen timm ``VisionTransformer``, without forking the model.

With ``x_b`` the input of block ``b`` and the running sum ``R_b = sum_{j <= b} x_j A_j^T B_j^T`` (``A_j [r, d]``
kaiming-uniform, ``B_j [d, r]`` zero, so the model starts as the backbone), block ``b >= M`` gets
``phi(R_b) = R_b * sigmoid(beta R_b)`` (swish, beta 100: nearly ReLU) added to its output. DTL+ passes ``phi(R_b)``
of the patch tokens through one depthwise 3x3 convolution over the patch grid, shared by every injection (the
prefix tokens, cls / distillation / registers, skip it). Blocks ``0..M`` see no injected feature, so they run
without autograd state: none of their activations is kept; only the CSN's inputs are (one ``[B, N, d]`` per map).
Head (DTL's): the mean of the patch tokens (the prefix tokens too where the backbone's own pool includes them),
the backbone's frozen final norm after pooling (``vit.norm``, or ``vit.fc_norm`` on an ``avg``-pool ViT, where
``vit.norm`` is the identity), a trainable linear layer.

The maps run on effkern's fused ``low_rank_linear`` (the rank-r hidden layer is never stored).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from effkern.methods.common import read_safetensors, write_safetensors
from effkern.nn import LowRankLinear


def swish(x: torch.Tensor, beta: float) -> torch.Tensor:
    """``x * sigmoid(beta x)``, written so because ``silu(beta x) / beta`` overflows to NaN in fp16."""
    return x * torch.sigmoid(x * beta)


class DTL(nn.Module):
    """A timm ``VisionTransformer`` (frozen, kept as ``self.vit``) with DTL's compact side network and a head.

    Args:
        vit: the backbone; any depth, width, patch and image size, with or without distillation / register tokens.
            Its parameters are frozen here (``requires_grad_(False)``); it is not copied.
        num_classes: classes of the head.
        rank: r of every low-rank map (DTL: 2 for ViTs).
        inject_after: M: the first block whose output receives ``phi(R)`` (DTL: 6 of 12 blocks); None: depth // 2.
        beta: the swish's beta (DTL: 100).
        plus: DTL+ (the shared depthwise 3x3 convolution over the patch grid).
        pool: ``"mean"`` of the patch tokens (DTL) or ``"cls"``.

    ``forward(x)``: the backbone's input (e.g. normalised images ``[B, C, H, W]``) -> logits ``[B, num_classes]``;
    ``forward_features(x)``: the final tokens ``[B, N, d]`` before the norm.
    """

    def __init__(self, vit: nn.Module, num_classes: int, *, rank: int = 2, inject_after: int | None = None,
                 beta: float = 100.0, plus: bool = False, pool: str = "mean"):
        super().__init__()
        depth, dim = len(vit.blocks), vit.embed_dim
        inject_after = depth // 2 if inject_after is None else inject_after
        if not 0 <= inject_after < depth:
            raise ValueError(f"inject_after must be a block index in [0, {depth - 1}], got {inject_after}")
        if rank < 1 or num_classes < 1 or beta <= 0:
            raise ValueError(f"rank and num_classes must be >= 1 and beta > 0, got {rank}, {num_classes}, {beta}")
        if pool not in ("mean", "cls"):
            raise ValueError(f"pool must be 'mean' or 'cls', got {pool!r}")
        if pool == "cls" and getattr(vit, "cls_token", None) is None:
            raise ValueError("pool='cls' needs a backbone with a cls token")
        self.vit = vit.requires_grad_(False).eval()
        self.inject_after, self.beta, self.pool = inject_after, beta, pool
        self.pool_start = 0 if getattr(vit, "pool_include_prefix", False) else vit.num_prefix_tokens
        self.maps = nn.ModuleList(LowRankLinear(dim, dim, rank, bias=False) for _ in range(depth))
        for low_rank in self.maps:
            nn.init.zeros_(low_rank.v)  # B = 0: the model starts exactly as the backbone
        self.conv = None
        if plus:
            if getattr(vit, "dynamic_img_size", False):
                raise ValueError("DTL+ needs a fixed patch grid (a backbone without dynamic_img_size)")
            self.grid = tuple(vit.patch_embed.grid_size)
            self.conv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim, bias=False)
        self.head = nn.Linear(dim, num_classes)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def train(self, mode: bool = True) -> DTL:
        super().train(mode)
        # frozen: its dropout / drop-path stay off (DTL's recipe trains with drop-path 0-0.2 per task; not here)
        self.vit.eval()
        return self

    def _inject(self, r: torch.Tensor) -> torch.Tensor:
        out = swish(r, self.beta)
        if self.conv is None:
            return out
        p = self.vit.num_prefix_tokens
        patches = out[:, p:].transpose(1, 2).unflatten(2, self.grid)  # [B, d, H', W']
        return torch.cat([out[:, :p], self.conv(patches).flatten(2).transpose(1, 2)], 1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        vit = self.vit
        with torch.no_grad():
            h = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
        r = None
        for b, (block, low_rank) in enumerate(zip(vit.blocks, self.maps, strict=True)):
            r = low_rank(h) if r is None else r + low_rank(h)
            if b <= self.inject_after:  # its input carries no injected feature yet: nothing to keep for backward
                with torch.no_grad():
                    h = block(h)
            else:
                h = block(h)
            if b >= self.inject_after:
                h = h + self._inject(r)
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.forward_features(x)
        pooled = h[:, 0] if self.pool == "cls" else h[:, self.pool_start:].mean(1)
        return self.head(self.vit.fc_norm(self.vit.norm(pooled)))

    def side_state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable weights only (CSN maps, DTL+'s convolution, head): what :meth:`save` writes."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("vit.")}

    def save(self, path: str | os.PathLike) -> None:
        """Write :meth:`side_state_dict` (safetensors, atomically; the backbone is not saved)."""
        write_safetensors(path, self.side_state_dict())

    def load(self, path: str | os.PathLike) -> DTL:
        """Load weights written by :meth:`save` of a DTL with the same settings; ValueError naming the file if they
        do not match."""
        tensors = read_safetensors(path)
        mine = self.side_state_dict()
        if tensors.keys() != mine.keys() or any(tensors[k].shape != v.shape for k, v in mine.items()):
            raise ValueError(f"{path} holds DTL weights of other settings (keys or shapes differ: "
                             f"{sorted(set(tensors) ^ set(mine)) or 'shapes'})")
        self.load_state_dict(tensors, strict=False)
        return self

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)
