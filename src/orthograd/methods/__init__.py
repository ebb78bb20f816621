"""Unlearning methods, selectable by name: ``available()`` lists them, ``get(name)`` returns the class.

Every module of this package that defines a method registers it with ``@register``; they are all imported
here, so adding a method is adding a module.
"""

import importlib
import pkgutil

from orthograd.methods.base import IterativeConfig, MethodConfig, MethodContext, UnlearningMethod
from orthograd.methods.registry import available, get, make_config, register

_INFRASTRUCTURE = {"base", "registry"}
for _module in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _module.name not in _INFRASTRUCTURE:
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "IterativeConfig",
    "MethodConfig",
    "MethodContext",
    "UnlearningMethod",
    "available",
    "get",
    "make_config",
    "register",
]
