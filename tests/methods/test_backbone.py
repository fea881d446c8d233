"""The shared ViT backbone: pretraining writes loadable weights, resumes after an interruption, and learns."""

from __future__ import annotations

import pytest
import torch

from effkern.methods.backbone import WEIGHTS_NAME, load_backbone, make_backbone, model
from effkern.methods.backbone import flow as backbone
from effkern.methods.backbone.config import BackboneConfig

pytest.importorskip("zarr", reason="MNIST needs zarr (pip install zarr==3.1.6)")


def test_pretrain_resumes_after_an_interruption_and_loads(tmp_path, monkeypatch):
    monkeypatch.setattr(model, "VIT_CONFIG", {**model.VIT_CONFIG, **dict(embed_dim=32, depth=2, num_heads=2)})
    cfg = BackboneConfig.preset("smoke", epochs=2, out=str(tmp_path), progress=False)
    save = backbone.save_state

    def interrupted(path, state):
        save(path, state)
        raise KeyboardInterrupt  # after the first epoch's checkpoint

    monkeypatch.setattr(backbone, "save_state", interrupted)
    with pytest.raises(KeyboardInterrupt):
        backbone.run(cfg)
    monkeypatch.setattr(backbone, "save_state", save)
    rows = backbone.run(cfg)  # resumes: epoch 1 is not trained again
    assert [r["epoch"] for r in rows] == [1, 2] and rows[0]["method"] == "supervised"
    vit = load_backbone(tmp_path / WEIGHTS_NAME)
    assert vit.forward_features(torch.zeros(2, 1, 32, 32)).shape == (2, 65, 32)


def test_missing_backbone_says_how_to_make_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="effkern backbone"):
        load_backbone(tmp_path / "none.safetensors")


def test_augmentation_keeps_background_and_shape():
    x = -torch.ones(4, 1, 32, 32)
    x[:, :, 12:20, 12:20] = 1.0
    y = backbone._augment(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and y.min() >= -1.0 - 1e-6 and (y == -1).float().mean() > 0.5
    assert make_backbone().patch_embed.num_patches == 64
