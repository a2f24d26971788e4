"""Headless plate screening, scored against the simulated plate's ground truth.

`bench_screen` runs ``demos/plate_screen.yaml`` (skip empty wells, well quota,
per-well autofocus, targeted Z-stacks of hit cells) on ``plate.cfg`` and the
same wells as a fixed plan (every field, no analysis), and scores the smart run
against the `PlateSpecimen`'s truth; then it measures the `Scheduler` alone on
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
from smartscope.runner import Runner, package_versions
from smartscope.scheduler import AddEvents, Scheduler, SkipWell
from smartscope.storage import read_jsonl

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["GOALS", "bench_screen", "scheduler_overhead", "screen_experiment"]

#: Goals of `bench_screen` (issue 5).
GOALS = {
    "scheduler_us_per_event_max": 1000.0,
    "hit_recall_min": 1.0,
    "hit_precision_min": 1.0,
    "memory_growth_per_field_max": 1.5,  # bytes/field: largest / smallest plan
}


def screen_experiment(kind: str = "smart", *, wells: int | None = None) -> Experiment:
    """``demos/plate_screen.yaml`` (``"smart"``) or its fixed plan (``"fixed"``).

    `wells` keeps the first wells of the demo's selection. ``"fixed"`` images
    every field of the same wells with no analysis and no policies.
    """
    from smartscope._resources import demos_dir

    if kind not in ("smart", "fixed"):
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
    frames = read_jsonl(out / "frames.jsonl")
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
        well = str(pos.name).split("_", 1)[0]
        out.setdefault(well, []).append((float(pos.x), float(pos.y)))
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

    plan = _plan_fields(smart_exp)
    selected = list(plan)
    planned = sum(len(v) for v in plan.values())
    base = [f for f in smart["frames"] if f["kind"] == "base"]
    imaged: dict[str, set[str]] = {w: set() for w in selected}
    for f in base:
        imaged.setdefault(f["position"].split("_", 1)[0], set()).add(f["position"])
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
        "time_saved_s": round(f_sum.wall_time_s - s_sum.wall_time_s, 3),
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
        "status": {"smart": s_sum.status, "fixed": f_sum.status},
        "travel_um": {
            "smart": s_sum.schedule.get("travel_um"),
            "fixed": f_sum.schedule.get("travel_um"),
            "fixed_row_major": round(
                _travel([xy for w in row_major for xy in plan[w]]), 1
            ),
        },
    }


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
    skipped after its first field. Returns events served, added, skipped.
    """
    sched = Scheduler(plan, clock=lambda: 0.0, travel_order="nearest")
    served = added = 0
    wells_seen: set[str] = set()
    for event in sched:
        served += 1
        key = str(event.metadata["smartscope"]["position"])
        well = key.split("_", 1)[0]
        if event.metadata["smartscope"]["kind"] == "base" and well not in wells_seen:
            wells_seen.add(well)
            if len(wells_seen) % 10 == 0:
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

    Each plan (plate, field rows, field columns) is iterated twice: timed, then
    under `tracemalloc` (peak of everything allocated from the Scheduler's
    construction to its end, the lazily read useq plan included).
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
        gc.collect()
        tracemalloc.start()
        try:
            _drive(plan)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        out[f"{plate.split('-')[0]}x{rows * columns}"] = {
            "fields": n_fields,
            "events_served": served,
            "events_added": added,
            "events_skipped": skipped,
            "us_per_event": round(1e6 * elapsed / served, 1),
            "useq_only_us_per_event": round(1e6 * plain / max(n_plain, 1), 1),
            "peak_mb": round(peak / 1e6, 3),
            "peak_bytes_per_field": round(peak / n_fields, 1),
        }
    return out


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
        ``screen``: fields imaged vs planned, wall times and time saved, hits
        found vs the truth (recall, precision), wells meeting their quota, empty
        wells' fields, autofocus error, stage travel (smart, fixed, row-major
        order). ``scheduler``: per plan, µs per event and peak memory (MB, bytes
        per field). ``goals_met``.
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
    per_field = [v["peak_bytes_per_field"] for v in sched.values()]
    growth = per_field[-1] / per_field[0] if per_field[0] > 0 else math.inf
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
        "memory_per_field_flat": growth <= GOALS["memory_growth_per_field_max"],
    }
    return {
        "benchmark": "screen",
        "screen": screen,
        "scheduler": sched,
        "scheduler_worst_us_per_event": worst_us,
        "memory_growth_per_field": round(growth, 3),
        "goals": GOALS,
        "goals_met": goals,
        "all_goals_met": all(goals.values()),
        "versions": package_versions(),
    }
