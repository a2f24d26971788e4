"""Run output: one OME-Zarr hierarchy of images and labels, JSONL logs, run.json.

Layout of a run directory::

    run.ome.zarr/                 every acquired frame: one multiscale image per
                                  position (dims t, c, z, y, x; t = visit of the
                                  position) placed at its stage position, with
                                  its instance labels as NGFF labels; plate runs
                                  as an NGFF plate (see `smartscope.rundir._layout`)
    frames.jsonl                  one line per acquired frame: index, position,
                                  its place in the hierarchy (path, t, c, z),
                                  stage x/y/z, channel, exposure, pixel size,
                                  acquisition time, trigger decision, the MDAEvent
    detections.jsonl              one line per analysed frame: objects table,
                                  latencies; frames the analysis skipped are
                                  listed with the reason (``"skipped"``)
    decisions.jsonl               one line per policy decision (see `Runner`)
    run.json                      resolved experiment, versions, seeds, counts,
                                  status ("running", "completed", "interrupted",
                                  "failed")

Chunks are compressed losslessly (``output.compression``, blosc-zstd by default).

Adaptive runs acquire an unknown number of events, so each position gets its own
image whose first (time/visit) axis grows; nothing is flattened into one
ambiguous axis. Frames, labels and the detections lines are written as they
arrive, in that order, on one writer thread (acquisition never waits for the
disk), so a run that fails or is cancelled midway leaves every acquired frame
readable and the hierarchy valid.

Runs written before smartscope 0.5 keep ``images/<position>.ome.zarr`` and
``labels/<position>.ome.zarr``; the readers here open both layouts.
"""

from __future__ import annotations

import contextlib
import json
import queue
import threading
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from smartscope._threads import lower_thread_priority
from smartscope.frame import event_tag
from smartscope.rundir._layout import (
    LABELS_NAME,
    Hierarchy,
    PlateGeometry,
    position_path,
    read_attrs,
)
from smartscope.rundir._records import JsonLines, jsonable

if TYPE_CHECKING:
    from ome_writers import OMEStream

    from smartscope.frame import Frame

__all__ = [
    "PositionArrays",
    "RunStorage",
    "channel_color",
    "open_position",
    "position_attrs",
    "position_path",
    "read_position",
]

#: How much lower the writer thread's OS priority is than acquisition's.
WRITER_NICE = 5

#: Lossless compressions of the arrays' chunks (ome-writers' names for zarr).
COMPRESSIONS = ("blosc-zstd", "blosc-lz4", "zstd", "none")
Compression = Literal["blosc-zstd", "blosc-lz4", "zstd", "none"]


class PositionArrays:
    """One growing OME-Zarr array per position, written in acquisition order.

    Each frame lands at ``(visit, c, z)`` of its position's array (the
    Scheduler's ``metadata["smartscope"]`` says where). Frames that arrive out
    of order for their array (never in normal runs) are kept as TIFF files under
    ``overflow/`` rather than lost.

    A position's array stays open for appending until `finish` closes it, or,
    with `max_open`, until more than `max_open` arrays are open and it is the
    one written least recently: a plate of thousands of fields then holds a
    few open arrays, not one per field. An array once closed is complete on
    disk with its shape; a frame that comes for it later (or for an array
    already on disk that this writer did not open) goes to ``overflow/``: no
    frame is lost and nothing is overwritten.

    Parameters
    ----------
    hierarchy : Hierarchy
        The run's ``run.ome.zarr``: where each position's image (or labels)
        goes, and the metadata above it.
    labels : str, optional
        Write label images of this name (``<image>/labels/<labels>``) instead
        of the images.
    pixel_size_um : float
        Pixel size written in the arrays' metadata, unless a frame's
        ``event_meta["pixel_size_um"]`` gives its array's (another objective).
    max_open : int, optional
        Most arrays kept open at once (None: no limit). Leave it None for
        plans that come back to a position (time-lapses over many positions).
    compression : str
        Lossless chunk compression (`COMPRESSIONS`); ``"none"`` writes raw
        chunks.
    """

    def __init__(
        self,
        hierarchy: Hierarchy,
        *,
        labels: str | None = None,
        pixel_size_um: float = 1.0,
        max_open: int | None = None,
        compression: Compression = "blosc-zstd",
    ) -> None:
        if compression not in COMPRESSIONS:
            raise ValueError(
                f"unknown compression {compression!r}: one of {', '.join(COMPRESSIONS)}"
            )
        self.compression = compression
        if max_open is not None and max_open < 1:
            raise ValueError(f"max_open must be at least 1: {max_open}")
        self.hierarchy = hierarchy
        self.labels_name = labels
        self.pixel_size_um = pixel_size_um
        self.max_open = max_open
        # open arrays, least recently written first
        self._streams: OrderedDict[str, OMEStream] = OrderedDict()
        self._written: dict[str, int] = {}  # frames (incl. skipped), open arrays
        self._meta: dict[str, _ImageMeta] = {}  # open arrays' scales, channels
        self.n_frames = 0
        self.n_positions = 0  # arrays created
        self.n_overflow = 0  # frames kept under overflow/

    def write(self, image: np.ndarray, event_meta: dict[str, Any]) -> dict[str, int]:
        """Write one frame; return its ``{"t", "c", "z"}`` index in its array."""
        key = str(event_meta["position"])
        shape = event_meta.get("shape") or {"c": 1, "z": 1, "order": "cz"}
        nc, nz = int(shape.get("c", 1)), int(shape.get("z", 1))
        t, c, z = (int(event_meta.get(k, 0)) for k in ("visit", "c", "z"))
        order = shape.get("order", "cz")
        inner = c * nz + z if order == "cz" else z * nc + c
        linear = t * nc * nz + inner
        stream = self._streams.get(key)
        if stream is None and (self._array_path(key) / "0").exists():
            self._overflow(key, image, t, c, z)  # closed: complete on disk
        else:
            if stream is None:
                if self.max_open is not None:
                    while len(self._streams) >= self.max_open:
                        self.finish(next(iter(self._streams)))
                meta = _ImageMeta.first(event_meta, nc, nz, self.pixel_size_um)
                stream = self._streams[key] = self._create(
                    key, image, nc, nz, order, meta
                )
                self._meta[key] = meta
                self._written[key] = 0
                self.n_positions += 1
                if self.labels_name is None:
                    self.hierarchy.add_image(
                        key, kind=meta.kind, stage_um=meta.stage_um
                    )
                else:
                    self.hierarchy.add_labels(key, self.labels_name)
            else:
                self._streams.move_to_end(key)
                if self._meta[key].learn(event_meta, t, c, z):
                    self._write_meta(key, stream, self._meta[key])
            written = self._written[key]
            if linear < written:
                self._overflow(key, image, t, c, z)
            else:
                if linear > written:
                    stream.skip(frames=linear - written)
                stream.append(np.asarray(image))
                self._written[key] = linear + 1
        self.n_frames += 1
        return {"t": t, "c": c, "z": z}

    def finish(self, key: str) -> bool:
        """Close `key`'s array (complete on disk); False if it was not open.

        Later frames of the position go to ``overflow/``.
        """
        stream = self._streams.pop(key, None)
        self._written.pop(key, None)
        self._meta.pop(key, None)
        if stream is None:
            return False
        stream.close()
        return True

    @property
    def n_open(self) -> int:
        """Arrays open for appending."""
        return len(self._streams)

    def is_open(self, key: str) -> bool:
        """Whether position `key`'s array is open for appending."""
        return key in self._streams

    def _array_path(self, key: str) -> Path:
        if self.labels_name is None:
            return self.hierarchy.image_dir(key)
        return self.hierarchy.labels_dir(key, self.labels_name)

    def _create(
        self,
        key: str,
        image: np.ndarray,
        nc: int,
        nz: int,
        order: str,
        meta: _ImageMeta,
    ) -> OMEStream:
        from ome_writers import (
            AcquisitionSettings,
            Channel,
            Dimension,
            OmeZarrFormat,
            create_stream,
        )

        height, width = image.shape[-2:]
        ps = meta.pixel_size_um
        inner = {
            "c": Dimension(
                name="c",
                count=nc,
                chunk_size=1,
                type="channel",
                coords=[
                    Channel(name=name, color=channel_color(name))
                    for name in meta.channel_names()
                ],
            ),
            "z": Dimension(
                name="z",
                count=nz,
                chunk_size=1,
                type="space",
                unit="micrometer",
                scale=meta.z_step_um,
                translation=meta.z0_um,
            ),
        }
        dims = [
            Dimension(
                name="t",
                count=None,
                chunk_size=1,
                type="time",
                unit="second",
                scale=meta.interval_s,
            ),
            inner[order[0]],
            inner[order[1]],
            Dimension(
                name="y",
                count=height,
                chunk_size=height,
                type="space",
                scale=ps,
                translation=meta.origin_um[1],
                unit="micrometer",
            ),
            Dimension(
                name="x",
                count=width,
                chunk_size=width,
                type="space",
                scale=ps,
                translation=meta.origin_um[0],
                unit="micrometer",
            ),
        ]
        path = self._array_path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        settings = AcquisitionSettings(
            root_path=str(path),
            dimensions=dims,
            dtype=str(image.dtype),
            format=OmeZarrFormat(suffix=""),
            compression=self.compression,
            overwrite=True,
        )
        stream = create_stream(settings)
        try:
            self._write_meta(key, stream, meta)
        except BaseException:
            # closed here, not by its finalizer at exit (a full disk would
            # then print a traceback after the run's one error line)
            with contextlib.suppress(Exception):
                stream.close()
            raise
        return stream

    def _write_meta(self, key: str, stream: OMEStream, meta: _ImageMeta) -> None:
        """Name the image after its position; scales and channels as now known."""
        attrs = stream.get_metadata()
        for group in attrs.values():
            ome = group.setdefault("ome", {})
            for ms in ome.get("multiscales") or []:
                ms["name"] = key
                for ds in ms.get("datasets") or []:
                    for t in ds.get("coordinateTransformations") or []:
                        if t.get("type") == "scale":
                            t["scale"][0] = meta.interval_s
                            t["scale"][meta.z_axis] = meta.z_step_um
                        elif t.get("type") == "translation":
                            t["translation"][meta.z_axis] = meta.z0_um
            if self.labels_name is not None:
                ome.pop("omero", None)
                ome["image-label"] = {"version": "0.5", "source": {"image": "../../"}}
            elif "omero" in ome:
                names = meta.channel_names()
                for k, ch in enumerate(ome["omero"].get("channels") or []):
                    if k < len(names):
                        ch["label"] = names[k]
                        ch["color"] = channel_color(names[k])
                    if meta.window is not None:
                        lo, hi = meta.window
                        ch["window"] = {**ch.get("window", {}), "start": lo, "end": hi}
        stream.update_metadata(attrs)

    def _overflow(self, key: str, image: np.ndarray, t: int, c: int, z: int) -> None:
        import tifffile

        folder = self.hierarchy.root.parent / "overflow"
        folder.mkdir(exist_ok=True)
        tifffile.imwrite(folder / f"{key}_t{t}_c{c}_z{z}_{self.n_frames}.tif", image)
        self.n_overflow += 1

    @property
    def positions(self) -> list[str]:
        """Keys of the positions with an image in the hierarchy (sorted)."""
        return sorted(self.hierarchy.keys())

    def close(self) -> None:
        """Finalize every array (metadata, shapes)."""
        for stream in self._streams.values():
            try:
                stream.close()
            except Exception:  # pragma: no cover - keep closing the others
                pass
        self._streams.clear()
        self._written.clear()
        self._meta.clear()


#: Display colours of common channel presets (omero ``color``, RRGGBB).
_COLORS = (
    (("dapi", "hoechst", "blue", "bfp"), "0000FF"),
    (("fitc", "gfp", "green", "alexa488", "yfp"), "00FF00"),
    (("cy3", "tritc", "rfp", "mcherry", "red", "alexa568", "dsred"), "FF0000"),
    (("cy5", "far", "alexa647"), "FF00FF"),
)


def channel_color(name: str) -> str:
    """A display colour for a channel preset name (white when unknown)."""
    low = name.lower()
    for words, color in _COLORS:
        if any(w in low for w in words):
            return color
    return "FFFFFF"


class _ImageMeta:
    """What an image's metadata says of its position, learnt as frames come.

    Set from its first frame: pixel size (of its objective), stage origin of
    its top-left pixel, first Z, channel, kind. Learnt later: the Z step (from
    the first frame above plane 0), the time interval (the Scheduler's, else
    from the first frame of the second visit), other channels' names.
    """

    def __init__(self) -> None:
        self.pixel_size_um = 1.0
        self.origin_um: tuple[float, float] = (0.0, 0.0)
        self.stage_um: tuple[float, float] | None = None
        self.z0_um = 0.0
        self.z_step_um = 1.0
        self.z_axis = 2
        self.interval_s = 1.0
        self.kind = "base"
        self.channels: dict[int, str] = {}
        self.nc = 1
        self.window: tuple[float, float] | None = None
        self._t0: float | None = None
        self._interval_known = False
        self._step_known = False

    @classmethod
    def first(
        cls, meta: dict[str, Any], nc: int, nz: int, pixel_size_um: float
    ) -> _ImageMeta:
        self = cls()
        self.nc = nc
        self.pixel_size_um = float(meta.get("pixel_size_um") or pixel_size_um)
        order = (meta.get("shape") or {}).get("order", "cz")
        self.z_axis = 2 if order == "cz" else 1
        stage = meta.get("stage_um")
        if stage is not None:
            self.stage_um = (float(stage[0]), float(stage[1]))
            if stage[2] is not None and int(meta.get("z", 0)) == 0:
                self.z0_um = float(stage[2])
        origin = meta.get("origin_um")
        if origin is not None:
            self.origin_um = (float(origin[0]), float(origin[1]))
        elif self.stage_um is not None:
            self.origin_um = self.stage_um
        if meta.get("interval_s"):
            self.interval_s = float(meta["interval_s"])
            self._interval_known = True
        self.kind = str(meta.get("kind", "base"))
        self._t0 = meta.get("t_clock")
        if meta.get("channel"):
            self.channels[int(meta.get("c", 0))] = str(meta["channel"])
        self.window = meta.get("window")
        return self

    def channel_names(self) -> list[str]:
        return [self.channels.get(k, f"channel {k}") for k in range(self.nc)]

    def learn(self, meta: dict[str, Any], t: int, c: int, z: int) -> bool:
        """Take in one more frame; True if the metadata changed."""
        changed = False
        name = meta.get("channel")
        if name and self.channels.get(c) != name and c not in self.channels:
            self.channels[c] = str(name)
            changed = True
        stage = meta.get("stage_um")
        if (
            not self._step_known
            and t == 0
            and z > 0
            and stage is not None
            and stage[2] is not None
        ):
            step = (float(stage[2]) - self.z0_um) / z
            if step > 0:
                self.z_step_um = round(step, 6)
                self._step_known = changed = True
        t_clock = meta.get("t_clock")
        if (
            not self._interval_known
            and t == 1
            and c == 0
            and z == 0
            and t_clock is not None
            and self._t0 is not None
        ):
            dt = float(t_clock) - float(self._t0)
            if dt > 0:
                self.interval_s = round(dt, 6)
                self._interval_known = changed = True
        return changed


#: compressions whose writing path this process has loaded (`warm_up_writer`)
_WARM: set[str] = set()


def warm_up_writer(compression: Compression = "blosc-zstd") -> float:
    """Write a throwaway image and labels so the OME-Zarr backend is loaded.

    The first array a process creates imports the writing backend
    (tensorstore and its extension modules: about 1.3 s on this project's
    host) while holding the interpreter lock: on the run's first frame
    acquisition and analysis would both stall that long. A `Runner` calls
    this while it sets up, before the run clock starts; once per process and
    compression. Returns the seconds it took (0 when already done).
    """
    import tempfile
    import time

    if compression in _WARM:
        return 0.0
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="smartscope-warm-up-") as tmp:
        hierarchy = Hierarchy.create(Path(tmp), None)
        image = np.zeros((16, 16), np.uint16)
        for labels in (None, LABELS_NAME):
            arrays = PositionArrays(hierarchy, labels=labels, compression=compression)
            arrays.write(image, {"position": "warm-up"})
            arrays.close()
    _WARM.add(compression)
    return time.perf_counter() - t0


class RunStorage:
    """Everything a run writes, in one directory (see the module docstring).

    Parameters
    ----------
    directory : str | Path
        The run directory.
    pixel_size_um : float
        The run's pixel size (frames may carry their own: another objective).
    max_open_arrays : int, optional
        Most image (and label) arrays kept open for appending.
    compression : str
        Lossless chunk compression.
    plate : PlateGeometry, optional
        Write the run as an NGFF plate of this geometry.
    to_stage : callable, optional
        ``to_stage(px_xy, stage_xy, pixel_size_um) -> stage µm`` (the
        microscope's calibration): where a frame's top-left pixel is on the
        stage (its image's translation). Without it, the stage position.
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        pixel_size_um: float = 1.0,
        max_open_arrays: int | None = None,
        compression: Compression = "blosc-zstd",
        plate: PlateGeometry | None = None,
        to_stage: Any = None,
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.hierarchy = Hierarchy.create(self.directory, plate)
        self._to_stage = to_stage
        self.images = PositionArrays(
            self.hierarchy,
            pixel_size_um=pixel_size_um,
            max_open=max_open_arrays,
            compression=compression,
        )
        self.labels = PositionArrays(
            self.hierarchy,
            labels=LABELS_NAME,
            pixel_size_um=pixel_size_um,
            max_open=max_open_arrays,
            compression=compression,
        )
        self._frames = JsonLines(self.directory / "frames.jsonl")
        self._detections = JsonLines(self.directory / "detections.jsonl")
        self._decisions = JsonLines(self.directory / "decisions.jsonl")
        self._closed = False
        self._pending: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self.write_errors: list[str] = []

    # acquisition thread
    def submit_frame(self, image: np.ndarray, frame: Frame) -> None:
        """Hand an acquired frame to the writer thread; never waits, never drops.

        Growing an OME-Zarr array takes milliseconds, so frames are written on
        a dedicated thread in arrival order; `close` drains the queue.
        """
        self._submit(self.write_frame, image, frame)

    def finish_position(self, position: str) -> None:
        """No more frames will come for `position`: close its image array.

        Queued behind the frames already submitted, so they are written first.
        Its labels array is left to `max_open_arrays` (analysis may still be
        labelling its frames).
        """
        self._start_writer()
        self._pending.put(position)

    def _start_writer(self) -> None:
        if self._writer is None:
            self._writer = threading.Thread(
                target=self._write_loop, name="smartscope-writer", daemon=True
            )
            self._writer.start()

    def _write_loop(self) -> None:
        # compressing and writing yield the CPU to acquisition on a busy machine
        lower_thread_priority(WRITER_NICE)
        while (item := self._pending.get()) is not None:
            try:
                if isinstance(item, str):
                    self.images.finish(item)
                else:
                    item[0](*item[1:])
            except Exception as e:  # keep writing the others; report at close
                self.write_errors.append(f"{type(e).__name__}: {e}")

    def _submit(self, *call: Any) -> None:
        self._start_writer()
        self._pending.put(call)

    def write_frame(self, image: np.ndarray, frame: Frame) -> None:
        """Store an acquired frame and its index line (synchronously)."""
        index = self.images.write(image, self._where(frame, self.images, image))
        record = frame.to_json()
        record["array"] = {
            "position": frame.position,
            "path": self.hierarchy.path_of(frame.position),
            **index,
        }
        self._frames.write(record)

    # worker thread
    def write_labels(self, labels: np.ndarray, frame: Frame) -> None:
        """Store the instance labels of an analysed frame (after its image).

        Queued behind the frame on the writer thread: the labels of a position
        are written into its image, which then exists.
        """
        self._submit(self._write_labels, labels.astype(np.uint16, copy=False), frame)

    def _write_labels(self, labels: np.ndarray, frame: Frame) -> None:
        self.labels.write(labels, self._where(frame, self.labels, None))

    def log_detections(self, record: dict[str, Any]) -> None:
        """Append one analysed (or skipped) frame to ``detections.jsonl``.

        Queued behind the frame's labels: a logged frame has its labels on disk.
        """
        self._submit(self._detections.write, record)

    def log_decision(self, record: dict[str, Any]) -> None:
        """Append one decision to ``decisions.jsonl``."""
        self._decisions.write(record)

    def write_run_json(self, info: dict[str, Any]) -> None:
        """(Re)write ``run.json`` atomically."""
        path = self.directory / "run.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(info, indent=2, default=jsonable) + "\n")
        tmp.replace(path)

    def _where(
        self, frame: Frame, arrays: PositionArrays, image: np.ndarray | None
    ) -> dict[str, Any]:
        """Where a frame goes (the Scheduler's tag) and what its image says of it.

        Its array's placement (stage origin) and display window are worked out
        only for the frame that creates the array.
        """
        meta = {
            **event_tag(frame.event),
            "pixel_size_um": frame.pixel_size_um,
            "stage_um": (frame.stage_x_um, frame.stage_y_um, frame.stage_z_um),
            "channel": frame.channel,
            "t_clock": frame.t_clock,
        }
        if arrays.is_open(frame.position):
            return meta
        ps = frame.pixel_size_um or self.images.pixel_size_um
        if self._to_stage is not None:
            roi = frame.event.roi
            corner = (roi.offset_x, roi.offset_y) if roi is not None else (0, 0)
            try:
                x, y = self._to_stage(np.asarray(corner, float), frame.stage_xy_um, ps)
                meta["origin_um"] = (float(x), float(y))
            except Exception:  # metadata only: the stage position then
                pass
        if image is not None and image.size:
            lo, hi = np.percentile(image[::4, ::4], (0.1, 99.9))
            meta["window"] = (float(lo), float(max(hi, lo + 1)))
        return meta

    def close(self) -> None:
        """Flush and close every array and log. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._writer is not None:
            self._pending.put(None)
            self._writer.join()
        self.images.close()
        self.labels.close()
        for log in (self._frames, self._detections, self._decisions):
            log.close()


def open_position(run_dir: str | Path, position: str, *, labels: bool = False) -> Any:
    """Open one position's ``(t, c, z, y, x)`` array (a tensorstore, read lazily).

    Raises
    ------
    FileNotFoundError
        If the run has no such array.
    """
    import tensorstore as ts

    path = position_path(run_dir, position, labels=labels) / "0"
    if not path.exists():
        kind = "labels" if labels else "image"
        raise FileNotFoundError(f"no {kind} array for position {position!r}")
    return ts.open(
        {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}}
    ).result()


def read_position(
    run_dir: str | Path, position: str, *, labels: bool = False
) -> np.ndarray:
    """Read one position's ``(t, c, z, y, x)`` array from a run directory."""
    store = open_position(run_dir, position, labels=labels)
    return np.asarray(store.read().result())


def position_attrs(run_dir: str | Path, position: str) -> dict[str, Any]:
    """The ``ome`` attributes of a position's image (multiscales, omero)."""
    return read_attrs(position_path(run_dir, position)).get("ome") or {}
