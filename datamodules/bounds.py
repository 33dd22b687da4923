"""Numeric options' ranges as types, so that one annotation says the range everywhere.

jsonargparse validates ``Annotated`` constraints (``annotated_types``, through pydantic) while it
parses the command line and the config files, so ``--data.shots 0`` fails before any data is
read or model built, in one line naming the option, and passes plain ``int``/``float`` values on;
:func:`check_bounds` makes the same check for a Python caller, from the same annotations.

A module whose signatures use these types must not ``from __future__ import annotations``:
jsonargparse (4.53) drops the constraints of postponed annotations.
"""

from __future__ import annotations

import typing
from collections.abc import Callable, Mapping
from typing import Annotated, Any

from annotated_types import Ge, Gt, Le, Lt
from pydantic import AllowInfNan, BeforeValidator, TypeAdapter, ValidationError


def not_boolean(value: Any) -> Any:
    """Refuse ``true``/``false`` where a number goes: YAML's ``lr: true`` would otherwise be
    read as 1.0 (a bool is an int to Python and to pydantic's lax mode)."""
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got the boolean {str(value).lower()}")
    return value


#: A whole number, never a boolean.
Integer = Annotated[int, BeforeValidator(not_boolean)]
#: A finite number (no ``inf``/``nan``: a learning rate of ``inf`` fails only after a step),
#: never a boolean.
FiniteFloat = Annotated[float, BeforeValidator(not_boolean), AllowInfNan(False)]
PositiveInt = Annotated[Integer, Gt(0)]
NonNegativeInt = Annotated[Integer, Ge(0)]
#: An image side: at least one pixel at output stride 8.
AtLeast8 = Annotated[Integer, Ge(8)]
PositiveFloat = Annotated[FiniteFloat, Gt(0)]
NonNegativeFloat = Annotated[FiniteFloat, Ge(0)]
Probability = Annotated[FiniteFloat, Ge(0), Le(1)]
#: A dropout probability or a momentum: 1 would zero every feature or never forget.
BelowOne = Annotated[FiniteFloat, Ge(0), Lt(1)]
#: A share strictly between none and all (a validation fraction).
OpenFraction = Annotated[FiniteFloat, Gt(0), Lt(1)]
#: A share above none, up to all (a centre crop's ratio).
PositiveFraction = Annotated[FiniteFloat, Gt(0), Le(1)]
#: A generated scene's side in pixels.
AtLeast16 = Annotated[Integer, Ge(16)]


def _is_constrained(annotation: Any) -> bool:
    """Whether ``annotation`` is, or is a union with, an ``Annotated`` constraint."""
    members = [annotation, *typing.get_args(annotation)]
    return any(typing.get_origin(m) is Annotated for m in members)


def check_bounds(function: Callable[..., Any], arguments: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming the first of ``arguments`` outside the constraint of its
    ``Annotated`` annotation in ``function``'s signature (``None`` passes: it means a
    default)."""
    hints = typing.get_type_hints(function, include_extras=True)
    for name, value in arguments.items():
        if value is None or name not in hints:
            continue
        if not _is_constrained(hints[name]):
            continue
        try:
            TypeAdapter(hints[name]).validate_python(value)
        except ValidationError as error:
            reason = error.errors()[0]["msg"]
            raise ValueError(f"{name}={value!r}: {reason[0].lower()}{reason[1:]}") from None


def require(name: str, value: Any, ok: bool, allowed: str) -> None:
    if not ok:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
