"""Test helpers: a deterministic closed loop without a microscope, and the CLI.

`simulate` runs the Scheduler on a simulated clock: each served event is
rendered by a simulated specimen the way the simulated cameras do (stage
position, camera ROI, Z, exposure), segmented, and the policies' actions go
back to the Scheduler. Results depend only on the seeds.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from smartscope.detections import Detections
from smartscope.frame import Frame, event_tag
from smartscope.policies import PolicyContext
from smartscope.scheduler import Scheduler


def simulate(
    specimen: Any,
    plan: Any,
    policies: list[Any],
    segmenter: Any,
    *,
    sensor: int,
    frame_s: float = 0.02,
    advance: Callable[[float], None] | None = None,
    rng: np.random.Generator | None = None,
    **sched_kw: Any,
) -> tuple[list[Frame], list[dict[str, float]], Scheduler]:
    """Run the closed loop; return the frames, their snaps and the Scheduler.

    `advance(dt)` is called whenever `dt` seconds of run time pass (a live
    specimen moves its clock); the Scheduler's ``skipped_log`` lists what it
    dropped.
    """
    clock = [0.0]

    def tick(dt: float) -> None:
        clock[0] += dt
        if advance is not None:
            advance(dt)

    sched = Scheduler(
        plan, clock=lambda: clock[0], sensor_size=(sensor, sensor), **sched_kw
    )
    context = PolicyContext(
        fov_um=(sensor, sensor), pixel_size_um=1.0, clock=lambda: clock[0]
    )
    for p in policies:
        sched.add_pending_check(p.has_pending_work)
    skipped: list[tuple[str, int, str]] = []
    sched.events.eventsSkipped.connect(lambda *a: skipped.append(a))
    frames: list[Frame] = []
    snaps: list[dict[str, float]] = []
    roi_now = None
    while True:
        due = [e.min_start_time or 0.0 for e in sched.upcoming(50, include_base=True)]
        if due and min(due) > clock[0]:  # nothing due: time passes
            tick(min(due) - clock[0])
        try:
            event = next(sched)
        except StopIteration:
            break
        if event.roi is not None:
            roi_now = event.roi
        x0, y0, w, h = (
            (roi_now.offset_x, roi_now.offset_y, roi_now.width, roi_now.height)
            if roi_now
            else (0, 0, sensor, sensor)
        )
        cx = event.x_pos + x0 + (w - 1) / 2 - (sensor - 1) / 2
        cy = event.y_pos + y0 + (h - 1) / 2 - (sensor - 1) / 2
        z = event.z_pos if event.z_pos is not None else 0.0
        image = specimen.render(cx, cy, z, shape=(h, w), exposure_ms=10, rng=rng)
        snaps.append(
            {
                "t_s": float(getattr(specimen, "time_s", clock[0])),
                "x_um": cx,
                "y_um": cy,
                "width_um": w,
                "height_um": h,
                "exposure_ms": 10.0,
                "intensity": 1.0,
            }
        )
        tag = event_tag(event)
        frame = Frame(
            frame_index=len(frames),
            event=event,
            position=tag["position"],
            kind=tag["kind"],
            stage_x_um=event.x_pos,
            stage_y_um=event.y_pos,
            stage_z_um=z,
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
        det.extra["image"] = image
        for policy in policies:
            for action in policy.on_detections(frame, det, context):
                sched.apply(
                    action,
                    trigger_frame=frame.frame_index,
                    trigger_position=frame.position,
                    kind=policy.name,
                )
        tick(frame_s)
    sched.skipped_log = skipped  # type: ignore[attr-defined]
    return frames, snaps, sched


def smartscope(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the CLI as CI does: no terminal, no stdin, ``CI=true``."""
    env = {**os.environ, "CI": "true", "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "smartscope.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        env=env,
    )
