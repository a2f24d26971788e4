"""Scheduler, Actions and the built-in policies."""

from smartscope.scheduler._actions import (
    Action,
    ActionOutcome,
    AddEvents,
    SkipPosition,
    Stop,
    event_summary,
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
    "AddEvents",
    "FindAndCenter",
    "ObjectFilter",
    "PPolicy",
    "PolicyContext",
    "Scheduler",
    "SchedulerEvents",
    "SkipEmpty",
    "SkipPosition",
    "Stop",
    "available_policies",
    "base_position_key",
    "create_policy",
    "event_summary",
    "policy_class",
]
