"""The `PSegmenter` protocol every segmentation backend implements."""

from __future__ import annotations

from typing import NamedTuple, Protocol, runtime_checkable

import numpy as np


class Segmentation(NamedTuple):
    """Output of `PSegmenter.segment` for a batch of images.

    Attributes
    ----------
    labels : np.ndarray
        ``(B, Y, X)`` instance labels, 0 = background, one image per input.
    scores : list[np.ndarray] | None
        Optional per-image confidence of each label (sorted label order).
    """

    labels: np.ndarray
    scores: list[np.ndarray] | None = None


@runtime_checkable
class PSegmenter(Protocol):
    """Image batch in, instance labels (+ optional scores) out.

    Implementations must accept ``(B, Y, X)`` arrays of any integer or float
    dtype, must not keep references to the input and must be safe to call from
    the inference worker thread.
    """

    @property
    def model_id(self) -> str:
        """Stable identity of the model and its parameters (logged per decision)."""
        ...

    def segment(self, images: np.ndarray) -> Segmentation:
        """Segment a ``(B, Y, X)`` batch."""
        ...


def as_batch(images: np.ndarray) -> np.ndarray:
    """Check and return `images` as a ``(B, Y, X)`` batch.

    Raises
    ------
    ValueError
        For anything but a 2D image or a 3D batch.
    """
    arr = np.asarray(images)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or min(arr.shape[1:]) < 2:
        raise ValueError(
            f"expected a (Y, X) image or a (B, Y, X) batch, got shape {arr.shape}"
        )
    return arr
