"""VGG-16 against torchvision's VGG, and every few-shot head the papers run on VGG-16 running on
it with no renaming (the reviewer's second experiment, issue 22)."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch
import torchvision
from fixtures_models import randomise_norms
from torch import Tensor, nn

from backbones import VGG, ResNet, WeightsError
from backbones.testing import check_backbone
from backbones.weights import torchvision_checkpoint_path
from tasks.heads import ASGNetHead, HSNetHead, PFENetHead, PrototypeHead
from tasks.segment import FewShotSegmentation

#: Where PFENet's ``get_vgg16_layer`` ends each stage in ``vgg16_bn().features`` (and the same
#: cut of the plain ``vgg16``).
STAGE_ENDS = {"vgg16_bn": (7, 14, 24, 34, 43), "vgg16": (5, 10, 17, 24, 30)}


def torchvision_vgg(arch: str, path: Path) -> nn.Module:
    reference = getattr(torchvision.models, arch)().eval()
    randomise_norms(reference)
    torch.save(reference.state_dict(), path)
    return reference


def every_module_output(features: nn.Sequential, x: Tensor) -> list[Tensor]:
    outputs = []
    for module in features:
        x = module(x)
        outputs.append(x.clone())  # torchvision's ReLUs run in place
    return outputs


@pytest.mark.parametrize("arch", ["vgg16_bn", "vgg16"])
def test_stages_and_blocks_equal_torchvision(arch: str, tmp_path: Path) -> None:
    """torchvision's file, loaded by path: each stage ends where PFENet cuts, each block's
    output is its ReLU's, each pre-activation tap the conv's (or BatchNorm's) output."""
    torch.manual_seed(0)
    reference = torchvision_vgg(arch, tmp_path / f"{arch}.pth")
    ours = VGG(arch, weights=str(tmp_path / f"{arch}.pth"), pool_ceil_mode=False).eval()
    ours.select_outputs(list(ours.output_info))
    image = torch.randn(1, 3, 70, 62)
    with torch.no_grad():
        expected = every_module_output(reference.features, image)
        got = ours(image)
    for stage, end in enumerate(STAGE_ENDS[arch]):
        torch.testing.assert_close(got[f"layer{stage}"], expected[end - 1], msg=f"layer{stage}")
    relus = [i for i, m in enumerate(reference.features) if isinstance(m, nn.ReLU)]
    blocks = [info for info in ours.output_info.values() if info.block is not None]
    for relu, (tap, output) in zip(relus, zip(blocks[::2], blocks[1::2], strict=True), strict=True):
        torch.testing.assert_close(got[output.name], expected[relu], msg=output.name)
        torch.testing.assert_close(got[tap.name], expected[relu - 1], msg=tap.name)
    assert [b.name for b in blocks[1::2]][:3] == ["conv1_1", "conv1_2", "conv2_1"]


def test_pfenet_pooling_rounds_up() -> None:
    """``pool_ceil_mode`` (the default) is PFENet's/BAM's ``model/vgg.py``: a 473 crop gives
    60x60 at stride 8 like their ResNets; torchvision's floor gives 59."""
    sizes = {}
    for ceil in (True, False):
        model = VGG(out_layers=["layer2", "layer3"], pool_ceil_mode=ceil).eval()
        with torch.no_grad():
            sizes[ceil] = [tuple(f.shape[-2:]) for f in model(torch.zeros(1, 3, 473, 473)).values()]
    assert sizes == {True: [(60, 60), (30, 30)], False: [(59, 59), (29, 29)]}


@pytest.mark.parametrize("options", [{}, {"arch": "vgg16", "pool_ceil_mode": False}])
def test_vgg_passes_the_backbone_checks(options: dict) -> None:
    model = VGG(**options)
    check_backbone(model, size=(40, 34))
    info = model.output_info
    assert [(s.name, s.channels, s.stride) for s in info.stages] == [
        ("layer0", 64, 2), ("layer1", 128, 4), ("layer2", 256, 8), ("layer3", 512, 16),
        ("layer4", 512, 16),
    ]  # fmt: skip
    assert [b.name for b in info.blocks(-1, pre_activation=True)] == [
        "conv5_1.pre_relu", "conv5_2.pre_relu", "conv5_3.pre_relu"
    ]  # fmt: skip


def test_torchvision_weight_name_uses_download_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    _, cached = torchvision_checkpoint_path("vgg16_bn", "IMAGENET1K_V1")
    cached.parent.mkdir(parents=True)
    reference = torchvision_vgg("vgg16_bn", cached)
    model = VGG(weights="IMAGENET1K_V1")
    assert torch.equal(model.layer3[4].running_var, reference.features[28].running_var)
    assert torch.equal(model.layer4[0].weight, reference.features[34].weight)


def test_weights_that_do_not_fit_list_the_keys(tmp_path: Path) -> None:
    torch.save(torchvision.models.vgg16().state_dict(), tmp_path / "vgg16.pth")
    torch.save({"layer0.0.weight": torch.zeros(64, 3, 3, 3)}, tmp_path / "partial.pth")
    torch.save(ResNet("resnet18").state_dict(), tmp_path / "resnet18.pth")
    with pytest.raises(WeightsError, match=r"do not fit backbone vgg16_bn: .*missing: "):
        VGG(weights=str(tmp_path / "vgg16.pth"))
    with pytest.raises(WeightsError, match=r"missing: layer0.0.bias"):
        VGG(weights=str(tmp_path / "partial.pth"))
    with pytest.raises(WeightsError, match=r"they hold a ResNet's stages"):
        VGG(weights=str(tmp_path / "resnet18.pth"))
    torch.save(VGG("vgg16").state_dict(), tmp_path / "plain.pth")
    with pytest.raises(WeightsError, match=r"they hold a vgg16; missing: layer0.1.bias"):
        VGG(weights=str(tmp_path / "plain.pth"))


def test_describe_rebuilds_without_the_weights_file(tmp_path: Path) -> None:
    torch.save(torchvision.models.vgg16_bn().state_dict(), tmp_path / "vgg.pth")
    description = VGG(weights=str(tmp_path / "vgg.pth"), pool_ceil_mode=False).describe()
    assert description == {
        "class_path": "backbones.vgg.VGG",
        "init_args": {"arch": "vgg16_bn", "out_layers": ["layer2", "layer3", "layer4"],
                      "weights": None, "weights_trusted": False, "pool_ceil_mode": False},
    }  # fmt: skip


def episode() -> tuple[Tensor, Tensor, Tensor]:
    generator = torch.Generator().manual_seed(0)
    masks = torch.zeros(2, 2, 64, 64, dtype=torch.long)
    masks[..., 12:44, 20:52] = 1
    query = torch.randn(2, 3, 64, 64, generator=generator)
    return query, torch.randn(2, 2, 3, 64, 64, generator=generator), masks


HEADS = {
    "prototype": partial(PrototypeHead, reduce_dim=16),
    "pfenet": partial(PFENetHead, reduce_dim=16, bins=[1.0, 0.5]),
    "asgnet": partial(ASGNetHead, reduce_dim=16, bins=[1.0, 0.5], superpixel_area=4),
    "hsnet": HSNetHead,
}


@pytest.mark.parametrize("head", HEADS)
def test_every_head_trains_on_vgg_with_no_renaming(head: str) -> None:
    """Each head selects its features from VGG's own description; a frozen VGG stays
    bit-identical through training steps (its BatchNorm statistics included)."""
    model = FewShotSegmentation(VGG(), head=HEADS[head], freeze_backbone=True)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.01)
    model.train()
    query, support, masks = episode()
    for _ in range(2):
        loss = model.loss(model(query, support, masks), masks[:, 0]).total
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in trainable)
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, before[key]), key
