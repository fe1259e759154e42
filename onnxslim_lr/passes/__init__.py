"""Rewrite passes, one module per method, registered by name.

Importing this package imports every module in it, so a new pass only has to exist (and
use ``@register``) to appear in the CLI's choices and in :func:`available`.
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import Budget, Candidate, ConvSite, Decline, FCSite, Pass, PassContext, PassOption, register, registry

for _mod in pkgutil.iter_modules(__path__):
    if not _mod.name.startswith("_") and _mod.name != "base":
        importlib.import_module(f"{__name__}.{_mod.name}")


def available() -> list[str]:
    """Names of all registered passes, sorted."""
    return list(registry())


def get(name: str) -> Pass:
    """A fresh instance of the pass called ``name``."""
    from ..errors import InputError

    reg = registry()
    if name not in reg:
        raise InputError(f"unknown method {name!r}; choose from: {', '.join(reg)}")
    return reg[name]()


__all__ = ["Budget", "Candidate", "ConvSite", "Decline", "FCSite", "Pass", "PassContext", "PassOption", "available", "get", "register", "registry"]
