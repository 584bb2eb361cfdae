"""One error hierarchy: every public exception class of trainguard derives from
TrainguardError, is listed in trainguard.errors.__all__, and keeps the built-in base that
callers caught before."""

from __future__ import annotations

import importlib
import pkgutil

from trainguard import config, errors


def _our_modules() -> list[object]:
    names = ["trainguard"]
    for package in ("trainguard", "trainguard.layers", "trainguard.plugins"):
        path = importlib.import_module(package).__path__
        names += [
            f"{package}.{m.name}"
            for m in pkgutil.iter_modules(path)
            if not m.ispkg and m.name != "__main__"
        ]
    return [importlib.import_module(name) for name in names]


def test_every_public_exception_is_in_the_hierarchy() -> None:
    found = {
        value
        for module in _our_modules()
        for value in vars(module).values()
        if isinstance(value, type)
        and issubclass(value, BaseException)
        and value.__module__.startswith("trainguard")
        and not value.__name__.startswith("_")
    }
    assert len(found) >= 25
    outside = sorted(c.__qualname__ for c in found if not issubclass(c, errors.TrainguardError))
    assert outside == []
    assert sorted(c.__name__ for c in found) == sorted(errors.__all__)


def test_the_built_in_bases_callers_catch_are_kept() -> None:
    assert issubclass(errors.ConfigError, ValueError)
    assert issubclass(errors.MalformedWebhook, ValueError)
    assert issubclass(errors.NotFound, LookupError)
    assert issubclass(errors.StoreClosed, RuntimeError)
    assert issubclass(errors.LayerStartError, errors.StartError)
    assert config.ConfigError is errors.ConfigError  # imported where it is raised
