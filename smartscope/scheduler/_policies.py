"""Policies: detections in, `Action`s out. The built-ins and a registry."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import (
    TYPE_CHECKING,
    Any,
    Literal,
    NamedTuple,
    Protocol,
    runtime_checkable,
)

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr
from useq import MDAEvent, ZRangeAround

from smartscope._errors import RegistryError
from smartscope.scheduler._actions import Action, AddEvents, SkipPosition, SkipWell

if TYPE_CHECKING:
    from smartscope.detections import Detections
    from smartscope.frame import Frame

__all__ = [
    "FindAndCenter",
    "ObjectFilter",
    "Objective",
    "PPolicy",
    "PolicyContext",
    "SkipEmpty",
    "available_policies",
    "create_policy",
]

ENTRY_POINT_GROUP = "smartscope.policies"


class Objective(NamedTuple):
    """An objective preset: the properties that select it, its pixel size."""

    properties: tuple[tuple[str, str, str], ...]
    pixel_size_um: float


@dataclass(frozen=True)
class PolicyContext:
    """What a policy may know about the microscope and the run.

    Attributes
    ----------
    fov_um : (float, float)
        Field of view (width, height) in µm.
    pixel_size_um : float
        Pixel size at the sample (of the objective the run starts with).
    channel_group : str
        The config group holding channel presets.
    clock : callable, optional
        The Scheduler's clock (seconds; the time base of ``min_start_time`` and
        of `Frame.t_clock`).
    objectives : dict[str, Objective]
        The presets of the objective config group (``"Objective"`` in the demo
        configs: ``10X``, ``20X``, ``40X``) with the device properties that
        select each and its calibrated pixel size; empty without such a group.
        An added event that carries an objective's properties is imaged with
        it; the Scheduler puts the run's objective back afterwards.
    """

    fov_um: tuple[float, float] = (512.0, 512.0)
    pixel_size_um: float = 1.0
    channel_group: str = "Channel"
    clock: Callable[[], float] | None = None
    objectives: Mapping[str, Objective] = field(default_factory=dict)

    def objective(self, name: str) -> Objective:
        """The objective preset `name`.

        Raises
        ------
        KeyError
            If the config has no such preset (the message lists those it has).
        """
        try:
            return self.objectives[name]
        except KeyError:
            have = ", ".join(self.objectives) or "none"
            raise KeyError(f"no objective preset {name!r} (presets: {have})") from None

    @property
    def sensor_px(self) -> tuple[int, int]:
        """Camera ``(width, height)`` in pixels."""
        return (
            round(self.fov_um[0] / self.pixel_size_um),
            round(self.fov_um[1] / self.pixel_size_um),
        )

    def now(self) -> float:
        """The Scheduler's clock now (0.0 without one)."""
        return float(self.clock()) if self.clock is not None else 0.0


@runtime_checkable
class PPolicy(Protocol):
    """Detections in, actions out.

    ``on_detections`` runs on the inference worker thread, once per analysed
    frame, in acquisition order. It must be quick and must not block.
    """

    name: str

    def on_detections(
        self, frame: Frame, detections: Detections, context: PolicyContext
    ) -> Sequence[Action]:
        """Return the actions this frame calls for (may be empty)."""
        ...

    def has_pending_work(self) -> bool:
        """True while the policy will still add work without a new frame."""
        ...


class ObjectFilter(BaseModel):
    """Which detected objects count: size, intensity, score and border limits."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    min_area_px: float = Field(0.0, ge=0)
    max_area_px: float = Field(math.inf, gt=0)
    min_intensity: float = -math.inf
    max_intensity: float = math.inf
    min_score: float = 0.0
    exclude_border: bool = Field(
        True,
        description="Ignore objects touching the image edge (seen whole in an "
        "overlapping tile).",
    )

    def mask(self, detections: Detections) -> np.ndarray:
        """Boolean mask of the objects that pass."""
        o = detections.objects
        keep = (
            (o["area_px"] >= self.min_area_px)
            & (o["area_px"] <= self.max_area_px)
            & (o["mean_intensity"] >= self.min_intensity)
            & (o["mean_intensity"] <= self.max_intensity)
            & (o["score"] >= self.min_score)
        )
        if self.exclude_border:
            keep &= ~o["touches_border"].astype(bool)
        return keep


class _PolicyBase(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    survey_channel: str | None = Field(
        None,
        description="Only base-plan frames of this channel preset are analysed "
        "by the policy (None: every base-plan frame).",
    )

    def _is_survey(self, frame: Frame) -> bool:
        return frame.kind == "base" and (
            self.survey_channel is None or frame.channel == self.survey_channel
        )

    def has_pending_work(self) -> bool:
        return False


class FindAndCenter(_PolicyBase):
    """Survey tiles; image every new object centered, with its own settings.

    For every object passing `filter` in a survey frame, schedules a targeted
    acquisition with the stage moved so the object's centroid is at the image
    center, in `channel` at `exposure_ms`, optionally as a Z-stack around the
    survey focus (`z_plan`, a useq ``ZRangeAround``). Objects already targeted
    within `match_radius_um` (stage µm) — e.g. seen again in an overlapping tile —
    are not targeted again. A tile's targets are visited in nearest-neighbour
    order starting from the tile's position.
    """

    name: Literal["find_and_center"] = "find_and_center"
    channel: str | None = Field(
        None, description="Channel preset for targets (None: the survey channel)."
    )
    exposure_ms: float | None = Field(None, gt=0)
    z_plan: ZRangeAround | None = None
    filter: ObjectFilter = ObjectFilter()
    match_radius_um: float = Field(5.0, gt=0)
    max_targets: int | None = Field(None, ge=1)
    priority: int = 10

    _targeted: list[tuple[float, float]] = PrivateAttr(default_factory=list)

    @property
    def n_targets(self) -> int:
        """Objects targeted so far."""
        return len(self._targeted)

    def on_detections(
        self, frame: Frame, detections: Detections, context: PolicyContext
    ) -> list[Action]:
        if not self._is_survey(frame) or len(detections) == 0:
            return []
        sel = detections.select(self.filter.mask(detections))
        points = np.column_stack([sel["stage_x_um"], sel["stage_y_um"]])
        new: list[int] = []
        for i, point in enumerate(points):  # few objects per tile; O(n·m) is fine
            known = self._targeted + [tuple(points[j]) for j in new]
            if known:
                d = np.hypot(*(np.asarray(known) - point).T)
                if d.min() < self.match_radius_um:
                    continue
            new.append(i)
        if self.max_targets is not None:
            new = new[: max(0, self.max_targets - len(self._targeted))]
        if not new:
            return []
        order = _nearest_neighbour_order(points[new], frame.stage_xy_um)
        chosen = [new[k] for k in order]
        self._targeted.extend(tuple(points[i]) for i in chosen)

        z0 = frame.stage_z_um
        offsets = list(self.z_plan.positions()) if self.z_plan else [0.0]
        channel = self.channel or frame.channel
        events: list[MDAEvent] = []
        first = len(self._targeted) - len(chosen)
        for n, i in enumerate(chosen):
            key = f"target_{first + n:04d}"
            obj = {
                "label": int(sel["label"][i]),
                "x_px": float(sel["x_px"][i]),
                "y_px": float(sel["y_px"][i]),
                "area_px": float(sel["area_px"][i]),
                "mean_intensity": float(sel["mean_intensity"][i]),
            }
            for k, dz in enumerate(offsets):
                events.append(
                    MDAEvent(
                        x_pos=float(points[i][0]),
                        y_pos=float(points[i][1]),
                        z_pos=None if z0 is None else float(z0 + dz),
                        channel=(
                            {"config": channel, "group": context.channel_group}
                            if channel
                            else None
                        ),
                        exposure=self.exposure_ms or frame.exposure_ms,
                        pos_name=key,
                        index={"t": 0, "c": 0, "z": k},
                        metadata={
                            "smartscope": {
                                "kind": "target",
                                "z": k,
                                "shape": {"c": 1, "z": len(offsets), "order": "cz"},
                                "object": obj,
                            }
                        },
                    )
                )
        reason = f"{len(chosen)} new object(s) in {frame.position}"
        return [AddEvents(tuple(events), priority=self.priority, reason=reason)]


class SkipEmpty(_PolicyBase):
    """When a survey frame finds fewer than `min_objects`, drop that position.

    Every event still planned for the frame's position (later timepoints,
    channels, Z planes, queued targets) is dropped. With ``scope: well`` (plate
    plans, positions ``<well>_<field>``), an empty field of a well none of
    whose fields so far showed objects drops the whole well (`SkipWell`): an
    empty well costs one field.
    """

    name: Literal["skip_empty"] = "skip_empty"
    min_objects: int = Field(1, ge=1)
    filter: ObjectFilter = ObjectFilter(exclude_border=False)
    scope: Literal["position", "well"] = "position"

    _occupied: set[str] = PrivateAttr(default_factory=set)

    def on_detections(
        self, frame: Frame, detections: Detections, context: PolicyContext
    ) -> list[Action]:
        if not self._is_survey(frame):
            return []
        n = int(self.filter.mask(detections).sum()) if len(detections) else 0
        well = str(frame.position).split("_", 1)[0]
        if n >= self.min_objects:
            self._occupied.add(well)
            return []
        if self.scope == "well" and well not in self._occupied:
            return [SkipWell(well, reason=f"empty well: {n} object(s) found")]
        return [SkipPosition(frame.position, reason=f"{n} object(s) found")]


def _nearest_neighbour_order(points: np.ndarray, start: Sequence[float]) -> list[int]:
    """Greedy nearest-neighbour tour over `points` from `start`."""
    remaining = list(range(len(points)))
    here = np.asarray(start, dtype=float)
    order: list[int] = []
    while remaining:
        d = np.hypot(*(points[remaining] - here).T)
        k = remaining.pop(int(np.argmin(d)))
        order.append(k)
        here = points[k]
    return order


_BUILTINS: dict[str, type[BaseModel]] = {
    "find_and_center": FindAndCenter,
    "skip_empty": SkipEmpty,
}


def available_policies() -> list[str]:
    """Names accepted by `create_policy`."""
    names = set(_BUILTINS)
    names.update(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))
    return sorted(names)


def policy_class(name: str) -> Any:
    """The class registered as policy `name` (built-in or entry point)."""
    if name in _BUILTINS:
        return _BUILTINS[name]
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            return ep.load()
    raise RegistryError(
        f"unknown policy {name!r} (available: {', '.join(available_policies())})"
    )


def create_policy(name: str, params: dict[str, Any] | None = None) -> PPolicy:
    """Build policy `name` with keyword `params` (validated by the policy)."""
    policy = policy_class(name)(**(params or {}))
    if not isinstance(policy, PPolicy):
        raise RegistryError(f"policy {name!r} does not implement PPolicy")
    return policy
