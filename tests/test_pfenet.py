"""PFENet: the head, the backbone's masked support path and the official checkpoint option
against a reference written from the official ``model/PFENet.py`` (dvlab-research/PFENet):
its module names, shapes, concatenation orders, interpolation modes and eps values, with the
official PSPNet encoder built from torchvision's Bottleneck and patched as the official code
patches it."""

from __future__ import annotations

import copy
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from fixtures_models import randomise_norms
from torch import Tensor, nn
from torchvision.models.resnet import Bottleneck

from backbones import VGG, ResNet, WeightsError
from tasks.heads import PFENetHead
from tasks.heads.pfenet import prior_mask
from tasks.scoring import upsample
from tasks.segment import FewShotSegmentation

IMAGE = 65  # the official forward asserts (H - 1) % 8 == 0; 9x9 features


def interp(x: Tensor, size: tuple[int, int]) -> Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


def official_stage(inplanes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    down = nn.Sequential(
        nn.Conv2d(inplanes, planes * 4, 1, stride=stride, bias=False), nn.BatchNorm2d(planes * 4)
    )
    first = Bottleneck(inplanes, planes, stride, down)
    return nn.Sequential(first, *(Bottleneck(planes * 4, planes) for _ in range(blocks - 1)))


def weighted_gap(feat: Tensor, mask: Tensor) -> Tensor:
    """Official ``Weighted_GAP``: area from avg_pool2d times the size, plus 0.0005."""
    feat = feat * mask
    h, w = feat.shape[-2:]
    area = F.avg_pool2d(mask, (h, w)) * h * w + 0.0005
    return F.avg_pool2d(feat, (h, w)) * h * w / area


def official_vgg16_bn_layers() -> list[nn.Sequential]:
    """``get_vgg16_layer`` of ``model/PFENet.py`` on its ``model/vgg.py`` ``vgg16_bn``
    (torchvision's, with ``ceil_mode=True`` max-pools)."""
    features = torchvision.models.vgg16_bn().features
    for i, module in enumerate(features):
        if isinstance(module, nn.MaxPool2d):
            features[i] = nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True)
    cuts = [(0, 7), (7, 14), (14, 24), (24, 34), (34, 43)]
    return [nn.Sequential(*(features[i] for i in range(a, b))) for a, b in cuts]


class ReferencePFENet(nn.Module):
    """``model/PFENet.py``'s ResNet-50 model (or its ``vgg=True`` VGG-16 model), written from
    its definitions (eval-mode output and the inner classifiers' outputs)."""

    def __init__(self, bins: list[float], shot: int, vgg: bool = False) -> None:
        super().__init__()
        self.shot, self.bins, self.vgg = shot, bins, vgg
        self.layer0 = nn.Sequential(
            nn.Conv2d(3, 64, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.Conv2d(64, 128, 3, padding=1, bias=False),
            nn.BatchNorm2d(128),
            nn.ReLU(),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        self.layer1 = official_stage(128, 64, 3, 1)
        self.layer2 = official_stage(256, 128, 4, 2)
        self.layer3 = official_stage(512, 256, 6, 2)
        self.layer4 = official_stage(1024, 512, 3, 2)
        for layer, rate in ((self.layer3, 2), (self.layer4, 4)):
            for name, module in layer.named_modules():
                if "conv2" in name:
                    module.dilation = module.padding = (rate, rate)
                    module.stride = (1, 1)
                elif "downsample.0" in name:
                    module.stride = (1, 1)
        if vgg:
            self.layer0, self.layer1, self.layer2, self.layer3, self.layer4 = (
                official_vgg16_bn_layers()
            )
        fea_dim = 512 + 256 if vgg else 1024 + 512
        r = 256

        def classifier() -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(r, r, 3, padding=1, bias=False),
                nn.ReLU(),
                nn.Dropout2d(0.1),
                nn.Conv2d(r, 2, 1),
            )

        def reduce() -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(fea_dim, r, 1, bias=False), nn.ReLU(), nn.Dropout2d(0.5))

        def double() -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(r, r, 3, padding=1, bias=False),
                nn.ReLU(),
                nn.Conv2d(r, r, 3, padding=1, bias=False),
                nn.ReLU(),
            )

        self.cls, self.down_query, self.down_supp = classifier(), reduce(), reduce()
        self.init_merge = nn.ModuleList(
            nn.Sequential(nn.Conv2d(2 * r + 1, r, 1, bias=False), nn.ReLU()) for _ in bins
        )
        self.beta_conv = nn.ModuleList(double() for _ in bins)
        self.inner_cls = nn.ModuleList(classifier() for _ in bins)
        self.res1 = nn.Sequential(nn.Conv2d(r * len(bins), r, 1, bias=False), nn.ReLU())
        self.res2 = double()
        self.alpha_conv = nn.ModuleList(
            nn.Sequential(nn.Conv2d(512, 256, 1, bias=False), nn.ReLU()) for _ in bins[1:]
        )

    def forward(self, x: Tensor, s_x: Tensor, s_y: Tensor) -> tuple[Tensor, list[Tensor]]:
        h, w = x.shape[-2:]
        q2 = self.layer2(self.layer1(self.layer0(x)))
        q3 = self.layer3(q2)
        q4 = self.layer4(q3)
        if self.vgg:
            q2 = interp(q2, q3.shape[-2:])
        query_feat = self.down_query(torch.cat([q3, q2], 1))
        supp_feats, finals, masks = [], [], []
        for i in range(self.shot):
            mask = (s_y[:, i] == 1).float().unsqueeze(1)
            masks.append(mask)
            s2 = self.layer2(self.layer1(self.layer0(s_x[:, i])))
            s3 = self.layer3(s2)
            mask = interp(mask, s3.shape[-2:])
            finals.append(self.layer4(s3 * mask))
            if self.vgg:
                s2 = interp(s2, s3.shape[-2:])
            supp = self.down_supp(torch.cat([s3, s2], 1))
            supp_feats.append(weighted_gap(supp, mask))
        priors = []
        for i, s4 in enumerate(finals):
            side = s4.size(2)
            s = s4 * interp(masks[i], (side, side))
            bsize, ch, sp, _ = q4.shape
            tq = q4.contiguous().view(bsize, ch, -1)
            tq_norm = torch.norm(tq, 2, 1, True)
            ts = s.contiguous().view(bsize, ch, -1).permute(0, 2, 1)
            ts_norm = torch.norm(ts, 2, 2, True)
            sim = torch.bmm(ts, tq) / (torch.bmm(ts_norm, tq_norm) + 1e-7)
            sim = sim.max(1)[0].view(bsize, sp * sp)
            low, high = sim.min(1)[0].unsqueeze(1), sim.max(1)[0].unsqueeze(1)
            sim = (sim - low) / (high - low + 1e-7)
            priors.append(interp(sim.view(bsize, 1, sp, sp), q3.shape[-2:]))
        prior = torch.cat(priors, 1).mean(1).unsqueeze(1)
        prior = interp(prior, query_feat.shape[-2:])
        supp_feat = sum(supp_feats) / len(supp_feats)
        out_list, pyramid = [], []
        for idx, tmp_bin in enumerate(self.bins):
            size = int(query_feat.shape[2] * tmp_bin) if tmp_bin <= 1.0 else int(tmp_bin)
            query_bin = nn.AdaptiveAvgPool2d(size)(query_feat)
            merge = torch.cat(
                [query_bin, supp_feat.expand(-1, -1, size, size), interp(prior, (size, size))], 1
            )
            merge = self.init_merge[idx](merge)
            if idx >= 1:
                previous = interp(pyramid[idx - 1].clone(), (size, size))
                merge = self.alpha_conv[idx - 1](torch.cat([merge, previous], 1)) + merge
            merge = self.beta_conv[idx](merge) + merge
            out_list.append(self.inner_cls[idx](merge))
            pyramid.append(interp(merge, query_feat.shape[-2:]))
        feat = self.res1(torch.cat(pyramid, 1))
        feat = self.res2(feat) + feat
        return interp(self.cls(feat), (h, w)), out_list


def write_official(reference: ReferencePFENet, path: Path) -> Path:
    """Saved as the official ``train.py`` saves: ``{"epoch", "state_dict", "optimizer"}`` with
    DataParallel's ``module.`` prefix."""
    state = {f"module.{k}": v for k, v in reference.state_dict().items()}
    torch.save({"epoch": 200, "state_dict": state, "optimizer": {}}, path)
    return path


def episode(batch: int, shots: int, seed: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, 3, IMAGE, IMAGE, generator=generator)
    support = torch.randn(batch, shots, 3, IMAGE, IMAGE, generator=generator)
    masks = torch.zeros(batch, shots, IMAGE, IMAGE, dtype=torch.long)
    for b in range(batch):
        for k in range(shots):
            y, x = torch.randint(0, 30, (2,), generator=generator).tolist()
            masks[b, k, y : y + 30, x : x + 34] = 1
    masks[:, :, 40:44] = 255
    return query, support, masks


def official_model_and_reference(
    bins: list[float], shots: int, path: Path, vgg: bool = False
) -> tuple[FewShotSegmentation, ReferencePFENet]:
    """A random reference (eval mode), saved in the official layout and loaded through
    ``official_checkpoint`` with the head's bins."""
    torch.manual_seed(0)
    reference = ReferencePFENet(bins, shots, vgg=vgg)
    randomise_norms(reference)
    reference.eval()
    model = FewShotSegmentation(
        official_checkpoint=str(write_official(reference, path)),
        head=partial(PFENetHead, bins=bins),
    ).eval()
    return model, reference


def assert_official_outputs(model: FewShotSegmentation, reference: ReferencePFENet) -> None:
    """The logits and inner-classifier logits of both on one episode, to float32 precision."""
    query, support, masks = episode(2, reference.shot)
    with torch.no_grad():
        expected, expected_aux = reference(query, support, masks)
        output = model(query, support, masks)
    scale = expected.abs().max().item()
    torch.testing.assert_close(
        upsample(output.logits, (IMAGE, IMAGE)), expected, rtol=1e-5, atol=1e-5 * scale
    )
    for aux, ref in zip(output.aux_logits, expected_aux, strict=True):
        torch.testing.assert_close(aux, ref, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize(
    ("bins", "shots"), [([9, 5, 3, 2], 1), ([1.0, 0.5, 0.25, 0.125], 3)], ids=["pascal", "coco"]
)
def test_official_checkpoint_matches_official_forward(
    bins: list[float], shots: int, tmp_path: Path
) -> None:
    """A checkpoint in the official layout, loaded through ``official_checkpoint``, gives the
    official forward's logits and inner-classifier logits (eval mode) to float32 precision."""
    path = tmp_path / "train_epoch_200_0.5.pth"
    model, reference = official_model_and_reference(bins, shots, path)
    assert model.backbone.summary()[1] == "resnet50-deep-os8-uniform"
    assert model.hparams.freeze_backbone and model.head.init_args["bins"] == bins
    assert_official_outputs(model, reference)


def test_official_vgg_checkpoint_matches_official_forward(tmp_path: Path) -> None:
    """A released-layout PFENet VGG-16 model (its COCO models) loads through
    ``official_checkpoint`` into :class:`backbones.VGG` and the same head class, no renaming,
    and gives the official forward's logits."""
    bins = [1.0, 0.5, 0.25]  # the COCO bins but 0.125, which 5x5 features make 0 officially
    model, reference = official_model_and_reference(bins, 2, tmp_path / "vgg.pth", vgg=True)
    assert isinstance(model.backbone, VGG) and model.backbone.summary()[1] == "vgg16_bn"
    assert model.head.in_features == ("layer3", "layer2", "layer4")
    assert_official_outputs(model, reference)


def test_prior_matches_official_formula_on_non_trivial_masks() -> None:
    """The prior alone against the official bmm formula, per shot then averaged, with the
    support mask applied to layer4 and the ignore label 255 not foreground."""
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(2, 16, 7, 7, generator=generator)
    support = torch.randn(2, 3, 16, 7, 7, generator=generator)
    masks = torch.randint(0, 2, (2, 3, 49, 49), generator=generator)
    masks[:, :, :10] = 255
    prior = prior_mask(query, support, masks, (13, 13))
    expected = []
    for k in range(3):
        mask = interp((masks[:, k] == 1).float().unsqueeze(1), (7, 7))
        s = (support[:, k] * mask).flatten(2).transpose(1, 2)
        q = query.flatten(2)
        sim = torch.bmm(s, q) / (torch.bmm(s.norm(2, 2, True), q.norm(2, 1, True)) + 1e-7)
        sim = sim.max(1)[0]
        sim = (sim - sim.min(1, True)[0]) / (sim.max(1, True)[0] - sim.min(1, True)[0] + 1e-7)
        expected.append(interp(sim.view(2, 1, 7, 7), (13, 13)))
    torch.testing.assert_close(prior, torch.cat(expected, 1).mean(1, keepdim=True))


def test_support_layer4_is_computed_from_masked_layer3() -> None:
    """The task gives the head the support's layer4 of ``layer3 * mask`` and the query's plain
    layer4; layer4 gets no gradient, the rest of a fine-tuned encoder does."""
    torch.manual_seed(0)
    encoder = ResNet("resnet18", output_stride=8)
    model = FewShotSegmentation(encoder, head=partial(PFENetHead, reduce_dim=16)).eval()
    seen = {}
    model.head.register_forward_pre_hook(lambda _, args: seen.update(q=args[0], s=args[1]))
    query, support, masks = episode(2, 2)
    output = model(query, support, masks)
    reference = ResNet("resnet18", output_stride=8).eval()
    reference.load_state_dict(encoder.state_dict())
    with torch.no_grad():
        plain = reference(query)
        feats = reference(support.flatten(0, 1))
        mask = interp((masks.flatten(0, 1) == 1).float().unsqueeze(1), feats["layer3"].shape[-2:])
        masked = reference.layer4(feats["layer3"] * mask)
    torch.testing.assert_close(seen["q"]["layer4"], plain["layer4"])
    torch.testing.assert_close(seen["s"]["layer4"].flatten(0, 1), masked)
    torch.testing.assert_close(seen["s"]["layer3"].flatten(0, 1), feats["layer3"])
    loss = output.logits.mean() + sum(a.mean() for a in output.aux_logits)
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in model.backbone.layer4.parameters())
    assert all(p.grad is not None for p in model.backbone.layer3.parameters())


def test_official_checkpoint_mismatch_lists_keys_as_the_file_names_them(tmp_path: Path) -> None:
    reference = ReferencePFENet([9, 5, 3, 2], 1)
    state = {f"module.{k}": v for k, v in reference.state_dict().items()}
    del state["module.init_merge.2.0.weight"]
    state["module.extra.weight"] = torch.zeros(1)
    head = PFENetHead(ResNet("resnet50").output_info, bins=[9, 5, 3, 2])
    with pytest.raises(
        RuntimeError,
        match=r"PFENet.*missing keys \['init_merge.2.0.weight'\].*\['extra.weight'\]",
    ):
        head.load_official_state_dict({"state_dict": state})


def test_official_checkpoint_of_no_known_model_is_named(tmp_path: Path) -> None:
    path = tmp_path / "other.pth"
    state = {
        "module.layer0.0.weight": torch.zeros(64, 3, 3, 3),
        "module.decoder.weight": torch.zeros(1),
    }
    torch.save({"state_dict": state}, path)
    with pytest.raises(
        WeightsError,
        match=r"other\.pth' is not one released model of "
        r"\['ASGNet', 'BAM', 'DCAMA', 'HSNet', 'PFENet'\]"
        r".*'decoder\.weight'",
    ):
        FewShotSegmentation(official_checkpoint=str(path))


def test_backbone_batch_statistics_follow_the_official_order() -> None:
    """Under the ``pfenet`` preset's BatchNorm recipe (batch statistics in a frozen backbone),
    the running statistics move as the official forward moves them: the query through layer4,
    then each shot through layer3 and layer4 on its masked layer3."""
    torch.manual_seed(0)
    encoder = ResNet("resnet18", output_stride=8)
    head = partial(PFENetHead, reduce_dim=16)
    model = FewShotSegmentation(encoder, head=head, freeze_backbone=True)
    reference = copy.deepcopy(model.backbone)
    nn.Module.train(reference)
    model.backbone_norm = "batch"
    model.train()
    query, support, masks = episode(2, 2)
    model(query, support, masks)
    with torch.no_grad():
        reference.layer4(
            reference.layer3(reference.layer2(reference.layer1(reference.stem(query))))
        )
        for k in range(2):
            layer3 = reference.layer3(
                reference.layer2(reference.layer1(reference.stem(support[:, k])))
            )
            mask = interp((masks[:, k] == 1).float().unsqueeze(1), layer3.shape[-2:])
            reference.layer4(layer3 * mask)
    ours = dict(model.backbone.named_buffers())
    for name, buffer in reference.named_buffers():
        torch.testing.assert_close(ours[name], buffer, rtol=0, atol=0, msg=name)
