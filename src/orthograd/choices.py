"""Choice lists derived from ``Literal`` types, so that each list of allowed values is written once, as the type.

``choices(Literal[...])`` is the tuple of values; ``check_choice`` validates one argument against it;
``check_literal_fields`` validates every ``Literal``-typed field of a dataclass (``Literal[...] | None`` accepts
None too), which is how the method configs check their string options in ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import types
import typing
from typing import Any


def choices(literal: Any) -> tuple[Any, ...]:
    """The values of a ``Literal`` type, in the order it lists them."""
    if typing.get_origin(literal) is not typing.Literal:
        raise TypeError(f"expected a Literal type, got {literal!r}")
    return typing.get_args(literal)


def check_choice(name: str, value: Any, literal: Any) -> None:
    """Raise ``ValueError`` naming ``name`` and the allowed values when ``value`` is not one of ``literal``'s."""
    allowed = choices(literal)
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def check_literal_fields(instance: object) -> None:
    """``check_choice`` for every field of the dataclass ``instance`` whose type is a ``Literal`` (or one or None)."""
    cls = type(instance)
    for name, (allowed, optional) in _literal_fields(cls).items():  # type: ignore[arg-type]  # mypy: a class is not Hashable
        value = getattr(instance, name)
        if not (optional and value is None) and value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


@functools.cache
def _literal_fields(cls: type) -> dict[str, tuple[tuple[Any, ...], bool]]:
    """Field name -> (allowed values, None allowed) for the Literal-typed fields of a dataclass (resolved once)."""
    out: dict[str, tuple[tuple[Any, ...], bool]] = {}
    for field in dataclasses.fields(cls):
        hint = _resolved(cls, field.name)
        members = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        literals = [m for m in members if typing.get_origin(m) is typing.Literal]
        if literals:
            allowed = tuple(value for literal in literals for value in typing.get_args(literal))
            out[field.name] = (allowed, type(None) in members)
    return out


def _resolved(cls: type, name: str) -> Any:
    """A field's annotation as a type, evaluated in the module of the class that declared it (string annotations
    under ``from __future__ import annotations``); None when it names something only a type checker sees."""
    owner = next(klass for klass in cls.__mro__ if name in vars(klass).get("__annotations__", {}))
    annotation = owner.__annotations__[name]
    if not isinstance(annotation, str):
        return annotation
    try:
        return eval(annotation, vars(sys.modules[owner.__module__]), dict(vars(owner)))  # noqa: S307 - own source
    except NameError:
        return None
