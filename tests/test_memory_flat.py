"""A run's memory does not grow with the plate: scheduler, statistics, storage."""

from __future__ import annotations

import numpy as np
import pytest

from smartscope._stats import StreamingPercentiles
from smartscope.bench._screen import _big_plan, _count, _drive, _traced_peak
from smartscope.rundir import Hierarchy, PositionArrays, read_position


def test_scheduler_peak_memory_is_flat_as_the_plate_grows():
    small, big = _big_plan("96-well", 2, 2), _big_plan("384-well", 4, 4)
    peaks = []
    for plan in (small, big):
        _drive(plan)  # warm useq's caches, as the bench does
        peaks.append(_traced_peak(_drive, plan) - _traced_peak(_count, plan))
    assert peaks[1] <= 1.5 * peaks[0], peaks  # 16x the fields


@pytest.mark.parametrize("seed", [0, 1])
def test_streaming_percentiles_match_numpy(seed):
    values = np.random.default_rng(seed).lognormal(0.0, 1.5, size=20_000)
    values[:50] = 0.0  # on-time events
    summary = StreamingPercentiles()
    for v in values:
        summary.add(v)
    assert len(summary) == summary.n == len(values)
    assert summary.max == values.max()
    for q in (50, 90, 99):
        assert summary.percentile(q) == pytest.approx(np.percentile(values, q), 0.02)
    assert sorted(summary) == list(summary)  # estimates, in increasing order
    assert len(list(summary)) == len(values)


def test_streaming_percentiles_small_and_empty():
    summary = StreamingPercentiles()
    assert summary.summary() == {"n": 0, "p50": None, "p99": None, "max": None}
    for v in (0.25, 0.5):
        summary.add(v)
    s = summary.summary()
    assert s["n"] == 2 and s["max"] == 0.5
    assert s["p50"] == pytest.approx(0.375, rel=0.01)
    assert s["p99"] == pytest.approx(np.percentile([0.25, 0.5], 99), rel=0.01)


def _tag(position: str, visit: int = 0) -> dict:
    return {"position": position, "visit": visit, "c": 0, "z": 0}


def test_storage_caps_open_arrays_and_keeps_every_frame(tmp_path):
    arrays = PositionArrays(Hierarchy.create(tmp_path, None), max_open=4)
    n_open = []
    for k in range(20):
        for t in range(2):
            arrays.write(np.full((8, 8), k * 10 + t, np.uint16), _tag(f"p{k:03d}", t))
            n_open.append(arrays.n_open)
    assert max(n_open) == 4
    # a late frame of a closed position is kept, not written over its array
    arrays.write(np.full((8, 8), 999, np.uint16), _tag("p000", 2))
    arrays.close()
    assert arrays.n_positions == 20 and arrays.n_overflow == 1
    assert len(arrays.positions) == 20
    assert len(list((tmp_path / "overflow").glob("p000_t2_*.tif"))) == 1
    for k in range(20):
        data = read_position(tmp_path, f"p{k:03d}")
        assert data.shape == (2, 1, 1, 8, 8)
        assert data[:, 0, 0, 0, 0].tolist() == [k * 10, k * 10 + 1]


def test_finish_closes_one_position(tmp_path):
    arrays = PositionArrays(Hierarchy.create(tmp_path, None))
    arrays.write(np.ones((4, 4), np.uint16), _tag("a"))
    arrays.write(np.ones((4, 4), np.uint16), _tag("b"))
    assert arrays.finish("a") and not arrays.finish("a")
    assert arrays.n_open == 1
    assert read_position(tmp_path, "a").shape == (1, 1, 1, 4, 4)
    arrays.close()
