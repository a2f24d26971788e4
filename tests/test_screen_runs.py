"""Headless plate screens through the CLI on plate.cfg, and `bench screen`.

The demo plate screen (shortened to its first wells) runs through ``smartscope
run`` without a terminal and is checked against the plate's ground truth.
"""

from __future__ import annotations

import gc
import json

import pytest
from typer.testing import CliRunner

from smartscope.bench_screen import bench_screen, screen_experiment
from smartscope.cli import app
from smartscope.sim.plate import PlateSpecimen
from smartscope.storage import read_jsonl

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
    for key in ("smart", "fixed", "fixed_row_major"):
        assert screen["travel_um"][key] > 0
    sched = result["scheduler"]
    assert set(sched) == {"96x1", "96x4"}
    for row in sched.values():
        assert row["us_per_event"] > 0 and row["peak_mb"] > 0
    assert set(result["goals_met"]) >= {
        "scheduler_overhead",
        "hit_recall",
        "quota_held",
        "memory_flat",
    }
    json.dumps(result)  # JSON-ready
