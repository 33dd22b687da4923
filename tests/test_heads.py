from functools import partial

import numpy as np
import pytest
import torch
from fixtures_models import channels_last_features
from scipy.ndimage import distance_transform_edt

from backbones import ResNet
from tasks.heads import ASGNetHead, BAMHead, HeadOutput, HSNetHead, PFENetHead, PrototypeHead
from tasks.heads.asgnet import (
    guided_prototype_allocation,
    place_seeds,
    superpixel_clustering,
)
from tasks.heads.fem import pyramid_bin_size
from tasks.heads.testing import HeadContractError, check_head

RESNET18 = ResNet("resnet18").output_info
RESNET50 = ResNet("resnet50").output_info
IMAGE = 65

# name: (channels, layer2 size, layer3 size)
BACKBONES = {
    "resnet18_os8": (RESNET18, 9, 9),
    "resnet50_os8": (RESNET50, 9, 9),
    "resnet18_os16": (RESNET18, 10, 5),
}
HEADS = {
    "prototype": lambda channels: PrototypeHead(channels, reduce_dim=32),
    # A small superpixel area so that 9x9 supports get several superpixels.
    "asgnet": lambda channels: ASGNetHead(channels, reduce_dim=32, superpixel_area=4),
    "pfenet": lambda channels: PFENetHead(channels, reduce_dim=32),
}


def episode(channels, size2, size3, batch=2, shots=1, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def feats(*lead):
        return {
            name: torch.randn(*lead, channels[name].channels, size, size, generator=generator)
            for name, size in (("layer2", size2), ("layer3", size3), ("layer4", size3))
        }

    masks = torch.zeros(batch, shots, IMAGE, IMAGE, dtype=torch.long)
    masks[:, :, 8:56, 16:60] = 1
    masks[:, :, 30:40] = 255
    masks[-1, 0] = 0  # an empty support falls back to masked average pooling
    return feats(batch), feats(batch, shots), masks


@pytest.mark.parametrize("shots", [1, 5])
@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("head_name", HEADS)
def test_output_shapes(head_name, backbone, shots):
    channels, size2, size3 = BACKBONES[backbone]
    head = HEADS[head_name](channels)
    query, support, masks = episode(channels, size2, size3, shots=shots)
    for train in (True, False):
        head.train(train)
        out = head(query, support, masks)
        assert isinstance(out, HeadOutput)
        assert out.logits.shape == (2, 2, size3, size3)
        assert all(a.shape[:2] == (2, 2) for a in out.aux_logits)
        assert torch.isfinite(out.logits).all()
    assert len(out.aux_logits) == (0 if head_name == "prototype" else 4)


@pytest.mark.parametrize("head_name", HEADS)
def test_gradients_reach_every_parameter(head_name):
    head = HEADS[head_name](RESNET18)
    out = head(*episode(RESNET18, 9, 9, shots=2))
    loss = out.logits.square().mean() + sum(a.square().mean() for a in out.aux_logits)
    loss.backward()
    for name, param in head.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("head_name", HEADS)
def test_bf16_autocast_and_channels_last(head_name):
    head = HEADS[head_name](RESNET18).eval()
    query, support, masks = episode(RESNET18, 10, 5, shots=2)
    expected = head(query, support, masks).logits
    query_cl, support_cl = channels_last_features(query, support)
    torch.testing.assert_close(head(query_cl, support_cl, masks).logits, expected)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(query_cl, support_cl, masks)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits.float()).all()


@pytest.mark.parametrize("head_name", HEADS)
def test_ignored_support_pixels_are_not_foreground(head_name):
    head = HEADS[head_name](RESNET18).eval()
    query, support, masks = episode(RESNET18, 9, 9)
    ignored = masks.masked_fill(masks == 1, 255)
    background = masks.masked_fill(masks == 1, 0)
    torch.testing.assert_close(
        head(query, support, ignored).logits, head(query, support, background).logits
    )


def test_superpixel_count_rule():
    masks = torch.zeros(6, 30, 30, dtype=torch.bool)
    masks[1, :12, :12] = True  # 144 px -> round(1.44) = 1
    masks[2, :10, :25] = True  # 250 px -> round(2.5) = 2 (halves to even, as np.round)
    masks[3, 5:20, 2:22] = True  # 300 px -> 3
    masks[4, :20, :20] = True  # 400 px -> 4
    masks[5] = True  # 900 px -> min(9, 5) = 5
    seeds, num = place_seeds(masks)
    assert num.tolist() == [0, 1, 2, 3, 4, 5]
    assert seeds.shape == (6, 5, 2)
    for i, n in enumerate(num.tolist()):
        points = seeds[i, :n]
        assert masks[i, points[:, 0], points[:, 1]].all()
        assert len({tuple(p) for p in points.tolist()}) == n


def scipy_seeds(mask: np.ndarray, max_superpixels: int, area: float) -> tuple[list, int]:
    """The official seed placement (util/seed_init.py) written with scipy, as a reference."""
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return [], 0
    roi = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].copy()
    num = int(min(np.round(roi.sum() / area), max_superpixels))
    seeds = []
    for _ in range(num if num >= 2 else 0):
        dist = distance_transform_edt(roi)
        y, x = np.argwhere(dist == dist.max())[0]
        roi[y, x] = False
        seeds.append((y + ys.min(), x + xs.min()))
    return seeds, num


def test_seeds_match_scipy_reference():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:20, :24]
    masks = []
    for _ in range(12):
        mask = np.zeros((20, 24), dtype=bool)
        for _ in range(rng.integers(1, 4)):
            cy, cx, r = rng.integers(0, 20), rng.integers(0, 24), rng.integers(2, 8)
            mask |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
        masks.append(mask)
    rectangle = np.zeros((20, 24), dtype=bool)
    rectangle[3:15, 5:21] = True  # no background in its box: scipy's special case
    masks.append(rectangle)
    seeds, num = place_seeds(torch.from_numpy(np.stack(masks)), superpixel_area=20)
    for i, mask in enumerate(masks):
        expected, expected_num = scipy_seeds(mask, 5, 20)
        assert num[i].item() == expected_num
        assert [tuple(s) for s in seeds[i, : len(expected)].tolist()] == expected


def test_clustering_recovers_separated_clusters():
    feats = torch.zeros(1, 4, 6, 8)
    feats[0, 0, :, :4] = 20.0  # left half: a
    feats[0, 1, :, 4:] = 20.0  # right half: b
    feats[0, 2, 5] = 50.0  # last row, outside the region, must not count
    roi = torch.ones(1, 6, 8, dtype=torch.bool)
    roi[0, 5] = False
    seeds = torch.tensor([[[2, 1], [3, 6]]])
    centres = superpixel_clustering(feats, roi, seeds, num_iterations=10)
    torch.testing.assert_close(centres[0], torch.tensor([[20.0, 0, 0, 0], [0, 20.0, 0, 0]]))


def test_clustering_matches_official_formula():
    generator = torch.Generator().manual_seed(0)
    feats = 0.3 * torch.randn(2, 5, 6, 7, generator=generator)
    roi = torch.rand(2, 6, 7, generator=generator) > 0.3
    seeds = torch.tensor([[[0, 0], [3, 4], [5, 6]], [[1, 2], [2, 2], [4, 0]]])
    centres = superpixel_clustering(feats, roi, seeds, num_iterations=3)
    for n in range(2):
        rows, cols = torch.nonzero(roi[n], as_tuple=True)
        points = torch.cat([feats[n][:, rows, cols], torch.stack([rows, cols]).float()])  # 7 x P
        centre = torch.cat([feats[n][:, seeds[n, :, 0], seeds[n, :, 1]], seeds[n].T.float()])
        for _ in range(3):
            dist2 = (points[:, :, None] - centre[:, None]) ** 2
            assoc = torch.exp(-(dist2[:-2].sum(0) + dist2[-2:].sum(0) / 100).sqrt())
            assoc = assoc / assoc.sum(0, keepdim=True)
            centre = (points[:, :, None] * assoc[None]).sum(1)
        torch.testing.assert_close(centres[n], centre[:-2].T, rtol=1e-4, atol=1e-5)


def test_allocation_picks_most_similar_valid_prototype():
    prototypes = torch.eye(3)[None]  # e0, e1, e2
    valid = torch.tensor([[True, True, False]])
    query = torch.tensor([[1.0, 0.2, 0.0], [0.1, 1.0, 0.0], [0.1, 0.3, 1.0]]).T.reshape(1, 3, 1, 3)
    prob, guide = guided_prototype_allocation(query, prototypes, valid)
    # Pixel 2 is closest to e2, which is padding: it takes e1 (0.3 > 0.1).
    torch.testing.assert_close(guide[0, :, 0].T, torch.eye(3)[[0, 1, 1]])
    normed = torch.nn.functional.normalize(query, dim=1)
    torch.testing.assert_close(prob[:, 0], normed[:, 0] + normed[:, 1])


def test_support_prototypes_fallback_and_padding():
    head = ASGNetHead(RESNET18, reduce_dim=8, superpixel_area=10).eval()
    masks = torch.zeros(1, 3, 81, 81, dtype=torch.long)
    masks[0, 1, :, :] = 1  # 11 x 11 = 121 feature px -> min(round(12.1), 5) = 5
    masks[0, 2, 0:16, 0:16] = 1  # 3 x 3 px at 1/8 -> round(0.9) = 1 -> masked average
    support = torch.randn(3, 8, 11, 11)
    prototypes, valid = head.support_prototypes(support, masks)
    assert prototypes.shape == (3, 5, 8)
    assert valid.sum(1).tolist() == [1, 5, 1]
    assert valid[:, 0].all()


def test_pyramid_bins_scale_to_small_features():
    assert pyramid_bin_size(60, (60, 60)) == (60, 60)
    assert pyramid_bin_size(60, (13, 17)) == (13, 17)
    assert pyramid_bin_size(8, (13, 17)) == (8, 8)
    assert pyramid_bin_size(0.25, (13, 17)) == (3, 4)
    assert pyramid_bin_size(0.01, (13, 17)) == (1, 1)


def official_state_dict(bins: int = 4, reduce_dim: int = 256) -> dict[str, torch.Tensor]:
    """Keys and shapes of an official ResNet-50 pyramid checkpoint (model/asgnet.py)."""
    r = reduce_dim
    shapes = {"down_conv.0.weight": (r, 1024 + 512, 1, 1), "res1.0.weight": (r, bins * r, 1, 1)}
    for i in range(bins):
        shapes[f"corr_conv.{i}.0.weight"] = (r, 2 * r + 1, 1, 1)
        shapes[f"beta_conv.{i}.0.weight"] = shapes[f"beta_conv.{i}.2.weight"] = (r, r, 3, 3)
        if i > 0:
            shapes[f"alpha_conv.{i - 1}.0.weight"] = (r, 2 * r, 1, 1)
    for prefix in [f"inner_cls.{i}" for i in range(bins)] + ["cls"]:
        shapes[f"{prefix}.0.weight"] = (r, r, 3, 3)
        shapes[f"{prefix}.3.weight"], shapes[f"{prefix}.3.bias"] = (2, r, 1, 1), (2,)
    shapes["res2.0.weight"] = shapes["res2.2.weight"] = (r, r, 3, 3)
    shapes["layer0.0.weight"] = (64, 3, 3, 3)
    shapes["layer4.2.bn3.running_mean"] = (2048,)
    generator = torch.Generator().manual_seed(0)
    return {f"module.{k}": torch.randn(s, generator=generator) for k, s in shapes.items()}


def test_official_checkpoint_round_trip():
    state = official_state_dict()
    head = ASGNetHead(RESNET50)
    backbone = head.load_official_state_dict({"state_dict": state})
    assert set(backbone) == {"layer0.0.weight", "layer4.2.bn3.running_mean"}
    loaded = head.state_dict()
    assert len(loaded) == len(state) - 2
    for key, value in loaded.items():
        assert torch.equal(value, state[f"module.{key}"]), key


def test_official_checkpoint_mismatch_lists_keys():
    state = official_state_dict()
    state["module.extra.weight"] = torch.zeros(1)
    del state["module.cls.3.bias"]
    with pytest.raises(RuntimeError, match=r"missing keys \['cls.3.bias'\].*\['extra.weight'\]"):
        ASGNetHead(RESNET50).load_official_state_dict(state)


@pytest.mark.parametrize(
    ("head", "option"),
    [(PrototypeHead, "dropout"), (PrototypeHead, "decoder_dropout"), (PFENetHead, "dropout"),
     (ASGNetHead, "dropout")],
)  # fmt: skip
@pytest.mark.parametrize("value", [1.0, -0.1])
def test_dropout_outside_0_1_is_refused(head: type, option: str, value: float) -> None:
    """A dropout of 1 zeroes every feature: refused when the head is built, as classify does."""
    channels = {"layer2": 128, "layer3": 256, "layer4": 512}
    with pytest.raises(ValueError, match=rf"{head.__name__} {option}={value}: expected a probab"):
        head(channels, **{option: value})


# --- the head contract (tasks.heads.testing.check_head) ---------------------------------------

CONTRACT_HEADS = {
    "prototype": (partial(PrototypeHead, reduce_dim=32), RESNET18, 64),
    "pfenet": (partial(PFENetHead, reduce_dim=32), RESNET18, 64),
    "asgnet": (partial(ASGNetHead, reduce_dim=32, superpixel_area=4), RESNET18, 64),
    "bam": (partial(BAMHead, reduce_dim=32), RESNET50, 64),
    "hsnet": (HSNetHead, ResNet("resnet50").output_info, 96),
}


@pytest.mark.parametrize("head_name", CONTRACT_HEADS)
def test_every_head_passes_the_contract_checks(head_name: str) -> None:
    make, features, size = CONTRACT_HEADS[head_name]
    check_head(make, features, size)


class OldStyleHead(PrototypeHead):
    """A head written before ``class_ids``: its forward takes three arguments."""

    def forward(self, query_feats, support_feats, support_masks):  # type: ignore[override]
        return super().forward(query_feats, support_feats, support_masks)


class LeakyHead(PrototypeHead):
    """A head that treats the ignore label as foreground."""

    def forward(self, query_feats, support_feats, support_masks, class_ids=None):
        return super().forward(query_feats, support_feats, (support_masks > 0).long())


class GreedyGroupsHead(PrototypeHead):
    """A head whose parameter groups list a parameter twice."""

    def param_groups(self, lr: float) -> list[dict]:
        params = list(self.parameters())
        return [{"params": params, "lr": lr}, {"params": params[:1], "lr": 10 * lr}]


@pytest.mark.parametrize(
    ("head", "rule"),
    [
        (OldStyleHead, "OldStyleHead: forward does not accept the class_ids keyword"),
        (LeakyHead, "LeakyHead: label 255 counts as foreground"),
        (GreedyGroupsHead, "GreedyGroupsHead: param_groups must hold every trainable parameter"),
    ],
)
def test_a_head_breaking_a_rule_fails_in_one_line_naming_it(head: type, rule: str) -> None:
    with pytest.raises(HeadContractError) as error:
        check_head(partial(head, reduce_dim=16), RESNET18)
    assert str(error.value).startswith(rule) and "\n" not in str(error.value)
