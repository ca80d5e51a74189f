"""Lazy re-exports for package ``__init__`` files (PEP 562), so importing a package costs nothing.

``gradflow.tracing`` re-exports ``trace``, ``Tracer`` and the rest, but the model zoo imports
``gradflow.tracing.parts`` (the unit protocol) while ``import gradflow`` runs: an eager
``tracing/__init__`` would load pandas then. :func:`lazy_exports` gives a package's
``__getattr__`` and ``__dir__`` from a table of ``name -> submodule``.
"""
from __future__ import annotations

import importlib
from typing import Callable, Mapping


def lazy_exports(package: str, table: Mapping[str, str], namespace: dict) -> tuple[Callable, Callable]:
    """``(__getattr__, __dir__)`` for ``package`` that import ``table[name]`` on first access.

    Args:
        package: the package's ``__name__``.
        table: exported name -> the submodule (relative to ``package``) that defines it.
        namespace: the package's ``globals()``; a resolved name is cached there.
    Returns:
        The two functions, to be bound as the package's ``__getattr__`` and ``__dir__``.
    """
    def __getattr__(name: str):
        if name not in table:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{table[name]}"), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(table))

    return __getattr__, __dir__
