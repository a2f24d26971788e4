"""``smartscope bench loop``: the smart loop against plain pymmcore-plus.

The same events in the same order in every arm, on one already loaded
`Microscope`: ``bare`` (``core.mda.run`` without output: the hardware limit of
event-by-event acquisition), ``ome_zarr`` (``core.run_mda`` writing OME-Zarr,
what a plain pymmcore-plus user gets) and ``smartscope`` (a `Runner` with the
segmenter attached, no policies), at 1 position (a time-lapse at one place,
frames as fast as the camera goes) and at 4 (a t-major time-lapse, visited
round-robin as pymmcore-plus does). Every arm runs event by event (hardware
sequencing off; `smartscope bench burst` measures camera sequences). The arms
alternate over the repeats; each arm's event order is recorded and compared.
The result is a JSON-ready dict.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from smartscope.experiment import Experiment, SegmenterSpec
from smartscope.microscope import Microscope
from smartscope.rundir import load_run, read_position
from smartscope.runner import Runner, RunSummary, package_versions

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

    from useq import MDASequence

__all__ = [
    "GOAL_P50_MS",
    "GOAL_P99_MS",
    "GOAL_RATIO",
    "base_sequence",
    "bench_loop",
    "count_stored_frames",
]

GOAL_RATIO = 1.05
"""Largest acceptable smartscope / bare acquisition wall-time ratio."""
GOAL_P50_MS = 80.0
"""Goal for the frame→decision latency, median (ms)."""
GOAL_P99_MS = 150.0
"""Goal for the frame→decision latency, 99th percentile (ms)."""

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
    arrays: dict[str, np.ndarray | None] = {}
    count = 0
    for record in load_run(run_dir).frames:
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


def _order_of(microscope: Microscope) -> tuple[list[tuple[int, ...]], Callable]:
    """Record the ``(p, t)`` index of every frame the core acquires."""
    order: list[tuple[int, ...]] = []

    def on_frame(img: Any, event: Any, *_: Any) -> None:
        order.append((event.index.get("p", 0), event.index.get("t", 0)))

    microscope.core.mda.events.frameReady.connect(on_frame)
    return order, on_frame


def _run_pymmcore(
    microscope: Microscope, seq: MDASequence, output: Path | None
) -> tuple[float, list[tuple[int, ...]]]:
    """Plain pymmcore-plus, event by event; wall seconds and the frame order."""
    core = microscope.core
    engine = core.mda.engine
    if engine is not None and hasattr(engine, "use_hardware_sequencing"):
        engine.use_hardware_sequencing = False  # as the smart arm (an iterator)
    order, on_frame = _order_of(microscope)
    try:
        t0 = time.perf_counter()
        if output is None:
            core.mda.run(seq)
        else:
            core.run_mda(seq, output=str(output), block=True)
        wall = time.perf_counter() - t0
    finally:
        core.mda.events.frameReady.disconnect(on_frame)
    return wall, order


def _run_smart(
    microscope: Microscope,
    seq: MDASequence,
    out_dir: Path,
    segmenter: dict[str, Any],
    attach: Callable[[Runner], Callable[[], RunSummary]] | None = None,
) -> tuple[float, RunSummary, list[tuple[int, ...]], str]:
    """A smartscope run with the segmenter attached and no policies.

    Returns the acquisition's wall seconds (from `Runner.start` to the last
    frame: what the other arms time; analysis still draining afterwards is
    not acquisition), the summary, the frame order and the segmenter's device.
    With `attach`,
    ``attach(runner)`` (the live window) is set up before the clock starts and
    the whole of its returned ``run()`` is timed.
    """
    experiment = Experiment.model_validate(
        {
            "name": "bench-loop",
            "config": str(microscope.config_path),
            "sequence": seq,
            "segmenter": segmenter,
            "policies": [],
            "analysis": {"analyze": "all"},
            # event by event, as the pymmcore-plus arms: the same work (a
            # camera sequence is `bench burst`'s subject)
            "scheduler": {"travel_order": "plan", "sequence": "off"},
        }
    )
    order, on_frame = _order_of(microscope)
    try:
        # the runner leaves a microscope it was given open
        with Runner(
            experiment, microscope=microscope, out_dir=out_dir, overwrite=True
        ) as runner:
            device = str(getattr(runner.segmenter, "device_name", "cpu"))
            if attach is None:
                t0 = time.perf_counter()
                runner.start()
                runner.wait()
                wall = time.perf_counter() - t0
                summary = runner.finish()
            else:
                run = attach(runner)
                t0 = time.perf_counter()
                summary = run()
                wall = time.perf_counter() - t0
    finally:
        microscope.core.mda.events.frameReady.disconnect(on_frame)
    if summary.status != "completed":
        raise RuntimeError(f"smart benchmark run {summary.status}: {summary.reason}")
    return wall, summary, order, device


def bench_loop(
    *,
    config: str | Path | None = None,
    frames: int = 60,
    exposure_ms: float = 10.0,
    repeats: int = 3,
    segmenter: str = "unet",
    device: str = "auto",
    workdir: Path | None = None,
    positions: int | Sequence[int] = (1, 4),
    attach: Callable[[Runner], Callable[[], RunSummary]] | None = None,
    load: bool = False,
) -> dict[str, Any]:
    """Wall time, frames and decision latency of smartscope against pymmcore-plus.

    For each count in `positions`, `base_sequence` (`frames` frames over that
    many positions, one channel, no waits) is acquired by three arms on one
    `Microscope` (loaded once, so load time is not counted), alternating over
    `repeats` rounds after one short untimed warm-up round of each:

    - ``bare``: ``core.mda.run(seq)``, no output, hardware sequencing off;
    - ``ome_zarr``: ``core.run_mda(seq, output=...)``;
    - ``smartscope``: a `Runner` with `segmenter` and no policies, every frame
      offered to analysis (frames no policy needs are skipped for fresher ones
      when the model falls behind, and counted).

    Parameters
    ----------
    config : str | Path, optional
        Micro-Manager config (default: the demo microscope).
    frames : int
        Frames per run.
    exposure_ms : float
        Exposure of every frame, ms.
    repeats : int
        Timed runs of each arm.
    segmenter : str
        Registered segmenter name (default parameters; ``unet``: the built-in
        model on `device`).
    device : str
        ``auto``, ``cpu`` or ``cuda``, for the ``unet`` segmenter.
    workdir : Path, optional
        Where the runs are written (kept); default: a temporary directory.
    positions : int or sequence of int
        Stage position counts to run (each at most `frames`' largest divisor
        not above it; the demo XY stage takes ~80 ms per move).
    attach : callable, optional
        ``attach(runner) -> run`` (``smartscope.gui.attach_window``): a fourth
        arm, smartscope with the live window attached (offscreen).
    load : bool
        Keep one core busy (a spinning process) while measuring: the machine
        is shared in real life.

    Returns
    -------
    dict
        JSON-ready. ``cases`` has, per position count, each arm's median wall
        time, its runs, ``ratio_to_bare``, frames stored, and for smartscope
        the frames analysed and skipped by reason, the frame age at decision
        and frame→decision p50/p99; ``same_order`` says whether every arm
        acquired the same events in the same order. ``exposure_limited_s`` is
        the physical limit (frames × exposure). ``goals`` holds each goal and
        whether it is met.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be ≥ 1, got {repeats}")
    if exposure_ms <= 0:
        raise ValueError(f"exposure_ms must be > 0, got {exposure_ms}")
    counts = [positions] if isinstance(positions, int) else list(positions)
    spec: dict[str, Any] = {"name": segmenter}
    if segmenter == "unet":
        spec["device"] = device
    SegmenterSpec.checked(spec)
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="smartscope-bench-") as tmp:
            return _bench_loop(
                config, frames, exposure_ms, counts, repeats, spec, Path(tmp),
                attach, load,
            )  # fmt: skip
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    return _bench_loop(
        config, frames, exposure_ms, counts, repeats, spec, workdir, attach, load
    )


#: spins until its parent (the pid given) is gone: it is then re-parented
_SPIN = """
import os, sys
parent = int(sys.argv[1])
while os.getppid() == parent:
    for _ in range(100_000):
        pass
"""


@contextmanager
def busy_core(load: bool) -> Iterator[None]:
    """With `load`, a process spins on one core for the block (a shared machine).

    The spinner also ends when this process does, however it ends (a killed
    benchmark must not leave a core busy behind it).
    """
    if not load:
        yield
        return
    spinner = subprocess.Popen(
        [sys.executable, "-c", _SPIN, str(os.getpid())],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
    )
    try:
        yield
    finally:
        spinner.kill()
        spinner.wait()


def _bench_loop(
    config: str | Path | None,
    frames: int,
    exposure_ms: float,
    counts: list[int],
    repeats: int,
    segmenter: dict[str, Any],
    workdir: Path,
    attach: Callable[[Runner], Callable[[], RunSummary]] | None,
    load: bool,
) -> dict[str, Any]:
    cases: dict[str, Any] = {}
    device = "cpu"
    with busy_core(load), Microscope(config) as microscope:
        for n in counts:
            seq = base_sequence(frames, exposure_ms, max_positions=n)
            warm = base_sequence(
                min(frames, _WARMUP_FRAMES * n), exposure_ms, max_positions=n
            )
            case, device = _bench_case(
                microscope, seq, warm, repeats, segmenter, workdir / f"p{n}", attach
            )
            cases[str(len(seq.stage_positions))] = case
    goals: dict[str, bool] = {}
    for key, case in cases.items():
        smart = case["arms"]["smartscope"]
        lat = smart["frame_to_decision_ms"]
        goals[f"{key}_positions_ratio<={GOAL_RATIO}"] = bool(
            smart["ratio_to_bare"] <= GOAL_RATIO
        )
        if lat["p50"] is not None:
            goals[f"{key}_positions_p50<={GOAL_P50_MS:g}ms"] = lat["p50"] <= GOAL_P50_MS
            goals[f"{key}_positions_p99<={GOAL_P99_MS:g}ms"] = lat["p99"] <= GOAL_P99_MS
        goals[f"{key}_positions_no_frame_missing"] = smart["frames_missing"] == 0
        goals[f"{key}_positions_same_order"] = case["same_order"]
    last = cases[str(list(cases)[-1])]
    smart = last["arms"]["smartscope"]
    result: dict[str, Any] = {
        "benchmark": "loop",
        "device": device,
        "segmenter": segmenter["name"],
        "frames": frames,
        "exposure_ms": exposure_ms,
        "exposure_limited_s": round(frames * exposure_ms / 1000.0, 4),
        "repeats": repeats,
        "load": "one core kept busy" if load else None,
        "cases": cases,
        "goals": goals,
        "meets_goals": all(goals.values()),
        # the last case, flat (earlier versions' keys)
        "smart_wall_s": smart["wall_s"],
        "ratio": smart["ratio_to_bare"],
        "frames_missing": smart["frames_missing"],
        "versions": package_versions(),
        "cpu_count": os.cpu_count(),
    }
    if "gui" in last["arms"]:
        gui = last["arms"]["gui"]
        result.update(
            gui_wall_s=gui["wall_s"],
            gui_ratio=round(gui["wall_s"] / smart["wall_s"], 4),
            gui_meets_goal=bool(gui["wall_s"] / smart["wall_s"] <= GOAL_RATIO),
            gui_frames_acquired=gui["frames_acquired"],
            gui_frames_dropped=gui["frames_not_analysed"],
        )
    return result


def _bench_case(
    microscope: Microscope,
    seq: MDASequence,
    warm: MDASequence,
    repeats: int,
    segmenter: dict[str, Any],
    workdir: Path,
    attach: Callable[[Runner], Callable[[], RunSummary]] | None,
) -> tuple[dict[str, Any], str]:
    workdir.mkdir(parents=True, exist_ok=True)
    kinds = ["bare", "ome_zarr", "smartscope"] + (["gui"] if attach else [])
    walls: dict[str, list[float]] = {k: [] for k in kinds}
    orders: dict[str, list[tuple[int, ...]]] = {}
    last: dict[str, RunSummary] = {}
    dirs: dict[str, Path] = {}
    devices: list[str] = ["cpu"]

    def one(kind: str, sequence: MDASequence, tag: str) -> float:
        out = workdir / f"{kind}-{tag}"
        if kind == "bare":
            wall, order = _run_pymmcore(microscope, sequence, None)
        elif kind == "ome_zarr":
            wall, order = _run_pymmcore(
                microscope, sequence, out.with_suffix(".ome.zarr")
            )
        else:
            wall, summary, order, dev = _run_smart(
                microscope, sequence, out, segmenter, attach if kind == "gui" else None
            )
            last[kind], dirs[kind] = summary, out
            devices.append(dev)
        orders[kind] = order
        return wall

    for kind in kinds:  # untimed: imports, zarr set-up, segmenter caches
        one(kind, warm, "warmup")
    for i in range(repeats):
        for kind in kinds[i % len(kinds) :] + kinds[: i % len(kinds)]:
            walls[kind].append(one(kind, seq, str(i)))

    planned = [(e.index.get("p", 0), e.index.get("t", 0)) for e in seq]
    bare_s = statistics.median(walls["bare"])
    arms: dict[str, Any] = {}
    for kind in kinds:
        wall = statistics.median(walls[kind])
        arm: dict[str, Any] = {
            "wall_s": round(wall, 4),
            "runs_s": [round(x, 4) for x in walls[kind]],
            "ratio_to_bare": round(wall / bare_s, 4) if bare_s > 0 else None,
            "frames_per_s": round(len(planned) / wall, 2) if wall > 0 else None,
        }
        if kind == "ome_zarr":
            out = workdir / f"ome_zarr-{repeats - 1}.ome.zarr"
            arm["frames_stored"] = _frames_in_ome_zarr(out)
        if kind in last:
            summary = last[kind]
            stored = count_stored_frames(dirs[kind])
            analysis = summary.analysis
            arm.update(
                frames_acquired=summary.frames_acquired,
                frames_stored=stored,
                frames_missing=len(planned) - stored,
                frames_analysed=summary.frames_analysed,
                frames_not_analysed=summary.frames_dropped,
                frames_skipped=analysis.get("skipped", {}),
                age_at_decision_ms=analysis.get("age_at_decision_ms", {}),
                frame_to_decision_ms=summary.latency_ms.get(
                    "frame_to_decision", {"p50": None, "p99": None}
                ),
                frame_to_detections_ms=summary.latency_ms.get(
                    "frame_to_detections", {"p50": None, "p99": None}
                ),
                loop_s=round(summary.wall_time_s, 4),
            )
        arms[kind] = arm
    case = {
        "positions": len(seq.stage_positions),
        "frames": len(planned),
        "same_order": all(orders[k] == planned for k in kinds),
        "arms": arms,
    }
    return case, devices[-1]


def _frames_in_ome_zarr(path: Path) -> int | None:
    """Frames with data in the OME-Zarr plain pymmcore-plus wrote (all arrays)."""
    import tensorstore as ts

    count = 0
    arrays = [p.parent for p in path.rglob("zarr.json") if p.parent.name == "0"]
    if not arrays:
        return None
    for array in arrays:
        store = ts.open(
            {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(array)}}
        ).result()
        data = np.asarray(store.read().result())
        planes = data.reshape(-1, *data.shape[-2:])
        count += int(sum(bool(np.any(p)) for p in planes))
    return count
