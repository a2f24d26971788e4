"""Live-cell runs scored against the simulated specimen's ground truth.

`live_specimen_report` scores a finished run made on ``livecells.cfg`` (what
``smartscope run`` prints after such a run); `bench_livecell` runs the adaptive
live-cell experiment and fixed slow and fast time-lapses of the same specimen
over the same simulated time and compares them (``smartscope bench livecell``).
"""

from __future__ import annotations

import gc
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from smartscope._errors import ExperimentError
from smartscope.experiment import Experiment
from smartscope.runner import Runner, package_versions

if TYPE_CHECKING:
    from collections.abc import Callable

    from smartscope.sim.camera import LiveCellCamera

__all__ = [
    "GOALS",
    "bench_livecell",
    "live_experiment",
    "live_specimen_camera",
    "live_specimen_report",
]

#: Goals of `bench_livecell` (issue 4).
GOALS = {
    "adaptive_fraction_caught_min": 0.95,
    "adaptive_dose_ratio_to_fixed_fast_max": 0.30,
    "follow_fraction_within_min": 0.95,
}


def live_specimen_camera(runner: Runner) -> LiveCellCamera | None:
    """The `LiveCellCamera` of the runner's core, if it images a live specimen."""
    from pymmcore_plus.experimental.unicore import UniMMCore

    core = runner.microscope.core
    if not isinstance(core, UniMMCore):
        return None
    from smartscope.sim.camera import live_cell_camera

    try:
        return live_cell_camera(core)
    except LookupError:
        return None


def live_specimen_report(
    runner: Runner, *, fast_interval_s_run: float | None = None
) -> dict[str, Any] | None:
    """Score a finished run on a live specimen (see `LiveCellCamera.write_run_files`).

    The runner already wrote the files with the experiment's own fast interval
    (`Experiment.fast_interval_s`); this rewrites them with
    `fast_interval_s_run`. Call it after the run, before the microscope is
    closed.

    Returns
    -------
    dict | None
        The report, or None when the run's camera is not a `LiveCellCamera`.
    """
    camera = live_specimen_camera(runner)
    if camera is None:
        return None
    fast = fast_interval_s_run or runner.experiment.fast_interval_s()
    return camera.write_run_files(runner.directory, fast_interval_s=fast)


def live_experiment(
    kind: str,
    *,
    duration_s: float = 60.0,
    seed: int = 7,
    acceleration: float = 120.0,
    slow_interval_s: float = 2.5,
    fast_interval_s: float = 0.5,
) -> Experiment:
    """The live-mitosis demo (``kind="adaptive"``) or a fixed time-lapse of it.

    ``"adaptive"`` is ``demos/live_mitosis.yaml`` as shipped, with the run's
    duration, seed and acceleration set and its base interval set to
    `slow_interval_s`. ``"fixed_slow"`` / ``"fixed_fast"`` image the same four
    fields every `slow_interval_s` / `fast_interval_s` seconds, full frames, with
    no analysis and no policies. Times are run seconds; the specimen runs
    `acceleration` times faster.
    """
    from smartscope._resources import demos_dir

    demo = Experiment.from_file(demos_dir() / "live_mitosis.yaml")
    if kind not in ("adaptive", "fixed_slow", "fixed_fast"):
        raise ValueError(f"unknown live experiment kind {kind!r}")
    interval = fast_interval_s if kind == "fixed_fast" else slow_interval_s
    spec = demo.model_dump(mode="json", exclude={"source"})
    spec["sequence"] = demo.sequence.model_dump(mode="json", exclude_unset=True)
    spec["sequence"]["time_plan"] = {"interval": interval, "duration": duration_s}
    spec["properties"] = [
        p
        for p in spec["properties"]
        if p[0] != "Camera" or p[1] not in ("Seed", "Acceleration")
    ] + [["Camera", "Seed", str(seed)], ["Camera", "Acceleration", f"{acceleration:g}"]]
    spec["name"] = f"livecell_{kind}"
    spec["seed"] = seed
    spec["config"] = str(demo.config_path())
    if kind == "adaptive":
        for policy in spec["policies"]:
            if policy["name"] == "event_burst":
                policy["interval_s"] = fast_interval_s
    else:
        spec["policies"] = []
        spec["description"] = (
            f"Fixed time-lapse of the live_mitosis fields every {interval:g} s, "
            "no analysis (benchmark baseline)."
        )
        spec["analysis"] = {"enabled": False}
        spec["scheduler"] = {"travel_order": "plan"}  # the same order every round
    return Experiment.model_validate(spec)


def bench_livecell(
    *,
    duration_s: float = 60.0,
    seed: int = 7,
    acceleration: float = 120.0,
    slow_interval_s: float = 2.5,
    fast_interval_s: float = 0.5,
    out_dir: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
    load: bool = False,
) -> dict[str, Any]:
    """Compare the adaptive live-cell experiment with fixed slow and fast ones.

    The three runs image the same fixed-seed specimen (a fresh one each time)
    over the same simulated time. Each is scored against the ground truth with
    `live_specimen_report`. With `load`, one core is kept busy (a spinning
    process) during all three.

    Returns
    -------
    dict
        Per run: divisions in the imaged fields and the fraction caught at the
        fast rate inside their pre-division window (with each missed one: its
        time, place, when fast imaging of it began and its longest gap, in
        simulated seconds), total light dose the cells
        received, illumination, frames, cells harmed, tracking (followed cell
        within 10 % of the field width, track losses) and timepoint lateness
        (p50/p99/max, missed deadlines); then the adaptive/fixed-fast dose
        ratio and whether the goals (`GOALS`) are met.
    """
    from smartscope.bench._loop import busy_core

    results: dict[str, Any] = {}
    with (
        busy_core(load),
        tempfile.TemporaryDirectory(prefix="smartscope-bench-") as tmp,
    ):
        root = Path(out_dir) if out_dir else Path(tmp)
        for kind in ("adaptive", "fixed_slow", "fixed_fast"):
            if progress:
                progress(f"{kind}: {duration_s:g} s of acquisition")
            exp = live_experiment(
                kind,
                duration_s=duration_s,
                seed=seed,
                acceleration=acceleration,
                slow_interval_s=slow_interval_s,
                fast_interval_s=fast_interval_s,
            )
            results[kind] = _run_scored(exp, root / kind, fast_interval_s)
    fast_dose = results["fixed_fast"]["total_cell_dose_ms"]
    ratio = results["adaptive"]["total_cell_dose_ms"] / fast_dose if fast_dose else None
    caught = results["adaptive"]["fraction_caught"]
    follow = results["adaptive"]["follow_fraction_within"]
    goals = {
        "adaptive_fraction_caught": caught is not None
        and caught >= GOALS["adaptive_fraction_caught_min"],
        "adaptive_dose_ratio": ratio is not None
        and ratio <= GOALS["adaptive_dose_ratio_to_fixed_fast_max"],
        "follow_within_10pct": follow is not None
        and follow >= GOALS["follow_fraction_within_min"],
    }
    return {
        "benchmark": "livecell",
        "seed": seed,
        "acceleration": acceleration,
        "run_seconds": duration_s,
        "simulated_minutes": duration_s * acceleration / 60,
        "slow_interval_s": slow_interval_s,
        "fast_interval_s": fast_interval_s,
        "load": "one core kept busy" if load else None,
        "runs": results,
        "adaptive_dose_ratio_to_fixed_fast": None if ratio is None else round(ratio, 4),
        "goals": GOALS,
        "goals_met": goals,
        "all_goals_met": all(goals.values()),
        "versions": package_versions(),
    }


def _run_scored(exp: Experiment, out: Path, fast: float) -> dict[str, Any]:
    runner = Runner(exp, out_dir=out, overwrite=True)
    try:
        summary = runner.run()
        report = live_specimen_report(runner, fast_interval_s_run=fast)
        follow_lost = sum(
            getattr(p, "n_lost", 0)
            for p in runner.policies
            if p.name == "track_and_follow"
        )
    finally:
        runner.close()
        del runner
        gc.collect()
    if report is None:
        raise ExperimentError(
            f"{exp.name}: the camera is not a LiveCellCamera (use livecells.cfg)"
        )
    sched = summary.schedule
    follow = next(iter(report["follow"].values()), None)
    div, dose = report["divisions"], report["dose"]
    return {
        "status": summary.status,
        "divisions": div["n_divisions"],
        "caught": div["n_caught"],
        "fraction_caught": div["fraction_caught"],
        "missed": div["missed"],
        "total_cell_dose_ms": round(dose["total_cell_dose_ms"], 1),
        "illumination_ms_mm2": round(dose["illumination_ms_mm2"], 3),
        "frames": report["frames"],
        "cells_harmed": dose["cells_harmed"],
        "cells_dead": dose["cells_dead"],
        "follow_fraction_within": None if follow is None else follow["fraction_within"],
        "follow_frames": None if follow is None else follow["n_frames"],
        "follow_lost_frames": None if follow is None else follow["lost"],
        "track_losses": follow_lost,
        "lateness_s": sched.get("lateness_s"),
        "missed_deadlines": sched.get("missed_deadlines"),
        "dose_refusals": sched.get("dose_refusals"),
        "analysis_drops": summary.frames_dropped,
        "wall_time_s": summary.wall_time_s,
    }
