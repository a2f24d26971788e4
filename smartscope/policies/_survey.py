"""Survey policies: find objects and image them centered; skip empty fields."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import Field, PrivateAttr
from useq import MDAEvent, ZRangeAround

from smartscope.frame import well_of
from smartscope.policies._features import nearest_neighbour_order
from smartscope.policies._protocol import ObjectFilter, PolicyBase, PolicyContext
from smartscope.scheduler import Action, AddEvents, SkipPosition, SkipWell

if TYPE_CHECKING:
    from smartscope.detections import Detections
    from smartscope.frame import Frame

__all__ = ["FindAndCenter", "SkipEmpty"]


class FindAndCenter(PolicyBase):
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
        order = nearest_neighbour_order(points[new], frame.stage_xy_um)
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


class SkipEmpty(PolicyBase):
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
        well = well_of(frame.position)
        if n >= self.min_objects:
            self._occupied.add(well)
            return []
        if self.scope == "well" and well not in self._occupied:
            return [SkipWell(well, reason=f"empty well: {n} object(s) found")]
        return [SkipPosition(frame.position, reason=f"{n} object(s) found")]
