"""`OnnxSegmenter`: an ONNX segmentation model run by ONNX Runtime."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator
from smartscope._errors import SmartscopeError, first_line
from smartscope.segment import Segmentation, as_batch, fill_non_finite
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


def percentile_scale(image: np.ndarray, percentiles: tuple[float, float]) -> np.ndarray:
    """Map the two percentiles of `image` to 0 and 1 (float32; flat → zeros).

    Percentiles come from a strided sample of at most 65 536 pixels, as in
    smartscope's own normalisation, so the cost does not grow with the frame.
    Pixels that are not finite (NaN borders of a float image) are left out
    of the percentiles and mapped to 0.
    """
    img = np.asarray(image, dtype=np.float32)
    step = max(1, int(np.sqrt(img.size / _SAMPLE_PIXELS)))
    sample = img[::step, ::step].ravel()
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return np.zeros(img.shape, np.float32)
    lo, hi = np.percentile(sample, percentiles)
    scale = hi - lo
    if not np.isfinite(scale) or scale < 1e-6 * max(1.0, abs(float(hi))):
        return np.zeros(img.shape, np.float32)
    out = (img - np.float32(lo)) * np.float32(1.0 / scale)
    out[~np.isfinite(out)] = 0.0
    return out


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


class OnnxSegmenter(BaseModel):
    """An ``.onnx`` segmentation model as a smartscope segmenter (``onnx``).

    The model takes ``(B, 1, Y, X)``, ``(B, Y, X, 1)`` (channels last, as
    TensorFlow exports) or ``(B, Y, X)`` float images and returns per-pixel
    maps of the same Y, X (channels first or last): three class channels
    (background, interior, boundary, as the built-in model exported with
    ``smartscope export --format onnx``) or a foreground map (one channel, or
    background + foreground). Files exported by smartscope say all of this in
    their metadata; for other files the defaults below apply. A model whose
    input has a fixed Y, X (exported for 256 x 256, say) is run on
    overlapping tiles of that size, stitched; one with a fixed batch size
    gets its batches filled up.

    Parameters
    ----------
    model : path
        The ``.onnx`` file (local; nothing is downloaded).
    normalize : "percentile" | "none"
        Scale each image so that `percentiles` map to 0 and 1, or feed raw
        intensities (as float). Either way NaN and infinite pixels (the
        border of a registered float image) are read as background.
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
    reread_ratio : float, optional
        ``boundary3`` output, off (None) by default: objects of at least this
        many times the median object area (1.7 recommended) are read again,
        each in a 96 px crop normalised on its own, and split where that read
        finds two or more parts (as the built-in segmenter's `reread_ratio`,
        `smartscope.segment.reread_large`).
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
    reread_ratio: float | None = Field(None, gt=1)
    split_touching: bool = True
    min_distance_px: int = Field(3, ge=1)

    _session: Any = PrivateAttr(None)
    _meta: dict[str, str] = PrivateAttr(default_factory=dict)
    _sha256: str = PrivateAttr("")
    _input: Any = PrivateAttr(None)
    _dtype: Any = PrivateAttr(np.float32)
    _layout: str = PrivateAttr("nchw")
    _tile: tuple[int, int] | None = PrivateAttr(None)
    _fixed_batch: int | None = PrivateAttr(None)

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
                f"cannot load ONNX model {path.name}: {first_line(exc)}"
            ) from None
        inputs = session.get_inputs()
        if len(inputs) != 1:
            names = ", ".join(i.name for i in inputs)
            raise OnnxModelError(
                f"{path.name}: expected one image input, the model has "
                f"{len(inputs)} ({names})"
            )
        inp = inputs[0]
        self._layout, self._tile, self._fixed_batch = _input_layout(path.name, inp)
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
    @property
    def tile(self) -> tuple[int, int] | None:
        """The model's fixed input size (Y, X), if it has one: images are tiled."""
        return self._tile

    def _run(self, x: np.ndarray) -> np.ndarray:
        """Model output as ``(B, C, Y, X)`` float32 for a prepared ``(B, Y, X)``."""
        if self._tile is not None:
            return self._run_tiled(x, self._tile)
        return self._infer(x)

    def _infer(self, x: np.ndarray) -> np.ndarray:
        """`_run` for images of a size the model takes, in its batch size.

        A model with a fixed batch size gets its last chunk filled up with
        copies of the last image (their outputs are dropped).
        """
        inp = self._input
        chunk = self._fixed_batch or len(x)
        outs = []
        for i in range(0, len(x), chunk):
            part = x[i : i + chunk]
            n = len(part)
            if n < chunk:
                part = np.concatenate([part, np.repeat(part[-1:], chunk - n, axis=0)])
            feed = {"nchw": part[:, None], "nhwc": part[..., None]}.get(
                self._layout, part
            )
            feed = np.ascontiguousarray(feed, dtype=self._dtype)
            try:
                out = self._session.run(None, {inp.name: feed})[0]
            except Exception as exc:
                raise OnnxModelError(
                    f"ONNX model failed on a {feed.shape[1:]} batch: {first_line(exc)}"
                ) from None
            outs.append(
                _as_bcyx(np.asarray(out, np.float32), part.shape, feed.shape)[:n]
            )
        return np.concatenate(outs)

    def _run_tiled(self, x: np.ndarray, tile: tuple[int, int]) -> np.ndarray:
        """`_run` for a model of fixed input size: overlapping tiles, stitched.

        Tiles overlap by a quarter of their size; each keeps its centre (an
        eighth of the tile from each inner edge is the neighbour's), so a
        convolutional model sees context on every side of what it keeps. An
        image smaller than a tile is padded by reflection.
        """
        b, h, w = x.shape
        ty, tx = tile
        if h < ty or w < tx:
            x = np.pad(x, ((0, 0), (0, max(0, ty - h)), (0, max(0, tx - w))), "reflect")
        hp, wp = x.shape[1:]
        my, mx = ty // 8, tx // 8
        ys, xs = _tile_starts(hp, ty, my), _tile_starts(wp, tx, mx)
        where = [(k, y0, x0) for k in range(b) for y0 in ys for x0 in xs]
        tiles = np.stack([x[k, y0 : y0 + ty, x0 : x0 + tx] for k, y0, x0 in where])
        out = self._infer(tiles)
        full = np.zeros((b, out.shape[1], hp, wp), np.float32)
        for t, (k, y0, x0) in enumerate(where):
            top = 0 if y0 == 0 else my
            left = 0 if x0 == 0 else mx
            bottom = ty - (0 if y0 + ty == hp else my)
            right = tx - (0 if x0 + tx == wp else mx)
            full[k, :, y0 + top : y0 + bottom, x0 + left : x0 + right] = out[
                t, :, top:bottom, left:right
            ]
        return full[:, :, :h, :w]

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """``(B, C, Y, X)`` per-pixel probabilities of a ``(B, Y, X)`` batch."""
        batch = as_batch(images)
        _, h, w = batch.shape
        if self.normalize == "percentile":
            pct = self._percentiles()
            x = np.stack([percentile_scale(img, pct) for img in batch])
        else:  # NaN and infinite pixels as background, as percentile_scale reads them
            x = fill_non_finite(batch).astype(np.float32)
        m = 1 if self._tile is not None else self._multiple()
        ph, pw = (-h) % m, (-w) % m
        if ph or pw:
            x = np.pad(x, ((0, 0), (0, ph), (0, pw)), mode="reflect")
        return self._activate(self._run(x)[:, :, :h, :w])

    def segment(self, images: np.ndarray) -> Segmentation:
        """Segment a ``(B, Y, X)`` batch (or one ``(Y, X)`` image)."""
        from smartscope.segment import foreground_to_labels
        from smartscope.segment._postprocess import (
            probabilities_to_labels,
            reread_large,
        )

        batch = as_batch(images)
        probs = self.probabilities(batch)
        kind = self._output_kind(probs.shape[1])
        labels = np.zeros((probs.shape[0], *probs.shape[2:]), np.uint16)
        scores = []
        for i, p in enumerate(probs):
            if kind == "boundary3":
                post = {
                    "fg_threshold": self.fg_threshold,
                    "seed_threshold": self.seed_threshold,
                    "min_area_px": self.min_area_px,
                    "fragment_fraction": self.fragment_fraction,
                }
                labels[i], s = probabilities_to_labels(p, **post)
                if self.reread_ratio is not None:
                    labels[i], s = reread_large(
                        batch[i],
                        p,
                        labels[i],
                        s,
                        self.probabilities,
                        ratio=self.reread_ratio,
                        **post,
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


def _input_layout(
    name: str, inp: Any
) -> tuple[str, tuple[int, int] | None, int | None]:
    """The input's layout, fixed (Y, X) size and fixed batch size, if any.

    Layouts: ``nchw`` (B, 1, Y, X), ``nhwc`` (B, Y, X, 1, as TensorFlow and
    Keras export), ``byx`` (B, Y, X). Dimensions ONNX leaves open are names
    or None; a fixed one is an int.
    """
    shape = list(inp.shape)

    def fixed(d: Any) -> bool:
        return isinstance(d, int) and d > 0

    if len(shape) == 3:
        layout, yx = "byx", shape[1:3]
    elif len(shape) == 4 and shape[1] == 1:
        layout, yx = "nchw", shape[2:4]
    elif len(shape) == 4 and shape[3] == 1:
        layout, yx = "nhwc", shape[1:3]
    elif len(shape) == 4:
        # channels: the smaller fixed one of the two candidate axes
        c = min((d for d in (shape[1], shape[3]) if fixed(d)), default=None)
        if c is not None:
            raise OnnxModelError(
                f"{name}: input {inp.name!r} {shape} has {c} channels; smartscope "
                "segments single-channel images"
            )
        layout, yx = "nchw", shape[2:4]
    else:
        raise OnnxModelError(
            f"{name}: input {inp.name!r} has rank {len(shape)} {shape}; expected "
            "(B, 1, Y, X), (B, Y, X, 1) or (B, Y, X)"
        )
    tile = (yx[0], yx[1]) if fixed(yx[0]) and fixed(yx[1]) else None
    if tile is not None and min(tile) < 8:
        raise OnnxModelError(f"{name}: input {inp.name!r} {shape} is too small to tile")
    return layout, tile, shape[0] if fixed(shape[0]) else None


def _as_bcyx(
    out: np.ndarray, part: tuple[int, ...], feed: tuple[int, ...]
) -> np.ndarray:
    """A model's output as (B, C, Y, X), from (B, C, Y, X), (B, Y, X, C), (B, Y, X)."""
    yx = tuple(part[-2:])
    if out.ndim == 3 and out.shape[1:] == yx:
        return out[:, None]
    if out.ndim == 4 and out.shape[2:] == yx:
        return out
    if out.ndim == 4 and out.shape[1:3] == yx:
        return out.transpose(0, 3, 1, 2)
    raise OnnxModelError(
        f"model output has shape {out.shape} for input {feed}; expected per-pixel "
        "maps (B, C, Y, X) or (B, Y, X, C) of the input's Y, X"
    )


def _tile_starts(n: int, tile: int, margin: int) -> list[int]:
    """Tile origins along an axis of `n` (>= `tile`) pixels, every tile whole.

    Neighbours overlap by 2 `margin`; the last tile ends at the edge.
    """
    step = tile - 2 * margin
    starts = list(range(0, n - tile, step))
    return [*starts, n - tile]
