"""Constructor arguments recorded from the signature, so that a description cannot drift.

A checkpoint rebuilds an encoder or a head from its class path and its arguments. A hand-kept
copy of the arguments loses any option its author forgot to add to it, and the reload then falls
back to that option's default without a word (issue 22: a head's ``margin=0.7`` reloaded as
``0.0``). :class:`CapturesArguments` records, for the most derived class's ``__init__``, every
argument bound to its signature with the defaults filled in.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

#: Where an instance keeps what its constructor was called with.
_RECORD = "_captured_init_args"


def plain(value: Any) -> Any:
    """``value`` as a config file writes it: tuples and sequences as lists, mappings as dicts."""
    if isinstance(value, Mapping):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, tuple | list):
        return [plain(item) for item in value]
    return value


def _option_names(signature: inspect.Signature, skipped: tuple[str, ...]) -> list[str]:
    """The named options of an ``__init__`` signature: not ``self``, not ``skipped``, not
    ``*args``/``**kwargs``."""
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    parameters = list(signature.parameters.values())[1:]
    return [p.name for p in parameters if p.kind not in variadic and p.name not in skipped]


def _capturing(init: Callable[..., None]) -> Callable[..., None]:
    signature = inspect.signature(init)
    passed_on = [
        p.name for p in signature.parameters.values() if p.kind == inspect.Parameter.VAR_KEYWORD
    ]

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        if _RECORD not in self.__dict__:  # the most derived class's call comes first
            bound = signature.bind(self, *args, **kwargs)
            bound.apply_defaults()
            names = _option_names(signature, type(self).uncaptured_arguments)
            recorded = {name: plain(bound.arguments[name]) for name in names}
            for name in passed_on:  # options passed on to a parent through **kwargs
                recorded.update({key: plain(item) for key, item in bound.arguments[name].items()})
            object.__setattr__(self, _RECORD, recorded)
        init(self, *args, **kwargs)

    return __init__


class CapturesArguments:
    """``init_args``: the options the object was built with, read from its ``__init__``'s
    signature (every parameter but :attr:`uncaptured_arguments`, and what ``**kwargs`` passed
    on), never a hand-kept copy.

    A subclass that adds an option needs nothing more: its own ``__init__`` is the one recorded.
    """

    #: Constructor parameters that are not options: a head's ``features`` come from the
    #: backbone it is built on.
    uncaptured_arguments: ClassVar[tuple[str, ...]] = ("features",)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            cls.__init__ = _capturing(cls.__dict__["__init__"])  # type: ignore[method-assign]

    @property
    def init_args(self) -> dict[str, Any]:
        """The recorded options (a copy)."""
        return dict(self.__dict__.get(_RECORD, {}))


def missing_options(obj: object, init_args: Mapping[str, Any]) -> list[str]:
    """The options of ``type(obj).__init__`` that ``init_args`` does not hold (``self``,
    ``features`` and ``*args``/``**kwargs`` are not options)."""
    skipped = getattr(obj, "uncaptured_arguments", CapturesArguments.uncaptured_arguments)
    names = _option_names(inspect.signature(type(obj).__init__), skipped)
    return [name for name in names if name not in init_args]
