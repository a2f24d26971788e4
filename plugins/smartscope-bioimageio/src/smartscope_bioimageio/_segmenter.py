"""`BioimageioSegmenter`: a bioimage.io model package run by ``bioimageio.core``."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator
from smartscope._errors import SmartscopeError, first_line
from smartscope.segment import Segmentation, as_batch, fill_non_finite
from smartscope.segment._postprocess import FRAGMENT_FRACTION

OutputKind = Literal["boundary3", "fg_boundary", "foreground", "distance"]
_DEFAULTS = {
    "fg_threshold": 0.5,
    "seed_threshold": 0.5,
    "min_area_px": 8,
    "fragment_fraction": FRAGMENT_FRACTION,
    "reread_ratio": 0,  # off unless the package or the user asks for it
}


class BioimageioModelError(SmartscopeError):
    """The package is missing, invalid, remote, or its tensors do not fit."""


def _first_error(descr: Any) -> str:
    summary = getattr(descr, "validation_summary", None)
    for detail in getattr(summary, "details", []):
        for err in detail.errors:
            loc = ".".join(str(p) for p in err.loc)
            return f"{loc}: {first_line(ValueError(err.msg))}" if loc else err.msg
    return "not a valid bioimage.io model description"


@contextlib.contextmanager
def _quiet_torchscript() -> Iterator[None]:
    """Silence torch 2.13's ``torch.jit`` deprecation (bioimageio.core uses it)."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r".*torch\.jit.*deprecated", category=DeprecationWarning
        )
        yield


@contextlib.contextmanager
def _no_progress_bars(pipeline: Any) -> Iterator[None]:
    """No tqdm bar per frame on the terminal while a model predicts in blocks.

    bioimage.io core draws one for every blocked prediction (a frame of a
    run, here) and has no switch for it: its module's ``tqdm`` is swapped for
    a disabled one while the call runs (the caller holds the segmenter lock).
    """
    import functools
    import sys

    module = sys.modules.get(type(pipeline).__module__)
    bar = getattr(module, "tqdm", None)
    if bar is None:
        yield
        return
    module.tqdm = functools.partial(bar, disable=True)  # type: ignore[union-attr]
    try:
        yield
    finally:
        module.tqdm = bar  # type: ignore[union-attr]


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


class BioimageioSegmenter(BaseModel):
    """A bioimage.io model package as a smartscope segmenter (``bioimageio``).

    The package (a ``.zip``, a folder holding ``rdf.yaml`` /
    ``bioimageio.yaml``, or that file) is read offline and run with
    ``bioimageio.core`` and its own pre- and post-processing. Its output
    becomes instance labels according to `output`. Building checks the
    package and the chosen weights file (its sha256); `prepare` (or the first
    call) loads the weights into their runtime.

    Parameters
    ----------
    model : path
        The local package. URLs and bioimage.io ids are refused: nothing is
        downloaded.
    weights_format : "auto" | "torchscript" | "onnx" | "pytorch_state_dict"
        Which weights of the package to run. ``auto``: ONNX (ONNX Runtime) on
        CPU when installed, TorchScript first on CUDA.
    device : "auto" | "cpu" | "cuda"
    output : "auto" | "boundary3" | "fg_boundary" | "foreground" | "distance"
        ``boundary3``: background/interior/boundary channels (smartscope's
        post-processing: interior seeds grown over the foreground);
        ``fg_boundary``: foreground and boundary channels (turned into the
        three classes, then as ``boundary3``); ``foreground``: one probability
        channel (or background/foreground), thresholded, touching objects
        split by a watershed; ``distance``: a distance map, thresholded at
        `fg_threshold`, split at its maxima. ``auto``: the package's
        ``config.smartscope.output`` (written by ``smartscope export``), else
        from the output's channel names and count.
    output_tensor : str, optional
        Id of the output tensor to use (default: the first).
    fg_threshold, seed_threshold : float, optional
        Foreground (or distance) and seed thresholds (default: the package's
        ``config.smartscope.postprocess``, else 0.5).
    min_area_px : int, optional
        Smaller objects are dropped (default: package config, else 8).
    fragment_fraction : float, optional
        Class outputs: pieces under this fraction of the median object that
        touch a larger object join it (default: package config, else 0.4;
        0 keeps every piece).
    reread_ratio : float, optional
        Class outputs: objects of at least this many times the median object
        area are read again, each in a 96 px crop pre-processed on its own,
        and split where that read finds two or more parts
        (`smartscope.segment.reread_large`, as the built-in segmenter's
        `reread_ratio`; 1.7 recommended; default: package config, else off;
        0 turns it off).
    split_touching : bool
        ``foreground`` output: split touching objects.
    min_distance_px : int
        ``foreground`` / ``distance`` output: minimum distance between seeds.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())

    model: str
    weights_format: Literal["auto", "torchscript", "onnx", "pytorch_state_dict"] = (
        "auto"
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    output: Literal["auto", "boundary3", "fg_boundary", "foreground", "distance"] = (
        "auto"
    )
    output_tensor: str | None = None
    fg_threshold: float | None = Field(None, gt=0)
    seed_threshold: float | None = Field(None, gt=0, lt=1)
    min_area_px: int | None = Field(None, ge=0)
    fragment_fraction: float | None = Field(None, ge=0, lt=1)
    reread_ratio: float | None = Field(None, ge=0)
    split_touching: bool = True
    min_distance_px: int = Field(3, ge=1)

    _descr: Any = PrivateAttr(None)
    _pipeline: Any = PrivateAttr(None)
    _lock: Any = PrivateAttr(default_factory=threading.Lock)
    _build_lock: Any = PrivateAttr(default_factory=threading.Lock)
    _formats: list[str] = PrivateAttr(default_factory=list)
    _sha256: str = PrivateAttr("")
    _axes: list[tuple[str, str, Any]] = PrivateAttr(default_factory=list)
    _out: Any = PrivateAttr(None)
    _config: dict[str, Any] = PrivateAttr(default_factory=dict)

    @field_validator("reread_ratio")
    @classmethod
    def _check_reread(cls, v: float | None) -> float | None:
        if v is not None and 0 < v <= 1:
            raise ValueError("must be 0 (off) or more than 1 (x the median area)")
        return v

    def model_post_init(self, __context: Any) -> None:
        if "://" in self.model:
            raise BioimageioModelError(
                f"only local bioimage.io packages are loaded (nothing is "
                f"downloaded): {self.model}"
            )
        path = Path(self.model).expanduser()
        if not path.exists():
            raise BioimageioModelError(f"bioimage.io package not found: {path}")
        source = path
        if path.is_dir():
            found = [p for p in ("rdf.yaml", "bioimageio.yaml") if (path / p).exists()]
            if not found:
                raise BioimageioModelError(
                    f"{path} holds no rdf.yaml or bioimageio.yaml: not a "
                    "bioimage.io package folder"
                )
            source = path / found[0]
        self._descr = self._load(source)
        self._sha256 = _digest(source)
        self._check_tensors()
        self._config = dict(
            (self._descr.config.model_extra or {}).get("smartscope") or {}
        )
        # what can be wrong with the package is checked here (what validating
        # an experiment does); the prediction pipeline (the weights loaded
        # into their runtime, warmed up) is built by `prepare`, in the run's
        # analysis process, or at the first call
        if self.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise BioimageioModelError(
                    "device 'cuda' requested but CUDA is not available"
                )
        self._formats = self._weights()
        self._check_weights_file(self._formats[0])

    def prepare(self) -> None:
        """Build the prediction pipeline and warm it up (once).

        Loads the weights into their runtime (ONNX Runtime, TorchScript, ...)
        and runs two small predictions: TorchScript's profiling executor
        optimises the graph on its first calls, which would otherwise slow the
        first frames by seconds.
        """
        if self._pipeline is not None:
            return
        with self._build_lock:
            if self._pipeline is not None:
                return
            self._pipeline = self._create_pipeline()
            for _ in range(2):
                self.predict(np.zeros((1, 128, 128), np.float32))

    # -- loading -----------------------------------------------------------------
    def _load(self, source: Path) -> Any:
        from bioimageio.spec import load_description
        from bioimageio.spec.model import v0_5

        try:
            # offline: no URL is checked; "latest" turns 0.4 descriptions into 0.5
            descr = load_description(
                source, perform_io_checks=False, format_version="latest"
            )
        except Exception as exc:  # a bad zip, unreadable YAML, ...
            raise BioimageioModelError(
                f"cannot read bioimage.io package {source.name}: {first_line(exc)}"
            ) from None
        if not isinstance(descr, v0_5.ModelDescr):
            if getattr(descr, "type", "model") not in ("model", None):
                raise BioimageioModelError(
                    f"{source.name} describes a {descr.type}, not a model"
                )
            raise BioimageioModelError(
                f"invalid bioimage.io model {source.name}: {_first_error(descr)}"
            )
        return descr

    def _weights(self) -> list[str]:
        """Weight formats to try, the chosen one first; refuses remote weights."""
        from bioimageio.spec._internal.url import HttpUrl

        if self.weights_format != "auto":
            formats = [self.weights_format]
        elif self._cuda() or importlib.util.find_spec("onnxruntime") is None:
            formats = ["torchscript", "pytorch_state_dict", "onnx"]
        else:  # on CPU, ONNX Runtime is the fastest and loads in a blink
            formats = ["onnx", "torchscript", "pytorch_state_dict"]
        present: list[str] = [
            f for f in formats if getattr(self._descr.weights, f, None)
        ]
        if not present:
            weights = self._descr.weights
            have = ", ".join(
                f for f in type(weights).model_fields if getattr(weights, f, None)
            )
            raise BioimageioModelError(
                f"the package has no {self.weights_format} weights (it has: {have})"
            )
        for f in present:
            if isinstance(getattr(self._descr.weights, f).source, HttpUrl):
                raise BioimageioModelError(
                    f"the package's {f} weights are a URL; download the package "
                    "first (smartscope loads local files only)"
                )
        return present

    def _cuda(self) -> bool:
        if self.device == "cpu":
            return False
        import torch

        return bool(torch.cuda.is_available())

    def _create_pipeline(self) -> Any:
        from bioimageio.core import create_prediction_pipeline

        devices = None if self.device == "auto" else [self.device]
        fmt = self._formats[0]
        try:
            with _quiet_torchscript():
                return create_prediction_pipeline(
                    self._descr,
                    weights_format=fmt,  # type: ignore[arg-type]
                    devices=devices,
                )
        except Exception as exc:
            raise BioimageioModelError(
                f"cannot load the {fmt} weights of {Path(self.model).name}: "
                f"{first_line(exc)}"
            ) from None

    def _check_weights_file(self, fmt: str) -> None:
        """The weights file is in the package and matches the rdf's sha256.

        Reads the file once (milliseconds for a few MB), loads nothing.
        """
        from bioimageio.spec._internal.io import RelativeFilePath

        entry = getattr(self._descr.weights, fmt)
        name = Path(self.model).name
        source = entry.source  # a path in the zip or folder (remote: refused)
        if isinstance(source, RelativeFilePath):
            source = source.absolute()
        digest = hashlib.sha256()
        try:
            with source.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
        except Exception as exc:
            raise BioimageioModelError(
                f"cannot read the {fmt} weights of {name}: {first_line(exc)}"
            ) from None
        if entry.sha256 is not None and digest.hexdigest() != entry.sha256:
            raise BioimageioModelError(
                f"the {fmt} weights of {name} are damaged: their sha256 differs "
                "from the one in the package's description"
            )

    def _check_tensors(self) -> None:
        """One image input (batch, one channel, y, x) and a per-pixel output."""
        from bioimageio.spec.model import v0_5

        d = self._descr
        if len(d.inputs) != 1:
            raise BioimageioModelError(
                f"the model has {len(d.inputs)} inputs; smartscope feeds one image"
            )
        inp = d.inputs[0]
        if any(i.output_of for i in d.inputs if hasattr(i, "output_of")):
            raise BioimageioModelError(
                "models chained to other models are not supported"
            )
        axes: list[tuple[str, str, Any]] = []
        for a in inp.axes:
            kind = a.type
            if kind == "channel" and a.size != 1:
                raise BioimageioModelError(
                    f"the model's input has {a.size} channels; smartscope segments "
                    "single-channel images"
                )
            if kind == "space" and str(a.id) not in ("y", "x"):
                size = a.size
                if not (
                    size == 1
                    or (isinstance(size, v0_5.ParameterizedSize) and size.min == 1)
                ):
                    raise BioimageioModelError(
                        f"the model's input has a {a.id} axis; smartscope segments "
                        "2D images"
                    )
            elif kind not in ("batch", "channel", "space"):
                raise BioimageioModelError(
                    f"the model's input has a {kind} axis {a.id}; not supported"
                )
            axes.append((str(a.id), kind, getattr(a, "size", None)))
        if {"y", "x"} - {name for name, _, _ in axes}:
            raise BioimageioModelError("the model's input has no y and x axes")
        self._axes = axes
        outs = {str(o.id): o for o in d.outputs}
        oid = self.output_tensor or str(d.outputs[0].id)
        if oid not in outs:
            raise BioimageioModelError(
                f"no output tensor {oid!r} (outputs: {', '.join(outs)})"
            )
        self._out = outs[oid]

    # -- identity ----------------------------------------------------------------
    @property
    def model_id(self) -> str:
        """``bioimageio:<id or name>-<sha256 prefix of the package>``."""
        name = str(self._descr.id or self._descr.name).replace(" ", "_")
        return f"bioimageio:{name}-{self._sha256[:12]}"

    @property
    def weights_used(self) -> str:
        """The weights format that runs (``onnx``, ``torchscript``, ...)."""
        return self._formats[0]

    @property
    def device_name(self) -> str:
        """``cuda`` for torch weights on a CUDA device, else ``cpu``."""
        return "cuda" if self._cuda() and self.weights_used != "onnx" else "cpu"

    @property
    def description(self) -> Any:
        """The loaded ``bioimageio.spec`` model description."""
        return self._descr

    # -- settings ------------------------------------------------------------------
    def _setting(self, name: str) -> Any:
        value = getattr(self, name)
        if value is None:
            value = (self._config.get("postprocess") or {}).get(name, _DEFAULTS[name])
        return value

    def _channel_names(self) -> list[str]:
        for a in self._out.axes:
            if a.type == "channel":
                return [str(c).lower() for c in a.channel_names]
        return []

    def output_kind(self, channels: int) -> OutputKind:
        """How an output of `channels` channels is read (see `output`)."""
        kind = self.output
        if kind == "auto":
            kind = self._config.get("output", "auto")
        if kind == "auto":
            names = self._channel_names()
            bound = any("bound" in n or "contour" in n for n in names)
            dist = any("dist" in n for n in names) or "dist" in str(self._out.id)
            if channels == 3 and bound:
                kind = "boundary3"
            elif channels == 2 and bound:
                kind = "fg_boundary"
            elif channels == 1 and dist:
                kind = "distance"
            elif channels in (1, 2):
                kind = "foreground"
            else:
                raise BioimageioModelError(
                    f"cannot tell what the model's {channels}-channel output means; "
                    "set output: boundary3, fg_boundary, foreground or distance"
                )
        need = {"boundary3": (3,), "fg_boundary": (2,), "distance": (1,)}
        if kind in need and channels not in need[kind]:
            raise BioimageioModelError(
                f"output {kind} needs {need[kind][0]} channel(s), the model gives "
                f"{channels}"
            )
        return kind  # type: ignore[return-value]

    # -- inference -------------------------------------------------------------------
    def _valid_size(self, size: Any, n: int) -> int:
        from bioimageio.spec.model import v0_5

        if isinstance(size, int):
            return max(size, n)  # larger images: `predict` runs it in blocks
        if isinstance(size, v0_5.ParameterizedSize):
            k = max(0, -(-(n - size.min) // size.step))
            return size.min + k * size.step
        return n

    def predict(self, images: np.ndarray) -> np.ndarray:
        """The package's output for a ``(B, Y, X)`` batch: ``(B, C, Y, X)`` float32.

        NaN and infinite pixels (the border of a registered or stitched float
        image) are read as background (`fill_non_finite`): through the
        package's normalisation and network they would spread NaN.
        """
        from bioimageio.core import Sample, Tensor
        from bioimageio.core.common import MemberId

        batch = fill_non_finite(as_batch(images)).astype(np.float32)
        self.prepare()
        b, h, w = batch.shape
        sizes = {name: size for name, _, size in self._axes}
        ph = self._valid_size(sizes["y"], h) - h
        pw = self._valid_size(sizes["x"], w) - w
        # a model of fixed input size sees a larger image in blocks of that
        # size (with the halo its outputs declare), normalised as a whole
        blocks = any(
            isinstance(sizes[a], int) and n > sizes[a] for a, n in (("y", h), ("x", w))
        )
        if ph or pw:
            batch = np.pad(batch, ((0, 0), (0, ph), (0, pw)), mode="reflect")
        ids = [name for name, _, _ in self._axes]
        batch_ids = [name for name, kind, _ in self._axes if kind == "batch"]
        step = b if batch_ids else 1
        in_id = MemberId(str(self._descr.inputs[0].id))
        out_id = MemberId(str(self._out.id))
        # output axis id → batch / channel / y / x (anything else is squeezed)
        out_role = {
            str(a.id): a.type if a.type in ("batch", "channel") else str(a.id)
            for a in self._out.axes
        }
        results = []
        for i in range(0, b, step):
            chunk = batch[i : i + step]
            # (n, y, x) → the model's axes, in its order (singletons added)
            arr = chunk if batch_ids else chunk[0]
            names = [*batch_ids, "y", "x"]
            for name in ids:
                if name not in names:
                    arr, names = arr[..., None], [*names, name]
            arr = np.transpose(arr, [names.index(name) for name in ids])
            sample = Sample(
                members={in_id: Tensor.from_numpy(arr, dims=ids)}, stat={}, id=i
            )
            with self._lock, _quiet_torchscript():
                try:
                    if blocks:
                        with _no_progress_bars(self._pipeline):
                            out = self._pipeline.predict_sample_with_blocking(sample)
                    else:
                        out = self._pipeline.predict_sample_without_blocking(sample)
                except Exception as exc:
                    raise BioimageioModelError(
                        f"the model failed on a {arr.shape} input: {first_line(exc)}"
                    ) from None
            data = out.members[out_id].data
            data = data.rename({d: out_role.get(str(d), str(d)) for d in data.dims})
            extra = [d for d in data.dims if d not in ("batch", "channel", "y", "x")]
            if any(data.sizes[d] != 1 for d in extra):
                raise BioimageioModelError(
                    f"model output axes {tuple(data.dims)}: smartscope reads "
                    "(batch, channel, y, x) per-pixel maps"
                )
            data = data.squeeze(extra) if extra else data
            dims = [str(d) for d in data.dims]
            arr_out = data.values.astype(np.float32)
            if "channel" not in dims:
                arr_out, dims = arr_out[..., None], [*dims, "channel"]
            if "batch" not in dims:
                arr_out, dims = arr_out[None], ["batch", *dims]
            arr_out = np.transpose(
                arr_out, [dims.index(d) for d in ("batch", "channel", "y", "x")]
            )
            results.append(arr_out)
        out = np.concatenate(results)
        if out.shape[-2:] != batch.shape[-2:]:
            raise BioimageioModelError(
                f"model output {out.shape} is not a per-pixel map of the input "
                f"{batch.shape}"
            )
        return out[:, :, :h, :w]

    def segment(self, images: np.ndarray) -> Segmentation:
        """Segment a ``(B, Y, X)`` batch (or one ``(Y, X)`` image)."""
        from smartscope.segment import foreground_to_labels
        from smartscope.segment._postprocess import (
            probabilities_to_labels,
            reread_large,
        )

        batch = as_batch(images)
        out = self.predict(batch)
        kind = self.output_kind(out.shape[1])
        fg_t = float(self._setting("fg_threshold"))
        seed_t = float(self._setting("seed_threshold"))
        min_area = int(self._setting("min_area_px"))
        if kind != "distance":
            out = _as_probabilities(out)
        labels = np.zeros((out.shape[0], *out.shape[2:]), np.uint16)
        scores = []
        reread = float(self._setting("reread_ratio") or 0)
        post = {
            "fg_threshold": fg_t,
            "seed_threshold": seed_t,
            "min_area_px": min_area,
            "fragment_fraction": float(self._setting("fragment_fraction")),
        }
        for i, p in enumerate(out):
            if kind in ("boundary3", "fg_boundary"):
                probs = self._three_classes(p, kind)
                labels[i], s = probabilities_to_labels(probs, **post)
                if reread > 1:
                    labels[i], s = reread_large(
                        batch[i],
                        probs,
                        labels[i],
                        s,
                        lambda crops: self._class_probabilities(crops, kind),
                        ratio=reread,
                        **post,
                    )
            elif kind == "distance":
                labels[i], s = foreground_to_labels(
                    p[0],
                    threshold=fg_t,
                    min_area_px=min_area,
                    split_touching=True,
                    min_distance_px=self.min_distance_px,
                    height=p[0],
                )
            else:
                fg = p[0] if p.shape[0] == 1 else 1 - p[0]
                labels[i], s = foreground_to_labels(
                    fg,
                    threshold=fg_t,
                    min_area_px=min_area,
                    split_touching=self.split_touching,
                    min_distance_px=self.min_distance_px,
                )
            scores.append(s)
        return Segmentation(labels, scores)

    def _class_probabilities(self, crops: np.ndarray, kind: str) -> list[np.ndarray]:
        """``(3, Y, X)`` class probabilities of each of a batch of raw crops."""
        return [
            self._three_classes(p, kind) for p in _as_probabilities(self.predict(crops))
        ]

    def _three_classes(self, p: np.ndarray, kind: str) -> np.ndarray:
        """``(3, Y, X)`` background/interior/boundary from the model's channels."""
        names = self._channel_names()

        def index(*keys: str, default: int) -> int:
            for k, n in enumerate(names):
                if any(key in n for key in keys):
                    return k
            return default

        if kind == "boundary3":
            order = [
                index("background", "bg", default=0),
                index("interior", "foreground", "fg", "inside", default=1),
                index("bound", "contour", default=2),
            ]
            if sorted(order) != [0, 1, 2]:
                order = [0, 1, 2]
            return p[order]
        b = index("bound", "contour", default=1)
        fg, bd = p[1 - b], p[b]
        return np.stack([1 - fg, fg * (1 - bd), fg * bd])


def _as_probabilities(out: np.ndarray) -> np.ndarray:
    """Logits become probabilities; probabilities are kept."""
    if out.min() >= 0 and out.max() <= 1:
        return out
    return _softmax(out) if out.shape[1] > 1 else 1 / (1 + np.exp(-out))


def _digest(source: Path) -> str:
    """sha256 of a zip package, or of the description file of a folder."""
    digest = hashlib.sha256()
    with open(source, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
