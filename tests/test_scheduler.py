"""Scheduler semantics and skip_empty on the real demo core."""

from __future__ import annotations

import threading
import time

import pytest
from useq import MDAEvent, MDASequence

from smartscope.experiment import Experiment
from smartscope.rundir import read_jsonl
from smartscope.runner import Runner
from smartscope.scheduler import AddEvents, Scheduler, SkipPosition, Stop


def _plan(n=3):
    return MDASequence(
        stage_positions=[(0, 0, 0), (100, 0, 0)],
        time_plan={"interval": 0, "loops": n},
    )


def test_added_events_preempt_the_base_plan_in_priority_order():
    sched = Scheduler(_plan())
    first = next(sched)
    assert first.metadata["smartscope"]["kind"] == "base"
    low = MDAEvent(x_pos=1, pos_name="low")
    high = [MDAEvent(x_pos=2, pos_name="a"), MDAEvent(x_pos=3, pos_name="b")]
    sched.apply(AddEvents((low,), priority=1), decision_id=0, trigger_frame=0)
    sched.apply(AddEvents(tuple(high), priority=5), decision_id=1, trigger_frame=0)
    got = [next(sched) for _ in range(4)]
    assert [e.pos_name for e in got[:3]] == ["a", "b", "low"]
    assert got[0].metadata["smartscope"]["decision_id"] == 1
    assert got[0].metadata["smartscope"]["trigger_frame"] == 0
    assert got[3].metadata["smartscope"]["kind"] == "base"


def test_skip_position_drops_remaining_base_events():
    sched = Scheduler(_plan(3))
    out = sched.apply(SkipPosition("p001"))
    assert out.applied
    keys = [e.metadata["smartscope"]["position"] for e in sched]
    assert keys == ["p000"] * 3
    assert sched.n_skipped == 3
    assert not sched.apply(SkipPosition("p001")).applied  # refused, with reason


def test_scheduler_waits_for_analysis_in_flight_before_ending():
    sched = Scheduler(MDASequence(time_plan={"interval": 0, "loops": 1}))
    next(sched)
    sched.analysis_started()  # a frame is being analysed

    def decide():
        time.sleep(0.2)
        sched.apply(AddEvents((MDAEvent(pos_name="late"),)))
        sched.analysis_finished()

    threading.Thread(target=decide).start()
    t0 = time.perf_counter()
    late = next(sched)  # must wait for the decision, not end
    assert late.pos_name == "late"
    assert time.perf_counter() - t0 >= 0.15
    with pytest.raises(StopIteration):
        next(sched)
    assert sched.finish_reason == "completed"


def test_stop_action_ends_iteration_and_refuses_later_actions():
    sched = Scheduler(_plan(5))
    next(sched)
    assert sched.apply(Stop("quota reached")).applied
    with pytest.raises(StopIteration):
        next(sched)
    assert "quota reached" in sched.finish_reason
    refused = sched.apply(AddEvents((MDAEvent(),)))
    assert not refused.applied and refused.reason == "run is stopping"


def _skip_experiment(min_area_px: float) -> Experiment:
    return Experiment.model_validate(
        {
            "name": "skip",
            "sequence": {
                "stage_positions": [
                    {"x": 0, "y": 0, "z": 0, "name": "A"},
                    {"x": 600, "y": 0, "z": 0, "name": "B"},
                ],
                "channels": [{"config": "DAPI", "exposure": 5}],
                "time_plan": {"interval": 0.4, "loops": 3},
            },
            "policies": [
                {"name": "skip_empty", "filter": {"min_area_px": min_area_px}}
            ],
            # a visit waits for the analysis of the last one: the skip lands
            # before B's second visit even on a loaded machine (0.4 s interval)
            "scheduler": {"max_analysis_lag": 0},
        }
    )


def test_skip_empty_drops_the_rest_of_an_empty_position(microscope, tmp_path):
    # "objects" here are cells of ≥ 2000 px²: the bead fields hold none
    with Runner(_skip_experiment(2000), microscope=microscope, out_dir=tmp_path) as r:
        summary = r.run()
    frames = read_jsonl(tmp_path / "frames.jsonl")
    assert [f["position"] for f in frames] == ["A", "B"]  # one timepoint each
    assert summary.events_skipped == 4
    skips = [
        a
        for d in read_jsonl(tmp_path / "decisions.jsonl")
        for a in d["actions"]
        if a["type"] == "skip_position"
    ]
    assert {a["position"] for a in skips} == {"A", "B"}
    assert all(a["status"] == "applied" for a in skips)


def test_skip_empty_keeps_fields_with_objects(microscope, tmp_path):
    with Runner(_skip_experiment(5), microscope=microscope, out_dir=tmp_path) as r:
        summary = r.run()
    assert summary.frames_acquired == 6
    assert summary.events_skipped == 0
    assert read_jsonl(tmp_path / "decisions.jsonl") == []


def test_pause_resume_and_cancel_a_run(microscope, tmp_path):
    exp = Experiment.from_file(
        __import__("pathlib").Path(__file__).parent / "fixtures" / "timelapse.yaml"
    )
    with Runner(exp, microscope=microscope, out_dir=tmp_path) as runner:
        runner.start()
        deadline = time.monotonic() + 30
        while runner._frame_count < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        runner.pause()
        time.sleep(0.7)  # let the current event finish
        paused_at = runner._frame_count
        time.sleep(1.2)  # two intervals: nothing may be acquired while paused
        assert runner._frame_count == paused_at
        assert microscope.is_paused()
        runner.resume()
        deadline = time.monotonic() + 30
        while runner._frame_count <= paused_at and time.monotonic() < deadline:
            time.sleep(0.05)
        assert runner._frame_count > paused_at
        runner.cancel("test cancel")
        summary = runner.finish()
    assert summary.status == "interrupted"
    assert summary.reason == "test cancel"
    assert len(read_jsonl(tmp_path / "frames.jsonl")) == summary.frames_acquired
