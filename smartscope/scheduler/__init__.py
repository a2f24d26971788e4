"""Scheduler, Actions and the built-in policies."""

from smartscope.scheduler._actions import (
    Action,
    ActionOutcome,
    AddEvents,
    MovePosition,
    SetFocus,
    SetInterval,
    SkipPosition,
    SkipWell,
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
    Objective,
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
from smartscope.scheduler._screen import (
    HitDetection,
    ObjectAutofocus,
    WellQuota,
    object_sharpness,
    well_of,
)

__all__ = [
    "Action",
    "ActionOutcome",
    "AdaptiveInterval",
    "AddEvents",
    "Bounds",
    "EventBurst",
    "FindAndCenter",
    "HitDetection",
    "MovePosition",
    "ObjectAutofocus",
    "ObjectFilter",
    "Objective",
    "PPolicy",
    "PolicyContext",
    "Scheduler",
    "SchedulerEvents",
    "SetFocus",
    "SetInterval",
    "SkipEmpty",
    "SkipPosition",
    "SkipWell",
    "Stop",
    "TrackAndFollow",
    "WellQuota",
    "available_policies",
    "base_position_key",
    "create_policy",
    "event_summary",
    "object_features",
    "object_sharpness",
    "policy_class",
    "well_of",
]
