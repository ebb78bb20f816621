"""Unlearning methods, selectable by name: ``available()`` lists them, ``get(name)`` returns the class."""

from orthograd.methods import orthograd as _orthograd  # noqa: F401  (registers the method)
from orthograd.methods.base import IterativeConfig, MethodConfig, MethodContext, UnlearningMethod
from orthograd.methods.orthograd import OrthoGrad, OrthoGradConfig
from orthograd.methods.registry import available, get, make_config, register

__all__ = [
    "IterativeConfig",
    "MethodConfig",
    "MethodContext",
    "OrthoGrad",
    "OrthoGradConfig",
    "UnlearningMethod",
    "available",
    "get",
    "make_config",
    "register",
]
