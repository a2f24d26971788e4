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


def democam_bead_set(
    n_fields: int = 4, defocus_um: tuple[float, ...] = (0.0, 2.0, 4.0), config=None
) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """Frames of the real DemoCamera (demo config) with bead ground truth.

    For each of `n_fields` stage positions, one frame per Z offset in
    `defocus_um` (wider and dimmer with defocus). The DemoCamera renders beads
    without noise, so each frame's truth is exact: `bead_truth` of the frame
    itself, the rule the synthetic beads are labelled with. Returns
    ``(image, truth, defocus)`` triples.
    The core is released before returning.
    """
    from smartscope.microscope import Microscope

    out = []
    mic = Microscope()
    try:
        mic.load_config(config)
        core = mic.core
        core.setExposure(10.0)
        x0, y0 = core.getXPosition(), core.getYPosition()
        z0 = core.getPosition()
        for i in range(n_fields):
            core.setXYPosition(x0 + 700.0 * i, y0 + 350.0 * (i % 2))
            for dz in defocus_um:
                core.setPosition(z0 + dz)
                core.waitForSystem()
                image = core.snap().copy()
                out.append((image, bead_truth(image), dz))
        core.setPosition(z0)
        core.setXYPosition(x0, y0)
        core.waitForSystem()
    finally:
        mic.close()
    return out


def evaluate(
    segmenter: PSegmenter, images: list[np.ndarray], truths: list[np.ndarray]
) -> dict[str, float]:
    """Accuracy of `segmenter` over images with ground truth (see `scores`)."""
    preds = [segmenter.segment(img[None]).labels[0] for img in images]
    return scores(zip(truths, preds, strict=False))
