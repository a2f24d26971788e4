"""Live-cell experiments through the real Micro-Manager path (UniMMCore + demo
devices + the LiveCellCamera), and the live policies on the plain demo config."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from smartscope.bench._livecell import bench_livecell, live_experiment
from smartscope.cli import app
from smartscope.experiment import Experiment
from smartscope.rundir import read_jsonl, read_position
from smartscope.runner import Runner

ROOT = Path(__file__).resolve().parents[1]


def test_live_mitosis_demo_prints_what_it_caught(tmp_path):
    # the demo as shipped, shortened to 12 s (24 simulated min)
    exp = live_experiment("adaptive", duration_s=12.0)
    path = tmp_path / "short.yaml"
    path.write_text(exp.to_yaml())
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", str(path), "--out", str(out)])
    gc.collect()
    assert result.exit_code == 0, result.output
    assert "divisions caught" in result.output
    assert "followed cell at A" in result.output
    report = json.loads((out / "specimen_report.json").read_text())
    truth = json.loads((out / "ground_truth.json").read_text())
    assert truth["parameters"]["acceleration"] == 120
    assert report["frames"]["base"] >= 16  # 4 fields every 2.25-2.5 s
    div = report["divisions"]
    assert len(div["missed"]) == div["n_divisions"] - div["n_caught"]
    assert all(not d["caught"] and "max_gap_s" in d for d in div["missed"])
    assert report["follow"]["A"]["fraction_within"] >= 0.95
    run = json.loads((out / "run.json").read_text())
    bursts = run["policy_reports"]["event_burst"]
    assert bursts["n_bursts"] >= 1
    # burst frames: 64 µm ROIs centered on the cell, stored as their own arrays
    first = f"burst_{bursts['bursts'][0]['id']:04d}"
    data = read_position(out, first)
    assert data.shape[-2:] == (64, 64)
    frames = read_jsonl(out / "frames.jsonl")
    mine = [f for f in frames if f["position"] == first]
    assert all(f["decision_id"] is not None for f in mine)  # traced to a decision
    sched = run["summary"]["schedule"]
    assert sched["lateness_s"]["base"]["n"] == report["frames"]["base"]
    assert sched["lateness_s"]["base"]["p99"] is not None


def test_dose_budget_refusals_are_logged_with_the_reason(tmp_path):
    exp = live_experiment("adaptive", duration_s=8.0)
    exp = exp.model_copy(
        update={"scheduler": exp.scheduler.model_copy(update={"dose_budget_ms": 60})}
    )
    with Runner(exp, out_dir=tmp_path / "run") as runner:
        summary = runner.run()
    gc.collect()
    assert summary.status == "completed"
    used = summary.schedule["dose_ms"]
    assert all(v <= 60 for v in used.values())  # no position got more light
    log = [json.dumps(d) for d in read_jsonl(tmp_path / "run" / "decisions.jsonl")]
    dropped = [d for d in log if "skip_visits" in d]
    assert dropped and "light-dose budget of" in dropped[0]
    refused = [
        a
        for d in read_jsonl(tmp_path / "run" / "decisions.jsonl")
        for a in d["actions"]
        if a["status"] == "refused" and a["type"] == "add_events"
    ]
    assert all("light-dose budget" in a["outcome"] for a in refused)


def test_live_policies_also_run_on_the_demo_config(tmp_path):
    exp = Experiment.model_validate(
        {
            "name": "beads_live",
            "config": str(ROOT / "hardware_configs" / "demo.cfg"),
            "sequence": {
                "stage_positions": [
                    {"x": 0, "y": 0, "z": 0, "name": "A"},
                    {"x": 600, "y": 0, "z": 0, "name": "B"},
                ],
                "channels": [{"config": "DAPI", "exposure": 5}],
                "time_plan": {"interval": 0.5, "loops": 5},
            },
            "segmenter": {"name": "threshold", "min_area_px": 6},
            "policies": [
                {
                    "name": "event_burst",
                    "trigger": {"relative_intensity": {"min": 1.05}},
                    "interval_s": 0.2,
                    "field_um": 64,
                    "max_active": 1,
                    "max_duration_s": 1.0,
                },
                {"name": "adaptive_interval", "min_interval_s": 0.3},
                {"name": "track_and_follow", "positions": ["A"]},
            ],
            "scheduler": {"travel_order": "nearest"},
        }
    )
    with Runner(exp, out_dir=tmp_path / "run") as runner:
        summary = runner.run()
        follow = runner.policies[2].track("A")
    gc.collect()
    assert summary.status == "completed"
    decisions = read_jsonl(tmp_path / "run" / "decisions.jsonl")
    kinds = {
        a["type"] for d in decisions for a in d["actions"] if a["status"] == "applied"
    }
    assert {"add_events", "set_interval", "move_position"} <= kinds
    # beads do not move: the slowest interval; the followed bead ends centered
    assert any(
        a["type"] == "set_interval" and a["interval_s"] == 10.0
        for d in decisions
        for a in d["actions"]
    )
    frames = [f for f in read_jsonl(tmp_path / "run" / "frames.jsonl")]
    last_a = [f for f in frames if f["position"] == "A"][-1]
    bead = np.asarray(follow["xy"])
    assert np.hypot(*(bead - [last_a["stage_x_um"], last_a["stage_y_um"]])) < 2.0
    assert any(f["kind"] == "event_burst" for f in frames)


def test_bench_livecell_compares_three_runs(tmp_path):
    result = bench_livecell(duration_s=6.0, out_dir=tmp_path)
    gc.collect()
    runs = result["runs"]
    assert set(runs) == {"adaptive", "fixed_slow", "fixed_fast"}
    for run in runs.values():
        assert run["status"] == "completed"
        for key in ("fraction_caught", "total_cell_dose_ms", "cells_harmed"):
            assert key in run
        assert run["lateness_s"]["base"]["p99"] is not None
    slow, fast = runs["fixed_slow"], runs["fixed_fast"]
    assert fast["frames"]["base"] >= 4 * slow["frames"]["base"]
    assert fast["total_cell_dose_ms"] > 3 * slow["total_cell_dose_ms"]
    assert runs["adaptive"]["follow_fraction_within"] is not None
    assert set(result["goals_met"]) == {
        "adaptive_fraction_caught",
        "adaptive_dose_ratio",
        "follow_within_10pct",
    }
    assert result["load"] is None
    json.dumps(result)  # JSON-ready
