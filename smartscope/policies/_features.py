"""Object features that policies test: bounds, per-object features, sharpness."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from smartscope.detections import Detections

__all__ = [
    "Bounds",
    "Criterion",
    "Feature",
    "field_medians",
    "matches",
    "nearest",
    "nearest_neighbour_order",
    "object_features",
    "object_sharpness",
]

#: Per-object features a criterion can test (see `object_features`).
Feature = Literal[
    "area_px",
    "mean_intensity",
    "peak_intensity",
    "aspect",
    "score",
    "relative_intensity",
    "relative_peak",
    "relative_area",
    "intensity_change",
    "area_change",
]


class Bounds(BaseModel):
    """An inclusive range ``[min, max]``; a missing end is open."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    min: float | None = None
    max: float | None = None

    def test(self, values: np.ndarray) -> np.ndarray:
        ok = np.ones(values.shape, bool)
        if self.min is not None:
            ok &= values >= self.min
        if self.max is not None:
            ok &= values <= self.max
        return ok


Criterion = dict[Feature, Bounds]


def object_features(
    detections: Detections,
    previous: Detections | None = None,
    *,
    match_um: float = 10,
    reference: dict[str, float] | None = None,
) -> dict[str, np.ndarray]:
    """The features a criterion can test, one value per object.

    Besides the detection columns (``area_px``, ``mean_intensity``,
    ``peak_intensity``, ``aspect``, ``score``): ``relative_intensity``,
    ``relative_peak`` and ``relative_area`` (to the median of the frame's
    objects, so bleaching and drift cancel — or to the medians in
    `reference`, e.g. those of a whole field when the frame is a small ROI),
    and ``intensity_change`` and ``area_change``: the object's relative
    intensity (area) over that of the nearest object of `previous` (an earlier
    frame of the same field) within `match_um` stage µm, each relative to its
    own frame's medians, so bleaching and drift between the frames cancel; NaN
    without such an object.
    """
    o = detections.objects
    n = len(detections)
    feats = {k: np.asarray(o[k], float) for k in ("area_px", "mean_intensity", "score")}
    feats["aspect"] = np.asarray(o.get("aspect", np.ones(n)), float)
    feats["peak_intensity"] = np.asarray(
        o.get("peak_intensity", np.full(n, np.nan)), float
    )
    own = field_medians(detections)
    for name, col in (
        ("relative_intensity", "mean_intensity"),
        ("relative_peak", "peak_intensity"),
        ("relative_area", "area_px"),
    ):
        med = (reference or own).get(col, own[col])
        feats[name] = feats[col] / (med if med > 0 else 1.0)
    feats["intensity_change"] = np.full(n, np.nan)
    feats["area_change"] = np.full(n, np.nan)
    if previous is not None and n and len(previous):
        j, d = nearest(detections.centroids_um, previous.centroids_um)
        ok = d <= match_um
        po, pmed = previous.objects, field_medians(previous)
        for change, now, col in (
            ("intensity_change", "relative_intensity", "mean_intensity"),
            ("area_change", "relative_area", "area_px"),
        ):
            med = pmed[col] if pmed[col] > 0 else 1.0
            before = np.asarray(po[col], float)[j[ok]] / med
            feats[change][ok] = feats[now][ok] / np.maximum(before, 1e-9)
    return feats


def field_medians(detections: Detections) -> dict[str, float]:
    """Median object intensity, peak and area of a frame (1.0 without objects).

    NaN for a column the detections lack (``peak_intensity`` of a run logged
    before it existed), so criteria on it never pass.
    """
    o = detections.objects
    cols = ("mean_intensity", "peak_intensity", "area_px")
    if not len(detections):
        return dict.fromkeys(cols, 1.0)
    return {k: float(np.median(o[k])) if k in o else math.nan for k in cols}


def matches(
    criterion: Criterion | list[Criterion], feats: dict[str, np.ndarray], n: int
) -> np.ndarray:
    """Objects inside every bounds of the criterion (of any, for a list)."""
    if isinstance(criterion, list):
        ok = np.zeros(n, bool)
        for one in criterion:
            ok |= matches(one, feats, n)
        return ok
    ok = np.ones(n, bool)
    for name, bounds in criterion.items():
        ok &= bounds.test(feats[name])
    return ok


def nearest(points: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index in `ref` of the nearest point to each of `points`, and its distance."""
    d = np.hypot(*(points[:, None, :] - ref[None, :, :]).transpose(2, 0, 1))
    j = np.argmin(d, axis=1)
    return j, d[np.arange(len(points)), j]


def object_sharpness(
    image: np.ndarray, labels: np.ndarray, keep_labels: np.ndarray | None = None
) -> tuple[float, int]:
    """Gradient energy inside the object masks, normalised by their brightness.

    ``mean(|∇I|²) / mean(I)²`` over the pixels of the labelled objects (those in
    `keep_labels`, or all), with the image minimum as its background: scale-free,
    so planes of different brightness compare; blur lowers it.

    Returns
    -------
    (float, int)
        The sharpness (NaN without objects) and the number of objects.
    """
    lab = np.asarray(labels)
    mask = lab > 0 if keep_labels is None else np.isin(lab, keep_labels)
    n = int(np.unique(lab[mask]).size) if mask.any() else 0
    if not n:
        return math.nan, 0
    img = np.asarray(image, np.float32)
    img = img - float(img.min())
    gy, gx = (np.asarray(g) for g in np.gradient(img))
    energy = float(np.mean((gx * gx + gy * gy)[mask]))
    level = float(np.mean(img[mask]))
    return (energy / (level * level) if level > 0 else math.nan), n


def nearest_neighbour_order(points: np.ndarray, start: Sequence[float]) -> list[int]:
    """Greedy nearest-neighbour tour over `points` from `start`."""
    remaining = list(range(len(points)))
    here = np.asarray(start, dtype=float)
    order: list[int] = []
    while remaining:
        d = np.hypot(*(points[remaining] - here).T)
        k = remaining.pop(int(np.argmin(d)))
        order.append(k)
        here = points[k]
    return order
