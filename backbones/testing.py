"""The checks every encoder passes: what the tasks rely on, tested against the encoder itself.

``check_backbone(encoder)`` is what an encoder's tests call (tests/test_contracts.py calls it on
every encoder of this project and on the examples of other families): the declared outputs are
the computed ones (names, order, channels, strides), stage selection runs nothing after the last
selected output, an eval-mode forward changes no parameter or buffer (what the task's frozen
backbone relies on), ``forward_from`` resumes where it says, and the description rebuilds the
same network.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .protocol import Backbone, build_described


def _assert_equal(got: dict[str, Tensor], want: dict[str, Tensor], what: str) -> None:
    for name, value in want.items():
        assert name in got, f"{what}: output {name!r} missing; got {list(got)}"
        assert torch.equal(got[name], value), f"{what}: output {name!r} differs"


def check_backbone(encoder: Backbone, size: Sequence[int] = (64, 72)) -> None:
    """Raise ``AssertionError`` naming the first broken promise of ``encoder``'s contract
    (:class:`backbones.Backbone`) on a random ``size`` input; the encoder's selection and mode
    are restored afterwards."""
    assert isinstance(encoder, Backbone), f"{type(encoder).__name__} is not a backbones.Backbone"
    info = encoder.output_info
    names = list(info)
    was_training = encoder.training
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        selected = list(encoder.eval()(x))
    try:
        encoder.select_outputs(names)
        state = {key: value.clone() for key, value in encoder.state_dict().items()}
        with torch.no_grad():
            full = encoder(x)
        assert list(full) == names, f"forward returned {list(full)}; output_info says {names}"
        for name, value in full.items():
            expected = [(s + info[name].stride - 1) // info[name].stride for s in size]
            close = all(
                abs(got - want) <= 1 for got, want in zip(value.shape[-2:], expected, strict=True)
            )
            assert value.shape[:2] == (2, info[name].channels) and close, (
                f"output {name!r} is {tuple(value.shape)}; {info[name]} declares "
                f"[2, {info[name].channels}, ~{expected[0]}, ~{expected[1]}]"
            )
        for key, value in encoder.state_dict().items():
            assert torch.equal(value, state[key]), f"an eval-mode forward changed {key!r}"

        for stage in info.stages:
            encoder.select_outputs([stage.name])
            idle = list(encoder.idle_stages())
            calls: list[nn.Module] = []
            hooks = [m.register_forward_hook(lambda m, *_, c=calls: c.append(m)) for m in idle]
            with torch.no_grad():
                alone = encoder(x)
            for hook in hooks:
                hook.remove()
            assert list(alone) == [stage.name], f"selecting {stage.name!r} returned {list(alone)}"
            _assert_equal(alone, {stage.name: full[stage.name]}, f"selecting {stage.name!r}")
            assert not calls, f"selecting {stage.name!r} still ran modules after it"

        encoder.select_outputs(names)
        stages = [stage.name for stage in info.stages]
        if encoder.resumable:
            with torch.no_grad():
                for name in stages[:-1]:  # as the task runs it: up to an output, then on
                    head = encoder.forward_from(None, x, until=name)
                    before = {n: full[n] for n in names[: names.index(name) + 1]}
                    assert list(head) == list(before), f"until={name!r} gave {list(head)}"
                    _assert_equal(head, before, f"forward_from(None, x, until={name!r})")
                    rest = encoder.forward_from(name, full[name])
                    after = {n: full[n] for n in names[names.index(name) + 1 :]}
                    assert list(rest) == list(after), f"forward_from({name!r}) gave {list(rest)}"
                    _assert_equal(rest, after, f"forward_from({name!r})")

        rebuilt = build_described(encoder.describe())
        assert isinstance(rebuilt, Backbone), "describe() does not rebuild a Backbone"
        rebuilt.load_state_dict(encoder.state_dict(), strict=True)
        rebuilt.eval().select_outputs(names)
        with torch.no_grad():
            _assert_equal(rebuilt(x), full, "the encoder rebuilt from describe()")
    finally:
        encoder.select_outputs(selected)
        encoder.train(was_training)
