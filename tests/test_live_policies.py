"""Live-cell policies against a simulated specimen's ground truth.

`_simulate` is a deterministic closed loop without a microscope: the Scheduler
serves events on a simulated clock, the `LiveSpecimen` renders each one the way
the `LiveCellCamera` does (stage position, camera ROI, exposure, dose), the
built-in model segments it, and the policies' actions go back to the Scheduler.
So results depend only on the seeds, and are checked against ground truth.
"""

from __future__ import annotations

import gc

import numpy as np
import pytest
from useq import MDASequence

from smartscope.detections import Detections
from smartscope.frame import Frame, event_tag
from smartscope.scheduler import (
    AdaptiveInterval,
    EventBurst,
    PolicyContext,
    Scheduler,
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


def _simulate(specimen, plan, policies, segmenter, *, frame_s=0.02, **sched_kw):
    """Run the closed loop on a simulated clock; return frames and snaps."""
    clock = [0.0]
    sched = Scheduler(
        plan, clock=lambda: clock[0], sensor_size=(SENSOR, SENSOR), **sched_kw
    )
    context = PolicyContext(
        fov_um=(SENSOR, SENSOR), pixel_size_um=1.0, clock=lambda: clock[0]
    )
    for p in policies:
        sched.add_pending_check(p.has_pending_work)
    frames, snaps = [], []
    roi_now = None
    while True:
        due = [e.min_start_time or 0.0 for e in sched.upcoming(50, include_base=True)]
        if due and min(due) > clock[0]:  # nothing due: time passes
            _advance(specimen, clock, min(due) - clock[0])
        try:
            event = next(sched)
        except StopIteration:
            break
        if event.roi is not None:
            roi_now = event.roi
        x0, y0, w, h = (
            (roi_now.offset_x, roi_now.offset_y, roi_now.width, roi_now.height)
            if roi_now
            else (0, 0, SENSOR, SENSOR)
        )
        cx = event.x_pos + x0 + (w - 1) / 2 - (SENSOR - 1) / 2
        cy = event.y_pos + y0 + (h - 1) / 2 - (SENSOR - 1) / 2
        image = specimen.render(cx, cy, shape=(h, w), exposure_ms=10)
        tag = event_tag(event)
        snaps.append(
            {
                "t_s": specimen.time_s,
                "x_um": cx,
                "y_um": cy,
                "width_um": w,
                "height_um": h,
                "exposure_ms": 10.0,
                "intensity": 1.0,
            }
        )
        frame = Frame(
            frame_index=len(frames),
            event=event,
            position=tag["position"],
            kind=tag["kind"],
            stage_x_um=event.x_pos,
            stage_y_um=event.y_pos,
            stage_z_um=0.0,
            channel="DAPI",
            exposure_ms=10.0,
            t_acquired=clock[0],
            t_clock=clock[0],
        )
        frames.append(frame)
        labels = segmenter.segment(image[None]).labels[0]
        offset = np.array([cx - (w - 1) / 2, cy - (h - 1) / 2])
        det = Detections.from_labels(
            labels, image, to_stage=lambda px, o=offset: px + o
        )
        for policy in policies:
            for action in policy.on_detections(frame, det, context):
                sched.apply(
                    action,
                    trigger_frame=frame.frame_index,
                    trigger_position=frame.position,
                    kind=policy.name,
                )
        _advance(specimen, clock, frame_s)
    return frames, snaps, sched


def _advance(specimen, clock, dt):
    clock[0] += dt
    specimen.advance(dt * ACCEL)


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
    assert any(b.ended == "signature gone" for b in policy.finished)
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
