"""HSNet: the head, the backbone's pre-ReLU block outputs, the K-shot vote and the official
checkpoint option against a reference written from the official code (juhongm999/hsnet:
``model/hsnet.py``, ``model/learner.py``, ``model/base/conv4d.py``, ``correlation.py``,
``feature.py``): its module names, permutation orders, ``prune`` by ``index_select``, eps,
interpolation modes and ``predict_mask_nshot``, on torchvision's own ResNet."""

from __future__ import annotations

from functools import reduce
from operator import add
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from fixtures_models import channels_last_features, randomise_norms
from torch import Tensor, nn

from backbones import FeatureInfo, FeaturePyramid, ResNet, WeightsError
from backbones.timm_encoders import TimmEncoder
from backbones.weights import to_native
from tasks.callbacks.visualise import predicted_masks
from tasks.heads import HSNetHead
from tasks.heads.common import vote
from tasks.heads.hsnet import CenterPivotConv4d
from tasks.scoring import original_size_predictions
from tasks.segment import FewShotSegmentation

IMAGE = 160  # at output stride 32 the three squeezed support grids meet at 1x1, as at 400

#: ``model/hsnet.py``'s block bookkeeping for ResNet-50.
NBOTTLENECKS = [3, 4, 6, 3]
FEAT_IDS = list(range(4, 17))
BOTTLENECK_IDS = reduce(add, [list(range(x)) for x in NBOTTLENECKS])
LIDS = reduce(add, [[i + 1] * x for i, x in enumerate(NBOTTLENECKS)])


def interp(x: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
    return F.interpolate(x, size, mode="bilinear", align_corners=True)


class ReferenceConv4d(nn.Module):
    """``model/base/conv4d.py``'s ``CenterPivotConv4d``."""

    def __init__(self, inch: int, outch: int, ksz: tuple, stride: tuple, pad: tuple) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inch, outch, ksz[:2], stride=stride[:2], padding=pad[:2])
        self.conv2 = nn.Conv2d(inch, outch, ksz[2:], stride=stride[2:], padding=pad[2:])
        self.stride = stride

    def prune(self, ct: Tensor) -> Tensor:
        bsz, ch, ha, wa, hb, wb = ct.size()
        idxh = torch.arange(start=0, end=hb, step=self.stride[2:][0])
        idxw = torch.arange(start=0, end=wb, step=self.stride[2:][1])
        len_h, len_w = len(idxh), len(idxw)
        idx = (idxw.repeat(len_h, 1) + idxh.repeat(len_w, 1).t() * wb).view(-1)
        return ct.view(bsz, ch, ha, wa, -1).index_select(4, idx).view(bsz, ch, ha, wa, len_h, len_w)

    def forward(self, x: Tensor) -> Tensor:
        out1 = self.prune(x) if self.stride[2:][-1] > 1 else x
        bsz, inch, ha, wa, hb, wb = out1.size()
        out1 = out1.permute(0, 4, 5, 1, 2, 3).contiguous().view(-1, inch, ha, wa)
        out1 = self.conv1(out1)
        outch, o_ha, o_wa = out1.size(-3), out1.size(-2), out1.size(-1)
        out1 = out1.view(bsz, hb, wb, outch, o_ha, o_wa).permute(0, 3, 4, 5, 1, 2).contiguous()
        bsz, inch, ha, wa, hb, wb = x.size()
        out2 = x.permute(0, 2, 3, 1, 4, 5).contiguous().view(-1, inch, hb, wb)
        out2 = self.conv2(out2)
        outch, o_hb, o_wb = out2.size(-3), out2.size(-2), out2.size(-1)
        out2 = out2.view(bsz, ha, wa, outch, o_hb, o_wb).permute(0, 3, 1, 2, 4, 5).contiguous()
        return out1 + out2


class ReferenceLearner(nn.Module):
    """``model/learner.py``'s ``HPNLearner``."""

    def __init__(self, inch: list[int]) -> None:
        super().__init__()

        def block(in_channel, out_channels, kernel_sizes, spt_strides, group=4):
            layers = []
            for idx, (outch, ksz, stride) in enumerate(
                zip(out_channels, kernel_sizes, spt_strides, strict=True)
            ):
                inch = in_channel if idx == 0 else out_channels[idx - 1]
                layers.append(
                    ReferenceConv4d(
                        inch, outch, (ksz,) * 4, (1, 1) + (stride,) * 2, (ksz // 2,) * 4
                    )
                )
                layers.append(nn.GroupNorm(group, outch))
                layers.append(nn.ReLU(inplace=True))
            return nn.Sequential(*layers)

        o1, o2, o3 = 16, 64, 128
        self.encoder_layer4 = block(inch[0], [o1, o2, o3], [3, 3, 3], [2, 2, 2])
        self.encoder_layer3 = block(inch[1], [o1, o2, o3], [5, 3, 3], [4, 2, 2])
        self.encoder_layer2 = block(inch[2], [o1, o2, o3], [5, 5, 3], [4, 4, 2])
        self.encoder_layer4to3 = block(o3, [o3, o3, o3], [3, 3, 3], [1, 1, 1])
        self.encoder_layer3to2 = block(o3, [o3, o3, o3], [3, 3, 3], [1, 1, 1])
        self.decoder1 = nn.Sequential(
            nn.Conv2d(o3, o3, (3, 3), padding=(1, 1), bias=True),
            nn.ReLU(),
            nn.Conv2d(o3, o2, (3, 3), padding=(1, 1), bias=True),
            nn.ReLU(),
        )
        self.decoder2 = nn.Sequential(
            nn.Conv2d(o2, o2, (3, 3), padding=(1, 1), bias=True),
            nn.ReLU(),
            nn.Conv2d(o2, 2, (3, 3), padding=(1, 1), bias=True),
        )

    @staticmethod
    def interpolate_support_dims(hypercorr: Tensor, spatial_size: torch.Size) -> Tensor:
        bsz, ch, ha, wa, hb, wb = hypercorr.size()
        hypercorr = hypercorr.permute(0, 4, 5, 1, 2, 3).contiguous().view(bsz * hb * wb, ch, ha, wa)
        hypercorr = interp(hypercorr, spatial_size)
        o_hb, o_wb = spatial_size
        return hypercorr.view(bsz, hb, wb, ch, o_hb, o_wb).permute(0, 3, 4, 5, 1, 2).contiguous()

    def forward(self, pyramid: list[Tensor]) -> Tensor:
        sqz4 = self.encoder_layer4(pyramid[0])
        sqz3 = self.encoder_layer3(pyramid[1])
        sqz2 = self.encoder_layer2(pyramid[2])
        sqz4 = self.interpolate_support_dims(sqz4, sqz3.size()[-4:-2])
        mix43 = self.encoder_layer4to3(sqz4 + sqz3)
        mix43 = self.interpolate_support_dims(mix43, sqz2.size()[-4:-2])
        mix432 = self.encoder_layer3to2(mix43 + sqz2)
        bsz, ch, ha, wa, _, _ = mix432.size()
        encoded = mix432.view(bsz, ch, ha, wa, -1).mean(dim=-1)
        decoded = self.decoder1(encoded)
        decoded = interp(decoded, (decoded.size(-1) * 2,) * 2)
        return self.decoder2(decoded)


def extract_feat_res(img, backbone, feat_ids, bottleneck_ids, lids) -> list[Tensor]:
    """``model/base/feature.py``: each bottleneck's output before its last ReLU."""
    feats = []
    feat = backbone.maxpool(backbone.relu(backbone.bn1(backbone.conv1(img))))
    for hid, (bid, lid) in enumerate(zip(bottleneck_ids, lids, strict=True)):
        block = getattr(backbone, f"layer{lid}")[bid]
        res = feat
        feat = block.relu(block.bn1(block.conv1(feat)))
        feat = block.relu(block.bn2(block.conv2(feat)))
        feat = block.bn3(block.conv3(feat))
        if bid == 0:
            res = block.downsample(res)
        feat += res
        if hid + 1 in feat_ids:
            feats.append(feat.clone())
        feat = block.relu(feat)
    return feats


class ReferenceHSNet(nn.Module):
    """``model/hsnet.py``'s ``HypercorrSqueezeNetwork`` (ResNet-50, ``use_original_imgsize``
    off), with a randomly initialised torchvision ResNet-50."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = torchvision.models.resnet50()
        self.stack_ids = torch.tensor(LIDS).bincount().__reversed__().cumsum(dim=0)[:3]
        self.hpn_learner = ReferenceLearner(list(reversed(NBOTTLENECKS[-3:])))

    def correlation(self, query_feats: list[Tensor], support_feats: list[Tensor]) -> list[Tensor]:
        eps = 1e-5
        corrs = []
        for query_feat, support_feat in zip(query_feats, support_feats, strict=True):
            bsz, ch, hb, wb = support_feat.size()
            support_feat = support_feat.view(bsz, ch, -1)
            support_feat = support_feat / (support_feat.norm(dim=1, p=2, keepdim=True) + eps)
            bsz, ch, ha, wa = query_feat.size()
            query_feat = query_feat.view(bsz, ch, -1)
            query_feat = query_feat / (query_feat.norm(dim=1, p=2, keepdim=True) + eps)
            corr = torch.bmm(query_feat.transpose(1, 2), support_feat).view(bsz, ha, wa, hb, wb)
            corrs.append(corr.clamp(min=0))
        ids = self.stack_ids
        corr_l4 = torch.stack(corrs[-ids[0] :]).transpose(0, 1).contiguous()
        corr_l3 = torch.stack(corrs[-ids[1] : -ids[0]]).transpose(0, 1).contiguous()
        corr_l2 = torch.stack(corrs[-ids[2] : -ids[1]]).transpose(0, 1).contiguous()
        return [corr_l4, corr_l3, corr_l2]

    def forward(self, query_img: Tensor, support_img: Tensor, support_mask: Tensor) -> Tensor:
        ids = (FEAT_IDS, BOTTLENECK_IDS, LIDS)
        with torch.no_grad():
            query_feats = extract_feat_res(query_img, self.backbone, *ids)
            support_feats = extract_feat_res(support_img, self.backbone, *ids)
            for idx, feature in enumerate(support_feats):
                mask = interp(support_mask.unsqueeze(1).float(), feature.size()[2:])
                support_feats[idx] = feature * mask
            corr = self.correlation(query_feats, support_feats)
        logit_mask = self.hpn_learner(corr)
        return interp(logit_mask, support_img.size()[2:])


def official_vote(shot_logits: list[Tensor]) -> Tensor:
    """The aggregation of ``predict_mask_nshot`` (K > 1) over per-shot logits."""
    logit_mask_agg = 0
    for logit_mask in shot_logits:
        logit_mask_agg += logit_mask.argmax(dim=1).clone()
    bsz = logit_mask_agg.size(0)
    max_vote = logit_mask_agg.view(bsz, -1).max(dim=1)[0]
    max_vote = torch.stack([max_vote, torch.ones_like(max_vote).long()])
    max_vote = max_vote.max(dim=0)[0].view(bsz, 1, 1)
    pred_mask = logit_mask_agg.float() / max_vote
    pred_mask[pred_mask < 0.5] = 0
    pred_mask[pred_mask >= 0.5] = 1
    return pred_mask


def episode(batch: int, shots: int, size: int = IMAGE, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, 3, size, size, generator=generator)
    support = torch.randn(batch, shots, 3, size, size, generator=generator)
    masks = torch.zeros(batch, shots, size, size, dtype=torch.long)
    for b in range(batch):
        for k in range(shots):
            y, x = torch.randint(0, size // 2, (2,), generator=generator).tolist()
            masks[b, k, y : y + size // 2, x : x + size // 2] = 1
    masks[:, :, size // 2 : size // 2 + 4] = 255
    return query, support, masks


@pytest.fixture(scope="module")
def reference() -> ReferenceHSNet:
    torch.manual_seed(0)
    model = ReferenceHSNet()
    randomise_norms(model)
    return model.eval()


def write_best_model(reference: ReferenceHSNet, path: Path) -> Path:
    """Saved as ``Logger.save_model_miou``: the ``nn.DataParallel`` model's state dict."""
    torch.save({f"module.{k}": v for k, v in reference.state_dict().items()}, path)
    return path


def test_center_pivot_conv4d_matches_official() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 7, 6, 13, 11, generator=generator)
    for kernel, stride in ((5, 4), (3, 2), (3, 1)):
        ours = CenterPivotConv4d(3, 8, kernel, stride)
        theirs = ReferenceConv4d(3, 8, (kernel,) * 4, (1, 1, stride, stride), (kernel // 2,) * 4)
        theirs.load_state_dict(ours.state_dict())
        torch.testing.assert_close(ours(x), theirs(x))


def test_center_pivot_conv4d_gradients_stay_finite_under_cpu_bf16() -> None:
    """oneDNN's bf16 backward of a strided convolution with a 1x1 output (kernel 5, stride 4
    on a 2x2 support grid) returns NaN gradients in about one call in three (torch 2.14); the
    4D convolution runs in fp32 under CPU autocast, so twenty calls all stay finite."""
    torch.manual_seed(0)
    for _ in range(20):
        conv = CenterPivotConv4d(16, 64, 5, 4)
        x = torch.randn(4, 16, 8, 8, 2, 2, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            conv(x).float().square().mean().backward()
        grads = [x.grad, *(p.grad for p in conv.parameters())]
        assert all(torch.isfinite(g).all() for g in grads)


def test_pre_relu_outputs_match_torchvision_blocks() -> None:
    """``layerS.i.pre_relu`` is the residual sum before the block's last ReLU, on torchvision's
    ResNet-50 at output stride 32 and with ``replace_stride_with_dilation`` (output stride 8)."""
    for output_stride, dilation in ((32, [False, False, False]), (8, [False, True, True])):
        tv = torchvision.models.resnet50(replace_stride_with_dilation=dilation)
        randomise_norms(tv)
        ours = ResNet("resnet50", output_stride=output_stride)
        ours.load_state_dict(to_native(tv.state_dict(), is_lightning=False)[0])
        names = [f"layer{s}.{b}.pre_relu" for s, n in ((2, 4), (3, 6), (4, 3)) for b in range(n)]
        ours.select_outputs(names)
        image = torch.randn(2, 3, 64, 64)
        tv.eval(), ours.eval()
        with torch.no_grad():
            expected = extract_feat_res(image, tv, FEAT_IDS, BOTTLENECK_IDS, LIDS)
            got = ours(image)
        assert list(got) == names
        for name, feat in zip(names, expected, strict=True):
            torch.testing.assert_close(got[name], feat, msg=name)
            assert (feat < 0).any(), name  # before the ReLU indeed


@pytest.mark.parametrize("size", [IMAGE, pytest.param(400, marks=pytest.mark.slow)])
def test_official_checkpoint_matches_official_forward(
    reference: ReferenceHSNet, size: int, tmp_path: Path
) -> None:
    """A ``best_model.pt`` in the official layout, loaded through ``official_checkpoint``, gives
    the official forward's logits per shot (eval mode, ResNet-50 at output stride 32; 400 px is
    HSNet's size), and the task's K-shot prediction is the official vote of them."""
    path = write_best_model(reference, tmp_path / "best_model.pt")
    model = FewShotSegmentation(official_checkpoint=str(path)).eval()
    assert model.backbone.summary()[1] == "resnet50-standard-os32"
    assert model.hparams.freeze_backbone and isinstance(model.head, HSNetHead)
    assert len(model.head.in_features) == 13
    shots = 2
    query, support, masks = episode(2, shots, size)
    with torch.no_grad():
        output = model(query, support, masks)
        expected = [reference(query, support[:, k], (masks[:, k] == 1).long()) for k in range(2)]
    assert output.shot_logits is not None and output.shot_logits.shape[:3] == (2, shots, 2)
    shot_logits = [interp(logits, (size, size)) for logits in output.shot_logits.unbind(1)]
    scale = max(e.abs().max().item() for e in expected)
    for ours, theirs in zip(shot_logits, expected, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5 * scale)
    batch = {
        "query_image": query,
        "query_valid": torch.tensor([[size, size]] * 2),
        "query_size": torch.tensor([[size, size]] * 2),
    }
    predictions = torch.stack(original_size_predictions(output.shot_logits, batch))
    assert torch.equal(predictions, official_vote(shot_logits).long())
    one_shot = model(query, support[:, :1], masks[:, :1])
    assert one_shot.shot_logits is None
    torch.testing.assert_close(one_shot.logits, output.shot_logits[:, 0], rtol=1e-5, atol=1e-5)


def test_official_backbone_loads_as_weights(reference: ReferenceHSNet, tmp_path: Path) -> None:
    """The same file serves as ``weights`` of a plain encoder (the ``hsnet`` layout): its
    torchvision ResNet under ``backbone.``, strictly; the learner and ``fc`` are skipped."""
    path = write_best_model(reference, tmp_path / "best_model.pt")
    encoder = ResNet("resnet50", weights=str(path))
    torch.testing.assert_close(
        encoder.layer3[5].conv2.weight, reference.backbone.layer3[5].conv2.weight
    )
    with pytest.raises(WeightsError, match=r"hsnet layout.*resnet101|resnet50.*hsnet layout"):
        ResNet("resnet101", weights=str(path))


def test_official_checkpoint_through_a_timm_resnet_gives_the_official_logits(
    reference: ReferenceHSNet, tmp_path: Path
) -> None:
    """The released file's encoder as a timm ResNet-50's weights (DCAMA's encoder code): its
    pre-activation taps feed the same learner, giving the official logits to 1e-4."""
    path = write_best_model(reference, tmp_path / "best_model.pt")
    encoder = TimmEncoder("resnet50", weights=str(path))
    head = HSNetHead(encoder.output_info)
    head.load_official_state_dict(torch.load(path, weights_only=True))
    model = FewShotSegmentation(encoder, head=lambda _: head).eval()
    assert all(name.endswith(".pre_relu") for name in model.head.in_features)
    query, support, masks = episode(2, 1)
    with torch.no_grad():
        logits = interp(model(query, support, masks).logits, (IMAGE, IMAGE))
        expected = reference(query, support[:, 0], (masks[:, 0] == 1).long())
    scale = expected.abs().max().item()
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4 * scale)


def test_official_checkpoint_mismatch_lists_keys_as_the_file_names_them(
    reference: ReferenceHSNet,
) -> None:
    state = {f"module.{k}": v for k, v in reference.state_dict().items()}
    del state["module.hpn_learner.decoder2.2.bias"]
    state["module.hpn_learner.extra.weight"] = torch.zeros(1)
    head = HSNetHead(ResNet("resnet50").output_info)
    with pytest.raises(
        RuntimeError,
        match=r"HSNet.*missing keys \['hpn_learner.decoder2.2.bias'\].*"
        r"\['hpn_learner.extra.weight'\]",
    ):
        head.load_official_state_dict(state)


def test_vote_is_hsnet_rule() -> None:
    """Foreground where the votes reach half of the query's most-voted pixel; one shot is the
    plain argmax."""
    generator = torch.Generator().manual_seed(0)
    for shots in (1, 2, 5):
        logits = [torch.randn(3, 2, 9, 7, generator=generator) for _ in range(shots)]
        logits[0][1] = -1  # a query no shot calls foreground anywhere
        predictions = torch.stack([x.argmax(1) for x in logits], 1)
        assert torch.equal(vote(predictions), official_vote(logits).long())


def test_validation_images_show_the_vote() -> None:
    """The validation-image callback draws a voting head's per-shot logits as evaluation scores
    them: the official vote of the shots' upsampled argmax."""
    generator = torch.Generator().manual_seed(0)
    shot_logits = torch.randn(2, 3, 2, 8, 8, generator=generator)
    expected = official_vote([interp(x, (32, 32)) for x in shot_logits.unbind(1)])
    assert torch.equal(predicted_masks(shot_logits, torch.Size([32, 32])), expected.long())


def block_features(channels: FeaturePyramid, head: HSNetHead, *lead: int, size: int = 8):
    """Random features for every block the head reads (output stride 8: one size)."""
    generator = torch.Generator().manual_seed(len(lead))
    return {
        name: torch.randn(*lead, channels[name].channels, size, size, generator=generator)
        for name in head.in_features
    }


@pytest.mark.parametrize("shots", [1, 3])
@pytest.mark.parametrize("batch", [1, 2])
def test_any_batch_and_shots_in_train_and_eval(batch: int, shots: int) -> None:
    channels = ResNet("resnet18", output_stride=8).output_info
    head = HSNetHead(channels)
    query = block_features(channels, head, batch)
    support = block_features(channels, head, batch, shots)
    masks = torch.zeros(batch, shots, 64, 64, dtype=torch.long)
    masks[..., 10:40, 20:50] = 1
    for train in (True, False):
        head.train(train)
        output = head(query, support, masks)
        assert output.logits.shape == (batch, 2, 16, 16) and output.aux_logits == []
        assert (output.shot_logits is None) == (shots == 1)
        if shots > 1:
            torch.testing.assert_close(output.logits, output.shot_logits.mean(1))
    output.logits.square().mean().backward()
    for name, param in head.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_bf16_autocast_channels_last_and_ignore_label() -> None:
    channels = ResNet("resnet18", output_stride=8).output_info
    head = HSNetHead(channels).eval()
    query = block_features(channels, head, 2)
    support = block_features(channels, head, 2, 2)
    masks = torch.zeros(2, 2, 64, 64, dtype=torch.long)
    masks[..., 8:56, 16:60] = 1
    masks[..., 30:40, :] = 255
    expected = head(query, support, masks).logits
    ignored_as_background = head(query, support, masks.masked_fill(masks == 255, 0)).logits
    torch.testing.assert_close(ignored_as_background, expected)
    query_cl, support_cl = channels_last_features(query, support)
    torch.testing.assert_close(head(query_cl, support_cl, masks).logits, expected)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = head(query_cl, support_cl, masks)
    assert output.logits.dtype == torch.bfloat16 and torch.isfinite(output.logits.float()).all()


def test_unmasked_support_is_the_papers_table_1_setting() -> None:
    """``mask_support=False`` correlates the whole support (the README's evaluation without
    support feature masking): the mask no longer matters, the support's background does."""
    channels = ResNet("resnet18", output_stride=8).output_info
    head = HSNetHead(channels, mask_support=False).eval()
    query = block_features(channels, head, 2)
    support = block_features(channels, head, 2, 1)
    masks = torch.zeros(2, 1, 64, 64, dtype=torch.long)
    masks[..., 8:40, 16:60] = 1
    expected = head(query, support, masks).logits
    torch.testing.assert_close(head(query, support, torch.zeros_like(masks)).logits, expected)
    masked = HSNetHead(channels).eval()
    masked.load_state_dict(head.state_dict())
    assert not torch.allclose(masked(query, support, masks).logits, expected)


def test_unequal_squeezed_support_grids_are_resized() -> None:
    """At 96 px and output stride 8 (the default experiment) layer4's squeezed support grid is
    2x2 and layer3's 1x1, a sum the official code cannot make; the head resizes and runs."""
    model = FewShotSegmentation(ResNet("resnet18", output_stride=8), head=HSNetHead).eval()
    query, support, masks = episode(2, 1, size=96)
    with torch.no_grad():
        output = model(query, support, masks)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = model(query, support, masks)
    assert output.logits.shape == (2, 2, 24, 24) and torch.isfinite(output.logits).all()
    assert half.logits.dtype == torch.bfloat16 and torch.isfinite(half.logits.float()).all()


def test_head_without_blocks_is_refused() -> None:
    stages = [FeatureInfo(name, 8, 8, stage) for stage, name in enumerate(["a", "b", "c", "d"])]
    with pytest.raises(ValueError, match=r"no block outputs in its stages \['d', 'c', 'b'\]"):
        HSNetHead(FeaturePyramid(stages))
