"""`CellposeSegmenter`: a Cellpose 4 model from a local file."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr
from smartscope._errors import SmartscopeError, first_line
from smartscope.segment import Segmentation, as_batch, fill_non_finite

from smartscope_cellpose._compat import import_cellpose_models


class CellposeModelError(SmartscopeError):
    """The model file is missing, not local, or not a Cellpose 4 model."""


@contextlib.contextmanager
def _quiet_cellpose() -> Iterator[None]:
    """Mute what Cellpose says on import and per call that users cannot act on.

    Importing ``cellpose.models`` logs a warning when the optional ``dinov3``
    package (CPDINO models) is missing, and its mask dynamics trigger torch's
    "Sparse invariant checks are implicitly disabled" warning.
    """
    loggers = [logging.getLogger(n) for n in ("cellpose.vit", "cellpose.models")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", message=r".*[Ss]parse invariant checks", category=UserWarning
            )
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


class CellposeSegmenter(BaseModel):
    """A Cellpose 4 model (``cellpose.models.CellposeModel``) as a segmenter.

    The model must be a local file (Cellpose 4 / Cellpose-SAM weights, e.g.
    one you trained or ``~/.cellpose/models/cpsam`` downloaded beforehand).
    Nothing is downloaded: a name or a path that does not exist is refused
    before Cellpose is called (Cellpose would fetch its default model).
    Building it checks the file (validating an experiment costs milliseconds);
    the network is built by `prepare` or the first `segment`.

    Parameters
    ----------
    model : path
        The Cellpose 4 weights file.
    device : "auto" | "cpu" | "cuda"
        ``auto``: CUDA when torch has it.
    precision : "bf16" | "fp32"
        Weights and activations (bf16 is Cellpose's default; on a CPU with
        AVX-512 BF16 it was 3x faster than fp32 here).
    diameter : float, optional
        Typical object diameter in pixels; images are resized so it becomes 30
        (None: no resizing, Cellpose 4's default).
    flow_threshold, cellprob_threshold, min_size, max_size_fraction, niter,
    tile_overlap, augment, normalize, batch_size
        Passed to ``CellposeModel.eval`` (same defaults).
    """

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())

    model: str
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["bf16", "fp32"] = "bf16"
    diameter: float | None = Field(None, gt=0)
    flow_threshold: float = Field(0.4, ge=0)
    cellprob_threshold: float = 0.0
    min_size: int = Field(15, ge=0)
    max_size_fraction: float = Field(0.4, gt=0, le=1)
    niter: int | None = Field(None, ge=1)
    tile_overlap: float = Field(0.1, ge=0, lt=1)
    augment: bool = False
    normalize: bool = True
    batch_size: int = Field(8, ge=1)

    _model: Any = PrivateAttr(None)
    _sha256: str = PrivateAttr("")
    _lock: Any = PrivateAttr(default_factory=threading.Lock)

    def model_post_init(self, __context: Any) -> None:
        path = Path(self.model).expanduser()
        if not path.is_file():
            what = "a folder" if path.is_dir() else "not found"
            raise CellposeModelError(
                f"Cellpose model file {what}: {path} (give a local Cellpose 4 "
                "weights file; smartscope never downloads models)"
            )
        import torch

        self._check_file(path, torch)
        if self.device == "cuda" and not torch.cuda.is_available():
            raise CellposeModelError(
                "device 'cuda' requested but CUDA is not available"
            )
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        self._sha256 = digest.hexdigest()

    def _cuda(self) -> bool:
        import torch

        return self.device != "cpu" and torch.cuda.is_available()

    def prepare(self) -> None:
        """Build the Cellpose network and load the weights (once).

        Building the segmenter only checks the file (what validating an
        experiment does, in milliseconds); Cellpose 4 always builds a
        Cellpose-SAM network (a ViT-L encoder, ~1.2 GB in memory, seconds),
        so that happens here, in the run's analysis process before it says
        it is ready, or at the first `segment`.
        """
        with self._lock:
            self._network()

    def _network(self) -> Any:
        """The ``CellposeModel``, built on first use (call with the lock held)."""
        if self._model is not None:
            return self._model
        import torch

        path = Path(self.model).expanduser()
        cuda = self._cuda()
        with _quiet_cellpose():
            try:
                models = import_cellpose_models()
            except Exception as exc:
                raise CellposeModelError(
                    f"cannot import Cellpose: {first_line(exc)}"
                ) from None
            try:
                self._model = models.CellposeModel(
                    gpu=cuda,
                    pretrained_model=str(path),
                    device=torch.device("cuda" if cuda else "cpu"),
                    use_bfloat16=self.precision == "bf16",
                )
            except Exception as exc:
                raise CellposeModelError(
                    f"cannot load Cellpose model {path.name}: {first_line(exc)}"
                ) from None
        return self._model

    @staticmethod
    def _check_file(path: Path, torch: Any) -> None:
        """Fail fast (before building the network) on files that are no CP4 model."""
        if not zipfile.is_zipfile(path):  # what torch.save has written since 1.6
            raise CellposeModelError(
                f"cannot read Cellpose model {path.name}: not a PyTorch file "
                "(a Cellpose model is the file torch.save writes)"
            )
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:
            raise CellposeModelError(
                f"cannot read Cellpose model {path.name}: {first_line(exc)}"
            ) from None
        if not isinstance(state, dict) or "W2" not in state:
            raise CellposeModelError(
                f"{path.name} is not a Cellpose 4 model (no 'W2' weights; Cellpose 3 "
                "and older models do not run in Cellpose 4)"
            )
        if getattr(state["W2"], "ndim", None) != 4:  # Cellpose-SAM's readout
            raise CellposeModelError(
                f"{path.name} is not a Cellpose 4 model (its 'W2' weights are not "
                "the 4-D readout of Cellpose-SAM)"
            )

    @property
    def model_id(self) -> str:
        """``cellpose:<file stem>-<first 12 hex of the file's sha256>``."""
        return f"cellpose:{Path(self.model).stem}-{self._sha256[:12]}"

    @property
    def device_name(self) -> str:
        """The torch device Cellpose runs on."""
        if self._model is not None:
            return str(self._model.device)
        return "cuda" if self._cuda() else "cpu"

    def segment(self, images: np.ndarray) -> Segmentation:
        """Segment a ``(B, Y, X)`` batch (or one ``(Y, X)`` image).

        Scores are each object's mean cell probability (sigmoid of Cellpose's
        cellprob output). NaN and infinite pixels (the border of a registered
        or stitched float image) are read as background (`fill_non_finite`):
        Cellpose's own normalisation would turn the whole image into NaN.
        """
        batch = fill_non_finite(as_batch(images))
        with self._lock, _quiet_cellpose():
            masks, flows, _ = self._network().eval(
                [np.asarray(img, np.float32) for img in batch],
                batch_size=self.batch_size,
                channel_axis=None,
                normalize=self.normalize,
                diameter=self.diameter,
                flow_threshold=self.flow_threshold,
                cellprob_threshold=self.cellprob_threshold,
                min_size=self.min_size,
                max_size_fraction=self.max_size_fraction,
                niter=self.niter,
                augment=self.augment,
                tile_overlap=self.tile_overlap,
            )
        top = max((int(np.max(m)) for m in masks), default=0)
        labels = np.zeros(batch.shape, np.uint16 if top < 65536 else np.uint32)
        scores = []
        for i, (m, f) in enumerate(zip(masks, flows, strict=True)):
            labels[i] = m
            n = int(m.max())
            prob = 1 / (1 + np.exp(-np.asarray(f[2], np.float32)))
            flat = labels[i].ravel().astype(np.int64)
            area = np.bincount(flat, minlength=n + 1)[1:]
            total = np.bincount(flat, weights=prob.ravel(), minlength=n + 1)[1:]
            present = area > 0
            scores.append((total[present] / area[present]).astype(np.float32))
        return Segmentation(labels, scores)
