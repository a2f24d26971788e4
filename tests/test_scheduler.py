"""Scheduler semantics and skip_empty on the real demo core."""

from __future__ import annotations

import threading
import time

import pytest
from _closed_loop import FakeClock, paused_with_nothing_under_way
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
    clock = FakeClock()
    sched = Scheduler(MDASequence(time_plan={"interval": 0, "loops": 1}), clock=clock)
    next(sched)
    sched.analysis_started()  # a frame is being analysed
    got = []

    def acquire():
        try:
            got.append(next(sched))
        except StopIteration:
            got.append(None)

    reads = clock.reads
    thread = threading.Thread(target=acquire, daemon=True)
    thread.start()
    # the plan is done, but the Scheduler keeps looking instead of ending
    assert clock.wait_reads(reads + 3)
    assert thread.is_alive() and not got and sched.finish_reason is None
    sched.apply(AddEvents((MDAEvent(pos_name="late"),)))  # the decision
    sched.analysis_finished()
    thread.join(30)
    assert got[0] is not None and got[0].pos_name == "late"
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


def test_an_event_chosen_ahead_is_served_next_and_actions_apply_after_it():
    sched = Scheduler(_plan(4))
    assert next(sched).metadata["smartscope"]["position"] == "p000"
    assert sched.choose_ahead()  # p001's first visit is due: chosen now
    chosen = sched.stats()["sequences"]["chosen_ahead"]
    assert chosen == 1
    # a decision that arrives after the choice takes effect after it
    sched.apply(AddEvents((MDAEvent(x_pos=5, pos_name="urgent"),), priority=9))
    sched.apply(SkipPosition("p001"))
    got = [e.pos_name or e.metadata["smartscope"]["position"] for e in sched]
    assert got == ["p001", "urgent", "p000", "p000", "p000"]


def test_choosing_ahead_never_waits_and_a_stop_drops_the_choice():
    clock = FakeClock()
    sched = Scheduler(MDASequence(time_plan={"interval": 60, "loops": 3}), clock=clock)
    next(sched)
    t0 = time.perf_counter()
    assert not sched.choose_ahead()  # the next visit is due in 60 s
    assert time.perf_counter() - t0 < 1.0
    clock.advance(60.0)
    assert sched.choose_ahead()
    sched.stop("user stop")
    with pytest.raises(StopIteration):
        next(sched)
    assert sched.finish_reason == "user stop"


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


def _wait_until(condition, timeout: float = 60.0) -> None:
    """Poll `condition` until true; the timeout only guards against a hang."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def _held_in_set_up(runner: Runner) -> int:
    """Pause `runner` in pymmcore-plus's last sleep before an event's start.

    pymmcore-plus looks at its pause flag, emits ``awaitingEvent`` with the
    time left, sleeps that long (at most 0.5 s a sleep) and starts the event: a
    pause that lands in the last such sleep is not seen by it. A timer pauses
    halfway through that sleep; where it ran so late (a busy machine) that
    the sleep may have ended, the pause may have reached pymmcore-plus between
    events instead, so it is taken back and tried at a later sleep. Waits
    until the engine holds the event in its set-up; returns the frames
    acquired then.
    """
    timers: list[threading.Timer] = []
    armed, kept = threading.Event(), threading.Event()

    def pause(sleep_ends: float) -> None:
        runner.pause()
        if time.perf_counter() < sleep_ends:
            kept.set()
        else:  # perhaps after the event started
            runner.resume()
            armed.clear()

    def pause_in_the_sleep(event: MDAEvent, remaining_s: float) -> None:
        last_sleep = 0.002 < remaining_s < 0.5
        if runner._frame_count >= 2 and last_sleep and not armed.is_set():
            armed.set()
            sleep_ends = time.perf_counter() + remaining_s  # the sleep starts later
            timers.append(threading.Timer(remaining_s / 2, pause, (sleep_ends,)))
            timers[-1].start()

    events = runner.microscope.core.mda.events
    events.awaitingEvent.connect(pause_in_the_sleep)
    try:
        runner.start()
        _wait_until(lambda: kept.is_set() and runner.engine.holding)
        assert runner.is_paused()
    finally:
        events.awaitingEvent.disconnect(pause_in_the_sleep)
        for timer in timers:
            timer.cancel()
    return runner._frame_count


def test_a_pause_during_pymmcore_plus_last_sleep_holds_the_event_it_started(
    microscope, tmp_path
):
    exp = Experiment.from_file(
        __import__("pathlib").Path(__file__).parent / "fixtures" / "timelapse.yaml"
    )
    with Runner(exp, microscope=microscope, out_dir=tmp_path / "a") as runner:
        frames = _held_in_set_up(runner)
        served = runner.scheduler.n_served
        time.sleep(1.2)  # two intervals of the plan: the held event waits
        assert runner._frame_count == frames
        assert runner.scheduler.n_served == served
        assert runner.engine.holding
        runner.resume()  # the held event goes on, then the plan
        _wait_until(lambda: runner._frame_count >= served + 2)
        runner.cancel("test cancel")
        summary = runner.finish()
    assert summary.status == "interrupted"

    # a cancel while an event is held skips it: no frame after the pause
    with Runner(exp, microscope=microscope, out_dir=tmp_path / "b") as runner:
        frames = _held_in_set_up(runner)
        runner.cancel("test cancel")
        summary = runner.finish()
    assert summary.status == "interrupted"
    assert summary.frames_acquired == frames
    assert len(read_jsonl(tmp_path / "b" / "frames.jsonl")) == frames


def test_pause_resume_and_cancel_a_run(microscope, tmp_path):
    exp = Experiment.from_file(
        __import__("pathlib").Path(__file__).parent / "fixtures" / "timelapse.yaml"
    )
    with Runner(exp, microscope=microscope, out_dir=tmp_path) as runner:
        runner.start()
        _wait_until(lambda: runner._frame_count >= 2)
        runner.pause()
        _wait_until(lambda: paused_with_nothing_under_way(runner))
        paused_at, served = runner._frame_count, runner.scheduler.n_served
        time.sleep(1.2)  # two intervals of the plan: nothing may happen meanwhile
        assert runner._frame_count == paused_at
        assert runner.scheduler.n_served == served
        assert runner.is_paused()
        runner.resume()
        _wait_until(lambda: runner._frame_count > paused_at)
        runner.cancel("test cancel")
        summary = runner.finish()
    assert summary.status == "interrupted"
    assert summary.reason == "test cancel"
    assert len(read_jsonl(tmp_path / "frames.jsonl")) == summary.frames_acquired
