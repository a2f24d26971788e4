"""The `PSegmenter` protocol every segmentation backend implements."""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol, runtime_checkable

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

    Optional: a ``prepare()`` method does one-time heavy work (compiling a
    network) that building should not, since an experiment's segmenter is also
    built to validate it; the child process of ``analysis.worker: process``
    and ``smartscope segment`` call it before the first frame.
    """

    @property
    def model_id(self) -> str:
        """Stable identity of the model and its parameters (logged per decision)."""
        ...

    def segment(self, images: np.ndarray) -> Segmentation:
        """Segment a ``(B, Y, X)`` batch."""
        ...


def prepare(segmenter: Any) -> None:
    """Call the segmenter's optional ``prepare()`` (one-time heavy work)."""
    hook = getattr(segmenter, "prepare", None)
    if callable(hook):
        hook()


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


def instance_labels(labels: Any, shape: tuple[int, ...]) -> np.ndarray:
    """A segmenter's `labels` for an image of `shape`, as uint16 instance labels.

    Labels from other people's models come in many dtypes: integer labels
    of any width pass; float labels pass when every value is a whole
    number; labels above 65 535 (a tool numbering objects sparsely) are
    renumbered 1..N in the order of their values, so they are neither
    wrapped round by the uint16 dataset nor a huge per-label table.

    Raises
    ------
    ValueError
        For a wrong shape, negative or non-integer values, or more than
        65 535 objects, each in one line naming what came back.
    """
    arr = np.asarray(labels)
    if arr.shape != tuple(shape):
        raise ValueError(
            f"segmenter returned labels of shape {arr.shape} for an image "
            f"of shape {tuple(shape)}"
        )
    if arr.dtype == np.uint16:
        return arr
    if arr.dtype == bool:
        return arr.astype(np.uint16)
    if arr.dtype.kind == "f":
        if not (np.isfinite(arr).all() and (arr == np.floor(arr)).all()):
            raise ValueError(
                f"segmenter returned labels of dtype {arr.dtype} with non-integer "
                "or NaN values: instance labels are whole numbers (0 = background)"
            )
    elif arr.dtype.kind not in "iu":
        raise ValueError(
            f"segmenter returned labels of dtype {arr.dtype}: instance labels "
            "are integers (0 = background)"
        )
    if arr.size == 0:
        return arr.astype(np.uint16)
    low, high = arr.min(), arr.max()
    if low < 0:
        raise ValueError(
            f"segmenter returned negative labels (min {low:g}): instance labels "
            "are 0 (background) or positive"
        )
    if high <= np.iinfo(np.uint16).max:
        return arr.astype(np.uint16)
    ids, inverse = np.unique(arr, return_inverse=True)
    n = len(ids) - int(ids[0] == 0)
    if n > np.iinfo(np.uint16).max:
        raise ValueError(
            f"segmenter returned {n} objects in one image; at most 65535 are stored"
        )
    if ids[0] != 0:  # no background pixel: every id moves up by one
        inverse = inverse + 1
    return inverse.reshape(arr.shape).astype(np.uint16)


def as_segmentation(result: Any) -> Segmentation:
    """What a segmenter's `segment` returned, as a `Segmentation`.

    Besides a `Segmentation`, the ``(B, Y, X)`` labels array alone (a common
    shortcut in a user's own segmenter) is taken.

    Raises
    ------
    TypeError
        For anything else, naming what came back.
    """
    if isinstance(result, Segmentation):
        return result
    if isinstance(result, np.ndarray):
        return Segmentation(result)
    raise TypeError(
        f"segmenter returned {type(result).__name__}; expected "
        "Segmentation(labels, scores) or a (B, Y, X) labels array"
    )
