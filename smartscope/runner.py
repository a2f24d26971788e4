"""`Runner`: wires one experiment — microscope, stream, scheduler, storage."""

from __future__ import annotations

import functools
import gc
import logging
import os
import platform
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from psygnal import Signal, SignalGroup

from smartscope._errors import (
    ExperimentError,
    OutputError,
    RegistryError,
    SmartscopeError,
    first_line,
)
from smartscope._threads import freeze_heap, thaw_heap
from smartscope.approval import ApprovalGate
from smartscope.engine import DeviceFault, sequence_capacity
from smartscope.frame import Frame, event_tag
from smartscope.limits import SafetyLimits, check_plan, check_plan_size
from smartscope.microscope import Microscope
from smartscope.policies import PolicyContext
from smartscope.rundir import PlateGeometry, RunStorage, warm_up_writer
from smartscope.scheduler import Scheduler
from smartscope.stream import FrameStream, InferenceWorker, warm_up

if TYPE_CHECKING:
    from useq import MDAEvent, MDASequence

    from smartscope.experiment import Experiment
    from smartscope.segment import PSegmenter

__all__ = [
    "ResumePoint",
    "RunSummary",
    "Runner",
    "RunnerEvents",
    "check_output_dir",
    "prepare_hardware",
    "resolve_plan",
    "run_experiment",
]

_VERSIONED = (
    "smartscope",
    "pymmcore-plus",
    "pymmcore",
    "useq-schema",
    "ome-writers",
    "numpy",
    "scipy",
    "scikit-image",
    "torch",
)


@functools.cache
def package_versions() -> dict[str, str | None]:
    """Versions of the packages that shape a run's results."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


@dataclass
class RunSummary:
    """Counts and timings of a finished run (also stored in ``run.json``).

    ``latency_ms`` holds p50/p99 of frame→detections, →decision and →queued;
    ``analysis`` the frames analysed and skipped by reason (``superseded``,
    ``stale``, ``overflow``: see `FrameStream`) and the frame age at decision;
    ``schedule`` the Scheduler's `Scheduler.stats`: lateness (s) of base visits
    and of added events, missed timepoint deadlines, stage travel (µm) and
    light dose (exposure ms) per position.

    ``status`` is ``"completed"``, ``"completed_with_errors"`` (the plan ran to
    its end, but a policy or the segmenter failed on the way: see `errors`),
    ``"interrupted"`` or ``"failed"`` (`error` says why; `fault` names the
    device, the call and the error of a hardware fault). ``errors`` lists the
    contained component faults (the first 100; `n_errors` counts them all);
    ``hardware`` the engine's retries.
    """

    status: str
    reason: str
    directory: str
    wall_time_s: float
    frames_acquired: int
    frames_analysed: int
    frames_dropped: int
    detections: int
    decisions: int
    events_scheduled: int
    events_skipped: int
    base_events: int
    positions: int
    latency_ms: dict[str, dict[str, float | None]] = field(default_factory=dict)
    schedule: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    analysis: dict[str, Any] = field(default_factory=dict)
    fault: dict[str, Any] | None = None
    errors: list[dict[str, Any]] = field(default_factory=list)
    n_errors: int = 0
    hardware: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ResumePoint:
    """Where a `Runner` goes on with an interrupted run in its directory.

    Built by `smartscope.resume`: the runner keeps what is on disk, appends to
    the logs, does not image `done_positions` again (and gives added positions
    that would reuse one of those names a fresh name), numbers frames and
    decisions after the logged ones, and merges `info` into ``run.json``.
    Before acquiring it gives the policies the earlier sessions' analysed
    frames again (`replay`, see `smartscope.resume.replay_frames`); of the
    events they add on the way, those already `stored` (``(position, visit,
    c, z)``) are left out.
    """

    done_positions: frozenset[str] = frozenset()
    first_frame_index: int = 0
    first_decision_id: int = 0
    info: dict[str, Any] = field(default_factory=dict)
    replay: tuple[dict[str, Any], ...] = ()
    stored: frozenset[tuple[str, int, int, int]] = frozenset()


class RunnerEvents(SignalGroup):
    """Signals of a `Runner`.

    ``frameAcquired`` is emitted on the acquisition thread, ``detectionsReady``
    and ``decisionMade`` on the inference thread; GUI code connects with
    ``thread="main"``.
    """

    frameAcquired = Signal(object)  # Frame
    detectionsReady = Signal(object, object)  # Frame, Detections
    decisionMade = Signal(dict)
    eventsScheduled = Signal(list)
    runFinished = Signal(object)  # RunSummary


def default_run_dir(name: str) -> Path:
    """``runs/<name>-<UTC timestamp>`` under the working directory."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return Path("runs") / f"{safe}-{stamp}"


class Runner:
    """Run one `Experiment` on a `Microscope` and write everything to disk.

    Parameters
    ----------
    experiment : Experiment
        What to run.
    microscope : Microscope, optional
        Use this microscope (left open afterwards). By default the runner loads
        the experiment's config (or `config`) and closes it in `close`.
    config : str | Path, optional
        Hardware config overriding the experiment's.
    out_dir : str | Path, optional
        Run directory overriding the experiment's ``output.directory``.
    overwrite : bool, optional
        Allow writing into a directory that already holds a run.
    approval : bool | ApprovalGate, optional
        Operator approval mode: policies' actions wait in this `ApprovalGate`
        (``True``: a new one, no auto-approval) until approved or rejected;
        the base plan goes on meanwhile and the run does not end while any is
        pending. Available as `approval` (None when off).
    resume_point : ResumePoint, optional
        Go on with the interrupted run already in the directory (see
        `smartscope.resume.resume_run`) instead of starting a new one.

    Notes
    -----
    From the end of set-up until `close`, the objects alive at start-up (the
    imports, the core, the model) are frozen out of garbage collection
    (`gc.freeze`): a full collection of that heap would hold the GIL for
    tens of milliseconds mid-run. Close every runner (``with Runner(...)``).

    Examples
    --------
    >>> exp = Experiment.from_file("demos/find_and_center.yaml")
    >>> with Runner(exp, out_dir="runs/demo") as runner:
    ...     summary = runner.run()
    """

    def __init__(
        self,
        experiment: Experiment,
        *,
        microscope: Microscope | None = None,
        config: str | Path | None = None,
        out_dir: str | Path | None = None,
        overwrite: bool | None = None,
        approval: bool | ApprovalGate = False,
        resume_point: ResumePoint | None = None,
    ) -> None:
        self.experiment = experiment
        self.resume_point = resume_point
        self.events = RunnerEvents()
        self.approval: ApprovalGate | None = (
            approval
            if isinstance(approval, ApprovalGate)
            else (ApprovalGate() if approval else None)
        )
        directory = out_dir or experiment.output.directory
        self.directory = (
            Path(directory) if directory else default_run_dir(experiment.name)
        )
        overwrite = experiment.output.overwrite if overwrite is None else overwrite
        if resume_point is not None:
            pass  # keep the run in the directory and go on with it
        elif (self.directory / "run.json").exists() and not overwrite:
            raise ExperimentError(
                f"{self.directory} already holds a run (choose another --out or "
                "allow overwrite)"
            )
        # build everything that can fail on bad input before touching hardware
        self.policies = [spec.build() for spec in experiment.policies]
        created = check_output_dir(
            self.directory, min_free_mb=experiment.output.min_free_mb
        )
        if self.directory.exists() and overwrite:
            _clear_run_dir(self.directory)
        #: the segmenter (in its child process, see `analysis.worker`) and the
        #: microscope, set below; `close` releases what exists of them
        self.segmenter: PSegmenter
        self.microscope: Microscope
        self._owns_microscope = microscope is None
        try:
            self.segmenter = _build_segmenter(experiment)
            if microscope is None:
                microscope = Microscope(experiment.config_path(config))
            elif config is not None:
                microscope.load_config(experiment.config_path(config))
            self.microscope = microscope
            #: the base plan (grid field of view filled in) and the safety
            #: limits, checked before anything moves
            self.plan, self.limits = check_experiment(experiment, microscope)
            #: presets of the config's objective group (targets may switch)
            self.objectives = microscope.objectives()
            # imports, caches and JIT of the model are paid before the first frame
            self.warmup_s = (
                _warm_up(self.segmenter, microscope.image_shape, experiment)
                if experiment.analysis.enabled
                else 0.0
            )
            # and those of the OME-Zarr writer (its first array imports the
            # backend holding the interpreter lock: acquisition would stall)
            self.warmup_s += warm_up_writer(experiment.output.compression)
        except BaseException:
            self.close()  # never leave a core loaded behind a failed set-up
            for path in reversed(created):  # nor empty folders of ours
                try:
                    path.rmdir()
                except OSError:
                    break
            raise

        self.scheduler: Scheduler | None = None
        self.stream: FrameStream | None = None
        self.worker: InferenceWorker | None = None
        self.storage: RunStorage | None = None
        self.summary: RunSummary | None = None
        #: Reports of the config's Python devices (a simulated specimen's score).
        self.device_reports: dict[str, dict[str, Any]] = {}
        self._thread: threading.Thread | None = None
        self._t0 = 0.0
        self._first_frame = resume_point.first_frame_index if resume_point else 0
        self._frame_count = self._first_frame
        #: analysed frames of earlier sessions given to the policies (resume)
        self.n_replayed = 0
        self._cancel_reason: str | None = None
        self._mda_error: str | None = None
        self._fault: dict[str, Any] | None = None
        self.engine: Any = None
        self._previous_engine: Any = None
        self._started_at = ""
        # pauses, taken out of the run clock (the Scheduler's time base)
        self._paused_s = 0.0
        self._paused_at: float | None = None
        # model, core and imports loaded: no full collection walks them mid-run
        freeze_heap()
        self._heap_frozen = True

    # --------------------------------------------------------------- set-up
    def _resolve_plan(self, seq: MDASequence) -> MDASequence:
        """Fill in the grid plan's field of view from the microscope."""
        return resolve_plan(seq, self.microscope)

    @property
    def context(self) -> PolicyContext:
        """The `PolicyContext` given to the policies."""
        return PolicyContext(
            fov_um=self.microscope.fov_um,
            pixel_size_um=self.microscope.pixel_size_um,
            channel_group=self.experiment.channel_group,
            clock=self.run_clock,
            objectives=self.objectives,
        )

    def run_clock(self) -> float:
        """Seconds of acquisition on the pymmcore-plus event timer, pauses excluded.

        The time base of ``MDAEvent.min_start_time`` (the Scheduler's clock).
        A pause (`pause` to `resume`) stops it, wherever acquisition was held:
        waiting in the Scheduler for the next event, or in pymmcore-plus's
        runner (whose own pause count is used if larger).
        """
        mda = self.microscope.core.mda
        return mda.event_seconds_elapsed() - self._paused_total()

    def _paused_total(self) -> float:
        """Seconds the run has been paused so far."""
        mda = self.microscope.core.mda
        paused = self._paused_s
        if self._paused_at is not None:
            paused += time.perf_counter() - self._paused_at
        return max(paused, float(getattr(mda, "_paused_time", 0.0)))

    def _on_skipped(self, position: str, n: int, reason: str) -> None:
        """Log what the Scheduler itself dropped (e.g. a spent light-dose budget)."""
        if self.storage is not None and reason != "position skipped":
            self.storage.log_decision(
                {
                    "decision_id": None,
                    "policy": "scheduler",
                    "trigger": None,
                    "actions": [
                        {
                            "type": "skip_visits",
                            "position": position,
                            "status": "applied",
                            "n_dropped": n,
                            "outcome": reason,
                        }
                    ],
                }
            )

    def clock(self) -> float:
        """Seconds since the run started."""
        return time.perf_counter() - self._t0

    # ------------------------------------------------------------------ run
    def start(self) -> None:
        """Start acquisition and analysis; returns immediately."""
        if self._thread is not None:
            raise RuntimeError("a Runner runs once; make a new one")
        exp = self.experiment
        np.random.seed(exp.seed)
        core = self.microscope.core
        #: hardware calls retried, moves outside the limits refused (the core's
        #: engine before is put back by `finish`)
        self._previous_engine = core.mda.engine
        self.engine = self.microscope.use_safe_engine(
            retries=exp.hardware.retries,
            retry_backoff_s=exp.hardware.retry_backoff_s,
            limits=self.limits,
        )
        self.engine.on_cannot_sequence = self._cannot_sequence
        self.engine.hold = self._engine_hold
        self.storage = RunStorage(
            self.directory,
            pixel_size_um=self.microscope.pixel_size_um,
            compression=exp.output.compression,
            plate=PlateGeometry.from_plan(self.plan),
            to_stage=self.microscope.pixel_to_stage,
        )
        (self.directory / "experiment.yaml").write_text(exp.to_yaml())
        settings = exp.scheduler
        self.scheduler = Scheduler(
            self.plan,
            clock=self.run_clock,
            travel_order=settings.travel_order,
            max_delay_s=settings.max_delay_s,
            travel_slack_s=settings.travel_slack_s,
            deadline_fraction=settings.deadline_fraction,
            dose_budget_ms=settings.dose_budget_ms,
            max_analysis_lag=settings.max_analysis_lag,
            default_exposure_ms=float(core.getExposure()),
            sensor_size=self.microscope.sensor_shape[::-1],
            property_value=core.getProperty,
            done_positions=self.resume_point.done_positions
            if self.resume_point
            else (),
            limits=self.limits,
            max_sequence_frames=self._max_sequence_frames(),
        )
        if not self.scheduler.is_timelapse:  # each position is visited once
            # so finished arrays can be closed: memory stays flat over a plate
            self.storage.images.max_open = self.storage.labels.max_open = 64
        self.engine.choose_ahead = (
            self.scheduler.choose_ahead if settings.choose_ahead else None
        )
        self.scheduler.events.eventsSkipped.connect(self._on_skipped)
        self.scheduler.events.eventsScheduled.connect(self.events.eventsScheduled)
        if self.approval is not None:
            self.approval.bind(self.scheduler, storage=self.storage, clock=self.clock)
        self.stream = FrameStream(
            exp.analysis.queue_size,
            max_frame_age_s=None
            if exp.analysis.max_frame_age_ms is None
            else exp.analysis.max_frame_age_ms / 1000.0,
            clock=self.clock,
            sequence_last_only=exp.analysis.sequence_frames == "last",
        )
        num_threads = analysis_threads(exp)
        self.worker = InferenceWorker(
            self.stream,
            self.segmenter,
            self.policies,
            self.scheduler,
            to_stage=self.microscope.pixel_to_stage,
            context=self.context,
            clock=self.clock,
            storage=self.storage,
            batch_size=exp.analysis.batch_size,
            num_threads=num_threads,
            approval=self.approval,
            pixel_size_um=self.context.pixel_size_um,
            nice=exp.analysis.nice,
            policy_on_error=[spec.on_error for spec in exp.policies],
            segmenter_on_error=exp.analysis.on_error,
        )
        # the policies' pending work, as the worker thread last published it:
        # the acquisition thread never calls a policy's has_pending_work
        self.scheduler.add_pending_check(self.worker.pending_work)
        if self.resume_point is not None:  # decision ids go on after the logged
            self.worker.n_decisions = self.resume_point.first_decision_id
            self.n_replayed = self._replay(self.resume_point)
        self.worker.events.detectionsReady.connect(self.events.detectionsReady)
        self.worker.events.decisionMade.connect(self.events.decisionMade)
        self._started_at = datetime.now(timezone.utc).isoformat()
        self.storage.write_run_json(self._run_info("running"))

        core.mda.events.frameReady.connect(self._on_frame_ready)
        # what start() built (the plan, the stores) joins the frozen heap too;
        # any garbage among it is collected when the heap thaws at close()
        gc.freeze()
        self._t0 = time.perf_counter()
        if exp.analysis.enabled:
            self.worker.start()
        self._thread = threading.Thread(
            target=self._acquire, name="smartscope-acquisition", daemon=True
        )
        self._thread.start()

    def _max_sequence_frames(self) -> int:
        """Longest hardware sequence for the Scheduler (0: event by event).

        ``scheduler.sequence: off`` turns sequences off; a camera that cannot
        hold two frames in its sequence buffer (or a multi-camera) too, said
        once in ``run.log``.
        """
        settings = self.experiment.scheduler
        if settings.sequence == "off":
            return 0
        capacity, why = sequence_capacity(self.microscope.core)
        if why is not None:
            self._log_event_by_event(why)
            return 0
        # a camera run that later sequences continue stops within the buffer too
        self.engine.max_run_frames = capacity
        return min(capacity, settings.max_sequence_frames)

    def _cannot_sequence(self, reason: str) -> None:
        """The camera refused a sequence: event by event from now on (said once)."""
        self._log_event_by_event(reason)
        if self.scheduler is not None:
            self.scheduler.disable_sequencing(reason)

    def _log_event_by_event(self, reason: str) -> None:
        logging.getLogger("smartscope.run").warning(
            "hardware sequencing off, every frame is acquired on its own: %s", reason
        )

    def _replay(self, point: ResumePoint) -> int:
        """Bring the policies up to where the earlier sessions left them."""
        from smartscope.rundir import event_location, replay_frames

        if not point.replay or not self.experiment.analysis.enabled:
            return 0

        def stored(event: MDAEvent) -> bool:
            where = event_location(event)
            return where is None or where in point.stored

        frames = replay_frames(self.directory, point.replay)
        return self.worker.replay(frames, stored=stored)  # type: ignore[union-attr]

    def _acquire(self) -> None:
        try:
            mda_thread = self.microscope.run(self.scheduler)  # type: ignore[arg-type]
            mda_thread.join()
            error = self.microscope.run_error
        except Exception as e:
            error = e
        if isinstance(error, DeviceFault):
            self._fault = error.to_json()
            self._mda_error = f"device fault: {error}"
        elif error is not None:
            self._mda_error = f"acquisition failed: {type(error).__name__}: " + (
                first_line(error)
            )
        if error is not None:
            logging.getLogger("smartscope.run").error("%s", self._mda_error)

    def _on_frame_ready(self, img: np.ndarray, event: MDAEvent, meta: dict) -> None:
        """Acquisition thread: store the frame and hand it to analysis. Never waits."""
        t = self.clock()
        t_clock = self.run_clock()
        sequence = meta.get("sequence") or {}  # SafeEngine's: which frame of which
        if meta.get("hardware_triggered"):  # the camera's own time of the frame
            # (SafeEngine's, on the runner's clock): before now by the frame's
            # wait in the sequence buffer; a few ms after now where the run's
            # first frame was popped late and set the camera clock's zero late
            # (the frames keep the camera's spacing: see SafeEngine._frame_time_ms)
            lag = t_clock - (float(meta.get("runner_time_ms", 0.0)) / 1000.0)
            lag += self._paused_total()
            if -0.02 < lag < 5.0:
                t, t_clock = t - lag, t_clock - lag
        tag = event_tag(event)
        pos = meta.get("position") or {}
        frame = Frame(
            frame_index=self._frame_count,
            event=event,
            position=str(tag.get("position", "p000")),
            kind=str(tag.get("kind", "base")),
            stage_x_um=float(pos.get("x", event.x_pos or 0.0)),
            stage_y_um=float(pos.get("y", event.y_pos or 0.0)),
            stage_z_um=_opt_float(pos.get("z", event.z_pos)),
            channel=event.channel.config if event.channel else None,
            exposure_ms=_opt_float(meta.get("exposure_ms", event.exposure)),
            t_acquired=t,
            event_id=int(tag.get("event_id", -1)),
            t_clock=t_clock,
            pixel_size_um=_opt_float(meta.get("pixel_size_um")),
            sequence=sequence.get("index"),
            sequence_end=bool(sequence)
            and sequence.get("frame") == sequence.get("frames", 0) - 1,
        )
        self._frame_count += 1
        # queued for the writer before analysis can see it: its labels (written
        # on the same thread) always come after its image
        self.storage.submit_frame(img, frame)  # type: ignore[union-attr]
        if self._analyze(frame):
            self.scheduler.analysis_started()  # type: ignore[union-attr]
            # skipped frames end their analysis through the worker's on_skip
            needed = self._needed(frame)
            self.stream.put(frame, img, required=needed)  # type: ignore[union-attr]
        self.events.frameAcquired.emit(frame)

    def _analyze(self, frame: Frame) -> bool:
        analysis = self.experiment.analysis
        return analysis.enabled and (analysis.analyze == "all" or frame.kind == "base")

    def _needed(self, frame: Frame) -> bool:
        """Whether a policy needs this frame analysed (then it is never skipped).

        A policy says so with ``needs(frame)``; one without that method needs
        every frame but a `Stream`'s. Without policies no frame is needed: the
        newest ones are analysed for the record.
        """
        worker = self.worker
        for k, policy in enumerate(self.policies):
            if worker is not None and worker.is_disabled(k):
                continue
            needs = getattr(policy, "needs", None)
            if needs is None:
                if "stream" in event_tag(frame.event):
                    continue  # a stream's frames: see analysis.sequence_frames
                return True
            try:
                if needs(frame):
                    return True
            except Exception as e:  # a fault of the policy: the frame is kept
                if worker is not None:
                    worker.policy_fault(k, frame, e, "needs")
                return True
        return False

    def is_running(self) -> bool:
        """Whether acquisition is still going."""
        return self._thread is not None and self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for acquisition to end; True if it has."""
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def pause(self) -> None:
        """Pause acquisition at the next event boundary.

        The Scheduler holds back the next event, and an event pymmcore-plus
        starts anyway (the pause landed while it slept towards that event's
        start time) waits in the engine's set-up until `resume`: no frame is
        taken while paused after the one under way.
        """
        if self.scheduler is not None:
            self.scheduler.hold(True)
        if self._paused_at is None:
            self._paused_at = time.perf_counter()
        self.microscope.pause()

    def resume(self) -> None:
        """Resume a paused acquisition."""
        if self._paused_at is not None:  # the clock goes on from where it stood
            self._paused_s += time.perf_counter() - self._paused_at
            self._paused_at = None
        self.microscope.resume()
        if self.scheduler is not None:
            self.scheduler.hold(False)

    def is_paused(self) -> bool:
        """Whether acquisition is paused (or held at the next event)."""
        held = self.scheduler is not None and self.scheduler.held
        return held or self.microscope.is_paused()

    def _engine_hold(self) -> str | None:
        """What the engine does with an event it is about to set up (`SafeEngine`)."""
        if self._cancel_reason is not None:
            return "stop"
        if self.scheduler is not None and self.scheduler.held:
            return "pause"
        return None

    def cancel(self, reason: str = "cancelled") -> None:
        """Stop after the current event; `finish` then records 'interrupted'."""
        if self._cancel_reason is None:
            self._cancel_reason = reason
        if self.scheduler is not None:
            self.scheduler.stop(reason)
        self.microscope.cancel()

    def finish(self) -> RunSummary:
        """Wait for acquisition and analysis to end; close the data; write run.json."""
        if self.summary is not None:
            return self.summary
        self.wait()
        core = self.microscope.core
        core.mda.events.frameReady.disconnect(self._on_frame_ready)
        if self._previous_engine is not None and not core.mda.is_running():
            core.mda.set_engine(self._previous_engine)
        worker, storage = self.worker, self.storage
        assert worker is not None and storage is not None and self.scheduler
        if worker.is_alive():
            worker.finish()
        if self.approval is not None:  # what the operator never answered
            self.approval.close()
        try:
            storage.close()
        except Exception as e:  # a full disk: the frames so far stay readable
            storage.write_errors.append(f"{type(e).__name__}: {first_line(e)}")
        self.device_reports = self._device_run_files()
        error = self._mda_error or worker.error
        if storage.write_errors:
            error = error or f"writing frames failed: {storage.write_errors[0]}"
        if error:
            status, reason = "failed", error
        elif self._cancel_reason is not None:
            status, reason = "interrupted", self._cancel_reason
        elif worker.n_faults:
            status = "completed_with_errors"
            first = worker.faults[0]
            reason = (
                f"{self.scheduler.finish_reason or 'completed'}, with "
                f"{worker.n_faults} error(s); first: {first['component']} "
                f"{first['name']} in {first['call']} at frame "
                f"{first['frame_index']}: {first['error']} ({first['on_error']})"
            )
        else:
            status = "completed"
            reason = self.scheduler.finish_reason or "completed"
        sched = self.scheduler
        self.summary = RunSummary(
            status=status,
            reason=reason,
            directory=str(self.directory),
            wall_time_s=round(self.clock(), 3),
            frames_acquired=self._frame_count - self._first_frame,
            frames_analysed=worker.n_analysed,
            frames_dropped=self.stream.n_dropped if self.stream else 0,
            detections=worker.n_detections,
            decisions=worker.n_decisions
            - (self.resume_point.first_decision_id if self.resume_point else 0),
            events_scheduled=worker.n_events_scheduled
            + (self.approval.n_events_scheduled if self.approval else 0),
            events_skipped=sched.n_skipped,
            base_events=sched.n_base_served,
            positions=len(storage.images.positions),
            latency_ms=worker.latency_percentiles(),
            schedule=sched.stats(),
            error=error,
            analysis=worker.analysis_summary(),
            fault=self._fault,
            errors=list(worker.faults),
            n_errors=worker.n_faults,
            hardware=self.engine.stats() if self.engine is not None else {},
        )
        try:
            storage.write_run_json(self._run_info(status))
        except OSError as e:  # a full disk: say so, keep what is on disk
            logging.getLogger("smartscope.run").error(
                "run.json not written: %s", first_line(e)
            )
            if status != "failed":
                self.summary.status = "failed"
                self.summary.reason = self.summary.error = (
                    f"writing run.json failed: {first_line(e)}"
                )
        self.events.runFinished.emit(self.summary)
        return self.summary

    def _device_run_files(self) -> dict[str, dict[str, Any]]:
        """Let the config's Python devices write their files beside the data.

        A device with a ``write_run_files(run_dir, fast_interval_s=...)``
        method (the simulated live specimen's camera: ground truth, exposures,
        its score) is called once the logs are closed; what it returns is kept
        in `device_reports`. A device that fails is a warning, never the run's
        result.
        """
        out = {}
        for label, device in self.microscope.python_devices().items():
            write = getattr(device, "write_run_files", None)
            if not callable(write):
                continue
            try:
                out[label] = write(
                    self.directory,
                    fast_interval_s=self.experiment.fast_interval_s(),
                )
            except Exception as e:
                logging.getLogger("smartscope.run").warning(
                    "device %s wrote no run files: %s", label, first_line(e)
                )
        return out

    def run(self) -> RunSummary:
        """Start, wait, finish. Ctrl-C cancels and still finishes cleanly."""
        self.start()
        try:
            while not self.wait(0.2):
                pass
        except KeyboardInterrupt:
            self.cancel("interrupted by user (Ctrl-C)")
        return self.finish()

    def _run_info(self, status: str) -> dict[str, Any]:
        exp = self.experiment
        return {
            "status": status,
            "started_at": self._started_at,
            "finished_at": (
                datetime.now(timezone.utc).isoformat() if status != "running" else None
            ),
            "experiment": {
                **exp.model_dump(mode="json"),
                "sequence": exp.sequence.model_dump(mode="json", exclude_unset=True),
                "source": str(exp.source) if exp.source else None,
            },
            "plan": self.plan.model_dump(mode="json", exclude_unset=True),
            "hardware_config": str(self.microscope.config_path),
            "pixel_size_um": self.microscope.pixel_size_um,
            "pixel_affine": self.microscope.affine.ravel().tolist(),
            "model_id": self.segmenter.model_id,
            "limits": self.limits.to_json(),
            "warmup_s": round(self.warmup_s, 3),
            "seed": exp.seed,
            "versions": package_versions(),
            "command": sys.argv,
            "summary": self.summary.to_json() if self.summary else None,
            "policy_reports": {
                getattr(p, "name", type(p).__name__): p.report()
                for p in self.policies
                if callable(getattr(p, "report", None))
            },
            **(self.resume_point.info if self.resume_point else {}),
        }

    # -------------------------------------------------------------- cleanup
    def close(self) -> None:
        """Stop the segmenter's process; release a microscope this runner made."""
        if getattr(self, "_heap_frozen", False):
            self._heap_frozen = False
            thaw_heap()
        close_segmenter = getattr(getattr(self, "segmenter", None), "close", None)
        if callable(close_segmenter):
            close_segmenter()
        if self._owns_microscope and getattr(self, "microscope", None) is not None:
            self.microscope.close()

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None and self.summary is None:
            self.cancel("aborted")
            self.finish()
        self.close()


def analysis_threads(experiment: Experiment) -> int:
    """Torch threads for the segmenter: the cores acquisition and writing leave.

    ``analysis.num_threads`` if set; else 1 on up to 3 cores, cores - 2 above.
    """
    cores = os.cpu_count() or 1
    return experiment.analysis.num_threads or (1 if cores <= 3 else cores - 2)


def _build_segmenter(experiment: Experiment) -> Any:
    """The experiment's segmenter, in a child process where ``analysis.worker`` says.

    ``auto`` runs every segmenter but the rule-based ``threshold`` in a process:
    a model then never competes with acquisition for the GIL, and runs at
    ``analysis.nice`` lower priority.
    """
    spec, analysis = experiment.segmenter, experiment.analysis
    worker = analysis.worker
    if worker == "auto":
        worker = "thread" if spec.name == "threshold" else "process"
    if worker == "thread" or not analysis.enabled:
        return spec.build()
    from smartscope.segment import ProcessSegmenter

    return ProcessSegmenter(
        spec.name,
        spec.params,
        nice=analysis.nice,
        num_threads=analysis_threads(experiment),
        call_timeout_s=analysis.segment_timeout_s,
    )


def _warm_up(segmenter: Any, shape: tuple[int, int], experiment: Experiment) -> float:
    """`warm_up`; a segmenter that fails or hangs on the test frame is one line.

    Nothing has been acquired yet, so the run does not start: `RegistryError`
    naming the segmenter and what went wrong.
    """
    try:
        return warm_up(segmenter, shape)
    except SmartscopeError:
        raise
    except Exception as e:
        from smartscope.segment import SegmenterProcessError

        why = (
            first_line(e)
            if isinstance(e, SegmenterProcessError)
            else f"{type(e).__name__}: {first_line(e)}"
        )
        raise RegistryError(
            f"segmenter {experiment.segmenter.name!r} failed on a test frame "
            f"before acquisition: {why}"
        ) from e


def resolve_plan(seq: MDASequence, microscope: Microscope) -> MDASequence:
    """`seq` with the grid plan's field of view filled in from the microscope."""
    grid = seq.grid_plan
    if grid is not None and getattr(grid, "fov_width", 1) is None:
        width, height = microscope.fov_um
        grid = grid.model_copy(update={"fov_width": width, "fov_height": height})
        seq = seq.model_copy(update={"grid_plan": grid})
    return seq


def check_experiment(
    experiment: Experiment, microscope: Microscope
) -> tuple[MDASequence, SafetyLimits]:
    """Everything checked before a run moves anything (``run`` and ``validate``).

    Applies the experiment's property settings and checks its presets
    (`prepare_hardware`), fills in the plan's field of view, refuses a plan
    too large to run, resolves the safety limits (experiment, else config,
    else default) and checks every base-plan position and exposure against
    them. Returns the resolved plan and the limits.

    Raises
    ------
    ExperimentError
        One line naming what is wrong (a `smartscope.limits.PlanError` for the
        plan).
    """
    prepare_hardware(experiment, microscope)
    plan = resolve_plan(experiment.sequence, microscope)
    check_plan_size(plan)
    limits = SafetyLimits.resolve(
        experiment.limits.model_dump(), microscope.config_limits()
    )
    check_plan(plan, limits, camera_exposure_ms=float(microscope.core.getExposure()))
    return plan, limits


def check_output_dir(directory: Path, *, min_free_mb: float = 100.0) -> list[Path]:
    """Make sure a run can be written to `directory`, before anything runs.

    Creates the directory (and missing parents), writes and removes a probe
    file, and checks that its disk has `min_free_mb` MiB free. Returns the
    folders it created (deepest last).

    Raises
    ------
    OutputError
        One line: the path is a file, cannot be written, or its disk is full.
    """
    import shutil

    directory = Path(directory)
    missing = []
    for parent in [directory, *directory.parents]:
        if parent.exists():
            if not parent.is_dir():
                what = "the output directory" if parent == directory else "a parent"
                raise OutputError(
                    f"cannot write the run to {directory}: {what} ({parent}) is "
                    "a file, not a directory"
                )
            break
        missing.append(parent)
    created = []
    try:
        for folder in reversed(missing):
            folder.mkdir()
            created.append(folder)
        probe = directory / ".smartscope-write-test"
        probe.write_bytes(b"ok")
        probe.unlink()
        free = shutil.disk_usage(directory).free
    except OSError as e:
        for folder in reversed(created):
            try:
                folder.rmdir()
            except OSError:
                break
        reason = e.strerror or first_line(e)
        raise OutputError(f"cannot write the run to {directory}: {reason}") from None
    if free < min_free_mb * 2**20:
        for folder in reversed(created):
            try:
                folder.rmdir()
            except OSError:
                break
        raise OutputError(
            f"not enough free space for the run in {directory}: "
            f"{free / 2**20:.0f} MiB free, output.min_free_mb is {min_free_mb:g}"
        )
    return created


def prepare_hardware(experiment: Experiment, microscope: Microscope) -> None:
    """Apply the experiment's property settings; check its presets.

    Raises
    ------
    ExperimentError
        For a property that cannot be set, a channel that is not a preset, or
        an objective a policy names that is not a preset of the config's
        ``Objective`` group with a pixel size.
    """
    core = microscope.core
    for device, prop, value in experiment.properties:
        try:
            core.setProperty(device, prop, value)
        except Exception as e:
            raise ExperimentError(
                f"cannot set property {device}.{prop}={value!r}: {first_line(e)}"
            ) from None
    for ch in experiment.sequence.channels:
        group = ch.group or experiment.channel_group
        if not core.isConfigDefined(group, ch.config):
            raise ExperimentError(
                f"channel {ch.config!r} is not a preset of config group {group!r} "
                f"in {microscope.config_path}"
            )
    named = [spec.build() for spec in experiment.policies]
    if any(getattr(p, "objective", None) for p in named):
        _check_objectives(named, microscope.objectives(), microscope)


def _check_objectives(
    policies: list[Any], objectives: dict[str, Any], microscope: Microscope
) -> None:
    """Every objective a policy names is a preset of the config's objective group."""
    for policy in policies:
        name = getattr(policy, "objective", None)
        if name is not None and name not in objectives:
            have = ", ".join(objectives) or "none with a pixel size"
            raise ExperimentError(
                f"{getattr(policy, 'name', type(policy).__name__)}: objective "
                f"{name!r} is not a preset of config group 'Objective' in "
                f"{microscope.config_path} (presets: {have})"
            )


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _clear_run_dir(directory: Path) -> None:
    import shutil

    for name in ("run.ome.zarr", "partial", "images", "labels", "overflow"):
        shutil.rmtree(directory / name, ignore_errors=True)
    for name in (
        "frames.jsonl",
        "detections.jsonl",
        "decisions.jsonl",
        "run.json",
        "experiment.yaml",
    ):
        (directory / name).unlink(missing_ok=True)


def run_experiment(
    experiment: Experiment | str | Path,
    *,
    config: str | Path | None = None,
    out_dir: str | Path | None = None,
    overwrite: bool | None = None,
) -> RunSummary:
    """Load (if a path), run and close: the library form of ``smartscope run``."""
    from smartscope.experiment import Experiment

    if not isinstance(experiment, Experiment):
        experiment = Experiment.from_file(experiment)
    with Runner(
        experiment, config=config, out_dir=out_dir, overwrite=overwrite
    ) as runner:
        return runner.run()
