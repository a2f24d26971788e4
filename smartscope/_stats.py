"""Run statistics in constant memory: a streaming percentile summary."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

__all__ = ["StreamingPercentiles"]


class StreamingPercentiles:
    """Count, max and percentiles of a stream of values, in constant memory.

    Values are counted in fixed log-spaced bins (``growth`` apart, from `low`
    to `high`), so a run of a million frames keeps the same few kilobytes as a
    run of ten. `n`, `min` and `max` are exact; `percentile` is an estimate
    within about half a bin (±1 % with the default ``growth=1.02``) of
    numpy's ``np.percentile`` (linear interpolation) on the same values.
    Values below `low` (including zero and negatives) count as `low`'s
    underflow bin and are estimated as the exact minimum; values above `high`
    as the exact maximum.

    Parameters
    ----------
    low, high : float
        Range of the log-spaced bins (same unit as the values).
    growth : float
        Ratio between the edges of consecutive bins.
    """

    def __init__(
        self, low: float = 1e-6, high: float = 1e7, growth: float = 1.02
    ) -> None:
        if not (0 < low < high and growth > 1):
            raise ValueError("need 0 < low < high and growth > 1")
        self.low = float(low)
        self._log_low = math.log(low)
        self._log_growth = math.log(growth)
        self._n_bins = math.ceil(math.log(high / low) / self._log_growth)
        # bin 0: below `low`; 1.._n_bins: log bins; _n_bins + 1: above `high`
        self._counts = np.zeros(self._n_bins + 2, dtype=np.int64)
        self.n = 0
        self.min = math.inf
        self.max = -math.inf

    def add(self, value: float) -> None:
        """Count one value (NaN is ignored)."""
        value = float(value)
        if math.isnan(value):
            return
        self.n += 1
        self.min = min(self.min, value)
        self.max = max(self.max, value)
        if value < self.low:
            i = 0
        else:
            i = int((math.log(value) - self._log_low) / self._log_growth) + 1
            i = min(i, self._n_bins + 1)
        self._counts[i] += 1

    def __len__(self) -> int:
        return self.n

    def _bin_value(self, i: int) -> float:
        """Representative value of bin `i`: its geometric centre, clamped."""
        if i == 0:
            return self.min
        if i > self._n_bins:
            return self.max
        centre = math.exp(self._log_low + (i - 0.5) * self._log_growth)
        return min(max(centre, self.min), self.max)

    def _ranked(self, k: int, cum: np.ndarray) -> float:
        """Estimate of the `k`-th smallest value (0-based)."""
        if k <= 0:
            return self.min
        if k >= self.n - 1:
            return self.max
        return self._bin_value(int(np.searchsorted(cum, k, side="right")))

    def percentile(self, q: float) -> float | None:
        """Estimate of ``np.percentile(values, q)``; None before any value."""
        if self.n == 0:
            return None
        rank = (self.n - 1) * float(q) / 100.0
        lo = math.floor(rank)
        cum = np.cumsum(self._counts)
        v_lo = self._ranked(lo, cum)
        if rank == lo:
            return v_lo
        return v_lo + (rank - lo) * (self._ranked(lo + 1, cum) - v_lo)

    def __iter__(self) -> Iterator[float]:
        """Each counted value's estimate, in increasing order (n values)."""
        for i in np.flatnonzero(self._counts):
            value = self._bin_value(int(i))
            for _ in range(int(self._counts[i])):
                yield value

    def summary(self, digits: int = 4) -> dict[str, float | int | None]:
        """``{"n", "p50", "p99", "max"}``, rounded; None where nothing was counted."""
        if self.n == 0:
            return {"n": 0, "p50": None, "p99": None, "max": None}
        p50, p99 = self.percentile(50), self.percentile(99)
        return {
            "n": self.n,
            "p50": round(float(p50), digits),  # type: ignore[arg-type]
            "p99": round(float(p99), digits),  # type: ignore[arg-type]
            "max": round(self.max, digits),
        }
