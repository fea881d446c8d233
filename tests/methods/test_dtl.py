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
