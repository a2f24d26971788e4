"""Test helpers: a deterministic closed loop without a microscope, and the CLI.

`simulate` runs the real analysis path on a simulated clock. The Scheduler
serves events; a simulated stage, camera and objective turret execute each one
the way the Micro-Manager engine does (positions, camera ROI, exposure and
device properties persist until an event changes them); the specimen renders
the frame; the frame is built as `Runner._on_frame_ready` builds it and handed
to a real `InferenceWorker` synchronously (``InferenceWorker.process``), which
segments, measures (ROI offsets, objective resampling), asks the policies and
applies their actions, through an `ApprovalGate` when an operator is given.
Nothing waits on wall-clock time: results depend only on the seeds.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from smartscope.approval import ApprovalGate, Proposal
from smartscope.detections import Detections
from smartscope.frame import Frame, event_tag
from smartscope.microscope import Objective
from smartscope.policies import PolicyContext
from smartscope.rundir import read_position
from smartscope.scheduler import Scheduler
from smartscope.stream import FrameStream, InferenceWorker

if TYPE_CHECKING:
    from smartscope.runner import Runner


class FakeClock:
    """A clock that only moves when told to: seconds since the run started.

    Counts its reads, so a test can wait (event-based, no sleeping) until code
    running on another thread has looked at the time again.
    """

    def __init__(self, t: float = 0.0) -> None:
        self.t = float(t)
        self.reads = 0
        self._cond = threading.Condition()

    def __call__(self) -> float:
        with self._cond:
            self.reads += 1
            self._cond.notify_all()
            return self.t

    def advance(self, dt: float) -> None:
        """Let `dt` seconds pass."""
        self.t += dt

    def wait_reads(self, n: int, timeout: float = 30.0) -> bool:
        """Block until the clock has been read `n` times in all; False on timeout.

        The timeout only guards against a hang; nothing is timed with it.
        """
        with self._cond:
            return self._cond.wait_for(lambda: self.reads >= n, timeout)


class IdleClock(FakeClock):
    """A `FakeClock` that notices when the Scheduler waits with nothing due.

    While `waiting` (set around ``next()``), every `idle_reads`-th read in a
    row at the same time calls `on_idle()`, which may let time pass: a
    Scheduler held open by a policy's pending work (or waiting for an event
    `upcoming` does not show) then sees time go on, as on a microscope,
    instead of waiting forever. A ``next()`` that does not wait reads the
    clock a few times (the Scheduler, the policies), far fewer than
    `idle_reads`.
    """

    def __init__(
        self, on_idle: Callable[[], None] | None = None, idle_reads: int = 12
    ) -> None:
        super().__init__()
        self.on_idle = on_idle
        self.idle_reads = idle_reads
        self.n_idle = 0
        self._waiting = False
        self._same = 0

    @property
    def waiting(self) -> bool:
        """Whether the Scheduler is inside ``next()``."""
        return self._waiting

    @waiting.setter
    def waiting(self, on: bool) -> None:
        self._waiting = on
        self._same = 0

    def __call__(self) -> float:
        if self._waiting:
            self._same += 1
            if self._same >= self.idle_reads:
                self._same = 0
                self.n_idle += 1
                if self.on_idle is not None:
                    self.on_idle()
        return super().__call__()

    def advance(self, dt: float) -> None:
        self._same = 0
        super().advance(dt)


def next_due(
    sched: Scheduler,
    clock: FakeClock,
    on_advance: Callable[[float], None] | None = None,
) -> Any:
    """``next(sched)`` on a fake clock: if nothing is due, time jumps to the next.

    `on_advance(dt)` is told when time jumps. Raises StopIteration when the
    Scheduler ends.
    """
    due = [e.min_start_time or 0.0 for e in sched.upcoming(50, include_base=True)]
    if due and min(due) > clock.t:  # nothing due: time passes
        dt = min(due) - clock.t
        clock.advance(dt)
        if on_advance is not None:
            on_advance(dt)
    return next(sched)


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
    pixel_size_um: float = 1.0,
    exposure_ms: float = 10.0,
    objectives: Mapping[str, Objective] | None = None,
    operator: Callable[[Proposal], bool] | None = None,
    idle_step_s: float = 5.0,
    on_detections: Callable[[Frame, Detections], None] | None = None,
    **sched_kw: Any,
) -> tuple[list[Frame], list[dict[str, float]], Scheduler]:
    """Run the closed loop; return the frames, their snaps and the Scheduler.

    Parameters
    ----------
    specimen
        Has ``render(x_um, y_um, z_um, *, shape, pixel_size_um, exposure_ms,
        rng)``; its image center is the stage position plus the ROI's offset.
    sensor : int
        Square camera, pixels.
    frame_s : float
        Run time one frame takes (acquisition and analysis).
    advance : callable, optional
        Called with ``dt`` whenever `dt` seconds of run time pass (a live
        specimen moves its clock).
    rng : numpy.random.Generator, optional
        Camera noise (default: the specimen's own).
    pixel_size_um : float
        The run's pixel size (of the objective it starts with).
    exposure_ms : float
        The camera's exposure until an event sets one.
    objectives : mapping of name to Objective, optional
        The turret: an event that sets an objective's properties images at its
        pixel size (rendered, resampled for the segmenter, mapped to the stage
        with it); the Scheduler reads the properties to put them back. The
        objective whose pixel size is `pixel_size_um` is in place at the start.
    operator : callable, optional
        Approval mode: actions go to an `ApprovalGate` and, after each frame,
        the operator approves (True) or rejects (False) each pending proposal.
        The gate is available as ``sched.approval``.
    idle_step_s : float
        Run time that passes at a time while the Scheduler waits with nothing
        due (a policy's pending work that ends with time, an untimed wait).
    on_detections : callable, optional
        Called with each frame and its `Detections` (the worker's
        ``detectionsReady``).
    **sched_kw
        More `Scheduler` arguments.

    The Scheduler's ``skipped_log`` lists what it dropped, ``worker`` is the
    `InferenceWorker`, ``clock`` the `IdleClock`.
    """
    clock = IdleClock()

    def tick(dt: float) -> None:
        clock.advance(dt)
        if advance is not None:
            advance(dt)

    # the hardware state the engine leaves between events
    state: dict[tuple[str, str], str] = {}
    turret = dict(objectives or {})
    if turret:
        start = next(o for o in turret.values() if o.pixel_size_um == pixel_size_um)
        state.update({(d, p): v for d, p, v in start.properties})
        sched_kw.setdefault("property_value", lambda d, p: state[(d, p)])

    def pixel_size_now() -> float:
        for objective in turret.values():
            if all(state.get((d, p)) == v for d, p, v in objective.properties):
                return objective.pixel_size_um
        return pixel_size_um

    sched = Scheduler(
        plan,
        clock=clock,
        sensor_size=(sensor, sensor),
        default_exposure_ms=exposure_ms,
        **sched_kw,
    )
    context = PolicyContext(
        fov_um=(sensor * pixel_size_um, sensor * pixel_size_um),
        pixel_size_um=pixel_size_um,
        clock=clock,
        objectives=turret,
    )
    gate = None
    if operator is not None:
        gate = ApprovalGate()
        gate.bind(sched, clock=clock)
    skipped: list[tuple[str, int, str]] = []
    sched.events.eventsSkipped.connect(lambda *a: skipped.append(a))
    center = (sensor - 1) / 2

    def to_stage(
        px: np.ndarray, stage_xy: tuple[float, float], ps: float | None
    ) -> np.ndarray:
        """Full-sensor pixels (the worker adds the ROI offset) to stage µm."""
        return np.asarray(stage_xy) + (px - center) * (ps or pixel_size_um)

    worker = InferenceWorker(
        FrameStream(),
        segmenter,
        policies,
        sched,
        to_stage=to_stage,
        context=context,
        clock=clock,
        approval=gate,
        pixel_size_um=pixel_size_um,
    )
    # as the Runner: the policies' pending work as the worker last published it
    sched.add_pending_check(worker.pending_work)
    if on_detections is not None:
        worker.events.detectionsReady.connect(on_detections)

    def idle() -> None:
        """The Scheduler waits: the worker, idle too, asks the policies again."""
        before = worker.pending_work()
        worker.refresh_pending()
        if before and not worker.pending_work():
            return  # their work is done: the run ends with no more time passing
        tick(idle_step_s)

    clock.on_idle = idle
    frames: list[Frame] = []
    snaps: list[dict[str, float]] = []
    roi_now = None
    x_um = y_um = z_um = 0.0
    exposure_now = exposure_ms
    while True:
        clock.waiting = True
        try:
            event = next_due(sched, clock, advance)
        except StopIteration:
            break
        finally:
            clock.waiting = False
        # the engine: the stage and camera keep what an event does not set
        if event.roi is not None:
            roi_now = event.roi
        x_um = x_um if event.x_pos is None else float(event.x_pos)
        y_um = y_um if event.y_pos is None else float(event.y_pos)
        z_um = z_um if event.z_pos is None else float(event.z_pos)
        if event.exposure is not None:
            exposure_now = float(event.exposure)
        for d, p, v in event.properties or ():
            state[(d, p)] = str(v)
        ps = pixel_size_now()
        x0, y0, w, h = (
            (roi_now.offset_x, roi_now.offset_y, roi_now.width, roi_now.height)
            if roi_now
            else (0, 0, sensor, sensor)
        )
        cx = x_um + (x0 + (w - 1) / 2 - center) * ps
        cy = y_um + (y0 + (h - 1) / 2 - center) * ps
        image = specimen.render(
            cx,
            cy,
            z_um,
            shape=(h, w),
            pixel_size_um=ps,
            exposure_ms=exposure_now,
            rng=rng,
        )
        snaps.append(
            {
                "t_s": float(getattr(specimen, "time_s", clock.t)),
                "x_um": cx,
                "y_um": cy,
                "width_um": w * ps,
                "height_um": h * ps,
                "exposure_ms": exposure_now,
                "intensity": 1.0,
            }
        )
        # as Runner._on_frame_ready builds it
        tag = event_tag(event)
        frame = Frame(
            frame_index=len(frames),
            event=event,
            position=str(tag.get("position", "p000")),
            kind=str(tag.get("kind", "base")),
            stage_x_um=x_um,
            stage_y_um=y_um,
            stage_z_um=z_um,
            channel=event.channel.config if event.channel else None,
            exposure_ms=exposure_now,
            t_acquired=clock.t,
            event_id=int(tag.get("event_id", -1)),
            t_clock=clock.t,
            pixel_size_um=ps,
        )
        frames.append(frame)
        sched.analysis_started()
        worker.process([(frame, image)])
        if worker.error is not None:
            raise AssertionError(worker.error)
        if gate is not None and operator is not None:
            for proposal in gate.pending():
                if operator(proposal):
                    gate.approve(proposal.proposal_id)
                else:
                    gate.reject(proposal.proposal_id)
        tick(frame_s)
    if gate is not None:
        gate.close()
    sched.skipped_log = skipped  # type: ignore[attr-defined]
    sched.worker = worker  # type: ignore[attr-defined]
    sched.clock = clock  # type: ignore[attr-defined]
    sched.approval = gate  # type: ignore[attr-defined]
    return frames, snaps, sched


def paused_with_nothing_under_way(runner: Runner) -> bool:
    """Paused, no event being acquired, none able to start until resumed.

    Either pymmcore-plus is paused itself (it pauses at an event boundary), or
    every event the held Scheduler served has its frame, so the acquisition
    waits in the Scheduler's ``next()`` for the hold to be released, or the
    one served event pymmcore-plus started despite the pause (it came while
    pymmcore-plus slept towards that event's start time) waits in the
    engine's set-up. For plans of one frame per event.
    """
    sched = runner.scheduler
    return (
        sched is not None
        and sched.held
        and (
            runner.microscope.is_paused()
            or runner._frame_count == sched.n_served
            or runner.engine.holding
        )
    )


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


def kill_9_when(
    args: list[str], out: Path, far_enough: Callable[[list[dict]], bool]
) -> None:
    """Run ``smartscope ARGS`` (writing to `out`) and SIGKILL it.

    It is killed once `far_enough` (of the frames logged so far) holds, after
    120 s, or when it ends by itself.
    """
    import signal
    import time

    from smartscope.rundir import read_jsonl

    proc = subprocess.Popen(
        [sys.executable, "-m", "smartscope.cli", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "CI": "true"},
    )
    frames_log = out / "frames.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if frames_log.exists() and far_enough(read_jsonl(frames_log)):
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def all_stored(out: Path, records: list[dict]) -> bool:
    """Whether every frame record's plane in run `out` holds data.

    Each position's array is read once (one read per frame was quadratic).
    """
    arrays: dict[str, np.ndarray] = {}
    for record in records:
        a = record["array"]
        if a["position"] not in arrays:
            arrays[a["position"]] = read_position(out, a["position"])
        if not arrays[a["position"]][a["t"], a["c"], a["z"]].any():
            return False
    return True
