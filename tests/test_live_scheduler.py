"""Scheduler under time pressure: deadlines, pre-emption, travel, dose budget."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from _closed_loop import FakeClock, next_due
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


def _serve_all(sched, clock, frame_s):
    """Serve every event on the fake clock; each frame takes `frame_s`."""
    served = []
    while True:
        try:
            event = next_due(sched, clock)
        except StopIteration:
            return served
        served.append((clock.t, event))
        clock.advance(frame_s)


def test_timepoints_are_served_on_time_and_lateness_is_reported():
    clock = FakeClock()
    plan = _timelapse([(0, 0, 0), (100, 0, 0)], interval=0.15, loops=3)
    sched = Scheduler(plan, clock=clock)
    # a frame takes 0.05 s: p001 is always one frame (0.05 s) late, p000 never
    served = _serve_all(sched, clock, frame_s=0.05)
    assert [(_tag(e)["position"], _tag(e)["visit"]) for _, e in served] == [
        ("p000", 0),
        ("p001", 0),
        ("p000", 1),
        ("p001", 1),
        ("p000", 2),
        ("p001", 2),
    ]
    assert [t for t, _ in served] == pytest.approx([0, 0.05, 0.15, 0.2, 0.3, 0.35])
    for t, e in served:  # never before its due time
        assert t >= e.min_start_time
    stats = sched.stats()
    late = stats["lateness_s"]["base"]
    assert late["n"] == 6
    expected = [0.0, 0.05] * 3
    assert late["max"] == pytest.approx(0.05)
    for q in (50, 99):
        assert late[f"p{q}"] == pytest.approx(np.percentile(expected, q), rel=0.02)
    # 0.05 s is within half the interval (0.075 s): no deadline missed
    assert stats["missed_deadlines"] == 0
    assert stats["travel_um"] == 500.0  # 0 -> 100 -> 0 -> 100 -> 0 -> 100


def test_visits_later_than_half_the_interval_miss_their_deadline():
    clock = FakeClock()
    plan = _timelapse([(0, 0, 0), (100, 0, 0)], interval=0.15, loops=3)
    sched = Scheduler(plan, clock=clock)
    # a frame takes 0.1 s: p001's first visit is 0.1 s late (> 0.075 s)
    served = _serve_all(sched, clock, frame_s=0.1)
    late = [t - e.min_start_time for t, e in served]
    assert [_tag(e)["position"] for _, e in served] == ["p000", "p001"] * 3
    assert sched.stats()["missed_deadlines"] == sum(x > 0.075 + 1e-9 for x in late)
    assert sched.stats()["missed_deadlines"] >= 1
    assert sched.stats()["lateness_s"]["base"]["max"] == pytest.approx(max(late))


def test_a_burst_preempts_slow_imaging_without_starving_it():
    clock = FakeClock()
    sched = Scheduler(
        _timelapse([(0, 0, 0), (500, 0, 0)], interval=0.3, loops=3),
        max_delay_s=0.1,
        clock=clock,
    )
    first = next(sched)
    assert _tag(first)["position"] == "p000"
    # a long burst, all due now, at a higher priority than the base plan
    burst = tuple(MDAEvent(x_pos=10, y_pos=0, pos_name="burst") for _ in range(400))
    sched.apply(AddEvents(burst, priority=20))
    assert _tag(next(sched))["position"] == "burst"  # pre-empts p001's due visit
    clock.advance(0.002)
    served = _serve_all(sched, clock, frame_s=0.002)  # each frame takes 2 ms
    kinds = [_tag(e)["kind"] for _, e in served]
    assert kinds.count("added") == 399
    assert kinds.count("base") == 5  # the slow plan went on during the burst
    # p001 waited for the burst until it was max_delay_s late, not to its end
    t_first_base, event = next((t, e) for t, e in served if _tag(e)["kind"] == "base")
    assert _tag(event)["position"] == "p001"
    assert 0.1 < t_first_base <= 0.1 + 0.002 + 1e-9
    late = sched.stats()["lateness_s"]["base"]
    # a visit late together with another waits, besides, for one burst frame
    assert late["max"] <= 0.1 + 2 * 0.002 + 1e-9


def test_visits_late_together_take_turns_with_the_bursts():
    """Late base visits do not go as one block ahead of every burst's frame.

    Three positions' visits are 1.5 s late together while two bursts run
    (a frame each every 0.5 s); each frame takes 0.15 s. Before, the three
    visits went back to back and held both bursts back by 0.45 s.
    """
    clock = FakeClock()
    positions = [(0, 0, 0), (500, 0, 0), (1000, 0, 0)]
    sched = Scheduler(_timelapse(positions, interval=1.0, loops=2), clock=clock)
    for _ in positions:  # the first timepoint
        next_due(sched, clock)
        clock.advance(0.01)
    for name, t0 in (("b1", 2.4), ("b2", 2.42)):
        frames = [
            MDAEvent(x_pos=10, y_pos=0, pos_name=name, min_start_time=t0 + 0.5 * k)
            for k in range(6)
        ]
        sched.apply(AddEvents(tuple(frames), priority=20))
    clock.t = 2.5  # the second timepoint's three visits are 1.5 s late
    order = []
    for _ in range(7):
        order.append(_tag(next_due(sched, clock))["position"])
        clock.advance(0.15)
    assert order == ["p000", "b1", "b2", "p001", "b1", "b2", "p002"]


def _next_in_thread(sched) -> tuple[threading.Thread, list]:
    """``next(sched)`` on another thread; the list gets the event (or None)."""
    got: list = []

    def serve() -> None:
        try:
            got.append(next(sched))
        except StopIteration:
            got.append(None)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread, got


def test_added_events_wait_for_their_min_start_time():
    clock = FakeClock()
    sched = Scheduler(_timelapse([(0, 0, 0)], interval=0.5, loops=2), clock=clock)
    next(sched)
    sched.apply(
        AddEvents((MDAEvent(pos_name="later", min_start_time=0.2),), priority=20)
    )
    clock.t = 0.1  # 0.1 s before it is due
    reads = clock.reads
    thread, got = _next_in_thread(sched)
    assert clock.wait_reads(reads + 3)  # looked at the time again and again
    assert thread.is_alive() and not got  # and waits
    clock.t = 0.2
    thread.join(30)
    assert _tag(got[0])["position"] == "later"


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
    clock = FakeClock()
    sched = Scheduler(_timelapse([(0, 0, 0)], loops=1), idle_timeout_s=0.3, clock=clock)
    sched.add_pending_check(lambda: True)
    next(sched)
    reads = clock.reads
    thread, got = _next_in_thread(sched)
    assert clock.wait_reads(reads + 3)  # idle since t = 0
    clock.t = 0.29
    reads = clock.reads
    assert clock.wait_reads(reads + 3)
    assert thread.is_alive() and sched.finish_reason is None  # still waits
    clock.t = 0.31  # idle longer than idle_timeout_s
    thread.join(30)
    assert got == [None]
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


def _nearest_first():
    """A one-frame plan on a fake clock, travel_order nearest, 0.2 s slack."""
    clock = FakeClock()
    plan = _timelapse([(0, 0, 0)], loops=1)
    sched = Scheduler(plan, clock=clock, travel_order="nearest", travel_slack_s=0.2)
    return clock, sched


def test_nearest_order_lets_no_event_fall_more_than_the_slack_behind():
    clock, sched = _nearest_first()
    next(sched)  # the stage is at x=0
    far = MDAEvent(x_pos=500, y_pos=0, pos_name="far", min_start_time=0.01)
    near = [
        MDAEvent(x_pos=1, y_pos=0, pos_name=f"near{k}", min_start_time=0.05)
        for k in range(2)
    ]
    sched.apply(AddEvents((far,)))
    sched.apply(AddEvents(tuple(near)))
    clock.t = 0.1  # "far" 0.09 s overdue, within the slack: the nearer go first
    assert next(sched).pos_name == "near0"
    clock.t = 0.3  # "far" 0.29 s overdue, past the slack: it goes first
    assert next(sched).pos_name == "far"
    assert next(sched).pos_name == "near1"


def test_a_place_with_a_max_gap_lets_nearer_ones_go_first_until_its_gap_nears_it():
    clock, sched = _nearest_first()
    next(sched)  # the base frame
    far = [
        MDAEvent(x_pos=500, y_pos=0, pos_name="far", index={"t": k}, min_start_time=t)
        for k, t in enumerate((0.0, 0.5))
    ]
    sched.apply(AddEvents(tuple(far), priority=20, max_gap_s=1.0))
    assert next(sched).pos_name == "far"  # its first frame, at t=0
    clock.t = 0.1
    near = MDAEvent(x_pos=1, y_pos=0, pos_name="near0", min_start_time=0.1)
    sched.apply(AddEvents((near,), priority=20))
    assert next(sched).pos_name == "near0"  # the stage is at x=1 now
    later = [
        MDAEvent(x_pos=1 + k, y_pos=0, pos_name=f"near{k}", min_start_time=0.6)
        for k in (1, 2)
    ]
    sched.apply(AddEvents(tuple(later), priority=20))
    # "far" is 0.25 s past its due time (beyond the slack), but 0.75 s since
    # its last frame leaves it more than the slack short of its 1 s gap
    clock.t = 0.75
    assert next(sched).pos_name == "near1"
    clock.t = 0.85  # 0.85 s since its last frame: within the slack of 1 s
    assert next(sched).pos_name == "far"
    assert next(sched).pos_name == "near2"


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
    t.join(30)
    assert len(got) == 1
    sched.hold(True)
    sched.stop("cancelled")
    with pytest.raises(StopIteration):
        next(sched)


def _burst_events(name, visits, planes=1, interval=0.5):
    """A burst's frames: `visits` visits every `interval` s, `planes` events each."""
    return tuple(
        MDAEvent(
            pos_name=name,
            min_start_time=k * interval,
            z_pos=float(z),
            metadata={"smartscope": {"visit": k}},
        )
        for k in range(visits)
        for z in range(planes)
    )


def test_paced_events_served_late_keep_their_gap():
    clock = FakeClock()
    sched = Scheduler(_timelapse([(0, 0, 0)], loops=1), clock=clock)
    next(sched)  # the base plan's one frame, at t=0
    sched.apply(AddEvents(_burst_events("paced", 3), priority=20, min_gap_s=0.5))
    sched.apply(AddEvents(_burst_events("plain", 3), priority=20))
    clock.advance(1.0)  # the camera was busy: every frame is overdue
    served = [
        (round(t, 3), _tag(e)["position"], e)
        for t, e in _serve_all(sched, clock, frame_s=0.1)
    ]
    assert [(t, pos) for t, pos, _ in served] == [
        (1.0, "paced"),
        (1.1, "plain"),  # an unpaced position's frames go back to back
        (1.2, "plain"),
        (1.3, "plain"),
        (1.5, "paced"),  # 0.5 s after the paced one before it, not at 1.1
        (2.0, "paced"),
    ]
    # a pushed event says when it is due now; those served on time are unchanged
    assert [e.min_start_time for _, pos, e in served if pos == "paced"] == [
        0.0,
        pytest.approx(1.5),
        pytest.approx(2.0),
    ]


def test_pacing_keeps_the_planes_of_one_visit_together():
    clock = FakeClock()
    sched = Scheduler(_timelapse([(0, 0, 0)], loops=1), clock=clock)
    next(sched)
    events = _burst_events("stack", 2, planes=3)
    sched.apply(AddEvents(events, priority=20, min_gap_s=0.5))
    clock.advance(1.0)
    served = [(round(t, 3), e.z_pos) for t, e in _serve_all(sched, clock, 0.1)]
    assert served == [
        (1.0, 0.0),
        (1.1, 1.0),
        (1.2, 2.0),
        (1.5, 0.0),  # the next visit: 0.5 s after the first plane of this one
        (1.6, 1.0),
        (1.7, 2.0),
    ]


def test_an_urgent_search_goes_before_a_base_visit_that_waited_past_max_delay():
    """A plate's fields have no due time, so a field waits from when it is read:
    on a busy machine a focus search outlasted `max_delay_s` and the well's next
    field went between its rounds, at the unfocused Z. Events of
    URGENT_PRIORITY keep going first; other added events still yield."""
    from smartscope.scheduler import URGENT_PRIORITY

    clock = FakeClock()
    fields = MDASequence(
        stage_positions=[(0, 0, 0), (100, 0, 0), (200, 0, 0)],
        channels=[{"config": "DAPI", "exposure": 10.0}],
    )
    sched = Scheduler(fields, max_delay_s=0.1, clock=clock)
    assert _tag(next(sched))["position"] == "p000"
    search = tuple(
        MDAEvent(x_pos=0, y_pos=0, z_pos=z, pos_name="af") for z in (1, 2, 3)
    )
    targets = tuple(MDAEvent(x_pos=5, y_pos=5, pos_name="hit") for _ in range(3))
    sched.apply(AddEvents(search, priority=URGENT_PRIORITY))
    sched.apply(AddEvents(targets, priority=20))
    served = _serve_all(sched, clock, frame_s=0.5)  # each frame outlasts max_delay_s
    assert [_tag(e)["position"] for _, e in served] == [
        "af", "af", "af",  # all of the search first, however long p001 waited
        "p001",  # then the waiting field before the lower-priority targets
        "hit",
        "p002",
        "hit", "hit",
    ]  # fmt: skip
