"""`Detections`: what the segmenter found in one frame, in pixels and stage µm."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["OBJECT_COLUMNS", "Detections"]

#: Columns of `Detections.objects`, one value per detected object.
OBJECT_COLUMNS = (
    "label",
    "x_px",
    "y_px",
    "stage_x_um",
    "stage_y_um",
    "area_px",
    "mean_intensity",
    "peak_intensity",
    "bbox_y0",
    "bbox_x0",
    "bbox_y1",
    "bbox_x1",
    "touches_border",
    "score",
    "aspect",
)


@dataclass(frozen=True)
class Detections:
    """Per-frame segmentation result.

    Attributes
    ----------
    labels : np.ndarray
        ``(Y, X)`` instance labels (0 = background), uint16 or wider.
    objects : dict[str, np.ndarray]
        One array per name in `OBJECT_COLUMNS`, one entry per object, in label
        order. Centroids are intensity-weighted, in pixels ``(x_px, y_px)`` and in
        stage µm; bbox is ``[y0, x0, y1, x1)``; ``aspect`` is the minor/major axis
        ratio of the object's shape (1 = round); ``peak_intensity`` is its
        second-brightest pixel (one hot pixel does not make a peak; a bright
        nucleus the segmenter joined to a dim neighbour keeps its peak, not
        its mean).
    frame_index : int
        Index of the frame in the run (see the ``frames.jsonl`` index).
    model_id : str
        Identity of the segmenter that produced the labels.
    """

    labels: np.ndarray
    objects: dict[str, np.ndarray]
    frame_index: int = -1
    model_id: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.objects["label"])

    @property
    def centroids_px(self) -> np.ndarray:
        """``(N, 2)`` centroids as pixel ``(x, y)``."""
        return np.column_stack([self.objects["x_px"], self.objects["y_px"]])

    @property
    def centroids_um(self) -> np.ndarray:
        """``(N, 2)`` centroids as stage ``(x, y)`` µm."""
        return np.column_stack([self.objects["stage_x_um"], self.objects["stage_y_um"]])

    def table_only(self) -> Detections:
        """The same objects without the label image and extras.

        What a policy keeps of an earlier frame (`intensity_change` against a
        position's last survey): a few kB per position instead of the frame's
        labels and image, however many positions a run has.
        """
        return Detections(
            np.zeros((0, 0), self.labels.dtype),
            self.objects,
            self.frame_index,
            self.model_id,
        )

    def select(self, mask: np.ndarray) -> dict[str, np.ndarray]:
        """The object table restricted to the rows where `mask` is true."""
        return {k: v[mask] for k, v in self.objects.items()}

    def summary(self) -> dict[str, Any]:
        """JSON-ready per-object table (for the detections log)."""
        return {k: v.tolist() for k, v in self.objects.items()}

    @classmethod
    def from_labels(
        cls,
        labels: np.ndarray,
        image: np.ndarray,
        *,
        to_stage: Callable[[np.ndarray], np.ndarray] | None = None,
        scores: np.ndarray | None = None,
        frame_index: int = -1,
        model_id: str = "",
    ) -> Detections:
        """Measure every labelled object of `labels` on `image`.

        Vectorised over objects (bincount / find_objects): no Python loop per
        object or per pixel.

        Parameters
        ----------
        labels : np.ndarray
            ``(Y, X)`` instance labels; label values need not be consecutive.
        image : np.ndarray
            ``(Y, X)`` intensities the objects are measured on.
        to_stage : callable, optional
            Maps ``(N, 2)`` pixel ``(x, y)`` to ``(N, 2)`` stage µm; without it the
            stage columns are NaN.
        scores : np.ndarray, optional
            One confidence per label value present (in sorted label order); 1.0
            when the segmenter gives none.

        Raises
        ------
        ValueError
            If the shapes differ, or `scores` has not one value per object.
        """
        if labels.shape != image.shape or labels.ndim != 2:
            raise ValueError(
                f"labels {labels.shape} and image {image.shape} must be the same 2D "
                "shape"
            )
        lab = np.asarray(labels)
        height, width = lab.shape
        flat_lab = lab.ravel()
        fg = np.flatnonzero(flat_lab)  # work on foreground pixels only
        vals = flat_lab[fg].astype(np.int64)
        counts = np.bincount(vals) if vals.size else np.zeros(1, np.int64)
        ids = np.flatnonzero(counts[1:]) + 1
        n = len(ids)
        if n == 0:
            empty = {c: np.zeros(0) for c in OBJECT_COLUMNS}
            empty["label"] = np.zeros(0, dtype=np.int64)
            empty["touches_border"] = np.zeros(0, dtype=bool)
            return cls(lab, empty, frame_index, model_id)

        lut = np.zeros(len(counts), np.int64)
        lut[ids] = np.arange(n)
        obj = lut[vals]  # 0..n-1 per foreground pixel
        ys, xs = np.divmod(fg, width)
        values = np.asarray(image, dtype=np.float64).ravel()[fg]
        area = counts[ids].astype(np.float64)
        weights = values - min(float(values.min()), 0.0)
        wsum = np.bincount(obj, weights=weights, minlength=n)
        ok = wsum > 0
        safe = np.where(ok, wsum, 1.0)
        x_px = np.where(
            ok,
            np.bincount(obj, weights=xs * weights, minlength=n) / safe,
            np.bincount(obj, weights=xs, minlength=n) / area,
        )
        y_px = np.where(
            ok,
            np.bincount(obj, weights=ys * weights, minlength=n) / safe,
            np.bincount(obj, weights=ys, minlength=n) / area,
        )
        mean_intensity = np.bincount(obj, weights=values, minlength=n) / area
        aspect = _aspect(obj, xs, ys, area, n)

        order = np.argsort(obj, kind="stable")
        starts = np.searchsorted(obj[order], np.arange(n))
        ys_o, xs_o = ys[order], xs[order]
        peak_intensity = _second_brightest(values[order], obj[order], starts)
        bbox = np.column_stack(
            [
                np.minimum.reduceat(ys_o, starts),
                np.minimum.reduceat(xs_o, starts),
                np.maximum.reduceat(ys_o, starts) + 1,
                np.maximum.reduceat(xs_o, starts) + 1,
            ]
        ).astype(np.int64)
        touches = (
            (bbox[:, 0] == 0)
            | (bbox[:, 1] == 0)
            | (bbox[:, 2] == height)
            | (bbox[:, 3] == width)
        )
        centroids = np.column_stack([x_px, y_px])
        if to_stage is not None:
            stage = np.asarray(to_stage(centroids), dtype=float).reshape(n, 2)
        else:
            stage = np.full((n, 2), np.nan)
        score = (
            np.ones(n) if scores is None else np.asarray(scores, dtype=float).ravel()
        )
        if len(score) != n:  # the segmenter's fault, not the policies' later
            raise ValueError(
                f"segmenter gave {len(score)} scores for {n} labelled objects (one "
                "per label present, in label order)"
            )
        objects = {
            "label": ids.astype(np.int64),
            "x_px": x_px,
            "y_px": y_px,
            "stage_x_um": stage[:, 0],
            "stage_y_um": stage[:, 1],
            "area_px": area,
            "mean_intensity": mean_intensity,
            "peak_intensity": peak_intensity,
            "bbox_y0": bbox[:, 0],
            "bbox_x0": bbox[:, 1],
            "bbox_y1": bbox[:, 2],
            "bbox_x1": bbox[:, 3],
            "touches_border": touches,
            "score": score,
            "aspect": aspect,
        }
        return cls(lab, objects, frame_index, model_id)


def _second_brightest(
    values: np.ndarray, obj: np.ndarray, starts: np.ndarray
) -> np.ndarray:
    """Each object's second-highest value (its only one for one-pixel objects).

    `values` and `obj` are sorted by object; `starts` is where each begins.
    """
    first = np.maximum.reduceat(values, starts)
    at_max = np.flatnonzero(values == first[obj])
    _, one = np.unique(obj[at_max], return_index=True)  # one maximum per object
    rest = values.copy()
    rest[at_max[one]] = -np.inf
    second = np.maximum.reduceat(rest, starts)
    return np.where(np.isfinite(second), second, first)


def _aspect(
    obj: np.ndarray, xs: np.ndarray, ys: np.ndarray, area: np.ndarray, n: int
) -> np.ndarray:
    """Minor/major axis ratio of each object's pixel set (1 = round)."""
    mx = np.bincount(obj, weights=xs, minlength=n) / area
    my = np.bincount(obj, weights=ys, minlength=n) / area
    dx, dy = xs - mx[obj], ys - my[obj]
    # + 1/12: the second moment of a unit pixel, so one-pixel objects are round
    cxx = np.bincount(obj, weights=dx * dx, minlength=n) / area + 1 / 12
    cyy = np.bincount(obj, weights=dy * dy, minlength=n) / area + 1 / 12
    cxy = np.bincount(obj, weights=dx * dy, minlength=n) / area
    half_trace = (cxx + cyy) / 2
    root = np.sqrt(((cxx - cyy) / 2) ** 2 + cxy**2)
    return np.sqrt(np.maximum(half_trace - root, 0) / (half_trace + root))
