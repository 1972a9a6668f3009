"""Registries of plug-ins: algorithms, aggregation rules, datasets, client samplers.

A registry finds its plug-ins in two places, so that adding one is one file:

- the modules of its own package (built-ins): every class defined in a module of that package which
  subclasses the registry's base and sets a ``name``;
- the entry-point group of its kind (any installed package)::

      [project.entry-points."fedcmi.rules"]
      geomed = "my_package.geomed:GeometricMedian"

Plug-ins are loaded by name through :mod:`importlib` the first time a registry is read, so the settings
model can validate a plug-in's section without importing the plug-in packages itself. A plug-in from
another package may not take a name a built-in has; two with one name are an error naming both.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Iterator
from importlib.metadata import entry_points
from typing import Any

from fedcmi.errors import FedcmiError


class PluginError(FedcmiError, TypeError):
    """A plug-in that cannot be registered: not of its kind, or a name taken twice."""


class UnknownPlugin(FedcmiError, ValueError):
    """A name no registered plug-in has."""


class Registry:
    """The plug-ins of one kind, by name: built-ins from ``package``'s modules, others from ``group``."""

    def __init__(self, kind: str, group: str, base: str, package: str) -> None:
        self.kind = kind  # "algorithm", "aggregation rule", "dataset": how messages name it
        self.group = group
        self._base_path = base  # "module:Class"
        self.package = package
        self._found: dict[str, type] | None = None

    @property
    def base(self) -> type:
        module, _, name = self._base_path.partition(":")
        cls = getattr(importlib.import_module(module), name)
        assert isinstance(cls, type)
        return cls

    def _built_in(self, base: type) -> Iterator[type]:
        pkg = importlib.import_module(self.package)
        for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
            if info.name.startswith("_"):
                continue
            module = importlib.import_module(f"{self.package}.{info.name}")
            for _, cls in sorted(inspect.getmembers(module, inspect.isclass), key=lambda t: t[0]):
                if cls.__module__ == module.__name__ and issubclass(cls, base) and bool(getattr(cls, "name", None)):
                    yield cls

    def _load(self) -> dict[str, type]:
        base = self.base
        found: dict[str, type] = {}
        for cls in self._built_in(base):
            name = cls.name  # type: ignore[attr-defined]
            if name in found:
                raise PluginError(f"{self.kind} {name!r} is defined twice: {found[name].__module__} and "
                                  f"{cls.__module__}")
            found[name] = cls
        for ep in sorted(entry_points(group=self.group), key=lambda e: e.name):
            cls = ep.load()
            if not (isinstance(cls, type) and issubclass(cls, base)) or getattr(cls, "name", None) != ep.name:
                raise PluginError(f"entry point {ep.name} = {ep.value} (group {self.group}) is not a "
                                  f"{base.__name__} named {ep.name!r}")
            if ep.name in found and found[ep.name] is not cls:
                raise PluginError(f"entry point {ep.value} registers {self.kind} {ep.name!r}, which "
                                  f"{found[ep.name].__module__} has")
            found[ep.name] = cls
        return found

    def all(self) -> dict[str, type]:
        """Every registered plug-in, by name (built-ins first, in module order, then entry points)."""
        if self._found is None:
            self._found = self._load()
        return self._found

    def names(self) -> list[str]:
        return list(self.all())

    def get(self, name: str) -> Any:
        """The plug-in called ``name``; :class:`UnknownPlugin` naming the known ones if there is none."""
        found = self.all()
        if name not in found:
            raise UnknownPlugin(f"unknown {self.kind} {name!r}; known: {', '.join(found)}")
        return found[name]

    def __contains__(self, name: object) -> bool:
        return name in self.all()


ALGORITHMS = Registry("algorithm", "fedcmi.algorithms", "fedcmi.algorithms.base:Strategy", "fedcmi.algorithms")
RULES = Registry("aggregation rule", "fedcmi.rules", "fedcmi.rules.base:Rule", "fedcmi.rules")
DATASETS = Registry("dataset", "fedcmi.datasets", "fedcmi.datasets.base:Dataset", "fedcmi.datasets")
SAMPLERS = Registry("client sampler", "fedcmi.samplers", "fedcmi.samplers.base:Sampler", "fedcmi.samplers")
