"""``smartscope bench burst``: a burst event by event against hardware-sequenced.

A burst of `frames` frames at one position, one channel, no wait between them
(an interval-0 time-lapse), through the smartscope `Runner` twice — event by
event (``scheduler.sequence: off``) and hardware-sequenced in sequences of
`chunk_frames` (``scheduler.sequence: auto``) — with a segmenter attached, every
frame stored and offered to analysis; and through bare pymmcore-plus, event by
event and as one hardware sequence (the camera's own streaming rate), as
references. Every arm acquires the same events in the same order on one
already loaded `Microscope`; the arms alternate over the repeats and each
reports its median. Frame rates are compared with the exposure-limited rate
(``1000 / exposure_ms`` frames per second).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from smartscope.bench._loop import base_sequence, busy_core, count_stored_frames
from smartscope.experiment import Experiment, SegmenterSpec
from smartscope.microscope import Microscope
from smartscope.runner import Runner, package_versions

if TYPE_CHECKING:
    from useq import MDASequence

__all__ = ["GOAL_FRACTION", "bench_burst"]

GOAL_FRACTION = 0.9
"""Goal: sequenced frame rate / exposure-limited frame rate."""

_ARMS = ("event_by_event", "sequenced", "bare_event_by_event", "bare_sequenced")
_WARMUP_FRAMES = 8


class _Timeline:
    """``eventStarted`` and ``frameReady`` times of one acquisition (perf_counter)."""

    def __init__(self, microscope: Microscope) -> None:
        self.mda = microscope.core.mda
        self.starts: list[tuple[float, int]] = []  # (time, frames in the event)
        self.frames: list[float] = []  # frameReady times
        self.received: list[float | None] = []  # MMCore's time of each frame
        self.order: list[int] = []  # t index of each frame

    def __enter__(self) -> _Timeline:
        self.mda.events.eventStarted.connect(self._on_event)
        self.mda.events.frameReady.connect(self._on_frame)
        return self

    def __exit__(self, *exc: object) -> None:
        self.mda.events.eventStarted.disconnect(self._on_event)
        self.mda.events.frameReady.disconnect(self._on_frame)

    def _on_event(self, event: Any) -> None:
        n = len(getattr(event, "events", ())) or 1
        self.starts.append((time.perf_counter(), n))

    def _on_frame(self, img: Any, event: Any, meta: Any) -> None:
        self.frames.append(time.perf_counter())
        self.received.append(_received_s(meta))
        self.order.append(int(event.index.get("t", 0)))

    def between_sequences_ms(self) -> list[float]:
        """From each sequence's last frame to the start of the event after it."""
        gaps = []
        k = 0
        for i, (_, n) in enumerate(self.starts[:-1]):
            k += n
            if n > 1 and k - 1 < len(self.frames):
                gaps.append((self.starts[i + 1][0] - self.frames[k - 1]) * 1000.0)
        return gaps

    def dead_time_ms(self) -> list[float]:
        """Frame interval across each sequence boundary minus the median inside.

        The time the camera stands still between two sequences. Frame times
        are MMCore's (``TimeReceivedByCore``: when the camera handed the frame
        over) where every frame has one, else when it reached ``frameReady``.
        """
        times = self.frames
        if self.received and all(t is not None for t in self.received):
            times = self.received  # type: ignore[assignment]
        first = []  # index of each event's first frame
        k = 0
        for _, n in self.starts:
            first.append(k)
            k += n
        starts = set(first)
        inside = [
            times[i] - times[i - 1] for i in range(1, len(times)) if i not in starts
        ]
        if not inside or len(first) < 2:
            return []
        frame_s = statistics.median(inside)
        return [
            (times[j] - times[j - 1] - frame_s) * 1000.0
            for j in first[1:]
            if 0 < j < len(times)
        ]

    def burst_s(self) -> float:
        """From the start of the first event to the last frame."""
        return self.frames[-1] - self.starts[0][0]

    def streaming_fps(self) -> float | None:
        """Frames per second from the first frame to the last (no start-up)."""
        if len(self.frames) < 2 or self.frames[-1] <= self.frames[0]:
            return None
        return (len(self.frames) - 1) / (self.frames[-1] - self.frames[0])

    def sequences(self) -> int:
        return sum(1 for _, n in self.starts if n > 1)


def _arm_experiment(
    microscope: Microscope,
    seq: MDASequence,
    *,
    sequenced: bool,
    chunk_frames: int,
    segmenter: dict[str, Any],
) -> Experiment:
    return Experiment.model_validate(
        {
            "name": "bench-burst",
            "config": str(microscope.config_path),
            "sequence": seq,
            "segmenter": segmenter,
            "policies": [],
            "analysis": {"analyze": "all"},
            "scheduler": {
                "sequence": "auto" if sequenced else "off",
                "max_sequence_frames": max(2, chunk_frames),
            },
        }
    )


def _run_smart(
    microscope: Microscope, experiment: Experiment, out: Path
) -> dict[str, Any]:
    with _Timeline(microscope) as timeline:
        with Runner(
            experiment, microscope=microscope, out_dir=out, overwrite=True
        ) as runner:
            t0 = time.perf_counter()
            runner.start()
            runner.wait()
            wall = time.perf_counter() - t0
            summary = runner.finish()
    if summary.status != "completed":
        raise RuntimeError(f"burst benchmark run {summary.status}: {summary.reason}")
    return {"wall": wall, "summary": summary, "timeline": timeline, "dir": out}


def _run_bare(
    microscope: Microscope, seq: MDASequence, *, sequenced: bool
) -> dict[str, Any]:
    core = microscope.core
    engine = core.mda.engine
    assert engine is not None, "the core has no MDA engine"
    before = engine.use_hardware_sequencing
    engine.use_hardware_sequencing = sequenced
    try:
        with _Timeline(microscope) as timeline:
            t0 = time.perf_counter()
            core.mda.run(seq)
            wall = time.perf_counter() - t0
    finally:
        engine.use_hardware_sequencing = before
    return {"wall": wall, "timeline": timeline}


def bench_burst(
    *,
    config: str | Path | None = None,
    frames: int = 100,
    exposure_ms: float = 10.0,
    chunk_frames: int = 20,
    repeats: int = 5,
    segmenter: str = "threshold",
    load: bool = False,
    fast_image: bool = False,
    workdir: Path | None = None,
) -> dict[str, Any]:
    """Frames per second of a burst, event by event vs hardware-sequenced.

    Parameters
    ----------
    config : str | Path, optional
        Micro-Manager config (default: the demo microscope).
    frames : int
        Frames of the burst (one position, no wait between frames).
    exposure_ms : float
        Exposure of every frame, ms.
    chunk_frames : int
        Longest hardware sequence of the sequenced arm: decisions are served
        between sequences.
    repeats : int
        Timed runs of each arm (after one untimed warm-up run of each).
    segmenter : str
        Registered segmenter the smartscope arms analyse with (default
        parameters).
    load : bool
        Keep one core busy (a spinning process) while measuring.
    fast_image : bool
        Set the DemoCamera's ``FastImage`` (it then waits out the exposure
        without rendering a new image): separates the camera's own rendering
        time from the acquisition loop's overhead.
    workdir : Path, optional
        Where the smartscope runs are written (kept); default: a temporary
        directory.

    Returns
    -------
    dict
        JSON-ready: ``burst_fps`` (sequenced), ``event_fps`` (event by event),
        ``exposure_limited_fps`` and ``camera_fps`` (bare pymmcore-plus, one
        hardware sequence: the camera's own streaming rate), each arm's median
        burst time (the start of its first event to its last frame), frame
        rate over that time and its fraction of the exposure limit,
        ``streaming_fps`` (first to last frame), ``run_s`` (the whole run or
        ``core.mda.run`` call, start-up included), frames
        acquired, stored, analysed and skipped, sequences, the time from each
        sequence's last frame to the next event's start (p50, max ms), the
        same-order check, and the goals.
    """
    if frames < 2:
        raise ValueError(f"frames must be ≥ 2, got {frames}")
    if exposure_ms <= 0:
        raise ValueError(f"exposure_ms must be > 0, got {exposure_ms}")
    if repeats < 1:
        raise ValueError(f"repeats must be ≥ 1, got {repeats}")
    SegmenterSpec.checked({"name": segmenter})
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="smartscope-burst-") as tmp:
            return _bench_burst(
                config, frames, exposure_ms, chunk_frames, repeats, segmenter,
                load, fast_image, Path(tmp),
            )  # fmt: skip
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    return _bench_burst(
        config, frames, exposure_ms, chunk_frames, repeats, segmenter, load,
        fast_image, workdir,
    )  # fmt: skip


def _bench_burst(
    config: str | Path | None,
    frames: int,
    exposure_ms: float,
    chunk_frames: int,
    repeats: int,
    segmenter: str,
    load: bool,
    fast_image: bool,
    workdir: Path,
) -> dict[str, Any]:
    seq = base_sequence(frames, exposure_ms, max_positions=1)
    warm = base_sequence(_WARMUP_FRAMES, exposure_ms, max_positions=1)
    spec = {"name": segmenter}
    runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in _ARMS}
    with busy_core(load), Microscope(config) as microscope:
        if fast_image:  # it then repeats its last image: make that a real one
            core = microscope.core
            core.snapImage()
            core.setProperty(core.getCameraDevice(), "FastImage", "1")

        def one(arm: str, sequence: MDASequence, tag: str) -> dict[str, Any]:
            if arm.startswith("bare_"):
                return _run_bare(
                    microscope, sequence, sequenced=arm == "bare_sequenced"
                )
            experiment = _arm_experiment(
                microscope,
                sequence,
                sequenced=arm == "sequenced",
                chunk_frames=chunk_frames,
                segmenter=spec,
            )
            return _run_smart(microscope, experiment, workdir / f"{arm}-{tag}")

        for arm in _ARMS:  # untimed: imports, buffers, zarr, segmenter caches
            one(arm, warm, "warmup")
        for i in range(repeats):
            for arm in _ARMS[i % len(_ARMS) :] + _ARMS[: i % len(_ARMS)]:
                runs[arm].append(one(arm, seq, str(i)))
        camera = microscope.core.getCameraDevice()
        config_path = str(microscope.config_path)

    limit_fps = 1000.0 / exposure_ms
    planned = list(range(frames))
    arms: dict[str, Any] = {}
    for arm, results in runs.items():
        walls = [r["wall"] for r in results]
        bursts = [r["timeline"].burst_s() for r in results]
        burst = statistics.median(bursts)
        fps = frames / burst
        last = results[-1]
        timeline: _Timeline = last["timeline"]
        gaps = [g for r in results for g in r["timeline"].between_sequences_ms()]
        dead = [g for r in results for g in r["timeline"].dead_time_ms()]
        entry: dict[str, Any] = {
            "burst_s": round(burst, 4),
            "bursts_s": [round(b, 4) for b in bursts],
            "run_s": round(statistics.median(walls), 4),
            "fps": round(fps, 2),
            "fraction_of_exposure_limit": round(fps / limit_fps, 4),
            "streaming_fps": _median_of(
                [r["timeline"].streaming_fps() for r in results]
            ),
            "sequences": timeline.sequences(),
            "same_order": all(r["timeline"].order == planned for r in results),
        }
        if gaps:
            entry["between_sequences_ms"] = {
                "n": len(gaps),
                "p50": round(statistics.median(gaps), 3),
                "max": round(max(gaps), 3),
            }
            entry["dead_time_ms"] = {
                "p50": round(statistics.median(dead), 3) if dead else None,
                "max": round(max(dead), 3) if dead else None,
            }
        if "summary" in last:
            summary = last["summary"]
            stored = count_stored_frames(last["dir"])
            skipped = summary.analysis.get("skipped", {})
            entry.update(
                frames_acquired=summary.frames_acquired,
                frames_stored=stored,
                frames_missing=frames - stored,
                frames_analysed=summary.frames_analysed,
                frames_skipped=skipped,
                frames_counted=summary.frames_analysed + sum(skipped.values()),
                schedule_sequences=summary.schedule.get("sequences"),
            )
        else:
            entry["frames_acquired"] = len(timeline.frames)
        arms[arm] = entry

    seqd, ebe = arms["sequenced"], arms["event_by_event"]
    between = seqd.get("between_sequences_ms", {"p50": None, "max": None})
    goals: dict[str, bool] = {
        f"sequenced>={GOAL_FRACTION:.0%}_of_exposure_limit": seqd[
            "fraction_of_exposure_limit"
        ]
        >= GOAL_FRACTION,
        "no_frame_lost": seqd["frames_missing"] == 0 and ebe["frames_missing"] == 0,
        "every_frame_analysed_or_counted": seqd["frames_counted"] == frames
        and ebe["frames_counted"] == frames,
        "same_order": all(a["same_order"] for a in arms.values()),
    }
    if between["max"] is not None:  # with more than one sequence
        goals["between_sequences<=one_frame_interval"] = between["max"] <= exposure_ms
    camera_fps = arms["bare_sequenced"]["fps"]
    result: dict[str, Any] = {
        "benchmark": "burst",
        "config": config_path,
        "camera": camera,
        "frames": frames,
        "exposure_ms": exposure_ms,
        "chunk_frames": chunk_frames,
        "repeats": repeats,
        "segmenter": segmenter,
        "load": "one core kept busy" if load else None,
        "fast_image": fast_image,
        "exposure_limited_fps": round(limit_fps, 2),
        "burst_fps": seqd["fps"],
        "event_fps": ebe["fps"],
        "camera_fps": camera_fps,
        "burst_fraction": seqd["fraction_of_exposure_limit"],
        "event_fraction": ebe["fraction_of_exposure_limit"],
        "burst_vs_camera": round(seqd["fps"] / camera_fps, 4) if camera_fps else None,
        "speedup": round(seqd["fps"] / ebe["fps"], 3) if ebe["fps"] else None,
        "between_sequences_ms": between,
        "arms": arms,
        "goals": goals,
        "meets_goals": all(goals.values()),
        "versions": package_versions(),
        "cpu_count": os.cpu_count(),
    }
    if camera_fps < GOAL_FRACTION * limit_fps:
        result["note"] = (
            f"the camera itself streams at {camera_fps:g} fps "
            f"({camera_fps / limit_fps:.0%} of the exposure limit) in a bare "
            "pymmcore-plus hardware sequence: a sequenced burst cannot be faster"
        )
    return result


def _received_s(meta: Any) -> float | None:
    """MMCore's ``TimeReceivedByCore`` of a frame, in seconds (None: absent)."""
    try:
        stamp = meta["camera_metadata"]["TimeReceivedByCore"]
        return datetime.fromisoformat(stamp).timestamp()
    except (KeyError, TypeError, ValueError):
        return None


def _median_of(values: list[float | None]) -> float | None:
    have = [v for v in values if v is not None]
    return round(statistics.median(have), 2) if have else None
