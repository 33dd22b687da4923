"""Named protocols of the few-shot segmentation literature: the whole pipeline of each paper.

A number is comparable with a paper's only under that paper's pipeline, quirks included. A preset
sets every option below at once; an option given explicitly (``--data.eval_pad mean``) still wins,
is listed in ``overridden``, and the resolved values are saved with the run and in every results
file. ``clean`` is this project's own protocol and the default.

Options and what each preset sets (PASCAL / COCO where they differ); ``dcama`` is ``hsnet``
with ``eval_size`` 384 (DCAMA runs HSNet's data code at 384 px):

=========================  ===========  ===========  ===========  ==============  ===========
option                     ``clean``    ``pfenet``   ``asgnet``   ``hsnet``       ``bam``
=========================  ===========  ===========  ===========  ==============  ===========
test_episodes              1000 / 1000  5000/20000   1000/20000   1000 / 1000     1000 / 1000
extra_test_episode         no           yes          yes          no              no
max_test_passes            (none)       20           20           (none)          (none)
test_seeds                 321          321          321          0               5 (see below)
test_sampling              balanced     image_walk   image_walk   pair_walk /     image_walk
                                                                  class_first
query_classes              eligible     present      present      eligible        present
support_repeats            no           no           no           yes             no
eval_resize                longer_pad   floor8       floor8       squash          floor8
eval_size                  image_size   image_size   image_size   400             image_size
eval_pad                   mean         black        black        (none)          black
scoring                    original     square       square       input           square
train_list (PASCAL)        train_aug    noduplicate  noduplicate  train_aug       noduplicate
train_sampling             pairs        images       images       pairs           images
exclude_novel_from_train   no           no           no           no              yes
train_scale                0.9-1.1      0.9-1.1 /    0.9-1.1 /    (none)          0.9-1.1 /
                                        0.8-1.25     0.8-1.25                     0.8-1.25
rotate_p                   1.0          0.5          0.5          (none)          0.5
train_resize_longer        yes          no           no           no              no
train_augment              yes          yes          yes          no              yes
train_ignore               ignore       ignore       ignore       background      ignore
backbone_norm              frozen       batch        batch        frozen          frozen
loss_reduction             episodes     pixels       pixels       pixels          pixels
base_learner_dropout       no           no           no           no              yes
coco_crowd                 ignore       ignore       ignore       background      ignore
=========================  ===========  ===========  ===========  ==============  ===========

Sources, read from the official code:

* PFENet (Tian et al., TPAMI 2020; ``test.py``, ``util/dataset.py``, ``util/transform.py``,
  ``config/*``): ``test_num`` 5000 / 20000 with the loop ``if (iter_num - 1) * bs >= test_num:
  break`` (so ``test_num + 1`` episodes) inside ``for e in range(20)`` (at most 20 passes over
  the list: fewer episodes on a short list), seed 321, the loader walks the filtered test list in
  order (``shuffle=False``) and draws the episode's class among the novel classes present in the
  query at any pixel count (``SemData.__getitem__``; the 2 * 32 * 32 rule only decides which images
  enter the list and which serve as supports); ``resized_val: True`` selects ``transform.Resize``:
  longer side to ``val_size``, ``int()`` of the other, each side floored to a multiple of 8
  (500 x 375 -> 472 x 352), ``cv2.INTER_LINEAR``, pasted top-left on a zero canvas *before*
  normalisation (black); ``ori_resize: True`` upsamples the whole ``val_size`` output (bilinear,
  ``align_corners=True``) to a square of the label's longer side, the label padded with 255.
  Training: ``lists/pascal/voc_sbd_merge_noduplicate.txt`` (5953 images), one episode per listed
  image per epoch with the class drawn among the base classes present at any size, ``RandScale``
  (0.9-1.1 PASCAL, 0.8-1.25 COCO configs) at native resolution, ``RandRotate`` with ``p=0.5``;
  ``model.train()`` on the whole model, so the "frozen" backbone's BatchNorm normalises with batch
  statistics and updates its running statistics (query and each shot in separate calls).
* ASGNet (Li et al., CVPR 2021; ``tool/test.py``): PFENet's pipeline with ``test_num`` 1000 /
  20000 (so 1001 / 20001 episodes).
* HSNet (Min et al., ICCV 2021; ``data/pascal.py``, ``data/coco.py``, ``common/logger.py``):
  ``fix_randseed(0)``; PASCAL walks its ``(image, class)`` split list in order, 1000 episodes;
  COCO draws the class uniformly, then an image of it; supports are redrawn only when equal to
  the query, so K > 1 supports may repeat; COCO masks keep only the episode's class, so crowd
  pixels are background; ``Resize((400, 400))``, scored at 400 (``use_original_imgsize`` off);
  trained without augmentation, backbone in ``eval()``; ``extract_ignore_idx`` sets the
  query's 255 (object boundary) pixels to 0 in the training target, which the 2-class
  cross-entropy then counts as background (evaluation still ignores them).
* BAM (Lang et al., CVPR 2022; ``test.py``, ``util/dataset.py``): five seeds
  ``np.random.seed(123); randint(0, 1000, 5)`` = 510 365 382 322 988, the mean reported;
  ``test_num`` 1000 with ``if iter_num * bs >= test_num: break`` (exactly 1000, so only the first
  1000 images of a longer list are ever queries); PFENet's resize and scoring; training images
  with any novel-class pixel dropped; the encoder layers called with ``.eval()``;
  ``train.py``'s ``model.train()`` then ``fix_bn`` (BatchNorm only in eval mode) leaves the
  frozen base learner's ``Dropout2d(0.1)`` (PSPNet ``cls[3]``) active in training.

Every paper's ``train.py`` averages its cross-entropy over the labelled pixels of the batch
(``nn.CrossEntropyLoss(ignore_index=255)``; HSNet's over all pixels, its 255 counted as
background): ``loss_reduction: pixels``, the mean over the global batch's labelled pixels on any
number of devices (:class:`tasks.segment.FewShotSegmentation`). ``clean`` weighs every episode
the same (``episodes``: each episode's pixel mean, averaged).

Every reference divides mIoU by all of the fold's classes (a class without episodes counts 0);
this project does the same (:class:`tasks.metrics.FewShotIoU`), and its ``balanced`` sampling
gives every class episodes, so no class is silently missing. The papers' random streams are not
reproduced (they interleave Python's, NumPy's and torch's generators with loader workers): the
episodes follow each paper's rules, drawn from our own seeded generator.

The embedded ``shapes`` set is laid out as PASCAL-5i and takes the PASCAL column (but keeps its
own list files). FSS-1000 and class folders (:mod:`datamodules.folders`) take the ``fss`` column,
defined for ``clean`` (1000 balanced episodes) and ``hsnet`` (HSNet's ``data/fss.py``: each of
the 2400 test images once, in list order); the other presets name the families they have.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Literal

from .bounds import AtLeast8, PositiveInt, Probability, check_bounds

EvalResize = Literal["longer_pad", "floor8", "squash"]
EvalPad = Literal["mean", "black"]
Scoring = Literal["original", "square", "input"]
TestSampling = Literal["balanced", "image_walk", "pair_walk", "class_first"]
TrainSampling = Literal["pairs", "images"]
QueryClasses = Literal["eligible", "present"]
BackboneNorm = Literal["frozen", "batch"]
CocoCrowd = Literal["ignore", "background"]
LossReduction = Literal["episodes", "pixels"]
TrainIgnore = Literal["ignore", "background"]
Family = Literal["pascal", "coco", "fss"]
#: The presets' names (the keys of :data:`PROTOCOLS`): a misspelled ``--data.protocol`` fails
#: when the command line is parsed, naming the allowed values.
ProtocolName = Literal["clean", "pfenet", "asgnet", "hsnet", "bam", "dcama"]

# --- the "fss" family: datasets of one class per folder (datamodules.folders) ----------------
#: HSNet's FSS-1000 test (``data/fss.py``): every image of the 240 test classes once as the
#: query, in list order (``__len__`` is the number of images), supports redrawn when equal.
FSS_TEST_IMAGES = 2400

#: PFENet/ASGNet/BAM's PASCAL-5i training list (VOC train + SBD, duplicates removed, 5953 images),
#: published in each repository's ``lists/pascal/``; relative to the dataset root.
NODUPLICATE_LIST = "lists/pascal/voc_sbd_merge_noduplicate.txt"
#: The SBD-augmented training list (10582 images) of the clean protocol and HSNet's images.
TRAIN_AUG_LIST = "ImageSets/SegmentationAug/train_aug.txt"

PFENET_SCALE = {"pascal": (0.9, 1.1), "coco": (0.8, 1.25)}


@dataclass(frozen=True)
class Protocol:
    """Every detail a preset fixes; a ``dict`` value is per dataset family (``pascal``/``coco``).

    ``eval_size`` ``None`` means the datamodule's ``image_size``; ``train_list`` applies to
    PASCAL-5i only.
    """

    test_episodes: dict[str, PositiveInt]
    test_seeds: tuple[int, ...]
    source: str
    extra_test_episode: bool = False
    max_test_passes: PositiveInt | None = None
    test_sampling: TestSampling | dict[str, TestSampling] = "balanced"
    query_classes: QueryClasses = "eligible"
    support_repeats: bool = False
    eval_resize: EvalResize = "longer_pad"
    eval_size: AtLeast8 | None = None
    eval_pad: EvalPad = "mean"
    scoring: Scoring = "original"
    train_list: str = TRAIN_AUG_LIST
    train_sampling: TrainSampling = "pairs"
    exclude_novel_from_train: bool = False
    train_scale: tuple[float, float] | dict[str, tuple[float, float]] = (0.9, 1.1)
    rotate_p: Probability = 1.0
    train_resize_longer: bool = True
    train_augment: bool = True
    train_ignore: TrainIgnore = "ignore"
    backbone_norm: BackboneNorm = "frozen"
    loss_reduction: LossReduction = "episodes"
    base_learner_dropout: bool = False
    coco_crowd: CocoCrowd = "ignore"


def _pfenet_family(test_episodes: dict[str, int], seeds: tuple[int, ...], **kwargs: Any):
    settings: dict[str, Any] = {
        "test_sampling": "image_walk",
        "query_classes": "present",
        "eval_resize": "floor8",
        "eval_pad": "black",
        "scoring": "square",
        "train_list": NODUPLICATE_LIST,
        "train_sampling": "images",
        "train_scale": PFENET_SCALE,
        "rotate_p": 0.5,
        "train_resize_longer": False,
        "loss_reduction": "pixels",
    }
    return Protocol(test_episodes, seeds, **settings | kwargs)


#: What PFENet's and ASGNet's own test and training loops add: the off-by-one episode, at most 20
#: passes over the list, and the frozen backbone's BatchNorm in train mode.
PFENET_LOOP: dict[str, Any] = {
    "extra_test_episode": True,
    "max_test_passes": 20,
    "backbone_norm": "batch",
}

PROTOCOLS: dict[str, Protocol] = {
    "clean": Protocol(
        {"pascal": 1000, "coco": 1000, "fss": 1000},
        (321,),
        source="this project: held-out validation, 2048-px pairs, every class given episodes, "
        "crop-then-resize scoring, BatchNorm of a frozen backbone in eval mode",
    ),
    "pfenet": _pfenet_family(
        {"pascal": 5000, "coco": 20000},
        (321,),
        source="PFENet (Tian et al., TPAMI 2020)",
        **PFENET_LOOP,
    ),
    "asgnet": _pfenet_family(
        {"pascal": 1000, "coco": 20000},
        (321,),
        source="ASGNet (Li et al., CVPR 2021)",
        **PFENET_LOOP,
    ),
    "hsnet": Protocol(
        {"pascal": 1000, "coco": 1000, "fss": FSS_TEST_IMAGES},
        (0,),
        source="HSNet (Min et al., ICCV 2021)",
        test_sampling={"pascal": "pair_walk", "coco": "class_first", "fss": "pair_walk"},
        support_repeats=True,
        eval_resize="squash",
        eval_size=400,
        scoring="input",
        train_resize_longer=False,
        train_augment=False,
        train_ignore="background",
        loss_reduction="pixels",
        coco_crowd="background",
    ),
    "bam": _pfenet_family(
        {"pascal": 1000, "coco": 1000},
        (510, 365, 382, 322, 988),
        source="BAM (Lang et al., CVPR 2022)",
        exclude_novel_from_train=True,
        base_learner_dropout=True,
    ),
}

#: DCAMA runs HSNet's data code (``data/``, ``common/evaluation.py`` of pawn-sxy/DCAMA) at 384 px
#: (``FSSDataset.initialize(img_size=384)`` in ``train.py`` and ``test.py``).
PROTOCOLS["dcama"] = replace(
    PROTOCOLS["hsnet"], eval_size=384, source="DCAMA (Shi et al., ECCV 2022): HSNet's at 384 px"
)

#: The options a user can set one by one (``--data.<option>``): every field of
#: :class:`Protocol` but its ``source``.
OPTIONS = tuple(f.name for f in fields(Protocol) if f.name != "source")


def _for_family(value: Any, family: str) -> Any:
    return value[family] if isinstance(value, dict) else value


def _extended_seeds(preset: tuple[int, ...], count: int) -> list[int]:
    """``count`` seeds: the preset's own first, then the integers after its last one."""
    seeds = list(preset[:count])
    candidate = preset[-1]
    while len(seeds) < count:
        candidate += 1
        if candidate not in seeds:
            seeds.append(candidate)
    return seeds


def resolve_protocol(
    name: str | None, family: str, explicit: dict[str, Any], image_size: int
) -> dict[str, Any]:
    """The resolved settings of preset ``name`` (``None``: ``clean``) for a dataset ``family``,
    with the options in ``explicit`` (not ``None``) taking precedence; ``overridden`` lists the
    preset values they replaced.

    ``test_seeds`` may be given as a count ``N``: the preset's first ``N`` seeds (BAM's five for
    ``bam``), continued with the integers after its last one.
    """
    name = name or "clean"
    if name not in PROTOCOLS:
        raise ValueError(f"data.protocol={name!r}: expected one of {sorted(PROTOCOLS)} or null")
    unknown = sorted(set(explicit) - set(OPTIONS))
    if unknown:
        raise ValueError(f"unknown protocol options {unknown}; expected some of {list(OPTIONS)}")
    preset = PROTOCOLS[name]
    if family not in preset.test_episodes:
        defined = [n for n, p in PROTOCOLS.items() if family in p.test_episodes]
        raise ValueError(
            f"data.protocol={name!r} has no {family!r} variant (it is defined for "
            f"{sorted(preset.test_episodes)}); expected one of {defined}"
        )
    values = asdict(preset)
    resolved: dict[str, Any] = {"name": name}
    for option in OPTIONS:
        resolved[option] = _for_family(values[option], family)
    resolved["test_seeds"] = list(preset.test_seeds)
    resolved["train_scale"] = list(resolved["train_scale"])
    resolved["eval_size"] = resolved["eval_size"] or image_size
    given = {key: value for key, value in explicit.items() if value is not None}
    if isinstance(given.get("train_scale"), tuple):
        given["train_scale"] = list(given["train_scale"])
    seeds = given.get("test_seeds")
    if isinstance(seeds, int):
        if seeds < 1:
            raise ValueError(f"data.test_seeds={seeds}: expected a count >= 1 or a list of seeds")
        given["test_seeds"] = _extended_seeds(preset.test_seeds, seeds)
    elif seeds is not None and (not seeds or len(set(seeds)) != len(seeds)):
        raise ValueError(f"data.test_seeds={seeds}: expected a non-empty list of distinct seeds")
    overridden = sorted(key for key, value in given.items() if resolved[key] != value)
    resolved.update(given, source=preset.source, overridden=overridden)
    low, high = resolved["train_scale"]
    if not 0 < low <= high:
        raise ValueError(f"data.train_scale={[low, high]}: expected 0 < min <= max")
    check_bounds(Protocol, {k: v for k, v in given.items() if k != "test_episodes"})
    return resolved


def episodes_per_pass(protocol: dict[str, Any]) -> int:
    """Test episodes one seed runs: the preset's count, plus the PFENet/ASGNet loop's extra one."""
    return protocol["test_episodes"] + int(protocol["extra_test_episode"])
