"""`PlateCamera`: a Micro-Manager camera (unicore Python device) of a `PlateSpecimen`.

Declare it in a config file loaded by `pymmcore_plus.experimental.unicore.UniMMCore`
(see ``hardware_configs/plate.cfg``)::

    #py pyDevice,Camera,smartscope.sim.plate_device,PlateCamera
    #py Property,Camera,Plate,96-well
    #py Property,Core,Camera,Camera

Each frame is rendered by the camera's `PlateSpecimen` (a fixed-cell multi-well
plate with A1 centered at stage ``(0, 0)``) at the current XY-stage and focus
position of the core the camera is loaded into.
"""

from __future__ import annotations

import time
import weakref
from typing import TYPE_CHECKING

import numpy as np
from pymmcore_plus.experimental.unicore import pymm_property

from smartscope.sim._device import SeededSpecimenCamera, find_camera
from smartscope.sim.plate import PlateSpecimen

if TYPE_CHECKING:
    from collections.abc import Mapping

    from pymmcore_plus import CMMCorePlus

__all__ = ["PlateCamera", "plate_camera"]

#: every PlateCamera ever created (weakly), for `plate_camera`
_CAMERAS: weakref.WeakSet[PlateCamera] = weakref.WeakSet()
#: plates the ``Plate`` property offers
_PLATES = ("96-well", "384-well")


class PlateCamera(SeededSpecimenCamera):
    """A 512 × 512, 16-bit camera looking at a simulated multi-well plate.

    Frames are rendered by `specimen` (a `PlateSpecimen`) at the XY-stage position
    and focus position of the core this device is loaded into, with the core's
    pixel size (1 µm/px if none is defined).

    Properties
    ----------
    Seed : int
        Seed of the plate. Changing it builds a new plate.
    Plate : str
        ``"96-well"`` or ``"384-well"``. Changing it builds a new plate.
    EmptyFraction : float
        Fraction of empty wells. Changing it builds a new plate.
    HitFraction : float
        Fraction of hit wells. Changing it builds a new plate.
    RelativeIntensity : float
        Excitation intensity relative to nominal (scales the signal).
    Exposure : float
        Exposure time in ms; a snap takes at least this long.

    Notes
    -----
    The camera reads the stage from the core it is loaded into (see
    `smartscope.sim._device.SpecimenCamera`); `plate_camera` attaches it directly.

    `snap_log` has one entry per exposure in `LiveCellCamera`'s format; ``t_s`` is
    the real time (s) since the first snap of the current plate (a fixed specimen
    has no clock of its own).
    """

    def __init__(self) -> None:
        super().__init__()
        self._plate = _PLATES[0]
        self._empty_fraction = 0.15
        self._hit_fraction = 0.05
        self._specimen: PlateSpecimen | None = None
        self._t0: float | None = None  # perf_counter() of the plate's first snap
        _CAMERAS.add(self)

    # ---------------------------------------------------------------- specimen
    @property
    def specimen(self) -> PlateSpecimen:
        """The simulated plate this camera images (built on first use)."""
        with self._specimen_lock:
            if self._specimen is None:
                self._specimen = PlateSpecimen(
                    self._seed,
                    plate=self._plate,
                    empty_fraction=self._empty_fraction,
                    hit_fraction=self._hit_fraction,
                )
                self._t0 = None
            return self._specimen

    # -------------------------------------------------------------- properties
    @pymm_property(allowed_values=_PLATES, name="Plate", property_type=str)
    def plate(self) -> str:
        """Plate type."""
        return self._plate

    @plate.setter
    def plate(self, value: str) -> None:
        if str(value) != self._plate:
            self._plate = str(value)
            self._reset_specimen()

    @pymm_property(limits=(0.0, 1.0), name="EmptyFraction", property_type=float)
    def empty_fraction(self) -> float:
        """Fraction of empty wells."""
        return self._empty_fraction

    @empty_fraction.setter
    def empty_fraction(self, value: float) -> None:
        if float(value) != self._empty_fraction:
            self._empty_fraction = float(value)
            self._reset_specimen()

    @pymm_property(limits=(0.0, 1.0), name="HitFraction", property_type=float)
    def hit_fraction(self) -> float:
        """Fraction of hit wells."""
        return self._hit_fraction

    @hit_fraction.setter
    def hit_fraction(self, value: float) -> None:
        if float(value) != self._hit_fraction:
            self._hit_fraction = float(value)
            self._reset_specimen()

    def snap(self, buffer: np.ndarray) -> Mapping:
        """Render the plate at the current stage position into `buffer`."""
        start = time.perf_counter()
        specimen = self.specimen
        if self._t0 is None:
            self._t0 = start
        x_um, y_um, z_um, cx, cy = self._expose(
            buffer, specimen.render, start - self._t0, start
        )
        return {
            "PlateWell": specimen.well_at(cx, cy) or "",
            "SpecimenStageX_um": f"{x_um:.3f}",
            "SpecimenStageY_um": f"{y_um:.3f}",
            "SpecimenZ_um": f"{z_um:.3f}",
        }


def plate_camera(core: CMMCorePlus, label: str | None = None) -> PlateCamera:
    """The `PlateCamera` device loaded into `core`.

    Parameters
    ----------
    core : UniMMCore
        The core (e.g. after ``loadSystemConfiguration("plate.cfg")``).
    label : str | None
        Device label; ``None`` means the core's current camera.

    Returns
    -------
    PlateCamera
        The device instance; its ``specimen`` gives the ground truth.

    Raises
    ------
    LookupError
        If no `PlateCamera` with that label is loaded into `core`.
    """
    return find_camera(_CAMERAS, core, label, "PlateCamera")
