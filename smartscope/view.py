"""``smartscope view RUN_DIR``: a run in napari, placed in stage coordinates.

`run_layers` reads a run's ``run.ome.zarr`` (or a run in the layout before it)
into napari layer data: one image layer per position and channel, scaled
(µm per pixel of its objective, the Z step, the time interval) and translated
to its stage position, its labels overlaid (every labels image: the live
``segmentation`` and those ``reanalyze`` added), and the decision log's
targets as points where the policies sent the stage. `view_run` opens them in
a napari window. Arrays are read lazily (zarr + dask), so a whole plate opens
at once.

The hierarchy itself opens in napari with the napari-ome-zarr plugin
(``napari RUN_DIR/run.ome.zarr``) and in Fiji, but napari-ome-zarr 0.10 places
every image at the origin (it reads the scale of OME-Zarr 0.5 metadata, not its
translation); `view_run` places them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from smartscope._errors import SmartscopeError
from smartscope.rundir import (
    array_names,
    load_run,
    position_attrs,
    position_path,
)

__all__ = ["ViewError", "run_layers", "view_run"]

LayerData = tuple[Any, dict[str, Any], str]


class ViewError(SmartscopeError):
    """A run (or position) that cannot be shown."""


def _transforms(ome: dict[str, Any], ndim: int) -> tuple[list[float], list[float]]:
    scale, translate = [1.0] * ndim, [0.0] * ndim
    for ms in ome.get("multiscales") or []:
        for t in (ms.get("datasets") or [{}])[0].get("coordinateTransformations", []):
            if t.get("type") == "scale":
                scale = [float(v) for v in t["scale"]]
            elif t.get("type") == "translation":
                translate = [float(v) for v in t["translation"]]
    return scale, translate


def _axis_names(ome: dict[str, Any]) -> list[str]:
    for ms in ome.get("multiscales") or []:
        return [str(a["name"]) for a in ms.get("axes") or []]
    return ["t", "c", "z", "y", "x"]


def _channels(ome: dict[str, Any], n: int) -> list[tuple[str, str, Any]]:
    """Name, colour and display window (or None) of each channel."""
    chans = (ome.get("omero") or {}).get("channels") or []
    out = []
    for k in range(n):
        ch = chans[k] if k < len(chans) else {}
        label = str(ch.get("label", f"channel {k}"))
        window = ch.get("window") or {}
        limits = (
            [float(window["start"]), float(window["end"])]
            if "start" in window and "end" in window
            else None
        )
        out.append((label, str(ch.get("color", "FFFFFF")), limits))
    return out


def _colormap(color: str) -> Any:
    from napari.utils.colormaps import Colormap

    rgb = [int(color[i : i + 2], 16) / 255 for i in (0, 2, 4)]
    return Colormap([[0, 0, 0, 1], [*rgb, 1]], name=f"#{color}")


def run_layers(run_dir: str | Path, position: str | None = None) -> list[LayerData]:
    """Napari layer data of a run: images, labels and targets, in stage µm.

    Layers are ``(data, kwargs, "image" | "labels" | "points")`` with axes
    ``(t, z, y, x)``; every position's layers share that world, so tiles,
    targets and hits lie where they were imaged.

    Raises
    ------
    ViewError
        If the directory holds no run, no images, or not `position`.
    """
    import dask.array as da
    import zarr

    directory = Path(run_dir)
    try:
        run = load_run(directory)
    except SmartscopeError as e:
        raise ViewError(str(e)) from None
    keys = sorted(array_names(directory))
    keys = [k for k in keys if (position_path(directory, k) / "0").exists()]
    if position is not None:
        if position not in keys:
            have = ", ".join(keys[:8]) + (" ..." if len(keys) > 8 else "")
            raise ViewError(
                f"{directory} has no position {position!r} (positions: {have})"
            )
        keys = [position]
    if not keys:
        raise ViewError(f"{directory} holds no images")
    layers: list[LayerData] = []
    for key in keys:
        image_dir = position_path(directory, key)
        ome = position_attrs(directory, key)
        names = _axis_names(ome)
        data = da.from_zarr(zarr.open_array(str(image_dir / "0"), mode="r"))
        scale, translate = _transforms(ome, data.ndim)
        c_axis = names.index("c") if "c" in names else None
        keep = [i for i in range(data.ndim) if i != c_axis]
        world = {
            "scale": [scale[i] for i in keep],
            "translate": [translate[i] for i in keep],
        }
        nc = data.shape[c_axis] if c_axis is not None else 1
        for k, (label, color, limits) in enumerate(_channels(ome, nc)):
            plane = data if c_axis is None else da.take(data, k, axis=c_axis)
            kwargs = {
                "name": f"{key}: {label}",
                "colormap": _colormap(color),
                "blending": "additive",
                "metadata": {"position": key, "channel": label},
                **world,
            }
            if limits is not None and limits[1] > limits[0]:
                kwargs["contrast_limits"] = limits
            layers.append((plane, kwargs, "image"))
        labels_dir = image_dir / "labels"
        label_dirs = {
            str(name): labels_dir / name
            for name in (_read_attrs(labels_dir).get("ome") or {}).get("labels") or []
        }
        old_layout = position_path(directory, key, labels=True)
        if not label_dirs and (old_layout / "0").exists():  # before the hierarchy
            label_dirs["segmentation"] = old_layout
        for name, folder in label_dirs.items():
            arr = da.from_zarr(zarr.open_array(str(folder / "0"), mode="r"))
            if c_axis is not None:  # the frames of any channel that was analysed
                arr = arr.max(axis=c_axis)
            layers.append(
                (
                    arr,
                    {
                        "name": f"{key}: {name}",
                        "metadata": {"position": key, "labels": name},
                        "opacity": 0.5,
                        **world,
                    },
                    "labels",
                )
            )
    targets = _targets(run.decisions, position)
    if targets:
        layers.append(
            (
                [[y, x] for x, y, _ in targets],  # (y, x): shown at every t, z
                {
                    "name": "targets (decision log)",
                    "size": 14,
                    "face_color": "transparent",
                    "border_color": "yellow",
                    "border_width": 0.15,
                    "symbol": "ring",
                    "ndim": 2,
                },
                "points",
            )
        )
    return layers


def _read_attrs(path: Path) -> dict[str, Any]:
    from smartscope.rundir._layout import read_attrs

    return read_attrs(path)


def _targets(
    decisions: list[dict[str, Any]], position: str | None
) -> list[tuple[float, float, float]]:
    """Stage ``(x, y, z)`` µm of the events the policies added (one per place)."""
    seen: dict[str, tuple[float, float, float]] = {}
    for d in decisions:
        for action in d.get("actions") or []:
            if action.get("status") != "applied":
                continue
            for e in action.get("events") or []:
                key = str(e.get("position"))
                if position is not None and key != position:
                    continue
                if e.get("x_um") is None or e.get("y_um") is None or key in seen:
                    continue
                z = e.get("z_um")
                seen[key] = (float(e["x_um"]), float(e["y_um"]), float(z or 0.0))
    return list(seen.values())


def view_run(
    run_dir: str | Path,
    position: str | None = None,
    *,
    screenshot: str | Path | None = None,
) -> Path | None:
    """Open a run in a napari window (and optionally save a screenshot and close).

    Returns the screenshot's path when `screenshot` is given, else None once
    the window is closed.
    """
    import napari

    layers = run_layers(run_dir, position)
    viewer = napari.Viewer(title=f"smartscope: {Path(run_dir).name}", show=True)
    try:
        for data, kwargs, kind in layers:
            getattr(viewer, f"add_{kind}")(data, **kwargs)
        viewer.dims.axis_labels = ("t", "z", "y", "x")
        viewer.reset_view()
        if screenshot is not None:
            out = Path(screenshot)
            viewer.screenshot(str(out), canvas_only=False)
            return out
        napari.run()
        return None
    finally:
        if screenshot is not None:
            viewer.close()
