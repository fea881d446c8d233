"""The shared ViT backbone: pretraining writes loadable weights, resumes after an interruption, and learns."""

from __future__ import annotations

import pytest
import torch

from effkern.methods import backbone
from effkern.methods.backbone import load_backbone, make_backbone, pretrain_backbone

pytest.importorskip("zarr", reason="MNIST needs zarr (pip install zarr==3.1.6)")


def test_pretrain_resume_and_load(tmp_path, monkeypatch):
    small = dict(embed_dim=32, depth=2, num_heads=2)
    monkeypatch.setattr(backbone, "VIT_CONFIG", {**backbone.VIT_CONFIG, **small})
    out = tmp_path / "vit.safetensors"
    pretrain_backbone(out, epochs=1, batch_size=64, max_images=512, progress=False)
    ckpt = out.with_name(out.name + ".ckpt")
    assert torch.load(ckpt, weights_only=True)["epoch"] == 1
    first = load_backbone(out)
    # a second call with more epochs resumes from the checkpoint (epoch 1 is not redone) and changes the weights
    pretrain_backbone(out, epochs=2, batch_size=64, max_images=512, progress=False)
    assert torch.load(ckpt, weights_only=True)["epoch"] == 2
    second = load_backbone(out)
    assert not torch.equal(first.patch_embed.proj.weight, second.patch_embed.proj.weight)
    feats = second.forward_features(torch.zeros(2, 1, 32, 32))
    assert feats.shape == (2, 65, 32)


def test_missing_backbone_says_how_to_make_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="effkern pretrain-backbone"):
        load_backbone(tmp_path / "none.safetensors")


def test_augmentation_keeps_background_and_shape():
    x = -torch.ones(4, 1, 32, 32)
    x[:, :, 12:20, 12:20] = 1.0
    y = backbone._augment(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and y.min() >= -1.0 - 1e-6 and (y == -1).float().mean() > 0.5
    assert make_backbone().patch_embed.num_patches == 64
