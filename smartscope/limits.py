"""Safety limits of a run and the checks of a base plan before anything moves.

`SafetyLimits` holds the stage box (X, Y, Z in µm) and the longest exposure a
run may use. Each comes from the experiment's ``limits:``, else from the
hardware config (where the adapters expose one: the focus device's
``Position`` property limits, the camera's ``Exposure`` property limits), else
from a default (±100 mm in X and Y, ±10 mm in Z, 10 s exposure).

`check_plan_size` refuses plans too large to run before useq or the
Scheduler allocate anything; `check_plan` checks every stage position of a
base plan (finite, inside the box) and its exposures, without iterating its
events. The Scheduler refuses actions outside the limits (`SafetyLimits.why_not`)
and `smartscope.engine.SafeEngine` never sends a move outside them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from smartscope._errors import ExperimentError

if TYPE_CHECKING:
    from useq import MDAEvent, MDASequence

__all__ = [
    "DEFAULT_MAX_EXPOSURE_MS",
    "DEFAULT_XY_UM",
    "DEFAULT_Z_UM",
    "MAX_PLAN_EVENTS",
    "PlanError",
    "PlanSize",
    "SafetyLimits",
    "check_finite_positions",
    "check_plan",
    "check_plan_size",
    "plan_size",
]

#: default stage box when neither the experiment nor the config gives one (µm)
DEFAULT_XY_UM = (-100_000.0, 100_000.0)
DEFAULT_Z_UM = (-10_000.0, 10_000.0)
#: default longest exposure (ms)
DEFAULT_MAX_EXPOSURE_MS = 10_000.0
#: the most base events a plan may have
MAX_PLAN_EVENTS = 10_000_000
#: bytes the Scheduler holds per event of a time-lapse position's visit template
#: (a useq MDAEvent with its metadata: ~2.7 kB measured, with margin)
_EVENT_BYTES = 4_000
#: bytes per stage position while a plan is read (useq's positions and keys)
_POSITION_BYTES = 1_000


class PlanError(ExperimentError):
    """A base plan that cannot run: too large, or outside the safety limits."""


@dataclass(frozen=True)
class SafetyLimits:
    """The stage box (µm) and the longest exposure (ms) of a run.

    `sources` says where each limit came from (``"experiment"``, ``"config"``
    or ``"default"``).
    """

    x_um: tuple[float, float] = DEFAULT_XY_UM
    y_um: tuple[float, float] = DEFAULT_XY_UM
    z_um: tuple[float, float] = DEFAULT_Z_UM
    max_exposure_ms: float = DEFAULT_MAX_EXPOSURE_MS
    sources: dict[str, str] = field(default_factory=dict, compare=False)

    @classmethod
    def resolve(
        cls,
        experiment: dict[str, Any] | None = None,
        config: dict[str, Any] | None = None,
    ) -> SafetyLimits:
        """Each limit from `experiment`, else from `config`, else the default.

        Both are mappings of ``x_um``, ``y_um``, ``z_um`` (``(min, max)``) and
        ``max_exposure_ms``; missing or None entries fall through.
        """
        defaults = {
            "x_um": DEFAULT_XY_UM,
            "y_um": DEFAULT_XY_UM,
            "z_um": DEFAULT_Z_UM,
            "max_exposure_ms": DEFAULT_MAX_EXPOSURE_MS,
        }
        values: dict[str, Any] = {}
        sources: dict[str, str] = {}
        for key, default in defaults.items():
            for source, given in (("experiment", experiment), ("config", config)):
                value = (given or {}).get(key)
                if value is not None:
                    values[key], sources[key] = value, source
                    break
            else:
                values[key], sources[key] = default, "default"
        return cls(
            x_um=_pair(values["x_um"]),
            y_um=_pair(values["y_um"]),
            z_um=_pair(values["z_um"]),
            max_exposure_ms=float(values["max_exposure_ms"]),
            sources=sources,
        )

    # ----------------------------------------------------------------- checks
    def why_not_xy(self, x: float | None, y: float | None) -> str | None:
        """Why the stage must not go to ``(x, y)`` µm; None if it may."""
        return _why_not("x", x, self.x_um) or _why_not("y", y, self.y_um)

    def why_not_z(self, z: float | None) -> str | None:
        """Why the focus must not go to `z` µm; None if it may."""
        return _why_not("z", z, self.z_um)

    def why_not_exposure(self, exposure_ms: float | None) -> str | None:
        """Why an exposure of `exposure_ms` is not allowed; None if it is."""
        if exposure_ms is None:
            return None
        value = float(exposure_ms)
        if not math.isfinite(value) or value < 0:
            return f"exposure {value} ms is not a finite, non-negative number"
        if value > self.max_exposure_ms:
            return (
                f"exposure {value:g} ms exceeds the maximum of "
                f"{self.max_exposure_ms:g} ms"
            )
        return None

    def why_not(self, event: MDAEvent) -> str | None:
        """Why `event` must not be sent to the hardware; None if it may."""
        return (
            self.why_not_xy(event.x_pos, event.y_pos)
            or self.why_not_z(event.z_pos)
            or self.why_not_exposure(event.exposure)
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "x_um": list(self.x_um),
            "y_um": list(self.y_um),
            "z_um": list(self.z_um),
            "max_exposure_ms": self.max_exposure_ms,
            "sources": dict(self.sources),
        }


def _pair(value: Any) -> tuple[float, float]:
    lo, hi = (float(v) for v in value)
    return (lo, hi)


def _why_not(axis: str, value: float | None, box: tuple[float, float]) -> str | None:
    if value is None:
        return None
    v = float(value)
    if not math.isfinite(v):
        return f"{axis} = {v} µm is not a finite number"
    if not box[0] <= v <= box[1]:
        return (
            f"{axis} = {v:g} µm is outside the {axis.upper()} limits "
            f"[{box[0]:g}, {box[1]:g}] µm"
        )
    return None


# -------------------------------------------------------------------- plan size
class PlanSize(NamedTuple):
    """Upper bounds of a base plan's size, from its axes (nothing iterated).

    ``events`` is None when a grid's size needs the field of view (a grid
    between edges before the microscope is known).
    """

    positions: int | None
    timepoints: int
    channels: int
    z_planes: int

    @property
    def events(self) -> int | None:
        if self.positions is None:
            return None
        return self.positions * self.timepoints * self.channels * self.z_planes


def plan_size(seq: MDASequence) -> PlanSize:
    """The number of positions, timepoints, channels and Z planes of `seq`."""
    import useq

    stage = seq.stage_positions
    if isinstance(stage, useq.WellPlatePlan):
        wells = len(stage.selected_well_indices)
        points = _count(stage.well_points_plan)
        positions: int | None = None if points is None else wells * points
    else:
        positions = max(1, len(stage))
    if seq.grid_plan is not None and positions is not None:
        grid = _count(seq.grid_plan)
        positions = None if grid is None else positions * max(1, grid)
    timepoints = 1
    if seq.time_plan is not None:
        timepoints = max(1, int(seq.time_plan.num_timepoints()))
    z_planes = 1
    if seq.z_plan is not None:
        z_planes = max(1, int(seq.z_plan.num_positions()))
    return PlanSize(positions, timepoints, max(1, len(seq.channels)), z_planes)


def _count(plan: Any) -> int | None:
    """Positions of a grid or well-points plan; None if it needs the FOV."""
    import useq

    if plan is None:
        return 1
    if isinstance(plan, useq.Position):  # a single point in the well
        return 1
    if isinstance(plan, useq.GridRowsColumns):
        return int(plan.rows) * int(plan.columns)
    if isinstance(plan, useq.RandomPoints):
        return int(plan.num_points)
    if getattr(plan, "fov_width", 1) is None or getattr(plan, "fov_height", 1) is None:
        return None
    try:
        return int(plan.num_positions())
    except Exception:  # a plan that cannot count without more information
        return None


def check_plan_size(
    seq: MDASequence,
    *,
    max_events: int = MAX_PLAN_EVENTS,
    available_bytes: int | None = None,
) -> PlanSize:
    """Refuse a plan too large to run, before anything is allocated.

    Too large: more than `max_events` base events, or more memory to hold
    its positions (and a time-lapse's visit templates) than is available.

    Raises
    ------
    PlanError
        One line with the plan's size and the bound it breaks.
    """
    size = plan_size(seq)
    if size.positions is None:
        return size
    events = size.events or 0
    if events > max_events:
        raise PlanError(
            f"the base plan has {events:,} events ({_describe(size)}); at most "
            f"{max_events:,} can run"
        )
    need = size.positions * _POSITION_BYTES
    if seq.time_plan is not None:  # the Scheduler keeps each position's visit
        need += size.positions * size.channels * size.z_planes * _EVENT_BYTES
    available = _available_memory() if available_bytes is None else available_bytes
    if available is not None and need > available // 2:
        raise PlanError(
            f"the base plan ({_describe(size)}) would need about "
            f"{need / 2**30:.1f} GiB of memory to schedule; "
            f"{available / 2**30:.1f} GiB is available"
        )
    return size


def _describe(size: PlanSize) -> str:
    return (
        f"{size.positions:,} positions x {size.timepoints:,} timepoints x "
        f"{size.channels} channels x {size.z_planes} Z planes"
    )


def _available_memory() -> int | None:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:
        pass
    try:
        import os

        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


# ------------------------------------------------------------------ plan check
def _stage_points(seq: MDASequence) -> Iterator[tuple[str, Any]]:
    """``(name, position)`` of each stage position of the plan (no grid)."""
    import useq

    stage = seq.stage_positions
    if isinstance(stage, useq.WellPlatePlan):
        for k, pos in enumerate(stage.image_positions):
            yield (pos.name or f"p{k}", pos)
        return
    if not stage:
        yield ("the stage's current position", useq.Position())
        return
    for k, pos in enumerate(stage):
        yield (pos.name or f"position {k}", pos)


def check_finite_positions(seq: MDASequence) -> None:
    """Every stage position of the plan (without its grid) has finite X, Y, Z.

    What can be checked before the hardware config is known (`check_plan`
    checks the rest).

    Raises
    ------
    PlanError
        One line naming the first position that is not finite.
    """
    box = (-math.inf, math.inf)
    for name, pos in _stage_points(seq):
        why = _why_not("x", pos.x, box) or _why_not("y", pos.y, box)
        why = why or _why_not("z", pos.z, box)
        if why:
            raise PlanError(f"stage position {name!r}: {why}")


def _offsets(plan: Any, fov: tuple[float | None, float | None]) -> list[Any]:
    if plan is None:
        return []
    width, height = fov
    return list(plan.iter_grid_positions(fov_width=width, fov_height=height))


def check_plan(
    seq: MDASequence,
    limits: SafetyLimits,
    *,
    camera_exposure_ms: float | None = None,
) -> None:
    """Check every stage position and exposure of a base plan against `limits`.

    Stage positions (with the grid's offsets and the Z plan's planes) must be
    finite and inside the stage box; channel exposures (and the camera's, for
    events that set none) at most ``limits.max_exposure_ms``. Only the plan's
    axes are walked, never its events. Call `check_plan_size` first.

    Raises
    ------
    PlanError
        One line naming the first offending position (or channel).
    """
    for ch in seq.channels:
        why = limits.why_not_exposure(ch.exposure)
        if why:
            raise PlanError(f"channel {ch.config!r}: {why}")
    if camera_exposure_ms is not None and any(c.exposure is None for c in seq.channels):
        why = limits.why_not_exposure(camera_exposure_ms)
        if why:
            raise PlanError(f"the camera's exposure: {why}")
    if not seq.channels and camera_exposure_ms is not None:
        why = limits.why_not_exposure(camera_exposure_ms)
        if why:
            raise PlanError(f"the camera's exposure: {why}")

    grid = seq.grid_plan
    fov = (getattr(grid, "fov_width", None), getattr(grid, "fov_height", None))
    offsets = _offsets(grid, fov)
    relative_grid = grid is None or bool(grid.is_relative)
    gx = _extremes(o.x for o in offsets)
    gy = _extremes(o.y for o in offsets)
    z_plan = seq.z_plan
    z_values = [float(z) for z in z_plan] if z_plan is not None else []
    z_relative = z_plan is None or z_plan.is_relative
    gz = _extremes(z_values)

    dz = _extremes(c.z_offset for c in seq.channels)

    for name, pos in _stage_points(seq):
        if not offsets:
            xs, ys = [pos.x], [pos.y]
        elif relative_grid:  # useq: a grid around a position without X is at 0
            xs = _shifted(pos.x if pos.x is not None else 0.0, gx)
            ys = _shifted(pos.y if pos.y is not None else 0.0, gy)
        else:  # an absolute grid: its points are the positions
            xs, ys = list(gx), list(gy)
        if z_plan is None:
            zs = [pos.z]
        elif z_relative:
            zs = _shifted(pos.z if pos.z is not None else 0.0, gz)
        else:
            zs = list(gz)
        if dz:  # channels' Z offsets
            zs = [z2 for z in zs for z2 in _shifted(z, dz)]
        for x in xs:
            why = limits.why_not_xy(x, None)
            if why:
                raise PlanError(f"stage position {name!r}: {why}")
        for y in ys:
            why = limits.why_not_xy(None, y)
            if why:
                raise PlanError(f"stage position {name!r}: {why}")
        for z in zs:
            why = limits.why_not_z(z)
            if why:
                raise PlanError(f"stage position {name!r}: {why}")


def _extremes(values: Iterable[float | None]) -> tuple[float, ...]:
    """Min and max of the values (a non-finite value is kept, to be reported)."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return ()
    bad = [v for v in vals if not math.isfinite(v)]
    if bad:
        return (bad[0],)
    return (min(vals), max(vals))


def _shifted(base: float | None, offsets: tuple[float, ...]) -> list[float | None]:
    if base is None:
        return [None]  # the axis is not moved
    if not offsets:
        return [base]
    return [base + o for o in offsets]
