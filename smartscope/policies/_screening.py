"""Screening policies for plate runs: well quotas, hit wells, per-well autofocus.

They work on a base plan over a `useq.WellPlatePlan`, whose positions are named
``<well>_<field>`` (``"B3_0004"``): the *well* of a base frame is the part of its
position key before the first ``"_"`` (on other plans that is the position's
name, e.g. the grid tiles ``field_g000``, ``field_g001`` form the "well"
``field``). Stage positions are µm; Z is the focus position in µm.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import Field, PrivateAttr, model_validator
from useq import CameraROI, MDAEvent, ZRangeAround

from smartscope.frame import event_tag, well_of
from smartscope.policies._features import (
    Bounds,
    Criterion,
    field_medians,
    matches,
    nearest_neighbour_order,
    object_features,
    object_sharpness,
)
from smartscope.policies._protocol import ObjectFilter, PolicyBase, PolicyContext
from smartscope.scheduler import URGENT_PRIORITY, Action, AddEvents, SetFocus, SkipWell

if TYPE_CHECKING:
    from smartscope.detections import Detections
    from smartscope.frame import Frame

__all__ = ["HitDetection", "ObjectAutofocus", "WellQuota"]


def _centered_roi(
    context: PolicyContext, field_um: float | None, pixel_size_um: float | None = None
) -> CameraROI | None:
    """A camera ROI of `field_um` (µm) at the sensor center (None: full frame).

    `pixel_size_um` is that of the objective the ROI is for (default: the run's).
    """
    if field_um is None:
        return None
    width, height = context.sensor_px
    side = max(8, round(field_um / (pixel_size_um or context.pixel_size_um)))
    w, h = min(side, width), min(side, height)
    return CameraROI(
        offset_x=(width - w) // 2, offset_y=(height - h) // 2, width=w, height=h
    )


# -------------------------------------------------------------------- well quota
class WellQuota(PolicyBase):
    """Stop imaging a well once it has given enough cells or fields.

    On every base-plan frame the objects passing `filter` are counted for the
    frame's well. When the well's count reaches `max_cells`, or its number of
    imaged fields reaches `max_fields` (whichever comes first), the well's
    remaining fields are dropped (`SkipWell`). A field is counted once, at its
    first analysed frame (set `survey_channel` on a multi-channel plan: the
    other channels of the field that stops the well are dropped with it).
    """

    name: Literal["well_quota"] = "well_quota"
    max_cells: int | None = Field(None, ge=1, description="Cells per well, at most.")
    max_fields: int | None = Field(
        None, ge=1, description="Fields imaged per well, at most."
    )
    filter: ObjectFilter = Field(
        default_factory=lambda: ObjectFilter(exclude_border=False),
        description="Objects that count as cells.",
    )

    _wells: dict[str, dict[str, Any]] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> WellQuota:
        if self.max_cells is None and self.max_fields is None:
            raise ValueError("set `max_cells`, `max_fields` or both")
        return self

    def well(self, well: str) -> dict[str, Any] | None:
        """Counts of a well (None before its first field).

        ``fields`` (positions imaged), ``field_cells`` (cells of each),
        ``cells`` in all, ``stopped`` (why, or None).
        """
        return self._wells.get(well)

    def on_detections(
        self, frame: Frame, detections: Detections, context: PolicyContext
    ) -> list[Action]:
        if not self._is_survey(frame):
            return []
        well = well_of(frame.position)
        st = self._wells.setdefault(
            well,
            {
                "fields": [],
                "field_cells": [],
                "cells": 0,
                "stopped": None,
                "fields_after_stop": 0,
            },
        )
        if frame.position in st["fields"]:
            return []  # another channel (or visit) of a field already counted
        if st["stopped"] is not None:  # imaged before the skip took effect
            st["fields_after_stop"] += 1
            return []
        n = int(self.filter.mask(detections).sum()) if len(detections) else 0
        st["fields"].append(frame.position)
        st["field_cells"].append(n)
        st["cells"] += n
        n_fields, n_cells = len(st["fields"]), st["cells"]
        if self.max_cells is not None and n_cells >= self.max_cells:
            why = f"cell quota: {n_cells} cells in {n_fields} field(s)"
        elif self.max_fields is not None and n_fields >= self.max_fields:
            why = f"field quota: {n_fields} field(s), {n_cells} cells"
        else:
            return []
        st["stopped"] = why
        return [SkipWell(well, reason=why)]

    def report(self) -> dict[str, Any]:
        """Per well: fields imaged, cells counted, and why imaging it stopped."""
        return {
            "max_cells": self.max_cells,
            "max_fields": self.max_fields,
            "n_wells_stopped": sum(
                st["stopped"] is not None for st in self._wells.values()
            ),
            "wells": {
                well: {
                    "fields": len(st["fields"]),
                    "cells": st["cells"],
                    "stopped": st["stopped"] or "plan exhausted",
                    "fields_after_stop": st["fields_after_stop"],
                }
                for well, st in self._wells.items()
            },
        }


# ------------------------------------------------------------------ hit detection
@dataclass
class _Candidate:
    xy: tuple[float, float]
    z: float | None
    position: str
    obj: dict[str, float]


@dataclass
class _HitWell:
    fields: list[str] = field(default_factory=list)
    objects: int = 0
    candidates: int = 0
    hit_at: str | None = None  # position whose frame made the well a hit
    pending: list[_Candidate] = field(default_factory=list)
    targeted: list[tuple[float, float]] = field(default_factory=list)

    @property
    def fraction(self) -> float:
        return self.candidates / self.objects if self.objects else 0.0


#: A hit cell by default: 40 % larger and 50 % brighter than the plate's cells.
_HIT_CRITERION: Criterion = {
    "relative_area": Bounds(min=1.4),
    "relative_intensity": Bounds(min=1.5),
}


class HitDetection(PolicyBase):
    """Find hit wells from their cells' phenotype; image the hit cells up close.

    On every base-plan frame, objects passing `filter` whose `object_features`
    pass `criterion` (bounds on features; a list: any of them) are the field's
    hit *candidates*. Relative features (``relative_area``,
    ``relative_intensity``) are taken to `reference`: ``"plate"`` (default) the
    median over the fields analysed so far in the run (this one included) of
    each field's median object — so one field full of debris counts once;
    in a hit well most cells may show the phenotype, so the field's own median
    (``"field"``) would hide it; or fixed medians ``{"area_px": ...,
    "mean_intensity": ...}`` (e.g. of control wells). With ``"plate"`` the
    first fields of the run set the reference: start the plan in a normal well.

    A well is a HIT once, over its analysed fields, it has at least `min_cells`
    candidates and they are at least `min_fraction` of its objects. Then its
    candidates so far — and afterwards each new field's candidates — are
    imaged, up to `max_targets_per_well` per well: the stage centered on the
    cell, a `field_um` camera ROI around it, optionally through another
    `objective` (a preset of the objective group, e.g. ``40X``: the ROI keeps
    its size in µm, at that objective's pixel size; the Scheduler switches the
    run's objective back for the next event without one), in `channel` at
    `exposure_ms`, as a Z-stack `z_plan` around the Z of the field where the
    cell was seen. One `AddEvents` per decision, cells in nearest-neighbour
    order; positions ``hit_<well>_<nnn>``, kind ``"hit"``.
    """

    name: Literal["hit_detection"] = "hit_detection"
    criterion: Criterion | list[Criterion] = Field(
        default_factory=lambda: _HIT_CRITERION.copy(),
        description="Bounds on object features of a hit cell (a list: any one).",
    )
    reference: Literal["plate", "field"] | dict[str, float] = "plate"
    filter: ObjectFilter = Field(
        default_factory=ObjectFilter,
        description="Objects that count (default: not touching the image edge, "
        "so that each is measured whole).",
    )
    min_cells: int = Field(3, ge=1)
    min_fraction: float = Field(0.1, ge=0, le=1)
    max_targets_per_well: int = Field(20, ge=0)
    field_um: float | None = Field(
        64.0, gt=0, description="Side of the ROI around a hit cell (None: full)."
    )
    objective: str | None = Field(
        None,
        description="Objective preset to image hit cells with (e.g. 40X; None: "
        "the run's).",
    )
    channel: str | None = None
    exposure_ms: float | None = Field(None, gt=0)
    z_plan: ZRangeAround | None = None
    match_radius_um: float = Field(
        5.0, gt=0, description="A cell within this of a target is not targeted."
    )
    priority: int = 10

    _wells: dict[str, _HitWell] = PrivateAttr(default_factory=dict)
    _ref_area: list[float] = PrivateAttr(default_factory=list)
    _ref_intensity: list[float] = PrivateAttr(default_factory=list)

    @property
    def hits(self) -> list[str]:
        """Wells found to be hits, in the order they were found."""
        wells = [(w.hit_at, name) for name, w in self._wells.items() if w.hit_at]
        return [name for _, name in wells]

    def targets(self, well: str | None = None) -> list[tuple[float, float]]:
        """Stage µm of the cells targeted (in one well, or all)."""
        if well is not None:
            return list(self._wells[well].targeted) if well in self._wells else []
        return [xy for w in self._wells.values() for xy in w.targeted]

    def _medians(self, det: Detections, keep: np.ndarray) -> dict[str, float]:
        if isinstance(self.reference, dict):
            return {
                "area_px": float(self.reference.get("area_px", 1.0)),
                "mean_intensity": float(self.reference.get("mean_intensity", 1.0)),
            }
        if self.reference == "field":
            return field_medians(det)
        o = det.objects
        if keep.any():  # one vote per field: a field full of debris is one field
            self._ref_area.append(float(np.median(o["area_px"][keep])))
            self._ref_intensity.append(float(np.median(o["mean_intensity"][keep])))
        if not self._ref_area:
            return {"area_px": 1.0, "mean_intensity": 1.0}
        return {
            "area_px": float(np.median(self._ref_area)),
            "mean_intensity": float(np.median(self._ref_intensity)),
        }

    def on_detections(
        self, frame: Frame, detections: Detections, context: PolicyContext
    ) -> list[Action]:
        if not self._is_survey(frame):
            return []
        well = well_of(frame.position)
        st = self._wells.setdefault(well, _HitWell())
        if frame.position in st.fields:
            return []  # another channel (or visit) of a field already analysed
        st.fields.append(frame.position)
        n = len(detections)
        keep = self.filter.mask(detections) if n else np.zeros(0, bool)
        medians = self._medians(detections, keep) if n else {}
        if not keep.any():
            return []
        feats = object_features(detections, reference=medians)
        cand = keep & matches(self.criterion, feats, n)
        st.objects += int(keep.sum())
        st.candidates += int(cand.sum())
        pts = detections.centroids_um
        for i in np.flatnonzero(cand):
            st.pending.append(
                _Candidate(
                    (float(pts[i, 0]), float(pts[i, 1])),
                    frame.stage_z_um,
                    frame.position,
                    {
                        "label": int(detections.objects["label"][i]),
                        "area_px": float(detections.objects["area_px"][i]),
                        "mean_intensity": float(
                            detections.objects["mean_intensity"][i]
                        ),
                        "relative_area": round(float(feats["relative_area"][i]), 3),
                        "relative_intensity": round(
                            float(feats["relative_intensity"][i]), 3
                        ),
                    },
                )
            )
        reason = ""
        if st.hit_at is None:
            if st.candidates >= self.min_cells and st.fraction >= self.min_fraction:
                st.hit_at = frame.position
                reason = (
                    f"{well} is a hit: {st.candidates} of {st.objects} cells "
                    f"({st.fraction:.0%}) show the phenotype"
                )
            else:
                return []
        else:
            reason = f"{int(cand.sum())} more hit cell(s) in {frame.position}"
        return self._target(well, st, frame, context, reason)

    def _target(
        self,
        well: str,
        st: _HitWell,
        frame: Frame,
        context: PolicyContext,
        reason: str,
    ) -> list[Action]:
        chosen: list[_Candidate] = []
        for c in st.pending:
            if len(st.targeted) + len(chosen) >= self.max_targets_per_well:
                break
            known = st.targeted + [k.xy for k in chosen]
            if known and np.hypot(*(np.asarray(known) - c.xy).T).min() < (
                self.match_radius_um
            ):
                continue
            chosen.append(c)
        st.pending = []
        if not chosen:
            return []
        pts = np.asarray([c.xy for c in chosen])
        chosen = [chosen[k] for k in nearest_neighbour_order(pts, frame.stage_xy_um)]
        offsets = list(self.z_plan.positions()) if self.z_plan else [0.0]
        objective = context.objective(self.objective) if self.objective else None
        roi = _centered_roi(
            context, self.field_um, objective.pixel_size_um if objective else None
        )
        channel = (
            {"config": self.channel, "group": context.channel_group}
            if self.channel
            else None
        )
        events: list[MDAEvent] = []
        for c in chosen:
            key = f"hit_{well}_{len(st.targeted):03d}"
            st.targeted.append(c.xy)
            for k, dz in enumerate(offsets):
                events.append(
                    MDAEvent(
                        x_pos=c.xy[0],
                        y_pos=c.xy[1],
                        z_pos=None if c.z is None else float(c.z + dz),
                        channel=channel,
                        exposure=self.exposure_ms,
                        roi=roi,
                        properties=list(objective.properties) if objective else None,
                        pos_name=key,
                        index={"t": 0, "c": 0, "z": k},
                        metadata={
                            "smartscope": {
                                "kind": "hit",
                                "z": k,
                                "shape": {"c": 1, "z": len(offsets), "order": "cz"},
                                "well": well,
                                "field": c.position,
                                "object": c.obj,
                            }
                        },
                    )
                )
        return [AddEvents(tuple(events), priority=self.priority, reason=reason)]

    def report(self) -> dict[str, Any]:
        """Per well: fields, objects, candidates, their fraction, hit, targets."""
        return {
            "hits": self.hits,
            "wells": {
                well: {
                    "fields": len(st.fields),
                    "objects": st.objects,
                    "candidates": st.candidates,
                    "fraction": round(st.fraction, 4),
                    "hit": st.hit_at is not None,
                    "hit_at": st.hit_at,
                    "targets": len(st.targeted),
                }
                for well, st in self._wells.items()
            },
        }


# --------------------------------------------------------------- object autofocus
@dataclass
class _Search:
    well: str
    position: str  # the field searched
    xy: tuple[float, float]
    z0: float
    started: float  # scheduler clock
    planes: list[float] = field(default_factory=list)  # z of each plane
    sharpness: dict[int, float] = field(default_factory=dict)  # plane -> value
    n_objects: dict[int, int] = field(default_factory=dict)
    rounds: int = 0  # rounds of planes scheduled (the first + extensions)
    z_best: float | None = None
    result: str | None = None  # None while running

    def complete(self) -> bool:
        return len(self.sharpness) == len(self.planes)


class ObjectAutofocus(PolicyBase):
    """Focus each well on its cells: a Z search at its first field, then `SetFocus`.

    At the first base-plan frame of a well with at least `min_objects` objects
    (passing `filter`), a Z search is scheduled at that field: planes
    `z_step_um` apart over `z_range_um` centered on the field's Z, ahead of
    everything else (`priority`), optionally in a `field_um` camera ROI, another
    `channel` or `exposure_ms` (set ``analysis.analyze: all``: the planes must be
    analysed). Each plane's sharpness is the gradient energy inside its
    segmented objects normalised by their brightness (`object_sharpness`;
    without an image in ``detections.extra["image"]``, the objects' mean
    intensity). When every plane is in, the sharpest plane is refined with a
    parabola through it and its neighbours; when it lies at an end of the
    searched range, up to `max_extensions` further rounds of as many planes
    continue beyond that end. The well's later base fields are then imaged at
    the best Z (`SetFocus`); fields served before keep their Z. With
    `follow_plate` the wells not focused yet are imaged at that Z too
    (``SetFocus("*")``), so a well's first field, and the center of its
    search, follow the plate's drift from well to well (serve neighbouring
    wells one after the other: a serpentine or nearest travel order). A search
    in which no plane shows objects is retried at the well's next field (once).

    Search frames are stored as position ``af_<well>`` (one visit per round),
    kind ``"autofocus"``.
    """

    name: Literal["object_autofocus"] = "object_autofocus"
    z_range_um: float = Field(12.0, gt=0, description="Span of the search (µm).")
    z_step_um: float = Field(1.5, gt=0, description="Plane spacing (µm).")
    max_extensions: int = Field(2, ge=0)
    field_um: float | None = Field(
        None, gt=0, description="Side of a centered camera ROI (None: full frame)."
    )
    channel: str | None = None
    exposure_ms: float | None = Field(None, gt=0)
    filter: ObjectFilter = Field(
        default_factory=lambda: ObjectFilter(exclude_border=False)
    )
    min_objects: int = Field(1, ge=1)
    max_searches: int = Field(2, ge=1, description="Searches per well, at most.")
    stale_s: float = Field(
        30.0,
        gt=0,
        description="A search whose planes have not all come back after this long "
        "(s of run; refused or skipped) is given up.",
    )
    follow_plate: bool = Field(
        True,
        description="Image the fields of wells not focused yet (and center their "
        "search) at the focus last found: a plate's focus drifts little from one "
        "well to its neighbour.",
    )
    priority: int = Field(
        URGENT_PRIORITY,
        description="Of the search planes; at 100 or more they go ahead of the "
        "well's next fields however long those waited (max_delay_s), so the "
        "fields are imaged at the focus found, even on a busy machine.",
    )

    _searches: dict[str, list[_Search]] = PrivateAttr(default_factory=dict)
    _clock: Callable[[], float] | None = PrivateAttr(None)

    def focus(self, well: str) -> float | None:
        """The focus (µm) found for a well, None if none (yet)."""
        for s in reversed(self._searches.get(well, [])):
            if s.z_best is not None:
                return s.z_best
        return None

    def has_pending_work(self) -> bool:
        now = self._clock() if self._clock is not None else None
        running = False
        for s in self._active():
            if now is not None and now - s.started > self.stale_s:
                s.result = "given up: its planes were not all acquired"
            else:
                running = True
        return running

    def _active(self) -> list[_Search]:
        return [s for v in self._searches.values() for s in v if s.result is None]

    def needs(self, frame: Frame) -> bool:
        """Its survey frames and every plane of its Z searches."""
        return "af_well" in event_tag(frame.event) or self._is_survey(frame)

    def on_detections(
        self, frame: Frame, detections: Detections, context: PolicyContext
    ) -> list[Action]:
        self._clock = context.clock
        tag = event_tag(frame.event)
        if "af_well" in tag:
            return self._plane(frame, detections, tag, context)
        if not self._is_survey(frame):
            return []
        well = well_of(frame.position)
        searches = self._searches.get(well, [])
        if searches and (
            searches[-1].result is None
            or searches[-1].z_best is not None
            or len(searches) >= self.max_searches
        ):
            return []
        n = int(self.filter.mask(detections).sum()) if len(detections) else 0
        if n < self.min_objects:
            return []
        z0 = frame.stage_z_um if frame.stage_z_um is not None else 0.0
        half = self.z_range_um / 2
        k = math.floor(half / self.z_step_um + 1e-9)
        planes = [z0 + j * self.z_step_um for j in range(-k, k + 1)]
        t = frame.t_clock if frame.t_clock is not None else context.now()
        search = _Search(well, frame.position, frame.stage_xy_um, z0, t)
        self._searches.setdefault(well, []).append(search)
        return self._schedule(
            search,
            planes,
            context,
            f"Z search for {well} at {frame.position}: {len(planes)} planes "
            f"{planes[0]:.1f}..{planes[-1]:.1f} µm",
        )

    def _schedule(
        self, s: _Search, planes: list[float], context: PolicyContext, reason: str
    ) -> list[Action]:
        roi = _centered_roi(context, self.field_um)
        channel = (
            {"config": self.channel, "group": context.channel_group}
            if self.channel
            else None
        )
        n_searches = len(self._searches[s.well])
        events = []
        for j, z in enumerate(planes):
            events.append(
                MDAEvent(
                    x_pos=s.xy[0],
                    y_pos=s.xy[1],
                    z_pos=float(z),
                    channel=channel,
                    exposure=self.exposure_ms,
                    roi=roi,
                    pos_name=f"af_{s.well}",
                    index={"t": s.rounds, "c": 0, "z": j},
                    metadata={
                        "smartscope": {
                            "kind": "autofocus",
                            "visit": (n_searches - 1) * (self.max_extensions + 1)
                            + s.rounds,
                            "z": j,
                            "shape": {"c": 1, "z": len(planes), "order": "cz"},
                            "af_well": s.well,
                            "af_search": n_searches - 1,
                            "af_plane": len(s.planes) + j,
                        }
                    },
                )
            )
        s.planes.extend(planes)
        s.rounds += 1
        return [AddEvents(tuple(events), priority=self.priority, reason=reason)]

    def _plane(
        self,
        frame: Frame,
        det: Detections,
        tag: dict[str, Any],
        context: PolicyContext,
    ) -> list[Action]:
        searches = self._searches.get(str(tag["af_well"]), [])
        k = int(tag.get("af_search", -1))
        if not 0 <= k < len(searches) or searches[k].result is not None:
            return []
        s = searches[k]
        plane = int(tag["af_plane"])
        keep = self.filter.mask(det) if len(det) else np.zeros(0, bool)
        image = det.extra.get("image")
        if not keep.any():
            value, n = math.nan, 0
        elif image is not None:
            value, n = object_sharpness(image, det.labels, det.objects["label"][keep])
        else:
            value = float(np.mean(det.objects["mean_intensity"][keep]))
            n = int(keep.sum())
        s.sharpness[plane] = value
        s.n_objects[plane] = n
        if not s.complete():
            return []
        return self._decide(s, context)

    def _decide(self, s: _Search, context: PolicyContext) -> list[Action]:
        order = np.argsort(s.planes)
        zs = np.asarray(s.planes)[order]
        values = np.asarray([s.sharpness[int(i)] for i in order])
        if not np.isfinite(values).any():
            s.result = "no objects in any plane"
            return []
        i = int(np.nanargmax(values))
        step = self.z_step_um
        at_edge = i in (0, len(zs) - 1)
        if at_edge and s.rounds <= self.max_extensions:
            n = len(zs) // (s.rounds or 1)
            sign = -1 if i == 0 else 1
            edge = zs[i]
            planes = [edge + sign * step * j for j in range(1, n + 1)]
            return self._schedule(
                s,
                planes,
                context,
                f"Z search for {s.well}: sharpest at the end of the range "
                f"({edge:.1f} µm), searching further",
            )
        z = float(zs[i])
        if 0 < i < len(zs) - 1 and np.isfinite(values[i - 1 : i + 2]).all():
            a, b, c = values[i - 1 : i + 2]
            denom = a - 2 * b + c
            if denom < 0:
                z += float(np.clip(0.5 * (a - c) / denom, -0.5, 0.5)) * step
        s.z_best = z
        s.result = "focused"
        why = (
            f"sharpest objects at {z:.2f} µm (searched {zs[0]:.1f}..{zs[-1]:.1f} µm "
            f"at {s.position})"
        )
        actions: list[Action] = [SetFocus(s.well, z, reason=why)]
        if self.follow_plate:
            actions.append(
                SetFocus("*", z, reason=f"wells not focused yet start at {s.well}'s")
            )
        return actions

    def report(self) -> dict[str, Any]:
        """Per well: planes searched, sharpness curve, chosen Z and the outcome."""
        wells: dict[str, Any] = {}
        for well, searches in self._searches.items():
            runs = []
            for s in searches:
                order = np.argsort(s.planes)
                runs.append(
                    {
                        "field": s.position,
                        "start_z_um": round(s.z0, 3),
                        "planes_z_um": [round(s.planes[i], 3) for i in order],
                        "sharpness": [
                            None
                            if not math.isfinite(s.sharpness.get(int(i), math.nan))
                            else round(s.sharpness[int(i)], 6)
                            for i in order
                        ],
                        "n_objects": [s.n_objects.get(int(i), 0) for i in order],
                        "z_um": None if s.z_best is None else round(s.z_best, 3),
                        "result": s.result or "running",
                    }
                )
            wells[well] = {"z_um": self.focus(well), "searches": runs}
        return {"wells": wells}
