"""`LiveSpecimen`: a reproducible field of living, dividing cells with ground truth.

Everything is in *stage* coordinates (µm) and *simulated* seconds. The specimen is a
population of nuclei on a dish: each cell migrates (persistent random walk), grows
through its cell cycle and divides; for a while before dividing it rounds up,
shrinks a little and brightens (chromatin condensation), which is the signature a
smart microscope is meant to catch. Light harms: every exposure bleaches the
fluorescence of the cells it illuminates and adds to their dose; above one dose a
cell no longer divides, above a higher one it dies (dims and stops moving).

`LiveSpecimen.render` images a field of view the way a widefield fluorescence camera
would (defocus blur, shot and read noise, camera offset) and applies that
exposure's dose; `LiveSpecimen.ground_truth` and `LiveSpecimen.truth_labels` tell
what really happened and what really is where.
"""

from __future__ import annotations

import functools
import itertools
import math
import threading
from typing import Any

import numpy as np

from smartscope.sim._render import (
    TEXTURE_PERIOD_UM,
    FluorescenceImaging,
    Nuclei,
    check_field,
    chromatin_texture,
    defocused,
    draw_nuclei,
    label_nuclei,
)

__all__ = ["LiveSpecimen"]

# per-cell state: name -> dtype. One row per cell that ever existed (id = row + 1).
_FIELDS: dict[str, type] = {
    "parent": np.int64,  # parent id, 0 for cells present at the start
    "born_s": np.float64,  # time of birth (NaN: present at the start)
    "end_s": np.float64,  # time of division (NaN: not divided)
    "death_s": np.float64,  # time of death (NaN: alive)
    "arrest_s": np.float64,  # time division was blocked by light (NaN: never)
    "cycle_start_s": np.float64,  # start of the current cycle (shifts when quiescent)
    "cycle_s": np.float64,  # cell-cycle length
    "x": np.float64,  # stage µm
    "y": np.float64,
    "theta": np.float64,  # heading of migration (rad); also the nucleus' long axis
    "speed": np.float64,  # µm/s
    "r0": np.float64,  # equivalent radius at birth (µm)
    "aspect": np.float64,  # minor/major axis ratio in interphase
    "bright": np.float64,  # relative brightness of this cell's nucleus
    "dose": np.float64,  # light dose received by this cell (ms at intensity 1)
    "inherited_dose": np.float64,  # dose received by its ancestors
    "tu": np.float64,  # offset of this nucleus in the chromatin texture (µm)
    "tv": np.float64,
    "nu": np.float64,  # nucleolus position, in units of the semi-axes
    "nv": np.float64,
}


class LiveSpecimen(FluorescenceImaging):
    """A simulated field of live cells in stage coordinates, reproducible from a seed.

    Parameters
    ----------
    seed : int
        Seed of every random choice (cells, their fates, camera noise). Two
        specimens with the same seed and parameters that are advanced and rendered
        the same way are identical.
    cell_density_per_mm2 : float
        Cells per mm² at time 0. The default gives ~40 cells in a 512 × 512 µm field.
    bounds_um : (float, float, float, float)
        ``(x_min, y_min, x_max, y_max)`` of the dish area populated with cells.
    pre_division_minutes : float
        Length of the visible pre-division window (rounding, shrinking,
        brightening) before each division, in simulated minutes.
    cell_cycle_hours : float
        Mean cell-cycle length (simulated hours; log-normal, CV ~15 %).
    acceleration : float
        Simulated seconds per real second. Not used by the specimen itself: a
        camera device advances the specimen by real time × `acceleration`.
    focus_um : float
        Z position (µm) at which the cells are in focus.
    condensation_brightness : float
        Brightness factor of a cell at the height of its pre-division window.
    bleach_dose_ms : float
        Dose (ms of exposure at relative intensity 1) that bleaches a cell's
        fluorescence to 1/e.
    arrest_dose_ms : float
        Total dose above which a cell no longer divides.
    death_dose_ms : float
        Total dose above which a cell dies: it stops moving and dims.
    max_cells : int | None
        Carrying capacity of the dish: once this many cells live, cells that have
        not yet entered their pre-division window pause their cycle. ``None``: eight
        times the initial population.
    track_interval_s : float
        Ground-truth positions are recorded at least this often (simulated s).

    Notes
    -----
    Images follow `smartscope.Microscope`'s convention for an identity pixel
    affine: pixel column ``c`` and row ``r`` of a ``(h, w)`` image taken with the
    stage at ``(x, y)`` look at stage point
    ``(x + (c - (w - 1) / 2) * pixel_size_um, y + (r - (h - 1) / 2) * pixel_size_um)``.

    Dose is counted in ms of exposure at relative intensity 1; daughters inherit
    their parent's total dose (and its bleaching). A cell is illuminated by an
    exposure when its center lies in the imaged field of view.

    Brightness, optics and camera (`photons_per_ms`, `defocus_blur_per_um`,
    `offset_adu`, ...) are those of `smartscope.sim._render.FluorescenceImaging`.

    All public methods are thread-safe: a camera may render in its acquisition
    thread while another thread reads the ground truth.
    """

    #: relative amplitude and period (s) of the slow drift of brightness
    drift_amplitude: float = 0.1
    drift_period_s: float = 6 * 3600.0
    #: persistence time (s) of the cells' random walk (heading decorrelation)
    persistence_s: float = 1200.0
    #: longest simulation step (s); divisions are resolved to this
    max_step_s: float = 30.0

    def __init__(
        self,
        seed: int = 0,
        *,
        cell_density_per_mm2: float = 150.0,
        bounds_um: tuple[float, float, float, float] = (-1500, -1500, 1500, 1500),
        pre_division_minutes: float = 15.0,
        cell_cycle_hours: float = 12.0,
        acceleration: float = 60.0,
        focus_um: float = 0.0,
        condensation_brightness: float = 2.5,
        bleach_dose_ms: float = 20_000.0,
        arrest_dose_ms: float = 6_000.0,
        death_dose_ms: float = 20_000.0,
        max_cells: int | None = None,
        track_interval_s: float = 60.0,
    ) -> None:
        x0, y0, x1, y1 = (float(v) for v in bounds_um)
        if not (x1 > x0 and y1 > y0):
            raise ValueError(f"empty bounds_um: {bounds_um}")
        if cell_density_per_mm2 < 0:
            raise ValueError("cell_density_per_mm2 must be >= 0")
        self.seed = int(seed)
        self.cell_density_per_mm2 = float(cell_density_per_mm2)
        self.bounds_um = (x0, y0, x1, y1)
        self.pre_division_minutes = float(pre_division_minutes)
        self.cell_cycle_hours = float(cell_cycle_hours)
        self.acceleration = float(acceleration)
        self.focus_um = float(focus_um)
        self.condensation_brightness = float(condensation_brightness)
        self.bleach_dose_ms = float(bleach_dose_ms)
        self.arrest_dose_ms = float(arrest_dose_ms)
        self.death_dose_ms = float(death_dose_ms)
        self.track_interval_s = float(track_interval_s)

        self._lock = threading.RLock()
        sim_seq, noise_seq = np.random.SeedSequence(self.seed).spawn(2)
        self._rng = np.random.default_rng(sim_seq)
        self._noise_rng = np.random.default_rng(noise_seq)
        self._t = 0.0
        self._drift_phase = float(self._rng.uniform(0, 2 * np.pi))
        self._texture = chromatin_texture(self._rng)
        self._cells: dict[str, np.ndarray] = {
            name: np.empty(0, dtype) for name, dtype in _FIELDS.items()
        }
        self._divisions: list[dict[str, Any]] = []
        self._deaths: list[dict[str, Any]] = []
        # ground-truth positions: (times, cell indices, x, y) arrays per record
        self._tracks: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        self._last_track_s = -np.inf

        area_mm2 = (x1 - x0) * (y1 - y0) / 1e6
        n0 = int(self._rng.poisson(self.cell_density_per_mm2 * area_mm2))
        self.max_cells = int(max_cells) if max_cells is not None else max(8 * n0, 16)
        cycle = self._draw_cycles(n0)
        new = self._new_cells(
            n0,
            x=self._rng.uniform(x0, x1, n0),
            y=self._rng.uniform(y0, y1, n0),
            theta=self._rng.uniform(0, 2 * np.pi, n0),
            r0=np.clip(self._rng.normal(5.6, 0.5, n0), 4.5, 6.5),
            bright=self._rng.lognormal(0.0, 0.2, n0),
            cycle_s=cycle,
            cycle_start_s=-self._rng.uniform(0, 1, n0) * cycle,
        )
        self._append(new)
        self._record_track(np.arange(n0))

    # ------------------------------------------------------------------ public
    @property
    def time_s(self) -> float:
        """Simulated time since the start, in seconds."""
        return self._t

    @property
    def n_cells(self) -> int:
        """Number of cells present now (alive or dead; divided cells excluded)."""
        with self._lock:
            return int(np.count_nonzero(self._present()))

    def advance(self, dt_s: float) -> None:
        """Run the simulation forward by `dt_s` simulated seconds.

        Cells migrate, grow, enter their pre-division window and divide; the step is
        split into sub-steps of at most `max_step_s`.
        """
        if dt_s < 0:
            raise ValueError("cannot advance by a negative time")
        with self._lock:
            end = self._t + float(dt_s)
            while end - self._t > 1e-9:
                self._step(min(self.max_step_s, end - self._t))

    def render(
        self,
        x_um: float,
        y_um: float,
        z_um: float = 0.0,
        *,
        shape: tuple[int, int] = (512, 512),
        pixel_size_um: float = 1.0,
        exposure_ms: float = 10.0,
        intensity: float = 1.0,
        rng: np.random.Generator | None = None,
        apply_dose: bool = True,
    ) -> np.ndarray:
        """Image the field of view centered on stage position ``(x_um, y_um)``.

        Parameters
        ----------
        x_um, y_um : float
            Stage position (µm) of the image center.
        z_um : float
            Focus position (µm); the image blurs with ``|z_um - focus_um|``.
        shape : (int, int)
            ``(height, width)`` of the image in pixels.
        pixel_size_um : float
            Size of a pixel at the sample (µm).
        exposure_ms : float
            Exposure time; signal and dose scale with it.
        intensity : float
            Relative excitation intensity; signal and dose scale with it.
        rng : numpy.random.Generator | None
            Source of the camera noise; ``None`` uses the specimen's own generator
            (seeded from `seed`, so frames are reproducible).
        apply_dose : bool
            Whether this exposure bleaches and harms the cells in the field of view
            (``exposure_ms * intensity`` is added to their dose).

        Returns
        -------
        numpy.ndarray
            ``uint16`` image: nuclei over a dim background, camera offset
            `offset_adu`, shot noise (Gaussian approximation of Poisson) and read
            noise.
        """
        h, w, ps = check_field(shape, pixel_size_um)
        with self._lock:
            draw = functools.partial(self._draw, x_um, y_um, h, w, ps, labels=False)
            field = defocused(draw, (h, w), self.blur_sigma_um(z_um) / ps)
            if apply_dose and exposure_ms * intensity > 0:
                in_view = self._in_view(x_um, y_um, h, w, ps)
                self._apply_dose(in_view, exposure_ms * intensity)
            rng = self._noise_rng if rng is None else rng
            noise = rng.standard_normal((h, w), dtype=np.float32)
        return self._expose(field, noise, ps, exposure_ms * intensity)

    def truth_labels(
        self,
        x_um: float,
        y_um: float,
        shape: tuple[int, int] = (512, 512),
        pixel_size_um: float = 1.0,
    ) -> np.ndarray:
        """Instance labels (cell ids, 0 = background) of a field of view, now.

        Same geometry as `render`; a pixel belongs to a cell when its center lies
        inside the cell's nucleus. Where nuclei overlap, one of them wins.
        """
        h, w = (int(v) for v in shape)
        with self._lock:
            return self._draw(x_um, y_um, h, w, float(pixel_size_um), 0, labels=True)

    def blur_sigma_um(self, z_um: float) -> float:
        """Sigma (µm) of the Gaussian defocus blur at focus position `z_um`."""
        return self.defocus_blur_per_um * abs(float(z_um) - self.focus_um)

    def cells_in_view(
        self,
        x_um: float,
        y_um: float,
        shape: tuple[int, int] = (512, 512),
        pixel_size_um: float = 1.0,
    ) -> np.ndarray:
        """Ids of the present cells whose center lies in a field of view."""
        h, w = (int(v) for v in shape)
        with self._lock:
            return self._in_view(x_um, y_um, h, w, float(pixel_size_um)) + 1

    def cell_table(self) -> dict[str, np.ndarray]:
        """The state of every present cell now, one array per column.

        Columns: ``id``, ``parent``, ``x_um``, ``y_um``, ``diameter_um``,
        ``aspect`` (minor/major), ``brightness`` (relative, drift included),
        ``division_s`` (scheduled division time; ``inf`` if blocked or dead),
        ``pre_division`` (bool: in the pre-division window), ``dose_ms``,
        ``total_dose_ms``, ``arrested`` and ``dead`` (bool).
        """
        with self._lock:
            idx = np.flatnonzero(self._present())
            g = self._geometry(idx)
            c = self._cells
            blocked = ~np.isnan(c["arrest_s"][idx]) | ~np.isnan(c["death_s"][idx])
            division = c["cycle_start_s"][idx] + c["cycle_s"][idx]
            return {
                "id": idx + 1,
                "parent": c["parent"][idx].copy(),
                "x_um": c["x"][idx].copy(),
                "y_um": c["y"][idx].copy(),
                "diameter_um": 2 * np.sqrt(g["a"] * g["b"]),
                "aspect": g["b"] / g["a"],
                "brightness": g["bright"],
                "division_s": np.where(blocked, np.inf, division),
                "pre_division": g["s"] > 0,
                "dose_ms": c["dose"][idx].copy(),
                "total_dose_ms": c["dose"][idx] + c["inherited_dose"][idx],
                "arrested": ~np.isnan(c["arrest_s"][idx]),
                "dead": ~np.isnan(c["death_s"][idx]),
            }

    def ground_truth(self) -> dict[str, Any]:
        """Everything that happened so far, as JSON-ready data.

        Returns
        -------
        dict
            ``time_s`` (the simulation clock), ``seed``, ``parameters``,
            ``cells`` (per cell: ``id``, ``parent``, ``daughters``, ``birth_s``
            (``None`` for cells present at the start), ``end_s`` (division time),
            ``death_s``, ``arrest_s``, ``fate`` (``"divided"``, ``"dead"`` or
            ``"alive"``), ``dose_ms`` (received by the cell itself),
            ``total_dose_ms`` (with its ancestors'), and ``track`` with lists
            ``t_s``, ``x_um``, ``y_um``), ``divisions`` (``time_s``, ``x_um``,
            ``y_um``, ``parent``, ``daughters``, ``pre_division_start_s``,
            ``axis_rad``) and ``deaths`` (``time_s``, ``id``, ``x_um``, ``y_um``,
            ``total_dose_ms``).
        """
        with self._lock:
            c = self._cells
            n = len(c["x"])
            daughters: dict[int, list[int]] = {}
            for ev in self._divisions:
                daughters[ev["parent"]] = list(ev["daughters"])
            records = list(self._tracks)
            if self._last_track_s < self._t:  # end every track at the present
                now = np.flatnonzero(self._present())
                records.append(
                    (np.full(now.size, self._t), now, c["x"][now], c["y"][now])
                )
            tracks = _tracks_by_cell(records, n)
            cells = []
            for i in range(n):
                divided = not np.isnan(c["end_s"][i])
                dead = not np.isnan(c["death_s"][i])
                t_s, x_um, y_um = tracks[i]
                cells.append(
                    {
                        "id": i + 1,
                        "parent": int(c["parent"][i]) or None,
                        "daughters": daughters.get(i + 1, []),
                        "birth_s": _opt(c["born_s"][i]),
                        "end_s": _opt(c["end_s"][i]),
                        "death_s": _opt(c["death_s"][i]),
                        "arrest_s": _opt(c["arrest_s"][i]),
                        "fate": "divided" if divided else "dead" if dead else "alive",
                        "dose_ms": float(c["dose"][i]),
                        "total_dose_ms": float(c["dose"][i] + c["inherited_dose"][i]),
                        "track": {"t_s": t_s, "x_um": x_um, "y_um": y_um},
                    }
                )
            return {
                "time_s": self._t,
                "seed": self.seed,
                "parameters": self.parameters(),
                "cells": cells,
                "divisions": [dict(ev) for ev in self._divisions],
                "deaths": [dict(ev) for ev in self._deaths],
            }

    def parameters(self) -> dict[str, Any]:
        """The parameters of this specimen (JSON-ready)."""
        return {
            "seed": self.seed,
            "cell_density_per_mm2": self.cell_density_per_mm2,
            "bounds_um": list(self.bounds_um),
            "pre_division_minutes": self.pre_division_minutes,
            "cell_cycle_hours": self.cell_cycle_hours,
            "acceleration": self.acceleration,
            "focus_um": self.focus_um,
            "condensation_brightness": self.condensation_brightness,
            "bleach_dose_ms": self.bleach_dose_ms,
            "arrest_dose_ms": self.arrest_dose_ms,
            "death_dose_ms": self.death_dose_ms,
            "max_cells": self.max_cells,
            "track_interval_s": self.track_interval_s,
        }

    def __repr__(self) -> str:
        return (
            f"<LiveSpecimen seed={self.seed} t={self._t:.0f}s "
            f"cells={self.n_cells} divisions={len(self._divisions)}>"
        )

    # -------------------------------------------------------------- simulation
    def _present(self) -> np.ndarray:
        return np.isnan(self._cells["end_s"])

    def _draw_cycles(self, n: int) -> np.ndarray:
        mean = self.cell_cycle_hours * 3600.0
        cycle = mean * self._rng.lognormal(0.0, 0.15, n)
        return np.maximum(cycle, self.pre_division_minutes * 60.0 + 3600.0)

    def _new_cells(self, n: int, **values: np.ndarray) -> dict[str, np.ndarray]:
        rng = self._rng
        new: dict[str, np.ndarray] = {
            name: np.full(n, 0 if dtype is np.int64 else np.nan, dtype)
            for name, dtype in _FIELDS.items()
        }
        new["dose"][:] = 0.0
        new["inherited_dose"][:] = 0.0
        new["speed"] = rng.lognormal(np.log(0.3 / 60), 0.3, n)  # ~18 µm/h
        new["aspect"] = rng.uniform(0.6, 0.85, n)
        new["tu"] = rng.uniform(0, TEXTURE_PERIOD_UM, n)
        new["tv"] = rng.uniform(0, TEXTURE_PERIOD_UM, n)
        new["nu"] = rng.uniform(-0.4, 0.4, n)
        new["nv"] = rng.uniform(-0.4, 0.4, n)
        for name, value in values.items():
            new[name] = np.asarray(value, dtype=_FIELDS[name])
        return new

    def _append(self, new: dict[str, np.ndarray]) -> None:
        for name in _FIELDS:
            self._cells[name] = np.concatenate([self._cells[name], new[name]])

    def _signature(self, idx: np.ndarray, t: float) -> np.ndarray:
        """Strength (0..1) of the pre-division signature of cells `idx` at `t`."""
        pre = self.pre_division_minutes * 60.0
        if pre <= 0 or idx.size == 0:
            return np.zeros(idx.size)
        c = self._cells
        t_eff = np.fmin(np.fmin(t, c["arrest_s"][idx]), c["death_s"][idx])
        start = c["cycle_start_s"][idx] + c["cycle_s"][idx] - pre
        # the signature builds up over the first quarter of the window
        return np.clip((t_eff - start) / (0.25 * pre), 0.0, 1.0)

    def _step(self, h: float) -> None:
        c, rng = self._cells, self._rng
        present = self._present()
        live = np.flatnonzero(present & np.isnan(c["death_s"]))
        if live.size >= self.max_cells:  # quiescence: cycles pause outside the window
            pre = self.pre_division_minutes * 60.0
            start = c["cycle_start_s"][live] + c["cycle_s"][live] - pre
            c["cycle_start_s"][live[self._t < start]] += h
        s = self._signature(live, self._t)
        turn = math.sqrt(2 * h / self.persistence_s) * rng.standard_normal(live.size)
        theta = c["theta"][live] + turn
        step = c["speed"][live] * (1 - s) * h  # rounded cells stop migrating
        x = c["x"][live] + step * np.cos(theta)
        y = c["y"][live] + step * np.sin(theta)
        x0, y0, x1, y1 = self.bounds_um
        low, high = x < x0, x > x1
        x = np.where(low, 2 * x0 - x, np.where(high, 2 * x1 - x, x))
        theta = np.where(low | high, np.pi - theta, theta)
        low, high = y < y0, y > y1
        y = np.where(low, 2 * y0 - y, np.where(high, 2 * y1 - y, y))
        theta = np.where(low | high, -theta, theta)
        c["x"][live], c["y"][live], c["theta"][live] = x, y, theta
        self._t += h

        division_s = c["cycle_start_s"][live] + c["cycle_s"][live]
        due = live[(division_s <= self._t + 1e-9) & np.isnan(c["arrest_s"][live])]
        if due.size:
            self._divide(due)
        if self._t - self._last_track_s >= self.track_interval_s - 1e-9:
            self._record_track(np.flatnonzero(self._present()))

    def _divide(self, parents: np.ndarray) -> None:
        c, rng = self._cells, self._rng
        n = parents.size
        t_div = c["cycle_start_s"][parents] + c["cycle_s"][parents]
        alpha = rng.uniform(0, np.pi, n)
        r0 = np.clip(c["r0"][parents] * rng.lognormal(0, 0.05, n), 4.5, 6.5)
        sep = 1.15 * r0  # each daughter's offset from the parent's center
        ca, sa = np.cos(alpha), np.sin(alpha)
        px, py = c["x"][parents], c["y"][parents]
        # daughters: [first of every parent..., second of every parent...]
        new = self._new_cells(
            2 * n,
            parent=np.tile(parents + 1, 2),
            born_s=np.tile(t_div, 2),
            cycle_start_s=np.tile(t_div, 2),
            cycle_s=self._draw_cycles(2 * n),
            x=np.concatenate([px + sep * ca, px - sep * ca]),
            y=np.concatenate([py + sep * sa, py - sep * sa]),
            theta=np.concatenate([alpha, alpha + np.pi]),
            r0=np.tile(r0, 2),
            bright=np.tile(c["bright"][parents], 2) * rng.lognormal(0, 0.08, 2 * n),
            inherited_dose=np.tile(
                c["dose"][parents] + c["inherited_dose"][parents], 2
            ),
        )
        new["speed"] = np.tile(c["speed"][parents], 2) * rng.lognormal(0, 0.1, 2 * n)
        first_id = len(c["x"]) + 1
        c["end_s"][parents] = t_div
        self._append(new)
        pre = self.pre_division_minutes * 60.0
        for k, p in enumerate(parents):
            d0, d1 = first_id + k, first_id + n + k
            self._divisions.append(
                {
                    "time_s": float(t_div[k]),
                    "x_um": float(px[k]),
                    "y_um": float(py[k]),
                    "parent": int(p) + 1,
                    "daughters": [d0, d1],
                    "pre_division_start_s": float(t_div[k] - pre),
                    "axis_rad": float(alpha[k]),
                }
            )
        # the parent's track ends where its daughters' tracks begin
        self._record_track(parents, times=t_div, partial=True)
        self._record_track(np.arange(first_id - 1, first_id - 1 + 2 * n), partial=True)

    def _record_track(
        self, idx: np.ndarray, times: np.ndarray | None = None, partial: bool = False
    ) -> None:
        c = self._cells
        t = np.full(idx.size, self._t) if times is None else np.asarray(times)
        self._tracks.append(
            (t, idx.astype(np.int32), c["x"][idx].copy(), c["y"][idx].copy())
        )
        if not partial:
            self._last_track_s = self._t

    # ------------------------------------------------------------------- light
    def _in_view(
        self, x_um: float, y_um: float, h: int, w: int, ps: float
    ) -> np.ndarray:
        """Indices of present cells whose center lies in the field of view."""
        c = self._cells
        inside = (np.abs(c["x"] - x_um) <= w * ps / 2) & (
            np.abs(c["y"] - y_um) <= h * ps / 2
        )
        return np.flatnonzero(inside & self._present())

    def _apply_dose(self, idx: np.ndarray, dose_ms: float) -> None:
        if idx.size == 0:
            return
        c = self._cells
        c["dose"][idx] += dose_ms
        total = c["dose"][idx] + c["inherited_dose"][idx]
        arrest = idx[(total >= self.arrest_dose_ms) & np.isnan(c["arrest_s"][idx])]
        c["arrest_s"][arrest] = self._t
        dying = idx[(total >= self.death_dose_ms) & np.isnan(c["death_s"][idx])]
        c["death_s"][dying] = self._t
        for i in dying:
            self._deaths.append(
                {
                    "time_s": self._t,
                    "id": int(i) + 1,
                    "x_um": float(c["x"][i]),
                    "y_um": float(c["y"][i]),
                    "total_dose_ms": float(c["dose"][i] + c["inherited_dose"][i]),
                }
            )

    # --------------------------------------------------------------- rendering
    def _geometry(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        """Semi-axes (µm), orientation, brightness and signature of cells `idx`."""
        c, t = self._cells, self._t
        dead = ~np.isnan(c["death_s"][idx])
        t_eff = np.fmin(np.fmin(t, c["arrest_s"][idx]), c["death_s"][idx])
        phase = np.clip((t_eff - c["cycle_start_s"][idx]) / c["cycle_s"][idx], 0, 1)
        s = self._signature(idx, t)
        r_eq = c["r0"][idx] * np.sqrt(1 + phase) * (1 - 0.15 * s)
        r_eq = np.where(dead, 0.8 * r_eq, r_eq)  # pyknosis
        aspect = c["aspect"][idx] + (1 - c["aspect"][idx]) * s
        aspect = np.where(dead, np.maximum(aspect, 0.9), aspect)
        sqrt_aspect = np.sqrt(aspect)
        total_dose = c["dose"][idx] + c["inherited_dose"][idx]
        since_death = np.where(dead, t - c["death_s"][idx], 0.0)
        drift = 1 + self.drift_amplitude * math.sin(
            2 * math.pi * t / self.drift_period_s + self._drift_phase
        )
        bright = (
            c["bright"][idx]
            * np.exp(-total_dose / self.bleach_dose_ms)
            * (1 + (self.condensation_brightness - 1) * s)
            * np.where(dead, 0.3 + 0.7 * np.exp(-since_death / 600.0), 1.0)
            * drift
        )
        return {
            "a": r_eq / sqrt_aspect,
            "b": r_eq * sqrt_aspect,
            "phi": c["theta"][idx],
            "bright": bright,
            "s": s,
        }

    def _draw(
        self,
        x_um: float,
        y_um: float,
        h: int,
        w: int,
        ps: float,
        margin: int,
        *,
        labels: bool,
    ) -> np.ndarray:
        """Noise-free photons/ms/µm² (or labels) of a field padded by `margin` px."""
        H, W = h + 2 * margin, w + 2 * margin
        c = self._cells
        # pixel (col, row) of the padded frame looks at stage
        # (x_um + (col - margin - (w - 1) / 2) * ps, ...)
        col0 = (w - 1) / 2 + margin
        row0 = (h - 1) / 2 + margin
        cx = (c["x"] - x_um) / ps + col0
        cy = (c["y"] - y_um) / ps + row0
        reach = 13.0 / ps  # larger than any nucleus' semi-axis
        near = (
            self._present()
            & (cx > -reach)
            & (cx < W - 1 + reach)
            & (cy > -reach)
            & (cy < H - 1 + reach)
        )
        idx = np.flatnonzero(near)
        g = self._geometry(idx)
        nuclei = Nuclei(
            col=cx[idx],
            row=cy[idx],
            a=g["a"],
            b=g["b"],
            phi=g["phi"],
            bright=g["bright"],
            tu=c["tu"][idx],
            tv=c["tv"][idx],
            nu=c["nu"][idx],
            nv=c["nv"][idx],
            texture_amp=0.12 + 0.2 * g["s"],  # condensed chromatin: more punctate
        )
        if labels:
            if idx.size and idx[-1] + 1 > np.iinfo(np.uint16).max:
                raise OverflowError("cell ids no longer fit uint16 labels")
            return label_nuclei(nuclei, (idx + 1).astype(np.uint16), (H, W), ps)
        return draw_nuclei(nuclei, (H, W), ps, self._texture, self.photons_per_ms)


def _tracks_by_cell(
    records: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]], n: int
) -> list[tuple[list[float], list[float], list[float]]]:
    """Regroup position records ``(t, index, x, y)`` into one track per cell."""
    if not records:
        return [([], [], []) for _ in range(n)]
    t, i, x, y = (np.concatenate([r[k] for r in records]) for k in range(4))
    order = np.lexsort((t, i))  # by cell, then time
    t, i, x, y = t[order], i[order], x[order], y[order]
    bounds = np.searchsorted(i, np.arange(n + 1))
    return [
        (
            np.round(t[lo:hi], 3).tolist(),
            np.round(x[lo:hi], 3).tolist(),
            np.round(y[lo:hi], 3).tolist(),
        )
        for lo, hi in itertools.pairwise(bounds)
    ]


def _opt(value: float) -> float | None:
    return None if np.isnan(value) else float(value)
