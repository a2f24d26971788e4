"""Actions: small typed values that policies return and the Scheduler applies."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Union

if TYPE_CHECKING:
    from useq import MDAEvent


def event_summary(event: MDAEvent) -> dict[str, Any]:
    """JSON-ready description of an event: where, what and why."""
    from smartscope.frame import event_tag

    tag = event_tag(event)
    return {
        "event_id": tag.get("event_id"),
        "position": tag.get("position", event.pos_name),
        "x_um": event.x_pos,
        "y_um": event.y_pos,
        "z_um": event.z_pos,
        "channel": event.channel.config if event.channel else None,
        "exposure_ms": event.exposure,
        "index": {str(k): int(v) for k, v in event.index.items()},
    }


@dataclass(frozen=True)
class AddEvents:
    """Acquire these events, ahead of the base plan when `priority` > 0.

    Events are served in the order given (policies give a short travel order);
    higher priority first across actions.
    """

    events: tuple[MDAEvent, ...]
    priority: int = 10
    reason: str = ""
    type: Literal["add_events"] = field(default="add_events", init=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "priority": self.priority,
            "reason": self.reason,
            "n_events": len(self.events),
        }


@dataclass(frozen=True)
class SkipPosition:
    """Drop every event still planned for `position` (a Scheduler position key)."""

    position: str
    reason: str = ""
    type: Literal["skip_position"] = field(default="skip_position", init=False)

    def to_json(self) -> dict[str, Any]:
        return {"type": self.type, "position": self.position, "reason": self.reason}


@dataclass(frozen=True)
class Stop:
    """End the run after the current event; nothing further is acquired."""

    reason: str = ""
    type: Literal["stop"] = field(default="stop", init=False)

    def to_json(self) -> dict[str, Any]:
        return {"type": self.type, "reason": self.reason}


Action = Union[AddEvents, SkipPosition, Stop]  # noqa: UP007 (a runtime alias)


@dataclass
class ActionOutcome:
    """What the Scheduler did with an action: applied or refused, and why."""

    action: Action
    applied: bool
    reason: str = ""
    events: list[dict[str, Any]] = field(default_factory=list)
    n_dropped: int = 0
    scheduled: list[MDAEvent] = field(default_factory=list, repr=False)

    def to_json(self) -> dict[str, Any]:
        d = self.action.to_json()
        d["status"] = "applied" if self.applied else "refused"
        if self.reason:
            d["outcome"] = self.reason
        if self.events:
            d["events"] = self.events
        if self.n_dropped:
            d["n_dropped"] = self.n_dropped
        return d
