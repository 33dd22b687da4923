"""The presets against the published pipelines: each reference's behaviour is written here from
its official code (PFENet ``test.py``, ``util/dataset.py``, ``util/transform.py``,
``util/util.py``; ASGNet ``tool/test.py``; HSNet ``data/pascal.py``, ``data/coco.py``,
``common/logger.py``; BAM ``test.py``, ``util/dataset.py``) and compared with the project's
datamodules, sampling, geometry and metric on small generated label maps that sit on the
boundaries (2047/2048 px, 500 x 375, images smaller than the test size, a class without
episodes)."""

from __future__ import annotations

import copy
import io
import math
import shutil
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from fixtures_data import WIDTH, pascal, write_coco_tree
from test_segment import tiny_args

from backbones import ResNet
from datamodules import CocoFewShot, FewShotDataModule
from datamodules.episode import Evaluation, collate_episodes, image_tensor
from datamodules.protocols import NODUPLICATE_LIST, PROTOCOLS, episodes_per_pass, resolve_protocol
from datamodules.sampler import draw_episodes
from datamodules.sampling import EpisodeRule, pair_items, walk_items
from datamodules.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    eval_transform,
    floor8_size,
    normalise,
)
from tasks.metrics import FewShotIoU
from tasks.scoring import original_size_predictions
from tasks.segment import FewShotSegmentation, main

CONFIGS = Path(__file__).parents[1] / "configs" / "segment"


# --- the references, from their published code -------------------------------------------------


def pfenet_make_dataset(labels: dict[str, np.ndarray], sub_list: list[int]):
    """PFENet ``make_dataset``: an image enters when a listed class covers 2 * 32 * 32 pixels;
    ``sub_class_file_list[c]`` holds the images where ``c`` does (1-based classes)."""
    image_label_list, sub_class_file_list = [], {c: [] for c in sub_list}
    for name, label in labels.items():
        label_class = [c for c in np.unique(label).tolist() if c not in (0, 255)]
        new_label_class = [c for c in label_class if c in sub_list and (label == c).sum() >= 2048]
        if new_label_class:
            image_label_list.append(name)
            for c in new_label_class:
                sub_class_file_list[c].append(name)
    return image_label_list, sub_class_file_list


def pfenet_query_classes(label: np.ndarray, sub_val_list: list[int]) -> list[int]:
    """PFENet ``SemData.__getitem__`` (val): the classes the episode's class is drawn from."""
    return [c for c in np.unique(label).tolist() if c in sub_val_list]


def pfenet_test_loop(test_num: int, loader_len: int) -> list[int]:
    """Loader positions PFENet's/ASGNet's ``validate`` processes (batch_size_val 1)."""
    processed, iter_num = [], 0
    for _ in range(20):
        for i in range(loader_len):
            if (iter_num - 1) * 1 >= test_num:
                break
            iter_num += 1
            processed.append(i)
    return processed


def bam_test_loop(test_num: int, loader_len: int) -> list[int]:
    """Loader positions BAM's ``validate`` processes (batch_size_val 1)."""
    processed, iter_num = [], 0
    for _ in range(math.ceil(test_num / (loader_len - 1))):
        for i in range(loader_len):
            if iter_num * 1 >= test_num:
                break
            iter_num += 1
            processed.append(i)
    return processed


def pfenet_find_new_hw(ori_h: int, ori_w: int, test_size: int) -> tuple[int, int]:
    """PFENet ``transform.Resize`` (selected by ``resized_val: True``)."""
    if ori_h >= ori_w:
        ratio = test_size * 1.0 / ori_h
        new_h, new_w = test_size, int(ori_w * ratio)
    else:
        ratio = test_size * 1.0 / ori_w
        new_h, new_w = int(ori_h * ratio), test_size
    new_h = (int(new_h / 8)) * 8 if new_h % 8 != 0 else new_h
    new_w = (int(new_w / 8)) * 8 if new_w % 8 != 0 else new_w
    return new_h, new_w


def intersection_and_union(output: torch.Tensor, target: torch.Tensor, k: int = 2):
    """PFENet ``util.intersectionAndUnionGPU``."""
    output, target = output.reshape(-1).clone(), target.reshape(-1)
    output[target == 255] = 255
    intersection = output[output == target]
    area_intersection = torch.histc(intersection.float(), bins=k, min=0, max=k - 1)
    area_output = torch.histc(output.float(), bins=k, min=0, max=k - 1)
    area_target = torch.histc(target.float(), bins=k, min=0, max=k - 1)
    return area_intersection, area_output + area_target - area_intersection


def pfenet_ori_resize_score(output: torch.Tensor, ori_label: torch.Tensor):
    """PFENet ``test.py`` with ``ori_resize``: the label padded with 255 to a square of its
    longer side, the model's output upsampled to it, argmax, intersection and union."""
    longerside = max(ori_label.shape)
    backmask = torch.full((1, longerside, longerside), 255.0)
    backmask[0, : ori_label.shape[0], : ori_label.shape[1]] = ori_label
    output = F.interpolate(
        output, size=(longerside, longerside), mode="bilinear", align_corners=True
    )
    return intersection_and_union(output.max(1)[1], backmask.long())


# --- fixtures -----------------------------------------------------------------------------------


def label_maps(source, ids) -> dict[str, np.ndarray]:
    return {image_id: source.read_label(image_id) for image_id in ids}


# --- 1. training list ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["pfenet", "asgnet", "bam", "hsnet", "clean"])
def test_training_list_is_the_papers(name: str, pascal_root: Path, tmp_path: Path) -> None:
    root = Path(shutil.copytree(pascal_root, tmp_path / "voc"))
    listed = (root / "ImageSets/SegmentationAug/train_aug.txt").read_text().splitlines()
    (root / NODUPLICATE_LIST).parent.mkdir(parents=True)
    (root / NODUPLICATE_LIST).write_text("\n".join(listed[:120]) + "\n")
    dm = pascal(root, tmp_path, protocol=name)
    expected = 120 if name in ("pfenet", "asgnet", "bam") else 200
    assert len(dm.source("train").ids) == expected
    own = pascal(
        root, tmp_path, protocol=name, train_list="ImageSets/SegmentationAug/train_aug.txt"
    )
    assert len(own.source("train").ids) == 200
    assert own.protocol["overridden"] == (["train_list"] if expected == 120 else [])


# --- 2. test episodes of the PFENet family ------------------------------------------------------


LOOPS = [("pfenet", pfenet_test_loop), ("asgnet", pfenet_test_loop), ("bam", bam_test_loop)]


@pytest.mark.parametrize(("name", "loop"), LOOPS)
def test_pfenet_family_walks_its_list_and_queries_small_objects(
    name, loop, pascal_root: Path, tmp_path: Path
) -> None:
    dm = pascal(pascal_root, tmp_path, protocol=name)
    dm.setup("test")
    source = dm.source("test")
    labels = label_maps(source, source.ids)
    sub_val_list = [c + 1 for c in dm.novel_classes]
    data_list, sub_class_file_list = pfenet_make_dataset(labels, sub_val_list)
    sampler = dm.test_dataloader()[0].sampler
    episodes = sampler.episodes()
    positions = loop(PROTOCOLS[name].test_episodes["pascal"], len(data_list))
    assert [e.query for e in episodes] == [data_list[i] for i in positions]
    assert len(episodes) == {"pfenet": 200, "asgnet": 200, "bam": 1000}[name]  # 20 passes of 10
    small_queries = 0
    for episode in episodes:
        cls = episode.class_id + 1
        assert cls in pfenet_query_classes(labels[episode.query], sub_val_list)
        assert set(episode.support) <= set(sub_class_file_list[cls])
        assert episode.query not in episode.support and len(set(episode.support)) == 1
        small_queries += int((labels[episode.query] == cls).sum() == 2047)
    assert small_queries > 0  # classes under 2048 px are asked for, as in PFENet


def test_bam_only_queries_the_first_1000_images_of_a_longer_list() -> None:
    counts = {f"img{i:05d}": {i % 5: 4096} for i in range(1500)}
    walk = walk_items(counts, list(counts), list(range(5)), 2048, present=True)
    pools = {c: [k for k, v in counts.items() if c in v] for c in range(5)}
    protocol = resolve_protocol("bam", "coco", {}, image_size=641)
    episodes = EpisodeRule("image_walk", pools, 1, walk).draw(episodes_per_pass(protocol), (510,))
    reference = bam_test_loop(protocol["test_episodes"], len(walk))
    assert [e.query for e in episodes] == [walk[i][0] for i in reference]
    assert max(reference) == 999 and len({e.query for e in episodes}) == 1000


# --- 3. test geometry of the PFENet family ------------------------------------------------------


@pytest.mark.parametrize(
    "size", [(375, 500), (500, 375), (333, 500), (500, 500), (200, 300), (80, 96), (473, 400)]
)
def test_floor8_resize_equals_pfenets(size: tuple[int, int]) -> None:
    assert floor8_size(*size, 473) == pfenet_find_new_hw(*size, 473)
    assert floor8_size(375, 500, 473) == (352, 472)


def test_black_canvas_and_square_scoring_equal_pfenets() -> None:
    rng = np.random.default_rng(0)
    height, width = 375, 500
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    label = np.zeros((height, width), dtype=np.uint8)
    label[100:300, 50:400] = 1
    label[300:, 480:] = 255  # an ignored corner touching the border
    mask = torch.from_numpy(label)
    transformed = normalise(image_tensor(eval_transform(473, "floor8", "black")(image, label)[0]))
    black = torch.tensor([-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)])
    assert transformed.shape == (3, 473, 473)
    assert torch.allclose(transformed[:, 352:, :], black[:, None, None].expand(3, 121, 473))
    assert torch.allclose(transformed[:, :, 472:], black[:, None, None].expand(3, 473, 1))

    logits = torch.randn(1, 2, 60, 60)
    output = F.interpolate(logits, size=(473, 473), mode="bilinear", align_corners=True)
    inter, union = pfenet_ori_resize_score(output, torch.from_numpy(label).float())
    evaluation = Evaluation(473, "floor8", "square", "black")
    item = evaluation.label_fields(label, mask)
    batch = collate_episodes([{**item, "query_image": torch.zeros(3, 473, 473)}])
    metric = FewShotIoU(20, classes=[0])
    pred = original_size_predictions(logits, batch)[0]
    metric.update(pred[None], batch["query_label"], torch.tensor([0]))
    assert metric.fb_intersection.tolist() == inter.long().tolist()
    assert metric.fb_union.tolist() == union.long().tolist()
    clean = Evaluation(473).label_fields(label, mask)
    clean_batch = collate_episodes([{**clean, "query_image": torch.zeros(3, 473, 473)}])
    assert not torch.equal(original_size_predictions(logits, clean_batch)[0], pred)


# --- 4. the mIoU denominator; every class given episodes ----------------------------------------


def test_miou_divides_by_every_fold_class_as_the_references() -> None:
    metric = FewShotIoU(20, classes=range(5))
    preds = torch.zeros(4, 8, 8, dtype=torch.long)
    preds[:, :4] = 1
    target = torch.zeros(4, 8, 8, dtype=torch.long)
    target[:, :6] = 1
    metric.update(preds, target, torch.tensor([0, 1, 1, 3]))  # classes 2 and 4: no episodes
    inter, union = [0.0] * 5, [0.0] * 5  # PFENet's class_intersection_meter / split_gap
    for cls in (0, 1, 1, 3):
        inter[cls] += 32
        union[cls] += 48
    reference = sum(i / (u + 1e-10) for i, u in zip(inter, union, strict=True)) / 5
    assert metric.compute()["miou"].item() == pytest.approx(reference, abs=1e-6)


def test_balanced_sampling_gives_every_class_episodes_where_pairs_miss_one() -> None:
    pools = {c: [f"c{c}-{i}" for i in range(100 if c else 3)] for c in range(5)}
    missing = [
        seed
        for seed in range(20)
        if 0 not in {e.class_id for e in draw_episodes(pools, 10, 1, (seed,))}
    ]
    assert missing  # the proportional rule leaves the rare class out for some seeds
    for seed in missing:
        episodes = EpisodeRule("balanced", pools, 1).draw(10, (seed,))
        assert sorted(e.class_id for e in episodes) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]


def test_clean_protocol_refuses_fewer_test_episodes_than_classes(pascal_root, tmp_path) -> None:
    with pytest.raises(ValueError, match=r"data.test_episodes=4: .* 5 classes"):
        pascal(pascal_root, tmp_path, test_episodes=4)


# --- 5. HSNet -----------------------------------------------------------------------------------


def test_hsnet_coco_draws_the_class_first_and_supports_may_repeat() -> None:
    pools = {0: [f"a{i}" for i in range(500)], **{c: ["x", "y", "z"] for c in range(1, 5)}}
    rule = EpisodeRule("class_first", pools, 5, support_repeats=True)
    episodes = rule.draw(2000, (0,))
    per_class = np.bincount([e.class_id for e in episodes], minlength=5)
    assert per_class.min() > 320 and per_class.max() < 480  # uniform: 400 each
    small = [e for e in episodes if e.class_id > 0]
    assert all(e.query not in e.support for e in small)
    assert all(len(set(e.support)) < 5 for e in small)  # 2 candidates for 5 shots


def test_hsnet_pascal_walks_image_class_pairs_in_list_order(pascal_root, tmp_path) -> None:
    dm = pascal(pascal_root, tmp_path, protocol="hsnet", eval_size=48)
    dm.setup("test")
    episodes = dm.test_dataloader()[0].sampler.episodes()
    walk = dm.episode_rule("test").walk
    ids = dm.source("test").ids
    items = walk_items(dm.counts("test"), ids, dm.novel_classes, dm.min_pixels, present=False)
    assert walk == pair_items(items)
    assert len(episodes) == 1000
    assert [(e.query, e.class_id) for e in episodes] == [
        (walk[i % len(walk)][0], walk[i % len(walk)][1][0]) for i in range(1000)
    ]


def test_hsnet_makes_coco_crowd_pixels_background(tmp_path: Path) -> None:
    root = write_coco_tree(tmp_path / "coco")
    labels = {}
    for name in ("clean", "hsnet"):
        dm = CocoFewShot(root=str(root), cache_dir=str(tmp_path / "cache"), protocol=name,
                         num_workers=0, image_size=48, eval_size=48, test_episodes=20)  # fmt: skip
        dm.setup("test")
        dataset = dm.test_dataloader()[0].dataset
        episode = next(e for e in dm.test_dataloader()[0].sampler.episodes())
        first = dm.source("test").ids[0]  # the image with the crowd region
        cls = next(iter(dm.counts("test")[first]))
        labels[name] = dataset[type(episode)(first, cls, episode.support)]["query_mask"]
    assert labels["clean"].eq(255).any() and not labels["hsnet"].eq(255).any()


def test_hsnet_trains_on_boundary_pixels_as_background(pascal_root, tmp_path) -> None:
    """HSNet's ``extract_ignore_idx`` zeroes the query's 255 pixels in the training target (its
    cross-entropy counts them as background); the other presets ignore them. Evaluation keeps
    them ignored under every preset."""
    targets = {}
    for name, option in (("clean", None), ("hsnet", "ignore"), ("hsnet", None)):
        # at the label's width, so that squashing keeps its one-pixel 255 column
        dm = pascal(pascal_root, tmp_path, protocol=name, train_ignore=option, image_size=WIDTH)
        dm.setup("fit")
        loader = dm.train_dataloader()
        episode = next(iter(loader.sampler))
        targets[name, option] = loader.dataset[episode]["query_mask"]
        assert dm.val_dataloader().dataset.keep_ignore
    assert targets["clean", None].eq(255).any() and targets["hsnet", "ignore"].eq(255).any()
    ignored = targets["hsnet", "ignore"]
    assert torch.equal(ignored.masked_fill(ignored == 255, 0), targets["hsnet", None])


# --- 6. training augmentation and queries per recipe --------------------------------------------


def test_training_recipe_per_preset(tmp_path: Path) -> None:
    root = write_coco_tree(tmp_path / "coco", num_images=320)
    dm = CocoFewShot(root=str(root), cache_dir=str(tmp_path / "cache"), protocol="pfenet",
                     num_workers=0, image_size=48, val_fraction=0.5)  # fmt: skip
    dm.setup("fit")
    transform = dm.train_dataloader().dataset.transform
    assert not transform.resize_longer  # PFENet augments at the native resolution
    assert transform.rotate_p == 0.5 and transform.scale == (0.8, 1.25)
    clean = resolve_protocol("clean", "coco", {}, 48)
    assert clean["train_scale"] == [0.9, 1.1] and clean["rotate_p"] == 1.0


def test_pfenet_trains_on_queries_under_2048_pixels(pascal_root: Path, tmp_path: Path) -> None:
    train_aug = "ImageSets/SegmentationAug/train_aug.txt"
    dm = pascal(pascal_root, tmp_path, protocol="pfenet", train_list=train_aug)
    dm.setup("fit")
    labels = label_maps(dm.source("train"), dm.source("train").ids)
    episodes = dm.train_dataloader().sampler.episodes()
    assert len(episodes) == dm.train_epoch_length() == len(dm.episode_rule("train").walk)
    sizes = {int((labels[e.query] == e.class_id + 1).sum()) for e in episodes}
    assert 2047 in sizes and 2048 in sizes
    clean = pascal(pascal_root, tmp_path)
    clean.setup("fit")
    sizes = {
        int((labels[e.query] == e.class_id + 1).sum()) for e in clean.train_dataloader().sampler
    }
    assert sizes == {2048}


# --- 7. backbone BatchNorm during training ------------------------------------------------------


def test_pfenet_backbone_batchnorm_uses_batch_statistics_per_group() -> None:
    torch.manual_seed(0)
    model = FewShotSegmentation(ResNet("resnet18", output_stride=8), freeze_backbone=True)
    reference = copy.deepcopy(model.backbone)
    torch.nn.Module.train(reference)  # PFENet: plain model.train(), the backbone under no_grad
    model.backbone_norm = "batch"
    model.train()
    query, support = torch.randn(2, 3, 64, 64), torch.randn(2, 2, 3, 64, 64)
    model(query, support, torch.ones(2, 2, 64, 64, dtype=torch.long))
    with torch.no_grad():
        for images in (query, support[:, 0], support[:, 1]):  # PFENet: query, then each shot
            reference(images)
    ours = dict(model.backbone.named_buffers())
    for name, buffer in reference.named_buffers():
        assert torch.equal(ours[name], buffer), name
    assert not torch.equal(ours["stem.bn1.running_mean"], torch.zeros(64))

    model.backbone_norm = "frozen"
    model.train()
    before = model.backbone.stem.bn1.running_mean.clone()
    model(query, support, torch.ones(2, 2, 64, 64, dtype=torch.long))
    assert torch.equal(model.backbone.stem.bn1.running_mean, before)


@pytest.mark.slow
def test_presets_reach_the_task_through_the_command_line(tmp_path: Path) -> None:
    """A frozen backbone's running statistics move under ``pfenet`` and stay under ``clean``."""
    moved = {}
    for name in ("pfenet", "clean"):
        run = tmp_path / name
        limits = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2"]
        main(["fit", *tiny_args(run), *limits, "--model.freeze_backbone", "true",
              "--data.protocol", name, "--data.test_episodes", "5"])  # fmt: skip
        checkpoint = torch.load(next(run.rglob("last.ckpt")), weights_only=False)
        stats = checkpoint["state_dict"]["backbone.stem.bn1.running_mean"]
        moved[name] = bool(stats.abs().sum() > 0)
    assert moved == {"pfenet": True, "clean": False}


# --- 8. configs ---------------------------------------------------------------------------------


def resolved_config(*args: str) -> dict:
    out = io.StringIO()
    with redirect_stdout(out), pytest.raises(SystemExit):
        main(["fit", *args, "--print_config"])
    return yaml.safe_load(out.getvalue())


@pytest.mark.parametrize("config", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_resolves_to_its_preset_with_nothing_overridden(config: Path) -> None:
    settings = resolved_config("--config", str(config))
    data = settings["data"]
    module, name = data["class_path"].rsplit(".", 1)
    datamodule_class = getattr(__import__(module, fromlist=[name]), name)
    datamodule = datamodule_class(**data["init_args"])
    protocol = datamodule.protocol
    assert protocol["overridden"] == []
    dataset = datamodule.dataset
    preset = resolve_protocol(protocol["name"], dataset.protocol_family, {}, datamodule.image_size)
    assert protocol == {k: v for k, v in preset.items() if k not in dataset.protocol_unused}
    if config.name == "coco.yaml":
        assert protocol["name"] == "asgnet" and episodes_per_pass(protocol) == 20001
    if config.name == "pascal.yaml":
        assert protocol["name"] == "asgnet" and episodes_per_pass(protocol) == 1001
        assert data["init_args"]["train_episodes"] is None  # not the toy run's 2000
    if config.name == "default.yaml":
        assert protocol["name"] == "clean" and datamodule.train_episodes == 2000
    own = yaml.safe_load(config.read_text())["data"].get("init_args") or {}
    defaults = dataset.task_defaults("few_shot", FewShotDataModule.DEFAULTS)
    for key, value in defaults.items():  # never the toy run's
        assert getattr(datamodule, key) == own.get(key, value), key


def test_a_seed_count_under_bam_gives_bams_seeds() -> None:
    assert resolve_protocol("bam", "pascal", {"test_seeds": 5}, 473)["test_seeds"] == [
        510, 365, 382, 322, 988
    ]  # fmt: skip
    assert resolve_protocol("bam", "pascal", {"test_seeds": 6}, 473)["overridden"] == ["test_seeds"]
    assert resolve_protocol("bam", "pascal", {"test_seeds": 5}, 473)["overridden"] == []
