"""A segmenter in a few lines: Gaussian smoothing, Otsu threshold, connected regions.

A segmenter is anything with a ``model_id`` property and a ``segment(images)``
method (the `smartscope.segment.PSegmenter` protocol). Parameters are pydantic
fields, so an experiment YAML can set them and a typo is one clear error:

.. code-block:: yaml

    segmenter:
      name: gaussian_otsu     # the entry point name (see pyproject.toml)
      sigma_px: 2.0
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu
from smartscope.segment import Segmentation, as_batch, fill_non_finite


class GaussianOtsuSegmenter(BaseModel):
    """Smooth each image, threshold it at Otsu's level, label the regions.

    Parameters
    ----------
    sigma_px : float
        Gaussian smoothing (pixels) before thresholding.
    min_area_px : int
        Regions smaller than this are dropped.
    """

    # frozen: parameters cannot change under a running acquisition;
    # extra="forbid": an unknown YAML key is an error, not silently ignored
    model_config = ConfigDict(frozen=True, extra="forbid")

    sigma_px: float = Field(1.5, ge=0)
    min_area_px: int = Field(10, ge=1)

    @property
    def model_id(self) -> str:
        """Name plus a hash of the parameters: logged with every decision."""
        params = json.dumps(self.model_dump(), sort_keys=True)
        return "gaussian_otsu-" + hashlib.sha256(params.encode()).hexdigest()[:8]

    def segment(self, images: np.ndarray) -> Segmentation:
        """Label a ``(B, Y, X)`` batch; called on the inference worker thread.

        Keep no reference to `images` (the worker reuses its buffers) and keep
        no state that changes between calls (one object may serve several
        threads, e.g. ``smartscope reanalyze``).
        """
        batch = as_batch(images)  # (Y, X) → (1, Y, X); bad shapes: one-line error
        batch = fill_non_finite(batch)  # NaN borders of float images → background
        labels = np.zeros(batch.shape, np.uint16)
        for i, image in enumerate(batch):
            labels[i] = self._segment_one(image.astype(np.float32))
        return Segmentation(labels)  # no per-object scores: they count as 1.0

    def _segment_one(self, image: np.ndarray) -> np.ndarray:
        smooth = ndi.gaussian_filter(image, self.sigma_px) if self.sigma_px else image
        if smooth.max() <= smooth.min():  # a flat frame: nothing to find
            return np.zeros(image.shape, np.uint16)
        regions, n = ndi.label(smooth > threshold_otsu(smooth))
        # drop small regions and number the rest 1..K (whole-array, no loop)
        areas = np.bincount(regions.ravel(), minlength=n + 1)
        keep = areas >= self.min_area_px
        keep[0] = False
        new_id = np.zeros(n + 1, np.uint16)
        new_id[keep] = np.arange(1, int(keep.sum()) + 1)
        return new_id[regions]
