"""The Scheduler and the `Action`s it applies.

The Scheduler turns the base plan (a `useq.MDASequence`) plus the actions
policies emit into the stream of `useq.MDAEvent`s the acquisition iterates:
clocks, priorities, travel order, dose budgets, skipped wells, and hardware
sequences: a run of events the camera can stream (same place and settings, no
wait between them) goes to the engine as one ``SequencedEvent``. Policies live in
`smartscope.policies`.
"""

from smartscope.frame import base_position_key
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
from smartscope.scheduler._scheduler import Scheduler, SchedulerEvents

__all__ = [
    "URGENT_PRIORITY",
    "Action",
    "ActionOutcome",
    "AddEvents",
    "ExtendStream",
    "MovePosition",
    "Scheduler",
    "SchedulerEvents",
    "SetFocus",
    "SetInterval",
    "SkipPosition",
    "SkipWell",
    "Stop",
    "StopStream",
    "Stream",
    "base_position_key",
    "event_summary",
]
