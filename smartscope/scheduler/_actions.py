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


#: added events of at least this priority go ahead of the base plan however
#: long a base visit has waited (the Scheduler's `max_delay_s` does not apply):
#: for short, finite work that later base visits depend on, such as a focus
#: search whose result the well's next fields are imaged at
URGENT_PRIORITY = 100


@dataclass(frozen=True)
class AddEvents:
    """Acquire these events, ahead of the base plan when `priority` > 0.

    Events are served in the order given (policies give a short travel order);
    higher priority first across actions. A base visit that has waited the
    Scheduler's `max_delay_s` goes before them, unless `priority` is at least
    `URGENT_PRIORITY` (100).

    With `min_gap_s`, the events of one position (``pos_name``) are served at
    least that far apart: when one is served late, the position's queued
    events after it are pushed back rather than served straight after it (a
    burst whose frames fell behind keeps its pace instead of taking two
    frames at once, which would leave the longest gap just as long).

    With `max_gap_s` (and the Scheduler's ``travel_order="nearest"``), the
    longest gap wanted between a position's frames: when several added events
    are due at once (acquisition at capacity), nearer ones go first while this
    position's next frame can still start `travel_slack_s` before its gap
    since the last one reaches `max_gap_s`, and of those past that point the
    one nearest its limit goes first (not the one longest past its due time,
    which a late frame before it has made stale).
    """

    events: tuple[MDAEvent, ...]
    priority: int = 10
    reason: str = ""
    min_gap_s: float | None = None
    max_gap_s: float | None = None
    type: Literal["add_events"] = field(default="add_events", init=False)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "type": self.type,
            "priority": self.priority,
            "reason": self.reason,
            "n_events": len(self.events),
        }
        if self.min_gap_s is not None:
            out["min_gap_s"] = self.min_gap_s
        if self.max_gap_s is not None:
            out["max_gap_s"] = self.max_gap_s
        return out


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


@dataclass(frozen=True)
class SetInterval:
    """Image time-lapse `position` every `interval_s` seconds from now on.

    Only for a time-lapse base plan; the plan's total duration is kept, so the
    number of remaining visits changes with the interval.
    """

    position: str
    interval_s: float
    reason: str = ""
    type: Literal["set_interval"] = field(default="set_interval", init=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "position": self.position,
            "interval_s": self.interval_s,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class MovePosition:
    """Image time-lapse `position` at new stage coordinates from its next visit.

    `z_um` None keeps the position's Z.
    """

    position: str
    x_um: float
    y_um: float
    z_um: float | None = None
    reason: str = ""
    type: Literal["move_position"] = field(default="move_position", init=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "position": self.position,
            "x_um": round(self.x_um, 3),
            "y_um": round(self.y_um, 3),
            "z_um": None if self.z_um is None else round(self.z_um, 3),
            "reason": self.reason,
        }


@dataclass(frozen=True)
class SkipWell:
    """Drop every event still planned for a plate well.

    Base-plan events whose position key starts with ``f"{well}_"`` (a
    `useq.WellPlatePlan` names its positions ``<well>_<field>``) and queued
    added events at such positions are dropped.
    """

    well: str
    reason: str = ""
    type: Literal["skip_well"] = field(default="skip_well", init=False)

    def to_json(self) -> dict[str, Any]:
        return {"type": self.type, "well": self.well, "reason": self.reason}


@dataclass(frozen=True)
class SetFocus:
    """Image the later base-plan fields of a plate well at focus `z_um`.

    Applies to base events whose position key starts with ``f"{well}_"`` that
    are not served yet; fields already imaged keep their Z. ``well="*"`` sets
    the focus of every well that has none of its own (yet): e.g. the focus of
    the last well focused, since neighbouring wells of a plate differ little.
    """

    well: str
    z_um: float
    reason: str = ""
    type: Literal["set_focus"] = field(default="set_focus", init=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "well": self.well,
            "z_um": round(self.z_um, 3),
            "reason": self.reason,
        }


@dataclass(frozen=True)
class Stream:
    """A streamed burst: `n_frames` frames of `event`, as fast as the camera runs.

    `event` says where and how (stage position, channel, exposure, camera ROI,
    ``pos_name``: the position key its frames are stored under, and
    ``metadata["smartscope"]`` entries such as ``dose_position``); its index and
    ``min_start_time`` only place the first frame. Frame ``k`` is stored at
    ``t = k`` of that position. The Scheduler queues the frames one chunk of
    `chunk_frames` ahead of the chunk being acquired and hands each chunk to the
    engine as one hardware sequence (event by event where the hardware cannot
    sequence): the camera streams at its own rate inside a chunk, and decisions
    take effect between chunks. `StopStream` ends the stream (the chunk being
    acquired is finished, the queued one dropped), `ExtendStream` adds frames;
    `Stop`, `SkipPosition` and a spent light-dose budget end it too. Without an
    extension the stream ends after `n_frames`.

    Streamed frames are analysed like any frame, but no policy needs them unless
    its ``needs(frame)`` says so: of each chunk only its last frame is analysed
    (``analysis.sequence_frames: last``), or with ``newest`` the newest frames
    as the model keeps up (the others are counted as skipped, and stored).
    """

    event: MDAEvent
    n_frames: int
    chunk_frames: int = 20
    priority: int = 10
    reason: str = ""
    type: Literal["stream"] = field(default="stream", init=False)

    def frame_event(self, k: int) -> MDAEvent:
        """Frame `k` of the stream as the Scheduler will serve it (unstamped)."""
        tag = dict(self.event.metadata.get("smartscope") or {})
        tag.update(visit=k, stream_frame=k)
        index = {**self.event.index, "t": k}
        metadata = {**self.event.metadata, "smartscope": tag}
        return self.event.model_copy(
            update={"index": index, "metadata": metadata, "min_start_time": None}
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "priority": self.priority,
            "reason": self.reason,
            "n_frames": self.n_frames,
            "chunk_frames": self.chunk_frames,
            "event": event_summary(self.event),
        }


@dataclass(frozen=True)
class StopStream:
    """End the stream at `position` (a Scheduler position key) between chunks."""

    position: str
    reason: str = ""
    type: Literal["stop_stream"] = field(default="stop_stream", init=False)

    def to_json(self) -> dict[str, Any]:
        return {"type": self.type, "position": self.position, "reason": self.reason}


@dataclass(frozen=True)
class ExtendStream:
    """Add `n_frames` frames to the stream at `position` (a Scheduler position key).

    A stream that ended because its frames were all acquired goes on (its frames
    keep their numbering); one that was stopped or skipped does not.
    """

    position: str
    n_frames: int
    reason: str = ""
    type: Literal["extend_stream"] = field(default="extend_stream", init=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "position": self.position,
            "n_frames": self.n_frames,
            "reason": self.reason,
        }


Action = Union[  # noqa: UP007
    AddEvents,
    SkipPosition,
    Stop,
    SetInterval,
    MovePosition,
    SkipWell,
    SetFocus,
    Stream,
    StopStream,
    ExtendStream,
]


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
