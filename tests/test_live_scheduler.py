"""Scheduler under time pressure: deadlines, pre-emption, travel, dose budget."""

from __future__ import annotations

import threading
import time

import pytest
from useq import CameraROI, MDAEvent, MDASequence

from smartscope.scheduler import AddEvents, MovePosition, Scheduler, SetInterval


def _timelapse(positions, interval=0.0, loops=3, exposure=10.0):
    return MDASequence(
        stage_positions=positions,
        channels=[{"config": "DAPI", "exposure": exposure}],
        time_plan={"interval": interval, "loops": loops},
    )


def _tag(event):
    return event.metadata["smartscope"]


def test_timepoints_are_served_on_time_and_lateness_is_reported():
    sched = Scheduler(_timelapse([(0, 0, 0), (100, 0, 0)], interval=0.15, loops=3))
    t0 = time.perf_counter()
    served = [(time.perf_counter() - t0, e) for e in sched]
    assert [(_tag(e)["position"], _tag(e)["visit"]) for _, e in served] == [
        ("p000", 0),
        ("p001", 0),
        ("p000", 1),
        ("p001", 1),
        ("p000", 2),
        ("p001", 2),
    ]
    for t, e in served:  # never served before its due time (poll slack)
        assert t >= e.min_start_time - 0.03
    stats = sched.stats()
    assert stats["lateness_s"]["base"]["n"] == 6
    assert stats["lateness_s"]["base"]["p99"] < 0.1
    assert stats["missed_deadlines"] == 0
    assert stats["travel_um"] == 500.0  # 0 -> 100 -> 0 -> 100 -> 0 -> 100


def test_a_burst_preempts_slow_imaging_without_starving_it():
    sched = Scheduler(
        _timelapse([(0, 0, 0), (500, 0, 0)], interval=0.3, loops=3), max_delay_s=0.1
    )
    first = next(sched)
    assert _tag(first)["position"] == "p000"
    # a long burst, all due now, at a higher priority than the base plan
    burst = tuple(MDAEvent(x_pos=10, y_pos=0, pos_name="burst") for _ in range(400))
    sched.apply(AddEvents(burst, priority=20))
    assert _tag(next(sched))["position"] == "burst"  # pre-empts p001's due visit
    kinds = []
    for event in sched:
        kinds.append(_tag(event)["kind"])
        time.sleep(0.002)  # each frame takes time
    assert kinds.count("added") == 399
    assert kinds.count("base") == 5  # the slow plan went on during the burst
    assert kinds.index("base") < 100  # and was not starved until its end
    late = sched.stats()["lateness_s"]["base"]
    assert late["max"] < 0.1 + 0.05


def test_added_events_wait_for_their_min_start_time():
    sched = Scheduler(_timelapse([(0, 0, 0)], interval=0.5, loops=2))
    next(sched)
    sched.apply(
        AddEvents((MDAEvent(pos_name="later", min_start_time=0.2),), priority=20)
    )
    t0 = sched.now()
    event = next(sched)
    assert _tag(event)["position"] == "later"
    assert sched.now() >= 0.2 - 0.03 and sched.now() - t0 > 0.1


def test_nearest_travel_order_between_due_positions():
    plan = _timelapse([(0, 0, 0), (1000, 0, 0), (100, 0, 0)], loops=1)
    assert [e.x_pos for e in Scheduler(plan)] == [0, 1000, 100]
    sched = Scheduler(plan, travel_order="nearest")
    assert [e.x_pos for e in sched] == [0, 100, 1000]
    assert sched.stats()["travel_um"] == 1000.0


def test_dose_budget_refuses_actions_and_drops_base_visits():
    sched = Scheduler(_timelapse([(0, 0, 0)], loops=5, exposure=10), dose_budget_ms=35)
    skipped = []
    sched.events.eventsSkipped.connect(lambda *a: skipped.append(a))
    next(sched)  # 10 ms used
    ok = sched.apply(
        AddEvents((MDAEvent(exposure=10, pos_name="t"),)), trigger_position="p000"
    )
    assert ok.applied
    refused = sched.apply(
        AddEvents((MDAEvent(exposure=20, pos_name="t"),)), trigger_position="p000"
    )
    assert not refused.applied
    assert "light-dose budget of p000" in refused.reason
    rest = list(sched)
    assert [_tag(e)["kind"] for e in rest] == ["added", "base"]  # 30 ms in all
    assert sched.dose_used_ms["p000"] == 30
    assert skipped and "light-dose budget" in skipped[0][2]
    assert sched.stats()["dose_refusals"] == 2


def test_set_interval_and_move_position_change_later_visits():
    sched = Scheduler(_timelapse([(0, 0, 0), (100, 0, 0)], interval=0.2, loops=4))
    next(sched), next(sched)  # visit 0 of both
    assert sched.apply(SetInterval("p000", 0.4)).applied
    assert sched.apply(MovePosition("p001", 150.0, 5.0)).applied
    assert not sched.apply(SetInterval("nowhere", 1.0)).applied
    rest = list(sched)
    p0 = [e for e in rest if _tag(e)["position"] == "p000"]
    p1 = [e for e in rest if _tag(e)["position"] == "p001"]
    assert len(p1) == 3 and all((e.x_pos, e.y_pos) == (150.0, 5.0) for e in p1)
    # slower: the plan's 0.6 s duration now holds one more visit at 0.4 s
    assert [round(e.min_start_time, 3) for e in p0] == [0.4]
    assert sched.position_interval("p000") == 0.4


def test_lazy_plans_refuse_timelapse_actions():
    sched = Scheduler(MDASequence(stage_positions=[(0, 0, 0)]))
    out = sched.apply(SetInterval("p000", 1.0))
    assert not out.applied and "not a time-lapse" in out.reason


def test_full_frame_is_restored_after_a_roi_event():
    sched = Scheduler(_timelapse([(0, 0, 0)], loops=2), sensor_size=(512, 512))
    roi = CameraROI(offset_x=192, offset_y=192, width=128, height=128)
    next(sched)
    sched.apply(AddEvents((MDAEvent(pos_name="crop", roi=roi),)))
    crop, base = next(sched), next(sched)
    assert crop.roi == roi
    assert (base.roi.width, base.roi.height) == (512, 512)


def test_a_policy_that_never_finishes_cannot_hold_the_run_forever():
    sched = Scheduler(_timelapse([(0, 0, 0)], loops=1), idle_timeout_s=0.3)
    sched.add_pending_check(lambda: True)
    t0 = time.perf_counter()
    assert len(list(sched)) == 1
    assert 0.25 < time.perf_counter() - t0 < 2
    assert "pending work" in sched.finish_reason


def test_nearest_order_keeps_each_positions_own_order():
    sched = Scheduler(_timelapse([(0, 0, 0)], loops=1), travel_order="nearest")
    next(sched)  # the stage is at x=0
    far_first = MDAEvent(x_pos=100, y_pos=0, pos_name="burst", index={"t": 0})
    near_second = MDAEvent(x_pos=1, y_pos=0, pos_name="burst", index={"t": 1})
    other = MDAEvent(x_pos=50, y_pos=0, pos_name="other")
    sched.apply(AddEvents((far_first, near_second)))
    sched.apply(AddEvents((other,)))
    got = [(e.pos_name, e.index.get("t")) for e in sched]
    # "other" is nearer than burst t=0; burst t=1 never goes before burst t=0
    assert got == [("other", None), ("burst", 0), ("burst", 1)]


def test_hold_pauses_at_the_event_boundary_and_stop_still_ends():
    sched = Scheduler(_timelapse([(0, 0, 0)], loops=3))
    next(sched)
    sched.hold(True)
    got = []

    t = threading.Thread(target=lambda: got.append(next(sched)))
    t.start()
    t.join(0.3)
    assert t.is_alive() and not got  # held: nothing served
    sched.hold(False)
    t.join(2)
    assert len(got) == 1
    sched.hold(True)
    sched.stop("cancelled")
    with pytest.raises(StopIteration):
        next(sched)
