"""The `Scheduler`: the one iterable the pymmcore-plus runner consumes."""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections import UserDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from psygnal import Signal, SignalGroup
from useq import AcquireImage, CameraROI, MDAEvent, MDASequence

from smartscope._stats import StreamingPercentiles
from smartscope.frame import base_position_key, event_tag, safe_name, well_of
from smartscope.limits import SafetyLimits
from smartscope.scheduler._actions import (
    URGENT_PRIORITY,
    Action,
    ActionOutcome,
    AddEvents,
    ExtendStream,
    MovePosition,
    SetFocus,
    SetInterval,
    SkipPosition,
    SkipWell,
    Stop,
    StopStream,
    Stream,
    event_summary,
)

__all__ = ["Scheduler", "SchedulerEvents"]

TravelOrder = Literal["plan", "nearest"]


class SchedulerEvents(SignalGroup):
    """Signals of the `Scheduler` (emitted from the thread that causes them)."""

    eventsScheduled = Signal(list)  # list[MDAEvent] added by an action
    eventServed = Signal(object)  # MDAEvent handed to the runner (each of a sequence)
    sequenceServed = Signal(object)  # SequencedEvent handed to the runner
    eventsSkipped = Signal(str, int, str)  # position, number of events, reason
    finished = Signal(str)  # reason: "completed" | "stopped: ..."


# ------------------------------------------------------------------ base plans
@dataclass
class _Visit:
    """The events of one visit of a base position (e.g. its channels × Z)."""

    key: str
    due: float  # seconds since the start of the run (-inf: no time)
    events: list[MDAEvent]
    deadline_s: float  # lateness above this counts as a missed timepoint
    order: int  # plan order, breaks ties
    timeline: _Timeline | None = None
    read_s: float | None = None  # lazy plans: when it was read (its wait starts)


@dataclass
class _Timeline:
    """One position of a time-lapse plan: its visit template and its clock."""

    key: str
    order: int
    template: list[MDAEvent]
    times: list[float]  # the plan's nominal visit times
    end_s: float  # the plan's last visit time: an overridden interval keeps it
    next_visit: int = 0
    interval_s: float | None = None  # set by SetInterval
    next_due: float = 0.0
    last_due: float | None = None
    xy: tuple[float, float] | None = None
    z: float | None = None
    moved: bool = False
    done: bool = False

    def __post_init__(self) -> None:
        first = self.template[0]
        if first.x_pos is not None and first.y_pos is not None:
            self.xy = (float(first.x_pos), float(first.y_pos))
        self.next_due = self.times[0] if self.times else math.inf
        self.done = not self.times

    @property
    def nominal_interval(self) -> float:
        if self.interval_s is not None:
            return self.interval_s
        k = self.next_visit
        if 0 < k < len(self.times):
            return self.times[k] - self.times[k - 1]
        return self.times[1] - self.times[0] if len(self.times) > 1 else 0.0

    def remaining_visits(self) -> int:
        if self.done:
            return 0
        if self.interval_s is None:
            return len(self.times) - self.next_visit
        if self.interval_s <= 0:
            return 1
        return int((self.end_s - self.next_due) // self.interval_s) + 1

    def advance(self) -> None:
        """Move to the next visit after the current one was taken."""
        self.last_due = self.next_due
        self.next_visit += 1
        if self.interval_s is not None:
            self.next_due = self.last_due + self.interval_s
            self.done = self.next_due > self.end_s + 1e-9
        elif self.next_visit < len(self.times):
            self.next_due = self.times[self.next_visit]
        else:
            self.done = True

    def set_interval(self, interval_s: float, now: float) -> None:
        self.interval_s = interval_s
        start = self.last_due if self.last_due is not None else now
        self.next_due = max(start + interval_s, min(now, self.next_due))
        self.done = self.next_due > self.end_s + 1e-9


@dataclass
class _StreamState:
    """A `Stream` the Scheduler serves chunk by chunk."""

    key: str  # position key of its frames
    template: MDAEvent
    tag: dict[str, Any]  # smartscope tag of its frames (decision, kind, dose)
    priority: int
    chunk_frames: int
    n_total: int
    budget_key: str
    first_due: float  # -inf: at once
    n_queued: int = 0  # frames put in the queue (frame numbers 0 .. n_queued-1)
    n_served: int = 0
    n_chunks: int = 0  # chunks queued so far
    ended: str | None = None  # why it ended; None while it goes on


def _timelapse_layout(plan: Any) -> MDASequence | None:
    """The plan without its time axis, when it is a position-major time-lapse."""
    if not isinstance(plan, MDASequence) or plan.time_plan is None:
        return None
    order = [str(a) for a in plan.axis_order]
    t = order.index("t") if "t" in order else -1
    if t < 0 or any(order.index(a) < t for a in "pg" if a in order):
        return None  # positions outside time: each position's own time-lapse
    if any(a in order and order.index(a) < t for a in "cz") and (
        plan.sizes.get("c", 0) > 1 or plan.sizes.get("z", 0) > 1
    ):
        return None
    if any(getattr(p, "sequence", None) is not None for p in plan.stage_positions):
        return None
    return plan.model_copy(update={"time_plan": None})


# -------------------------------------------------------------------- scheduler
class Scheduler(Iterator[MDAEvent]):
    """Deadline and priority queue of `MDAEvent`s over a base plan, fed by `Action`s.

    The runner iterates it (``core.run_mda(scheduler)``). Every event has a due
    time (its ``min_start_time``, seconds since the start of the run) and a
    priority (base plan 0, added events their action's priority). Each
    ``next()`` serves, among the events that are due, the highest-priority one
    (FIFO within a priority, so a policy's travel order is kept); when nothing is
    due it waits for the earliest due time, or for an action to add something.
    So a burst of fast imaging at one position goes ahead of slow imaging
    elsewhere, and slow imaging goes on between the burst's frames. A base visit
    that has waited `max_delay_s` past its due time goes before any added
    event, so a burst never starves the rest of the plan; only events of
    `URGENT_PRIORITY` (100) or more still go first (a focus search the
    visit's Z depends on). Visits that are late together do not go as one
    block: after each, every place (burst) that had an added event due when
    it went gets one frame first, so a saturated camera shares its delay
    among the bursts' frames instead of holding them all back by every late
    visit at once.

    A time-lapse plan (``t`` the outer axis) is scheduled per position: each
    position keeps its own clock, so `SetInterval` changes its rate and
    `MovePosition` its coordinates (the plan's total duration is kept). A visit
    (the channels and Z planes of one timepoint at one position) is served as a
    block. When several visits are due, `travel_order` ``"nearest"`` serves the
    one closest to the stage first; ``"plan"`` keeps the plan's order.

    A base visit's lateness is the time from its due time to its service; more
    than `deadline_fraction` of the position's interval counts as a missed
    deadline. `stats` reports lateness, stage travel and light dose.

    `dose_budget_ms` caps the light dose (Σ exposure ms at relative intensity 1)
    delivered at each base position, counting the base plan and every event
    added for a frame of that position: an action that would exceed it is
    refused with the reason, and base visits that no longer fit are dropped.
    Only then does it keep the dose of each position (`dose_used_ms`); without
    a budget it keeps `total_dose_ms` alone, and its bookkeeping (lateness
    summaries included) stays the same size however many fields the plan has.

    Iteration ends only when the base plan is exhausted, no frame is still being
    analysed, no added event is queued, and no pending-work check reports work
    — or when the run is stopped.

    With `max_sequence_frames` ≥ 2, a run of events the hardware can sequence
    — image acquisitions at the same stage position with the same channel,
    exposure, camera ROI and device properties, none of which has to wait for
    its due time — is handed to the runner as one
    ``pymmcore_plus.core.SequencedEvent`` of at most that many frames: the
    camera then streams at its own rate (frames still arrive one by one, each
    with its own event) and decisions are served between sequences. Runs are
    found among the events the Scheduler would serve next anyway (the rest of
    a visit, the next due visits of the same place, queued added events, the
    chunks of a `Stream`), so the order of events never changes; a sequence
    never crosses a `Stream`'s chunk boundary, and with `max_analysis_lag` a
    base visit joins a sequence only if the frames before it leave the lag
    within bounds. `disable_sequencing` (the engine found the camera cannot
    sequence) turns it off for the rest of the run. While the camera takes a
    sequence's last frame, the engine asks `choose_ahead` for the next event,
    so it is ready when that frame arrives: an action applied during that
    last frame interval takes effect one event (or sequence) later.

    Every served event carries ``metadata["smartscope"]``: ``event_id``,
    ``kind`` ("base" or the adding policy's kind), ``position`` key, ``visit``
    index and visit ``shape`` (for storage), ``due_s``, and for added events the
    ``decision_id`` and ``trigger_frame`` that caused them; a stream's frames
    also ``stream`` (its position key), ``stream_frame`` and ``chunk``.

    Parameters
    ----------
    plan : MDASequence | Iterable[MDAEvent]
        The base plan.
    clock : callable, optional
        Seconds since the start of the run, in the runner's time base (the
        pymmcore-plus event timer). Default: seconds since the first ``next()``.
    poll_interval_s : float
        How often a waiting ``next()`` re-checks pending work.
    travel_order : {"plan", "nearest"}
        Order of base visits that are due at the same time.
    max_delay_s : float
        Longest wait of a due base visit behind added events (of a priority
        below `URGENT_PRIORITY`); a visit late at the same time as another
        waits, besides, for one frame of each place (burst) that had added
        events due when that one went.
    travel_slack_s : float
        With ``travel_order="nearest"``: how far past its due time an added
        event may fall while nearer ones (of the same priority) go first;
        beyond it, the longest-overdue one goes first. Events of a position
        with `AddEvents.max_gap_s` may fall further behind, until their gap
        since the position's last frame is `travel_slack_s` short of it.
    deadline_fraction : float
        Lateness, as a fraction of the position's interval, that misses the
        timepoint's deadline.
    dose_budget_ms : float, optional
        Light-dose budget per base position (ms of exposure at intensity 1).
    default_exposure_ms : float
        Exposure of events that do not set one (the camera's exposure).
    sensor_size : (int, int), optional
        Camera ``(width, height)``: after an event with a camera ROI, the next
        event without one is given the full frame back.
    property_value : callable, optional
        ``(device, property) -> value`` of the microscope now (e.g.
        ``core.getProperty``). After an event that sets device properties
        (e.g. a hit target through another objective), the next event that
        does not set them gets the values they had before; without it such
        properties stay as the event left them.
    idle_timeout_s : float
        With the base plan done and nothing queued or being analysed, how long
        a policy's pending-work check may hold the run open with nothing added.
    max_analysis_lag : int, optional
        With a number, a base visit starts only while at most this many frames
        are still being analysed: with 0 the policies have decided on every
        earlier frame, so a well quota or an empty well stops the plan exactly
        where it should (plate screens), at the cost of acquisition waiting for
        analysis between base visits (added events are not held). None (the
        default): base visits never wait for analysis.
    done_positions : Iterable[str]
        Positions finished by an earlier session of the same run (``smartscope
        resume``): their base events are not served (counted in
        `n_already_done`, not as skipped), and an added position whose key is
        one of them gets a fresh key (``<key>_r<n>``) so nothing on disk is
        overwritten.
    limits : SafetyLimits, optional
        Safety limits: an action that would move the stage (or focus) outside
        them, to a non-finite position, or expose longer than their maximum is
        refused as a whole, with the reason (`n_limit_refusals`); nothing of it
        reaches the hardware.
    max_sequence_frames : int
        Longest hardware sequence (the camera's sequence buffer, in frames, or
        less). Below 2: every event is served on its own.
    """

    def __init__(
        self,
        plan: MDASequence | Iterable[MDAEvent],
        *,
        clock: Callable[[], float] | None = None,
        poll_interval_s: float = 0.02,
        travel_order: TravelOrder = "plan",
        max_delay_s: float = 1.0,
        travel_slack_s: float = 0.2,
        deadline_fraction: float = 0.5,
        dose_budget_ms: float | None = None,
        default_exposure_ms: float = 10.0,
        sensor_size: tuple[int, int] | None = None,
        property_value: Callable[[str, str], str] | None = None,
        idle_timeout_s: float = 30.0,
        max_analysis_lag: int | None = None,
        done_positions: Iterable[str] = (),
        limits: SafetyLimits | None = None,
        max_sequence_frames: int = 0,
    ) -> None:
        if travel_order not in ("plan", "nearest"):
            raise ValueError(
                f"travel_order must be 'plan' or 'nearest': {travel_order}"
            )
        self.events = SchedulerEvents()
        self._plan = plan
        self._clock = clock
        self._t_start: float | None = None
        self._poll = poll_interval_s
        self.travel_order: TravelOrder = travel_order
        self.max_delay_s = float(max_delay_s)
        self.travel_slack_s = float(travel_slack_s)
        self.deadline_fraction = float(deadline_fraction)
        self.dose_budget_ms = dose_budget_ms
        self.default_exposure_ms = float(default_exposure_ms)
        self._full_roi = (
            CameraROI(
                offset_x=0, offset_y=0, width=sensor_size[0], height=sensor_size[1]
            )
            if sensor_size
            else None
        )
        self._roi_active = False
        self._property_value = property_value
        #: properties an event changed -> their value before it (to restore)
        self._changed: dict[tuple[str, str], str] = {}
        self._held = False
        self.idle_timeout_s = float(idle_timeout_s)
        self.max_analysis_lag = max_analysis_lag
        self._idle_since: float | None = None
        self._cond = threading.Condition()
        self._added: list[tuple[int, int, float, MDAEvent, str]] = []
        self._counter = itertools.count()
        # AddEvents.min_gap_s / max_gap_s per position, and when each such
        # position was last served (pacing: see `_pace`; gaps: `_latest_start`)
        self._min_gap: dict[str, float] = {}
        self._max_gap: dict[str, float] = {}
        self._paced_at: dict[str, tuple[float, Any]] = {}
        self._event_ids = itertools.count()
        self._in_flight = 0
        self._pending_checks: list[Callable[[], bool]] = []
        self._skipped: set[str] = set()
        self._stop_reason: str | None = None
        self._finish_reason: str | None = None
        self._layout = _base_layout(plan)
        self._visit: list[MDAEvent] = []  # rest of the visit being served
        # base plan: per-position timelines, or a lazily read iterator
        template = _timelapse_layout(plan)
        self._timelines: dict[str, _Timeline] | None = None
        self._base: Iterator[MDAEvent] = iter(())
        self._base_done = False
        self._peeked: _Visit | None = None
        if template is not None:
            self._timelines = self._build_timelines(plan, template)  # type: ignore[arg-type]
        if not self._timelines:  # not a time-lapse over positions: read lazily
            self._timelines = None
            self._base = iter(plan)
        self._done = frozenset(done_positions)
        self._renamed: dict[str, str] = {}
        self.n_already_done = 0
        for tl in (self._timelines or {}).values():
            if tl.key in self._done:
                self.n_already_done += tl.remaining_visits() * len(tl.template)
                tl.done = True
        # accounting
        self._here: tuple[float, float] | None = None
        self.travel_um = 0.0
        # per-position dose only where a budget needs it; the total always
        self.dose_used_ms: dict[str, float] = {}
        self.total_dose_ms = 0.0
        self._dose_reserved: dict[str, float] = {}
        self.dose_refusals = 0
        self.limits = limits
        self.n_limit_refusals = 0
        self.lateness_s: dict[str, StreamingPercentiles] = {
            "base": StreamingPercentiles(),
            "added": StreamingPercentiles(),
        }
        self.n_missed_deadlines = 0
        # places (bursts) owed a frame since a late base visit went ahead of
        # their due added events: the next late visit waits for them
        self._owed: set[str | None] = set()
        self.n_served = 0
        self.n_base_served = 0
        self.n_added = 0
        self.n_skipped = 0
        self.current_position: str | None = None
        # plate wells (SkipWell, SetFocus): position keys "<well>_<field>"
        self._skipped_wells: set[str] = set()
        self._well_focus: dict[str, float] = {}
        self._default_focus: float | None = None  # SetFocus("*")
        # hardware sequences and streams
        self.max_sequence_frames = max(0, int(max_sequence_frames))
        self.sequencing_off: str | None = None  # why it was turned off mid-run
        self.n_sequences = 0
        self.n_sequenced_frames = 0
        self._ready: MDAEvent | None = None  # chosen ahead, not yet taken
        self.n_chosen_ahead = 0
        self.n_stream_frames = 0  # stream frames queued
        self._streams: dict[str, _StreamState] = {}

    @staticmethod
    def _build_timelines(
        plan: MDASequence, template: MDASequence
    ) -> dict[str, _Timeline]:
        times = [float(t) for t in plan.time_plan]  # type: ignore[union-attr]
        per_key: dict[str, list[MDAEvent]] = {}
        for event in template:
            per_key.setdefault(base_position_key(event), []).append(event)
        return {
            key: _Timeline(key, n, events, times, times[-1] if times else 0.0)
            for n, (key, events) in enumerate(per_key.items())
        }

    # --------------------------------------------------------------- analysis
    def analysis_started(self) -> None:
        """A frame was handed to analysis: do not end before it is decided."""
        with self._cond:
            self._in_flight += 1

    def analysis_finished(self) -> None:
        """A frame's analysis and its policies' actions are done."""
        with self._cond:
            self._in_flight = max(0, self._in_flight - 1)
            self._cond.notify_all()

    @property
    def in_flight(self) -> int:
        """Frames handed to analysis and not yet decided."""
        return self._in_flight

    def add_pending_check(self, check: Callable[[], bool]) -> None:
        """Register ``check() -> bool``: True while a policy still has work."""
        self._pending_checks.append(check)

    # ------------------------------------------------------------------ state
    @property
    def queued(self) -> int:
        """Events added by actions and not yet served."""
        return len(self._added)

    @property
    def finish_reason(self) -> str | None:
        """Why iteration ended ("completed", "stopped: ..."), None while running."""
        return self._finish_reason

    @property
    def is_timelapse(self) -> bool:
        """Whether the base plan is scheduled per position (a time-lapse)."""
        return self._timelines is not None

    def now(self) -> float:
        """Seconds since the start of the run (the scheduler's clock)."""
        if self._clock is not None:
            try:
                return float(self._clock())
            except Exception:  # the runner's timer is not started yet
                return 0.0
        if self._t_start is None:
            self._t_start = time.perf_counter()
        return time.perf_counter() - self._t_start

    def hold(self, on: bool = True) -> None:
        """Hold back (or release) the next event: a pause at the event boundary.

        ``stop`` still ends a held iteration.
        """
        with self._cond:
            self._held = bool(on)
            self._cond.notify_all()

    @property
    def held(self) -> bool:
        """Whether `hold` is holding back the next event."""
        return self._held

    def stop(self, reason: str = "stopped") -> None:
        """End iteration at the next ``next()``; wakes a waiting runner."""
        with self._cond:
            if self._stop_reason is None:
                self._stop_reason = reason
            self._cond.notify_all()

    def upcoming(
        self, limit: int = 20, *, include_base: bool = False
    ) -> list[MDAEvent]:
        """Queued added events in serving order; with base visits' first events.

        Added events come first (priority, then due time); with `include_base`,
        the next visit of each time-lapse position follows, by due time.
        """
        with self._cond:
            out = [e for *_, e, _ in sorted(self._added, key=lambda q: q[:3])]
            if include_base and self._timelines is not None:
                nxt = sorted(
                    (t.next_due, t.order, t)
                    for t in self._timelines.values()
                    if not t.done and t.key not in self._skipped
                )
                out += [self._visit_events(t, stamp=False)[0] for *_, t in nxt]
            return out[:limit]

    def position_interval(self, position: str) -> float | None:
        """Current interval (s) of a time-lapse position, None if unknown."""
        tl = (self._timelines or {}).get(position)
        return None if tl is None else tl.nominal_interval

    def position_xy(self, position: str) -> tuple[float, float] | None:
        """Current stage coordinates of a time-lapse position."""
        tl = (self._timelines or {}).get(position)
        return None if tl is None else tl.xy

    def stats(self) -> dict[str, Any]:
        """Lateness, missed deadlines, stage travel and light dose, JSON-ready.

        ``lateness_s`` per kind is ``{"n", "p50", "p99", "max"}``: `n` and `max`
        exact, the percentiles estimated within about 1 % (a constant-memory
        summary, `StreamingPercentiles`). ``dose_ms`` (per base position) is
        there only with a `dose_budget_ms`: without one the Scheduler keeps the
        total alone, so its memory does not grow with the plate; per-position
        dose is in ``frames.jsonl`` (``exposure_ms`` per frame).
        """
        with self._cond:
            out: dict[str, Any] = {
                "lateness_s": {k: v.summary() for k, v in self.lateness_s.items()},
                "missed_deadlines": self.n_missed_deadlines,
                "travel_um": round(self.travel_um, 3),
            }
            if self.dose_budget_ms is not None:
                out["dose_ms"] = {k: round(v, 3) for k, v in self.dose_used_ms.items()}
            out.update(
                total_dose_ms=round(self.total_dose_ms, 3),
                dose_budget_ms=self.dose_budget_ms,
                dose_refusals=self.dose_refusals,
                limit_refusals=self.n_limit_refusals,
                sequences={
                    "n": self.n_sequences,
                    "frames": self.n_sequenced_frames,
                    "max_frames": self.max_sequence_frames,
                    "off": self.sequencing_off,
                    "chosen_ahead": self.n_chosen_ahead,
                },
                streams={
                    "n": len(self._streams),
                    "frames_queued": self.n_stream_frames,
                    "ended": {k: s.ended for k, s in self._streams.items()},
                },
            )
            return out

    # ---------------------------------------------------------------- actions
    def apply(
        self,
        action: Action,
        *,
        decision_id: int | None = None,
        trigger_frame: int | None = None,
        trigger_position: str | None = None,
        kind: str = "added",
    ) -> ActionOutcome:
        """Apply one action; return whether it was applied or refused, and why.

        `trigger_position` is the position of the frame that caused the action:
        added events count against its light-dose budget.
        """
        with self._cond:
            if self._stop_reason is not None:
                return ActionOutcome(action, False, "run is stopping")
            unsafe = self._outside_limits(action)
            if unsafe is not None:
                self.n_limit_refusals += 1
                return ActionOutcome(
                    action, False, f"outside the safety limits: {unsafe}"
                )
            if isinstance(action, AddEvents):
                outcome = self._add(
                    action, decision_id, trigger_frame, trigger_position, kind
                )
            elif isinstance(action, SkipPosition):
                outcome = self._skip(action)
            elif isinstance(action, SetInterval):
                outcome = self._set_interval(action)
            elif isinstance(action, MovePosition):
                outcome = self._move(action)
            elif isinstance(action, SkipWell):
                outcome = self._skip_well(action)
            elif isinstance(action, SetFocus):
                outcome = self._set_focus(action)
            elif isinstance(action, Stream):
                outcome = self._stream(
                    action, decision_id, trigger_frame, trigger_position, kind
                )
            elif isinstance(action, StopStream):
                outcome = self._stop_stream(action)
            elif isinstance(action, ExtendStream):
                outcome = self._extend_stream(action)
            elif isinstance(action, Stop):
                self._stop_reason = f"stopped by policy: {action.reason}".rstrip(": ")
                outcome = ActionOutcome(action, True)
            else:
                outcome = ActionOutcome(action, False, f"unknown action {action!r}")
            self._cond.notify_all()
        if outcome.scheduled:
            self.events.eventsScheduled.emit(list(outcome.scheduled))
        if isinstance(action, SkipWell) and outcome.n_dropped:
            self.events.eventsSkipped.emit(
                action.well, outcome.n_dropped, "position skipped"
            )
        return outcome

    def _outside_limits(self, action: Action) -> str | None:
        """Why `action` would take the hardware outside `limits`; None if not."""
        limits = self.limits
        if limits is None:
            return None
        if isinstance(action, (AddEvents, Stream)):
            events = action.events if isinstance(action, AddEvents) else [action.event]
            for event in events:
                why = limits.why_not(event)
                if why:
                    name = event.pos_name or "an added event"
                    return f"{name}: {why}"
        elif isinstance(action, MovePosition):
            return limits.why_not_xy(action.x_um, action.y_um) or limits.why_not_z(
                action.z_um
            )
        elif isinstance(action, SetFocus):
            z_plan = getattr(self._plan, "z_plan", None)
            offsets = [0.0]
            if z_plan is not None and z_plan.is_relative:
                offsets = [float(z) for z in z_plan] or [0.0]
            for z in (action.z_um + min(offsets), action.z_um + max(offsets)):
                why = limits.why_not_z(z)
                if why:
                    return why
        return None

    def _add(
        self,
        action: AddEvents,
        decision_id: int | None,
        trigger_frame: int | None,
        trigger_position: str | None,
        kind: str,
    ) -> ActionOutcome:
        accepted: list[tuple[MDAEvent, str | None, str]] = []
        refused = 0
        for event in action.events:
            key = safe_name(event.pos_name) if event.pos_name else None
            if key is not None and (key in self._skipped or self._well_skipped(key)):
                refused += 1
                continue
            tag = event_tag(event)
            budget_key = str(tag.get("dose_position") or trigger_position or key or "")
            accepted.append((event, key, budget_key))
        if not accepted:
            return ActionOutcome(action, False, "every event is at a skipped position")
        if self.dose_budget_ms is not None:
            cost: dict[str, float] = {}
            for event, _, bkey in accepted:
                cost[bkey] = cost.get(bkey, 0.0) + self._cost(event)
            for bkey, need in cost.items():
                spent = self.dose_used_ms.get(bkey, 0.0) + self._dose_reserved.get(
                    bkey, 0.0
                )
                if spent + need > self.dose_budget_ms + 1e-9:
                    self.dose_refusals += 1
                    return ActionOutcome(
                        action,
                        False,
                        f"light-dose budget of {bkey or 'the position'}: "
                        f"{spent:.0f} of {self.dose_budget_ms:.0f} ms used or "
                        f"committed, this action needs {need:.0f} ms more",
                    )
        added: list[MDAEvent] = []
        for event, key, bkey in accepted:
            tag = dict(event_tag(event))
            tag.setdefault("kind", kind)
            tag.update(
                decision_id=decision_id,
                trigger_frame=trigger_frame,
                dose_position=bkey or None,
            )
            stamped = self._stamp(event, tag, key)
            due = _due(event)
            self._added.append(
                (-action.priority, next(self._counter), due, stamped, bkey)
            )
            pos = _tag_pos(stamped)
            if pos is not None and action.max_gap_s:
                self._max_gap[pos] = float(action.max_gap_s)
            if pos is not None and action.min_gap_s:
                self._min_gap[pos] = float(action.min_gap_s)
                self._pace(pos)
            if self.dose_budget_ms is not None:
                self._dose_reserved[bkey] = self._dose_reserved.get(
                    bkey, 0.0
                ) + self._cost(event)
            added.append(stamped)
        self.n_added += len(added)
        reason = f"{refused} events at skipped positions refused" if refused else ""
        return ActionOutcome(
            action,
            True,
            reason,
            events=[event_summary(e) for e in added],
            scheduled=added,
        )

    # ---------------------------------------------------------------- streams
    def _stream(
        self,
        action: Stream,
        decision_id: int | None,
        trigger_frame: int | None,
        trigger_position: str | None,
        kind: str,
    ) -> ActionOutcome:
        if action.n_frames < 1 or action.chunk_frames < 1:
            return ActionOutcome(
                action, False, "n_frames and chunk_frames must be at least 1"
            )
        event = action.event
        if not _sequenceable(event) or event.properties:
            return ActionOutcome(
                action,
                False,
                "only an image acquisition without device properties can be streamed",
            )
        named = safe_name(event.pos_name) if event.pos_name else None
        if named is not None and (named in self._skipped or self._well_skipped(named)):
            return ActionOutcome(action, False, "position skipped")
        if named is None:
            named = f"stream_{len(self._streams):04d}"
        key = self._fresh_key(named)
        earlier = self._streams.get(key)
        if earlier is not None and earlier.ended is None:
            return ActionOutcome(
                action, False, f"a stream is already running at {key} (extend it)"
            )
        tag = dict(event_tag(event))
        tag.setdefault("kind", kind)
        bkey = str(tag.get("dose_position") or trigger_position or key)
        tag.update(
            decision_id=decision_id,
            trigger_frame=trigger_frame,
            dose_position=bkey or None,
            stream=key,
        )
        for drop in ("event_id", "position", "visit", "stream_frame", "chunk"):
            tag.pop(drop, None)
        metadata = {k: v for k, v in event.metadata.items() if k != "smartscope"}
        template = event.model_copy(update={"metadata": metadata})
        state = _StreamState(
            key=key,
            template=template,
            tag=tag,
            priority=int(action.priority),
            chunk_frames=int(action.chunk_frames),
            n_total=int(action.n_frames),
            budget_key=bkey,
            first_due=_due(event),
        )
        if earlier is not None:  # a new stream at a finished one's place goes on
            state.n_queued = state.n_served = earlier.n_queued  # its numbering
            state.n_total += earlier.n_queued
            state.n_chunks = earlier.n_chunks
        refused = self._stream_budget(state)
        if refused:
            return ActionOutcome(action, False, refused)
        self._streams[key] = state
        queued = self._queue_chunk(state)
        return ActionOutcome(
            action,
            True,
            f"stream at {key}: {action.n_frames} frames in chunks of "
            f"{action.chunk_frames}",
            scheduled=queued,
        )

    def _stream_budget(self, state: _StreamState) -> str | None:
        """Why the stream's next chunk would exceed the light-dose budget."""
        if self.dose_budget_ms is None:
            return None
        n = min(state.chunk_frames, state.n_total - state.n_queued)
        need = n * self._cost(state.template)
        bkey = state.budget_key
        spent = self.dose_used_ms.get(bkey, 0.0) + self._dose_reserved.get(bkey, 0.0)
        if spent + need > self.dose_budget_ms + 1e-9:
            self.dose_refusals += 1
            return (
                f"light-dose budget of {bkey}: {spent:.0f} of "
                f"{self.dose_budget_ms:.0f} ms used or committed, the next chunk "
                f"needs {need:.0f} ms more"
            )
        return None

    def _queue_chunk(self, state: _StreamState) -> list[MDAEvent]:
        """Queue the stream's next chunk of frames (none once it has ended)."""
        n = min(state.chunk_frames, state.n_total - state.n_queued)
        if state.ended is not None or n <= 0:
            return []
        key = state.key
        if key in self._skipped or self._well_skipped(key):
            state.ended = "position skipped"
            return []
        refused = self._stream_budget(state)
        if refused:
            state.ended = refused
            self.events.eventsSkipped.emit(
                key, state.n_total - state.n_queued, f"stream ended: {refused}"
            )
            return []
        chunk = state.n_chunks
        state.n_chunks += 1
        queued = []
        for j in range(n):
            k = state.n_queued + j
            due = state.first_due if k == 0 else -math.inf
            update = {
                "index": {**_plain(state.template.index), "t": k},
                "min_start_time": None if due == -math.inf else due,
            }
            tag = {**state.tag, "visit": k, "stream_frame": k, "chunk": chunk}
            stamped = self._stamp(state.template, tag, key, update)
            self._added.append(
                (-state.priority, next(self._counter), due, stamped, state.budget_key)
            )
            if self.dose_budget_ms is not None:
                self._dose_reserved[state.budget_key] = self._dose_reserved.get(
                    state.budget_key, 0.0
                ) + self._cost(stamped)
            queued.append(stamped)
        state.n_queued += n
        self.n_stream_frames += n
        self.n_added += n
        return queued

    def _stream_served(self, event: MDAEvent) -> None:
        """A stream frame is being served: queue the next chunk if it was the last."""
        tag = event_tag(event)
        state = self._streams.get(str(tag.get("stream")))
        if state is None:
            return
        state.n_served += 1
        if int(tag.get("chunk", -1)) == state.n_chunks - 1:
            queued = self._queue_chunk(state)
            if queued:
                self.events.eventsScheduled.emit(queued)
        if (
            state.ended is None
            and state.n_served >= state.n_total
            and state.n_queued >= state.n_total
        ):
            state.ended = "completed"

    def _stream_for(self, action: StopStream | ExtendStream) -> _StreamState | None:
        key = self._renamed.get(action.position, action.position)
        return self._streams.get(key)

    def _stop_stream(self, action: StopStream) -> ActionOutcome:
        state = self._stream_for(action)
        if state is None:
            return ActionOutcome(action, False, f"no stream at {action.position!r}")
        if state.ended is not None:
            return ActionOutcome(action, False, f"stream already ended: {state.ended}")
        keep = []
        for item in self._added:
            if event_tag(item[3]).get("stream") == state.key:
                self._release(item)
            else:
                keep.append(item)
        dropped = len(self._added) - len(keep)
        self._added = keep
        state.ended = f"stopped: {action.reason}".rstrip(": ")
        state.n_total = state.n_queued = state.n_queued - dropped
        self.n_stream_frames -= dropped
        self.n_added -= dropped
        return ActionOutcome(
            action,
            True,
            f"stream at {state.key} ends after {state.n_queued} frames",
            n_dropped=dropped,
        )

    def _extend_stream(self, action: ExtendStream) -> ActionOutcome:
        state = self._stream_for(action)
        if state is None:
            return ActionOutcome(action, False, f"no stream at {action.position!r}")
        if action.n_frames < 1:
            return ActionOutcome(action, False, "n_frames must be at least 1")
        if state.ended not in (None, "completed"):
            return ActionOutcome(action, False, f"stream ended: {state.ended}")
        state.ended = None
        state.n_total += int(action.n_frames)
        queued: list[MDAEvent] = []
        waiting = any(
            event_tag(item[3]).get("stream") == state.key for item in self._added
        )
        if not waiting:  # nothing queued: the next chunk goes in now
            queued = self._queue_chunk(state)
        return ActionOutcome(
            action,
            True,
            f"stream at {state.key}: {state.n_total} frames",
            scheduled=queued,
        )

    def _skip(self, action: SkipPosition) -> ActionOutcome:
        if action.position in self._skipped:
            return ActionOutcome(action, False, "position already skipped")
        self._skipped.add(action.position)
        keep = []
        for item in self._added:
            if _tag_pos(item[3]) == action.position:
                self._release(item)
            else:
                keep.append(item)
        dropped = len(self._added) - len(keep)
        self._added = keep
        stream = self._streams.get(action.position)
        if stream is not None and stream.ended is None:
            stream.ended = f"position skipped: {action.reason}".rstrip(": ")
        tl = (self._timelines or {}).get(action.position)
        if tl is not None and not tl.done:
            dropped += tl.remaining_visits() * len(tl.template)
            tl.done = True
        # a lazily read plan's events of this position are counted as they are read
        self.n_skipped += dropped
        return ActionOutcome(action, True, n_dropped=dropped)

    def _well_skipped(self, key: str | None) -> bool:
        return key is not None and well_of(key) in self._skipped_wells

    def _skip_well(self, action: SkipWell) -> ActionOutcome:
        well = action.well
        if well in self._skipped_wells:
            return ActionOutcome(action, False, "well already skipped")
        self._skipped_wells.add(well)
        keep = []
        for item in self._added:
            if self._well_skipped(_tag_pos(item[3])):
                self._release(item)
            else:
                keep.append(item)
        dropped = len(self._added) - len(keep)
        self._added = keep
        for stream in self._streams.values():
            if self._well_skipped(stream.key) and stream.ended is None:
                stream.ended = f"well skipped: {action.reason}".rstrip(": ")
        for tl in (self._timelines or {}).values():
            if self._well_skipped(tl.key) and not tl.done:
                dropped += tl.remaining_visits() * len(tl.template)
                tl.done = True
        # a lazily read plan's events of the well are counted as they are read
        self.n_skipped += dropped
        return ActionOutcome(action, True, n_dropped=dropped)

    def _set_focus(self, action: SetFocus) -> ActionOutcome:
        z = float(action.z_um)
        if not math.isfinite(z):
            return ActionOutcome(action, False, f"invalid focus {action.z_um}")
        if action.well == "*":  # every well without a focus of its own
            self._default_focus = z
        else:
            self._well_focus[action.well] = z

        def applies(key: str) -> bool:
            well = well_of(key)
            return well == action.well or (
                action.well == "*" and well not in self._well_focus
            )

        for tl in (self._timelines or {}).values():
            if applies(tl.key):
                tl.template = [self._focused(e, z) for e in tl.template]
        peeked = self._peeked
        if peeked is not None and applies(peeked.key):
            peeked.events = [self._focused(e, z) for e in peeked.events]
        return ActionOutcome(action, True, f"focus {z:.2f} µm")

    def _focused(self, event: MDAEvent, z_um: float) -> MDAEvent:
        """`event` at focus `z_um` (a relative Z plan's offset is kept)."""
        z_plan = getattr(self._plan, "z_plan", None)
        offset = 0.0
        if z_plan is not None and z_plan.is_relative and "z" in event.index:
            offsets = list(z_plan)
            k = int(event.index["z"])
            offset = float(offsets[k]) if k < len(offsets) else 0.0
        return event.model_copy(update={"z_pos": z_um + offset})

    def _set_interval(self, action: SetInterval) -> ActionOutcome:
        tl = self._timeline_for(action)
        if isinstance(tl, ActionOutcome):
            return tl
        if not (action.interval_s >= 0 and math.isfinite(action.interval_s)):
            return ActionOutcome(action, False, f"invalid interval {action.interval_s}")
        before = tl.nominal_interval
        tl.set_interval(float(action.interval_s), self.now())
        return ActionOutcome(
            action, True, f"interval {before:.3g} s -> {action.interval_s:.3g} s"
        )

    def _move(self, action: MovePosition) -> ActionOutcome:
        tl = self._timeline_for(action)
        if isinstance(tl, ActionOutcome):
            return tl
        if not (math.isfinite(action.x_um) and math.isfinite(action.y_um)):
            return ActionOutcome(action, False, "non-finite coordinates")
        tl.xy = (float(action.x_um), float(action.y_um))
        if action.z_um is not None:
            tl.z = float(action.z_um)
        tl.moved = True
        return ActionOutcome(action, True)

    def _timeline_for(
        self, action: SetInterval | MovePosition
    ) -> _Timeline | ActionOutcome:
        if self._timelines is None:
            return ActionOutcome(
                action, False, "the base plan is not a time-lapse over positions"
            )
        tl = self._timelines.get(action.position)
        if tl is None:
            return ActionOutcome(action, False, f"unknown position {action.position!r}")
        if tl.done or action.position in self._skipped:
            return ActionOutcome(action, False, "position has no visits left")
        return tl

    # -------------------------------------------------------------- iteration
    def __iter__(self) -> Scheduler:
        return self

    def __next__(self) -> MDAEvent:
        with self._cond:
            ready, self._ready = self._ready, None
            if ready is not None and self._stop_reason is None:
                return ready  # chosen ahead (`choose_ahead`)
            return self._as_sequence(self._next_event())

    def choose_ahead(self) -> MDAEvent | None:
        """Choose the next event now, if one is due; ``next()`` then returns it.

        Called by the engine while the camera takes a sequence's last frame, so
        the next event is ready the moment that frame arrives and the camera
        stands still for less time (or, for a sequence that continues the
        current one, not at all) between sequences. Returns the event chosen.
        Never waits: with nothing due now (or held, or stopping) it chooses
        nothing and returns None. An action applied after this call takes
        effect after the event chosen here; a stop still drops it.
        """
        with self._cond:
            if self._ready is not None:
                return self._ready
            if self._held or self._stop_reason is not None:
                return None
            now = self.now()
            kind, what = self._choose(now)
            if kind == "wait":
                return None
            event = self._take(kind, what, now)
            if event is None:  # a visit dropped (its light-dose budget)
                return None
            self._ready = self._as_sequence(event)
            self.n_chosen_ahead += 1
            return self._ready

    def _as_sequence(self, event: MDAEvent) -> MDAEvent:
        if self.max_sequence_frames >= 2 and _sequenceable(event):
            return self._sequence_from(event)
        return event

    def _next_event(self) -> MDAEvent:
        """The next event to serve; waits until one is due (the lock is held)."""
        while True:
            if self._stop_reason is not None:
                self._finish(self._stop_reason)
            if self._held:  # paused: nothing is served until released
                self._cond.wait(self._poll)
                continue
            if self._visit or self._added:
                self._idle_since = None
            now = self.now()
            kind, what = self._choose(now)
            if kind != "wait":
                event = self._take(kind, what, now)
                if event is None:  # a visit dropped (its light-dose budget)
                    continue
                return event
            wake = float(what)
            if wake < math.inf:
                self._cond.wait(min(max(wake - now - self._poll, 0.001), 0.25))
                continue
            if self._in_flight == 0:
                if not any(c() for c in self._pending_checks):
                    self._finish("completed")
                if self._idle_since is None:
                    self._idle_since = now
                elif now - self._idle_since > self.idle_timeout_s:
                    self._finish(
                        f"completed (a policy still reported pending work, but "
                        f"nothing was added for {self.idle_timeout_s:g} s)"
                    )
            else:
                self._idle_since = None
            self._cond.wait(self._poll)

    def _choose(self, now: float, *, pending: int = 0) -> tuple[str, Any]:
        """What to serve next, without serving it.

        ``("rest", None)``: the rest of the visit being served; ``("visit",
        _Visit)``: a base visit to start; ``("added", item)``: a queued added
        event; ``("wait", wake_s)``: nothing is due (``wake_s`` the earliest due
        time, inf if none). `pending`: frames served but not yet acquired (a
        sequence being built), counted against `max_analysis_lag`.
        """
        if self._visit:  # a started visit is served as a block
            return "rest", None
        horizon = now + self._poll
        added = self._best_added(now)
        visit = self._next_visit(horizon)
        if (
            self.max_analysis_lag is not None
            and self._in_flight + pending > self.max_analysis_lag
        ):
            visit = None  # the base plan waits for analysis to catch up
        if visit is not None and visit.due <= horizon:
            since = visit.due if visit.read_s is None else visit.read_s
            base_late = now - since
            if (
                added is None
                or added[0] > 0
                or (
                    base_late > self.max_delay_s
                    and -added[0] < URGENT_PRIORITY
                    and not self._due_before_late_visit()
                )
            ):
                return "visit", visit
        if added is not None:
            return "added", added
        wake = min(
            [q[2] for q in self._added]
            + ([visit.due] if visit is not None else [])
            + [math.inf]
        )
        return "wait", wake

    def _due_before_late_visit(self) -> bool:
        """Whether a place owed a frame since the last late visit still waits."""
        if self._owed and not any(_tag_pos(i[3]) in self._owed for i in self._added):
            self._owed.clear()  # their events were cancelled
        return bool(self._owed)

    def _take(self, kind: str, what: Any, now: float) -> MDAEvent | None:
        """Serve what `_choose` chose; None if a visit was dropped instead."""
        if kind == "rest":
            return self._serve(self._visit.pop(0), base=True)
        if kind == "visit":
            self._owed = {  # the places whose due frames it went ahead of
                _tag_pos(item[3])
                for item in self._added
                if 0 < -item[0] < URGENT_PRIORITY and item[2] <= now
            }
            return self._start_visit(what, now)
        self._added.remove(what)
        self._release(what)
        event = what[3]
        if what[2] > -math.inf:
            self.lateness_s["added"].add(max(0.0, now - what[2]))
        key = _tag_pos(event)
        self._owed.discard(key)
        if key in self._min_gap or key in self._max_gap:
            visit = event_tag(event).get("visit")
            last = self._paced_at.get(key)
            if last is None or visit is None or visit != last[1]:
                self._paced_at[key] = (now, visit)  # a visit's first event
            if key in self._min_gap:
                self._pace(key)
        if "stream" in event_tag(event):
            self._stream_served(event)
        return self._serve(event, base=False)

    def _pace(self, key: str) -> None:
        """Keep the queued visits of a paced position `min_gap_s` apart.

        In queue order, each event is due no sooner than `min_gap_s` after the
        one before it (the last one served first), except that the events of
        one visit (the planes of a Z-stack: the same ``visit`` tag) go
        together; a pushed event's ``min_start_time`` says its new due time.
        """
        gap = self._min_gap[key]
        prev_t, prev_v = self._paced_at.get(key, (-math.inf, None))
        mine = [(i, q) for i, q in enumerate(self._added) if _tag_pos(q[3]) == key]
        for i, item in sorted(mine, key=lambda iq: iq[1][1]):
            visit = event_tag(item[3]).get("visit")
            same = visit is not None and visit == prev_v
            due = max(item[2], prev_t if same else prev_t + gap)
            if due > item[2]:
                event = item[3].model_copy(update={"min_start_time": due})
                self._added[i] = (item[0], item[1], due, event, item[4])
            prev_t, prev_v = due, visit

    def _preview(self, kind: str, what: Any) -> tuple[MDAEvent, float]:
        """The event `_take` would serve for this choice, and when it is due.

        The event as far as `_joins` looks at it (before `_serve`): a timeline
        visit's template where its position did not move, without a copy.
        """
        if kind == "rest":
            event = self._visit[0]
        elif kind == "added":
            event = what[3]
        elif what.timeline is not None:
            tl = what.timeline
            if tl.moved and tl.xy is not None:
                event = self._visit_events(tl, stamp=False)[0]
            else:
                return tl.template[0], tl.next_due
        else:
            event = what.events[0]
        return event, _due(event)

    # -------------------------------------------------------- hardware sequences
    def _sequence_from(self, first: MDAEvent) -> MDAEvent:
        """`first`, or a `SequencedEvent` of it and the events that can follow it.

        Takes, while they are due and can be sequenced with `first`, the
        events the Scheduler would serve next anyway. A sequence cut short by
        `max_sequence_frames` or a stream's chunk, where the next event would
        otherwise join it, names the frames planned at that place so far
        (``camera_frames``: the rest of its stream, or of its time-lapse
        position): the engine may ask the camera for all of them and run on
        into the next sequences (`SafeEngine`).
        """
        batch = [first]
        due0 = _due(first)
        first_chunk = event_tag(first).get("chunk")
        runs_on = False
        while self._stop_reason is None:
            now = self.now()
            kind, what = self._choose(now, pending=len(batch))
            if kind == "wait":
                break
            candidate, due = self._preview(kind, what)
            if not self._joins(first, candidate, due, max(now, due0)):
                break
            chunk = event_tag(candidate).get("chunk")
            if len(batch) >= self.max_sequence_frames or chunk != first_chunk:
                runs_on = True  # it would join, but in the next sequence
                break
            event = self._take(kind, what, now)
            if event is None:
                break
            batch.append(event)
        if len(batch) == 1:
            return first
        from smartscope.engine import FrameSequence

        self.n_sequences += 1
        self.n_sequenced_frames += len(batch)
        tag = event_tag(first)
        sequence = FrameSequence(
            events=tuple(batch),
            pos_name=first.pos_name,
            x_pos=first.x_pos,
            y_pos=first.y_pos,
            z_pos=first.z_pos,
            exposure=first.exposure,
            channel=first.channel,
            roi=first.roi,
            properties=first.properties,
            keep_shutter_open=first.keep_shutter_open,
            min_start_time=first.min_start_time,
            metadata={
                "smartscope": {
                    "sequence": self.n_sequences - 1,
                    "n_frames": len(batch),
                    "camera_frames": len(batch) + self._frames_left(first)
                    if runs_on
                    else len(batch),
                    "position": tag.get("position"),
                    "kind": tag.get("kind"),
                    "event_ids": [event_tag(e).get("event_id") for e in batch],
                }
            },
        )
        self.events.sequenceServed.emit(sequence)
        return sequence

    def _frames_left(self, served: MDAEvent) -> int:
        """Frames still planned like `served`: its stream's, or its position's."""
        tag = event_tag(served)
        if "stream" in tag:
            state = self._streams.get(str(tag["stream"]))
            return max(0, state.n_total - state.n_served) if state else 0
        tl = self._timelines.get(str(tag.get("position"))) if self._timelines else None
        if tl is None or len(tl.template) != 1:
            return 0
        return tl.remaining_visits()

    def _joins(
        self, first: MDAEvent, event: MDAEvent, due: float, latest_due: float
    ) -> bool:
        """Whether `event` can be streamed by the camera right after `first`.

        `first` has been served; `event` (due at `due`) is not yet. Same place,
        channel, exposure, ROI and properties as `first`, an image acquisition,
        no wait (due no later than `latest_due`), and the same stream (or none;
        a stream's chunks are separate sequences, see `_sequence_from`).
        """
        if not _sequenceable(event) or due > latest_due + 1e-9:
            return False
        for attr in ("x_pos", "y_pos", "z_pos", "channel", "exposure"):
            value = getattr(event, attr)
            if value is not None and value != getattr(first, attr):
                return False
        if event.properties or self._changed:
            return False  # served, it would set (or restore) device properties
        if event.roi is None:
            if self._roi_active:  # it would get the full frame back
                return False
        elif event.roi != first.roi:
            return False
        if event.keep_shutter_open != first.keep_shutter_open:
            return False
        return event_tag(first).get("stream") == event_tag(event).get("stream")

    def disable_sequencing(self, reason: str) -> None:
        """Serve every event on its own from now on (the hardware cannot sequence)."""
        with self._cond:
            self.max_sequence_frames = 0
            if self.sequencing_off is None:
                self.sequencing_off = reason

    def _best_added(self, now: float) -> tuple | None:
        """The due added event to serve first: highest priority, then FIFO.

        With ``travel_order="nearest"``, among the due events of the highest
        priority the one nearest the stage goes first (a position's own events
        keep their order), unless one of them is past its latest start (see
        `_latest_start`): then the one whose latest start is earliest goes
        first, so that nearby places cannot starve a far one when acquisition
        is at capacity.
        """
        horizon = now + self._poll
        due = [item for item in self._added if item[2] <= horizon]
        if not due:
            return None
        best = min(due, key=lambda item: item[:2])
        if self.travel_order != "nearest" or self._here is None:
            return best
        # the first queued event of each position (a position's frames keep
        # their order), then the nearest of those
        firsts: dict[Any, tuple] = {}
        for item in due:
            if item[0] == best[0]:
                key = _tag_pos(item[3])
                if key not in firsts or item[1] < firsts[key][1]:
                    firsts[key] = item
        timed = [item for item in firsts.values() if item[2] > -math.inf]
        if timed:  # (an event without a due time has no deadline to miss)
            latest, _, overdue = min((self._latest_start(i), i[1], i) for i in timed)
            if now > latest:
                return overdue
        return min(firsts.values(), key=lambda item: (self._distance(item[3]), item[1]))

    def _latest_start(self, item: tuple) -> float:
        """When a due added event stops letting nearer ones go first.

        `travel_slack_s` after its due time; for a position with
        `AddEvents.max_gap_s` that has been served, later if its gap allows:
        `travel_slack_s` before the gap since its last frame reaches
        `max_gap_s`.
        """
        latest = item[2] + self.travel_slack_s
        key = _tag_pos(item[3])
        if key in self._max_gap and key in self._paced_at:
            gap_until = self._paced_at[key][0] + self._max_gap[key]
            latest = max(latest, gap_until - self.travel_slack_s)
        return latest

    def _distance(self, event: MDAEvent) -> float:
        if self._here is None or event.x_pos is None or event.y_pos is None:
            return 0.0
        return math.hypot(event.x_pos - self._here[0], event.y_pos - self._here[1])

    def _next_visit(self, horizon: float) -> _Visit | None:
        """The base visit to serve next (not necessarily due yet)."""
        if self._timelines is None:
            return self._peek_lazy()
        live = [
            t
            for t in self._timelines.values()
            if not t.done and t.key not in self._skipped
        ]
        if not live:
            return None
        due = [t for t in live if t.next_due <= horizon]
        if due:
            # the plan's axis order: no position's next visit before every due
            # position had its current one (an interval-0 time-lapse visits its
            # positions round-robin, as pymmcore-plus does; travel order only
            # chooses among those)
            first = min(t.next_visit for t in due)
            due = [t for t in due if t.next_visit == first]
        if not due:
            tl = min(live, key=lambda t: (t.next_due, t.order))
        elif self.travel_order == "nearest" and self._here is not None:
            here = np.asarray(self._here)
            tl = min(
                due,
                key=lambda t: (
                    float(np.hypot(*(np.asarray(t.xy) - here))) if t.xy else 0.0,
                    t.order,
                ),
            )
        else:
            tl = min(due, key=lambda t: (t.next_due, t.order))
        return _Visit(
            tl.key,
            tl.next_due,
            [],
            self.deadline_fraction * tl.nominal_interval,
            tl.order,
            tl,
        )

    def _start_visit(self, visit: _Visit, now: float) -> MDAEvent | None:
        key = visit.key
        if visit.timeline is not None:
            events = self._visit_events(visit.timeline)
        else:
            events = visit.events
        cost = sum(self._cost(e) for e in events)
        if (
            self.dose_budget_ms is not None
            and self.dose_used_ms.get(key, 0.0)
            + self._dose_reserved.get(key, 0.0)
            + cost
            > self.dose_budget_ms + 1e-9
        ):
            # the budget is spent: this position's remaining visits are dropped
            n = len(events)
            if visit.timeline is not None:
                n = visit.timeline.remaining_visits() * len(events)
                visit.timeline.done = True
            else:
                self._peeked = None
                self._skipped.add(key)
            self.n_skipped += n
            self.dose_refusals += 1
            self.events.eventsSkipped.emit(
                key,
                n,
                f"light-dose budget of {key} spent "
                f"({self.dose_used_ms.get(key, 0.0):.0f} of "
                f"{self.dose_budget_ms:.0f} ms)",
            )
            return None
        if visit.timeline is not None:
            visit.timeline.advance()
        else:
            self._peeked = None
        if visit.due > -math.inf:
            late = max(0.0, now - visit.due)
            self.lateness_s["base"].add(late)
            if visit.deadline_s >= 0 and late > max(visit.deadline_s, self._poll):
                self.n_missed_deadlines += 1
        self.n_base_served += 1
        self._visit = events[1:]
        return self._serve(events[0], base=True)

    def _visit_events(self, tl: _Timeline, *, stamp: bool = True) -> list[MDAEvent]:
        nc, nz, order = self._layout
        out = []
        for event in tl.template:
            index = _plain(event.index)
            update: dict[str, Any] = {
                "index": {"t": tl.next_visit, **index},
                "min_start_time": tl.next_due,
            }
            if tl.moved and tl.xy is not None:
                update.update(x_pos=tl.xy[0], y_pos=tl.xy[1])
                if tl.z is not None:
                    update["z_pos"] = tl.z
            if not stamp:  # a preview (`upcoming`): where and when, no event id
                preview = {"kind": "base", "position": tl.key, "visit": tl.next_visit}
                preview["due_s"] = round(tl.next_due, 6)
                update["metadata"] = {"smartscope": preview}
                out.append(event.model_copy(update=update))
                continue
            tag = {
                "kind": "base",
                "visit": tl.next_visit,
                "shape": {"c": nc, "z": nz, "order": order},
                "c": int(index.get("c", 0)),
                "z": int(index.get("z", 0)),
                "due_s": round(tl.next_due, 6),
            }
            out.append(self._stamp(event, tag, tl.key, update))
        return out

    def _restore_properties(self, event: MDAEvent) -> MDAEvent:
        """Restore what earlier events changed and `event` does not set.

        Remembers the values of the properties `event` changes, first.
        """
        sets = {(d, p) for d, p, _ in event.properties or ()}
        back = [(d, p, v) for (d, p), v in self._changed.items() if (d, p) not in sets]
        for d, p, _ in back:
            del self._changed[(d, p)]
        if self._property_value is not None:
            for key in sets - set(self._changed):
                self._changed[key] = str(self._property_value(*key))
        if not back:
            return event
        props = [tuple(p) for p in event.properties or ()] + back
        return event.model_copy(update={"properties": props})

    def _finish(self, reason: str) -> None:
        if self._finish_reason is None:
            self._finish_reason = reason
            self.events.finished.emit(reason)
        raise StopIteration

    def _serve(self, event: MDAEvent, *, base: bool) -> MDAEvent:
        if event.roi is not None:
            self._roi_active = True
        elif self._roi_active and self._full_roi is not None:
            event = event.model_copy(update={"roi": self._full_roi})
            self._roi_active = False
        if event.properties or self._changed:
            event = self._restore_properties(event)
        if event.x_pos is not None and event.y_pos is not None:
            xy = (float(event.x_pos), float(event.y_pos))
            if self._here is not None:
                self.travel_um += math.hypot(
                    xy[0] - self._here[0], xy[1] - self._here[1]
                )
            self._here = xy
        tag = event_tag(event)
        pos = tag.get("position")
        cost = self._cost(event)
        self.total_dose_ms += cost
        if self.dose_budget_ms is not None:
            bkey = str(tag.get("dose_position") or pos or "")
            self.dose_used_ms[bkey] = self.dose_used_ms.get(bkey, 0.0) + cost
        self.n_served += 1
        self.current_position = pos
        self.events.eventServed.emit(event)
        return event

    def _cost(self, event: MDAEvent) -> float:
        exposure = event.exposure if event.exposure is not None else None
        return float(exposure if exposure is not None else self.default_exposure_ms)

    def _release(self, item: tuple) -> None:
        bkey = item[4]
        if bkey not in self._dose_reserved:
            return
        left = self._dose_reserved[bkey] - self._cost(item[3])
        if left > 1e-9:
            self._dose_reserved[bkey] = left
        else:
            del self._dose_reserved[bkey]  # nothing reserved: no entry kept

    # ------------------------------------------------------------- lazy plans
    def _peek_lazy(self) -> _Visit | None:
        while self._peeked is None and not self._base_done:
            try:
                event = next(self._base)
            except StopIteration:
                self._base_done = True
                break
            key = base_position_key(event)
            if key in self._done:
                self.n_already_done += 1
                continue
            if key in self._skipped or self._well_skipped(key):
                self._count_skipped(key)
                continue
            z_focus = self._well_focus.get(well_of(key), self._default_focus)
            if z_focus is not None:
                event = self._focused(event, z_focus)
            index = event.index
            nc, nz, order = self._layout
            tag = {
                "kind": "base",
                "visit": int(index.get("t", 0)),
                "shape": {"c": nc, "z": nz, "order": order},
                "c": int(index.get("c", 0)),
                "z": int(index.get("z", 0)),
            }
            due = _due(event)
            if due > -math.inf:
                tag["due_s"] = round(due, 6)
            stamped = self._stamp(event, tag, key)
            since = self.now() if due == -math.inf else None  # untimed: wait from now
            self._peeked = _Visit(key, due, [stamped], -1.0, 0, read_s=since)
        if self._peeked is not None and (
            self._peeked.key in self._skipped or self._well_skipped(self._peeked.key)
        ):
            self._count_skipped(self._peeked.key)  # skipped while waiting to be due
            self._peeked = None
            return self._peek_lazy()
        return self._peeked

    def _count_skipped(self, key: str | None) -> None:
        self.n_skipped += 1
        self.events.eventsSkipped.emit(str(key), 1, "position skipped")

    def _fresh_key(self, key: str) -> str:
        """`key`, or a new one where an earlier session's position has it."""
        if key not in self._done:
            return key
        if key not in self._renamed:
            taken = self._done | set(self._renamed.values())
            n = 1
            while f"{key}_r{n}" in taken:
                n += 1
            self._renamed[key] = f"{key}_r{n}"
        return self._renamed[key]

    def _stamp(
        self,
        event: MDAEvent,
        tag: dict[str, Any],
        key: str | None,
        update: dict[str, Any] | None = None,
    ) -> MDAEvent:
        """`event` with its smartscope tag (and `update`), in one copy."""
        event_id = next(self._event_ids)
        index = _plain(event.index)
        tag = {
            "visit": 0,
            "c": tag["c"] if "c" in tag else int(index.get("c", 0)),
            "z": tag["z"] if "z" in tag else int(index.get("z", 0)),
            "shape": {"c": 1, "z": 1, "order": "cz"},
            **tag,
            "event_id": event_id,
            "position": self._fresh_key(key or f"added_{event_id:05d}"),
        }
        metadata = {**event.metadata, "smartscope": tag}
        return event.model_copy(update={**(update or {}), "metadata": metadata})


def _base_layout(plan: Any) -> tuple[int, int, str]:
    """Channels and Z planes per visit of a base position, and their order."""
    if not isinstance(plan, MDASequence):
        return 1, 1, "cz"
    sizes = plan.sizes
    nc = max(1, int(sizes.get("c", 0)))
    nz = max(1, int(sizes.get("z", 0)))
    axes = "".join(str(a) for a in plan.axis_order if str(a) in "cz")
    return nc, nz, axes if len(axes) == 2 else "cz"


def _plain(index: Any) -> Any:
    """An event's index as a plain dict where it is one underneath.

    useq's index of a plan's events is a read-only ``UserDict``, whose
    ``get`` and ``**`` unpacking go through Python-level methods: several
    times slower in the per-event loop of a hardware sequence's set-up.
    """
    return index.data if isinstance(index, UserDict) else index


def _tag_pos(event: MDAEvent) -> str | None:
    return event_tag(event).get("position")


def _due(event: MDAEvent) -> float:
    """When `event` may start (its ``min_start_time``; -inf: at once).

    A ``min_start_time`` of 0 (every frame of a zero-interval time plan, and
    the first of any) is no constraint: untimed like None, so such a visit's
    wait counts from when it was read, not from the start of the run.
    """
    return float(event.min_start_time) if event.min_start_time else -math.inf


def _sequenceable(event: MDAEvent) -> bool:
    """Whether `event` can be part of a hardware sequence at all."""
    from pymmcore_plus.core import SequencedEvent

    return (
        not isinstance(event, SequencedEvent)
        and isinstance(event.action, (AcquireImage, type(None)))
        and event.slm_image is None
        and not event.reset_event_timer
    )
