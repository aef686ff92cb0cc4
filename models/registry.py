"""Finding families and making them: the one construction path of every family.

A family is found in one of three ways, so that adding a system touches no list anywhere:
- a module in `models/families/` (each `Family` subclass defined there with a `name`);
- the `orbitgen.families` entry-point group of an installed package (`name = "pkg.mod:Class"`),
  which is how a lab ships its own family without forking orbitgen;
- a reference `pkg.mod:Class` written as the spec's `family:` (the module must be importable
  on every worker, e.g. on PYTHONPATH or in the job's working dir).

A file never chooses what is imported: `loadable_family_cls` (what a snapshot may name) knows only
discovered families and classes of modules this process imported already, and imports nothing.

`make_family` validates the `model:` section against the family's config and `augment.ada`
against what the family declares (`Family.ada_config`), so no caller has to remember either.
"""
from __future__ import annotations

import functools
import importlib
import pkgutil
import sys
from importlib import metadata
from typing import Any, Iterable, Mapping

from pydantic import BaseModel

from models.family import Family, FamilyConfig

ENTRY_POINT_GROUP = "orbitgen.families"


def _families_in(module: Any) -> list[type[Family]]:
    """The concrete families a module defines (not those it imports from elsewhere)."""
    return [obj for obj in vars(module).values()
            if isinstance(obj, type) and issubclass(obj, Family) and obj.__module__ == module.__name__
            and "name" in vars(obj)]


@functools.lru_cache(maxsize=1)
def _discovered() -> dict[str, type[Family]]:
    import models.families as package

    found: dict[str, type[Family]] = {}

    def add(cls: type[Family], origin: str) -> None:
        if cls.name in found and found[cls.name] is not cls:
            raise RuntimeError(f"two families are called {cls.name!r}: {found[cls.name].__module__} and {origin}")
        found[cls.name] = cls

    for info in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
        module = importlib.import_module(info.name)
        for cls in _families_in(module):
            add(cls, module.__name__)
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        add(_load_reference(ep.value), f"entry point {ep.name} = {ep.value}")
    return found


def _load_reference(ref: str) -> type[Family]:
    module_name, _, attr = ref.partition(":")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise KeyError(f"family {ref!r}: cannot import it ({e})") from None
    if not (isinstance(obj, type) and issubclass(obj, Family)):
        raise KeyError(f"family {ref!r} is not a subclass of models.family.Family")
    return obj


def _complete(cls: type[Family], ref: str) -> type[Family]:
    """`cls`, when it defines every abstract method of the contract; else a KeyError naming them."""
    missing = sorted(getattr(cls, "__abstractmethods__", ()))
    if missing:
        raise KeyError(f"family {ref!r} ({cls.__module__}.{cls.__qualname__}) does not define "
                       f"{', '.join(missing)}: every family must (the contract is models/family.py)")
    return cls


def available_families() -> list[str]:
    """Names of the families found in models/families/ and in installed entry points."""
    return sorted(_discovered())


def get_family_cls(name: str) -> type[Family]:
    """The family called `name`, or named by a `pkg.module:Class` reference."""
    if ":" in name:
        return _complete(_load_reference(name), name)
    found = _discovered()
    if name not in found:
        raise KeyError(f"unknown family {name!r}; available: {', '.join(sorted(found))} "
                       "(or a reference pkg.module:Class)")
    return _complete(found[name], name)


def loadable_family_cls(ref: str, trusted_packages: Iterable[str] = ()) -> type[Family] | None:
    """The family that a file (a snapshot) naming `ref` may load, without importing anything: a
    discovered family, by name or as `module:Class`, or a `module:Class` family whose module this
    process has imported already (a spec's `family: pkg.mod:Class` loaded it), or one whose top-level
    package is in `trusted_packages` (code the caller ships with the file: a registered model's
    code paths), imported and checked to be a Family. None otherwise: a file that names
    `os:system` or any other installed module must not get it imported."""
    found = _discovered()
    if ":" not in ref:
        return found.get(ref)
    for cls in found.values():
        if f"{cls.__module__}:{cls.__qualname__}" == ref:
            return cls
    module_name, _, attr = ref.partition(":")
    module = sys.modules.get(module_name)
    if module is None and module_name.split(".", 1)[0] in set(trusted_packages):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            return None
    obj = getattr(module, attr, None) if module is not None and attr.isidentifier() else None
    if isinstance(obj, type) and issubclass(obj, Family) and obj is not Family:
        return obj
    return None


def family_ref(cls: type[Family]) -> str:
    """What finds `cls` again: its name when discovery knows it, else `module:Class`."""
    if _discovered().get(getattr(cls, "name", None)) is cls:
        return cls.name
    return f"{cls.__module__}:{cls.__qualname__}"


def make_family(name: str, model: Mapping[str, Any] | FamilyConfig | None = None, *, resolution: int, channels: int,
                lr: float, ada: Mapping[str, Any] | BaseModel | None = None) -> Family:
    """The family `name` built from its `model:` section and `augment.ada` (pydantic errors
    name the field inside the section; ValueError for ADA on a family without it)."""
    cls = get_family_cls(name)
    config = model if isinstance(model, cls.config_cls) else cls.config_cls.model_validate(dict(model or {}))
    extra: dict[str, Any] = {}
    if cls.ada_config is not None:
        extra["ada"] = (None if ada is None else
                        ada if isinstance(ada, cls.ada_config) else cls.ada_config.model_validate(dict(ada)))
    elif ada is not None:
        raise ValueError(f"augment.ada: the {cls.name} family has no adaptive discriminator augmentation; "
                         "remove augment.ada")
    return cls(config, resolution=resolution, channels=channels, lr=lr, **extra)
