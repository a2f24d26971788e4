"""Headless plate screening, scored against the simulated plate's ground truth.

`bench_screen` runs ``demos/plate_screen.yaml`` (skip empty wells, well quota,
per-well autofocus, targeted Z-stacks of hit cells) on ``plate.cfg`` and the
same wells as two fixed plans (every field: without analysis, and with software
autofocus per well), and scores the smart run against the `PlateSpecimen`'s
truth; then it measures the `Scheduler` alone on
large plate plans (no hardware): overhead per event and peak memory
(``smartscope bench screen``).
"""

from __future__ import annotations

import gc
import itertools
import math
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import TYPE_CHECKING, Any

import useq
from useq import MDAEvent, MDASequence

from smartscope.experiment import Experiment
from smartscope.frame import well_of
from smartscope.rundir import load_run, read_position
from smartscope.runner import Runner, package_versions
from smartscope.scheduler import AddEvents, Scheduler, SkipWell

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["GOALS", "bench_screen", "scheduler_overhead", "screen_experiment"]

#: Goals of `bench_screen` (issue 5).
GOALS = {
    "scheduler_us_per_event_max": 1000.0,
    "hit_recall_min": 1.0,
    "hit_precision_min": 1.0,
    # Scheduler peak memory, largest plan / smallest plan (16x the fields)
    "memory_growth_max": 1.5,
}


def screen_experiment(kind: str = "smart", *, wells: int | None = None) -> Experiment:
    """``demos/plate_screen.yaml`` (``"smart"``) or a fixed plan of its wells.

    `wells` keeps the first wells of the demo's selection. ``"fixed"`` images
    every field of the same wells with no analysis and no policies (at the
    plan's Z: out of focus wherever a well's focus is elsewhere);
    ``"fixed_autofocus"`` every field too, with the demo's ``object_autofocus``
    as the only policy (a conventional screen with software autofocus per well;
    fields do not wait for analysis).
    """
    from smartscope._resources import demos_dir

    if kind not in ("smart", "fixed", "fixed_autofocus"):
        raise ValueError(f"unknown screen experiment kind {kind!r}")
    demo = Experiment.from_file(demos_dir() / "plate_screen.yaml")
    spec = demo.model_dump(mode="json", exclude={"source"})
    spec["sequence"] = demo.sequence.model_dump(mode="json", exclude_unset=True)
    spec["config"] = str(demo.config_path())
    if wells is not None:
        rows, cols = spec["sequence"]["stage_positions"]["selected_wells"]
        spec["sequence"]["stage_positions"]["selected_wells"] = [
            rows[:wells],
            cols[:wells],
        ]
    spec["name"] = f"screen_{kind}"
    if kind == "fixed":
        spec["policies"] = []
        spec["analysis"] = {"enabled": False}
        spec["scheduler"] = {"travel_order": "plan"}
        spec["description"] = "Every field of the plate_screen wells (baseline)."
    elif kind == "fixed_autofocus":
        spec["policies"] = [
            p for p in spec["policies"] if p["name"] == "object_autofocus"
        ]
        spec["scheduler"] = {**spec["scheduler"], "max_analysis_lag": None}
        spec["description"] = "Every field, software autofocus per well (baseline)."
    return Experiment.model_validate(spec)


def _run(exp: Experiment, out: Path) -> dict[str, Any]:
    from smartscope.sim.plate_device import plate_camera

    runner = Runner(exp, out_dir=out, overwrite=True)
    try:
        summary = runner.run()
        reports = {
            p.name: p.report()
            for p in runner.policies
            if callable(getattr(p, "report", None))
        }
        truth = plate_camera(runner.microscope.core).specimen.ground_truth(wells=[])
    finally:
        runner.close()
        del runner
        gc.collect()
    frames = load_run(out).frames
    return {
        "summary": summary,
        "reports": reports,
        "truth": {w["id"]: w for w in truth["wells"]},
        "frames": frames,
    }


def _plan_fields(exp: Experiment) -> dict[str, list[tuple[float, float]]]:
    """Per well, in plan order: the stage XY of each field."""
    out: dict[str, list[tuple[float, float]]] = {}
    for pos in exp.sequence.stage_positions:
        well = well_of(str(pos.name))
        out.setdefault(well, []).append((float(pos.x or 0.0), float(pos.y or 0.0)))
    return out


def _travel(points: list[tuple[float, float]]) -> float:
    return sum(math.dist(a, b) for a, b in itertools.pairwise(points))


def _plate_screen(
    wells: int | None, root: Path, progress: Callable[[str], None] | None
) -> dict[str, Any]:
    smart_exp = screen_experiment("smart", wells=wells)
    fixed_exp = screen_experiment("fixed", wells=wells)
    if progress:
        progress("plate screen: smart run")
    smart = _run(smart_exp, root / "smart")
    if progress:
        progress("plate screen: fixed plan (every field, no analysis)")
    fixed = _run(fixed_exp, root / "fixed")
    if progress:
        progress("plate screen: fixed plan with autofocus per well")
    fixed_af = _run(screen_experiment("fixed_autofocus", wells=wells), root / "af")
    runs = {"smart": smart, "fixed": fixed, "fixed_autofocus": fixed_af}
    if progress:
        progress("plate screen: segmenting the fixed plan's fields afterwards")
    offline_s = _offline_analysis_s(smart_exp, root / "fixed", fixed["frames"])

    plan = _plan_fields(smart_exp)
    selected = list(plan)
    planned = sum(len(v) for v in plan.values())
    base = [f for f in smart["frames"] if f["kind"] == "base"]
    imaged: dict[str, set[str]] = {w: set() for w in selected}
    for f in base:
        imaged.setdefault(well_of(f["position"]), set()).add(f["position"])
    n_imaged = sum(len(v) for v in imaged.values())
    kinds: dict[str, int] = {}
    for f in smart["frames"]:
        kinds[f["kind"]] = kinds.get(f["kind"], 0) + 1

    truth = smart["truth"]
    true_hits = {w for w in selected if truth[w]["hit"]}
    empty = [w for w in selected if truth[w]["empty"]]
    found = set(smart["reports"].get("hit_detection", {}).get("hits", []))
    tp = len(found & true_hits)
    recall = tp / len(true_hits) if true_hits else None
    precision = tp / len(found) if found else (None if not true_hits else 0.0)

    quota = smart["reports"].get("well_quota", {})
    max_fields = quota.get("max_fields")
    wells_q = quota.get("wells", {})
    met = [
        w
        for w in selected
        if not truth[w]["empty"]
        and str(wells_q.get(w, {}).get("stopped", "")).startswith(
            ("cell quota", "field quota")
        )
    ]
    over = [w for w in selected if max_fields and len(imaged[w]) > max_fields]
    focus = smart["reports"].get("object_autofocus", {}).get("wells", {})
    focus_err = [
        abs(focus[w]["z_um"] - truth[w]["focus_um"])
        for w in selected
        if w in focus and focus[w]["z_um"] is not None
    ]

    s_sum, f_sum = smart["summary"], fixed["summary"]
    per_field_fixed = f_sum.wall_time_s / max(f_sum.frames_acquired, 1)
    by_kind = {name: _time_by_kind(run["frames"]) for name, run in runs.items()}
    in_focus = {
        name: _in_focus_fraction(run["frames"], truth) for name, run in runs.items()
    }
    # row-major (the plan's own well order) vs the order of the plan's selection
    row_major = sorted(selected, key=lambda w: (w[0], int(w[1:])))
    return {
        "wells": selected,
        "truth": {"hits": sorted(true_hits), "empty": empty},
        "fields_planned": planned,
        "fields_imaged": n_imaged,
        "fields_imaged_fraction": round(n_imaged / planned, 4),
        "frames": kinds,
        "smart_wall_s": s_sum.wall_time_s,
        "fixed_wall_s": f_sum.wall_time_s,
        "fixed_s_per_field": round(per_field_fixed, 4),
        "fixed_autofocus_wall_s": fixed_af["summary"].wall_time_s,
        # the fixed plan's fields still have to be segmented; the other runs
        # analysed every frame as it came
        "fixed_offline_analysis_s": offline_s,
        "time_to_results_s": {
            "smart": s_sum.wall_time_s,
            "fixed": round(f_sum.wall_time_s + offline_s, 3),
            "fixed_autofocus": fixed_af["summary"].wall_time_s,
        },
        "time_saved_s": round(f_sum.wall_time_s - s_sum.wall_time_s, 3),
        "time_saved_vs_fixed_autofocus_s": round(
            fixed_af["summary"].wall_time_s - s_sum.wall_time_s, 3
        ),
        "time_by_kind_s": by_kind,
        # the survey (base fields and autofocus) against the conventional screen,
        # before the smart run spends time on hit targets the fixed plans lack
        "survey_time_saved_vs_fixed_autofocus_s": round(
            fixed_af["summary"].wall_time_s
            - (s_sum.wall_time_s - by_kind["smart"].get("hit", 0.0)),
            3,
        ),
        "base_fields_in_focus": in_focus,
        "base_imaging_saved_s": round((planned - n_imaged) * per_field_fixed, 3),
        "hits_found": sorted(found),
        "hit_recall": recall,
        "hit_precision": precision,
        "targets_imaged": kinds.get("hit", 0),
        "empty_wells_fields_imaged": {w: len(imaged[w]) for w in empty},
        "wells_meeting_quota": len(met),
        "wells_with_cells": sum(not truth[w]["empty"] for w in selected),
        "wells_over_max_fields": over,
        "autofocus_error_um": {
            "max": round(max(focus_err), 3) if focus_err else None,
            "wells": len(focus_err),
        },
        "frames_dropped": s_sum.frames_dropped,
        "status": {name: run["summary"].status for name, run in runs.items()},
        "travel_um": {
            "smart": s_sum.schedule.get("travel_um"),
            "fixed": f_sum.schedule.get("travel_um"),
            "fixed_row_major": round(
                _travel([xy for w in row_major for xy in plan[w]]), 1
            ),
        },
    }


def _offline_analysis_s(
    exp: Experiment, run_dir: Path, frames: list[dict[str, Any]]
) -> float:
    """Seconds to segment and measure a run's base frames afterwards.

    Reads each frame back and runs the experiment's segmenter and the object
    measurement the live analysis does, one frame after the other.
    """
    from smartscope.detections import Detections
    from smartscope.stream import warm_up

    segmenter = exp.segmenter.build()
    positions = dict.fromkeys(f["position"] for f in frames if f["kind"] == "base")
    warmed = False
    t0 = time.perf_counter()
    for position in positions:
        data = read_position(run_dir, position)
        if not warmed:  # imports and caches are not analysis time
            t_warm = warm_up(segmenter, data.shape[-2:])
            t0 += t_warm
            warmed = True
        for plane in data.reshape(-1, *data.shape[-2:]):
            labels = segmenter.segment(plane[None]).labels[0]
            Detections.from_labels(labels, plane)
    return round(time.perf_counter() - t0, 3)


#: A field is in focus within this of its well's focus (µm): on the simulated
#: plate (0.5 µm of blur per µm of defocus) a blur of at most 1 µm (1 px).
IN_FOCUS_UM = 2.0


def _in_focus_fraction(
    frames: list[dict[str, Any]], truth: dict[str, dict[str, Any]]
) -> float | None:
    """Fraction of base frames imaged within `IN_FOCUS_UM` of their well's focus."""
    base = [f for f in frames if f["kind"] == "base"]
    ok = [
        abs(float(f["stage_z_um"] or 0.0) - truth[well]["focus_um"]) <= IN_FOCUS_UM
        for f in base
        if (well := well_of(f["position"])) in truth
    ]
    return round(sum(ok) / len(ok), 4) if ok else None


def _time_by_kind(frames: list[dict[str, Any]]) -> dict[str, float]:
    """Seconds of the run spent on each frame kind.

    Each gap between frames goes to the later frame's kind: base fields include
    the wait for their analysis (``max_analysis_lag``).
    """
    out: dict[str, float] = {}
    before = 0.0
    for f in sorted(frames, key=lambda f: f["frame_index"]):
        t = float(f["t_acquired"])
        out[f["kind"]] = out.get(f["kind"], 0.0) + t - before
        before = t
    return {k: round(v, 3) for k, v in out.items()}


def _big_plan(plate: str, rows: int, columns: int) -> MDASequence:
    wp = useq.WellPlatePlan(
        plate=plate,
        a1_center_xy=(0.0, 0.0),
        well_points_plan=useq.GridRowsColumns(
            rows=rows, columns=columns, fov_width=300, fov_height=300
        ),
    )
    return MDASequence(stage_positions=wp, channels=[{"config": "DAPI"}])


def _drive(plan: MDASequence) -> tuple[int, int, int]:
    """Iterate a Scheduler over `plan`, adding and skipping now and then.

    Every 100th event adds a 3-event target at the stage; every 10th well is
    skipped after its first field (a plate plan reads well by well, so a new
    well is one whose name differs from the last). Returns events served,
    added, skipped.
    """
    sched = Scheduler(plan, clock=lambda: 0.0, travel_order="nearest")
    served = added = n_wells = 0
    last_well = ""
    for event in sched:
        served += 1
        key = str(event.metadata["smartscope"]["position"])
        well = well_of(key)
        if event.metadata["smartscope"]["kind"] == "base" and well != last_well:
            last_well = well
            n_wells += 1
            if n_wells % 10 == 0:
                sched.apply(SkipWell(well, reason="bench"))
        if served % 100 == 0:
            targets = tuple(
                MDAEvent(x_pos=event.x_pos, y_pos=event.y_pos, pos_name=f"t{served}")
                for _ in range(3)
            )
            added += len(sched.apply(AddEvents(targets, priority=10)).scheduled)
    return served, added, sched.n_skipped


def scheduler_overhead(
    plans: tuple[tuple[str, int, int], ...] = (
        ("96-well", 3, 3),
        ("384-well", 3, 3),
        ("384-well", 6, 6),
    ),
) -> dict[str, Any]:
    """µs per event and peak memory of a Scheduler over plate plans, no hardware.

    Each plan (plate, field rows, field columns) is iterated timed, then under
    `tracemalloc`: ``peak_mb`` is the peak of everything allocated from the
    Scheduler's construction to its end, useq's reading of the plan included;
    ``useq_peak_mb`` the peak of useq iterating the same plan alone (its
    ``itertools.product`` holds a copy of the plan's positions while it runs:
    the plan's own size); ``scheduler_peak_mb`` the difference, what running
    the plan costs on top of the plan itself. ``peak_bytes_per_field`` is
    ``peak_mb`` per field, for reference.
    """
    out: dict[str, Any] = {}
    for plate, rows, columns in plans:
        plan = _big_plan(plate, rows, columns)
        n_fields = sum(1 for _ in plan.stage_positions)  # type: ignore[union-attr]
        t0 = time.perf_counter()
        served, added, skipped = _drive(plan)
        elapsed = time.perf_counter() - t0
        t0 = time.perf_counter()
        n_plain = sum(1 for _ in plan)  # useq's own iteration, for reference
        plain = time.perf_counter() - t0
        peak = _traced_peak(_drive, plan)
        useq_peak = _traced_peak(_count, plan)
        out[f"{plate.split('-')[0]}x{rows * columns}"] = {
            "fields": n_fields,
            "events_served": served,
            "events_added": added,
            "events_skipped": skipped,
            "us_per_event": round(1e6 * elapsed / served, 1),
            "useq_only_us_per_event": round(1e6 * plain / max(n_plain, 1), 1),
            "peak_mb": round(peak / 1e6, 3),
            "useq_peak_mb": round(useq_peak / 1e6, 3),
            "scheduler_peak_mb": round(max(peak - useq_peak, 0) / 1e6, 3),
            "peak_bytes_per_field": round(peak / n_fields, 1),
        }
    return out


def _count(plan: MDASequence) -> int:
    return sum(1 for _ in plan)


def _traced_peak(func: Callable[[MDASequence], Any], plan: MDASequence) -> int:
    """Peak bytes `tracemalloc` sees while ``func(plan)`` runs."""
    gc.collect()
    tracemalloc.start()
    try:
        func(plan)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak


def bench_screen(
    *,
    wells: int | None = None,
    plans: tuple[tuple[str, int, int], ...] | None = None,
    out_dir: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Plate screen vs fixed plan on plate.cfg, and the Scheduler on big plans.

    Parameters
    ----------
    wells : int, optional
        Keep the first `wells` wells of the demo's selection (default: all 12).
    plans : tuple of (plate, rows, columns), optional
        Plans of the scheduler measurements (default 96×9, 384×9, 384×36).
    out_dir : str | Path, optional
        Keep both runs (data, logs) in this folder.
    progress : callable, optional
        Called with a line before each step.

    Returns
    -------
    dict
        ``screen``: fields imaged vs planned; wall times of the smart run and
        of both fixed plans (`screen_experiment`) and the time saved against
        each; seconds per frame kind (base fields with their analysis wait,
        autofocus, hit targets); the fraction of base fields imaged in focus
        (within `IN_FOCUS_UM` of the well's true focus); hits found vs the
        truth (recall, precision), wells meeting their quota, empty wells'
        fields, autofocus error, stage travel (smart, fixed, row-major order).
        ``scheduler``: per plan, µs per event and peak memory (MB: in all,
        useq's reading of the plan alone, the Scheduler's own; bytes per
        field). ``scheduler_memory_growth``: the Scheduler's own peak on the
        last plan over the first (flat: at most ``GOALS["memory_growth_max"]``).
        ``goals_met``.
    """
    tmp = tempfile.TemporaryDirectory(prefix="smartscope-bench-")
    root = Path(out_dir) if out_dir else Path(tmp.name)
    try:
        screen = _plate_screen(wells, root, progress)
    finally:
        tmp.cleanup()
    if progress:
        progress("scheduler: overhead and memory on large plans, no hardware")
    sched = scheduler_overhead(plans) if plans else scheduler_overhead()
    worst_us = max(v["us_per_event"] for v in sched.values())
    peaks = [v["scheduler_peak_mb"] for v in sched.values()]
    growth = peaks[-1] / peaks[0] if peaks[0] > 0 else math.inf
    recall, precision = screen["hit_recall"], screen["hit_precision"]
    goals = {
        "scheduler_overhead": worst_us <= GOALS["scheduler_us_per_event_max"],
        "hit_recall": recall is None or recall >= GOALS["hit_recall_min"],
        "hit_precision": precision is None or precision >= GOALS["hit_precision_min"],
        "empty_wells_one_field": all(
            n <= 1 for n in screen["empty_wells_fields_imaged"].values()
        ),
        "quota_held": not screen["wells_over_max_fields"],
        "fewer_fields": screen["fields_imaged"] < screen["fields_planned"],
        "memory_flat": growth <= GOALS["memory_growth_max"],
    }
    return {
        "benchmark": "screen",
        "screen": screen,
        "scheduler": sched,
        "scheduler_worst_us_per_event": worst_us,
        "scheduler_memory_growth": round(growth, 3),
        "goals": GOALS,
        "goals_met": goals,
        "all_goals_met": all(goals.values()),
        "versions": package_versions(),
    }
