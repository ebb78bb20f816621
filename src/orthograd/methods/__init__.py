"""Unlearning methods, selectable by name: ``available()`` lists them, ``get(name)`` returns the class.

Each method module registers its class with ``@register`` when imported; the built-in ones are imported below, in
the order ``available()`` lists them. A new method is a module here plus its line below (or, outside the package,
any module that applies ``@register`` before ``unlearn(method=...)`` names it).
"""

from orthograd.methods import (  # noqa: F401 - imported to register their methods
    duck,
    finetune,
    fisher,
    gdr_gma,
    graddiff,
    influence,
    neggrad,
    neggrad_plus,
    npo,
    orthograd,
    rmu,
    scrub,
    simnpo,
)
from orthograd.methods.base import IterativeConfig, MethodConfig, MethodContext, UnlearningMethod
from orthograd.methods.registry import available, get, make_config, register

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
