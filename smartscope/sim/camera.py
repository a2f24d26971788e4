"""`LiveCellCamera`: a Micro-Manager camera (unicore Python device) of a `LiveSpecimen`.

Declare it in a config file loaded by `pymmcore_plus.experimental.unicore.UniMMCore`
(see ``hardware_configs/livecells.cfg``)::

    #py pyDevice,Camera,smartscope.sim.camera,LiveCellCamera
    #py Property,Camera,Seed,0
    #py Property,Core,Camera,Camera

Each frame is rendered by the camera's `LiveSpecimen` at the current XY-stage and
focus position of the core the camera is loaded into, and the specimen's clock
follows acquisition time: every snap advances it by the real time elapsed since the
previous snap times ``Acceleration``.
"""

from __future__ import annotations

import json
import time
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pymmcore_plus.experimental.unicore import pymm_property

from smartscope.sim._device import SeededSpecimenCamera, find_camera
from smartscope.sim.specimen import LiveSpecimen

if TYPE_CHECKING:
    from collections.abc import Mapping

    from pymmcore_plus import CMMCorePlus

__all__ = ["LiveCellCamera", "live_cell_camera"]

#: every LiveCellCamera ever created (weakly), for `live_cell_camera`
_CAMERAS: weakref.WeakSet[LiveCellCamera] = weakref.WeakSet()


class LiveCellCamera(SeededSpecimenCamera):
    """A 512 × 512, 16-bit camera looking at a simulated field of live cells.

    Frames are rendered by `specimen` (a `LiveSpecimen`) at the XY-stage position and
    focus position of the core this device is loaded into, with the core's pixel
    size (1 µm/px if none is defined). Exposure and ``RelativeIntensity`` set both
    the signal and the light dose the cells in view receive.

    Properties
    ----------
    Seed : int
        Seed of the specimen. Changing it starts a new specimen at time 0.
    CellDensity : float
        Cells per mm² at time 0. Changing it starts a new specimen at time 0.
    PreDivisionMinutes : float
        Length of the visible pre-division window (simulated minutes).
    Acceleration : float
        Simulated seconds per real second. 0 freezes the specimen: frames then
        depend only on the seed, the stage and the frames taken before.
    RelativeIntensity : float
        Excitation intensity relative to nominal (scales signal and dose).
    SimulatedTime_s : float
        The specimen's clock (read-only).
    Exposure : float
        Exposure time in ms; a snap takes at least this long.

    Notes
    -----
    The camera reads the stage from the core it is loaded into (see
    `smartscope.sim._device.SpecimenCamera`); `live_cell_camera` attaches it
    directly. With a camera ROI only that part of the sample is lit and dosed.
    """

    def __init__(self) -> None:
        super().__init__()
        self._cell_density = 150.0
        self._pre_division_minutes = 15.0
        self._acceleration = 60.0
        self._specimen: LiveSpecimen | None = None
        self._last_snap: float | None = None  # perf_counter() of the last snap
        self._banked_s = 0.0  # simulated time owed from before an Acceleration change
        _CAMERAS.add(self)

    # ---------------------------------------------------------------- specimen
    @property
    def specimen(self) -> LiveSpecimen:
        """The simulated specimen this camera images (created on first use)."""
        with self._specimen_lock:
            if self._specimen is None:
                self._specimen = LiveSpecimen(
                    self._seed,
                    cell_density_per_mm2=self._cell_density,
                    pre_division_minutes=self._pre_division_minutes,
                    acceleration=self._acceleration,
                )
                self._last_snap = None
                self._banked_s = 0.0
            return self._specimen

    # -------------------------------------------------------------- properties
    @pymm_property(limits=(0.0, 5000.0), name="CellDensity", property_type=float)
    def cell_density(self) -> float:
        """Cells per mm² at time 0."""
        return self._cell_density

    @cell_density.setter
    def cell_density(self, value: float) -> None:
        if float(value) != self._cell_density:
            self._cell_density = float(value)
            self._reset_specimen()

    @pymm_property(limits=(0.0, 240.0), name="PreDivisionMinutes", property_type=float)
    def pre_division_minutes(self) -> float:
        """Length of the pre-division window (simulated minutes)."""
        return self._pre_division_minutes

    @pre_division_minutes.setter
    def pre_division_minutes(self, value: float) -> None:
        self._pre_division_minutes = float(value)
        if self._specimen is not None:
            self._specimen.pre_division_minutes = float(value)

    @pymm_property(limits=(0.0, 100_000.0), name="Acceleration", property_type=float)
    def acceleration(self) -> float:
        """Simulated seconds per real second."""
        return self._acceleration

    @acceleration.setter
    def acceleration(self, value: float) -> None:
        if self._last_snap is not None:  # time since the last snap ran at the old rate
            now = time.perf_counter()
            self._banked_s += (now - self._last_snap) * self._acceleration
            self._last_snap = now
        self._acceleration = float(value)
        if self._specimen is not None:
            self._specimen.acceleration = float(value)

    @pymm_property(name="SimulatedTime_s", property_type=float)
    def simulated_time_s(self) -> float:
        """The specimen's clock, in simulated seconds."""
        return self.specimen.time_s

    def write_run_files(
        self, run_dir: Path, *, fast_interval_s: float
    ) -> dict[str, Any]:
        """Score the run just made against the specimen; write the truth beside it.

        Writes ``ground_truth.json`` (the specimen's tracks, divisions, deaths
        and doses), ``snaps.jsonl`` (every exposure this camera made) and
        ``specimen_report.json`` (`smartscope.sim.evaluate.live_run_report`)
        to `run_dir`, and returns the report. `fast_interval_s` is the run's
        fast imaging interval in run seconds (a burst's). The runner calls
        this at the end of every run on a live specimen.
        """
        from smartscope.sim.evaluate import live_run_report

        def jsonl(name: str) -> list[dict[str, Any]]:
            path = run_dir / name
            if not path.is_file():
                return []
            out = []
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    out.append(json.loads(line))
                except ValueError:  # a line cut off by a crash
                    continue
            return out

        truth = self.specimen.ground_truth()
        snaps = list(self.snap_log)
        report = live_run_report(
            truth,
            snaps,
            jsonl("frames.jsonl"),
            jsonl("decisions.jsonl"),
            fast_interval_s=fast_interval_s * self.acceleration,
        )
        report["acceleration"] = self.acceleration
        report["fast_interval_run_s"] = fast_interval_s
        (run_dir / "ground_truth.json").write_text(json.dumps(truth))
        with open(run_dir / "snaps.jsonl", "w") as f:
            f.writelines(json.dumps(s) + "\n" for s in snaps)
        (run_dir / "specimen_report.json").write_text(json.dumps(report, indent=2))
        return report

    def snap(self, buffer: np.ndarray) -> Mapping:
        """Render the specimen at the current stage position into `buffer`."""
        start = time.perf_counter()
        specimen = self.specimen
        if self._last_snap is not None:
            elapsed_s = self._banked_s + (start - self._last_snap) * self._acceleration
            if elapsed_s > 0:
                specimen.advance(elapsed_s)
        self._banked_s = 0.0
        self._last_snap = start

        x_um, y_um, z_um, _, _ = self._expose(
            buffer, specimen.render, specimen.time_s, start
        )
        return {
            "SimulatedTime_s": f"{specimen.time_s:.3f}",
            "SpecimenStageX_um": f"{x_um:.3f}",
            "SpecimenStageY_um": f"{y_um:.3f}",
            "SpecimenZ_um": f"{z_um:.3f}",
        }


def live_cell_camera(core: CMMCorePlus, label: str | None = None) -> LiveCellCamera:
    """The `LiveCellCamera` device loaded into `core`.

    Parameters
    ----------
    core : UniMMCore
        The core (e.g. after ``loadSystemConfiguration("livecells.cfg")``).
    label : str | None
        Device label; ``None`` means the core's current camera.

    Returns
    -------
    LiveCellCamera
        The device instance; its ``specimen`` gives the ground truth.

    Raises
    ------
    LookupError
        If no `LiveCellCamera` with that label is loaded into `core`.
    """
    return find_camera(_CAMERAS, core, label, "LiveCellCamera")
