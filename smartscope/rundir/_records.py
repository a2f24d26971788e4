"""The records of a run directory: JSON-lines logs, ``run.json``, one reader.

A run directory holds::

    run.json          the resolved experiment, versions, status, summary
    experiment.yaml   the experiment as given
    frames.jsonl      one line per acquired frame (`Frame.to_json`)
    detections.jsonl  one line per analysed frame (objects table) or error
    decisions.jsonl   one line per policy decision, approval or refusal
    run.ome.zarr/     the images and labels (see `smartscope.rundir._layout`)

`load_run` is the one reader every tool (report, resume, reanalyze, bench)
uses; `RunRecords.counts` the one way to count a run from its logs.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from smartscope._errors import SmartscopeError
from smartscope.rundir._layout import PARTIAL, array_names, position_path

__all__ = [
    "JsonLines",
    "NotARunError",
    "RunRecords",
    "dumps",
    "is_primary",
    "load_run",
    "read_jsonl",
]

RUN_JSON = "run.json"
FRAMES = "frames.jsonl"
DETECTIONS = "detections.jsonl"
DECISIONS = "decisions.jsonl"
LOGS = (FRAMES, DETECTIONS, DECISIONS)


def jsonable(obj: Any) -> Any:
    """`obj` as a JSON value: numpy scalars and arrays, paths."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def dumps(obj: Any) -> str:
    """Compact JSON (numpy-aware, NaN/inf as null-safe strings are avoided)."""
    return json.dumps(obj, default=jsonable, separators=(",", ":"))


class JsonLines:
    """Append-only JSON-lines file, flushed per line so a crash loses nothing."""

    def __init__(self, path: Path) -> None:
        self._fh: IO[str] = path.open("a", encoding="utf-8")
        self._lock = threading.Lock()

    def write(self, record: dict[str, Any]) -> None:
        line = dumps(record) + "\n"
        with self._lock:
            if not self._fh.closed:
                self._fh.write(line)
                self._fh.flush()

    def close(self) -> None:
        with self._lock:
            self._fh.close()


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSON-lines log; a truncated last line (crash) is ignored."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def is_primary(record: dict[str, Any]) -> bool:
    """A policy's decision line (not an operator's approval line)."""
    return record.get("decision_id") is not None and "approval" not in record


class NotARunError(SmartscopeError):
    """A directory holds no run (neither ``run.json`` nor ``frames.jsonl``)."""


@dataclass
class RunRecords:
    """What a run directory holds, read back (missing parts are empty).

    ``detections`` are the analysed frames of ``detections.jsonl``; frames
    the analysis skipped for fresher ones are in ``skipped`` (their lines name
    the reason), analysis errors logged there in ``analysis_errors``. ``notes`` says
    which parts are missing or unreadable.
    """

    directory: Path
    info: dict[str, Any]
    frames: list[dict[str, Any]]
    detections: list[dict[str, Any]]
    decisions: list[dict[str, Any]]
    analysis_errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)

    @property
    def summary(self) -> dict[str, Any]:
        """``run.json["summary"]`` (empty while the run was never finished)."""
        return self.info.get("summary") or {}

    @property
    def frame_kinds(self) -> dict[int, str]:
        """Kind of each frame (``"base"``, ``"target"``, ...) by frame index."""
        return {
            int(f["frame_index"]): str(f.get("kind", "base"))
            for f in self.frames
            if "frame_index" in f
        }

    def counts(self) -> dict[str, int]:
        """The counts of a run summary, from the logs and arrays (every session).

        What ``run.json["summary"]`` holds at the end of a run, for runs that
        never finished and for resumed runs (whose summary covers all
        sessions). Frames of partial positions moved aside by a resume count
        as acquired, not as base events.
        """
        applied = [
            a
            for d in self.decisions
            for a in d.get("actions") or []
            if a.get("status") == "applied"
        ]
        kept = {n for n in array_names(self.directory) if PARTIAL not in n}
        return {
            "frames_acquired": len(self.frames),
            "frames_analysed": len(self.detections),
            "frames_dropped": max(
                sum(bool(f.get("dropped")) for f in self.frames), len(self.skipped)
            ),
            "detections": sum(int(r.get("n_detections", 0)) for r in self.detections),
            "decisions": sum(is_primary(d) for d in self.decisions),
            "events_scheduled": sum(len(a.get("events") or []) for a in applied),
            "events_skipped": sum(int(a.get("n_dropped", 0)) for a in applied),
            "base_events": sum(
                f.get("kind", "base") == "base" and not f.get("partial")
                for f in self.frames
            ),
            "positions": sum(
                (position_path(self.directory, n) / "0").exists() for n in kept
            ),
        }


def load_run(run_dir: str | Path) -> RunRecords:
    """Read ``run.json`` and the JSON-lines logs of a run directory.

    Raises
    ------
    NotARunError
        If the directory does not exist or holds neither ``run.json`` nor
        ``frames.jsonl``.
    """
    directory = Path(run_dir)
    if not directory.is_dir():
        raise NotARunError(f"no run directory at {directory}")
    has_info = (directory / "run.json").is_file()
    if not has_info and not (directory / "frames.jsonl").is_file():
        raise NotARunError(
            f"{directory} is not a run directory (no run.json and no frames.jsonl)"
        )
    notes: list[str] = []
    info: dict[str, Any] = {}
    if has_info:
        try:
            info = json.loads((directory / "run.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            notes.append(f"run.json is unreadable ({e})")
    else:
        notes.append("no run.json: the run's set-up and counts are unknown")

    def log(name: str) -> list[dict[str, Any]]:
        path = directory / name
        if not path.is_file():
            notes.append(f"no {name}")
            return []
        return [r for r in read_jsonl(path) if isinstance(r, dict)]

    frames = log("frames.jsonl")
    raw = log("detections.jsonl")
    decisions = log("decisions.jsonl")
    detections = [r for r in raw if "frame_index" in r and "skipped" not in r]
    skipped = [r for r in raw if "frame_index" in r and "skipped" in r]
    errors = [str(r["error"]) for r in raw if "error" in r]
    if frames and not array_names(directory):
        notes.append("no images on disk: the gallery is empty")
    return RunRecords(
        directory, info, frames, detections, decisions, errors, notes, skipped
    )
