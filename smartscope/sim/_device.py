"""`SpecimenCamera`: what the simulated cameras share (unicore Python devices).

A unicore Python device gets no API to read other devices: its ``core`` is a
proxy exposing only ``events`` (signals a device may emit), and the demo stages'
position signals are not emitted reliably. A `SpecimenCamera` therefore finds
the `UniMMCore` it is loaded into (the core whose ``events`` is the very signal
group unicore handed the device) once, keeps a weak reference, and asks it for
``getXYPosition()``, ``getPosition()`` and ``getPixelSizeUm()`` at every snap.
It renders only the camera ROI (a field stop: only that part of the sample is
lit) and logs every exposure. A `SeededSpecimenCamera` also builds its specimen
from a ``Seed`` property and has a ``RelativeIntensity`` (the live-cell and the
plate cameras).

Sequence acquisition (``core.startSequenceAcquisition``, what a hardware-sequenced
stream uses) streams frames back to back, each rendered at the stage position
of its own exposure and logged like a snap; `SpecimenCamera.sequence_log`
records every sequence. ``SequenceAcquisition: No`` makes the camera refuse
sequences, as a camera without that feature does.
"""

from __future__ import annotations

import math
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from pymmcore_plus import CMMCorePlus, Keyword
from pymmcore_plus.experimental.unicore import SimpleCameraDevice, pymm_property

from smartscope._threads import tracked_objects

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping

__all__ = ["SeededSpecimenCamera", "SpecimenCamera", "find_camera"]

#: longest `SpecimenCamera.snap_log` kept (about 130 MB of dicts)
MAX_LOG = 200_000

C = TypeVar("C", bound="SpecimenCamera")


class SpecimenCamera(SimpleCameraDevice):
    """A 512 × 512, 16-bit camera imaging a simulated specimen at the stage.

    Subclasses provide the specimen and call `_expose` from ``snap``.
    """

    SENSOR_SHAPE: tuple[int, int] = (512, 512)

    def __init__(self) -> None:
        super().__init__()
        self._exposure_ms = 10.0
        self._intensity = 1.0
        self._core_ref: weakref.ref[CMMCorePlus] | None = None
        #: one entry per exposure: time ``t_s``, center ``x_um, y_um`` and size
        #: ``width_um, height_um`` of the field imaged, ``z_um``, ``exposure_ms``,
        #: ``intensity`` (what `smartscope.sim.evaluate` scores)
        self.snap_log: list[dict[str, float]] = []
        self.set_property_limits(Keyword.Exposure, (0.0, 10_000.0))
        self._sequence_acquisition = "Yes"
        #: one entry per sequence acquisition: ``n_requested`` (None: until
        #: stopped), ``first_snap`` (index of its first exposure in `snap_log`)
        #: and ``n_frames`` (exposures it made)
        self.sequence_log: list[dict[str, Any]] = []

    @pymm_property(
        allowed_values=("Yes", "No"), name="SequenceAcquisition", property_type=str
    )
    def sequence_acquisition(self) -> str:
        """Whether the camera streams sequences ("No": it refuses them)."""
        return self._sequence_acquisition

    @sequence_acquisition.setter
    def sequence_acquisition(self, value: str) -> None:
        self._sequence_acquisition = "No" if str(value) == "No" else "Yes"

    # ------------------------------------------------------- sequence acquisition
    def start_sequence(  # type: ignore[override]
        self, n: int | None, *args: Any, **kwargs: Any
    ) -> Iterator[Mapping]:
        """Stream `n` frames (None: until stopped), each one exposure after the last.

        Unicore snaps one frame through this method too (``snapImage`` passes
        ``get_buffer`` by keyword, a sequence acquisition by position): snaps
        are neither refused nor logged as sequences.

        Raises
        ------
        NotImplementedError
            At once, for a sequence with ``SequenceAcquisition: No``.
        """
        frames = super().start_sequence(n, *args, **kwargs)
        if "get_buffer" in kwargs:  # a snap
            return frames
        if self._sequence_acquisition == "No":
            getattr(frames, "close", lambda: None)()
            raise NotImplementedError(
                f"{type(self).__name__} {self.get_label()!r}: sequence acquisition "
                "is off (SequenceAcquisition: No)"
            )
        entry: dict[str, Any] = {
            "n_requested": n,
            "first_snap": len(self.snap_log),
            "n_frames": 0,
        }
        self.sequence_log.append(entry)
        return _counted(entry, frames)

    # ------------------------------------------------------------- camera API
    def get_exposure(self) -> float:
        return self._exposure_ms

    def set_exposure(self, exposure: float) -> None:
        self._exposure_ms = max(0.0, float(exposure))

    def sensor_shape(self) -> tuple[int, int]:
        return self.SENSOR_SHAPE

    def dtype(self) -> np.dtype:
        return np.dtype(np.uint16)

    def _expose(
        self,
        buffer: np.ndarray,
        render: Callable[..., np.ndarray],
        t_s: float,
        start: float,
    ) -> tuple[float, float, float, float, float]:
        """Render the ROI field into `buffer`, log it, and last the exposure.

        Returns
        -------
        tuple
            Stage ``(x_um, y_um, z_um)`` and the imaged field's center
            ``(cx_um, cy_um)``.
        """
        x_um, y_um, z_um, pixel_size_um = self._stage_state()
        height, width = buffer.shape[:2]
        x0, y0, w, h = self._roi or (0, 0, width, height)
        cx = x_um + (x0 + (w - 1) / 2 - (width - 1) / 2) * pixel_size_um
        cy = y_um + (y0 + (h - 1) / 2 - (height - 1) / 2) * pixel_size_um
        buffer[y0 : y0 + h, x0 : x0 + w] = render(
            cx,
            cy,
            z_um,
            shape=(h, w),
            pixel_size_um=pixel_size_um,
            exposure_ms=self._exposure_ms,
            intensity=self._intensity,
        )
        if len(self.snap_log) < MAX_LOG:
            self.snap_log.append(
                {
                    "t_s": t_s,
                    "x_um": cx,
                    "y_um": cy,
                    "z_um": z_um,
                    "width_um": w * pixel_size_um,
                    "height_um": h * pixel_size_um,
                    "exposure_ms": self._exposure_ms,
                    "intensity": self._intensity,
                }
            )
        # a real exposure takes its time (and an acquisition loop should feel it)
        remaining = self._exposure_ms / 1000 - (time.perf_counter() - start)
        if remaining > 0:
            time.sleep(remaining)
        return x_um, y_um, z_um, cx, cy

    # ------------------------------------------------------------- the core
    def attach_core(self, core: CMMCorePlus) -> None:
        """Read stage positions from `core` (normally found automatically)."""
        self._core_ref = weakref.ref(core)

    def initialize(self) -> None:
        """Find the owning core while it is loading this device (see `owning_core`)."""
        super().initialize()
        self.owning_core()

    def owning_core(self) -> CMMCorePlus | None:
        """The core this device is loaded into, or ``None`` if not loaded.

        Found once among the objects the garbage collector tracks, then held
        by a weak reference. The search includes the heap a run freezes
        (`smartscope._threads.tracked_objects`).
        """
        core = self._core_ref() if self._core_ref is not None else None
        if core is not None and holds(core, self):
            return core
        try:
            signals = self.core.events.propertyChanged.instance  # type: ignore[attr-defined]
        except AttributeError:  # not loaded into a core
            return None
        for obj in tracked_objects():
            # type(), not isinstance(): that reads obj.__class__, which some
            # objects compute (torch's deprecated aliases warn)
            if issubclass(type(obj), CMMCorePlus) and obj.events is signals:
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


class SeededSpecimenCamera(SpecimenCamera):
    """A `SpecimenCamera` whose specimen is built from a seed, on first use.

    Subclasses build the specimen from `_seed` (and their own settings) into
    `_specimen` under `_specimen_lock`, and call `_reset_specimen` when a
    setting that defines it changes.

    Properties
    ----------
    Seed : int
        Seed of the specimen. Changing it builds a new specimen.
    RelativeIntensity : float
        Excitation intensity relative to nominal.
    """

    #: the specimen, built on first use; ``None`` after `_reset_specimen`
    _specimen: Any

    def __init__(self) -> None:
        super().__init__()
        self._seed = 0
        self._specimen = None
        self._specimen_lock = threading.Lock()

    def _reset_specimen(self) -> None:
        """Drop the specimen (the next use builds a new one) and the snap log."""
        with self._specimen_lock:
            self._specimen = None
            self.snap_log = []

    # -------------------------------------------------------------- properties
    @pymm_property(limits=(0, 2**31 - 1), name="Seed", property_type=int)
    def seed(self) -> int:
        """Seed of the specimen."""
        return self._seed

    @seed.setter
    def seed(self, value: int) -> None:
        if int(value) != self._seed:
            self._seed = int(value)
            self._reset_specimen()

    @pymm_property(limits=(0.0, 100.0), name="RelativeIntensity", property_type=float)
    def relative_intensity(self) -> float:
        """Excitation intensity relative to nominal."""
        return self._intensity

    @relative_intensity.setter
    def relative_intensity(self, value: float) -> None:
        self._intensity = float(value)


def holds(core: Any, device: SpecimenCamera) -> bool:
    """Whether `device` is loaded into `core` (they share one signal group)."""
    try:
        return core.events is device.core.events.propertyChanged.instance  # type: ignore[attr-defined]
    except AttributeError:
        return False


def find_camera(
    cameras: weakref.WeakSet[C], core: CMMCorePlus, label: str | None, kind: str
) -> C:
    """The camera of `cameras` labelled `label` (default: the core's camera).

    Raises
    ------
    LookupError
        If no such camera is loaded into `core`.
    """
    label = label or core.getCameraDevice()
    for camera in list(cameras):
        if camera.get_label() == label and holds(core, camera):
            camera.attach_core(core)
            return camera
    raise LookupError(f"no {kind} labelled {label!r} is loaded in this core")


def _counted(entry: dict[str, Any], frames: Iterator[Mapping]) -> Iterator[Mapping]:
    """`frames`, counting them in ``entry["n_frames"]``."""
    for meta in frames:
        entry["n_frames"] += 1
        yield meta
