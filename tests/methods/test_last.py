"""LAST side networks on a tiny random timm ViT: features, the bias-corrected start point, the K-parallel
training equivalence and the per-network AdamW."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, assert_close_scaled, requires_ext
from timm.models.vision_transformer import VisionTransformer

from effkern.methods.last import LASTSide, StackedAdamW, accuracy, group_features, train_side
from effkern.ops import low_rank_attention

pytestmark = requires_ext


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return VisionTransformer(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=4, num_heads=2,
                             num_classes=0).eval()


def data(n=48, seed=0):
    """Images whose label is the brighter half (left/right): learnable, not trivially constant."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 16, 16, generator=g)
    y = (x[..., :8].mean((1, 2, 3)) > x[..., 8:].mean((1, 2, 3))).long()
    return x, y


def side_for(vit, feats, k=1, **kwargs):
    torch.manual_seed(1)
    group_size = len(vit.blocks) // (len(feats) - 1)
    return LASTSide(vit, 2, rank=8, heads=2, group_size=group_size, num_networks=k, **kwargs)


def test_group_features_are_the_backbone_stream(vit):
    x, _ = data(4)
    feats = group_features(vit, x, 2)
    assert len(feats) == 3 and all(f.shape == (4, 17, 32) for f in feats)
    with torch.no_grad():
        assert_close(vit.norm(feats[-1]), vit.forward_features(x))
    with pytest.raises(ValueError, match="group_size must divide the backbone depth 4"):
        group_features(vit, x, 3)


def plain_side(side, feats):
    """PAPERS.md A written out: u_0 = z_0, h_i = u_{i-1} + z_i, u_i = h_i + LSA_i(LN(h_i)); the corrected feature
    z_m + sum_i LSA_i(.) (or u_m), the final norm on every token, the pool, the K heads."""
    u, deltas = feats[0], 0
    for block, z in zip(side.blocks, feats[1:], strict=True):
        h = u + z
        delta = low_rank_attention(F.layer_norm(h, h.shape[-1:]), block.w_qkv, block.w_o, heads=block.heads)
        u, deltas = h + delta, deltas + delta
    out = side.norm(feats[-1] + deltas if side.bias_correction else u)
    pooled = side.fc_norm(out[..., 0, :] if side.pool == "cls" else out[..., 1:, :].mean(-2))
    return torch.baddbmm(side.head_bias[:, None], pooled, side.head_weight)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("pool, bias_correction", [("cls", True), ("mean", True), ("cls", False), ("mean", False)])
def test_side_network_is_the_papers_side_stream(vit, pool, bias_correction, k):
    """LASTSide's fused blocks, cls-only final norm and subtractive bias correction compute the plain formulas."""
    x, y = data(6)
    feats = group_features(vit, x, 1)
    side = side_for(vit, feats, k=k, pool=pool, bias_correction=bias_correction)
    with torch.no_grad():
        for p in side.parameters():
            if p.requires_grad:
                p.normal_(std=0.3)
    params = [p for p in side.parameters() if p.requires_grad]
    got, want = side(feats), plain_side(side, feats)
    assert_close(got, want)
    for a, b in zip(torch.autograd.grad(got.square().sum(), params), torch.autograd.grad(want.square().sum(), params),
                    strict=True):
        assert_close_scaled(a, b)


def test_starts_as_the_linear_probe_on_the_final_feature(vit):
    """Zero-initialised up-projections: with the bias correction the side network's feature is the backbone's
    final feature, so the model is a linear probe on vit.forward_features' cls token."""
    x, _ = data(4)
    feats = group_features(vit, x, 2)
    side = side_for(vit, feats, k=2)
    with torch.no_grad():
        side.head_weight.normal_()
        expected = vit.forward_features(x)[:, 0] @ side.head_weight + side.head_bias[:, None]
    assert_close(side(feats), expected)
    uncorrected = side_for(vit, feats, bias_correction=False)
    assert not torch.allclose(uncorrected.norm(sum(feats)), vit.forward_features(x))


HEAD_PATHS = {  # timm head paths: the norm before or after the pool, prefix tokens (cls, registers) or none
    "token": dict(),
    "token+registers": dict(reg_tokens=2),
    "avg (fc_norm)": dict(global_pool="avg"),
    "avg, registers, no cls": dict(global_pool="avg", class_token=False, reg_tokens=2),
    "avg, norm before the pool": dict(global_pool="avg", fc_norm=False),
    "avg over every token": dict(global_pool="avg", pool_include_prefix=True, reg_tokens=1),
}


@pytest.mark.parametrize("config", HEAD_PATHS)
def test_zero_side_network_is_the_backbones_own_head_path(config):
    """With the up-projections at zero LAST's feature is the backbone's final feature, so its logits are a linear
    head on exactly what timm's forward_head feeds its classifier: the same tokens pooled, the same norms."""
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2,
                            num_classes=0, **HEAD_PATHS[config]).eval()
    with torch.no_grad():  # norms that are not the identity, so a missing or misplaced one shows
        for norm in (vit.norm, vit.fc_norm):
            for p in norm.parameters():
                p.normal_()
    x, _ = data(3)
    feats = group_features(vit, x, 1)
    with torch.no_grad():
        want = vit.forward_head(vit.forward_features(x), pre_logits=True)
    for probe in (False, True):
        side = LASTSide(vit, 5, rank=8, num_networks=2, probe=probe)
        with torch.no_grad():
            side.head_weight.normal_()
            side.head_bias.normal_()
            got = side(feats[-1:] if probe else feats)
        assert_close(got, want @ side.head_weight + side.head_bias[:, None])


def test_k_networks_train_exactly_like_k_separate_runs(vit):
    x, y = data()
    feats = group_features(vit, x, 2)
    lrs = [3e-3, 1e-2, 3e-2]
    parallel = side_for(vit, feats, k=3)
    singles = []
    for k in range(3):
        single = side_for(vit, feats)
        with torch.no_grad():
            for p, q in zip(single.parameters(), parallel.parameters(), strict=True):
                if p.requires_grad:
                    p.copy_(q[k : k + 1])
        singles.append(single)
    train_side(parallel, feats, y, lrs=lrs, epochs=3, batch_size=16, progress=False)
    for k, single in enumerate(singles):
        train_side(single, feats, y, lrs=[lrs[k]], epochs=3, batch_size=16, progress=False)
        for p, q in zip(single.parameters(), parallel.parameters(), strict=True):
            if p.requires_grad:
                torch.testing.assert_close(p[0], q[k], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(parallel.head_weight[0], parallel.head_weight[2])  # the lrs did differ


def test_training_fits_the_training_set(vit):
    x, y = data(64)
    feats = group_features(vit, x, 2)
    side = side_for(vit, feats, k=2)
    before = accuracy(side, feats, y)
    history = train_side(side, feats, y, lrs=[1e-2, 3e-2], epochs=15, batch_size=16, progress=False)
    assert history[-1] < 0.5 * history[0]
    assert (accuracy(side, feats, y) > torch.maximum(before, torch.tensor(0.8))).all()


def test_stacked_adamw_with_one_model_is_torch_adamw():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(1, 5, 3))
    b = torch.nn.Parameter(a.detach().clone())
    ours = StackedAdamW([a], [0.01], weight_decay=0.1)
    ref = torch.optim.AdamW([b], lr=0.01, weight_decay=0.1)
    for step in range(5):
        grad = torch.randn(1, 5, 3, generator=torch.Generator().manual_seed(step))
        a.grad, b.grad = grad.clone(), grad.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(a, b)


def test_bad_arguments(vit):
    with pytest.raises(ValueError, match="stacked over the 2 models"):
        StackedAdamW([torch.nn.Parameter(torch.zeros(3, 4))], [1e-3, 1e-3])
    with pytest.raises(ValueError, match="positive learning rates"):
        StackedAdamW([torch.nn.Parameter(torch.zeros(1, 4))], [])
    with pytest.raises(ValueError, match="pool must be"):
        LASTSide(vit, 2, pool="max")
    with pytest.raises(ValueError, match="group_size must divide the backbone depth 4"):
        LASTSide(vit, 2, group_size=3)
    side = LASTSide(vit, 2, group_size=2)
    with pytest.raises(ValueError, match=r"expected 3 features \[z_0..z_m\]"):
        side([torch.zeros(1, 17, 32)] * 2)
    no_cls = VisionTransformer(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2,
                               class_token=False, reg_tokens=1, global_pool="avg")
    with pytest.raises(ValueError, match="pool='cls' needs a backbone with a cls token"):
        LASTSide(no_cls, 2, pool="cls")
    with pytest.raises(ValueError, match="global_pool='max' has no LAST counterpart"):
        LASTSide(VisionTransformer(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2,
                                   global_pool="max"), 2)
