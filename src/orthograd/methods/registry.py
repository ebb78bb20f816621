"""Methods selectable by name: ``register`` as a class decorator, ``get`` and ``available`` to look up."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from orthograd.methods.base import MethodConfig, UnlearningMethod

_REGISTRY: dict[str, type[UnlearningMethod[Any]]] = {}
M = TypeVar("M", bound=type[UnlearningMethod[Any]])


def register(cls: M) -> M:
    """Make a method selectable by ``cls.name`` (the name users pass as ``method=``)."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"a method named {cls.name!r} is already registered")
    _REGISTRY[cls.name] = cls
    return cls


def available() -> list[str]:
    """Names of every registered method, in registration order."""
    return list(_REGISTRY)


def get(name: str) -> type[UnlearningMethod[Any]]:
    """The method class registered under ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; available: {available()}") from None


def make_config(name: str, values: Mapping[str, Any] | MethodConfig | None = None) -> MethodConfig:
    """The method's config from keyword values (unknown keys are rejected), or the config itself."""
    cls = get(name)
    if isinstance(values, MethodConfig):
        if not isinstance(values, cls.config_class):
            raise TypeError(f"{name!r} takes a {cls.config_class.__name__}, got {type(values).__name__}")
        return values
    return cls.config_class.from_dict(values or {})
