"""DTL's compact side network on timm ViTs: starts as the backbone, trains only its own weights, keeps no activation
of the blocks before M, saves / loads only its own weights; the flow's claim direction on real data (slow)."""

from __future__ import annotations

import pytest
import torch
from helpers import requires_ext
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer

from effkern.methods.backbone import load_backbone
from effkern.methods.common import RunFileError
from effkern.methods.dtl import DTL

pytestmark = requires_ext

BACKBONES = {
    "packaged": load_backbone,
    "deit_distilled": lambda: VisionTransformerDistilled(img_size=48, patch_size=8, in_chans=3, embed_dim=48,
                                                         depth=4, num_heads=3, num_classes=0),
    "registers_avg": lambda: VisionTransformer(img_size=40, patch_size=10, in_chans=3, embed_dim=64, depth=5,
                                               num_heads=4, reg_tokens=2, global_pool="avg", num_classes=0),
}


def _images(vit, n=3):
    c, (h, w) = vit.patch_embed.proj.in_channels, vit.patch_embed.img_size
    return torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", BACKBONES)
@pytest.mark.parametrize("plus", [False, True])
def test_starts_as_the_frozen_backbone(name, plus):
    vit = BACKBONES[name]().eval()
    x = _images(vit)
    expected = vit.forward_features(x)
    dtl = DTL(vit, 5, plus=plus)
    torch.testing.assert_close(vit.norm(dtl.forward_features(x)), expected, rtol=0, atol=0)
    # after a step the up-projections are no longer zero and the features move
    opt = torch.optim.SGD([p for p in dtl.parameters() if p.requires_grad], lr=1.0)
    dtl(x).logsumexp(-1).sum().backward()
    dtl.head.weight.grad = torch.randn_like(dtl.head.weight)  # a zero head passes no gradient to the maps at first
    opt.step()
    opt.zero_grad()
    dtl(x).square().sum().backward()
    opt.step()
    assert not torch.allclose(vit.norm(dtl.forward_features(x)), expected)


def _spec_forward(dtl: DTL, x: torch.Tensor) -> torch.Tensor:
    """PAPERS.md B written out plainly: R += x_b A_b^T B_b^T; x_{b+1} = Block_b(x_b), + phi(R) for b >= M, DTL+'s
    convolution on the patch tokens only; mean of the patch tokens, the final norm, the head."""
    vit, p = dtl.vit, dtl.vit.num_prefix_tokens
    h = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
    r = torch.zeros_like(h)
    for b, block in enumerate(vit.blocks):
        r = r + h @ dtl.maps[b].u.T @ dtl.maps[b].v.T
        h = block(h)
        if b >= dtl.inject_after:
            phi = r * torch.sigmoid(dtl.beta * r)
            if dtl.conv is not None:
                grid = phi[:, p:].transpose(1, 2).reshape(len(x), -1, *vit.patch_embed.grid_size)
                phi = torch.cat([phi[:, :p], dtl.conv(grid).flatten(2).transpose(1, 2)], 1)
            h = h + phi
    return dtl.head(vit.fc_norm(vit.norm(h[:, p:].mean(1))))


@pytest.mark.parametrize("name", BACKBONES)
@pytest.mark.parametrize(("plus", "inject_after"), [(False, 1), (True, 2)])
def test_forward_follows_the_spec_with_trained_weights(name, plus, inject_after):
    vit = BACKBONES[name]().eval()
    dtl = DTL(vit, 5, plus=plus, inject_after=inject_after, beta=3.0)
    torch.manual_seed(1)
    for p in dtl.parameters():
        if p.requires_grad:
            p.data.normal_(std=0.3)
    x = _images(vit)
    torch.testing.assert_close(dtl(x), _spec_forward(dtl, x), rtol=1e-4, atol=1e-4)


def test_head_matches_timm_pooling_and_norm_at_init():
    """At init the features before the head are the backbone's own pre-logits where its pool is DTL's (mean of the
    patch tokens, normed after pooling: an avg-pool timm ViT)."""
    vit = BACKBONES["registers_avg"]().eval()
    dtl = DTL(vit, 5)
    seen = []
    dtl.head.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
    x = _images(vit)
    dtl(x)
    torch.testing.assert_close(seen[0], vit.forward_head(vit.forward_features(x), pre_logits=True), rtol=0, atol=0)


def test_swish_has_no_fp16_overflow():
    from effkern.methods.dtl.model import swish

    x = torch.tensor([-700.0, -1.0, 0.0, 1.0, 700.0], dtype=torch.float16)
    torch.testing.assert_close(swish(x, 100.0), (x.float() * torch.sigmoid(100 * x.float())).half())


def test_only_side_parameters_get_gradients():
    vit = load_backbone()
    dtl = DTL(vit, 10, plus=True)
    dtl.head.weight.data.normal_()
    frozen = {k: v.clone() for k, v in vit.state_dict().items()}
    loss = torch.nn.functional.cross_entropy(dtl(_images(vit, 4)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert all(p.grad is None for p in vit.parameters())
    side = {n for n, p in dtl.named_parameters() if p.requires_grad}
    assert side == {n for n, _ in dtl.named_parameters() if not n.startswith("vit.")}
    # maps of blocks after M reach the loss through frozen blocks; every side weight gets a gradient
    assert all(dict(dtl.named_parameters())[n].grad is not None for n in side)
    assert all(torch.equal(frozen[k], v) for k, v in vit.state_dict().items())


@pytest.mark.parametrize("inject_after", [0, 3, 5])
def test_blocks_up_to_m_save_nothing_for_backward(inject_after):
    vit = load_backbone()
    dtl = DTL(vit, 10, inject_after=inject_after)
    current, saved = [None], {}

    def enter(index):
        return lambda *_: current.__setitem__(0, index)

    handles = [b.register_forward_pre_hook(enter(i)) for i, b in enumerate(vit.blocks)]
    handles += [b.register_forward_hook(lambda *_: current.__setitem__(0, None)) for b in vit.blocks]

    def pack(t):
        if current[0] is not None:
            saved[current[0]] = saved.get(current[0], 0) + t.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        dtl(_images(vit, 2)).sum().backward()
    for h in handles:
        h.remove()
    assert set(saved) == set(range(inject_after + 1, len(vit.blocks)))  # blocks after M do keep activations


def test_saves_and_loads_only_its_own_weights(tmp_path):
    vit = load_backbone()
    dtl = DTL(vit, 10, plus=True)
    for p in dtl.parameters():
        if p.requires_grad:
            p.data.normal_()
    path = tmp_path / "dtl.safetensors"
    dtl.save(path)
    assert path.stat().st_size < 40_000  # the side weights (5,514 floats), not the 4.8 MB backbone
    other = DTL(load_backbone(), 10, plus=True).load(path)
    x = _images(vit)
    torch.testing.assert_close(other(x), dtl(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="other settings"):
        DTL(load_backbone(), 10).load(path)  # no convolution
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(RunFileError, match="dtl.safetensors"):
        other.load(path)


def test_bad_settings():
    vit = load_backbone()
    with pytest.raises(ValueError, match="inject_after"):
        DTL(vit, 10, inject_after=6)
    with pytest.raises(ValueError, match="pool"):
        DTL(vit, 10, pool="max")
    dynamic = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, dynamic_img_size=True)
    with pytest.raises(ValueError, match="fixed patch grid"):
        DTL(dynamic, 10, plus=True)


@pytest.mark.slow
def test_dtl_beats_the_linear_probe_on_a_real_task(tmp_path):
    """The claim direction on one real mini-VTAB task: DTL above the linear probe (5 epochs each)."""
    from effkern.methods.dtl.config import DTLConfig
    from effkern.methods.dtl.flow import run as run_dtl
    from effkern.methods.last.config import LastConfig
    from effkern.methods.last.flow import run as run_last

    common = dict(tasks=("rotation",), epochs=5, cost_steps=0, progress=False)
    dtl = run_dtl(DTLConfig(methods=("dtl",), out=str(tmp_path / "dtl"), **common))
    probe = run_last(LastConfig(methods=("linear_probe",), out=str(tmp_path / "last"), **common))
    assert dtl[0]["accuracy"] > probe[0]["accuracy"] + 0.02, (dtl[0], probe[0])
