"""Named evaluation protocols of the few-shot segmentation literature.

Papers differ in every evaluation detail, so numbers are comparable only under one protocol. A
preset sets all of them at once; an option given explicitly (``--data.test_episodes 2000``) still
wins, and the resolved values are saved with the run and in every results file.

==========  ===================  =====================  =================  ==========  =========
preset      test episodes        seeds                  resize, size       scored at   training
            (PASCAL / COCO)                                                            images
==========  ===================  =====================  =================  ==========  =========
``pfenet``  5000 / 20000         321                    longer side, pad   original    all
``asgnet``  1000 / 20000         321                    longer side, pad   original    all
``hsnet``   1000 / 1000          0                      squash to 400      400 x 400   all
``bam``     1000 / 1000          510 365 382 322 988    longer side, pad   original    no novel
==========  ===================  =====================  =================  ==========  =========

Sources: PFENet (Tian et al., TPAMI 2020) and ASGNet (Li et al., CVPR 2021) ``test.py``: seed
321, ``test_Resize`` of the longer side to the training size (473 PASCAL, 641 COCO) with padding,
``ori_resize`` scoring at the original label. HSNet (Min et al., ICCV 2021): ``fix_randseed(0)``,
``Resize((400, 400))``, scored at 400 unless ``use_original_imgsize``. BAM (Lang et al., CVPR
2022) ``test.py``: five seeds from ``np.random.seed(123); randint(0, 1000, 5)``, the mean
reported, PFENet's resize and scoring, training lists without novel-class images. The episode
*lists* differ from the papers' (their samplers are not ours); the seeds are kept for the record.

The embedded ``shapes`` set is laid out as PASCAL-5i and takes the PASCAL column.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

EvalResize = Literal["longer_pad", "squash"]
Scoring = Literal["original", "input"]


@dataclass(frozen=True)
class Protocol:
    """Every evaluation detail a preset fixes; ``eval_size`` ``None`` means the training size."""

    test_episodes: dict[str, int]
    test_seeds: tuple[int, ...]
    eval_resize: EvalResize = "longer_pad"
    eval_size: int | None = None
    scoring: Scoring = "original"
    exclude_novel_from_train: bool = False
    source: str = "this project's defaults"


PROTOCOLS: dict[str, Protocol] = {
    "pfenet": Protocol(
        {"pascal": 5000, "coco": 20000}, (321,), source="PFENet (Tian et al., TPAMI 2020)"
    ),
    "asgnet": Protocol(
        {"pascal": 1000, "coco": 20000}, (321,), source="ASGNet (Li et al., CVPR 2021)"
    ),
    "hsnet": Protocol(
        {"pascal": 1000, "coco": 1000},
        (0,),
        eval_resize="squash",
        eval_size=400,
        scoring="input",
        source="HSNet (Min et al., ICCV 2021)",
    ),
    "bam": Protocol(
        {"pascal": 1000, "coco": 1000},
        (510, 365, 382, 322, 988),
        exclude_novel_from_train=True,
        source="BAM (Lang et al., CVPR 2022)",
    ),
}

#: The values used without a preset: this project's defaults.
CUSTOM = Protocol({"pascal": 1000, "coco": 1000}, (321,))


def resolve_protocol(
    name: str | None, family: str, explicit: dict[str, Any], image_size: int
) -> dict[str, Any]:
    """The resolved evaluation settings of preset ``name`` (``None``: :data:`CUSTOM`) for a
    dataset ``family`` (``pascal``/``coco``), with the options in ``explicit`` (not ``None``)
    taking precedence; ``overridden`` lists the preset values they replaced.

    ``test_seeds`` may be given as a count ``N``: the preset's first seed and the ``N - 1``
    following integers.
    """
    if name is not None and name not in PROTOCOLS:
        raise ValueError(f"data.protocol={name!r}: expected one of {sorted(PROTOCOLS)} or null")
    preset = PROTOCOLS[name] if name else CUSTOM
    resolved: dict[str, Any] = {
        "name": name or "custom",
        "test_episodes": preset.test_episodes[family],
        "test_seeds": list(preset.test_seeds),
        "eval_resize": preset.eval_resize,
        "eval_size": preset.eval_size or image_size,
        "scoring": preset.scoring,
        "exclude_novel_from_train": preset.exclude_novel_from_train,
    }
    given = {key: value for key, value in explicit.items() if value is not None}
    overridden = sorted(key for key, value in given.items() if resolved[key] != value)
    resolved.update(given, source=preset.source, overridden=overridden)
    seeds = resolved["test_seeds"]
    if isinstance(seeds, int):
        if seeds < 1:
            raise ValueError(f"data.test_seeds={seeds}: expected a count >= 1 or a list of seeds")
        first = preset.test_seeds[0]
        resolved["test_seeds"] = list(range(first, first + seeds))
    elif not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"data.test_seeds={seeds}: expected a non-empty list of distinct seeds")
    return resolved
