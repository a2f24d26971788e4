"""The `Scheduler`: the one iterable the pymmcore-plus runner consumes."""

from __future__ import annotations

import heapq
import itertools
import re
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from psygnal import Signal, SignalGroup
from useq import MDAEvent, MDASequence

from smartscope.frame import event_tag
from smartscope.scheduler._actions import (
    Action,
    ActionOutcome,
    AddEvents,
    SkipPosition,
    Stop,
    event_summary,
)

__all__ = ["Scheduler", "SchedulerEvents", "base_position_key"]

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def _safe(name: str) -> str:
    return _UNSAFE.sub("_", name).strip("_") or "pos"


def base_position_key(event: MDAEvent) -> str:
    """Stable key of the stage position of a base-plan event.

    ``<pos_name or pNNN>`` plus ``_gNNN`` for a grid tile; the key names the
    position's array in the dataset and is what `SkipPosition` refers to.
    """
    index = event.index
    key = _safe(event.pos_name) if event.pos_name else f"p{index.get('p', 0):03d}"
    if "g" in index:
        key += f"_g{index['g']:03d}"
    return key


class SchedulerEvents(SignalGroup):
    """Signals of the `Scheduler` (emitted from the thread that causes them)."""

    eventsScheduled = Signal(list)  # list[MDAEvent] added by an action
    eventServed = Signal(object)  # MDAEvent handed to the runner
    eventsSkipped = Signal(str, int, str)  # position, number of events, reason
    finished = Signal(str)  # reason: "completed" | "stopped: ..."


class Scheduler(Iterator[MDAEvent]):
    """Priority queue of `MDAEvent`s over a base plan, fed by policy `Action`s.

    The runner iterates it (``core.run_mda(scheduler)``). Each ``next()`` returns,
    in order of preference: the highest-priority event added by an action (FIFO
    within a priority, so a policy's travel order is kept); otherwise the next
    base-plan event, unless an added event arrives while waiting for its
    ``min_start_time``. Iteration ends only when the base plan is exhausted, no
    frame is still being analysed, and no pending-work check reports work — or
    when the run is stopped.

    Every served event carries ``metadata["smartscope"]``: ``event_id``,
    ``kind`` ("base" or the adding policy's kind), ``position`` key, ``visit``
    index and visit ``shape`` (for storage), and for added events the
    ``decision_id`` and ``trigger_frame`` that caused them.

    Parameters
    ----------
    plan : MDASequence | Iterable[MDAEvent]
        The base plan.
    clock : callable, optional
        Seconds since the start of the run, in the runner's time base; used to
        let added events pre-empt a base event that is not due yet.
    poll_interval_s : float
        How often a waiting ``next()`` re-checks pending work.
    """

    def __init__(
        self,
        plan: MDASequence | Iterable[MDAEvent],
        *,
        clock: Callable[[], float] | None = None,
        poll_interval_s: float = 0.02,
    ) -> None:
        self.events = SchedulerEvents()
        self._plan = plan
        self._base: Iterator[MDAEvent] = iter(plan)
        self._base_done = False
        self._peeked: MDAEvent | None = None
        self._clock = clock
        self._poll = poll_interval_s
        self._cond = threading.Condition()
        self._queue: list[tuple[int, int, MDAEvent]] = []
        self._counter = itertools.count()
        self._event_ids = itertools.count()
        self._in_flight = 0
        self._pending_checks: list[Callable[[], bool]] = []
        self._skipped: set[str] = set()
        self._stop_reason: str | None = None
        self._finish_reason: str | None = None
        self._layout = _base_layout(plan)
        self.n_served = 0
        self.n_base_served = 0
        self.n_added = 0
        self.n_skipped = 0
        self.current_position: str | None = None

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
        return len(self._queue)

    @property
    def finish_reason(self) -> str | None:
        """Why iteration ended ("completed", "stopped: ..."), None while running."""
        return self._finish_reason

    def stop(self, reason: str = "stopped") -> None:
        """End iteration at the next ``next()``; wakes a waiting runner."""
        with self._cond:
            if self._stop_reason is None:
                self._stop_reason = reason
            self._cond.notify_all()

    def upcoming(self, limit: int = 20) -> list[MDAEvent]:
        """Added events in the order they will be served (base plan excluded)."""
        with self._cond:
            return [e for _, _, e in sorted(self._queue)[:limit]]

    # ---------------------------------------------------------------- actions
    def apply(
        self,
        action: Action,
        *,
        decision_id: int | None = None,
        trigger_frame: int | None = None,
        kind: str = "added",
    ) -> ActionOutcome:
        """Apply one action; return whether it was applied or refused, and why."""
        with self._cond:
            if self._stop_reason is not None:
                return ActionOutcome(action, False, "run is stopping")
            if isinstance(action, AddEvents):
                outcome = self._add(action, decision_id, trigger_frame, kind)
            elif isinstance(action, SkipPosition):
                outcome = self._skip(action)
            elif isinstance(action, Stop):
                self._stop_reason = f"stopped by policy: {action.reason}".rstrip(": ")
                outcome = ActionOutcome(action, True)
            else:
                outcome = ActionOutcome(action, False, f"unknown action {action!r}")
            self._cond.notify_all()
        if outcome.scheduled:
            self.events.eventsScheduled.emit(list(outcome.scheduled))
        return outcome

    def _add(
        self,
        action: AddEvents,
        decision_id: int | None,
        trigger_frame: int | None,
        kind: str,
    ) -> ActionOutcome:
        added: list[MDAEvent] = []
        refused = 0
        for event in action.events:
            key = _safe(event.pos_name) if event.pos_name else None
            if key is not None and key in self._skipped:
                refused += 1
                continue
            tag = dict(event_tag(event))
            tag.setdefault("kind", kind)
            tag.update(decision_id=decision_id, trigger_frame=trigger_frame)
            stamped = self._stamp(event, tag, key)
            heapq.heappush(
                self._queue, (-action.priority, next(self._counter), stamped)
            )
            added.append(stamped)
        self.n_added += len(added)
        if not added:
            return ActionOutcome(action, False, "every event is at a skipped position")
        reason = f"{refused} events at skipped positions refused" if refused else ""
        return ActionOutcome(
            action,
            True,
            reason,
            events=[event_summary(e) for e in added],
            scheduled=added,
        )

    def _skip(self, action: SkipPosition) -> ActionOutcome:
        if action.position in self._skipped:
            return ActionOutcome(action, False, "position already skipped")
        self._skipped.add(action.position)
        before = len(self._queue)
        self._queue = [q for q in self._queue if _tag_pos(q[2]) != action.position]
        heapq.heapify(self._queue)
        dropped = before - len(self._queue)
        # base events of this position are dropped as the plan is read (counted then)
        self.n_skipped += dropped
        return ActionOutcome(action, True, n_dropped=dropped)

    # -------------------------------------------------------------- iteration
    def __iter__(self) -> Scheduler:
        return self

    def __next__(self) -> MDAEvent:
        with self._cond:
            while True:
                if self._stop_reason is not None:
                    self._finish(self._stop_reason)
                if self._queue:
                    _, _, event = heapq.heappop(self._queue)
                    return self._serve(event)
                base = self._peek_base()
                if base is not None and _tag_pos(base) in self._skipped:
                    self._drop_peeked()  # skipped while waiting to be due
                    continue
                if base is not None:
                    due_in = self._due_in(base)
                    if due_in > self._poll:
                        # not due yet: let added events pre-empt it meanwhile
                        self._cond.wait(min(due_in - self._poll, 0.25))
                        continue
                    self._peeked = None
                    self.n_base_served += 1
                    return self._serve(base)
                if self._in_flight == 0 and not any(c() for c in self._pending_checks):
                    self._finish("completed")
                self._cond.wait(self._poll)

    def _finish(self, reason: str) -> None:
        if self._finish_reason is None:
            self._finish_reason = reason
            self.events.finished.emit(reason)
        raise StopIteration

    def _serve(self, event: MDAEvent) -> MDAEvent:
        self.n_served += 1
        self.current_position = _tag_pos(event)
        self.events.eventServed.emit(event)
        return event

    def _due_in(self, event: MDAEvent) -> float:
        if not event.min_start_time or self._clock is None:
            return 0.0
        try:
            return float(event.min_start_time) - float(self._clock())
        except Exception:  # clock not ready (run not started)
            return 0.0

    def _peek_base(self) -> MDAEvent | None:
        while self._peeked is None and not self._base_done:
            try:
                event = next(self._base)
            except StopIteration:
                self._base_done = True
                break
            key = base_position_key(event)
            if key in self._skipped:
                self._count_skipped(key)
                continue
            index = event.index
            nc, nz, order = self._layout
            tag = {
                "kind": "base",
                "visit": int(index.get("t", 0)),
                "shape": {"c": nc, "z": nz, "order": order},
                "c": int(index.get("c", 0)),
                "z": int(index.get("z", 0)),
            }
            self._peeked = self._stamp(event, tag, key)
        return self._peeked

    def _drop_peeked(self) -> None:
        self._count_skipped(_tag_pos(self._peeked))
        self._peeked = None

    def _count_skipped(self, key: str | None) -> None:
        self.n_skipped += 1
        self.events.eventsSkipped.emit(str(key), 1, "position skipped")

    def _stamp(self, event: MDAEvent, tag: dict[str, Any], key: str | None) -> MDAEvent:
        event_id = next(self._event_ids)
        tag = {
            "visit": 0,
            "c": int(event.index.get("c", 0)),
            "z": int(event.index.get("z", 0)),
            "shape": {"c": 1, "z": 1, "order": "cz"},
            **tag,
            "event_id": event_id,
            "position": key or f"added_{event_id:05d}",
        }
        metadata = {**event.metadata, "smartscope": tag}
        return event.model_copy(update={"metadata": metadata})


def _base_layout(plan: Any) -> tuple[int, int, str]:
    """Channels and Z planes per visit of a base position, and their order."""
    if not isinstance(plan, MDASequence):
        return 1, 1, "cz"
    sizes = plan.sizes
    nc = max(1, int(sizes.get("c", 0)))
    nz = max(1, int(sizes.get("z", 0)))
    axes = "".join(str(a) for a in plan.axis_order if str(a) in "cz")
    return nc, nz, axes if len(axes) == 2 else "cz"


def _tag_pos(event: MDAEvent) -> str | None:
    return event_tag(event).get("position")
