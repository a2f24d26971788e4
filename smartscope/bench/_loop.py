"""Benchmarks behind ``smartscope bench``.

`bench_loop` measures what the smart loop costs on top of a plain acquisition:
the same base sequence is acquired by plain pymmcore-plus (``core.run_mda``
writing OME-Zarr) and by a smartscope `Runner` that analyses every frame with
inert policies, alternating the two on one already loaded `Microscope`. The
result is a JSON-ready dict (``smartscope bench loop --json``).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from smartscope.experiment import Experiment
from smartscope.microscope import Microscope
from smartscope.rundir import read_jsonl, read_position
from smartscope.runner import Runner, RunSummary, package_versions

if TYPE_CHECKING:
    from collections.abc import Callable

    from useq import MDASequence

__all__ = ["GOAL_RATIO", "base_sequence", "bench_loop", "count_stored_frames"]

GOAL_RATIO = 1.05
"""Largest acceptable smart/plain wall-time ratio of `bench_loop`."""

_WARMUP_FRAMES = 4


def base_sequence(
    frames: int,
    exposure_ms: float,
    *,
    channel: str = "DAPI",
    max_positions: int = 4,
    spacing_um: float = 600.0,
) -> MDASequence:
    """A sequence of exactly `frames` frames with no waits between them.

    Positions (up to `max_positions`, the largest count that divides `frames`)
    are visited in turn, ``frames / positions`` times each (a time plan with a
    zero interval), in one channel.

    Parameters
    ----------
    frames : int
        Frames in the sequence (≥ 1).
    exposure_ms : float
        Exposure of every frame, ms.
    channel : str
        Preset of the ``Channel`` config group.
    max_positions : int
        Most stage positions to use.
    spacing_um : float
        Distance between neighbouring positions along X, µm (more than the demo
        camera's field of view, so tiles do not overlap).
    """
    from useq import MDASequence

    if frames < 1:
        raise ValueError(f"frames must be ≥ 1, got {frames}")
    n_pos = max(p for p in range(1, max(1, max_positions) + 1) if frames % p == 0)
    loops = frames // n_pos
    data: dict[str, Any] = {
        "stage_positions": [
            {"x": i * spacing_um, "y": 0.0, "z": 0.0, "name": f"pos{i}"}
            for i in range(n_pos)
        ],
        "channels": [{"config": channel, "exposure": float(exposure_ms)}],
    }
    if loops > 1:
        data["time_plan"] = {"interval": 0, "loops": loops}
    return MDASequence.model_validate(data)


def count_stored_frames(run_dir: str | Path) -> int:
    """Frames of a run directory that are on disk, as ``frames.jsonl`` lists them.

    A frame counts when its image array exists and holds non-zero data at the
    ``(t, c, z)`` index recorded in its ``array`` entry.
    """
    run_dir = Path(run_dir)
    log = run_dir / "frames.jsonl"
    if not log.exists():
        return 0
    arrays: dict[str, np.ndarray | None] = {}
    count = 0
    for record in read_jsonl(log):
        where = record.get("array")
        if not isinstance(where, dict) or "position" not in where:
            continue
        position = str(where["position"])
        if position not in arrays:
            try:
                arrays[position] = read_position(run_dir, position)
            except FileNotFoundError:
                arrays[position] = None
        data = arrays[position]
        t, c, z = (int(where.get(k, 0)) for k in ("t", "c", "z"))
        if data is None or data.ndim < 5:
            continue
        if t < data.shape[0] and c < data.shape[1] and z < data.shape[2]:
            count += bool(np.any(data[t, c, z]))
    return count


def _run_plain(microscope: Microscope, seq: MDASequence, output: Path) -> float:
    """Plain pymmcore-plus MDA to OME-Zarr, event by event; wall seconds."""
    core = microscope.core
    engine = core.mda.engine
    if engine is not None and hasattr(engine, "use_hardware_sequencing"):
        engine.use_hardware_sequencing = False
    t0 = time.perf_counter()
    core.run_mda(seq, output=str(output), block=True)
    return time.perf_counter() - t0


def _run_smart(
    microscope: Microscope,
    seq: MDASequence,
    out_dir: Path,
    segmenter: str,
    attach: Callable[[Runner], Callable[[], RunSummary]] | None = None,
) -> tuple[float, RunSummary]:
    """A smartscope run, every frame analysed, no policies; wall seconds, summary.

    With `attach`, ``attach(runner)`` (e.g. the live window) is set up before
    the clock starts and the run is its returned ``run()``.
    """
    experiment = Experiment.model_validate(
        {
            "name": "bench-loop",
            "config": str(microscope.config_path),
            "sequence": seq,
            "segmenter": {"name": segmenter},
            "policies": [],
            "analysis": {"analyze": "all"},
        }
    )
    # the runner leaves a microscope it was given open
    with Runner(
        experiment, microscope=microscope, out_dir=out_dir, overwrite=True
    ) as runner:
        run = runner.run if attach is None else attach(runner)
        t0 = time.perf_counter()
        summary = run()
        wall = time.perf_counter() - t0
    if summary.status != "completed":
        raise RuntimeError(f"smart benchmark run {summary.status}: {summary.reason}")
    return wall, summary


def bench_loop(
    *,
    config: str | Path | None = None,
    frames: int = 60,
    exposure_ms: float = 10.0,
    repeats: int = 3,
    segmenter: str = "threshold",
    workdir: Path | None = None,
    positions: int = 4,
    attach: Callable[[Runner], Callable[[], RunSummary]] | None = None,
) -> dict[str, Any]:
    """Wall time of a smartscope run against plain pymmcore-plus, same sequence.

    Both acquire `base_sequence` (`frames` frames over up to `positions` stage
    positions, one channel, no waits) on one
    `Microscope`, loaded once, so load time is not counted: (a) plain
    ``core.run_mda(..., output=<dir>/plain-<i>.ome.zarr)`` without hardware
    sequencing; (b) a `Runner` analysing every frame with `segmenter` and no
    policies. The two alternate (ABBA...) over `repeats` rounds, after one short
    untimed warm-up round of each, and the medians are compared.

    Parameters
    ----------
    config : str | Path, optional
        Micro-Manager config (default: the demo microscope).
    frames : int
        Frames per run.
    exposure_ms : float
        Exposure of every frame, ms.
    repeats : int
        Timed runs of each kind.
    segmenter : str
        Registered segmenter name used by the smart runs (default parameters).
    workdir : Path, optional
        Where the runs are written (kept); default: a temporary directory,
        removed afterwards.
    positions : int
        Most stage positions of the sequence, visited in turn (the demo XY
        stage takes ~80 ms per move); 1 gives a time-lapse at one place, where
        frames come every ~25 ms and analysis throughput dominates.
    attach : callable, optional
        ``attach(runner) -> run`` (``smartscope.gui.attach_window``): adds a
        third kind of run, smartscope with that attached (the live window,
        offscreen), timed in the same rotation as the other two.

    Returns
    -------
    dict
        JSON-ready: ``plain_wall_s`` and ``smart_wall_s`` (medians of the whole
        run calls), ``ratio`` (smart / plain) against ``goal_ratio``,
        ``smart_loop_s`` (median of the runs' own ``wall_time_s``, which leaves
        out set-up and segmenter warm-up), frames stored / analysed / dropped
        and the latencies of the last smart run, versions and CPU count. With
        `attach`: ``gui_wall_s``, ``gui_loop_s``, ``gui_runs_s``, ``gui_ratio``
        (window / headless, goal `GOAL_RATIO`), ``gui_meets_goal`` and the last
        windowed run's frames acquired / dropped.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be ≥ 1, got {repeats}")
    if exposure_ms <= 0:
        raise ValueError(f"exposure_ms must be > 0, got {exposure_ms}")
    seq = base_sequence(frames, exposure_ms, max_positions=positions)
    warm_seq = base_sequence(
        min(frames, _WARMUP_FRAMES), exposure_ms, max_positions=positions
    )
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="smartscope-bench-") as tmp:
            return _bench_loop(
                config, seq, warm_seq, repeats, segmenter, Path(tmp), attach
            )
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    return _bench_loop(config, seq, warm_seq, repeats, segmenter, workdir, attach)


def _bench_loop(
    config: str | Path | None,
    seq: MDASequence,
    warm_seq: MDASequence,
    repeats: int,
    segmenter: str,
    workdir: Path,
    attach: Callable[[Runner], Callable[[], RunSummary]] | None = None,
) -> dict[str, Any]:
    gui: list[float] = []
    gui_loop: list[float] = []
    gui_last: RunSummary | None = None
    plain: list[float] = []
    smart: list[float] = []
    smart_loop: list[float] = []
    last: RunSummary | None = None
    last_dir = workdir
    microscope = Microscope(config)
    try:
        # untimed: first imports, zarr/tensorstore set-up, segmenter caches
        _run_plain(microscope, warm_seq, workdir / "warmup-plain.ome.zarr")
        _run_smart(microscope, warm_seq, workdir / "warmup-smart", segmenter)
        if attach is not None:
            _run_smart(microscope, warm_seq, workdir / "warmup-gui", segmenter, attach)
        for i in range(repeats):
            order = ("plain", "smart") if i % 2 == 0 else ("smart", "plain")
            if attach is not None:  # rotate the three kinds
                kinds = ("plain", "smart", "gui")
                order = kinds[i % 3 :] + kinds[: i % 3]
            for kind in order:
                if kind == "gui":
                    wall, gui_last = _run_smart(
                        microscope, seq, workdir / f"gui-{i}", segmenter, attach
                    )
                    gui.append(wall)
                    gui_loop.append(gui_last.wall_time_s)
                elif kind == "plain":
                    out = workdir / f"plain-{i}.ome.zarr"
                    plain.append(_run_plain(microscope, seq, out))
                else:
                    last_dir = workdir / f"smart-{i}"
                    wall, last = _run_smart(microscope, seq, last_dir, segmenter)
                    smart.append(wall)
                    smart_loop.append(last.wall_time_s)
    finally:
        microscope.close()
    assert last is not None

    planned = sum(1 for _ in seq)
    stored = count_stored_frames(last_dir)
    plain_s = statistics.median(plain)
    smart_s = statistics.median(smart)
    ratio = smart_s / plain_s if plain_s > 0 else float("inf")
    latency = {
        key: last.latency_ms.get(key, {"p50": None, "p99": None})
        for key in ("frame_to_decision", "frame_to_detections")
    }
    result = {
        "benchmark": "loop",
        "device": "cpu",
        "segmenter": segmenter,
        "frames_planned": planned,
        "positions": len(seq.stage_positions),
        "exposure_ms": float(seq.channels[0].exposure or 0.0),
        "repeats": repeats,
        "plain_wall_s": round(plain_s, 4),
        "smart_wall_s": round(smart_s, 4),
        "smart_loop_s": round(statistics.median(smart_loop), 4),
        "ratio": round(ratio, 4),
        "goal_ratio": GOAL_RATIO,
        "meets_goal": bool(ratio <= GOAL_RATIO),
        "plain_runs_s": [round(x, 4) for x in plain],
        "smart_runs_s": [round(x, 4) for x in smart],
        "frames_acquired": last.frames_acquired,
        "frames_in_dataset": stored,
        "frames_missing": planned - stored,
        "frames_analysed": last.frames_analysed,
        "frames_dropped": last.frames_dropped,
        "latency_ms": latency,
        "versions": package_versions(),
        "cpu_count": os.cpu_count(),
    }
    if gui_last is not None:
        gui_s = statistics.median(gui)
        gui_ratio = gui_s / smart_s if smart_s > 0 else float("inf")
        result.update(
            gui_wall_s=round(gui_s, 4),
            gui_loop_s=round(statistics.median(gui_loop), 4),
            gui_runs_s=[round(x, 4) for x in gui],
            gui_ratio=round(gui_ratio, 4),
            gui_meets_goal=bool(gui_ratio <= GOAL_RATIO),
            gui_frames_acquired=gui_last.frames_acquired,
            gui_frames_dropped=gui_last.frames_dropped,
        )
    return result


# ----------------------------------------------------------------- segment
