"""Headless plate screens through the CLI on plate.cfg, and `bench screen`.

The demo plate screen (shortened to its first wells) runs through ``smartscope
run`` without a terminal and is checked against the plate's ground truth.
"""

from __future__ import annotations

import gc
import itertools
import json
import math

import pytest
from _closed_loop import smartscope
from typer.testing import CliRunner

from smartscope.bench._screen import bench_screen, screen_experiment
from smartscope.cli import app
from smartscope.rundir import position_path, read_jsonl
from smartscope.sim.plate import PlateSpecimen

# E4 E5 E6 E7 E8 E9 of the demo: E5 is a hit well and E9 an empty one (seed 0)
WELLS = 6


@pytest.fixture(scope="module")
def truth():
    return {w["id"]: w for w in PlateSpecimen(0).ground_truth(wells=[])["wells"]}


@pytest.fixture(scope="module")
def screen_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("screen")
    path = tmp / "screen.yaml"
    path.write_text(screen_experiment("smart", wells=WELLS).to_yaml())
    out = tmp / "run"
    result = CliRunner().invoke(app, ["run", str(path), "--out", str(out)])
    gc.collect()
    return result, out


def _base_fields(out):
    fields: dict[str, set[str]] = {}
    for f in read_jsonl(out / "frames.jsonl"):
        if f["kind"] == "base":
            fields.setdefault(f["position"].split("_", 1)[0], set()).add(f["position"])
    return fields


def test_plate_screen_prints_progress_and_summary_without_a_tty(screen_run):
    result, out = screen_run
    assert result.exit_code == 0, result.output
    assert "run completed" in result.output
    # the final progress line: every well done, the hit well found
    assert f"wells {WELLS}/{WELLS}" in result.output
    assert "of 54" in result.output and "hits 1 (E5)" in result.output
    log = (out / "run.log").read_text()
    assert f"wells {WELLS}/{WELLS}" in log and "run completed" in log


def test_empty_wells_cost_one_field_and_quotas_hold(screen_run, truth):
    _, out = screen_run
    fields = _base_fields(out)
    run = json.loads((out / "run.json").read_text())
    quota = run["policy_reports"]["well_quota"]
    assert set(fields) == {"E4", "E5", "E6", "E7", "E8", "E9"}
    empty = [w for w in fields if truth[w]["empty"]]
    assert empty == ["E9"]
    for well, imaged in fields.items():
        if truth[well]["empty"]:  # the first field only
            assert imaged == {f"{well}_0000"}
        else:
            assert len(imaged) <= quota["max_fields"]
            assert quota["wells"][well]["stopped"].startswith(
                ("cell quota", "field quota")
            )
            assert quota["wells"][well]["fields_after_stop"] == 0
    assert run["policy_reports"]["hit_detection"]["hits"] == ["E5"]
    assert run["summary"]["frames_dropped"] == 0


def test_hit_cells_are_imaged_through_the_40x_objective(screen_run, truth):
    _, out = screen_run
    frames = read_jsonl(out / "frames.jsonl")
    hits = [f for f in frames if f["kind"] == "hit"]
    assert hits and {f["position"].split("_")[1] for f in hits} == {"E5"}
    for f in hits:
        assert f["pixel_size_um"] == 0.25  # the 40X of plate.cfg
        roi = f["event"]["roi"]
        assert roi["width"] == roi["height"] == 256  # still 64 µm
    # the survey is back on the 10X right after the targets
    after = [b for a, b in itertools.pairwise(frames) if a["kind"] == "hit"]
    assert all(b["pixel_size_um"] == 1.0 for b in after if b["kind"] != "hit"), after
    assert {f["pixel_size_um"] for f in frames if f["kind"] == "base"} == {1.0}
    # the arrays say so, and each hit frame holds its one nucleus, whole: the
    # segmenter saw it at the survey's scale
    array = position_path(out, hits[0]["position"])
    meta = json.loads((array / "zarr.json").read_text())
    scales = meta["attributes"]["ome"]["multiscales"][0]["datasets"][0][
        "coordinateTransformations"
    ][0]["scale"]
    assert scales[-2:] == [0.25, 0.25]
    detections = {d["frame_index"]: d for d in read_jsonl(out / "detections.jsonl")}
    centered = [detections[f["frame_index"]] for f in hits if f["index"]["z"] == 1]
    for d in centered:
        objects = d["objects"]
        middle = [
            k
            for k in range(d["n_detections"])
            if max(abs(objects["x_px"][k] - 127.5), abs(objects["y_px"][k] - 127.5))
            < 24
        ]
        assert len(middle) == 1, objects
        assert objects["area_px"][middle[0]] > 16 * 40  # a nucleus at 0.25 µm


def test_reanalyze_reproduces_the_live_labels_of_40x_frames(screen_run, tmp_path):
    import shutil

    from smartscope.reanalyze import reanalyze

    _, out = screen_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    result = reanalyze(run, workers=1, processes=False)  # the run's own model
    gc.collect()
    rows = {r["frame_index"]: r for r in result["frames"]}
    hits = [f for f in read_jsonl(run / "frames.jsonl") if f["kind"] == "hit"]
    assert hits and all(rows[f["frame_index"]]["identical"] for f in hits)
    assert result["overall"]["identical_fraction"] == 1.0


def test_an_objective_the_config_lacks_is_one_error_line(tmp_path):
    exp = screen_experiment("smart", wells=1)
    spec = exp.model_dump(mode="json", exclude={"source"})
    spec["sequence"] = exp.sequence.model_dump(mode="json", exclude_unset=True)
    for policy in spec["policies"]:
        if policy["name"] == "hit_detection":
            policy["objective"] = "60X"
    path = tmp_path / "screen.yaml"
    path.write_text(type(exp).model_validate(spec).to_yaml())
    out = tmp_path / "run"
    for args in (["validate", str(path)], ["run", str(path), "--out", str(out)]):
        result = smartscope(*args)
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip() == (
            "error: hit_detection: objective '60X' is not a preset of config group "
            f"'Objective' in {exp.config_path()} (presets: 10X, 20X, 40X)"
        )
    assert not (out / "run.ome.zarr").exists()


def test_bench_screen_reports_the_screen_and_the_scheduler(tmp_path):
    result = bench_screen(
        wells=2, plans=(("96-well", 1, 1), ("96-well", 2, 2)), out_dir=tmp_path
    )
    gc.collect()
    screen = result["screen"]
    assert screen["wells"] == ["E4", "E5"]
    assert screen["fields_planned"] == 18
    assert screen["fields_imaged"] < screen["fields_planned"]
    assert screen["hits_found"] == ["E5"] and screen["hit_recall"] == 1.0
    assert set(screen["status"].values()) == {"completed"}
    assert set(screen["status"]) == {"smart", "fixed", "fixed_autofocus"}
    # the fixed plan is at the plan's Z: its fields are out of focus
    assert screen["base_fields_in_focus"]["smart"] > 0.8
    assert screen["base_fields_in_focus"]["fixed"] < 0.5
    assert set(screen["time_by_kind_s"]["smart"]) == {"base", "autofocus", "hit"}
    # the fixed plan's fields still need their analysis: time to results
    offline = screen["fixed_offline_analysis_s"]
    assert offline > 0
    assert screen["time_to_results_s"]["fixed"] == pytest.approx(
        screen["fixed_wall_s"] + offline, abs=0.01
    )
    # the fixed plan travels the plan's fields in order (E4 then E5: one row,
    # so row-major is that order too); the smart run travels somewhere
    fields = screen_experiment("fixed", wells=2).sequence.stage_positions
    xy = [(p.x, p.y) for p in fields]
    planned_um = sum(math.dist(a, b) for a, b in itertools.pairwise(xy))
    assert len(xy) == 18
    assert screen["travel_um"]["fixed"] == pytest.approx(planned_um, abs=1.0)
    assert screen["travel_um"]["fixed_row_major"] == pytest.approx(planned_um, abs=1)
    assert screen["travel_um"]["smart"] > 0
    sched = result["scheduler"]
    assert set(sched) == {"96x1", "96x4"}
    for name, row in sched.items():
        per_well = int(name.split("x")[1])
        assert row["fields"] == 96 * per_well
        # every planned or added event was either served or skipped
        assert (
            row["events_served"] + row["events_skipped"]
            == row["fields"] + row["events_added"]
        )
        assert row["events_added"] == 3 * (row["events_served"] // 100)
        # every 10th well is skipped after its first field
        assert row["events_skipped"] == (96 // 10) * (per_well - 1)
    assert set(result["goals_met"]) >= {
        "scheduler_overhead",
        "hit_recall",
        "quota_held",
        "memory_flat",
    }
    json.dumps(result)  # JSON-ready
