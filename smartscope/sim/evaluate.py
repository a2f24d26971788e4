"""Score an acquisition against a `LiveSpecimen`'s ground truth.

Pure-numpy functions that compare what the camera did (a log of exposures, one
`Snap` per frame) with what really happened in the specimen
(`LiveSpecimen.ground_truth`): which divisions were caught at the fast rate, how
much light the cells received, how well a followed cell stayed in the field of
view.

Everything is in stage µm and simulated seconds. A cell is in a snap's field of
view when its center lies inside the imaged rectangle (edges included), the rule
the specimen itself uses for dose. Positions between the ground-truth track
samples are interpolated linearly.

Every function accepts the ``ground_truth()`` dict or a `GroundTruth` built from
it once; build the latter when scoring several things against the same truth.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypedDict

import numpy as np

__all__ = [
    "GroundTruth",
    "Snap",
    "cell_position",
    "cells_in_field",
    "division_capture",
    "dose_summary",
    "follow_summary",
    "live_run_report",
    "nearest_cell",
]

Rect = tuple[float, float, float, float]

# slack (s) when comparing times with the ground truth, whose tracks are rounded
# to the millisecond
_EPS_S = 1e-6
# (division, snap) pairs evaluated at once by `division_capture`
_MAX_PAIRS = 1 << 20


class Snap(TypedDict):
    """One exposure of the camera, as logged for evaluation.

    ``x_um``/``y_um`` are the stage coordinates of the center of the imaged (and
    illuminated) field, ``width_um``/``height_um`` its size, ``t_s`` the
    specimen's simulated time of the exposure.
    """

    t_s: float
    x_um: float
    y_um: float
    width_um: float
    height_um: float
    exposure_ms: float
    intensity: float


class GroundTruth:
    """A `LiveSpecimen.ground_truth` dict, indexed for fast position lookups.

    Parameters
    ----------
    truth : Mapping
        The dict returned by `LiveSpecimen.ground_truth`.

    Attributes
    ----------
    time_s : float
        Time of the ground truth (end of every unfinished track).
    ids : numpy.ndarray
        Cell ids, one row per cell; the per-cell arrays below follow these rows
        (`rows` maps ids to rows).
    start_s, end_s, death_s, arrest_s : numpy.ndarray
        When each cell appeared, stopped existing, died, was arrested (NaN: never).
    dose_ms, total_dose_ms : numpy.ndarray
        Dose each cell received itself, and with its ancestors'.
    daughters : list[list[int]]
        Daughter ids per row.
    divisions : list[dict]
        The division events; ``division_s``, ``division_x_um``,
        ``division_y_um``, ``division_parent`` and ``pre_start_s`` hold their
        fields as arrays.

    Notes
    -----
    A cell exists from its birth (``birth_s``; the start of its track for cells
    present at the start) to its division (``end_s``) or, if it did not divide, to
    the time of the ground truth (``time_s``). Dead cells still exist (they stay
    where they died).
    """

    def __init__(self, truth: Mapping[str, Any]) -> None:
        self.time_s = float(truth["time_s"])
        cells = truth["cells"]
        n = len(cells)
        self.ids = np.array([c["id"] for c in cells], dtype=np.int64)
        self._row = np.full(int(self.ids.max(initial=0)) + 1, -1, dtype=np.int64)
        self._row[self.ids] = np.arange(n)
        self.daughters: list[list[int]] = [list(c["daughters"]) for c in cells]
        self.death_s = _float_array([c["death_s"] for c in cells])
        self.arrest_s = _float_array([c["arrest_s"] for c in cells])
        self.dose_ms = _float_array([c["dose_ms"] for c in cells])
        self.total_dose_ms = _float_array([c["total_dose_ms"] for c in cells])

        # tracks, concatenated cell after cell: points [_lo[i], _hi[i]) of row i
        lengths = np.array([len(c["track"]["t_s"]) for c in cells], dtype=np.int64)
        self._hi = np.cumsum(lengths)
        self._lo = self._hi - lengths
        total = int(lengths.sum())
        self._t, self._x, self._y = (
            np.fromiter(
                itertools.chain.from_iterable(c["track"][key] for c in cells),
                dtype=float,
                count=total,
            )
            for key in ("t_s", "x_um", "y_um")
        )
        has_track = lengths > 0
        self._first_s = np.full(n, np.nan)
        self._last_s = np.full(n, np.nan)
        self._first_s[has_track] = self._t[self._lo[has_track]]
        self._last_s[has_track] = self._t[self._hi[has_track] - 1]
        birth = _float_array([c["birth_s"] for c in cells])
        end = _float_array([c["end_s"] for c in cells])
        self.start_s = np.where(np.isnan(birth), self._first_s, birth)
        self.end_s = np.where(np.isnan(end), self.time_s, end)
        self.end_s[~has_track] = np.nan
        # one sorted search key for every (cell, time): row * span + time
        t0 = float(self._t.min(initial=0.0))
        self._t0 = t0
        self._span = float(self._t.max(initial=0.0)) - t0 + 1.0
        self._key = np.repeat(np.arange(n), lengths) * self._span + (self._t - t0)

        divisions = truth["divisions"]
        self.divisions: list[dict[str, Any]] = [dict(d) for d in divisions]
        self.division_s, self.division_x_um, self.division_y_um, self.pre_start_s = (
            _float_array([d[key] for d in divisions])
            for key in ("time_s", "x_um", "y_um", "pre_division_start_s")
        )
        self.division_parent = np.array(
            [d["parent"] for d in divisions], dtype=np.int64
        )

    def rows(self, cell_ids: int | np.ndarray) -> np.ndarray:
        """Row (index into the per-cell arrays) of each cell id."""
        ids = np.asarray(cell_ids, dtype=np.int64)
        known = (ids > 0) & (ids < self._row.size)
        rows = np.where(known, self._row[np.where(known, ids, 0)], -1)
        if np.any(rows < 0):
            bad = np.atleast_1d(ids)[np.atleast_1d(rows < 0)]
            raise KeyError(f"no cell with id {bad.tolist()} in the ground truth")
        return rows

    def exists(self, cell_ids: int | np.ndarray, t_s: float | np.ndarray) -> np.ndarray:
        """Whether each cell exists at each time (broadcast)."""
        rows = self.rows(cell_ids)
        t = np.asarray(t_s, dtype=float)
        return (t >= self.start_s[rows] - _EPS_S) & (t <= self.end_s[rows] + _EPS_S)

    def alive(self, cell_ids: int | np.ndarray, t_s: float | np.ndarray) -> np.ndarray:
        """Whether each cell exists at each time and has not died by then."""
        rows = self.rows(cell_ids)
        t = np.asarray(t_s, dtype=float)
        dead = self.death_s[rows] <= t  # False for NaN: never died
        return self.exists(cell_ids, t) & ~dead

    def positions(
        self, cell_ids: int | np.ndarray, t_s: float | np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Stage positions (µm) of cells at times, NaN where a cell does not exist.

        `cell_ids` and `t_s` broadcast against each other: one cell at many times,
        many cells at one time, or matching pairs.
        """
        ids, t = np.broadcast_arrays(
            np.asarray(cell_ids, dtype=np.int64), np.asarray(t_s, dtype=float)
        )
        rows = self.rows(ids)
        ok = self.exists(ids, t)
        r = np.where(ok, rows, 0)
        lo, hi = self._lo[r], self._hi[r]
        tc = np.clip(t, self._first_s[r], self._last_s[r])
        tc = np.where(ok, tc, self._t0)
        j = np.searchsorted(self._key, r * self._span + (tc - self._t0), "right") - 1
        j = np.where(ok, np.clip(j, lo, hi - 1), 0)
        j1 = np.where(ok, np.minimum(j + 1, hi - 1), 0)
        ta, tb = self._t[j], self._t[j1]
        dt = tb - ta
        frac = np.divide(tc - ta, dt, out=np.zeros(dt.shape), where=dt > 0)
        x = self._x[j] + frac * (self._x[j1] - self._x[j])
        y = self._y[j] + frac * (self._y[j1] - self._y[j])
        return np.where(ok, x, np.nan), np.where(ok, y, np.nan)

    def present(self, t_s: float) -> np.ndarray:
        """Ids of the cells that exist at `t_s` (alive or dead)."""
        t = float(t_s)
        ok = (t >= self.start_s - _EPS_S) & (t <= self.end_s + _EPS_S)
        return self.ids[ok]

    def ever_in(self, region: Sequence[Rect]) -> np.ndarray:
        """Per row: whether any point of the cell's track lies in `region`."""
        inside = _in_region(self._x, self._y, region)
        count = np.concatenate([[0], np.cumsum(inside)])
        return count[self._hi] > count[self._lo]

    def lineage_at(self, cell_id: int, t_s: float) -> list[int]:
        """The cell, or its descendants, that exist at `t_s`.

        The cell itself while it exists; after its division, those of its
        descendants that exist then; empty before its birth.
        """
        out: list[int] = []
        todo = [int(cell_id)]
        while todo:
            i = todo.pop()
            row = int(self.rows(i))
            if t_s < self.start_s[row] - _EPS_S:
                continue
            if t_s <= self.end_s[row] + _EPS_S:
                out.append(i)
            else:
                todo.extend(self.daughters[row])
        return sorted(out)


def _as_truth(truth: GroundTruth | Mapping[str, Any]) -> GroundTruth:
    return truth if isinstance(truth, GroundTruth) else GroundTruth(truth)


def _float_array(values: Sequence[float | None]) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=float)


def _columns(snaps: Sequence[Mapping[str, Any]], *keys: str) -> list[np.ndarray]:
    """One float array per key over the snaps."""
    try:
        return [np.array([s[k] for s in snaps], dtype=float) for k in keys]
    except KeyError as e:
        raise KeyError(f"snap without {e.args[0]!r}: snaps need {keys}") from None


def _in_rect(
    x: np.ndarray, y: np.ndarray, cx: Any, cy: Any, w: Any, h: Any
) -> np.ndarray:
    """Whether points lie in rectangles of size ``w × h`` centered on (cx, cy)."""
    return (np.abs(x - cx) <= np.asarray(w) / 2) & (np.abs(y - cy) <= np.asarray(h) / 2)


def _in_region(x: np.ndarray, y: np.ndarray, region: Sequence[Rect]) -> np.ndarray:
    """Whether points lie in any of the rectangles ``(x0, y0, x1, y1)``."""
    inside = np.zeros(np.shape(x), dtype=bool)
    for x0, y0, x1, y1 in region:
        inside |= (
            (x >= min(x0, x1))
            & (x <= max(x0, x1))
            & (y >= min(y0, y1))
            & (y <= max(y0, y1))
        )
    return inside


# ---------------------------------------------------------------------- public
def cell_position(
    truth: GroundTruth | Mapping[str, Any], cell_id: int, t_s: float
) -> tuple[float, float] | None:
    """Stage position (µm) of a cell at a time, interpolated along its track.

    Parameters
    ----------
    truth : GroundTruth | Mapping
        The specimen's ground truth.
    cell_id : int
        Id of the cell.
    t_s : float
        Simulated time (s).

    Returns
    -------
    (float, float) | None
        ``(x_um, y_um)``, or ``None`` when the cell did not exist at `t_s`
        (before its birth, after its division, after the time of the truth).

    Raises
    ------
    KeyError
        If no cell has that id.
    """
    x, y = _as_truth(truth).positions(cell_id, t_s)
    return None if np.isnan(x) else (float(x), float(y))


def cells_in_field(
    truth: GroundTruth | Mapping[str, Any], snap: Mapping[str, Any]
) -> np.ndarray:
    """Ids of the cells whose center lies in a snap's field at the snap's time.

    Dead cells count (they are still there); divided cells do not.
    """
    gt = _as_truth(truth)
    t = float(snap["t_s"])
    ids = gt.present(t)
    x, y = gt.positions(ids, t)
    inside = _in_rect(
        x, y, snap["x_um"], snap["y_um"], snap["width_um"], snap["height_um"]
    )
    return ids[inside]


def nearest_cell(
    truth: GroundTruth | Mapping[str, Any],
    t_s: float,
    x_um: float,
    y_um: float,
    *,
    max_distance_um: float | None = None,
) -> int | None:
    """Id of the cell present at `t_s` nearest to a stage point.

    Returns ``None`` when no cell is present, or when the nearest one is farther
    than `max_distance_um`. Dead cells count as present.
    """
    gt = _as_truth(truth)
    ids = gt.present(t_s)
    if ids.size == 0:
        return None
    x, y = gt.positions(ids, t_s)
    distance = np.hypot(x - x_um, y - y_um)
    k = int(np.argmin(distance))
    if max_distance_um is not None and distance[k] > max_distance_um:
        return None
    return int(ids[k])


def division_capture(
    truth: GroundTruth | Mapping[str, Any],
    snaps: Sequence[Mapping[str, Any]],
    *,
    fast_interval_s: float,
    region: Sequence[Rect] | None = None,
    tolerance: float = 1.5,
    window_fraction: float = 0.5,
    t_start_s: float | None = None,
    t_end_s: float | None = None,
) -> dict[str, Any]:
    """Which divisions were imaged at the fast rate up to the division itself.

    With ``F = fast_interval_s``, a division at ``B = time_s`` with a pre-division
    window ``W = B - pre_division_start_s`` is *caught* when the snaps whose field
    contained the dividing cell, taken in ``[A - tolerance*F, B + tolerance*F]``
    where ``A = B - window_fraction*W``, exist, start by ``A + tolerance*F``, end
    no earlier than ``B - tolerance*F`` and are never more than ``tolerance*F``
    apart, a snap before ``A`` counting as taken at ``A`` (so only the part of
    a gap inside ``[A, B]`` counts, and an extra snap never turns a caught
    division into a missed one). The parent's position at a snap is
    interpolated along its track; for snaps at or after the division, the
    division's position is used.

    Parameters
    ----------
    truth : GroundTruth | Mapping
        The specimen's ground truth.
    snaps : sequence of Snap
        Every exposure of the acquisition (``t_s``, ``x_um``, ``y_um``,
        ``width_um``, ``height_um`` are used), in any order.
    fast_interval_s : float
        The fast frame interval a policy switches to around a division.
    region : sequence of (x0, y0, x1, y1) | None
        Only score divisions whose position lies in one of these rectangles
        (stage µm), typically the imaged fields.
    tolerance : float
        Allowed gap, in units of `fast_interval_s`.
    window_fraction : float
        Fraction (0..1) of the pre-division window, ending at the division, that
        must be covered.
    t_start_s, t_end_s : float | None
        Only score divisions that happen in this time range.

    Returns
    -------
    dict
        ``n_divisions``, ``n_caught``, ``fraction_caught`` (``None`` without
        divisions) and ``divisions``, one dict per scored division: ``time_s``,
        ``x_um``, ``y_um``, ``parent``, ``caught``, ``n_frames_in_window`` (snaps
        of the cell in ``[pre_division_start_s, time_s]``), ``max_gap_s``
        (largest gap between the cell's snaps in the checked span; ``None`` with
        fewer than two) and ``first_fast_s`` (the earliest snap of the cell,
        from ``min(pre_division_start_s, A) - tolerance*F`` on, from which it was
        imaged at least every ``tolerance*F`` up to the division; ``None`` if
        the last snap before the division is older than that).
    """
    if fast_interval_s <= 0:
        raise ValueError("fast_interval_s must be > 0")
    if not 0 <= window_fraction <= 1:
        raise ValueError("window_fraction must be in [0, 1]")
    gt = _as_truth(truth)
    tol = float(tolerance) * float(fast_interval_s)

    keep = np.ones(len(gt.divisions), dtype=bool)
    if region is not None:
        keep &= _in_region(gt.division_x_um, gt.division_y_um, region)
    if t_start_s is not None:
        keep &= gt.division_s >= t_start_s
    if t_end_s is not None:
        keep &= gt.division_s <= t_end_s
    sel = np.flatnonzero(keep)
    b, pre = gt.division_s[sel], gt.pre_start_s[sel]
    a = b - window_fraction * (b - pre)

    cols = _columns(snaps, "t_s", "x_um", "y_um", "width_um", "height_um")
    order = np.argsort(cols[0], kind="stable")
    st, sx, sy, sw, sh = (c[order] for c in cols)
    lo = np.searchsorted(st, np.minimum(pre, a) - tol - _EPS_S, "left")
    hi = np.searchsorted(st, b + tol + _EPS_S, "right")

    seen: list[np.ndarray] = []  # times of the snaps that saw each division's cell
    for start, stop in _batches(hi - lo, _MAX_PAIRS):
        owner, snap = _pairs(lo[start:stop], hi[start:stop])
        k = sel[start + owner]
        t = st[snap]
        x, y = gt.positions(gt.division_parent[k], t)
        after = t >= gt.division_s[k]
        x = np.where(after, gt.division_x_um[k], x)
        y = np.where(after, gt.division_y_um[k], y)
        inside = _in_rect(x, y, sx[snap], sy[snap], sw[snap], sh[snap])
        counts = np.bincount(owner[inside], minlength=stop - start)
        seen.extend(np.split(t[inside], np.cumsum(counts)[:-1]))

    divisions = [
        {
            "time_s": float(gt.division_s[k]),
            "x_um": float(gt.division_x_um[k]),
            "y_um": float(gt.division_y_um[k]),
            "parent": int(gt.division_parent[k]),
            **_capture(times, pre[i], a[i], b[i], tol),
        }
        for i, (k, times) in enumerate(zip(sel, seen, strict=True))
    ]
    n_caught = sum(d["caught"] for d in divisions)
    return {
        "n_divisions": len(divisions),
        "n_caught": n_caught,
        "fraction_caught": n_caught / len(divisions) if divisions else None,
        "divisions": divisions,
    }


def dose_summary(
    truth: GroundTruth | Mapping[str, Any],
    snaps: Sequence[Mapping[str, Any]],
    *,
    region: Sequence[Rect] | None = None,
) -> dict[str, Any]:
    """How much light the acquisition used and what it did to the cells.

    Parameters
    ----------
    truth : GroundTruth | Mapping
        The specimen's ground truth.
    snaps : sequence of Snap
        Every exposure of the acquisition (``exposure_ms``, ``intensity``,
        ``width_um``, ``height_um`` are used).
    region : sequence of (x0, y0, x1, y1) | None
        Count only the cells whose track ever entered one of these rectangles
        (stage µm). The snap totals are not restricted.

    Returns
    -------
    dict
        ``n_frames``; ``exposure_ms`` (sum of exposure × intensity);
        ``illumination_ms_mm2`` (the same, times each field's area in mm²);
        ``n_cells`` (cells counted); ``total_cell_dose_ms`` (sum of the dose each
        cell received itself, so inherited dose is not counted twice);
        ``max_cell_dose_ms`` (largest total dose, ancestors' included);
        ``cells_harmed`` (arrested or dead), ``cells_dead``, ``cells_arrested``.
    """
    gt = _as_truth(truth)
    exposure, intensity, w, h = _columns(
        snaps, "exposure_ms", "intensity", "width_um", "height_um"
    )
    light = exposure * intensity
    cells = np.ones(gt.ids.size, bool) if region is None else gt.ever_in(region)
    dead = cells & ~np.isnan(gt.death_s)
    arrested = cells & ~np.isnan(gt.arrest_s)
    return {
        "n_frames": len(snaps),
        "exposure_ms": float(light.sum()),
        "illumination_ms_mm2": float((light * w * h).sum() / 1e6),
        "n_cells": int(cells.sum()),
        "total_cell_dose_ms": float(gt.dose_ms[cells].sum()),
        "max_cell_dose_ms": float(gt.total_dose_ms[cells].max(initial=0.0)),
        "cells_harmed": int((dead | arrested).sum()),
        "cells_dead": int(dead.sum()),
        "cells_arrested": int(arrested.sum()),
    }


def follow_summary(
    truth: GroundTruth | Mapping[str, Any],
    frames: Sequence[Mapping[str, Any]],
    *,
    cell_id: int,
    limit_fraction: float = 0.1,
) -> dict[str, Any]:
    """How well frames taken at a followed position kept a cell centered.

    The followed cell's position at each frame's time is compared with the frame
    center. After the cell divides, its lineage is followed: the descendant alive
    at that time nearest to the frame center. A frame is *lost* (offset ``inf``)
    when neither the cell nor any descendant is alive then (dead, or not born).

    Parameters
    ----------
    truth : GroundTruth | Mapping
        The specimen's ground truth.
    frames : sequence of Snap
        The frames taken at the followed position (``t_s``, ``x_um``, ``y_um``,
        ``width_um`` are used).
    cell_id : int
        The followed cell.
    limit_fraction : float
        Largest offset, in field widths, that counts as within.

    Returns
    -------
    dict
        ``n_frames``; ``fraction_within`` (frames with an offset of at most
        `limit_fraction` field widths); ``max_offset_fraction``;
        ``median_offset_um``; ``offsets_um`` (per frame); ``lost`` (frames
        without the cell). The statistics are ``None`` without frames.
    """
    gt = _as_truth(truth)
    gt.rows(cell_id)  # unknown ids fail here, not in the middle
    t, x, y, w = _columns(frames, "t_s", "x_um", "y_um", "width_um")
    if np.any(w <= 0):
        raise ValueError("frames need width_um > 0")
    pairs = [(k, m) for k, tk in enumerate(t) for m in gt.lineage_at(cell_id, tk)]
    owner, member = np.array(pairs, dtype=np.int64).reshape(-1, 2).T
    mx, my = gt.positions(member, t[owner])
    distance = np.hypot(mx - x[owner], my - y[owner])
    distance[~gt.alive(member, t[owner])] = np.inf
    offsets = np.full(t.size, np.inf)
    np.minimum.at(offsets, owner, distance)
    fraction = offsets / w
    n = int(t.size)
    return {
        "n_frames": n,
        "fraction_within": float(np.mean(fraction <= limit_fraction)) if n else None,
        "max_offset_fraction": float(fraction.max()) if n else None,
        "median_offset_um": float(np.median(offsets)) if n else None,
        "offsets_um": offsets.tolist(),
        "lost": int(np.isinf(offsets).sum()),
    }


def live_run_report(
    truth: GroundTruth | Mapping[str, Any],
    snaps: Sequence[Mapping[str, Any]],
    frames: Sequence[Mapping[str, Any]],
    decisions: Sequence[Mapping[str, Any]] = (),
    *,
    fast_interval_s: float,
    tolerance: float = 2.0,
    margin_um: float = 10.0,
    limit_fraction: float = 0.1,
) -> dict[str, Any]:
    """Score a whole run on a live specimen: divisions caught, dose, following.

    Parameters
    ----------
    truth : GroundTruth | Mapping
        The specimen's ground truth at the end of the run.
    snaps : sequence of Snap
        The camera's exposure log; its last ``len(frames)`` entries are the
        run's frames, in order.
    frames : sequence of dict
        The run's ``frames.jsonl`` records (``position``, ``kind``).
    decisions : sequence of dict
        The run's ``decisions.jsonl`` records; the first ``move_position`` of a
        ``track_and_follow`` decision at a position names the followed cell.
    fast_interval_s : float
        The fast (burst) interval, in simulated seconds.
    tolerance : float
        Longest gap between frames of a caught division, in fast intervals
        (frames run late under load; the slow rate is several times longer).
    margin_um : float
        Divisions count when they happen at least this far inside a field (a
        nucleus cut by the field's edge shows no reliable signature).
    limit_fraction : float
        Offset of a followed cell, in field widths, that still counts as
        centered.

    Returns
    -------
    dict
        ``divisions``: the divisions in the fields of base-plan frames (at least
        `margin_um` inside) whose whole pre-division window lies in the run
        (from its first frame to its last base-plan frame),
        and how many were caught (`division_capture`; of the per-division
        list only the ``missed`` ones, each with its ``first_fast_s`` and
        ``max_gap_s``, so a miss can be told from a late start or a gap);
        ``dose``:
        `dose_summary` of the cells that were ever in those fields;
        ``frames``: counts per kind; ``follow``: per followed position,
        `follow_summary` (without per-frame offsets) and the cell id.
    """
    gt = _as_truth(truth)
    frames = list(frames)
    snaps = list(snaps)[len(snaps) - len(frames) :] if frames else []
    if len(snaps) != len(frames):
        raise ValueError(f"{len(frames)} frames but {len(snaps)} snaps")
    base = [sn for sn, fr in zip(snaps, frames, strict=True) if fr["kind"] == "base"]
    m = float(margin_um)
    region = sorted(
        {
            (
                round(sn["x_um"] - sn["width_um"] / 2 + m),
                round(sn["y_um"] - sn["height_um"] / 2 + m),
                round(sn["x_um"] + sn["width_um"] / 2 - m),
                round(sn["y_um"] + sn["height_um"] / 2 - m),
            )
            for sn in base
        }
    )
    region_f: list[Rect] = [
        (float(r[0]), float(r[1]), float(r[2]), float(r[3])) for r in region
    ]
    kinds: dict[str, int] = {}
    for fr in frames:
        kinds[fr["kind"]] = kinds.get(fr["kind"], 0) + 1
    t0 = snaps[0]["t_s"] if snaps else None
    # the run's span is its base plan's: after the last base frame an adaptive
    # run may still finish its bursts, but nothing new can trigger there, and
    # a fixed time-lapse of the same plan has ended (the same span for both)
    t1 = (base or snaps)[-1]["t_s"] if snaps else None
    # only divisions whose whole pre-division window lies in the run can be
    # caught by any acquisition
    windows = gt.division_s - gt.pre_start_s
    window_s = float(windows.max()) if windows.size else 0.0
    capture = division_capture(
        gt,
        snaps,
        fast_interval_s=fast_interval_s,
        region=region_f or None,
        tolerance=tolerance,
        t_start_s=None if t0 is None else t0 + window_s,
        t_end_s=t1,
    )
    # a division counts where a base field was at the time (fields that follow a
    # cell move): inside the latest base frame of some position before it
    latest = _latest_fields(base, [fr for fr in frames if fr["kind"] == "base"])
    kept = [
        d
        for d in capture.pop("divisions")
        if any(
            r[0] + m <= d["x_um"] <= r[2] - m and r[1] + m <= d["y_um"] <= r[3] - m
            for r in latest(d["time_s"])
        )
    ]
    n_caught = sum(d["caught"] for d in kept)
    capture.update(
        n_divisions=len(kept),
        n_caught=n_caught,
        fraction_caught=n_caught / len(kept) if kept else None,
        missed=[d for d in kept if not d["caught"]],
    )
    report: dict[str, Any] = {
        "simulated_s": None if t0 is None else t1 - t0,
        "fast_interval_s": fast_interval_s,
        "divisions": capture,
        "dose": dose_summary(gt, snaps, region=region_f or None),
        "frames": {"total": len(frames), **kinds},
        "follow": {},
    }
    for position, (x, y, k0) in _followed(decisions, frames).items():
        mine = [
            sn
            for k, (sn, fr) in enumerate(zip(snaps, frames, strict=True))
            if fr["position"] == position and fr["kind"] == "base" and k > k0
        ]
        if not mine:
            continue
        cell = nearest_cell(gt, snaps[k0]["t_s"], x, y)
        if cell is None:
            continue
        summary = follow_summary(gt, mine, cell_id=cell, limit_fraction=limit_fraction)
        summary.pop("offsets_um")
        report["follow"][position] = {"cell_id": cell, **summary}
    return report


def _latest_fields(
    snaps: Sequence[Mapping[str, Any]], frames: Sequence[Mapping[str, Any]]
) -> Callable[[float], list[Rect]]:
    """``f(t)``: the field of every position's latest frame at or before t."""
    per: dict[str, tuple[np.ndarray, list[Rect]]] = {}
    for sn, fr in zip(snaps, frames, strict=True):
        t, rects = per.setdefault(fr["position"], (np.empty(0), []))
        rect = (
            sn["x_um"] - sn["width_um"] / 2,
            sn["y_um"] - sn["height_um"] / 2,
            sn["x_um"] + sn["width_um"] / 2,
            sn["y_um"] + sn["height_um"] / 2,
        )
        per[fr["position"]] = (np.append(t, sn["t_s"]), [*rects, rect])

    def fields(t_s: float) -> list[Rect]:
        out = []
        for times, rects in per.values():
            k = max(int(np.searchsorted(times, t_s, side="right")) - 1, 0)
            out.append(rects[k])
        return out

    return fields


def _followed(
    decisions: Sequence[Mapping[str, Any]], frames: Sequence[Mapping[str, Any]]
) -> dict[str, tuple[float, float, int]]:
    """Followed positions: the chosen cell's stage ``(x, y)`` and frame index."""
    index = {int(fr["frame_index"]): k for k, fr in enumerate(frames)}
    out: dict[str, tuple[float, float, int]] = {}
    for d in decisions:
        if d.get("policy") != "track_and_follow" or not d.get("trigger"):
            continue
        for a in d.get("actions", []):
            if a.get("type") != "move_position" or a.get("status") != "applied":
                continue
            pos = a["position"]
            k = index.get(int(d["trigger"]["frame_index"]))
            if pos not in out and k is not None:
                out[pos] = (float(a["x_um"]), float(a["y_um"]), k)
    return out


# --------------------------------------------------------------------- helpers
def _capture(
    times: np.ndarray, pre: float, a: float, b: float, tol: float
) -> dict[str, Any]:
    """Score one division from the sorted times of the snaps that saw its cell."""
    in_window = (times >= pre - _EPS_S) & (times <= b + _EPS_S)
    span = times[(times >= a - tol - _EPS_S) & (times <= b + tol + _EPS_S)]
    # a snap before the covered part covers its start: it counts as taken at
    # `a`, so a gap only counts for the time it leaves [a, b] unseen (an extra
    # early snap must never turn a caught division into a missed one)
    span = np.maximum(span, a)
    gaps = np.diff(span)
    caught = bool(
        span.size
        and span[0] <= a + tol + _EPS_S
        and span[-1] >= b - tol - _EPS_S
        and np.all(gaps <= tol + _EPS_S)
    )
    upto = times[times <= b + _EPS_S]
    first_fast = None
    if upto.size and b - upto[-1] <= tol + _EPS_S:
        slow = np.flatnonzero(np.diff(upto) > tol + _EPS_S)
        first_fast = float(upto[slow[-1] + 1] if slow.size else upto[0])
    return {
        "caught": caught,
        "n_frames_in_window": int(in_window.sum()),
        "max_gap_s": float(gaps.max()) if gaps.size else None,
        "first_fast_s": first_fast,
    }


def _batches(counts: np.ndarray, max_items: int) -> Iterator[tuple[int, int]]:
    """Consecutive ``(start, stop)`` ranges of `counts` summing to <= `max_items`.

    A range holds at least one entry, whatever its count.
    """
    total = np.cumsum(counts)
    start = 0
    while start < counts.size:
        done = int(total[start - 1]) if start else 0
        stop = int(np.searchsorted(total, done + max_items, "right"))
        stop = max(stop, start + 1)
        yield start, stop
        start = stop


def _pairs(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flatten ranges ``[lo[i], hi[i])`` into (owner i, index) pairs."""
    counts = hi - lo
    owner = np.repeat(np.arange(counts.size), counts)
    first = np.cumsum(counts) - counts
    index = lo[owner] + np.arange(owner.size) - first[owner]
    return owner, index
