"""Policies by name: the built-ins, entry points, and ``module:Class`` paths."""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any

from smartscope._errors import RegistryError
from smartscope._imports import build_component, import_path, load_entry_point
from smartscope.policies._protocol import PPolicy

__all__ = ["available_policies", "create_policy", "policy_class"]

#: Entry point group under which installed distributions register policies.
ENTRY_POINT_GROUP = "smartscope.policies"

#: The built-in policies, registered here only (not as entry points).
_BUILTINS: dict[str, str] = {
    "find_and_center": "smartscope.policies._survey:FindAndCenter",
    "skip_empty": "smartscope.policies._survey:SkipEmpty",
    "event_burst": "smartscope.policies._livecell:EventBurst",
    "adaptive_interval": "smartscope.policies._livecell:AdaptiveInterval",
    "track_and_follow": "smartscope.policies._livecell:TrackAndFollow",
    "well_quota": "smartscope.policies._screening:WellQuota",
    "hit_detection": "smartscope.policies._screening:HitDetection",
    "object_autofocus": "smartscope.policies._screening:ObjectAutofocus",
}


def available_policies() -> list[str]:
    """Names accepted by `create_policy` (besides ``module:Class`` paths)."""
    names = set(_BUILTINS)
    names.update(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))
    return sorted(names)


def policy_class(name: str) -> Any:
    """The class registered as policy `name`.

    `name` is a built-in name, the name of a ``smartscope.policies`` entry
    point, or an import path ``package.module:ClassName`` (a user's own policy
    in any importable module).

    Raises
    ------
    RegistryError
        If nothing of that name is registered or the path does not import.
    """
    if name in _BUILTINS:
        return import_path(_BUILTINS[name], f"policy {name!r}")
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            return load_entry_point(ep, f"policy {name!r}")
    if ":" in name:
        return import_path(name, f"policy {name!r}")
    raise RegistryError(
        f"unknown policy {name!r} (available: {', '.join(available_policies())}; "
        "or an import path 'package.module:ClassName')"
    )


def create_policy(name: str, params: dict[str, Any] | None = None) -> PPolicy:
    """Build policy `name` with keyword `params` (validated by the policy).

    Raises
    ------
    RegistryError
        If nothing of that name is registered, or a plugin's own code fails
        to import or to start (its error in one line).
    ValueError
        If the parameters are invalid for it (pydantic validation errors).
    """
    policy = build_component(policy_class(name), params, f"policy {name!r}")
    if not isinstance(policy, PPolicy):
        raise RegistryError(f"policy {name!r} does not implement PPolicy")
    return policy
