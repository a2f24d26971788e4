"""Policies: detections in, `Action`s out.

The `PPolicy` protocol and the `PolicyContext` a policy sees, the registry, the
built-in policies (survey, live-cell, screening) and the object features they
test. Policies know `Detections`, `Frame` and the Scheduler's actions; not Qt,
torch or the microscope.
"""

from smartscope.policies._features import (
    Bounds,
    field_medians,
    object_features,
    object_sharpness,
)
from smartscope.policies._livecell import AdaptiveInterval, EventBurst, TrackAndFollow
from smartscope.policies._protocol import (
    ObjectFilter,
    PolicyBase,
    PolicyContext,
    PPolicy,
)
from smartscope.policies._registry import (
    available_policies,
    create_policy,
    policy_class,
)
from smartscope.policies._screening import HitDetection, ObjectAutofocus, WellQuota
from smartscope.policies._survey import FindAndCenter, SkipEmpty

__all__ = [
    "AdaptiveInterval",
    "Bounds",
    "EventBurst",
    "FindAndCenter",
    "HitDetection",
    "ObjectAutofocus",
    "ObjectFilter",
    "PPolicy",
    "PolicyBase",
    "PolicyContext",
    "SkipEmpty",
    "TrackAndFollow",
    "WellQuota",
    "available_policies",
    "create_policy",
    "field_medians",
    "object_features",
    "object_sharpness",
    "policy_class",
]
