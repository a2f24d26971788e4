"""Instances from a foreground map: threshold, then a seeded watershed.

For models whose output is a foreground probability (or a foreground and a
distance map) rather than background/interior/boundary classes: the ONNX and
bioimage.io plugins use it.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

__all__ = ["foreground_to_labels"]


def foreground_to_labels(
    prob: np.ndarray,
    threshold: float = 0.5,
    min_area_px: int = 8,
    split_touching: bool = True,
    min_distance_px: int = 3,
    height: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Instance labels and per-object scores from a ``(Y, X)`` foreground map.

    Pixels of `prob` above `threshold` are foreground. With `split_touching`,
    touching objects are split by a watershed on `height` (default: the
    distance transform of the foreground; a model's distance output can be
    given instead), seeded at its maxima at least `min_distance_px` apart
    (neighbouring maxima pixels are one seed); otherwise each connected region
    is an object. Objects under `min_area_px` are dropped; labels are
    consecutive.

    Returns
    -------
    labels : (Y, X) uint16
    scores : (N,) float32, mean of `prob` over each object
    """
    prob = np.asarray(prob, np.float32)
    mask = prob > threshold
    regions, n = ndi.label(mask)
    if n == 0:
        return np.zeros(prob.shape, np.uint16), np.zeros(0, np.float32)
    labels = regions
    if split_touching:
        from skimage.segmentation import watershed

        if height is None:
            height = ndi.distance_transform_edt(mask)
        height = np.where(mask, np.asarray(height, np.float32), 0).astype(np.float32)
        size = 2 * min_distance_px + 1
        peaks = (height == ndi.maximum_filter(height, size=size)) & mask
        markers, n_markers = ndi.label(peaks)
        # a small region next to a bigger one can lose its maximum to the
        # neighbour's window: seed it at its own maximum
        seeded = np.zeros(n + 1, bool)
        seeded[regions[markers > 0]] = True
        unseeded = np.flatnonzero(~seeded[1:]) + 1
        if unseeded.size:
            where = ndi.maximum_position(height, regions, unseeded)
            ys, xs = np.asarray(where, dtype=np.intp).reshape(-1, 2).T
            markers[ys, xs] = n_markers + 1 + np.arange(unseeded.size)
        labels = watershed(-height, markers, mask=mask)
    flat = labels.ravel()
    n = int(flat.max())
    areas = np.bincount(flat, minlength=n + 1)
    sums = np.bincount(flat, weights=prob.ravel(), minlength=n + 1)
    keep = areas >= max(1, min_area_px)
    keep[0] = False
    new_id = np.zeros(n + 1, np.uint16)
    new_id[keep] = np.arange(1, int(keep.sum()) + 1)
    scores = (sums[keep] / areas[keep]).astype(np.float32)
    return new_id[labels], scores
