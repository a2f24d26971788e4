"""Reading images and writing label images for ``smartscope segment``."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from smartscope._errors import SmartscopeError, first_line
from smartscope.segment._protocol import PSegmenter

_TIFF = (".tif", ".tiff")
#: what `read_image` reads, for its error messages
FORMATS = "TIFF, PNG, JPEG or .npy"


def read_image(path: str | Path, grey: bool = True) -> np.ndarray:
    """An image or stack as ``(..., Y, X)``; RGB(A) is averaged to grey.

    TIFF (any leading T/Z/C axes, 8/16-bit, float) through tifffile; a
    NumPy ``.npy`` array (no pickled objects); PNG, JPEG and the other
    formats scikit-image reads. `grey` False keeps RGB(A) as it is (for a
    label mask, where it is an error: see `check_labels`).
    """
    path = Path(path)
    if not path.exists():
        raise SmartscopeError(f"image not found: {path}")
    if path.is_dir():
        raise SmartscopeError(f"expected an image file, got a folder: {path}")
    try:
        if path.suffix.lower() in _TIFF:
            import tifffile

            # tifffile logs (rather than raises) some damage; we report it once
            log = logging.getLogger("tifffile")
            level, log.level = log.level, logging.CRITICAL
            try:
                arr = np.asarray(tifffile.imread(path))
            finally:
                log.setLevel(level)
        elif path.suffix.lower() == ".npy":
            arr = np.asarray(np.load(path, allow_pickle=False))
        else:
            from skimage import io

            arr = np.asarray(io.imread(path))
    except Exception as exc:  # any reader failure is a bad-input error
        reason = first_line(exc)
        if "Could not find a backend" in reason:  # imageio's "no reader for this"
            reason = f"not an image file smartscope reads ({FORMATS})"
        raise SmartscopeError(f"cannot read {path.name}: {reason}") from None
    if arr.size == 0:
        raise SmartscopeError(f"cannot read {path.name}: no image data")
    if arr.dtype == bool:
        arr = arr.astype(np.uint8)
    if arr.dtype.kind not in "uif":
        raise SmartscopeError(f"{path.name}: unsupported pixel type {arr.dtype}")
    if grey and _is_rgb(arr):
        arr = arr[..., :3].astype(np.float32).mean(-1)  # RGB(A) → grey
    if arr.ndim < 2 or min(arr.shape[-2:]) < 2:
        raise SmartscopeError(f"{path.name}: not an image (shape {arr.shape})")
    return arr


def _is_rgb(arr: np.ndarray) -> bool:
    return arr.ndim >= 3 and arr.shape[-1] in (3, 4) and min(arr.shape[-3:-1]) > 4


def check_labels(labels: np.ndarray, name: str) -> np.ndarray:
    """A label mask (ground truth) as int64: whole numbers, 0 = background.

    A clear `SmartscopeError` naming `name` for an RGB(A) picture, NaN or
    fractional values, or negative labels (which scoring or training would
    otherwise read as objects, or truncate).
    """
    arr = np.asarray(labels)
    what = "a label image holds one whole number per pixel, 0 = background"
    if _is_rgb(arr):
        raise SmartscopeError(f"{name} is an RGB(A) picture, not a label mask ({what})")
    if arr.dtype.kind == "f" and not (
        np.isfinite(arr).all() and (arr == np.floor(arr)).all()
    ):
        raise SmartscopeError(f"{name} has NaN or fractional values ({what})")
    if arr.size and arr.min() < 0:
        raise SmartscopeError(f"{name} has negative labels (min {arr.min():g}; {what})")
    return arr.astype(np.int64)


def read_labels(path: str | Path, name: str) -> np.ndarray:
    """Ground-truth instance labels (int64) from a label image or a mask folder.

    A file is a label image (`check_labels`). A folder holds one mask per
    object, as the Data Science Bowl 2018 ships its annotations
    (``ID/masks/*.png``): every image file in it, in name order, is one
    object (its non-zero pixels; an empty mask is skipped), numbered from 1;
    a pixel two masks claim stays with the first. `name` names the labels
    in errors: a folder with no masks, a mask that is no 2D image, or masks
    of different shapes is a one-line `SmartscopeError`.
    """
    path = Path(path)
    if not path.is_dir():
        return check_labels(read_image(path, grey=False), name)
    files = sorted(f for f in path.iterdir() if f.is_file() and f.name[0] != ".")
    if not files:
        raise SmartscopeError(f"{name} is an empty folder (one mask file per object)")
    labels: np.ndarray | None = None
    for k, file in enumerate(files, start=1):
        mask = read_image(file)
        if mask.ndim != 2:
            raise SmartscopeError(
                f"{name}: {file.name} is no 2D mask (shape {mask.shape}; a mask "
                "folder holds one 2D image per object)"
            )
        if labels is None:
            labels = np.zeros(mask.shape, np.int64)
        elif mask.shape != labels.shape:
            raise SmartscopeError(
                f"{name}: {file.name} {mask.shape} differs in shape from "
                f"{files[0].name} {labels.shape}"
            )
        labels[(mask != 0) & (labels == 0)] = k
    from skimage.segmentation import relabel_sequential

    assert labels is not None
    # number the objects 1..K in file order (empty masks leave no gap)
    return relabel_sequential(labels)[0]


def segment_array(
    segmenter: PSegmenter, image: np.ndarray, batch_size: int = 4
) -> np.ndarray:
    """uint16 labels of the same shape: every ``(Y, X)`` plane on its own."""
    planes = image.reshape(-1, *image.shape[-2:])
    out = np.zeros(planes.shape, np.uint16)
    for i in range(0, len(planes), batch_size):
        out[i : i + batch_size] = segmenter.segment(planes[i : i + batch_size]).labels
    return out.reshape(image.shape)


def write_labels(path: str | Path, labels: np.ndarray) -> Path:
    """Write uint16 labels as a (zlib-compressed) TIFF; creates parent folders."""
    import tifffile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, labels.astype(np.uint16), compression="zlib")
    return path


def default_output(image_path: str | Path) -> Path:
    """``IMAGE_labels.tif`` beside the image."""
    p = Path(image_path)
    return p.with_name(p.name.split(".")[0] + "_labels.tif")
