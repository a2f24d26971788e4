"""Scheduler, Actions and the built-in policies."""

from smartscope.scheduler._actions import (
    Action,
    ActionOutcome,
    AddEvents,
    MovePosition,
    SetInterval,
    SkipPosition,
    Stop,
    event_summary,
)
from smartscope.scheduler._live import (
    AdaptiveInterval,
    Bounds,
    EventBurst,
    TrackAndFollow,
    object_features,
)
from smartscope.scheduler._policies import (
    FindAndCenter,
    ObjectFilter,
    PolicyContext,
    PPolicy,
    SkipEmpty,
    available_policies,
    create_policy,
    policy_class,
)
from smartscope.scheduler._scheduler import (
    Scheduler,
    SchedulerEvents,
    base_position_key,
)

__all__ = [
    "Action",
    "ActionOutcome",
    "AdaptiveInterval",
    "AddEvents",
    "Bounds",
    "EventBurst",
    "FindAndCenter",
    "MovePosition",
    "ObjectFilter",
    "PPolicy",
    "PolicyContext",
    "Scheduler",
    "SchedulerEvents",
    "SetInterval",
    "SkipEmpty",
    "SkipPosition",
    "Stop",
    "TrackAndFollow",
    "available_policies",
    "base_position_key",
    "create_policy",
    "event_summary",
    "object_features",
    "policy_class",
]
