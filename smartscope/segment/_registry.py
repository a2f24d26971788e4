"""Segmenters by name: the built-ins and those plugins register."""

from __future__ import annotations

from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from smartscope._errors import RegistryError
from smartscope._imports import build_component, import_path, load_entry_point
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
            return load_entry_point(ep, f"segmenter {name!r}")
    if ":" in name:
        return import_path(name, f"segmenter {name!r}")
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
        If no segmenter of that name is registered, or a plugin's own code
        fails to import or to start (its error in one line).
    ValueError
        If the parameters are invalid for it (pydantic validation errors).
    """
    segmenter = build_component(segmenter_factory(name), params, f"segmenter {name!r}")
    if not isinstance(segmenter, PSegmenter):
        raise RegistryError(f"segmenter {name!r} does not implement PSegmenter")
    return segmenter


def segmenter_for_model(
    model: str | Path,
    *,
    device: str = "auto",
    threads: int | None = None,
    scale: float = 1.0,
    reread_ratio: float | None = None,
    views: int = 1,
) -> PSegmenter:
    """The segmenter that runs a model file, chosen from what the file is.

    See `model_spec`.

    Raises
    ------
    RegistryError
        If the file does not exist, or its plugin is not installed.
    """
    spec = model_spec(
        model,
        device=device,
        threads=threads,
        scale=scale,
        reread_ratio=reread_ratio,
        views=views,
    )
    return create_segmenter(spec.pop("name"), spec)


def model_spec(
    model: str | Path,
    *,
    device: str = "auto",
    threads: int | None = None,
    scale: float = 1.0,
    reread_ratio: float | None = None,
    views: int = 1,
) -> dict[str, Any]:
    """The segmenter spec (``{"name": ..., <params>}``) that runs a model file.

    ``builtin`` or a ``.pt`` / ``.ts`` file from ``smartscope train``: the
    built-in U-Net; ``.onnx``: the ``onnx`` plugin; a bioimage.io package (a
    ``.zip``, its ``rdf.yaml`` / ``bioimageio.yaml``, or a folder holding one):
    the ``bioimageio`` plugin; any other file: the ``cellpose`` plugin.
    `device` and `threads` are passed on where the segmenter takes them;
    `reread_ratio` (the re-read of large objects in crops of their own) to
    the built-in U-Net, ``onnx`` and ``bioimageio``; `scale` and `views`
    (test-time augmentation) to the built-in U-Net only.

    Raises
    ------
    RegistryError
        If the file does not exist, or its plugin is not installed.
    """
    name = str(model)
    if name != "builtin" and not Path(name).exists():
        raise RegistryError(f"model file not found: {name}")
    path = Path(name)
    suffix = path.suffix.lower()
    if name == "builtin" or suffix in (".pt", ".ts"):
        params: dict[str, Any] = {"model": name, "device": device, "scale": scale}
        if threads:
            params["threads"] = threads
        if reread_ratio is not None:
            params["reread_ratio"] = reread_ratio
        if views != 1:
            params["views"] = views
        return {"name": "unet", **params}
    if scale != 1.0:
        raise RegistryError("--scale applies to the built-in model only")
    if views != 1:
        raise RegistryError("--views applies to the built-in model only")
    if suffix == ".onnx":
        plugin, params = "onnx", {"model": name, "device": device}
        if threads:
            params["threads"] = threads
    elif (
        suffix == ".zip"
        or path.name in ("rdf.yaml", "bioimageio.yaml")
        or (
            path.is_dir()
            and any((path / f).is_file() for f in ("rdf.yaml", "bioimageio.yaml"))
        )
    ):
        plugin, params = "bioimageio", {"model": name, "device": device}
    elif path.is_file():
        plugin, params = "cellpose", {"model": name, "device": device}
    elif path.is_dir():
        raise RegistryError(
            f"{name}: a folder without rdf.yaml or bioimageio.yaml, so not a "
            "bioimage.io package (the only model that is a folder)"
        )
    else:
        raise RegistryError(f"{name}: not a model file smartscope knows")
    if reread_ratio is not None:
        if plugin == "cellpose":
            raise RegistryError(
                "--reread applies to the built-in model, ONNX and bioimage.io "
                "models only"
            )
        params["reread_ratio"] = reread_ratio
    if plugin not in available_segmenters():
        raise RegistryError(
            f"{name} needs the {plugin} plugin: pip install smartscope-{plugin} "
            f"(in a checkout: pip install -e plugins/smartscope-{plugin})"
        )
    return {"name": plugin, **params}
