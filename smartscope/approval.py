"""`ApprovalGate`: policies propose, the operator approves or rejects.

In approval mode the `InferenceWorker` hands every `Action` a policy returns to
an `ApprovalGate` instead of applying it. The gate keeps the action pending and
announces it (``ApprovalEvents.proposed``); the base plan goes on being acquired
meanwhile. `ApprovalGate.approve` applies the action through
``Scheduler.apply`` with the decision id, trigger frame and kind it was proposed
with; `ApprovalGate.reject` refuses it ("refused by the operator"). Either way
the resolution is appended to ``decisions.jsonl`` next to the proposal, so the
record says what the policy asked for and what the operator decided. With
``auto_approve_s`` an action nobody answered is approved after that many
seconds. The `Scheduler` does not end while a proposal is pending.

Nothing here knows Qt: the GUI, a script or a test drives the same gate.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from psygnal import Signal, SignalGroup

from smartscope.scheduler import ActionOutcome, AddEvents, event_summary

if TYPE_CHECKING:
    from smartscope.rundir import RunStorage
    from smartscope.scheduler import Action, Scheduler

__all__ = [
    "REFUSED_BY_OPERATOR",
    "ApprovalEvents",
    "ApprovalGate",
    "PendingOutcome",
    "Proposal",
]

REFUSED_BY_OPERATOR = "refused by the operator"
"""The reason logged for an action the operator rejected."""

_RUN_ENDED = "run ended before the operator decided"


class ApprovalEvents(SignalGroup):
    """Signals of an `ApprovalGate` (emitted from the thread that causes them).

    ``proposed`` comes from the inference thread, ``resolved`` from whichever
    thread approved or rejected (GUI, timer, runner); GUI code connects with
    ``thread="main"``.
    """

    proposed = Signal(object)  # Proposal
    resolved = Signal(object)  # Proposal (status, outcome and record filled in)


@dataclass
class Proposal:
    """One action a policy proposed, and what became of it.

    Attributes
    ----------
    proposal_id : int
        Identity of the proposal within the run (0, 1, ...).
    action : Action
        What the policy asked for.
    decision_id, trigger_frame : int | None
        The decision that proposed it and the frame that caused the decision.
    kind : str
        The proposing policy's name (given to ``Scheduler.apply``).
    t_proposed_s : float
        When it was proposed, seconds since the run started.
    status : str
        ``"pending"``, ``"approved"`` or ``"rejected"``.
    resolved_by : str | None
        ``"operator"``, ``"timeout"`` (auto-approval) or ``"run"`` (the run
        ended first).
    outcome : ActionOutcome | None
        What the Scheduler did (approved) or the refusal (rejected).
    record : dict | None
        The resolution record written to ``decisions.jsonl``.
    apply_kwargs : dict
        Further arguments of ``Scheduler.apply`` given with the proposal
        (e.g. ``trigger_position``).
    """

    proposal_id: int
    action: Action
    decision_id: int | None
    trigger_frame: int | None
    kind: str
    t_proposed_s: float
    status: Literal["pending", "approved", "rejected"] = "pending"
    resolved_by: str | None = None
    t_resolved_s: float | None = None
    outcome: ActionOutcome | None = None
    record: dict[str, Any] | None = None
    apply_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def is_pending(self) -> bool:
        """Whether the operator has not decided yet."""
        return self.status == "pending"

    def describe(self) -> str:
        """One line for a person: what would happen, and the policy's reason."""
        action = self.action
        if isinstance(action, AddEvents):
            positions = {e.pos_name for e in action.events if e.pos_name}
            what = f"add {len(action.events)} event(s)"
            if positions:
                what += f" at {len(positions)} position(s)"
        else:
            what = action.type.replace("_", " ")
            if getattr(action, "position", None):
                what += f" {action.position}"  # type: ignore[union-attr]
        reason = getattr(action, "reason", "")
        return f"{what}: {reason}" if reason else what


@dataclass
class PendingOutcome(ActionOutcome):
    """What the worker logs for a proposed action: pending, not yet applied."""

    proposal_id: int = -1

    def to_json(self) -> dict[str, Any]:
        d = super().to_json()
        d["status"] = "pending"
        d["proposal_id"] = self.proposal_id
        if isinstance(self.action, AddEvents):
            d["proposed_events"] = [event_summary(e) for e in self.action.events]
        return d


class ApprovalGate:
    """Holds policy actions until the operator approves or rejects them.

    Thread-safe: the inference thread proposes, any thread resolves.

    Parameters
    ----------
    auto_approve_s : float, optional
        Approve a proposal nobody answered after this many seconds (None or 0:
        wait for the operator). Applies to proposals made after it is set.

    Examples
    --------
    >>> gate = ApprovalGate(auto_approve_s=30)
    >>> with Runner(exp, approval=gate) as runner:
    ...     gate.events.proposed.connect(lambda p: print(p.describe()))
    ...     runner.start()
    ...     ...  # gate.approve(0), gate.reject_all(), ...
    ...     summary = runner.finish()
    """

    def __init__(self, *, auto_approve_s: float | None = None) -> None:
        self.events = ApprovalEvents()
        self.auto_approve_s = auto_approve_s
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._pending: dict[int, Proposal] = {}
        self._applying = 0
        self._timers: dict[int, threading.Timer] = {}
        self._scheduler: Scheduler | None = None
        self._storage: RunStorage | None = None
        self._t0 = time.perf_counter()
        self._clock: Callable[[], float] = lambda: time.perf_counter() - self._t0
        self._closed = False
        self.proposals: list[Proposal] = []
        self.n_approved = 0
        self.n_rejected = 0
        self.n_events_scheduled = 0

    def bind(
        self,
        scheduler: Scheduler,
        *,
        storage: RunStorage | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        """Attach the run's scheduler (approved actions go there) and log.

        The `Runner` calls this when it starts; it also registers
        `has_pending` as one of the scheduler's pending-work checks.
        """
        self._scheduler = scheduler
        self._storage = storage
        if clock is not None:
            self._clock = clock
        scheduler.add_pending_check(self.has_pending)

    # ------------------------------------------------------------ proposing
    def propose(
        self,
        action: Action,
        *,
        decision_id: int | None = None,
        trigger_frame: int | None = None,
        kind: str = "added",
        **apply_kwargs: Any,
    ) -> ActionOutcome:
        """Keep `action` pending; same signature as ``Scheduler.apply``.

        Every argument is kept and given to ``Scheduler.apply`` on approval.
        Returns a `PendingOutcome` (logged by the worker with the decision).
        """
        with self._lock:
            proposal = Proposal(
                proposal_id=next(self._ids),
                action=action,
                decision_id=decision_id,
                trigger_frame=trigger_frame,
                kind=kind,
                t_proposed_s=self._clock(),
                apply_kwargs=apply_kwargs,
            )
            self.proposals.append(proposal)
            if self._closed:
                closed = True
            else:
                closed = False
                self._pending[proposal.proposal_id] = proposal
                timeout = self.auto_approve_s
                if timeout and timeout > 0:
                    timer = threading.Timer(
                        timeout, self._auto_approve, (proposal.proposal_id,)
                    )
                    timer.daemon = True
                    self._timers[proposal.proposal_id] = timer
                    timer.start()
        self.events.proposed.emit(proposal)
        if closed:
            self._resolve(
                proposal, approve=False, by="run", reason=_RUN_ENDED, taken=False
            )
        return PendingOutcome(
            action,
            False,
            "awaiting operator approval",
            proposal_id=proposal.proposal_id,
        )

    # ------------------------------------------------------------ resolving
    def pending(self) -> list[Proposal]:
        """Proposals waiting for the operator, oldest first."""
        with self._lock:
            return sorted(self._pending.values(), key=lambda p: p.proposal_id)

    def has_pending(self) -> bool:
        """True while a proposal waits or an approved one is being applied.

        Lock-free: the Scheduler calls it while holding its own lock.
        """
        return bool(self._pending) or self._applying > 0

    def approve(self, proposal_id: int, *, by: str = "operator") -> Proposal | None:
        """Apply a pending proposal; None if it is not pending (any more)."""
        proposal = self._take(proposal_id)
        if proposal is None:
            return None
        return self._resolve(proposal, approve=True, by=by)

    def reject(
        self, proposal_id: int, *, reason: str = REFUSED_BY_OPERATOR
    ) -> Proposal | None:
        """Refuse a pending proposal; None if it is not pending (any more)."""
        proposal = self._take(proposal_id)
        if proposal is None:
            return None
        return self._resolve(proposal, approve=False, by="operator", reason=reason)

    def approve_all(self) -> list[Proposal]:
        """Approve every pending proposal, oldest first."""
        done = [self.approve(p.proposal_id) for p in self.pending()]
        return [p for p in done if p is not None]

    def reject_all(self, *, reason: str = REFUSED_BY_OPERATOR) -> list[Proposal]:
        """Reject every pending proposal."""
        done = [self.reject(p.proposal_id, reason=reason) for p in self.pending()]
        return [p for p in done if p is not None]

    def close(self, reason: str = _RUN_ENDED) -> None:
        """Refuse what is still pending and stop the timers (the run is over)."""
        with self._lock:
            self._closed = True
        for proposal in self.pending():
            taken = self._take(proposal.proposal_id)
            if taken is not None:
                self._resolve(taken, approve=False, by="run", reason=reason)

    def _auto_approve(self, proposal_id: int) -> None:
        self.approve(proposal_id, by="timeout")

    def _take(self, proposal_id: int) -> Proposal | None:
        with self._lock:
            proposal = self._pending.pop(proposal_id, None)
            if proposal is not None:
                self._applying += 1  # has_pending stays true until applied
            timer = self._timers.pop(proposal_id, None)
        if timer is not None:
            timer.cancel()
        return proposal

    def _resolve(
        self,
        proposal: Proposal,
        *,
        approve: bool,
        by: str,
        reason: str = "",
        taken: bool = True,
    ) -> Proposal:
        try:
            if approve:
                if self._scheduler is None:
                    raise RuntimeError("ApprovalGate.bind(scheduler) was not called")
                outcome = self._scheduler.apply(
                    proposal.action,
                    decision_id=proposal.decision_id,
                    trigger_frame=proposal.trigger_frame,
                    kind=proposal.kind,
                    **proposal.apply_kwargs,
                )
            else:
                outcome = ActionOutcome(proposal.action, False, reason)
            proposal.status = "approved" if approve else "rejected"
            proposal.resolved_by = by
            proposal.t_resolved_s = self._clock()
            proposal.outcome = outcome
            proposal.record = self._record(proposal)
            with self._lock:
                if approve:
                    self.n_approved += 1
                    self.n_events_scheduled += len(outcome.events)
                else:
                    self.n_rejected += 1
            if self._storage is not None:
                self._storage.log_decision(proposal.record)
        finally:
            if taken:
                with self._lock:
                    self._applying -= 1
        self.events.resolved.emit(proposal)
        return proposal

    def _record(self, proposal: Proposal) -> dict[str, Any]:
        """The resolution line of ``decisions.jsonl``."""
        assert proposal.outcome is not None and proposal.t_resolved_s is not None
        return {
            "decision_id": proposal.decision_id,
            "policy": proposal.kind,
            "trigger": {"frame_index": proposal.trigger_frame},
            "approval": {
                "proposal_id": proposal.proposal_id,
                "status": proposal.status,
                "by": proposal.resolved_by,
                "t_proposed_s": round(proposal.t_proposed_s, 6),
                "t_resolved_s": round(proposal.t_resolved_s, 6),
                "waited_ms": round(
                    (proposal.t_resolved_s - proposal.t_proposed_s) * 1000, 3
                ),
            },
            "actions": [proposal.outcome.to_json()],
        }
