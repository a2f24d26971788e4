"""Resume planning: what a crashed, killed or interrupted run still needs.

`inspect_run` reads what the run directory holds, `prepare_directory` repairs
it; ``smartscope resume RUN_DIR`` (`smartscope.resume`) then images only what
is missing:

- A base-plan position (a `base_position_key` of the plan) is *finished* when
  every frame the plan has for it is listed in ``frames.jsonl`` **and** its
  chunk is on disk (frames are written asynchronously, so a kill can lose the
  last ones that were already logged), every such frame's analysis was logged
  (so its policies' decisions were applied), and every position its decisions
  added (targets) is complete. Finished positions are kept and not imaged
  again. Other positions a policy skipped (``skip_position``, ``skip_well``,
  a spent light-dose budget) are *skipped*: kept as they are, not imaged.
- Any other position with frames or an array on disk is *partial*: its image
  and label arrays, and those of the positions its decisions added, are moved
  aside to ``partial/<key>.partial-<n>`` (out of the run's hierarchy; runs
  written before it: ``images/<key>.partial-<n>.ome.zarr``, labels likewise), the
  lines of their frames in ``frames.jsonl`` are pointed there and marked
  ``"partial": true``, and the position is imaged again.
- Added positions (e.g. ``target_0007``) that are complete and were triggered
  by a finished position are kept; incomplete ones are moved aside.

The new session appends to the JSON-lines logs (a line cut off by the kill is
dropped first), numbers frames and decisions after the logged ones, gives
added positions that would reuse a kept name a fresh one (``<key>_r<n>``),
and records itself in ``run.json["resumed"]``. At the end ``run.json``'s
``summary`` counts every session (from the logs); its ``latency_ms`` and
``schedule`` cover the last session only.

The policies go on where they were: every analysed frame of a kept array
(finished and skipped positions, kept added ones) is given to them again, in
acquisition order, with its logged detections and its stored image and labels
(`replay_frames`), so a well quota keeps its counts, an empty well stays
skipped, a well's focus is kept and hit wells stay hits. What they decide on
the way is applied to the new session's Scheduler, except events that are
already stored: a target that was queued but not imaged when the run died is
queued again (logged as a decision with ``"replayed": true``). The replay
runs on the run's clock of the earlier sessions, shifted so that the new
session starts where the last one stopped.

Known limits: frames logged by smartscope before 0.4 (no ``event`` in
``frames.jsonl``) cannot be replayed: the policies then start afresh; added
events without a ``pos_name`` are never queued again (where they are stored
cannot be told).
"""

from __future__ import annotations

import json
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from smartscope._errors import SmartscopeError, first_line
from smartscope.frame import well_of
from smartscope.rundir._layout import (
    HIERARCHY,
    PARTIAL,
    PARTIAL_DIR,
    Hierarchy,
    array_names,
    position_path,
)
from smartscope.rundir._records import LOGS, dumps, load_run, read_jsonl
from smartscope.rundir._writer import open_position

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

    from useq import MDAEvent

    from smartscope.detections import Detections
    from smartscope.frame import Frame

__all__ = [
    "ResumeError",
    "RunState",
    "counts_from_logs",
    "event_location",
    "inspect_run",
    "prepare_directory",
    "replay_frames",
]


class ResumeError(SmartscopeError):
    """A directory holds no run that can be resumed."""


@dataclass
class RunState:
    """What a run directory holds, position by position (see the module doc)."""

    directory: Path
    status: str
    info: dict[str, Any] = field(repr=False)
    finished: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    partial: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)
    kept_added: list[str] = field(default_factory=list)
    redo_added: list[str] = field(default_factory=list)
    next_frame_index: int = 0
    next_decision_id: int = 0
    replay: list[dict[str, Any]] = field(default_factory=list, repr=False)
    stored: set[tuple[str, int, int, int]] = field(default_factory=set, repr=False)

    @property
    def completed(self) -> bool:
        """The run finished: nothing to resume."""
        return self.status == "completed"

    @property
    def to_move(self) -> list[str]:
        """Array names moved aside before imaging again."""
        return self.partial + self.redo_added


# ------------------------------------------------------------------- inspect
def inspect_run(run_dir: str | Path) -> RunState:
    """Read a run directory and sort its positions; changes nothing.

    Raises
    ------
    ResumeError
        If the directory holds no run (no readable ``run.json`` with its plan).
    """
    directory = Path(run_dir)
    info = _read_info(directory)
    status = str(info.get("status") or "running")
    state = RunState(directory, status, info)
    if state.completed:
        return state

    frames = _records(directory / "frames.jsonl")
    detections = _records(directory / "detections.jsonl")
    decisions = _records(directory / "decisions.jsonl")
    expected = _expected_frames(info)
    on_disk = array_names(directory)

    # where each logged frame is, and whether its chunk made it to disk
    logged: dict[str, set[tuple[int, int, int]]] = defaultdict(set)
    base_frames: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for f in frames:
        where = f.get("array") or {}
        name = str(where.get("position", f.get("position")))
        logged[name].add(_tcz(where))
        if f.get("kind", "base") == "base":
            base_frames[name].append(f)
    stored = {name: _stored_chunks(position_path(directory, name)) for name in on_disk}
    # analysed, or skipped for a fresher frame (no policy needed it): decided
    analysed = {
        int(r["frame_index"])
        for r in detections
        if r.get("frame_index") is not None and "error" not in r
    }

    # what the policies did: skips, and the positions each field's decisions added
    skipped: set[str] = set()
    skipped_wells: set[str] = set()
    scheduled: Counter[str] = Counter()
    triggered: dict[str, set[str]] = defaultdict(set)
    for d in decisions:
        source = (d.get("trigger") or {}).get("position")
        for a in d.get("actions") or []:
            if a.get("status") != "applied":
                continue
            kind = a.get("type")
            if kind in ("skip_position", "skip_visits") and a.get("position"):
                skipped.add(str(a["position"]))
            elif kind == "skip_well" and a.get("well"):
                skipped_wells.add(str(a["well"]))
            elif kind == "add_events":
                for e in a.get("events") or []:
                    if e.get("position") is not None:
                        scheduled[str(e["position"])] += 1
                        if source is not None:
                            triggered[str(source)].add(str(e["position"]))

    def is_skipped(key: str) -> bool:
        return key in skipped or well_of(key) in skipped_wells

    def complete(name: str) -> bool:
        """Every logged frame is on disk, and as many as were scheduled."""
        if is_skipped(name):
            return True
        have = logged.get(name, set())
        chunks = stored.get(name) or set()
        return bool(have) and have <= chunks and len(have) >= scheduled.get(name, 0)

    analysis = (info.get("experiment") or {}).get("analysis") or {}
    analysis_on = bool(analysis.get("enabled", True))

    def decided(key: str) -> bool:
        return not analysis_on or all(
            f.get("dropped") or int(f.get("frame_index", -1)) in analysed
            for f in base_frames.get(key, [])
        )

    for key, want in expected.items():
        if (
            want <= (logged.get(key, set()) & (stored.get(key) or set()))
            and decided(key)
            and all(complete(p) for p in triggered.get(key, ()))
        ):
            state.finished.append(key)
        elif is_skipped(key):
            state.skipped.append(key)
        elif logged.get(key) or key in on_disk:
            state.partial.append(key)
        else:
            state.pending.append(key)

    redo_sources = set(state.partial) | set(state.pending)
    added = (set(on_disk) | set(logged) | set(scheduled)) - set(expected)
    for name in sorted(added):
        if PARTIAL in name or not (name in on_disk or logged.get(name)):
            continue  # moved aside earlier, or never imaged
        from_redo = any(name in triggered[k] for k in redo_sources)
        if complete(name) and not from_redo:
            state.kept_added.append(name)
        else:
            state.redo_added.append(name)

    kept = set(state.finished) | set(state.skipped) | set(state.kept_added)
    state.replay = _replay_records(info, frames, detections, kept)
    state.stored = {(name, *tcz) for name in kept for tcz in logged.get(name, ())}

    indices = [int(f["frame_index"]) for f in frames if "frame_index" in f]
    indices += list(analysed)
    state.next_frame_index = max(indices, default=-1) + 1
    ids = [int(d["decision_id"]) for d in decisions if d.get("decision_id") is not None]
    state.next_decision_id = max(ids, default=-1) + 1
    return state


def _replay_records(
    info: dict[str, Any],
    frames: list[dict[str, Any]],
    detections: list[dict[str, Any]],
    kept: set[str],
) -> list[dict[str, Any]]:
    """The analysed frames of the kept arrays, in acquisition order.

    Each item is ``{"frame": <frames.jsonl line>, "detections": <its line>}``,
    the frame's ``t_clock`` moved onto one clock over every session, ending at
    0 (each session's clock starts at 0; see the module doc).
    """
    by_index = {
        int(r["frame_index"]): r
        for r in detections
        if r.get("frame_index") is not None and "error" not in r and "skipped" not in r
    }
    starts = [0] + [
        int(r.get("first_frame_index") or 0) for r in info.get("resumed") or []
    ]
    session_end: dict[int, float] = defaultdict(float)
    chosen = []
    for f in frames:
        if "frame_index" not in f:
            continue
        i = int(f["frame_index"])
        session = sum(i >= s for s in starts) - 1
        t = f.get("t_clock")
        if t is not None:
            session_end[session] = max(session_end[session], float(t))
        where = f.get("array") or {}
        name = str(where.get("position", f.get("position")))
        if f.get("partial") or name not in kept:
            continue
        if i in by_index and not f.get("dropped"):
            chosen.append((i, session, f))
    offset, total = {}, 0.0
    for session in range(len(starts)):
        offset[session] = total
        total += session_end.get(session, 0.0)
    replay = []
    for i, session, f in sorted(chosen, key=lambda c: c[0]):
        t = f.get("t_clock")
        t_run = None if t is None else round(float(t) + offset[session] - total, 6)
        replay.append({"frame": {**f, "t_clock": t_run}, "detections": by_index[i]})
    return replay


def _read_info(directory: Path) -> dict[str, Any]:
    if not directory.is_dir():
        raise ResumeError(f"not a directory: {directory}")
    path = directory / "run.json"
    if not path.is_file():
        raise ResumeError(f"{directory} is not a run directory (no run.json)")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ResumeError(f"{path} is unreadable: {first_line(e)}") from None
    if not isinstance(info, dict) or "status" not in info:
        raise ResumeError(f"{path} is not a smartscope run.json")
    if info.get("status") != "completed" and not isinstance(info.get("plan"), dict):
        raise ResumeError(f"{path} has no plan to resume")
    return info


def _records(path: Path) -> list[dict[str, Any]]:
    return (
        [r for r in read_jsonl(path) if isinstance(r, dict)] if path.is_file() else []
    )


def _tcz(where: dict[str, Any]) -> tuple[int, int, int]:
    return (int(where.get("t", 0)), int(where.get("c", 0)), int(where.get("z", 0)))


def _expected_frames(info: dict[str, Any]) -> dict[str, set[tuple[int, int, int]]]:
    """Base position key → its (visit, c, z) frames, from the resolved plan."""
    from useq import MDASequence

    from smartscope.frame import base_position_key

    try:
        plan = MDASequence.model_validate(info["plan"])
    except Exception as e:
        raise ResumeError(
            f"run.json: the plan is unreadable: {first_line(e)}"
        ) from None
    out: dict[str, set[tuple[int, int, int]]] = defaultdict(set)
    for event in plan:
        out[base_position_key(event)].add(_tcz(dict(event.index)))
    return dict(out)


def _stored_chunks(path: Path) -> set[tuple[int, int, int]] | None:
    """The (t, c, z) frames of an OME-Zarr whose chunk is complete on disk.

    Arrays are written with one chunk per frame (see `PositionArrays`); None if
    the array's metadata is unreadable or laid out otherwise.
    """
    root = path / "0"
    try:
        meta = json.loads((root / "zarr.json").read_text(encoding="utf-8"))
        names = [str(n) for n in meta["dimension_names"]]
        chunks = [int(n) for n in meta["chunk_grid"]["configuration"]["chunk_shape"]]
        shape = [int(n) for n in meta["shape"]]
        encoding = meta.get("chunk_key_encoding") or {}
        sep = (encoding.get("configuration") or {}).get("separator", "/")
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if (
        names[:1] != ["t"]
        or sorted(names[1:3]) != ["c", "z"]
        or chunks[:3] != [1, 1, 1]
        or chunks[3:] != shape[3:]
        or encoding.get("name") != "default"
    ):
        return None
    # tensorstore writes a chunk to "<name>.__lock" and renames it when complete
    # (seen with strace), so a chunk file is whole; raw chunks also have a known
    # size, checked as a second guard
    size = None
    if [c.get("name") for c in meta.get("codecs", [])] == ["bytes"]:
        size = int(np.prod(chunks)) * np.dtype(meta["data_type"]).itemsize
    out = set()
    c_at, z_at = names.index("c"), names.index("z")
    prefix = root / "c"
    for dirpath, _, files in os.walk(prefix):
        for name in files:
            path = Path(dirpath) / name
            parts = path.relative_to(prefix).as_posix().split("/")
            if sep != "/":
                parts = "/".join(parts).split(sep)
            try:
                idx = [int(p) for p in parts]
            except ValueError:
                continue  # a chunk being written (".__lock")
            if len(idx) != len(names) or any(idx[3:]):
                continue
            if size is not None and path.stat().st_size != size:
                continue
            out.add((idx[0], idx[c_at], idx[z_at]))
    return out


# ------------------------------------------------------------------- resume
def replay_frames(
    directory: str | Path, records: Iterable[dict[str, Any]]
) -> Iterator[tuple[Frame, Detections]]:
    """Rebuild the `Frame` and `Detections` of each replay record (`RunState`).

    The objects table is the logged one; the image and labels are read back
    from the run's arrays (``detections.extra["image"]`` as in a live run).
    Records whose frame cannot be rebuilt (no ``event`` logged) are skipped.
    """
    from smartscope.detections import OBJECT_COLUMNS, Detections
    from smartscope.frame import Frame

    reader = _FrameReader(Path(directory))
    for record in records:
        try:
            frame = Frame.from_json(record["frame"])
        except (ValueError, TypeError):
            continue
        logged = record["detections"]
        objects = logged.get("objects") or {}
        table = {}
        n = len(objects.get("label", []))
        for name in OBJECT_COLUMNS:
            dtype = {"label": np.int64, "touches_border": bool}.get(name, np.float64)
            # a column an older version did not log: NaN (never passes a bound)
            missing = np.full(n, np.nan) if dtype is np.float64 else np.zeros(0)
            table[name] = np.asarray(objects.get(name, missing), dtype=dtype)
        where = record["frame"].get("array") or {}
        name = str(where.get("position", frame.position))
        tcz = _tcz(where)
        image = reader.read(name, tcz, labels=False)
        labels = reader.read(name, tcz, labels=True)
        det = Detections(
            labels,
            table,
            frame_index=frame.frame_index,
            model_id=str(logged.get("model_id", "")),
        )
        det.extra["image"] = image
        yield frame, det


class _FrameReader:
    """Single frames of a run's arrays, keeping a few arrays open."""

    def __init__(self, directory: Path, keep: int = 8) -> None:
        self.directory = directory
        self.keep = keep
        self._open: dict[tuple[str, bool], Any] = {}

    def read(self, name: str, tcz: tuple[int, int, int], *, labels: bool) -> np.ndarray:
        key = (name, labels)
        store = self._open.pop(key, None)
        if store is None:
            store = open_position(self.directory, name, labels=labels)
            if len(self._open) >= self.keep:
                self._open.pop(next(iter(self._open)))
        self._open[key] = store  # most recently used last
        return np.asarray(store[tcz].read().result())


def event_location(event: MDAEvent) -> tuple[str, int, int, int] | None:
    """``(position, visit, c, z)`` where the Scheduler stores an added event.

    None for an event without a ``pos_name`` (its position key is numbered by
    the Scheduler, so where it would be stored cannot be told in advance).
    """
    from smartscope.frame import event_tag
    from smartscope.frame import safe_name as _safe

    if not event.pos_name:
        return None
    tag = event_tag(event)
    return (
        _safe(event.pos_name),
        int(tag.get("visit", 0)),
        int(tag.get("c", event.index.get("c", 0))),
        int(tag.get("z", event.index.get("z", 0))),
    )


def prepare_directory(state: RunState) -> tuple[set[str], list[dict[str, Any]]]:
    """Repair a run directory for a new session of `state`'s run.

    Drops log lines cut off by the kill, moves partial arrays aside (pointing
    their frames' lines there) and returns the position keys no new array may
    take (kept and moved-aside arrays) and ``run.json["resumed"]`` with the new
    session appended.
    """
    directory = state.directory
    for name in LOGS:
        _drop_cut_off_line(directory / name)
    moved = _move_aside(directory, state.to_move)
    moved.update(_move_orphans_aside(directory))
    if moved:
        _point_frames_to(directory / "frames.jsonl", moved)

    done = set(state.finished) | set(state.skipped) | set(state.kept_added)
    done |= array_names(directory)  # no new array may take an existing name
    resumed = list(state.info.get("resumed") or [])
    resumed.append(
        {
            "at": datetime.now(timezone.utc).isoformat(),
            "status_before": state.status,
            "finished_positions": len(state.finished),
            "skipped_positions": len(state.skipped),
            "partial": state.partial,
            "pending_positions": len(state.pending),
            "kept_added_positions": len(state.kept_added),
            "moved_aside": moved,
            "first_frame_index": state.next_frame_index,
            "first_decision_id": state.next_decision_id,
            "wall_time_before_s": _wall_time_so_far(state),
            "replayed_frames": len(state.replay),
            "summary": None,  # this session's own counts, filled at the end
        }
    )
    return done, resumed


def _move_orphans_aside(directory: Path) -> dict[str, str]:
    """Move images the hierarchy does not list to ``partial/`` (by position key).

    An image whose creation a crash or a full disk cut short exists on disk
    but was never listed; left in place it would block its position's new
    image (its frames would go to ``overflow/``).
    """
    if not (directory / HIERARCHY / "zarr.json").is_file():
        return {}
    hierarchy = Hierarchy.open(directory)
    moved = {}
    for key, folder in hierarchy.orphans():
        n = 1
        while (directory / PARTIAL_DIR / f"{key}{PARTIAL}{n}").exists():
            n += 1
        new = f"{key}{PARTIAL}{n}"
        (directory / PARTIAL_DIR).mkdir(exist_ok=True)
        folder.rename(directory / PARTIAL_DIR / new)
        moved[key] = new
    return moved


def _drop_cut_off_line(path: Path) -> None:
    """Cut a last line without its newline (a write the kill interrupted)."""
    if not path.is_file():
        return
    with path.open("rb+") as fh:
        data = fh.read()
        if data and not data.endswith(b"\n"):
            fh.truncate(data.rfind(b"\n") + 1)


def _move_aside(directory: Path, names: list[str]) -> dict[str, str]:
    """Move each name's image (with its labels) aside as ``<name>.partial-<n>``.

    In a run's ``run.ome.zarr`` the image leaves the hierarchy's metadata first,
    then moves to ``partial/`` (so the hierarchy stays valid); in runs written
    before it, ``images/`` and ``labels/`` arrays are renamed in place.
    """
    moved = {}
    hierarchy = (
        Hierarchy.open(directory)
        if (directory / HIERARCHY / "zarr.json").is_file()
        else None
    )
    for name in names:
        if hierarchy is not None:
            src = hierarchy.image_dir(name)
            if not src.exists():
                continue
            n = 1
            while (directory / PARTIAL_DIR / f"{name}{PARTIAL}{n}").exists():
                n += 1
            new = f"{name}{PARTIAL}{n}"
            hierarchy.remove_image(name)
            (directory / PARTIAL_DIR).mkdir(exist_ok=True)
            src.rename(directory / PARTIAL_DIR / new)
            moved[name] = new
            continue
        paths = [directory / d / f"{name}.ome.zarr" for d in ("images", "labels")]
        if not any(p.exists() for p in paths):
            continue
        n = 1
        while any(p.with_name(f"{name}{PARTIAL}{n}.ome.zarr").exists() for p in paths):
            n += 1
        new = f"{name}{PARTIAL}{n}"
        for p in paths:
            if p.exists():
                p.rename(p.with_name(f"{new}.ome.zarr"))
        moved[name] = new
    return moved


def _point_frames_to(path: Path, moved: dict[str, str]) -> None:
    """Point the moved arrays' frame lines at their new names (atomically)."""
    lines = []
    for record in _records(path):
        where = record.get("array")
        if isinstance(where, dict) and where.get("position") in moved:
            where = {k: v for k, v in where.items() if k != "path"}
            record["array"] = {**where, "position": moved[where["position"]]}
            record["partial"] = True
        lines.append(dumps(record) + "\n")
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(lines), encoding="utf-8")
    tmp.replace(path)


def _wall_time_so_far(state: RunState) -> float:
    """Acquisition time of the earlier sessions (a killed one: to its last frame)."""
    summary = state.info.get("summary") or {}
    if summary.get("wall_time_s") is not None:
        return float(summary["wall_time_s"])
    resumed = state.info.get("resumed") or []
    before = float(resumed[-1].get("wall_time_before_s") or 0.0) if resumed else 0.0
    first = int(resumed[-1].get("first_frame_index") or 0) if resumed else 0
    times = [
        float(f["t_acquired"])
        for f in _records(state.directory / "frames.jsonl")
        if f.get("t_acquired") is not None and int(f.get("frame_index", -1)) >= first
    ]
    return round(before + max(times, default=0.0), 3)


def counts_from_logs(directory: Path) -> dict[str, int]:
    """The counts of a run summary, from the logs and arrays of every session."""
    return load_run(directory).counts()
