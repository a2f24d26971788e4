"""Evaluation sets with ground truth: synthetic validation and DemoCamera beads."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from smartscope.segment._metrics import scores
from smartscope.segment._protocol import PSegmenter
from smartscope.segment._synth import BEAD_LABEL_FRACTION


def bead_truth(clean: np.ndarray) -> np.ndarray:
    """Ground-truth labels of a noise-free in-focus DemoCamera bead frame.

    One object per local maximum; a bead's pixels are those of its watershed
    basin above `BEAD_LABEL_FRACTION` of its peak (the rule the synthetic
    beads are labelled with).
    """
    from skimage.segmentation import watershed

    img = clean.astype(np.float32)
    if img.max() <= 0:
        return np.zeros(img.shape, np.uint16)
    floor = 0.02 * float(img.max())
    peaks = (img == ndi.maximum_filter(img, size=5)) & (img > 4 * floor)
    markers, n = ndi.label(peaks)
    basins = watershed(-img, markers, mask=img > floor)
    peak = ndi.maximum(img, basins, index=np.arange(n + 1))
    peak = np.asarray(peak, np.float32)
    basins[img < BEAD_LABEL_FRACTION * peak[basins]] = 0
    return basins.astype(np.uint16)


def evaluate(
    segmenter: PSegmenter, images: list[np.ndarray], truths: list[np.ndarray]
) -> dict[str, float]:
    """Accuracy of `segmenter` over images with ground truth (see `scores`)."""
    preds = [segmenter.segment(img[None]).labels[0] for img in images]
    return scores(zip(truths, preds, strict=False))
