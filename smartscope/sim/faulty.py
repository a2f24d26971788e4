"""Fault-injecting Python devices (pymmcore-plus unicore) for fault tests and demos.

``hardware_configs/faulty.cfg`` declares them next to the demo's filter wheels,
focus and shutter::

    #py pyDevice,Camera,smartscope.sim.faulty,FaultyCamera
    #py pyDevice,XY,smartscope.sim.faulty,FaultyXYStage

Both work until told to fail, through properties that an experiment can set
(``properties: [[Camera, FailAtSnap, "5"]]``) or a config line
(``#py Property,Camera,FailAtSnap,5``):

``FailAtSnap`` / ``FailAtMove`` (0: never)
    The attempt (counted from 1 since the property was last set) at which the
    device starts raising.
``FailTimes`` (0: for good)
    How many attempts in a row raise before the device recovers: 1 or 2 is a
    transient fault that a retry gets past.

``SnapAttempts`` / ``MoveAttempts`` (read-only) count the attempts, failed
ones included. The camera images fluorescent beads fixed in stage coordinates
(a seeded lattice, 1 µm/px at 10X), so the rule-based segmenter finds objects.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np
from pymmcore_plus.experimental.unicore import XYStageDevice, pymm_property

from smartscope.sim._device import SpecimenCamera

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = ["FaultyCamera", "FaultyXYStage", "InjectedFault"]

#: bead lattice pitch (µm) and Gaussian sigma (µm) of the camera's specimen
_PITCH_UM = 40.0
_SIGMA_UM = 2.0


class InjectedFault(RuntimeError):
    """The error a faulty device raises."""


class _Faults:
    """Counts attempts; says whether this one fails."""

    def __init__(self) -> None:
        self.fail_at = 0
        self.fail_times = 0
        self.attempts = 0

    def attempt(self, what: str) -> None:
        self.attempts += 1
        n = self.attempts
        if self.fail_at <= 0 or n < self.fail_at:
            return
        if self.fail_times <= 0 or n < self.fail_at + self.fail_times:
            raise InjectedFault(f"injected fault at {what} attempt {n}")


def render_beads(
    cx: float,
    cy: float,
    z_um: float,
    *,
    shape: tuple[int, int],
    pixel_size_um: float,
    exposure_ms: float,
    intensity: float,
) -> np.ndarray:
    """Beads on a jittered 40 µm lattice around stage ``(cx, cy)``, in focus at 0."""
    h, w = shape
    x0 = cx - (w - 1) / 2 * pixel_size_um
    y0 = cy - (h - 1) / 2 * pixel_size_um
    rng = np.random.default_rng((round(cx) * 73856093 ^ round(cy) * 19349663) % 2**32)
    image = rng.poisson(100.0, size=(h, w)).astype(np.float32)
    sigma = np.hypot(_SIGMA_UM, 0.5 * abs(z_um)) / pixel_size_um
    amp = 40.0 * exposure_ms * intensity * (_SIGMA_UM / pixel_size_um / sigma) ** 2
    i0 = int(np.floor(x0 / _PITCH_UM)) - 1
    i1 = int(np.ceil((x0 + w * pixel_size_um) / _PITCH_UM)) + 1
    j0 = int(np.floor(y0 / _PITCH_UM)) - 1
    j1 = int(np.ceil((y0 + h * pixel_size_um) / _PITCH_UM)) + 1
    half = int(np.ceil(4 * sigma))
    for i in range(i0, i1 + 1):
        for j in range(j0, j1 + 1):
            jitter = np.random.default_rng((i * 7919 + j * 104729) % 2**32).uniform(
                -10, 10, 2
            )
            bx = (i * _PITCH_UM + jitter[0] - x0) / pixel_size_um
            by = (j * _PITCH_UM + jitter[1] - y0) / pixel_size_um
            c0, c1 = max(0, int(bx) - half), min(w, int(bx) + half + 1)
            r0, r1 = max(0, int(by) - half), min(h, int(by) + half + 1)
            if c0 >= c1 or r0 >= r1:
                continue
            xs = np.arange(c0, c1) - bx
            ys = np.arange(r0, r1) - by
            image[r0:r1, c0:c1] += amp * np.exp(
                -(ys[:, None] ** 2 + xs[None, :] ** 2) / (2 * sigma**2)
            )
    return np.clip(image, 0, 65535).astype(np.uint16)


class FaultyCamera(SpecimenCamera):
    """A 256 × 256, 16-bit bead camera that fails its snaps when told to.

    Properties: ``FailAtSnap``, ``FailTimes``, ``SnapAttempts`` (see the module
    doc), ``Exposure``.
    """

    SENSOR_SHAPE = (256, 256)

    def __init__(self) -> None:
        super().__init__()
        self._faults = _Faults()

    @pymm_property(limits=(0, 2**31 - 1), name="FailAtSnap", property_type=int)
    def fail_at_snap(self) -> int:
        """Snap attempt at which faults start (0: never)."""
        return self._faults.fail_at

    @fail_at_snap.setter
    def fail_at_snap(self, value: int) -> None:
        self._faults.fail_at = int(value)
        self._faults.attempts = 0

    @pymm_property(limits=(0, 2**31 - 1), name="FailTimes", property_type=int)
    def fail_times(self) -> int:
        """Attempts in a row that fail (0: every one from then on)."""
        return self._faults.fail_times

    @fail_times.setter
    def fail_times(self, value: int) -> None:
        self._faults.fail_times = int(value)

    @pymm_property(is_read_only=True, name="SnapAttempts", property_type=int)
    def snap_attempts(self) -> int:
        """Snap attempts so far (failed ones included)."""
        return self._faults.attempts

    def snap(self, buffer: np.ndarray) -> Mapping:
        self._faults.attempt("snap")
        start = time.perf_counter()
        self._expose(buffer, render_beads, start, start)
        return {}


class FaultyXYStage(XYStageDevice):
    """An XY stage (instant moves) that fails its moves when told to.

    Properties: ``FailAtMove``, ``FailTimes``, ``MoveAttempts`` (see the module
    doc).
    """

    def __init__(self) -> None:
        super().__init__()
        self._xy = (0.0, 0.0)
        self._faults = _Faults()

    @pymm_property(limits=(0, 2**31 - 1), name="FailAtMove", property_type=int)
    def fail_at_move(self) -> int:
        """Move attempt at which faults start (0: never)."""
        return self._faults.fail_at

    @fail_at_move.setter
    def fail_at_move(self, value: int) -> None:
        self._faults.fail_at = int(value)
        self._faults.attempts = 0

    @pymm_property(limits=(0, 2**31 - 1), name="FailTimes", property_type=int)
    def fail_times(self) -> int:
        """Attempts in a row that fail (0: every one from then on)."""
        return self._faults.fail_times

    @fail_times.setter
    def fail_times(self, value: int) -> None:
        self._faults.fail_times = int(value)

    @pymm_property(is_read_only=True, name="MoveAttempts", property_type=int)
    def move_attempts(self) -> int:
        """Move attempts so far (failed ones included)."""
        return self._faults.attempts

    def set_position_um(self, x: float, y: float) -> None:
        self._faults.attempt("move")
        self._xy = (float(x), float(y))

    def get_position_um(self) -> tuple[float, float]:
        return self._xy

    def set_origin_x(self) -> None:
        self._xy = (0.0, self._xy[1])

    def set_origin_y(self) -> None:
        self._xy = (self._xy[0], 0.0)

    def home(self) -> None:
        self._xy = (0.0, 0.0)

    def stop(self) -> None:
        pass
