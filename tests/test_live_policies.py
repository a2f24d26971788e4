"""Live-cell policies against a simulated specimen's ground truth.

`_simulate` is the deterministic closed loop of `_closed_loop.simulate` with a
`LiveSpecimen` (rendered and dosed the way the `LiveCellCamera` does) and the
built-in model: results depend only on the seeds, and are checked against
ground truth.
"""

from __future__ import annotations

import gc
import math

import numpy as np
import pytest
from _closed_loop import simulate
from useq import MDASequence

from smartscope.detections import Detections
from smartscope.frame import Frame
from smartscope.policies import (
    AdaptiveInterval,
    EventBurst,
    PolicyContext,
    TrackAndFollow,
)
from smartscope.segment import create_segmenter
from smartscope.sim import LiveSpecimen
from smartscope.sim.evaluate import (
    GroundTruth,
    division_capture,
    dose_summary,
    follow_summary,
    nearest_cell,
)

SENSOR = 256  # px at 1 µm/px: small fields keep the tests quick
ACCEL = 60.0  # simulated s per run s


@pytest.fixture(scope="module")
def unet():
    return create_segmenter("unet", {})


def _specimen(seed=3, **kw):
    params = dict(
        cell_density_per_mm2=400,
        bounds_um=(-400, -400, 400, 400),
        cell_cycle_hours=3.0,
        pre_division_minutes=15,
    )
    params.update(kw)
    return LiveSpecimen(seed, **params)


def _plan(positions, interval_s, duration_s):
    return MDASequence(
        stage_positions=positions,
        channels=[{"config": "DAPI", "exposure": 10}],
        time_plan={"interval": interval_s, "duration": duration_s},
    )


def _simulate(specimen, plan, policies, segmenter, **kw):
    """The closed loop with the specimen's clock running ACCEL times faster."""
    return simulate(
        specimen,
        plan,
        policies,
        segmenter,
        sensor=SENSOR,
        advance=lambda dt: specimen.advance(dt * ACCEL),
        **kw,
    )


def _burst_policy(**kw):
    return EventBurst(
        trigger={"relative_intensity": {"min": 1.5}, "aspect": {"min": 0.75}},
        sustain={"relative_intensity": {"min": 1.3}},
        interval_s=1.0,  # 1 simulated min
        field_um=64,
        max_duration_s=30,
        **kw,
    )


def _bursts(seed, unet):
    specimen = _specimen(seed)
    policy = _burst_policy()
    frames, snaps, sched = _simulate(
        specimen,
        _plan([(-128, -128, 0), (128, 128, 0)], interval_s=5, duration_s=90),
        [policy],
        unet,
    )
    return specimen, policy, frames, snaps, sched


def test_event_burst_catches_divisions_with_little_light(unet):
    specimen, policy, frames, snaps, _ = _bursts(3, unet)
    truth = GroundTruth(specimen.ground_truth())
    fields = [(-256, -256, 0, 0), (0, 0, 256, 256)]
    cap = division_capture(
        truth,
        snaps,
        fast_interval_s=ACCEL,
        region=fields,
        t_start_s=15 * 60,  # whole pre-division window inside the run
        t_end_s=snaps[-1]["t_s"],
    )
    assert cap["n_divisions"] >= 4
    assert cap["fraction_caught"] >= 0.75
    # slow imaging alone (every 5 simulated min) catches none of them
    base = [s for s, f in zip(snaps, frames) if f.kind == "base"]
    slow = division_capture(
        truth,
        base,
        fast_interval_s=ACCEL,
        region=fields,
        t_start_s=15 * 60,
        t_end_s=snaps[-1]["t_s"],
    )
    assert slow["n_caught"] == 0
    # burst frames are 64 µm ROIs centered on the cell; bursts end by themselves
    burst = [f for f in frames if f.kind == "event_burst"]
    assert burst and all(f.event.roi.width == 64 for f in burst)
    assert policy.finished and not policy.active
    assert any(b.ended in ("signature gone", "divided") for b in policy.finished)
    # a burst that saw its cell divide: a cell did divide there, during the
    # burst (within 20 µm of where the burst ended: one of the daughters)
    divided = [b for b in policy.finished if b.ended == "divided"]
    seen = [
        any(
            b.started * ACCEL <= d["time_s"] <= b.ended_at * ACCEL
            and math.hypot(d["x_um"] - b.xy[0], d["y_um"] - b.xy[1]) < 20
            for d in specimen.ground_truth()["divisions"]
        )
        for b in divided
    ]
    assert len(divided) >= 10 and sum(seen) >= 0.9 * len(divided)
    # most triggers were real: the cell was in its pre-division window
    starts = [b for b in policy.finished + policy.active]
    real = 0
    for b in starts:
        t_sim = b.started * ACCEL
        cell = nearest_cell(truth, t_sim, *b.xy, max_distance_um=15)
        divs = [d for d in specimen.ground_truth()["divisions"] if d["parent"] == cell]
        real += bool(divs and divs[0]["pre_division_start_s"] <= t_sim + 60)
    assert real >= 0.7 * len(starts)
    # far less light than imaging both fields fast all along
    fast_frames = 2 * snaps[-1]["t_s"] / ACCEL  # one per simulated minute
    full_fast = fast_frames * 10.0 * (SENSOR * SENSOR / 1e6)  # ms·mm²
    used = dose_summary(truth, snaps)["illumination_ms_mm2"]
    assert used < 0.5 * full_fast


def test_identical_seeds_give_identical_runs(unet):
    a = _bursts(11, unet)
    b = _bursts(11, unet)
    assert [(f.position, f.kind, f.stage_xy_um) for f in a[2]] == [
        (f.position, f.kind, f.stage_xy_um) for f in b[2]
    ]
    assert a[0].ground_truth() == b[0].ground_truth()
    c = _bursts(12, unet)
    assert [f.stage_xy_um for f in c[2]] != [f.stage_xy_um for f in a[2]]


def test_adaptive_interval_slows_down_where_nothing_happens(unet):
    specimen = _specimen(5)
    policy = AdaptiveInterval(
        measure="motion", low=0.0, high=0.5, min_interval_s=2, max_interval_s=8
    )
    # a field with migrating cells and one far outside the dish (empty)
    frames, _, sched = _simulate(
        specimen,
        _plan([(0, 0, 0), (3000, 3000, 0)], interval_s=4, duration_s=60),
        [policy],
        unet,
    )
    busy = [f.t_clock for f in frames if f.position == "p000"]
    empty = [f.t_clock for f in frames if f.position == "p001"]
    assert policy.activity("p000") > 0.05  # cells move ~µm per run second
    assert policy.activity("p001") == 0.0
    assert sched.position_interval("p001") == 8
    assert sched.position_interval("p000") < 8
    assert len(busy) > len(empty) + 3
    assert np.median(np.diff(empty[2:])) == pytest.approx(8, abs=0.1)


def test_track_and_follow_keeps_the_cell_centered(unet):
    specimen = _specimen(9, cell_density_per_mm2=150)
    policy = TrackAndFollow(select="center", max_jump_um=25)
    frames, snaps, _ = _simulate(
        specimen, _plan([(0, 0, 0)], interval_s=2, duration_s=80), [policy], unet
    )
    truth = GroundTruth(specimen.ground_truth())
    first = policy.track("p000")
    assert first is not None and first["lost"] == 0
    cell = nearest_cell(truth, snaps[0]["t_s"], *frames[1].stage_xy_um)
    follow = follow_summary(truth, snaps[1:], cell_id=cell)
    assert follow["n_frames"] >= 35
    assert follow["fraction_within"] >= 0.95
    # the stage really moved with the cell (it migrates tens of µm)
    path = np.array([f.stage_xy_um for f in frames])
    assert np.hypot(*(path[-1] - path[0])) > 10


def test_track_and_follow_reacquires_a_lost_track():
    policy = TrackAndFollow(lost_after=2, max_jump_um=5)
    from smartscope.scheduler import MovePosition

    def det_at(points):
        lab = np.zeros((64, 64), np.uint16)
        for k, (x, y) in enumerate(points, 1):
            lab[y - 2 : y + 3, x - 2 : x + 3] = k
        return Detections.from_labels(
            lab, lab.astype(float) + 1, to_stage=lambda p: p - 31.5
        )

    def frame(t):
        from useq import MDAEvent

        ev = MDAEvent(metadata={"smartscope": {"kind": "base", "position": "p"}})
        return Frame(0, ev, "p", "base", 0.0, 0.0, 0.0, None, 10.0, t, t_clock=t)

    ctx = PolicyContext(fov_um=(64, 64))
    first = policy.on_detections(frame(0), det_at([(30, 30), (50, 50)]), ctx)
    assert first == [] or isinstance(first[0], MovePosition)
    for t in (1, 2):  # the cell vanished: nothing within 5 µm
        out = policy.on_detections(frame(t), det_at([(50, 50)]), ctx)
    assert policy.n_lost == 1
    assert isinstance(out[0], MovePosition) and "track lost" in out[0].reason
    assert (out[0].x_um, out[0].y_um) == pytest.approx((18.5, 18.5))


def teardown_module():
    gc.collect()


def test_z_stack_bursts_are_followed_on_their_focal_plane(unet):
    specimen = _specimen(3)
    policy = _burst_policy(z_plan={"range": 4, "step": 2})
    frames, _, _ = _simulate(
        specimen, _plan([(-128, -128, 0)], interval_s=5, duration_s=45), [policy], unet
    )
    burst = [f for f in frames if f.kind == "event_burst"]
    assert burst and policy.finished
    # every burst frame is a 3-plane stack around the focus, in order
    by_frame: dict = {}
    for f in burst:
        tag = f.event.metadata["smartscope"]
        by_frame.setdefault((tag["burst_id"], tag["burst_frame"]), []).append(
            f.event.z_pos
        )
    assert all(zs == [-2.0, 0.0, 2.0] for zs in by_frame.values())
    # each burst was decided once per time point, not once per plane
    for b in policy.finished:
        n = len({k for (i, k) in by_frame if i == b.id})
        assert b.seen <= n


def _cells(bright: float, *, dim: float = 100.0, dx: float = 0.0):
    """Nine dim cells and one of intensity `bright`, near stage (0, 0) + `dx`."""
    lab = np.zeros((64, 64), np.uint16)
    image = np.full((64, 64), 1.0)
    spots = [(30, 30)] + [(8 + 16 * (k % 3), 8 + 48 * (k // 3)) for k in range(9)]
    for k, (x, y) in enumerate(spots, 1):
        lab[y - 2 : y + 3, x - 2 : x + 3] = k
        image[y - 2 : y + 3, x - 2 : x + 3] = bright if k == 1 else dim
    return Detections.from_labels(lab, image, to_stage=lambda p: p - 31.5 + [dx, 0])


def _survey(t):
    from useq import MDAEvent

    ev = MDAEvent(metadata={"smartscope": {"kind": "base", "position": "p"}})
    return Frame(0, ev, "p", "base", 0.0, 0.0, 0.0, None, 10.0, t, t_clock=t)


def _burst_frame(t, burst_id, k):
    from useq import MDAEvent

    tag = {"kind": "event_burst", "burst_id": burst_id, "burst_frame": k}
    ev = MDAEvent(metadata={"smartscope": tag})
    return Frame(0, ev, "b", "event_burst", 0.0, 0.0, 0.0, None, 10.0, t, t_clock=t)


def _follow(policy, burst_id, intensities, ctx, t0=1.0):
    """Feed a burst frame per second with the followed cell at each intensity."""
    for k, value in enumerate(intensities):
        policy.on_detections(_burst_frame(t0 + k, burst_id, k), _cells(value), ctx)
        if not policy.active:
            return t0 + k
    return None


def _plain_burst(**kw):
    defaults = dict(
        trigger={"relative_intensity": {"min": 1.5}},
        sustain={"relative_intensity": {"min": 1.1}},
        interval_s=1.0,
        field_um=None,
        max_duration_s=5,
        cooldown_s=0,
        confirm_frames=0,
        tail_frames=1,
    )
    return EventBurst(**{**defaults, **kw})


def test_event_burst_watches_the_cells_brightness():
    """Daughters end a burst, brightening extends one, bright-by-nature cells rest."""
    ctx = PolicyContext(fov_um=(64, 64))
    # a division: the nucleus gives way to dimmer daughters that still pass
    # `sustain` (1.1): the burst ends at the drop, after `tail_frames`
    policy = _plain_burst()
    assert policy.on_detections(_survey(0), _cells(200), ctx)
    ended = _follow(policy, 1, [200, 210, 205, 130, 130, 130, 130], ctx)
    assert policy.finished[0].ended == "divided" and ended == 1 + 4
    kept = _plain_burst(division_drop=None)  # without the rule: to the longest
    kept.on_detections(_survey(0), _cells(200), ctx)
    _follow(kept, 1, [200, 210, 205, 130, 130, 130, 130], ctx)
    assert kept.finished[0].ended.startswith("longest")

    # the signature arrives during the burst: it goes on past max_duration_s
    policy = _plain_burst()
    policy.on_detections(_survey(0), _cells(160), ctx)
    ended = _follow(policy, 1, [160] * 3 + [320] * 20, ctx)
    burst = policy.finished[0]
    assert burst.extended and burst.ended.startswith("longest")
    assert ended == 10  # 5 s, then 5 s more from there (frame 9, at 10 s)

    # a cell bright by nature: its burst runs out, and it does not trigger again
    # until it is `brightening` times brighter than it was
    policy = _plain_burst()
    policy.on_detections(_survey(0), _cells(180), ctx)
    _follow(policy, 1, [180] * 10, ctx)
    assert not policy.finished[0].extended
    assert policy.on_detections(_survey(20), _cells(190), ctx) == []
    assert policy.report()["bright_cells"] == 1
    assert policy.on_detections(_survey(30), _cells(1.5 * 180 + 1), ctx)
    assert len(policy.active) == 1 and policy.report()["bright_cells"] == 0
    # ... or `brightening` times brighter than in the survey frame before: it
    # dimmed to 1.5 the median, then rose to 2.3 (not 1.5 x 1.8, but 1.53 x 1.5)
    policy = _plain_burst()
    policy.on_detections(_survey(0), _cells(180), ctx)
    _follow(policy, 1, [180] * 10, ctx)
    assert policy.on_detections(_survey(20), _cells(150), ctx) == []
    assert policy.on_detections(_survey(30), _cells(230), ctx)
    assert policy.report()["bright_cells"] == 0
    # ... also when it rose while its place rested after the burst: the rise
    # (1.53 x the survey before) is not lost to the cooldown
    policy = _plain_burst(cooldown_s=30)  # it rests from 5 s to 35 s
    policy.on_detections(_survey(0), _cells(180), ctx)
    _follow(policy, 1, [180] * 10, ctx)
    assert policy.finished[0].ended.startswith("longest")
    assert policy.on_detections(_survey(20), _cells(150), ctx) == []  # resting
    assert policy.on_detections(_survey(25), _cells(230), ctx) == []  # resting
    assert policy.report()["bright_cells"] == 0
    assert policy.on_detections(_survey(40), _cells(230), ctx)  # rested
    # without the rule the same cell triggers again at once
    again = _plain_burst(brightening=None)
    again.on_detections(_survey(0), _cells(180), ctx)
    _follow(again, 1, [180] * 10, ctx)
    assert again.on_detections(_survey(20), _cells(190), ctx)


def test_a_cell_that_brightens_between_survey_frames_triggers():
    """`intensity_change`: relative intensity against the field's last survey."""
    ctx = PolicyContext(fov_um=(64, 64))
    rising = {"relative_intensity": {"min": 1.2}, "intensity_change": {"min": 1.25}}

    def policy():
        return _plain_burst(trigger=[{"relative_intensity": {"min": 1.5}}, rising])

    # as bright as its neighbours, then 1.3 times as bright: the signature arriving
    arriving = policy()
    assert arriving.on_detections(_survey(0), _cells(100), ctx) == []
    assert arriving.on_detections(_survey(10), _cells(130), ctx)
    assert arriving.active[0].strength == pytest.approx(1.3)
    # a cell that was already 1.3 times as bright has not changed: no burst
    steady = policy()
    assert steady.on_detections(_survey(0), _cells(130), ctx) == []
    assert steady.on_detections(_survey(10), _cells(130), ctx) == []
    # the whole field dims by half (bleaching, drift) while the cell rises
    # against its neighbours: a change relative to the field, not in counts
    dimming = policy()
    dimming.on_detections(_survey(0), _cells(100), ctx)
    assert dimming.on_detections(_survey(10), _cells(65, dim=50), ctx)
    # the field dims and the cell with it: nothing changed
    bleached = policy()
    bleached.on_detections(_survey(0), _cells(130), ctx)
    assert bleached.on_detections(_survey(10), _cells(65, dim=50), ctx) == []

    # in burst frames the change is against the survey before the trigger: a
    # cell that stays risen (1.3x) confirms its burst and keeps it going
    # (`sustain` below needs the rise), one back at its old level does not
    def burst(levels, confirm_frames=2):
        p = _plain_burst(
            trigger=[{"relative_intensity": {"min": 1.5}}, rising],
            sustain=[{"intensity_change": {"min": 1.2}}],
            confirm_frames=confirm_frames,
        )
        p.on_detections(_survey(0), _cells(100), ctx)
        p.on_detections(_survey(10), _cells(130), ctx)
        _follow(p, 1, levels, ctx, t0=11)
        return p

    assert burst([130] * 4).active
    assert burst([100] * 4).finished[0].ended == "not confirmed (false alarm)"
    assert burst([130, 130, 100, 100], 0).finished[0].ended == "signature gone"


def test_a_bright_peak_triggers_where_the_mean_does_not():
    """`relative_peak`: a bright nucleus the segmenter joined to a dim one."""
    lab = np.zeros((64, 64), np.uint16)
    image = np.full((64, 64), 1.0)
    spots = [(8 + 16 * (k % 3), 8 + 48 * (k // 3)) for k in range(9)]
    for k, (x, y) in enumerate(spots, 1):
        lab[y - 2 : y + 3, x - 2 : x + 3] = k
        image[y - 2 : y + 3, x - 2 : x + 3] = 100
    lab[28:33, 26:37] = 10  # one object: a bright nucleus (15 px at 300)
    image[28:33, 26:37] = 60  # joined to a dim one (40 px at 60): mean 125
    image[28:31, 26:31] = 300
    det = Detections.from_labels(lab, image, to_stage=lambda p: p - 31.5)
    ctx = PolicyContext(fov_um=(64, 64))
    by_mean = _plain_burst(trigger={"relative_intensity": {"min": 1.5}})
    assert by_mean.on_detections(_survey(0), det, ctx) == []  # 1.25 the median
    by_peak = _plain_burst(trigger={"relative_peak": {"min": 2.4}})
    assert by_peak.on_detections(_survey(0), det, ctx)
    assert by_peak.active[0].xy[0] == pytest.approx(det.centroids_um[-1][0])


def test_only_a_false_alarm_or_the_longest_burst_makes_a_place_rest():
    ctx = PolicyContext(fov_um=(64, 64))
    # a false alarm (the cell back to normal in its first frames): the place
    # does not trigger again for `cooldown_s`
    policy = _plain_burst(cooldown_s=60, confirm_frames=2)
    policy.on_detections(_survey(0), _cells(200), ctx)
    _follow(policy, 1, [100, 100], ctx)
    assert policy.finished[0].ended == "not confirmed (false alarm)"
    assert policy.on_detections(_survey(10), _cells(200), ctx) == []
    assert policy.on_detections(_survey(70), _cells(200), ctx)
    # cut short by a brighter cell elsewhere: the cell showed nothing against
    # itself, so once a burst is free it triggers again at its next survey
    policy = _plain_burst(cooldown_s=60, max_active=1)
    policy.on_detections(_survey(0), _cells(160), ctx)
    policy.on_detections(_survey(1), _cells(400, dx=200), ctx)
    assert policy.finished[0].ended == "preempted by a brighter cell"
    _follow(policy, 2, [100, 100], ctx, t0=2)  # that cell is gone: it ends
    assert not policy.active
    assert policy.on_detections(_survey(5), _cells(160), ctx)


def test_a_brighter_cell_takes_the_place_of_the_weakest_burst():
    ctx = PolicyContext(fov_um=(64, 64))
    policy = _plain_burst(max_active=1)
    policy.on_detections(_survey(0), _cells(160), ctx)
    # other fields: a slightly brighter cell waits, a far brighter one preempts
    assert policy.on_detections(_survey(1), _cells(180, dx=100), ctx) == []
    assert not policy.finished
    out = policy.on_detections(_survey(2), _cells(400, dx=200), ctx)
    assert out and policy.finished[0].ended == "preempted by a brighter cell"
    assert len(policy.active) == 1 and policy.active[0].strength == 4.0
    assert policy.active[0].xy[0] == pytest.approx(198.5)


def test_the_burst_preempted_is_the_one_whose_cell_is_dimmest_now():
    """A cell that triggered faintly and has brightened since keeps its slot."""
    ctx = PolicyContext(fov_um=(64, 64))
    policy = _plain_burst(max_active=2)
    policy.on_detections(_survey(0), _cells(160), ctx)  # burst 1, 1.6 the median
    policy.on_detections(_survey(0.5), _cells(200, dx=100), ctx)  # burst 2, 2.0
    _follow(policy, 1, [300], ctx)  # burst 1's cell is 3.0 now
    # a cell at 2.8: 1.3 times burst 2's cell (2.0), not burst 1's (3.0)
    assert policy.on_detections(_survey(2), _cells(280, dx=200), ctx)
    assert [b.id for b in policy.finished] == [2]
    assert policy.finished[0].ended == "preempted by a brighter cell"
    assert sorted(b.id for b in policy.active) == [1, 3]


def _pair(left: float, right: float):
    """Two candidate cells 30 µm apart (left, right) among six dim ones (100)."""
    lab = np.zeros((64, 64), np.uint16)
    image = np.full((64, 64), 1.0)
    spots = [(16, 30), (46, 30)] + [(8 + 16 * k, y) for y in (8, 56) for k in range(3)]
    for k, (x, y) in enumerate(spots, 1):
        lab[y - 2 : y + 3, x - 2 : x + 3] = k
        image[y - 2 : y + 3, x - 2 : x + 3] = (left, right, *[100] * 6)[k - 1]
    return Detections.from_labels(lab, image, to_stage=lambda p: p - 31.5)


def test_a_rising_cell_gets_the_last_slot_before_a_brighter_static_one():
    """Candidates go by brightness times their rise since the last survey."""
    ctx = PolicyContext(fov_um=(64, 64))
    policy = _plain_burst(max_active=1, trigger={"relative_intensity": {"min": 1.4}})
    assert policy.on_detections(_survey(0), _pair(130, 100), ctx) == []
    # left: 1.5 the median, up from 1.3; right: 1.45, up from 1.0 (it rises)
    assert policy.on_detections(_survey(1), _pair(150, 145), ctx)
    assert len(policy.active) == 1
    assert policy.active[0].xy[0] == pytest.approx(46 - 31.5)
    # without a survey before (no rise known), the brighter one goes first
    steady = _plain_burst(max_active=1, trigger={"relative_intensity": {"min": 1.4}})
    steady.on_detections(_survey(1), _pair(150, 145), ctx)
    assert steady.active[0].xy[0] == pytest.approx(16 - 31.5)


def test_a_cell_that_still_passes_the_trigger_keeps_its_burst():
    """`sustain` adds to `trigger`: a cell failing it but not `trigger` goes on."""
    ctx = PolicyContext(fov_um=(64, 64))
    # `sustain` no cell can pass: only `trigger` (1.5) keeps the burst going
    policy = _plain_burst(sustain={"relative_intensity": {"min": 5.0}})
    policy.on_detections(_survey(0), _cells(200), ctx)
    _follow(policy, 1, [200] * 10, ctx)
    assert policy.finished[0].ended.startswith("longest burst")
    # below `trigger` and `sustain`: gone after `tail_frames`
    policy = _plain_burst(sustain={"relative_intensity": {"min": 5.0}})
    policy.on_detections(_survey(0), _cells(200), ctx)
    assert _follow(policy, 1, [200, 140, 140, 140], ctx) == 1 + 2
    assert policy.finished[0].ended == "signature gone"


def test_a_burst_whose_frames_come_late_goes_on_at_their_pace():
    """A saturated camera delays burst frames: the burst keeps going, rebased.

    Frames asked for every 1 s come every 2.5 s (other bursts share the
    camera). The burst must not end as stale while its frames keep coming,
    and each frame it asks for next is due after the frame just taken (within
    two intervals), not on the original grid, already overdue.
    """
    ctx = PolicyContext(fov_um=(64, 64))
    policy = _plain_burst(max_duration_s=60)
    assert policy.on_detections(_survey(0), _cells(200), ctx)
    for k in range(10):
        t = 1 + 2.5 * k
        out = policy.on_detections(_burst_frame(t, 1, k), _cells(200), ctx)
        assert policy.active, f"frame {k}: {policy.finished[0].ended}"
        (add,) = out
        due = [e.min_start_time for e in add.events]
        assert t < min(due) <= t + 2.0 + 1e-9, (k, t, due)
        # the Scheduler may serve nearer bursts first only while this one's
        # gap stays short of two intervals (what a division capture allows)
        assert add.max_gap_s == pytest.approx(2.0)
    # frames that stop coming still end the burst
    policy.on_detections(_survey(60), _cells(100), ctx)
    assert policy.finished[0].ended.startswith("its frames were not acquired")


def test_no_new_burst_starts_while_the_camera_is_full():
    """Running bursts' frames 1.8 intervals apart: a new cell waits.

    The camera is shared by more bursts than it can serve at their interval;
    one more would push the gaps past two intervals (a missed capture), so
    the candidate is held back (and counted), although `max_active` leaves
    room, until the frames come less than 1.6 intervals apart again.
    """
    ctx = PolicyContext(fov_um=(64, 64))
    policy = _plain_burst(max_duration_s=60, max_active=8)
    places = {1: 0.0, 2: 300.0}  # burst id: where its cell is
    for dx in places.values():
        assert policy.on_detections(_survey(0), _cells(200, dx=dx), ctx)

    def frames(t):  # the next frame of every burst, at t
        for b, dx in places.items():
            k = policy.report()["bursts"][b - 1]["frames"]  # analysed so far
            policy.on_detections(_burst_frame(t, b, k), _cells(200, dx=dx), ctx)

    frames(1.0)
    frames(2.8)  # 1.8 s after the frame before: the camera is full
    assert not policy.on_detections(_survey(3.0), _cells(200, dx=600), ctx)
    assert len(policy.active) == 2
    assert policy.report()["held_back_camera_full"] == 1
    frames(4.3)  # 1.5 s: late, but not full
    assert policy.on_detections(_survey(4.5), _cells(200, dx=600), ctx)
    assert len(policy.active) == 3


def test_a_late_burst_frame_does_not_pull_the_next_one_straight_after_it():
    """Served by the real Scheduler: overdue burst frames keep their pace.

    The camera was busy when a burst's first two frames came due; the first
    is taken late, and the second, overdue too, waits `BURST_PACE` intervals
    after it instead of following at once (a gap of two intervals after it).
    """
    from _closed_loop import FakeClock, next_due

    from smartscope.policies._livecell import BURST_PACE
    from smartscope.scheduler import Scheduler

    clock = FakeClock()
    plan = MDASequence(
        stage_positions=[(0, 0, 0)], time_plan={"interval": 1, "loops": 1}
    )
    sched = Scheduler(plan, clock=clock)
    ctx = PolicyContext(fov_um=(64, 64), clock=clock)
    policy = _plain_burst(max_duration_s=60)
    next_due(sched, clock)  # the survey frame
    for action in policy.on_detections(_survey(0), _cells(200), ctx):
        sched.apply(action)
    clock.t = 5.0  # both burst frames queued (two ahead) are overdue now
    served = []
    for _ in range(2):
        event = next_due(sched, clock)
        served.append((clock.t, event.metadata["smartscope"]["burst_frame"]))
        clock.advance(0.05)  # a frame takes 50 ms
    assert served == [(5.0, 0), (pytest.approx(5.0 + BURST_PACE * 1.0), 1)]
