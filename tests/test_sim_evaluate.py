"""Scoring an acquisition against a `LiveSpecimen`'s ground truth."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from smartscope.sim.evaluate import (
    GroundTruth,
    Snap,
    cell_position,
    cells_in_field,
    division_capture,
    dose_summary,
    follow_summary,
    live_run_report,
    nearest_cell,
)
from smartscope.sim.specimen import LiveSpecimen

FAST_S = 60.0  # the fast frame interval
PRE_MIN = 10.0  # pre-division window (minutes)
SHAPE = (50, 50)  # a 200 µm square field at 4 µm / pixel
PIXEL_UM = 4.0
FIELD = (-100.0, -100.0, 100.0, 100.0)  # the imaged field, centered on (0, 0)
DURATION_S = 3 * 3600.0
FOLLOW_WIDTH_UM = 100.0


def _expose(
    spec: LiveSpecimen,
    x_um: float,
    y_um: float,
    *,
    shape: tuple[int, int] = SHAPE,
    pixel_size_um: float = PIXEL_UM,
    exposure_ms: float = 10.0,
    intensity: float = 1.0,
) -> Snap:
    """Expose a field the way the camera does and log it."""
    # render() takes the square root of a negative variance where a condensed
    # nucleus' texture makes its expected signal negative; the frame is unused here
    with np.errstate(invalid="ignore"):
        spec.render(
            x_um,
            y_um,
            shape=shape,
            pixel_size_um=pixel_size_um,
            exposure_ms=exposure_ms,
            intensity=intensity,
        )
    return Snap(
        t_s=spec.time_s,
        x_um=x_um,
        y_um=y_um,
        width_um=shape[1] * pixel_size_um,
        height_um=shape[0] * pixel_size_um,
        exposure_ms=exposure_ms,
        intensity=intensity,
    )


@dataclass
class ImagedRun:
    truth: dict
    gt: GroundTruth
    snaps: list[Snap]  # one field imaged every FAST_S
    in_view: list[np.ndarray]  # the specimen's own cells_in_view at each snap
    tables: list[dict[str, np.ndarray]]  # cell_table at each snap
    followed: int  # a cell that divides mid-run
    follow_frames: list[Snap]  # frames centered on its lineage (not exposed)


@pytest.fixture(scope="module")
def run() -> ImagedRun:
    spec = LiveSpecimen(
        1,
        bounds_um=(-300, -300, 300, 300),
        cell_cycle_hours=1.5,
        pre_division_minutes=PRE_MIN,
    )
    table = spec.cell_table()
    inner = (np.abs(table["x_um"]) < 200) & (np.abs(table["y_um"]) < 200)
    soon = np.where(inner, np.abs(table["division_s"] - 3600), np.inf)
    followed = int(table["id"][np.argmin(soon)])
    current, center = followed, None
    snaps, in_view, tables, follow_frames = [], [], [], []
    while spec.time_s < DURATION_S - 1:
        spec.advance(FAST_S)
        in_view.append(spec.cells_in_view(0.0, 0.0, SHAPE, PIXEL_UM))
        snaps.append(_expose(spec, 0.0, 0.0))
        table = spec.cell_table()
        tables.append(table)
        # follow the lineage: after a division, the daughter nearest to the last
        # position
        while current not in table["id"]:
            kids = np.flatnonzero(table["parent"] == current)
            dx = table["x_um"][kids] - center[0]
            dy = table["y_um"][kids] - center[1]
            current = int(table["id"][kids[np.argmin(np.hypot(dx, dy))]])
        row = int(np.flatnonzero(table["id"] == current)[0])
        center = (float(table["x_um"][row]), float(table["y_um"][row]))
        follow_frames.append(
            Snap(
                t_s=spec.time_s,
                x_um=center[0],
                y_um=center[1],
                width_um=FOLLOW_WIDTH_UM,
                height_um=FOLLOW_WIDTH_UM,
                exposure_ms=10.0,
                intensity=1.0,
            )
        )
    truth = spec.ground_truth()
    return ImagedRun(
        truth, GroundTruth(truth), snaps, in_view, tables, followed, follow_frames
    )


def _in_field(division: dict) -> bool:
    x0, y0, x1, y1 = FIELD
    return x0 <= division["x_um"] <= x1 and y0 <= division["y_um"] <= y1


def _scored(run: ImagedRun) -> list[dict]:
    """Divisions in the field whose whole window was imaged."""
    start = run.snaps[0]["t_s"] + PRE_MIN * 60
    return [
        d
        for d in run.truth["divisions"]
        if _in_field(d) and start <= d["time_s"] <= run.snaps[-1]["t_s"]
    ]


# ------------------------------------------------------------------ positions
def test_cell_position_follows_the_tracks(run: ImagedRun) -> None:
    for k in (0, 50, len(run.snaps) - 1):
        t, table = run.snaps[k]["t_s"], run.tables[k]
        x, y = run.gt.positions(table["id"], t)
        np.testing.assert_allclose(x, table["x_um"], atol=2e-3)
        np.testing.assert_allclose(y, table["y_um"], atol=2e-3)
        cell = int(table["id"][3])
        assert cell_position(run.truth, cell, t) == pytest.approx(
            (table["x_um"][3], table["y_um"][3]), abs=2e-3
        )

    division = run.truth["divisions"][0]
    t_div, parent = division["time_s"], division["parent"]
    assert cell_position(run.gt, parent, t_div) == pytest.approx(
        (division["x_um"], division["y_um"]), abs=2e-3
    )
    assert cell_position(run.gt, parent, t_div + 1) is None  # divided
    daughter = division["daughters"][0]
    assert cell_position(run.gt, daughter, t_div - 1) is None  # not born yet
    assert cell_position(run.gt, daughter, t_div + 1) is not None
    assert cell_position(run.gt, parent, run.gt.time_s + 1) is None  # future
    with pytest.raises(KeyError):
        cell_position(run.gt, 10**6, 0.0)


def test_cells_in_field_matches_the_specimens_dose_rule(run: ImagedRun) -> None:
    for snap, seen in zip(run.snaps, run.in_view):
        assert set(cells_in_field(run.gt, snap).tolist()) == set(seen.tolist())
    moved = {**run.snaps[10], "x_um": 5000.0}
    assert cells_in_field(run.gt, moved).size == 0


def test_nearest_cell_finds_the_cell_at_a_point(run: ImagedRun) -> None:
    k = 90
    t, table = run.snaps[k]["t_s"], run.tables[k]
    xy = np.column_stack([table["x_um"], table["y_um"]])
    gap = np.hypot(*(xy[:, None] - xy[None]).transpose(2, 0, 1))
    np.fill_diagonal(gap, np.inf)
    lone = np.flatnonzero(gap.min(axis=1) > 4)
    assert lone.size > 20
    for row in lone[:20]:
        x, y = table["x_um"][row] + 1.0, table["y_um"][row] - 0.5
        assert nearest_cell(run.gt, t, x, y) == table["id"][row]
        assert nearest_cell(run.gt, t, x, y, max_distance_um=2) == table["id"][row]
    assert nearest_cell(run.gt, t, 5000.0, 0.0, max_distance_um=50) is None
    # without a limit, the cell nearest to a point far outside the dish
    far = np.argmin(np.hypot(table["x_um"] - 5000.0, table["y_um"]))
    assert nearest_cell(run.gt, t, 5000.0, 0.0) == table["id"][far]


# ------------------------------------------------------------------ divisions
def test_fast_imaging_catches_every_division_in_the_field(run: ImagedRun) -> None:
    expected = _scored(run)
    assert len(expected) >= 5
    start = run.snaps[0]["t_s"] + PRE_MIN * 60
    result = division_capture(
        run.gt,
        run.snaps,
        fast_interval_s=FAST_S,
        region=[FIELD],
        t_start_s=start,
        t_end_s=run.snaps[-1]["t_s"],
    )
    assert result["n_divisions"] == len(expected)
    assert result["fraction_caught"] == 1.0
    assert [d["parent"] for d in result["divisions"]] == [d["parent"] for d in expected]
    for d in result["divisions"]:
        assert d["n_frames_in_window"] == pytest.approx(PRE_MIN, abs=1)
        assert d["max_gap_s"] == pytest.approx(FAST_S)
        assert d["first_fast_s"] <= d["time_s"] - 0.5 * PRE_MIN * 60

    # without a region every division is scored; those outside the field are missed
    everything = division_capture(run.truth, run.snaps, fast_interval_s=FAST_S)
    assert everything["n_divisions"] == len(run.truth["divisions"])
    outside = [d for d in everything["divisions"] if not _in_field(d)]
    assert outside and not any(d["caught"] for d in outside)
    assert 0 < everything["fraction_caught"] < 0.5


def test_slow_imaging_catches_no_division(run: ImagedRun) -> None:
    slow = run.snaps[::10]  # every 10 fast intervals
    kwargs = {"region": [FIELD], "t_start_s": run.snaps[0]["t_s"] + PRE_MIN * 60}
    result = division_capture(run.gt, slow, fast_interval_s=FAST_S, **kwargs)
    assert result["n_divisions"] == len(_scored(run))
    assert result["n_caught"] == 0
    for d in result["divisions"]:  # at most the last snap before the division
        assert d["first_fast_s"] is None or d["first_fast_s"] > d["time_s"] - 90
    # ... unless that slow rate is what counts as fast
    result = division_capture(run.gt, slow, fast_interval_s=10 * FAST_S, **kwargs)
    assert result["fraction_caught"] == 1.0


def test_a_gap_in_the_window_misses_the_division(run: ImagedRun) -> None:
    division = _scored(run)[len(_scored(run)) // 2]
    t_div = division["time_s"]
    a = t_div - 0.5 * PRE_MIN * 60  # the covered part starts here

    def score(snaps: list[Snap]) -> dict:
        result = division_capture(run.gt, snaps, fast_interval_s=FAST_S)
        return next(d for d in result["divisions"] if d["time_s"] == t_div)

    gap = [s for s in run.snaps if not a + 30 < s["t_s"] < a + 200]
    missed = score(gap)
    assert not missed["caught"]
    assert missed["max_gap_s"] > 1.5 * FAST_S
    assert missed["first_fast_s"] >= a + 200

    # stopping just before the division misses it too
    early = [s for s in run.snaps if not t_div - 150 < s["t_s"] < t_div + 200]
    late = score(early)
    assert not late["caught"] and late["first_fast_s"] is None

    # a gap before the covered part of the window does not matter
    before = [s for s in run.snaps if not a - 400 < s["t_s"] < a - 100]
    assert score(before)["caught"]
    assert score(before)["first_fast_s"] >= a - 100

    # nor does a gap that starts before it: only the part inside counts, so
    # a lone snap shortly before the covered part changes nothing
    late_start = [s for s in run.snaps if not a - 400 < s["t_s"] < a + 0.5 * FAST_S]
    assert score(late_start)["caught"]
    first = min((s for s in late_start if s["t_s"] > a), key=lambda s: s["t_s"])
    lone = {**first, "t_s": first["t_s"] - 1.6 * FAST_S}  # a gap over 1.5 F
    assert a - 1.5 * FAST_S < lone["t_s"] < a  # inside the scored span
    with_lone = sorted(late_start + [lone], key=lambda s: s["t_s"])
    assert score(with_lone)["caught"]
    # ... while the same gap inside the covered part misses the division
    inside = [s for s in run.snaps if not a + 100 < s["t_s"] < a + 100 + 2 * FAST_S]
    assert not score(inside)["caught"]


def test_live_run_report_lists_the_missed_divisions(run: ImagedRun) -> None:
    def report(snaps: list[Snap]) -> dict:
        frames = [
            {"frame_index": i, "position": "p0", "kind": "base"}
            for i in range(len(snaps))
        ]
        return live_run_report(run.truth, snaps, frames, fast_interval_s=FAST_S)[
            "divisions"
        ]

    fast = report(run.snaps)
    assert fast["n_divisions"] > 0 and fast["missed"] == []
    slow = report(run.snaps[::10])  # every 10 fast intervals: none caught
    assert slow["n_caught"] == 0 and len(slow["missed"]) == slow["n_divisions"] > 0
    for d in slow["missed"]:
        assert not d["caught"] and "first_fast_s" in d
        assert d["max_gap_s"] is None or d["max_gap_s"] > 1.5 * FAST_S


def test_division_capture_without_divisions_or_snaps(run: ImagedRun) -> None:
    nowhere = division_capture(
        run.gt, run.snaps, fast_interval_s=FAST_S, region=[(900, 900, 950, 950)]
    )
    assert nowhere == {
        "n_divisions": 0,
        "n_caught": 0,
        "fraction_caught": None,
        "divisions": [],
    }
    blind = division_capture(run.gt, [], fast_interval_s=FAST_S, region=[FIELD])
    assert blind["n_divisions"] > 0 and blind["fraction_caught"] == 0.0
    assert all(d["n_frames_in_window"] == 0 for d in blind["divisions"])
    with pytest.raises(ValueError):
        division_capture(run.gt, run.snaps, fast_interval_s=0)


# ----------------------------------------------------------------------- dose
def test_dose_summary_accounts_for_every_exposure(run: ImagedRun) -> None:
    summary = dose_summary(run.truth, run.snaps)
    n = len(run.snaps)
    own = sum(c["dose_ms"] for c in run.truth["cells"])
    assert summary["total_cell_dose_ms"] == pytest.approx(own)
    seen = sum(v.size for v in run.in_view)
    assert summary["total_cell_dose_ms"] == pytest.approx(10.0 * seen)
    assert summary["n_frames"] == n
    assert summary["exposure_ms"] == pytest.approx(10.0 * n)
    assert summary["illumination_ms_mm2"] == pytest.approx(10.0 * n * 0.04)
    assert summary["max_cell_dose_ms"] == pytest.approx(
        max(c["total_dose_ms"] for c in run.truth["cells"])
    )
    assert summary["cells_harmed"] == 0

    wide = [{**s, "width_um": 400.0, "height_um": 400.0} for s in run.snaps]
    assert dose_summary(run.gt, wide)["illumination_ms_mm2"] == pytest.approx(
        4 * summary["illumination_ms_mm2"]
    )
    bright = [{**s, "intensity": 2.0} for s in run.snaps]
    assert dose_summary(run.gt, bright)["exposure_ms"] == pytest.approx(20.0 * n)

    # every dosed cell was in the field; none far from it was
    field = dose_summary(run.gt, run.snaps, region=[FIELD])
    assert field["total_cell_dose_ms"] == pytest.approx(own)
    assert field["n_cells"] < summary["n_cells"]
    corner = dose_summary(run.gt, run.snaps, region=[(220, 220, 300, 300)])
    assert corner["n_cells"] > 0 and corner["total_cell_dose_ms"] == 0


@pytest.fixture(scope="module")
def harmed() -> tuple[dict, list[int], list[int], float]:
    """A specimen with one cell killed by light and one arrested, at 300 s."""
    spec = LiveSpecimen(2, bounds_um=(-200, -200, 200, 200))
    spec.advance(300)
    table = spec.cell_table()
    far = np.hypot(table["x_um"] - table["x_um"][0], table["y_um"] - table["y_um"][0])
    kill, arrest = 0, int(np.argmax(far))
    fields = {}
    for row, exposure in ((kill, 25_000.0), (arrest, 7_000.0)):
        x, y = float(table["x_um"][row]), float(table["y_um"][row])
        fields[row] = spec.cells_in_view(x, y, (10, 10), 1.0).tolist()
        _expose(spec, x, y, shape=(10, 10), pixel_size_um=1.0, exposure_ms=exposure)
    t_dose = spec.time_s
    spec.advance(600)
    return spec.ground_truth(), fields[kill], fields[arrest], t_dose


def test_dose_summary_counts_harmed_cells(harmed) -> None:
    truth, killed, arrested, _ = harmed
    assert killed and arrested and not set(killed) & set(arrested)
    summary = dose_summary(truth, [])
    assert summary["cells_dead"] == len(killed)
    assert summary["cells_arrested"] == len(killed) + len(arrested)  # dead too
    assert summary["cells_harmed"] == len(killed) + len(arrested)
    assert summary["max_cell_dose_ms"] == pytest.approx(25_000.0)
    assert summary["n_frames"] == 0 and summary["illumination_ms_mm2"] == 0


# --------------------------------------------------------------------- follow
def test_follow_summary_on_the_cell_and_far_away(run: ImagedRun) -> None:
    followed = run.truth["cells"][run.followed - 1]
    frames = run.follow_frames
    assert followed["fate"] == "divided"  # the lineage is followed past it
    assert frames[0]["t_s"] < followed["end_s"] < frames[-1]["t_s"]

    on = follow_summary(run.gt, frames, cell_id=run.followed)
    assert on["n_frames"] == len(frames) == len(on["offsets_um"])
    assert on["fraction_within"] == 1.0
    assert on["max_offset_fraction"] < 0.01 and on["lost"] == 0

    near = [{**f, "x_um": f["x_um"] + 0.05 * FOLLOW_WIDTH_UM} for f in frames]
    assert follow_summary(run.gt, near, cell_id=run.followed)[
        "median_offset_um"
    ] == pytest.approx(0.05 * FOLLOW_WIDTH_UM, abs=0.01)
    assert follow_summary(run.gt, near, cell_id=run.followed)["fraction_within"] == 1

    stay = [{**f, "x_um": 250.0, "y_um": -250.0} for f in frames]
    away = follow_summary(run.truth, stay, cell_id=run.followed)
    assert away["fraction_within"] == 0.0 and away["lost"] == 0
    assert away["max_offset_fraction"] > 1

    empty = follow_summary(run.gt, [], cell_id=run.followed)
    assert empty["n_frames"] == 0 and empty["fraction_within"] is None


def test_follow_summary_loses_a_dead_cell(harmed) -> None:
    truth, killed, _, t_dose = harmed
    gt = GroundTruth(truth)
    cell = killed[0]
    times = np.arange(gt.start_s[gt.rows(cell)], truth["time_s"], 30.0)
    frames = []
    for t in times:
        x, y = cell_position(gt, cell, t)
        frames.append(
            Snap(
                t_s=t,
                x_um=x,
                y_um=y,
                width_um=100,
                height_um=100,
                exposure_ms=1,
                intensity=1,
            )
        )
    summary = follow_summary(gt, frames, cell_id=cell)
    assert summary["lost"] == np.count_nonzero(times >= t_dose) > 0
    offsets = np.array(summary["offsets_um"])
    assert np.all(np.isinf(offsets[times >= t_dose]))
    assert np.all(offsets[times < t_dose] < 1e-6)
    assert summary["fraction_within"] == pytest.approx(np.mean(times < t_dose))
