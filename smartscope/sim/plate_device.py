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

import gc
import math
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any

import numpy as np
from pymmcore_plus import CMMCorePlus, Keyword
from pymmcore_plus.experimental.unicore import SimpleCameraDevice, pymm_property

from smartscope.sim.plate import PlateSpecimen

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = ["PlateCamera", "plate_camera"]

#: every PlateCamera ever created (weakly), for `plate_camera`
_CAMERAS: weakref.WeakSet[PlateCamera] = weakref.WeakSet()
#: longest `PlateCamera.snap_log` kept
_MAX_LOG = 200_000
#: plates the ``Plate`` property offers
_PLATES = ("96-well", "384-well")


class PlateCamera(SimpleCameraDevice):
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
    Like `smartscope.sim.LiveCellCamera`, the camera finds the `UniMMCore` it is
    loaded into (the core whose ``events`` is the signal group unicore handed the
    device) once, keeps a weak reference, and asks it for ``getXYPosition()``,
    ``getPosition()`` and ``getPixelSizeUm()`` at every snap. `plate_camera`
    attaches it directly.

    `snap_log` has one entry per exposure in `LiveCellCamera`'s format; ``t_s`` is
    the real time (s) since the first snap of the current plate (a fixed specimen
    has no clock of its own).
    """

    SENSOR_SHAPE: tuple[int, int] = (512, 512)

    def __init__(self) -> None:
        super().__init__()
        self._exposure_ms = 10.0
        self._seed = 0
        self._plate = _PLATES[0]
        self._empty_fraction = 0.15
        self._hit_fraction = 0.05
        self._intensity = 1.0
        self._specimen: PlateSpecimen | None = None
        self._specimen_lock = threading.Lock()
        self._t0: float | None = None  # perf_counter() of the plate's first snap
        self._core_ref: weakref.ref[CMMCorePlus] | None = None
        #: one entry per exposure: time ``t_s``, center ``x_um, y_um`` and size
        #: ``width_um, height_um`` of the field imaged, ``z_um``, ``exposure_ms``,
        #: ``intensity`` (the format of `LiveCellCamera.snap_log`)
        self.snap_log: list[dict[str, float]] = []
        self.set_property_limits(Keyword.Exposure, (0.0, 10_000.0))
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

    def _reset_specimen(self) -> None:
        with self._specimen_lock:
            self._specimen = None
            self.snap_log = []

    # -------------------------------------------------------------- properties
    @pymm_property(limits=(0, 2**31 - 1), name="Seed", property_type=int)
    def seed(self) -> int:
        """Seed of the plate."""
        return self._seed

    @seed.setter
    def seed(self, value: int) -> None:
        if int(value) != self._seed:
            self._seed = int(value)
            self._reset_specimen()

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

    @pymm_property(limits=(0.0, 100.0), name="RelativeIntensity", property_type=float)
    def relative_intensity(self) -> float:
        """Excitation intensity relative to nominal."""
        return self._intensity

    @relative_intensity.setter
    def relative_intensity(self, value: float) -> None:
        self._intensity = float(value)

    # ------------------------------------------------------------ camera API
    def get_exposure(self) -> float:
        return self._exposure_ms

    def set_exposure(self, exposure: float) -> None:
        self._exposure_ms = max(0.0, float(exposure))

    def sensor_shape(self) -> tuple[int, int]:
        return self.SENSOR_SHAPE

    def dtype(self) -> np.dtype:
        return np.dtype(np.uint16)

    def snap(self, buffer: np.ndarray) -> Mapping:
        """Render the plate at the current stage position into `buffer`."""
        start = time.perf_counter()
        specimen = self.specimen
        if self._t0 is None:
            self._t0 = start
        x_um, y_um, z_um, pixel_size_um = self._stage_state()
        # with a ROI only that part of the sensor is read out: render just it
        height, width = buffer.shape[:2]
        x0, y0, w, h = self._roi or (0, 0, width, height)
        cx = x_um + (x0 + (w - 1) / 2 - (width - 1) / 2) * pixel_size_um
        cy = y_um + (y0 + (h - 1) / 2 - (height - 1) / 2) * pixel_size_um
        buffer[y0 : y0 + h, x0 : x0 + w] = specimen.render(
            cx,
            cy,
            z_um,
            shape=(h, w),
            pixel_size_um=pixel_size_um,
            exposure_ms=self._exposure_ms,
            intensity=self._intensity,
        )
        if len(self.snap_log) < _MAX_LOG:
            self.snap_log.append(
                {
                    "t_s": start - self._t0,
                    "x_um": cx,
                    "y_um": cy,
                    "z_um": z_um,
                    "width_um": w * pixel_size_um,
                    "height_um": h * pixel_size_um,
                    "exposure_ms": self._exposure_ms,
                    "intensity": self._intensity,
                }
            )
        remaining = self._exposure_ms / 1000 - (time.perf_counter() - start)
        if remaining > 0:
            time.sleep(remaining)
        return {
            "PlateWell": specimen.well_at(cx, cy) or "",
            "SpecimenStageX_um": f"{x_um:.3f}",
            "SpecimenStageY_um": f"{y_um:.3f}",
            "SpecimenZ_um": f"{z_um:.3f}",
        }

    # ------------------------------------------------------------- the core
    def attach_core(self, core: CMMCorePlus) -> None:
        """Read stage positions from `core` (normally found automatically)."""
        self._core_ref = weakref.ref(core)

    def owning_core(self) -> CMMCorePlus | None:
        """The core this device is loaded into, or ``None`` if not loaded."""
        core = self._core_ref() if self._core_ref is not None else None
        if core is not None and _holds(core, self):
            return core
        try:
            signals = self.core.events.propertyChanged.instance
        except AttributeError:  # not loaded into a core
            return None
        for obj in gc.get_objects():
            if isinstance(obj, CMMCorePlus) and obj.events is signals:
                self._core_ref = weakref.ref(obj)
                return obj
        return None  # pragma: no cover - a loaded device always has a core

    def _stage_state(self) -> tuple[float, float, float, float]:
        """``(x_um, y_um, z_um, pixel_size_um)`` read from the owning core."""
        core = self.owning_core()
        if core is None:
            return 0.0, 0.0, 0.0, 1.0
        x_um = y_um = z_um = 0.0
        if core.getXYStageDevice():
            x_um, y_um = (float(v) for v in core.getXYPosition())
        if core.getFocusDevice():
            z_um = float(core.getPosition())
        pixel_size_um = float(core.getPixelSizeUm())
        if not math.isfinite(pixel_size_um) or pixel_size_um <= 0:
            pixel_size_um = 1.0
        return x_um, y_um, z_um, pixel_size_um


def _holds(core: Any, device: PlateCamera) -> bool:
    """Whether `device` is loaded into `core` (they share one signal group)."""
    try:
        return core.events is device.core.events.propertyChanged.instance
    except AttributeError:
        return False


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
    label = label or core.getCameraDevice()
    for camera in list(_CAMERAS):
        if camera.get_label() == label and _holds(core, camera):
            camera.attach_core(core)
            return camera
    raise LookupError(f"no PlateCamera labelled {label!r} is loaded in this core")
