"""Live-cell policies: event-triggered bursts, adaptive intervals, cell following.

They work on a time-lapse base plan (``t`` the outer axis of the experiment's
sequence), whose positions the Scheduler keeps on their own clocks. Times are
seconds of the run (the Scheduler's clock); positions are stage µm.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import Field, PrivateAttr, model_validator
from useq import CameraROI, MDAEvent, ZRangeAround

from smartscope.policies._features import (
    Bounds,
    Criterion,
    field_medians,
    matches,
    nearest,
    object_features,
)
from smartscope.policies._protocol import ObjectFilter, PolicyBase, PolicyContext
from smartscope.scheduler import (
    Action,
    AddEvents,
    ExtendStream,
    MovePosition,
    SetInterval,
    StopStream,
    Stream,
)

if TYPE_CHECKING:
    from smartscope.detections import Detections
    from smartscope.frame import Frame

__all__ = ["AdaptiveInterval", "EventBurst", "TrackAndFollow"]


# ------------------------------------------------------------------ event burst
@dataclass
class _Burst:
    id: int
    position: str  # base position whose frame triggered it (its dose budget)
    xy: tuple[float, float]  # stage µm of the followed cell
    z: float | None
    started: float  # scheduler clock
    due0: float  # due time of burst frame 0
    reference: dict[str, float]  # the trigger field's median intensity and area
    scheduled: int = -1  # last burst frame index scheduled
    analysed: int = -1  # last burst frame index analysed
    off: int = 0  # consecutive analysed frames without the signature
    frames_on: int = 0
    seen: int = 0  # burst frames analysed
    confirmed: int = 0  # ... in which the cell still passed `trigger`
    ended: str | None = None
    ended_at: float = math.inf
    progress_at: float = -math.inf  # scheduler clock of its last analysed frame
    gap: float = math.nan  # ... since the analysed frame before it
    first: float = math.nan  # the cell's relative intensity in its first frame
    peak: float = math.nan  # ... its highest in the burst
    last: float = math.nan  # ... in the last frame it was found in
    until: float = math.inf  # scheduler clock at which the burst ends at the latest
    extended: bool = False  # it got brighter: `max_duration_s` granted again
    strength: float = math.nan  # the cell's relative intensity in the trigger frame
    # the survey before the trigger frame: `intensity_change` in burst frames
    baseline: Detections | None = None

    @property
    def brightness(self) -> float:
        """The cell's relative intensity now: its last frame's, else the trigger's."""
        return self.last if math.isfinite(self.last) else self.strength


#: How a burst ends when its cell was not what it looked like: a false alarm,
#: or the longest burst without the signature going. Only these make the place
#: rest for `cooldown_s`; after any other ending (divided, signature gone, or
#: cut short: preempted by a brighter cell, frames not acquired) the place may
#: trigger again at its next survey frame.
_COOLING_ENDINGS = ("not confirmed", "longest burst")


#: A clocked burst's frames are served at least this many intervals apart
#: (`AddEvents.min_gap_s`): a frame taken late does not pull the next one
#: (already queued, and overdue too) straight after it.
BURST_PACE = 0.75

#: ... and, with the Scheduler's ``travel_order: nearest``, let nearer bursts'
#: frames go first while their own gap stays short of this many intervals
#: (`AddEvents.max_gap_s`); at capacity the burst nearest that limit goes
#: first. A division capture allows gaps of two intervals.
MAX_GAP = 2.0

#: The camera is full when the running bursts' latest frames (the gap before
#: each one's last analysed frame, two bursts at least) came this many
#: intervals apart on average: no new burst starts then (a cell may still take
#: a running burst's place, `preempt`), as one more would push the gaps past
#: `MAX_GAP`.
FULL_PACE = 1.6


#: What starts a burst by default: a bright round cell (rounding up before
#: division), a very bright one of any shape, or one that has become 1.4 times
#: as bright (against the field) since the position's last survey frame: the
#: signature arriving, seen one survey earlier than its full strength, and in
#: dim cells whose full signature stays below the other two. The last two see
#: condensing chromatin by its peak: in a bright elongated nucleus, and in a
#: large object (a nucleus the model joined to a neighbour, whose mean the
#: neighbour dilutes).
_BURST_TRIGGER: list[Criterion] = [
    {"relative_intensity": Bounds(min=1.5), "aspect": Bounds(min=0.75)},
    {"relative_intensity": Bounds(min=2.2)},
    {"relative_intensity": Bounds(min=1.1), "intensity_change": Bounds(min=1.4)},
    {"relative_intensity": Bounds(min=1.7), "relative_peak": Bounds(min=2.3)},
    {"relative_area": Bounds(min=1.8), "relative_peak": Bounds(min=2.4)},
]

#: What keeps a burst going by default: looser than `_BURST_TRIGGER` (a bright,
#: fairly round cell, or one still 1.3 times as bright as before its burst).
_BURST_SUSTAIN: list[Criterion] = [
    {"relative_intensity": Bounds(min=1.3), "aspect": Bounds(min=0.65)},
    {"intensity_change": Bounds(min=1.3)},
]


class EventBurst(PolicyBase):
    """When a cell shows an event's signature, image it fast, then go back.

    On every base-plan frame, objects are tested against `trigger`: bounds on
    `object_features`, or a list of such criteria of which any may match. By
    default that is the pre-division signature: a nucleus 1.5 times as bright
    as the frame's median and round, 2.2 times as bright whatever its shape,
    or at least 1.1 times as bright and 1.4 times as bright as it was
    (`intensity_change`: against the field, to the same cell in the
    position's previous base-plan frame). In burst frames `intensity_change`
    compares with the base-plan frame before the trigger, so a burst started
    by a rise goes on while the cell stays risen.
    Each new hit starts a *burst*: frames every `interval_s` centered on that
    cell (stage moved to it; with `field_um`, a camera ROI of that size, so only
    that part of the sample is lit), optionally in another `channel` /
    `exposure_ms` or as a Z-stack (`z_plan`). Burst frames are analysed too
    (set ``analysis.analyze: all``): the cell is tracked from frame to frame,
    and the burst goes on while it still passes `sustain` (the hysteresis:
    looser than `trigger`) or `trigger` itself; once it has failed both for
    `tail_frames` frames in a row (e.g. it has divided) or after
    `max_duration_s`, the burst ends and the position is back to its slow
    base rate. A burst is also a false alarm, and ends, when the cell passes
    `trigger` in none of its first `confirm_frames` frames (one noisy frame
    must not cost a long burst); after a false alarm or a burst that hit
    `max_duration_s`, the place does not trigger again for `cooldown_s`. At
    most `max_active` bursts run at once, and no new one starts while the
    running ones' latest frames came `FULL_PACE` (1.6) intervals after the
    frame before, on average (the camera is full; the report counts such
    candidates as ``held_back_camera_full``): the candidates of a survey frame go
    rising cells first (by relative intensity times their `intensity_change`
    where above 1), and with every slot taken a cell `preempt` times as bright
    as the dimmest followed one takes its burst's place. Frames are scheduled
    two ahead, so one dropped analysis does not break a burst. When the camera
    is busy (several bursts at once) and a frame is taken more than
    `interval_s` after its due time, the burst's later frames are due from
    that frame on: the burst goes at the pace the camera can give it instead
    of queueing overdue frames, and only a burst whose frames stop coming ends
    as stale. A burst's frames are also served at least 0.75 `interval_s`
    apart (`BURST_PACE`): a late frame does not pull the next one, overdue
    too, straight after it (two frames at once, then a gap twice as long).
    With the Scheduler's ``travel_order: nearest``, when several bursts'
    frames are due at once the nearest goes first while every burst's gap
    stays short of two intervals (`MAX_GAP`), else the one nearest that.

    The followed cell's brightness (mean intensity relative to the trigger
    field's median) is watched through the burst, so that light goes to cells
    that change:

    - A nucleus that divides gives way to two dimmer daughters: once it is
      below `division_drop` times its brightest in the burst it counts as
      divided, as if it had failed `sustain` (the daughters of a bright cell
      may still pass `sustain`), and the burst ends after `tail_frames`.
    - A cell that becomes `brightening` times as bright as in the burst's first
      frame shows the signature arriving (a bright cell that triggered early):
      at `max_duration_s` its burst goes on, once, for up to `max_duration_s`
      more.
    - A burst that reaches `max_duration_s` on a cell that never got brighter
      was following a cell that is bright by nature, not dividing: that cell
      (followed from survey frame to survey frame) triggers again only once it
      is `brightening` times as bright as it was then, or as in the survey
      frame before (its `intensity_change`).

    With ``stream: true`` the burst is a *streamed burst* instead: frames as
    fast as the camera runs (a `Stream`, hardware-sequenced in chunks of
    `chunk_frames`) rather than every `interval_s`. The last frame of each
    chunk is analysed (``analysis.sequence_frames: last``; with ``newest``,
    the newest frames as the model keeps up; the others are stored and counted
    as skipped); each analysed frame decides as above, and the stream is kept two
    chunks ahead of it (`ExtendStream`) or ended between chunks (`StopStream`).
    `interval_s` is then the longest gap its frames may have (the rate a
    division capture is scored at) and times a stream whose frames stopped
    coming. A Z-stack (`z_plan`) cannot be streamed.

    Burst frames are stored as their own positions (``burst_NNNN``) and count
    against the light-dose budget of the position that triggered them.
    """

    name: Literal["event_burst"] = "event_burst"
    trigger: Criterion | list[Criterion] = Field(
        default_factory=lambda: [c.copy() for c in _BURST_TRIGGER],
        description="Bounds on object features that start a burst (a list: any "
        "one of them).",
    )
    sustain: Criterion | list[Criterion] | None = Field(  # type: ignore[assignment]
        default_factory=lambda: [c.copy() for c in _BURST_SUSTAIN],
        description="Bounds that keep a burst going besides `trigger` itself (a "
        "list: any one of them; None: only the `trigger` bounds).",
    )
    filter: ObjectFilter = Field(
        default_factory=lambda: ObjectFilter(exclude_border=False),
        description="Objects that may trigger (border objects too: the burst is "
        "centered on the cell).",
    )
    interval_s: float = Field(1.0, gt=0, description="Interval of burst frames (s).")
    max_duration_s: float = Field(60.0, gt=0)
    tail_frames: int = Field(2, ge=0)
    cooldown_s: float = Field(
        60.0,
        ge=0,
        description="After a burst ends without seeing its signature go (a false "
        "alarm or the longest burst), the same place does not trigger again for "
        "this long (s).",
    )
    confirm_frames: int = Field(
        3,
        ge=0,
        description="A burst whose cell passes `trigger` in none of its first "
        "`confirm_frames` frames is a false alarm and ends (0: never).",
    )
    field_um: float | None = Field(
        128.0, gt=0, description="Side of the ROI around the cell (None: full frame)."
    )
    channel: str | None = None
    exposure_ms: float | None = Field(None, gt=0)
    z_plan: ZRangeAround | None = None
    match_radius_um: float = Field(12.0, gt=0)
    max_active: int = Field(8, ge=1, description="Bursts running at once, at most.")
    preempt: float | None = Field(
        1.3,
        gt=1,
        description="With `max_active` bursts running, a cell this many times as "
        "bright (relative intensity) as the dimmest followed cell is now (in its "
        "burst's last frame) takes that burst's place (None: never).",
    )
    division_drop: float | None = Field(
        0.7,
        gt=0,
        lt=1,
        description="The followed nucleus has divided once its intensity is below "
        "this fraction of its brightest in the burst (None: only `sustain` ends a "
        "burst).",
    )
    brightening: float | None = Field(
        1.5,
        gt=1,
        description="Intensity ratio that counts as the cell getting brighter: "
        "its burst goes on past `max_duration_s` (once), and a bright cell whose "
        "burst ran out triggers again only after brightening this much since "
        "then or since the survey frame before (None: neither).",
    )
    priority: int = 20
    stream: bool = Field(
        False,
        description="Stream the burst: frames as fast as the camera runs, in "
        "hardware-sequenced chunks, instead of every interval_s.",
    )
    chunk_frames: int = Field(
        20,
        ge=1,
        description="Frames per hardware sequence of a streamed burst: decisions "
        "take effect between chunks.",
    )

    _bursts: dict[int, _Burst] = PrivateAttr(default_factory=dict)
    _done: list[_Burst] = PrivateAttr(default_factory=list)
    # cells bright by nature: [x, y, relative intensity] when their burst ran out
    _bright: list[list[float]] = PrivateAttr(default_factory=list)
    _ids: int = PrivateAttr(0)
    _clock: Callable[[], float] | None = PrivateAttr(None)
    # each position's last survey detections (`intensity_change`, `area_change`)
    _surveyed: dict[str, Detections] = PrivateAttr(default_factory=dict)
    _held_back: int = PrivateAttr(0)  # triggers refused as the camera was full

    @property
    def active(self) -> list[_Burst]:
        """Bursts still running."""
        return list(self._bursts.values())

    @property
    def finished(self) -> list[_Burst]:
        """Bursts that ended."""
        return list(self._done)

    def has_pending_work(self) -> bool:
        self._end_stale()
        return bool(self._bursts)

    def report(self) -> dict:
        """Every burst: where, when (run s), frames, and why it ended."""
        bursts = sorted(self._done + list(self._bursts.values()), key=lambda b: b.id)
        reasons: dict[str, int] = {}
        for b in bursts:
            reasons[b.ended or "running"] = reasons.get(b.ended or "running", 0) + 1
        return {
            "n_bursts": len(bursts),
            "ended": reasons,
            "bright_cells": len(self._bright),
            "held_back_camera_full": self._held_back,
            "bursts": [
                {
                    "id": b.id,
                    "position": b.position,
                    "x_um": round(b.xy[0], 2),
                    "y_um": round(b.xy[1], 2),
                    "started_s": round(b.started, 3),
                    "frames": b.analysed + 1,
                    "extended": b.extended,
                    "ended": b.ended,
                }
                for b in bursts
            ],
        }

    def _end_stale(self, now: float | None = None) -> None:
        """End bursts whose next frame never came.

        Their frames were refused (light-dose budget), skipped or cancelled; such
        a burst must not keep the run alive.
        """
        if now is None:
            if self._clock is None:
                return
            now = self._clock()
        grace = 2 * self.interval_s + 1.0
        for burst in list(self._bursts.values()):
            last_due = burst.due0 + burst.scheduled * self.interval_s
            if self.stream:  # frames come at the camera's rate, not on a clock
                last_due = max(burst.started, burst.progress_at)
            if burst.analysed < burst.scheduled and now > last_due + grace:
                self._end(
                    burst, "its frames were not acquired (refused or skipped)", now
                )

    def _end(self, burst: _Burst, reason: str, now: float | None) -> None:
        burst.ended = reason
        burst.ended_at = now if now is not None else burst.started
        self._done.append(self._bursts.pop(burst.id))

    def on_detections(
        self, frame: Frame, detections: Detections, context: PolicyContext
    ) -> list[Action]:
        self._clock = context.clock
        self._end_stale(frame.t_clock)
        tag = frame.event.metadata.get("smartscope", {})
        if "burst_id" in tag:
            burst = self._bursts.get(int(tag["burst_id"]))
            if burst is None or int(tag.get("z", 0)) != self._focal_plane():
                return []  # a Z-stack burst is followed on its in-focus plane
            k = int(tag.get("burst_frame", tag.get("stream_frame", 0)))
            return self._continue(burst, k, frame, detections, context)
        if not self._is_survey(frame) or len(detections) == 0:
            return []
        return self._trigger(frame, detections, context)

    def _trigger(
        self, frame: Frame, det: Detections, context: PolicyContext
    ) -> list[Action]:
        previous = self._surveyed.get(frame.position)
        self._surveyed[frame.position] = det.table_only()
        feats = object_features(det, previous, match_um=self.match_radius_um)
        self._follow_bright(det.centroids_um, feats["relative_intensity"])
        hit = matches(self.trigger, feats, len(det)) & self.filter.mask(det)
        if not hit.any():
            return []
        pts = det.centroids_um[hit]
        rel = feats["relative_intensity"][hit]
        change = feats["intensity_change"][hit]
        # a cell getting brighter first, then the brightest: a rising cell is
        # nearer its division than a static bright one (it gets the last slot)
        rising = np.nan_to_num(change, nan=1.0, posinf=1.0)
        order = np.argsort(-(rel * np.maximum(rising, 1.0)), kind="stable")
        t_now = frame.t_clock if frame.t_clock is not None else context.now()
        camera_full = self._camera_full()
        actions: list[Action] = []
        for i in order:
            x, y = (float(v) for v in pts[i])
            # the memory first: a remembered cell that rose is forgotten even
            # while its place rests (cooling down), or the rise would be lost
            if self._bright_by_nature(x, y, rel[i], change[i]) or self._known(
                x, y, t_now
            ):
                continue
            full = len(self._bursts) >= self.max_active
            if not full and camera_full:
                full = True
                self._held_back += 1
            if full:
                # cells compared as bright as they are now: one that triggered
                # faintly and has brightened since (about to divide) is kept
                weakest = min(self._bursts.values(), key=lambda b: b.brightness)
                if self.preempt is None or rel[i] < self.preempt * weakest.brightness:
                    continue  # a brighter candidate may still come
                self._end(weakest, "preempted by a brighter cell", t_now)
                actions += self._stop_stream(weakest)
            self._ids += 1
            burst = _Burst(
                self._ids,
                frame.position,
                (x, y),
                frame.stage_z_um,
                started=t_now,
                due0=t_now + self.interval_s,
                reference=field_medians(det),
                until=t_now + self.max_duration_s,
                strength=float(rel[i]),
                baseline=previous,
            )
            self._bursts[burst.id] = burst
            actions += self._schedule(
                burst,
                context,
                upto=1,
                reason=f"signature at ({x:.1f}, {y:.1f}) µm in {frame.position}: "
                f"burst {burst.id} starts",
            )
        return actions

    def _camera_full(self) -> bool:
        """Whether the running bursts' latest gaps are `FULL_PACE` intervals or more."""
        if self.stream:  # a stream's frames come as fast as the camera runs
            return False
        gaps = [b.gap for b in self._bursts.values() if math.isfinite(b.gap)]
        return len(gaps) >= 2 and sum(gaps) / len(gaps) >= FULL_PACE * self.interval_s

    def _known(self, x: float, y: float, now: float) -> bool:
        """Whether this cell is imaged fast already, or cooling down."""
        cooling = [
            b
            for b in self._done[-50:]
            if (b.ended or "").startswith(_COOLING_ENDINGS)
            and now - b.ended_at < self.cooldown_s
        ]
        return any(
            math.hypot(x - b.xy[0], y - b.xy[1]) < self.match_radius_um
            for b in [*self._bursts.values(), *cooling]
        )

    def _follow_bright(self, points: np.ndarray, rel: np.ndarray) -> None:
        """Move each remembered bright cell to the same cell in a survey frame.

        That is the nearest object within `match_radius_um` unless it is far
        dimmer or brighter (a neighbour, or the cell getting brighter): then
        the cell stays where it was seen last.
        """
        if not self._bright or not len(points) or self.brightening is None:
            return
        cells = np.array([c[:2] for c in self._bright])
        j, d = nearest(cells, points)
        for cell, k, dist in zip(self._bright, j, d, strict=True):
            ratio = rel[k] / cell[2] if cell[2] > 0 else math.inf
            if dist <= self.match_radius_um and 1 / self.brightening < ratio < (
                self.brightening
            ):
                cell[0], cell[1] = (float(v) for v in points[k])

    def _bright_by_nature(self, x: float, y: float, rel: float, change: float) -> bool:
        """Whether (x, y) is a remembered bright cell that has not got brighter.

        Brighter: `brightening` times its relative intensity when it was
        remembered, or than in the survey frame before (`change`, its
        `intensity_change`; a cell that brightened slowly since is otherwise
        held back by the memory). One that has is forgotten (it may now be
        dividing).
        """
        if self.brightening is None:
            return False
        for cell in self._bright:
            if math.hypot(x - cell[0], y - cell[1]) < self.match_radius_um:
                if rel >= self.brightening * cell[2] or change >= self.brightening:
                    self._bright.remove(cell)
                    return False
                return True
        return False

    def _continue(
        self,
        burst: _Burst,
        k: int,
        frame: Frame,
        det: Detections,
        context: PolicyContext,
    ) -> list[Action]:
        t_frame = frame.t_clock if frame.t_clock is not None else math.inf
        if k == burst.analysed + 1 and burst.analysed >= 0:
            burst.gap = t_frame - burst.progress_at
        burst.analysed = max(burst.analysed, k)
        burst.progress_at = t_frame
        if burst.ended is not None:
            return []
        still = confirmed = divided = False
        if len(det):
            j, d = nearest(np.array([burst.xy]), det.centroids_um)
            if d[0] <= self.match_radius_um:
                burst.xy = tuple(float(v) for v in det.centroids_um[j[0]])  # type: ignore[assignment]
                feats = object_features(
                    det,
                    burst.baseline,
                    match_um=self.match_radius_um,
                    reference=burst.reference,
                )
                confirmed = bool(matches(self.trigger, feats, len(det))[j[0]])
                # a cell that still shows the signature that started the burst
                # keeps it going, whatever `sustain` says (a very bright
                # elongated nucleus fails the default `sustain`'s roundness);
                # without `sustain`, `trigger` alone (matched once)
                still = confirmed
                if not still and self.sustain:
                    still = bool(matches(self.sustain, feats, len(det))[j[0]])
                rel = float(feats["relative_intensity"][j[0]])
                if math.isnan(burst.first):
                    burst.first = rel
                burst.peak = rel if math.isnan(burst.peak) else max(burst.peak, rel)
                burst.last = rel
                divided = (
                    self.division_drop is not None
                    and rel < self.division_drop * burst.peak
                )
                still = still and not divided
        burst.seen += 1
        burst.confirmed += confirmed
        if burst.seen == self.confirm_frames and not burst.confirmed:
            self._end(burst, "not confirmed (false alarm)", frame.t_clock)
            return self._stop_stream(burst)
        if still:
            burst.off = 0
            burst.frames_on += 1
        else:
            burst.off += 1
        t_now = frame.t_clock if frame.t_clock is not None else context.now()
        reason = ""
        if burst.off > self.tail_frames:
            reason = "divided" if divided else "signature gone"
        elif t_now >= burst.until:
            if self._brighter(burst, burst.last) and not burst.extended:
                burst.extended = True
                burst.until = t_now + self.max_duration_s
            else:
                reason = f"longest burst ({self.max_duration_s:g} s) reached"
                if (
                    self.brightening is not None
                    and not burst.extended
                    and math.isfinite(burst.last)
                    and not self._brighter(burst, burst.peak)
                ):
                    self._bright = [*self._bright[-255:], [*burst.xy, burst.last]]
        if reason:
            self._end(burst, reason, t_now)
            return self._stop_stream(burst)
        if self.stream:  # keep two chunks ahead of the frame just analysed
            want = k + 2 * self.chunk_frames
            if want <= burst.scheduled:
                return []
            more = want - burst.scheduled
            burst.scheduled = want
            return [
                ExtendStream(
                    _burst_key(burst), more, reason=f"burst {burst.id} goes on"
                )
            ]
        # A frame acquired more than an interval late (the camera is shared
        # with other bursts and the base plan) moves the burst's clock, so
        # that its backlog stays within one interval. On the original grid a
        # saturated schedule falls further behind with every frame (frames
        # queue up, each older than the last decision) and bursts end as
        # stale although their frames are still coming.
        late = t_now - (burst.due0 + k * self.interval_s)
        if late > self.interval_s:
            burst.due0 += late - self.interval_s
        return self._schedule(burst, context, upto=k + 2, reason=f"burst {burst.id}")

    def _brighter(self, burst: _Burst, rel: float) -> bool:
        """Whether `rel` is `brightening` times the cell's first intensity."""
        return self.brightening is not None and rel >= self.brightening * burst.first

    def _stop_stream(self, burst: _Burst) -> list[Action]:
        """End a streamed burst's stream (nothing for a burst on a clock)."""
        if not self.stream:
            return []
        why = f"burst {burst.id}: {burst.ended}"
        return [StopStream(_burst_key(burst), reason=why)]

    def needs(self, frame: Frame) -> bool:
        """Its survey frames, and the in-focus frames of a burst on a clock.

        A clocked burst is chained: each analysed frame schedules the next ones,
        so its frames are needed (a skipped one could end the burst). A streamed
        burst's frames are not: the stream goes on by itself, and analysis
        takes the last frame of each chunk (``analysis.sequence_frames``).
        """
        if self._is_survey(frame):
            return True
        tag = frame.event.metadata.get("smartscope", {})
        return (
            "burst_id" in tag
            and not self.stream
            and int(tag.get("z", 0)) == self._focal_plane()
        )

    def _focal_plane(self) -> int:
        """Index of the `z_plan` plane nearest the trigger frame's focus."""
        if self.z_plan is None:
            return 0
        return int(np.argmin(np.abs(list(self.z_plan.positions()))))

    def _schedule(
        self, burst: _Burst, context: PolicyContext, *, upto: int, reason: str
    ) -> list[Action]:
        events: list[MDAEvent] = []
        offsets = list(self.z_plan.positions()) if self.z_plan else [0.0]
        roi = None
        if self.field_um is not None:
            width, height = context.sensor_px
            side = max(8, round(self.field_um / context.pixel_size_um))
            w, h = min(side, width), min(side, height)
            roi = CameraROI(
                offset_x=(width - w) // 2, offset_y=(height - h) // 2, width=w, height=h
            )
        channel = (
            {"config": self.channel, "group": context.channel_group}
            if self.channel
            else None
        )
        if self.stream:  # one template; the Scheduler numbers the frames
            n = 2 * self.chunk_frames
            burst.scheduled = n - 1
            template = MDAEvent(
                x_pos=burst.xy[0],
                y_pos=burst.xy[1],
                z_pos=burst.z,
                channel=channel,
                exposure=self.exposure_ms,
                roi=roi,
                pos_name=_burst_key(burst),
                metadata={
                    "smartscope": {
                        "burst_id": burst.id,
                        "shape": {"c": 1, "z": 1, "order": "cz"},
                        "dose_position": burst.position,
                    }
                },
            )
            return [
                Stream(
                    template,
                    n_frames=n,
                    chunk_frames=self.chunk_frames,
                    priority=self.priority,
                    reason=reason,
                )
            ]
        for k in range(burst.scheduled + 1, upto + 1):
            for j, dz in enumerate(offsets):
                events.append(
                    MDAEvent(
                        x_pos=burst.xy[0],
                        y_pos=burst.xy[1],
                        z_pos=None if burst.z is None else burst.z + dz,
                        channel=channel,
                        exposure=self.exposure_ms,
                        roi=roi,
                        pos_name=_burst_key(burst),
                        index={"t": k, "c": 0, "z": j},
                        min_start_time=burst.due0 + k * self.interval_s,
                        metadata={
                            "smartscope": {
                                "burst_id": burst.id,
                                "burst_frame": k,
                                "visit": k,
                                "z": j,
                                "shape": {"c": 1, "z": len(offsets), "order": "cz"},
                                "dose_position": burst.position,
                            }
                        },
                    )
                )
        burst.scheduled = max(burst.scheduled, upto)
        if not events:
            return []
        return [
            AddEvents(
                tuple(events),
                priority=self.priority,
                reason=reason,
                min_gap_s=BURST_PACE * self.interval_s,
                max_gap_s=MAX_GAP * self.interval_s,
            )
        ]

    @model_validator(mode="after")
    def _check(self) -> EventBurst:
        triggers = self.trigger if isinstance(self.trigger, list) else [self.trigger]
        if not triggers or not all(triggers):
            raise ValueError("`trigger` needs at least one feature bound")
        if self.stream and self.z_plan is not None:
            raise ValueError("a Z-stack (z_plan) cannot be streamed (stream: true)")
        return self


def _burst_key(burst: _Burst) -> str:
    """Position key of a burst's frames."""
    return f"burst_{burst.id:04d}"


# -------------------------------------------------------------- adaptive interval
class AdaptiveInterval(PolicyBase):
    """Set each time-lapse position's interval from the activity measured there.

    Activity, per base-plan frame of a position, is one of:

    - ``"motion"``: median displacement of the objects since the position's
      previous frame, in µm per second of run time (objects matched to their
      nearest neighbour within `match_um`);
    - ``"objects"``: number of objects passing `criterion` (e.g. cells in their
      pre-division signature);
    - ``"count_change"``: relative change of the object count since the previous
      frame.

    Activity at or below `low` gives `max_interval_s`, at or above `high`
    `min_interval_s`, linear in between; the activity is smoothed over frames
    (`smoothing`, the weight of the newest value). A new interval is only
    requested when it differs from the current one by more than `min_change`.
    """

    name: Literal["adaptive_interval"] = "adaptive_interval"
    measure: Literal["motion", "objects", "count_change"] = "motion"
    low: float = Field(0.0, ge=0)
    high: float = Field(1.0, gt=0)
    min_interval_s: float = Field(1.0, gt=0)
    max_interval_s: float = Field(10.0, gt=0)
    criterion: Criterion = Field(
        default_factory=lambda: {"relative_intensity": Bounds(min=1.4)}  # type: ignore[arg-type,dict-item]
    )
    filter: ObjectFilter = ObjectFilter(exclude_border=False)
    match_um: float = Field(15.0, gt=0)
    smoothing: float = Field(0.5, gt=0, le=1)
    min_change: float = Field(0.1, ge=0)

    _state: dict[str, dict] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> AdaptiveInterval:
        if self.min_interval_s > self.max_interval_s:
            raise ValueError("min_interval_s must not exceed max_interval_s")
        if self.high <= self.low:
            raise ValueError("`high` must be above `low`")
        return self

    def interval_for(self, activity: float) -> float:
        """The interval (s) this activity calls for."""
        f = min(max((activity - self.low) / (self.high - self.low), 0.0), 1.0)
        return self.max_interval_s + f * (self.min_interval_s - self.max_interval_s)

    def activity(self, position: str) -> float | None:
        """Smoothed activity last measured at a position."""
        st = self._state.get(position)
        return None if st is None else st.get("activity")

    def on_detections(
        self, frame: Frame, detections: Detections, context: PolicyContext
    ) -> list[Action]:
        if not self._is_survey(frame):
            return []
        sel = self.filter.mask(detections) if len(detections) else np.zeros(0, bool)
        pts = detections.centroids_um[sel] if len(detections) else np.zeros((0, 2))
        t = frame.t_clock if frame.t_clock is not None else frame.t_acquired
        st = self._state.setdefault(frame.position, {})
        prev_pts, prev_t = st.get("pts"), st.get("t")
        value: float | None
        if self.measure == "objects":
            feats = (
                object_features(detections, st.get("det"), match_um=self.match_um)
                if len(detections)
                else {}
            )
            st["det"] = detections.table_only()
            value = (
                float(matches(self.criterion, feats, len(detections))[sel].sum())
                if len(detections)
                else 0.0
            )
        elif prev_pts is None:
            value = None
        elif self.measure == "count_change":
            value = abs(len(pts) - len(prev_pts)) / max(len(prev_pts), 1)
        else:
            value = 0.0
            if len(pts) and len(prev_pts) and prev_t is not None and t > prev_t:
                _, d = nearest(pts, prev_pts)
                d = d[d <= self.match_um]
                value = float(np.median(d)) / (t - prev_t) if d.size else 0.0
        st.update(pts=pts, t=t)
        if value is None:
            return []
        old = st.get("activity")
        act = (
            value
            if old is None
            else self.smoothing * value + (1 - self.smoothing) * old
        )
        st["activity"] = act
        want = self.interval_for(act)
        current = st.get("interval")
        if current is not None and abs(want - current) <= self.min_change * current:
            return []
        st["interval"] = want
        return [
            SetInterval(
                frame.position,
                round(want, 4),
                reason=f"{self.measure} activity {act:.3g}",
            )
        ]


# ---------------------------------------------------------------- track & follow
class TrackAndFollow(PolicyBase):
    """Keep one chosen cell centered at each followed time-lapse position.

    At a position's first frame the cell to follow is chosen (`select`: nearest
    the center, brightest or largest object passing `filter`). At every later
    base-plan frame it is found again — the object nearest to where it was
    predicted to be (its last position plus its smoothed velocity), within
    `max_jump_um` — and the position is moved so that the cell will be at the
    image center at the next visit. When the cell is not found for `lost_after`
    frames in a row, the track is lost: with ``on_lost: reacquire`` the object
    nearest the image center is followed instead, with ``on_lost: stop`` the
    position stays where it is. Through a division, the daughter nearest the
    prediction is followed.
    """

    name: Literal["track_and_follow"] = "track_and_follow"
    positions: list[str] | None = Field(
        None, description="Base positions that follow a cell (None: all)."
    )
    select: Literal["center", "brightest", "largest"] = "center"
    filter: ObjectFilter = ObjectFilter()
    max_jump_um: float = Field(25.0, gt=0)
    lost_after: int = Field(3, ge=1)
    on_lost: Literal["reacquire", "stop"] = "reacquire"
    predict: bool = True
    min_move_um: float = Field(0.5, ge=0)

    _tracks: dict[str, dict] = PrivateAttr(default_factory=dict)
    _n_lost: int = PrivateAttr(0)

    @property
    def n_lost(self) -> int:
        """Tracks lost so far (all positions)."""
        return self._n_lost

    def track(self, position: str) -> dict | None:
        """State of the track at a position (cell ``xy``, ``misses``, ``lost``)."""
        return self._tracks.get(position)

    def on_detections(
        self, frame: Frame, detections: Detections, context: PolicyContext
    ) -> list[Action]:
        if not self._is_survey(frame):
            return []
        if self.positions is not None and frame.position not in self.positions:
            return []
        tr = self._tracks.get(frame.position)
        t = frame.t_clock if frame.t_clock is not None else frame.t_acquired
        sel = self.filter.mask(detections) if len(detections) else np.zeros(0, bool)
        pts = detections.centroids_um[sel] if len(detections) else np.zeros((0, 2))
        center = np.asarray(frame.stage_xy_um)
        if tr is None or tr.get("stopped"):
            if tr is not None or not len(pts):
                return []
            i = self._choose(detections, sel, pts, center)
            tr = self._tracks[frame.position] = {
                "xy": pts[i],
                "v": np.zeros(2),
                "t": t,
                "misses": 0,
                "lost": 0,
            }
            why = "following the cell chosen by " + self.select
            return self._move(frame, tr, 0.0, why)
        dt = max(t - tr["t"], 0.0)
        guess = tr["xy"] + (tr["v"] * dt if self.predict else 0)
        found = None
        if len(pts):
            j, d = nearest(guess[None], pts)
            if d[0] <= self.max_jump_um:
                found = pts[j[0]]
        if found is None:
            tr["misses"] += 1
            if tr["misses"] < self.lost_after:
                return []
            tr["lost"] += 1
            self._n_lost += 1
            if self.on_lost == "stop" or not len(pts):
                tr["stopped"] = True
                return []
            i = self._choose(detections, sel, pts, center, "center")
            tr.update(xy=pts[i], v=np.zeros(2), t=t, misses=0)
            why = "track lost: following the cell nearest the center"
            return self._move(frame, tr, 0.0, why)
        if dt > 0:
            v = (found - tr["xy"]) / dt
            tr["v"] = v if not tr["v"].any() else 0.5 * v + 0.5 * tr["v"]
        tr.update(xy=found, t=t, misses=0)
        return self._move(frame, tr, dt if self.predict else 0.0, "cell moved")

    def _choose(
        self,
        det: Detections,
        sel: np.ndarray,
        pts: np.ndarray,
        center: np.ndarray,
        how: str | None = None,
    ) -> int:
        how = how or self.select
        if how == "brightest":
            return int(np.argmax(det.objects["mean_intensity"][sel]))
        if how == "largest":
            return int(np.argmax(det.objects["area_px"][sel]))
        return int(np.argmin(np.hypot(*(pts - center).T)))

    def _move(self, frame: Frame, tr: dict, lead_s: float, why: str) -> list[Action]:
        """Center the next visit where the cell will be `lead_s` from now."""
        target = tr["xy"] + tr["v"] * lead_s
        here = np.asarray(frame.stage_xy_um)
        if float(np.hypot(*(target - here))) < self.min_move_um:
            return []
        return [
            MovePosition(
                frame.position,
                float(target[0]),
                float(target[1]),
                reason=f"{why}: cell at ({tr['xy'][0]:.1f}, {tr['xy'][1]:.1f}) µm",
            )
        ]
