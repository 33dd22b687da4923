"""The checks every few-shot head passes: what the task relies on, tested against the head itself.

``check_head(head_class, features)`` is the twin of :func:`backbones.testing.check_backbone`:
every shipped head's tests and the README's head recipe call it. It builds the head on an
encoder's description (:class:`backbones.FeaturePyramid`) and feeds it random features of the
declared sizes: the declared ``in_features`` exist, the outputs have the contract's shapes for
K = 1 and 3 shots and batches of 1 and 2 in train and eval mode, ``forward`` takes
``class_ids``, gradients reach every trainable parameter and ``param_groups`` holds each of them
once, bf16 autocast and channels-last inputs run (channels-last to the same logits), label 255
never counts as foreground, and the recorded options rebuild a head with equal logits. The first
broken rule raises one ``AssertionError`` naming the head and the rule.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from backbones.features import FeaturePyramid
from tasks.base import describe_head

from .base import FewShotHead
from .common import HeadOutput

Features = dict[str, Tensor]


class HeadContractError(AssertionError):
    """A head breaks a rule of :class:`~tasks.heads.FewShotHead`'s contract."""


def _rule(ok: bool, head: type, message: str) -> None:
    if not ok:
        raise HeadContractError(f"{head.__name__}: {message}")


def _episode(
    features: FeaturePyramid, names: Sequence[str], batch: int, shots: int, size: int, seed: int
) -> tuple[Features, Features, Tensor]:
    """Random features of the declared channels and strides, and masks of a foreground box, a
    255 band across it, and one empty support (batch > 1)."""
    generator = torch.Generator().manual_seed(seed)

    def feats(*lead: int) -> Features:
        out = {}
        for name in names:
            side = -(-size // features[name].stride)
            shape = (*lead, features[name].channels, side, side)
            out[name] = torch.randn(*shape, generator=generator)
        return out

    masks = torch.zeros(batch, shots, size, size, dtype=torch.long)
    masks[..., size // 8 : size * 7 // 8, size // 4 : size * 15 // 16] = 1
    masks[..., size // 2 : size // 2 + size // 8, :] = 255
    if batch > 1:
        masks[-1, 0] = 0
    return feats(batch), feats(batch, shots), masks


def channels_last(x: Tensor) -> Tensor:
    return x.contiguous(memory_format=torch.channels_last)


def _build(make: Callable[..., FewShotHead], features: FeaturePyramid, shots: int) -> FewShotHead:
    """The head for ``shots`` (its ``shots`` option set when its constructor has one)."""
    target = getattr(make, "func", make)
    takes_shots = "shots" in inspect.signature(target).parameters
    head = make(features, shots=shots) if takes_shots else make(features)
    _rule(
        isinstance(head, FewShotHead),
        type(head),
        "is not a tasks.heads.FewShotHead (the contract the task relies on)",
    )
    return head


def _check_output(out: Any, batch: int, shots: int, name: type) -> None:
    _rule(
        isinstance(out, HeadOutput), name, f"forward returned {type(out).__name__}, not HeadOutput"
    )
    logits = out.logits
    _rule(
        logits.ndim == 4 and logits.shape[:2] == (batch, 2),
        name,
        f"logits are {tuple(logits.shape)}; expected [{batch}, 2, h, w]",
    )
    _rule(bool(torch.isfinite(logits.float()).all()), name, "logits are not finite")
    for aux in out.aux_logits:
        _rule(
            aux.ndim == 4 and aux.shape[:2] == (batch, 2),
            name,
            f"an auxiliary logit map is {tuple(aux.shape)}; expected [{batch}, 2, *, *]",
        )
    if out.shot_logits is not None:
        _rule(
            out.shot_logits.shape[:3] == (batch, shots, 2),
            name,
            f"shot_logits are {tuple(out.shot_logits.shape)}; expected [{batch}, {shots}, 2, h, w]",
        )


def check_head(make: Callable[..., FewShotHead], features: FeaturePyramid, size: int = 64) -> None:
    """Raise :class:`HeadContractError` naming ``make``'s head and the first rule it breaks, on
    random features of an encoder described by ``features`` for ``size`` x ``size`` images.

    Args:
        make: the head class, or a callable building it from ``features`` (``partial(Head,
            option=...)``); a constructor with a ``shots`` option is given each K.
        features: the encoder's description (``backbone.output_info``).
        size: the image side the features are sized for.
    """
    torch.manual_seed(0)
    head = _build(make, features, 1)
    name = type(head)
    names = tuple(head.in_features)
    _rule(bool(names), name, "declares no in_features")
    unknown = [n for n in names if n not in features]
    _rule(
        not unknown, name, f"in_features {unknown} are not outputs of the encoder {list(features)}"
    )
    _rule(
        head.support_mask_at is None or head.support_mask_at in names,
        name,
        f"support_mask_at={head.support_mask_at!r} is not among its in_features {list(names)}",
    )
    for shots in (1, 3):
        head = _build(make, features, shots)
        for batch in (1, 2):
            query, support, masks = _episode(features, names, batch, shots, size, seed=shots)
            for mode in (True, False):
                head.train(mode)
                try:
                    out = head(query, support, masks, class_ids=torch.arange(batch))
                except TypeError as error:
                    if "class_ids" not in str(error):
                        raise
                    _rule(False, name, "forward does not accept the class_ids keyword")
                _check_output(out, batch, shots, name)

    head = _build(make, features, 3).train()
    query, support, masks = _episode(features, names, 2, 3, size, seed=5)
    out = head(query, support, masks)
    loss = out.logits.float().square().mean()
    loss = loss + sum((a.float().square().mean() for a in out.aux_logits), torch.zeros(()))
    loss.backward()
    trainable = [(n, p) for n, p in head.named_parameters() if p.requires_grad]
    dead = [n for n, p in trainable if p.grad is None or not bool(torch.isfinite(p.grad).all())]
    _rule(not dead, name, f"no finite gradient reaches the trainable parameters {dead[:5]}")
    grouped = [p for group in head.param_groups(0.01) for p in group["params"]]
    _rule(
        len(grouped) == len({id(p) for p in grouped})
        and {id(p) for p in grouped} == {id(p) for _, p in trainable},
        name,
        "param_groups must hold every trainable parameter exactly once",
    )

    head.eval()
    query, support, masks = _episode(features, names, 2, 3, size, seed=7)
    with torch.no_grad():
        expected = head(query, support, masks).logits
        query_cl = {k: channels_last(v) for k, v in query.items()}
        support_cl = {
            k: v.flatten(0, 1)
            .contiguous(memory_format=torch.channels_last)
            .unflatten(0, v.shape[:2])
            for k, v in support.items()
        }
        reordered = head(query_cl, support_cl, masks).logits
        _rule(
            torch.allclose(reordered, expected, rtol=1e-4, atol=1e-4 * expected.abs().max()),
            name,
            "channels-last features give other logits",
        )
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = head(query_cl, support_cl, masks).logits
        _rule(
            bool(torch.isfinite(mixed.float()).all()), name, "bf16 autocast gives non-finite logits"
        )
        ignored = head(query, support, masks.masked_fill(masks == 1, 255)).logits
        background = head(query, support, masks.masked_fill(masks == 1, 0)).logits
        _rule(
            torch.allclose(ignored, background, rtol=1e-5, atol=1e-6),
            name,
            "label 255 counts as foreground (255 supports differ from background ones)",
        )
        description = describe_head(head)
        rebuilt = type(head)(features, **description["init_args"])
        rebuilt.load_state_dict(head.state_dict())
        rebuilt.eval()
        _rule(
            torch.equal(rebuilt(query, support, masks).logits, expected),
            name,
            f"its recorded options {description['init_args']} rebuild a head with other logits",
        )
