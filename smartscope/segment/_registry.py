"""Segmenters by name: the built-ins and those plugins register."""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import entry_points
from typing import Any

from smartscope._errors import RegistryError
from smartscope.segment._protocol import PSegmenter

ENTRY_POINT_GROUP = "smartscope.segmenters"


def _builtins() -> dict[str, Any]:
    from smartscope.segment._threshold import ThresholdSegmenter

    def unet(**params: Any) -> PSegmenter:
        from smartscope.segment._dl import UNetSegmenter  # imports torch

        return UNetSegmenter(**params)

    return {"threshold": ThresholdSegmenter, "unet": unet}


def available_segmenters() -> list[str]:
    """Names accepted by `create_segmenter`."""
    names = set(_builtins())
    names.update(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))
    return sorted(names)


def _import_path(path: str) -> Any:
    module, _, attr = path.partition(":")
    try:
        obj: Any = import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise RegistryError(f"segmenter {path!r}: cannot import it ({e})") from e
    return obj


def segmenter_factory(name: str) -> Any:
    """What `create_segmenter` calls for `name` (a class or a function).

    Raises
    ------
    RegistryError
        If no segmenter of that name is registered.
    """
    factories = _builtins()
    if name in factories:
        return factories[name]
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            return ep.load()
    if ":" in name:
        return _import_path(name)
    raise RegistryError(
        f"unknown segmenter {name!r} (available: "
        f"{', '.join(available_segmenters())}; or an import path "
        "'package.module:ClassName')"
    )


def create_segmenter(name: str, params: dict[str, Any] | None = None) -> PSegmenter:
    """Build the segmenter registered as `name` with keyword `params`.

    `name` is a built-in (``threshold``, ``unet``), a ``smartscope.segmenters``
    entry point, or an import path ``package.module:ClassName``.

    Raises
    ------
    RegistryError
        If no segmenter of that name is registered.
    ValueError
        If the parameters are invalid for it (pydantic validation errors).
    """
    segmenter = segmenter_factory(name)(**(params or {}))
    if not isinstance(segmenter, PSegmenter):
        raise RegistryError(f"segmenter {name!r} does not implement PSegmenter")
    return segmenter
