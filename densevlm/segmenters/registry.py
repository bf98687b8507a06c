"""The segmenter registry: a recipe's ``segmenter`` name -> the :class:`Segmenter` class that builds it.

Each segmenter registers itself with :func:`register_segmenter` and builds from a config with
``from_config(cfg, text_vocabulary, **arguments)``; the arguments are plain objects (models, weights, specs) that
the caller prepared, never recipe files, so a segmenter reads no run directory.
"""

from __future__ import annotations

from typing import Callable, TypeVar

from densevlm.config.core import ConfigError

T = TypeVar("T", bound=type)

#: name (the ``segmenter`` key of a :class:`~densevlm.config.semseg.SemSegEvalConfig`) -> Segmenter class.
SEGMENTERS: dict[str, type] = {}


def register_segmenter(name: str) -> Callable[[T], T]:
    """Class decorator: register a segmenter under ``name`` (a second class under the same name is an error)."""

    def decorate(cls: T) -> T:
        if name in SEGMENTERS and SEGMENTERS[name] is not cls:
            raise ValueError(f"segmenter {name!r} is already registered as {SEGMENTERS[name].__name__}")
        SEGMENTERS[name] = cls
        cls.registered_name = name  # type: ignore[attr-defined]
        return cls

    return decorate


def get_segmenter(name: str) -> type:
    """The segmenter class registered as ``name``; a :class:`ConfigError` naming the known ones otherwise."""
    try:
        return SEGMENTERS[name]
    except KeyError:
        raise ConfigError(f"segmenter: unknown segmenter {name!r}; known: {sorted(SEGMENTERS)}") from None
