"""Run output: per-position OME-Zarr images and labels, JSONL logs, run.json.

Layout of a run directory::

    images/<position>.ome.zarr    every acquired frame, one array per position,
                                  dims (t, c, z, y, x); t = visit of the position
    labels/<position>.ome.zarr    instance labels of the analysed frames, same
                                  layout (frames not analysed stay 0)
    frames.jsonl                  one line per acquired frame: index, position,
                                  (t, c, z) in its array, stage x/y/z, channel,
                                  exposure, pixel size, acquisition time, trigger
                                  decision, the MDAEvent
    detections.jsonl              one line per analysed frame: objects table,
                                  latencies, dropped frames are listed with
                                  ``"dropped": true``
    decisions.jsonl               one line per policy decision (see `Runner`)
    run.json                      resolved experiment, versions, seeds, counts,
                                  status ("running", "completed", "interrupted",
                                  "failed")

Chunks are compressed losslessly (``output.compression``, blosc-zstd by default).

Adaptive runs acquire an unknown number of events, so each position gets its own
array whose first (time/visit) axis grows; nothing is flattened into one
ambiguous axis. Frames are written as they arrive (one chunk per frame, on a
writer thread so acquisition never waits for the disk), so a run that fails or
is cancelled midway leaves every acquired frame readable.
"""

from __future__ import annotations

import json
import queue
import threading
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from smartscope.frame import event_tag
from smartscope.rundir._records import JsonLines, jsonable

if TYPE_CHECKING:
    from ome_writers import OMEStream

    from smartscope.frame import Frame

__all__ = ["PositionArrays", "RunStorage", "open_position", "read_position"]

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
    root : Path
        Folder of the ``<position>.ome.zarr`` arrays.
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
        root: Path,
        *,
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
        self.root = root
        self.pixel_size_um = pixel_size_um
        self.max_open = max_open
        # open arrays, least recently written first
        self._streams: OrderedDict[str, OMEStream] = OrderedDict()
        self._written: dict[str, int] = {}  # frames (incl. skipped), open arrays
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
        if stream is None and self._array_path(key).exists():
            self._overflow(key, image, t, c, z)  # closed: complete on disk
        else:
            if stream is None:
                if self.max_open is not None:
                    while len(self._streams) >= self.max_open:
                        self.finish(next(iter(self._streams)))
                ps = event_meta.get("pixel_size_um") or self.pixel_size_um
                stream = self._streams[key] = self._create(
                    key, image, nc, nz, order, float(ps)
                )
                self._written[key] = 0
                self.n_positions += 1
            else:
                self._streams.move_to_end(key)
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
        if stream is None:
            return False
        stream.close()
        return True

    @property
    def n_open(self) -> int:
        """Arrays open for appending."""
        return len(self._streams)

    def _array_path(self, key: str) -> Path:
        return self.root / f"{key}.ome.zarr"

    def _create(
        self,
        key: str,
        image: np.ndarray,
        nc: int,
        nz: int,
        order: str,
        pixel_size_um: float,
    ) -> OMEStream:
        from ome_writers import AcquisitionSettings, Dimension, create_stream

        height, width = image.shape[-2:]
        inner = {
            "c": Dimension(name="c", count=nc, chunk_size=1, type="channel"),
            "z": Dimension(name="z", count=nz, chunk_size=1, type="space"),
        }
        dims = [
            Dimension(name="t", count=None, chunk_size=1, type="time"),
            inner[order[0]],
            inner[order[1]],
            Dimension(
                name="y",
                count=height,
                chunk_size=height,
                type="space",
                scale=pixel_size_um,
                unit="micrometer",
            ),
            Dimension(
                name="x",
                count=width,
                chunk_size=width,
                type="space",
                scale=pixel_size_um,
                unit="micrometer",
            ),
        ]
        self.root.mkdir(parents=True, exist_ok=True)
        settings = AcquisitionSettings(
            root_path=str(self._array_path(key)),
            dimensions=dims,
            dtype=str(image.dtype),
            format="ome-zarr",
            compression=self.compression,
            overwrite=True,
        )
        return create_stream(settings)

    def _overflow(self, key: str, image: np.ndarray, t: int, c: int, z: int) -> None:
        import tifffile

        folder = self.root.parent / "overflow"
        folder.mkdir(exist_ok=True)
        tifffile.imwrite(folder / f"{key}_t{t}_c{c}_z{z}_{self.n_frames}.tif", image)
        self.n_overflow += 1

    @property
    def positions(self) -> list[str]:
        """Keys of the positions with an array on disk (sorted)."""
        if not self.root.is_dir():
            return []
        return sorted(p.name[: -len(".ome.zarr")] for p in self.root.glob("*.ome.zarr"))

    def close(self) -> None:
        """Finalize every array (metadata, shapes)."""
        for stream in self._streams.values():
            try:
                stream.close()
            except Exception:  # pragma: no cover - keep closing the others
                pass
        self._streams.clear()
        self._written.clear()


class RunStorage:
    """Everything a run writes, in one directory (see the module docstring)."""

    def __init__(
        self,
        directory: str | Path,
        *,
        pixel_size_um: float = 1.0,
        max_open_arrays: int | None = None,
        compression: Compression = "blosc-zstd",
    ) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.images = PositionArrays(
            self.directory / "images",
            pixel_size_um=pixel_size_um,
            max_open=max_open_arrays,
            compression=compression,
        )
        self.labels = PositionArrays(
            self.directory / "labels",
            pixel_size_um=pixel_size_um,
            max_open=max_open_arrays,
            compression=compression,
        )
        self._frames = JsonLines(self.directory / "frames.jsonl")
        self._detections = JsonLines(self.directory / "detections.jsonl")
        self._decisions = JsonLines(self.directory / "decisions.jsonl")
        self._closed = False
        self._pending: queue.SimpleQueue[tuple[np.ndarray, Frame] | str | None] = (
            queue.SimpleQueue()
        )
        self._writer: threading.Thread | None = None
        self.write_errors: list[str] = []

    # acquisition thread
    def submit_frame(self, image: np.ndarray, frame: Frame) -> None:
        """Hand an acquired frame to the writer thread; never waits, never drops.

        Growing an OME-Zarr array takes milliseconds, so frames are written on
        a dedicated thread in arrival order; `close` drains the queue.
        """
        self._start_writer()
        self._pending.put((image, frame))

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
        while (item := self._pending.get()) is not None:
            try:
                if isinstance(item, str):
                    self.images.finish(item)
                else:
                    self.write_frame(*item)
            except Exception as e:  # keep writing the others; report at close
                self.write_errors.append(f"{type(e).__name__}: {e}")

    def write_frame(self, image: np.ndarray, frame: Frame) -> None:
        """Store an acquired frame and its index line (synchronously)."""
        index = self.images.write(image, _where(frame))
        record = frame.to_json()
        record["array"] = {"position": frame.position, **index}
        self._frames.write(record)

    # worker thread
    def write_labels(self, labels: np.ndarray, frame: Frame) -> None:
        """Store the instance labels of an analysed frame."""
        self.labels.write(labels.astype(np.uint16, copy=False), _where(frame))

    def log_detections(self, record: dict[str, Any]) -> None:
        """Append one analysed (or dropped) frame to ``detections.jsonl``."""
        self._detections.write(record)

    def log_decision(self, record: dict[str, Any]) -> None:
        """Append one decision to ``decisions.jsonl``."""
        self._decisions.write(record)

    def write_run_json(self, info: dict[str, Any]) -> None:
        """(Re)write ``run.json`` atomically."""
        path = self.directory / "run.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(info, indent=2, default=jsonable) + "\n")
        tmp.replace(path)

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


def _where(frame: Frame) -> dict[str, Any]:
    """Where a frame goes (the Scheduler's tag) and the pixel size of its array."""
    return {**event_tag(frame.event), "pixel_size_um": frame.pixel_size_um}


def open_position(run_dir: str | Path, position: str, *, labels: bool = False) -> Any:
    """Open one position's ``(t, c, z, y, x)`` array (a tensorstore, read lazily).

    Raises
    ------
    FileNotFoundError
        If the run has no such array.
    """
    import tensorstore as ts

    folder = "labels" if labels else "images"
    path = Path(run_dir) / folder / f"{position}.ome.zarr" / "0"
    if not path.exists():
        raise FileNotFoundError(f"no {folder} array for position {position!r}")
    return ts.open(
        {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}}
    ).result()


def read_position(
    run_dir: str | Path, position: str, *, labels: bool = False
) -> np.ndarray:
    """Read one position's ``(t, c, z, y, x)`` array from a run directory."""
    store = open_position(run_dir, position, labels=labels)
    return np.asarray(store.read().result())
