"""Rule-based baseline segmenter: smooth, threshold, split touching objects."""

from __future__ import annotations

import hashlib
import json
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from scipy import ndimage as ndi

from smartscope.segment._protocol import Segmentation, as_batch


class ThresholdSegmenter(BaseModel):
    """Gaussian smoothing, a global threshold and a seeded watershed.

    Parameters
    ----------
    sigma_px : float
        Gaussian smoothing before thresholding (0 disables it).
    threshold : "otsu" | "triangle" | float
        Global threshold method, or an absolute intensity in the image's units.
    min_area_px : int
        Objects smaller than this are removed.
    split_touching : bool
        Split touching objects with a watershed on the distance transform.
    min_distance_px : int
        Minimum distance between the seeds of split objects.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    sigma_px: float = Field(1.0, ge=0)
    threshold: Literal["otsu", "triangle"] | float = "otsu"
    min_area_px: int = Field(4, ge=0)
    split_touching: bool = True
    min_distance_px: int = Field(3, ge=1)

    @property
    def model_id(self) -> str:
        """``threshold-<hash of the parameters>``."""
        params = json.dumps(self.model_dump(), sort_keys=True)
        return "threshold-" + hashlib.sha256(params.encode()).hexdigest()[:8]

    def segment(self, images: np.ndarray) -> Segmentation:
        """Segment a ``(B, Y, X)`` batch (a single ``(Y, X)`` image is accepted)."""
        batch = as_batch(images)
        out = np.zeros(batch.shape, dtype=np.uint16)
        for i, image in enumerate(batch):
            out[i] = self._segment_one(image)
        return Segmentation(out)

    def _segment_one(self, image: np.ndarray) -> np.ndarray:
        from skimage import filters, morphology, segmentation

        img = image.astype(np.float32, copy=False)
        finite = np.isfinite(img) if image.dtype.kind in "fc" else None
        if finite is not None and not finite.all():  # NaN borders: background
            if not finite.any():
                return np.zeros(img.shape, np.uint16)
            img = np.where(finite, img, img[finite].min())
        if self.sigma_px > 0:
            img = ndi.gaussian_filter(img, self.sigma_px)
        if img.max() <= img.min():
            return np.zeros(img.shape, np.uint16)
        if isinstance(self.threshold, str):
            method = (
                filters.threshold_otsu
                if self.threshold == "otsu"
                else filters.threshold_triangle
            )
            level = method(img)
        else:
            level = float(self.threshold)
        mask = img > level
        if self.min_area_px:
            mask = morphology.remove_small_objects(mask, max_size=self.min_area_px - 1)
        labels, n = ndi.label(mask)
        if n == 0 or not self.split_touching:
            return labels.astype(np.uint16)
        # seeds: maxima of the smoothed intensity, at least min_distance_px apart;
        # bright blobs (nuclei, beads) peak at their centers, so touching objects
        # get one seed each and the watershed splits them along the dimmest path
        size = 2 * self.min_distance_px + 1
        peaks = (img == ndi.maximum_filter(img, size=size)) & mask
        markers, _ = ndi.label(peaks)
        split = segmentation.watershed(-img, markers, mask=mask)
        return split.astype(np.uint16)
