"""`OnnxSegmenter`: an ONNX segmentation model run by ONNX Runtime."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator
from smartscope._errors import SmartscopeError
from smartscope.segment import Segmentation, as_batch
from smartscope.segment._postprocess import FRAGMENT_FRACTION

DEFAULT_PERCENTILES = (1.0, 99.8)
_SAMPLE_PIXELS = 1 << 16
_FLOAT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
}


class OnnxModelError(SmartscopeError):
    """The ONNX model is missing, corrupt, or its inputs/outputs do not fit."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def percentile_scale(image: np.ndarray, percentiles: tuple[float, float]) -> np.ndarray:
    """Map the two percentiles of `image` to 0 and 1 (float32; flat → zeros).

    Percentiles come from a strided sample of at most 65 536 pixels, as in
    smartscope's own normalisation, so the cost does not grow with the frame.
    """
    img = np.asarray(image, dtype=np.float32)
    step = max(1, int(np.sqrt(img.size / _SAMPLE_PIXELS)))
    lo, hi = np.percentile(img[::step, ::step], percentiles)
    scale = hi - lo
    if not np.isfinite(scale) or scale < 1e-6 * max(1.0, abs(float(hi))):
        return np.zeros(img.shape, np.float32)
    return (img - np.float32(lo)) * np.float32(1.0 / scale)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


class OnnxSegmenter(BaseModel):
    """An ``.onnx`` segmentation model as a smartscope segmenter (``onnx``).

    The model takes ``(B, 1, Y, X)`` (or ``(B, Y, X)``) float images and returns
    per-pixel maps of the same Y, X: three class channels (background,
    interior, boundary, as the built-in model exported with
    ``smartscope export --format onnx``) or a foreground map (one channel, or
    background + foreground). Files exported by smartscope say all of this in
    their metadata; for other files the defaults below apply.

    Parameters
    ----------
    model : path
        The ``.onnx`` file (local; nothing is downloaded).
    normalize : "percentile" | "none"
        Scale each image so that `percentiles` map to 0 and 1, or feed raw
        intensities (as float).
    percentiles : (low, high), optional
        Default: the file's ``smartscope.normalize`` metadata, else (1, 99.8).
    output : "auto" | "boundary3" | "foreground"
        How the output becomes instances. ``boundary3``: background/interior/
        boundary probabilities → seeds grown over the foreground (the built-in
        model's post-processing). ``foreground``: one channel (or ``1 -
        background``) thresholded, touching objects split by a watershed.
        ``auto``: the file's metadata, else 3 channels → ``boundary3``, 1 or 2
        → ``foreground``.
    activation : "auto" | "none" | "softmax" | "sigmoid"
        Applied to the output. ``auto``: the file's metadata, else none when
        the output already is probabilities (in [0, 1], channels summing to 1),
        else softmax over channels (sigmoid for one channel).
    multiple : int, optional
        Y and X are padded (reflected) to multiples of this (default: the
        file's metadata, else 16).
    device : "auto" | "cpu" | "cuda"
        ``auto``: CUDAExecutionProvider first when ONNX Runtime has it.
    threads : int, optional
        ONNX Runtime intra-op threads (default: its own choice).
    fg_threshold, seed_threshold : float
        Foreground and interior-seed probability thresholds.
    min_area_px : int
        Smaller objects are dropped.
    fragment_fraction : float
        ``boundary3`` output: pieces under this fraction of the median object
        that touch a larger object join it; 0 keeps every piece.
    split_touching : bool
        ``foreground`` output: split touching objects (watershed on the
        distance transform).
    min_distance_px : int
        ``foreground`` output: minimum distance between seeds of split objects.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())

    model: str
    normalize: Literal["percentile", "none"] = "percentile"
    percentiles: tuple[float, float] | None = None
    output: Literal["auto", "boundary3", "foreground"] = "auto"
    activation: Literal["auto", "none", "softmax", "sigmoid"] = "auto"
    multiple: int | None = Field(None, ge=1, le=1024)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = Field(None, ge=1)
    fg_threshold: float = Field(0.6, gt=0, lt=1)
    seed_threshold: float = Field(0.6, gt=0, lt=1)
    min_area_px: int = Field(8, ge=0)
    fragment_fraction: float = Field(FRAGMENT_FRACTION, ge=0, lt=1)
    split_touching: bool = True
    min_distance_px: int = Field(3, ge=1)

    _session: Any = PrivateAttr(None)
    _meta: dict[str, str] = PrivateAttr(default_factory=dict)
    _sha256: str = PrivateAttr("")
    _input: Any = PrivateAttr(None)
    _dtype: Any = PrivateAttr(np.float32)

    @field_validator("percentiles")
    @classmethod
    def _check_percentiles(cls, v: tuple[float, float] | None) -> Any:
        if v is not None and not 0 <= v[0] < v[1] <= 100:
            raise ValueError(f"percentiles must be 0 <= low < high <= 100, not {v}")
        return v

    def model_post_init(self, __context: Any) -> None:
        path = Path(self.model).expanduser()
        if not path.exists():
            raise OnnxModelError(f"ONNX model not found: {path}")
        if path.is_dir():
            raise OnnxModelError(f"expected an .onnx file, got a folder: {path}")
        import onnxruntime as ort

        available = ort.get_available_providers()
        cuda = "CUDAExecutionProvider" in available
        if self.device == "cuda" and not cuda:
            raise OnnxModelError(
                "device 'cuda' requested but ONNX Runtime has no "
                "CUDAExecutionProvider (pip install onnxruntime-gpu)"
            )
        providers = ["CPUExecutionProvider"]
        if cuda and self.device != "cpu":
            providers.insert(0, "CUDAExecutionProvider")
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: no per-session chatter
        if self.threads:
            options.intra_op_num_threads = self.threads
            options.inter_op_num_threads = 1
        try:
            session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:  # ORT raises its own classes for every failure
            raise OnnxModelError(
                f"cannot load ONNX model {path.name}: {_first_line(exc)}"
            ) from None
        inputs = session.get_inputs()
        if len(inputs) != 1:
            names = ", ".join(i.name for i in inputs)
            raise OnnxModelError(
                f"{path.name}: expected one image input, the model has "
                f"{len(inputs)} ({names})"
            )
        inp = inputs[0]
        if len(inp.shape) not in (3, 4):
            raise OnnxModelError(
                f"{path.name}: input {inp.name!r} has rank {len(inp.shape)} "
                f"{inp.shape}; expected (B, 1, Y, X) or (B, Y, X)"
            )
        if len(inp.shape) == 4 and isinstance(inp.shape[1], int) and inp.shape[1] != 1:
            raise OnnxModelError(
                f"{path.name}: input {inp.name!r} has {inp.shape[1]} channels; "
                "smartscope segments single-channel images"
            )
        if inp.type not in _FLOAT_TYPES:
            raise OnnxModelError(
                f"{path.name}: input {inp.name!r} is {inp.type}; expected float"
            )
        self._session = session
        self._input = inp
        self._dtype = _FLOAT_TYPES[inp.type]
        self._meta = dict(session.get_modelmeta().custom_metadata_map)
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        self._sha256 = digest.hexdigest()

    # -- identity --------------------------------------------------------------
    @property
    def model_id(self) -> str:
        """``onnx:<file stem>-<first 12 hex of the file's sha256>``."""
        return f"onnx:{Path(self.model).stem}-{self._sha256[:12]}"

    @property
    def providers(self) -> list[str]:
        """The execution providers ONNX Runtime uses, in order."""
        return list(self._session.get_providers())

    @property
    def device_name(self) -> str:
        """``cuda`` when ONNX Runtime runs the model on CUDA, else ``cpu``."""
        return "cuda" if self.providers[0] == "CUDAExecutionProvider" else "cpu"

    @property
    def metadata(self) -> dict[str, str]:
        """The model file's metadata (``smartscope.*`` keys for exported models)."""
        return dict(self._meta)

    # -- settings resolved from the file ---------------------------------------
    def _percentiles(self) -> tuple[float, float]:
        if self.percentiles is not None:
            return self.percentiles
        words = self._meta.get("smartscope.normalize", "").split()
        if len(words) == 3 and words[0] == "percentile":
            return (float(words[1]), float(words[2]))
        return DEFAULT_PERCENTILES

    def _multiple(self) -> int:
        if self.multiple is not None:
            return self.multiple
        return int(self._meta.get("smartscope.multiple", 16))

    def _output_kind(self, channels: int) -> str:
        kind: str = self.output
        if kind == "auto":
            kind = self._meta.get("smartscope.output", "")
        if kind not in ("boundary3", "foreground"):
            kind = {3: "boundary3", 1: "foreground", 2: "foreground"}.get(channels, "")
        if not kind:
            raise OnnxModelError(
                f"cannot tell what the model's {channels}-channel output means; "
                "set output: boundary3 or foreground"
            )
        if kind == "boundary3" and channels != 3:
            raise OnnxModelError(
                f"output boundary3 needs 3 channels, the model gives {channels}"
            )
        return kind

    def _activate(self, out: np.ndarray) -> np.ndarray:
        act: str = self.activation
        if act == "auto":
            act = self._meta.get("smartscope.activation", "auto")
        if act == "auto":
            if out.shape[1] > 1:
                probs = out.min() >= 0 and np.allclose(out.sum(axis=1), 1, atol=1e-3)
            else:
                probs = out.min() >= 0 and out.max() <= 1
            act = "none" if probs else ("softmax" if out.shape[1] > 1 else "sigmoid")
        if act == "softmax":
            return _softmax(out)
        if act == "sigmoid":
            return 1 / (1 + np.exp(-out))
        return out

    # -- inference ---------------------------------------------------------------
    def _run(self, x: np.ndarray) -> np.ndarray:
        """Model output as ``(B, C, Y, X)`` float32 for a prepared ``(B, Y, X)``."""
        inp = self._input
        feed = x[:, None] if len(inp.shape) == 4 else x
        feed = np.ascontiguousarray(feed, dtype=self._dtype)
        fixed_batch = isinstance(inp.shape[0], int)
        chunk = inp.shape[0] if fixed_batch else len(feed)
        if fixed_batch and len(feed) % chunk:
            raise OnnxModelError(
                f"the model takes batches of exactly {chunk} images, got {len(feed)}"
            )
        outs = []
        for i in range(0, len(feed), chunk):
            try:
                out = self._session.run(None, {inp.name: feed[i : i + chunk]})[0]
            except Exception as exc:
                raise OnnxModelError(
                    f"ONNX model failed on a {feed.shape[1:]} batch: {_first_line(exc)}"
                ) from None
            outs.append(np.asarray(out, np.float32))
        out = np.concatenate(outs)
        if out.ndim == 3:
            out = out[:, None]
        if out.ndim != 4 or out.shape[-2:] != x.shape[-2:]:
            raise OnnxModelError(
                f"model output has shape {out.shape} for input {feed.shape}; "
                "expected per-pixel maps (B, C, Y, X) of the input's Y, X"
            )
        return out

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """``(B, C, Y, X)`` per-pixel probabilities of a ``(B, Y, X)`` batch."""
        batch = as_batch(images)
        _, h, w = batch.shape
        if self.normalize == "percentile":
            pct = self._percentiles()
            x = np.stack([percentile_scale(img, pct) for img in batch])
        else:
            x = batch.astype(np.float32)
        m = self._multiple()
        ph, pw = (-h) % m, (-w) % m
        if ph or pw:
            x = np.pad(x, ((0, 0), (0, ph), (0, pw)), mode="reflect")
        return self._activate(self._run(x)[:, :, :h, :w])

    def segment(self, images: np.ndarray) -> Segmentation:
        """Segment a ``(B, Y, X)`` batch (or one ``(Y, X)`` image)."""
        from smartscope.segment import foreground_to_labels
        from smartscope.segment._postprocess import probabilities_to_labels

        probs = self.probabilities(images)
        kind = self._output_kind(probs.shape[1])
        labels = np.zeros((probs.shape[0], *probs.shape[2:]), np.uint16)
        scores = []
        for i, p in enumerate(probs):
            if kind == "boundary3":
                labels[i], s = probabilities_to_labels(
                    p,
                    fg_threshold=self.fg_threshold,
                    seed_threshold=self.seed_threshold,
                    min_area_px=self.min_area_px,
                    fragment_fraction=self.fragment_fraction,
                )
            else:
                fg = p[0] if p.shape[0] == 1 else 1 - p[0]
                labels[i], s = foreground_to_labels(
                    fg,
                    threshold=self.fg_threshold,
                    min_area_px=self.min_area_px,
                    split_touching=self.split_touching,
                    min_distance_px=self.min_distance_px,
                )
            scores.append(s)
        return Segmentation(labels, scores)
