"""`PlateSpecimen`: a reproducible multi-well plate of fixed nuclei with ground truth.

A fixed-cell screen in *stage* coordinates (µm): a `useq.WellPlate` (``"96-well"``,
``"384-well"``, ...) placed the way `useq.WellPlatePlan` places it, so that the
positions of a plan with the same ``a1_center_xy`` and ``rotation`` land on the
specimen's wells. Each well has its own cell density; some wells are empty, a few
are *hits* whose cells show a phenotype (larger, brighter nuclei), and each well has
its own focus (the plate is tilted and bowed, and every well's bottom sits a little
higher or lower), so that a screen needs per-well autofocus. Nothing moves, divides
or bleaches: an image depends only on where, at which focus and how it is taken.

`PlateSpecimen.render` images a field of view the way `LiveSpecimen` does (same
nuclei, defocus blur, noise and camera model); `PlateSpecimen.truth_labels` and
`PlateSpecimen.ground_truth` tell what really is where.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Iterable
from typing import Any

import numpy as np
import useq

from smartscope.sim._render import (
    TEXTURE_PERIOD_UM,
    FluorescenceImaging,
    Nuclei,
    blur_margin,
    check_field,
    chromatin_texture,
    defocused,
    draw_nuclei,
    label_nuclei,
)

__all__ = ["PlateSpecimen"]

WellKey = str | tuple[int, int]


class PlateSpecimen(FluorescenceImaging):
    """A simulated multi-well plate of fixed nuclei, reproducible from a seed.

    Parameters
    ----------
    seed : int
        Seed of every random choice (wells, cells, camera noise). Two specimens with
        the same seed and parameters are identical and render identical frames.
    plate : str | useq.WellPlate
        The plate: a name registered with useq (``"96-well"``, ``"384-well"``, ...)
        or a `useq.WellPlate`.
    a1_center_xy : (float, float)
        Stage position (µm) of the center of well A1, as in `useq.WellPlatePlan`.
    rotation : float | None
        Rotation of the plate (degrees), as in `useq.WellPlatePlan`.
    cell_density_per_mm2 : float
        Mean cell density of the non-empty wells. The default gives ~26 nuclei in a
        512 × 512 µm field.
    density_cv : float
        Well-to-well spread of the density (sigma of a log-normal, mean preserved).
    empty_fraction : float
        Fraction of the wells that hold no cells at all (rounded to whole wells).
    hit_fraction : float
        Fraction of the wells that are hits (rounded, at least one when > 0); hits
        are chosen among the non-empty wells.
    hit_cell_fraction : float
        Fraction of a hit well's cells that show the phenotype.
    hit_area_factor, hit_brightness_factor : float
        The phenotype: nuclear area and brightness relative to a normal cell.
    focus_um : float
        Nominal focus position (µm) of the plate.
    focus_range_um : float
        Amplitude of the smooth focus variation across the plate (tilt and bow):
        the smooth part of the wells' focus offsets spans ``±focus_range_um``.
    focus_jitter_um : float
        Standard deviation of each well's own random focus offset (clipped at two
        standard deviations).

    Notes
    -----
    Geometry follows `useq.WellPlatePlan`: with no rotation the center of well
    (row ``r``, column ``c``) is at stage
    ``(a1_x + c * spacing_x, a1_y - r * spacing_y)`` (spacing in µm): columns go
    towards +x and rows towards **-y** (useq's plate coordinates). Wells are circles
    (ellipses) or rectangles of ``plate.well_size``, and every nucleus lies entirely
    inside its well.

    Images follow `smartscope.Microscope`'s convention for an identity pixel affine:
    pixel column ``c`` and row ``r`` of a ``(h, w)`` image taken with the stage at
    ``(x, y)`` look at stage point
    ``(x + (c - (w - 1) / 2) * pixel_size_um, y + (r - (h - 1) / 2) * pixel_size_um)``.

    The in-focus position of a well is ``focus_um + offset`` (``focus_um`` of the
    well in `ground_truth`); each well's nuclei blur with the distance from *their*
    well's focus. Cell ids are 1-based and ordered by well (row-major), so truth
    labels are ``uint32``.

    Brightness, optics and camera (`photons_per_ms`, `defocus_blur_per_um`,
    `offset_adu`, ...) are those of `smartscope.sim._render.FluorescenceImaging`,
    as in `LiveSpecimen`.

    All public methods are thread-safe.
    """

    def __init__(
        self,
        seed: int = 0,
        *,
        plate: str | useq.WellPlate = "96-well",
        a1_center_xy: tuple[float, float] = (0.0, 0.0),
        rotation: float | None = None,
        cell_density_per_mm2: float = 100.0,
        density_cv: float = 0.3,
        empty_fraction: float = 0.15,
        hit_fraction: float = 0.05,
        hit_cell_fraction: float = 0.6,
        hit_area_factor: float = 1.6,
        hit_brightness_factor: float = 2.0,
        focus_um: float = 0.0,
        focus_range_um: float = 5.0,
        focus_jitter_um: float = 1.5,
    ) -> None:
        for name, value in [
            ("empty_fraction", empty_fraction),
            ("hit_fraction", hit_fraction),
            ("hit_cell_fraction", hit_cell_fraction),
        ]:
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], got {value}")
        if cell_density_per_mm2 < 0 or density_cv < 0:
            raise ValueError("cell_density_per_mm2 and density_cv must be >= 0")
        self.seed = int(seed)
        self.plan = useq.WellPlatePlan(
            plate=plate, a1_center_xy=a1_center_xy, rotation=rotation
        )
        self.plate: useq.WellPlate = self.plan.plate
        self.a1_center_xy = (float(a1_center_xy[0]), float(a1_center_xy[1]))
        self.rotation = None if rotation is None else float(self.plan.rotation or 0)
        self.cell_density_per_mm2 = float(cell_density_per_mm2)
        self.density_cv = float(density_cv)
        self.empty_fraction = float(empty_fraction)
        self.hit_fraction = float(hit_fraction)
        self.hit_cell_fraction = float(hit_cell_fraction)
        self.hit_area_factor = float(hit_area_factor)
        self.hit_brightness_factor = float(hit_brightness_factor)
        self.focus_um = float(focus_um)
        self.focus_range_um = float(focus_range_um)
        self.focus_jitter_um = float(focus_jitter_um)

        self._lock = threading.RLock()
        sim_seq, noise_seq = np.random.SeedSequence(self.seed).spawn(2)
        rng = np.random.default_rng(sim_seq)
        self._noise_entropy = noise_seq.entropy
        self._views: dict[tuple[int, ...], int] = {}  # view -> times rendered
        self._init_geometry()
        self._texture = chromatin_texture(rng)
        self._init_wells(rng)
        self._init_cells(rng)

    # ---------------------------------------------------------------- building
    def _init_geometry(self) -> None:
        t = self.plan.affine_transform  # (row, col, 1) -> (y_mm, x_mm, 1)
        #: (row, col) -> stage (x, y) µm, and its inverse
        self._index_to_stage = 1000.0 * np.array(
            [[t[1, 0], t[1, 1]], [t[0, 0], t[0, 1]]]
        )
        self._stage_to_index = np.linalg.inv(self._index_to_stage)
        self._origin = 1000.0 * np.array([t[1, 2], t[0, 2]])  # = a1_center_xy
        # unit vectors of the wells' own axes in stage coordinates: along the
        # columns (well width, plate x) and along the rows (well height, plate y)
        m = self._index_to_stage
        self._ex = m[:, 1] / np.hypot(*m[:, 1])
        self._ey = m[:, 0] / np.hypot(*m[:, 0])
        self._half_um = (
            500.0 * self.plate.well_size[0],
            500.0 * self.plate.well_size[1],
        )
        rows, cols = self.plate.shape
        rr, cc = np.divmod(np.arange(rows * cols), cols)
        self._well_rc = np.column_stack([rr, cc])
        self._well_xy = self._origin + self._well_rc @ m.T
        self._well_names = [str(n) for n in self.plate.all_well_names.reshape(-1)]
        self._well_index = {name: i for i, name in enumerate(self._well_names)}

    def _init_wells(self, rng: np.random.Generator) -> None:
        n = self.plate.size
        rows, cols = self.plate.shape
        order = rng.permutation(n)
        n_empty = round(self.empty_fraction * n)
        n_hit = round(self.hit_fraction * n)
        if self.hit_fraction > 0:
            n_hit = max(n_hit, 1)
        n_hit = min(n_hit, n - n_empty)
        self._empty = np.zeros(n, bool)
        self._empty[order[:n_empty]] = True
        self._hit = np.zeros(n, bool)
        self._hit[order[n_empty : n_empty + n_hit]] = True

        hx, hy = (h / 1000.0 for h in self._half_um)
        area_mm2 = math.pi * hx * hy if self.plate.circular_wells else 4 * hx * hy
        sigma = self.density_cv
        density = self.cell_density_per_mm2 * rng.lognormal(-(sigma**2) / 2, sigma, n)
        self._density = np.where(self._empty, 0.0, density)
        self._counts = rng.poisson(self._density * area_mm2)
        # staining varies a little from well to well
        self._well_bright = rng.lognormal(0.0, 0.08, n)

        # focus: a tilted, bowed plate (smooth, ±focus_range_um) plus each well's
        # own offset
        su = (self._well_rc[:, 1] - (cols - 1) / 2) / max((cols - 1) / 2, 1)
        sv = (self._well_rc[:, 0] - (rows - 1) / 2) / max((rows - 1) / 2, 1)
        tilt_u, tilt_v = rng.uniform(-1, 1, 2)
        bow = rng.choice([-1.0, 1.0]) * rng.uniform(0.5, 1.0)
        smooth = tilt_u * su + tilt_v * sv + bow * (su**2 + sv**2)
        smooth -= 0.5 * (smooth.max() + smooth.min())
        span = np.abs(smooth).max()
        smooth *= self.focus_range_um / span if span > 0 else 0.0
        jitter = self.focus_jitter_um * np.clip(rng.standard_normal(n), -2, 2)
        self._focus_offset = smooth + jitter

    def _init_cells(self, rng: np.random.Generator) -> None:
        counts = self._counts
        total = int(counts.sum())
        self._well_start = np.concatenate([[0], np.cumsum(counts)])
        well = np.repeat(np.arange(counts.size, dtype=np.int32), counts)
        # interphase nuclei anywhere in the cell cycle (cf. LiveSpecimen)
        r0 = np.clip(rng.normal(5.6, 0.5, total), 4.5, 6.5)
        r_eq = r0 * np.sqrt(1 + rng.uniform(0, 1, total))
        aspect = rng.uniform(0.6, 0.85, total)
        hit = self._hit[well] & (rng.uniform(0, 1, total) < self.hit_cell_fraction)
        r_eq = np.where(hit, r_eq * math.sqrt(self.hit_area_factor), r_eq)
        bright = rng.lognormal(0.0, 0.2, total) * self._well_bright[well]
        bright = np.where(hit, bright * self.hit_brightness_factor, bright)
        a = r_eq / np.sqrt(aspect)  # semi-axes (µm)
        b = r_eq * np.sqrt(aspect)

        # centers uniformly in the well, far enough from its wall for the nucleus
        # to lie entirely inside
        hx, hy = self._half_um
        if self.plate.circular_wells:
            rho = np.sqrt(rng.uniform(0, 1, total))
            ang = rng.uniform(0, 2 * np.pi, total)
            u = rho * np.cos(ang) * np.maximum(hx - a, 0)
            v = rho * np.sin(ang) * np.maximum(hy - a, 0)
        else:
            u = rng.uniform(-1, 1, total) * np.maximum(hx - a, 0)
            v = rng.uniform(-1, 1, total) * np.maximum(hy - a, 0)
        center = self._well_xy[well]
        self._x = center[:, 0] + u * self._ex[0] + v * self._ey[0]
        self._y = center[:, 1] + u * self._ex[1] + v * self._ey[1]
        self._well = well
        self._r = r_eq.astype(np.float32)
        self._a = a.astype(np.float32)
        self._b = b.astype(np.float32)
        self._phi = rng.uniform(0, 2 * np.pi, total).astype(np.float32)
        self._bright = bright.astype(np.float32)
        self._hit_cell = hit
        self._tu = rng.uniform(0, TEXTURE_PERIOD_UM, total).astype(np.float32)
        self._tv = rng.uniform(0, TEXTURE_PERIOD_UM, total).astype(np.float32)
        self._nu = rng.uniform(-0.4, 0.4, total).astype(np.float32)
        self._nv = rng.uniform(-0.4, 0.4, total).astype(np.float32)
        self._max_a = float(a.max()) if total else 0.0

    # ------------------------------------------------------------------ public
    @property
    def n_wells(self) -> int:
        """Number of wells of the plate."""
        return self.plate.size

    @property
    def n_cells(self) -> int:
        """Number of cells on the plate."""
        return int(self._x.size)

    @property
    def well_names(self) -> list[str]:
        """Names of all wells (``"A1"``, ``"A2"``, ...), row-major."""
        return list(self._well_names)

    def well_plate_plan(self, **kwargs: Any) -> useq.WellPlatePlan:
        """A `useq.WellPlatePlan` of this plate, placed like the specimen.

        Parameters
        ----------
        **kwargs
            Other fields of the plan (``selected_wells``, ``well_points_plan``).
        """
        return useq.WellPlatePlan(
            plate=self.plate,
            a1_center_xy=self.a1_center_xy,
            rotation=self.rotation,
            **kwargs,
        )

    def well_center_um(self, well: WellKey) -> tuple[float, float]:
        """Stage position (µm) of the center of a well (name or ``(row, col)``)."""
        x, y = self._well_xy[self._well_id(well)]
        return float(x), float(y)

    def well_focus_um(self, well: WellKey) -> float:
        """Focus position (µm) at which a well's cells are in focus."""
        return self.focus_um + float(self._focus_offset[self._well_id(well)])

    def nearest_well(self, x_um: float, y_um: float) -> str:
        """Name of the well whose center is nearest to a stage point."""
        r, c = self._nearest_rc(x_um, y_um)
        return self._well_names[r * self.plate.columns + c]

    def well_at(self, x_um: float, y_um: float) -> str | None:
        """Name of the well whose area contains a stage point (``None``: none)."""
        name = self.nearest_well(x_um, y_um)
        u, v = self._local(self._well_index[name], x_um, y_um)
        hx, hy = self._half_um
        if self.plate.circular_wells:
            inside = (u / hx) ** 2 + (v / hy) ** 2 <= 1.0
        else:
            inside = abs(u) <= hx and abs(v) <= hy
        return name if inside else None

    def blur_sigma_um(self, x_um: float, y_um: float, z_um: float) -> float:
        """Sigma (µm) of the defocus blur of the well nearest to ``(x_um, y_um)``."""
        focus = self.well_focus_um(self.nearest_well(x_um, y_um))
        return self.defocus_blur_per_um * abs(float(z_um) - focus)

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
    ) -> np.ndarray:
        """Image the field of view centered on stage position ``(x_um, y_um)``.

        Parameters
        ----------
        x_um, y_um : float
            Stage position (µm) of the image center.
        z_um : float
            Focus position (µm); each well's nuclei blur with the distance from
            that well's focus (`well_focus_um`).
        shape : (int, int)
            ``(height, width)`` of the image in pixels.
        pixel_size_um : float
            Size of a pixel at the sample (µm).
        exposure_ms : float
            Exposure time; the signal scales with it.
        intensity : float
            Relative excitation intensity; the signal scales with it.
        rng : numpy.random.Generator | None
            Source of the camera noise. ``None``: the noise is a function of
            `seed`, the view (position, focus, shape, pixel size, exposure,
            intensity) and how often this specimen has rendered that view, so
            a view seen again in a new process (a resumed run imaging a field
            again) gives the very same frame, while repeated snaps of one view
            still differ.

        Returns
        -------
        numpy.ndarray
            ``uint16`` image: nuclei over a dim background, camera offset
            `offset_adu`, shot noise (Gaussian approximation of Poisson) and read
            noise.
        """
        h, w, ps = check_field(shape, pixel_size_um)
        field = np.zeros((h, w), np.float32)
        with self._lock:
            # the nuclei of each well in reach, blurred by that well's defocus
            for well, idx in self._near_by_well(x_um, y_um, h, w, ps, z_um):
                sigma_px = (
                    self.defocus_blur_per_um
                    * abs(float(z_um) - self.focus_um - self._focus_offset[well])
                    / ps
                )
                draw = functools.partial(
                    self._draw, idx, x_um, y_um, h, w, ps, labels=False
                )
                field += defocused(draw, (h, w), sigma_px)
            if rng is None:
                rng = self._view_rng(
                    x_um, y_um, z_um, h, w, ps, exposure_ms * intensity
                )
            noise = rng.standard_normal((h, w), dtype=np.float32)
        return self._expose(field, noise, ps, exposure_ms * intensity)

    def _view_rng(self, *view: float) -> np.random.Generator:
        """The noise generator of the next render of one view (see `render`)."""
        key = tuple(round(float(v) * 1000) for v in view)  # nm, 0.001 ms
        n = self._views.get(key, 0)
        self._views[key] = n + 1
        words = [int(k) & 0xFFFFFFFF for k in key]  # SeedSequence takes uint32 words
        return np.random.default_rng(
            np.random.SeedSequence([self._noise_entropy, *words, n])  # type: ignore[arg-type]
        )

    def truth_labels(
        self,
        x_um: float,
        y_um: float,
        shape: tuple[int, int] = (512, 512),
        pixel_size_um: float = 1.0,
    ) -> np.ndarray:
        """Instance labels (``uint32`` cell ids, 0 = background) of a field of view.

        Same geometry as `render`; a pixel belongs to a cell when its center lies
        inside the cell's nucleus. Where nuclei overlap, one of them wins.
        """
        h, w, ps = check_field(shape, pixel_size_um)
        with self._lock:
            groups = self._near_by_well(x_um, y_um, h, w, ps, None)
            idx = np.concatenate([i for _, i in groups] or [np.zeros(0, np.int64)])
            return self._draw(idx, x_um, y_um, h, w, ps, 0, labels=True)

    def cells_in_view(
        self,
        x_um: float,
        y_um: float,
        shape: tuple[int, int] = (512, 512),
        pixel_size_um: float = 1.0,
    ) -> np.ndarray:
        """Ids of the cells whose center lies in a field of view."""
        h, w, ps = check_field(shape, pixel_size_um)
        with self._lock:
            groups = self._near_by_well(x_um, y_um, h, w, ps, None)
        if not groups:
            return np.zeros(0, np.int64)
        idx = np.concatenate([i for _, i in groups])
        inside = (np.abs(self._x[idx] - x_um) <= w * ps / 2) & (
            np.abs(self._y[idx] - y_um) <= h * ps / 2
        )
        return idx[inside] + 1

    def cell_table(self, wells: Iterable[WellKey] | None = None) -> dict[str, Any]:
        """Every cell (or those of some wells), one array per column.

        Columns: ``id``, ``well`` (names), ``x_um``, ``y_um``, ``radius_um``
        (equivalent radius), ``aspect`` (minor/major), ``brightness`` (relative)
        and ``hit_phenotype`` (bool).
        """
        idx = self._cells_of(wells)
        names = np.asarray(self._well_names)
        return {
            "id": idx + 1,
            "well": names[self._well[idx]],
            "x_um": self._x[idx].copy(),
            "y_um": self._y[idx].copy(),
            "radius_um": self._r[idx].astype(np.float64),
            "aspect": (self._b[idx] / self._a[idx]).astype(np.float64),
            "brightness": self._bright[idx].astype(np.float64),
            "hit_phenotype": self._hit_cell[idx].copy(),
        }

    def ground_truth(self, wells: Iterable[WellKey] | None = None) -> dict[str, Any]:
        """The plate as JSON-ready data.

        Parameters
        ----------
        wells : iterable of str or (int, int), optional
            List only the cells of these wells (all wells are always described).
            ``None``: every cell of the plate.

        Returns
        -------
        dict
            ``seed``, ``parameters``, ``plate`` (``name``, ``rows``, ``columns``,
            ``well_spacing_um``, ``well_size_um``, ``circular_wells``,
            ``a1_center_xy``, ``rotation``), ``wells`` (per well: ``id`` such as
            ``"A1"``, ``row``, ``col``, ``x_um``, ``y_um`` (center), ``n_cells``,
            ``density_per_mm2``, ``empty``, ``hit``, ``focus_um``) and ``cells``
            (per cell: ``id``, ``well``, ``x_um``, ``y_um``, ``radius_um``,
            ``brightness``, ``hit_phenotype``).
        """
        well_records = [
            {
                "id": name,
                "row": int(self._well_rc[i, 0]),
                "col": int(self._well_rc[i, 1]),
                "x_um": round(float(self._well_xy[i, 0]), 3),
                "y_um": round(float(self._well_xy[i, 1]), 3),
                "n_cells": int(self._counts[i]),
                "density_per_mm2": round(float(self._density[i]), 3),
                "empty": bool(self._empty[i]),
                "hit": bool(self._hit[i]),
                "focus_um": self.focus_um + float(self._focus_offset[i]),
            }
            for i, name in enumerate(self._well_names)
        ]
        t = self.cell_table(wells)
        columns = zip(
            t["id"].tolist(),
            t["well"].tolist(),
            np.round(t["x_um"], 3).tolist(),
            np.round(t["y_um"], 3).tolist(),
            np.round(t["radius_um"], 3).tolist(),
            np.round(t["brightness"], 4).tolist(),
            t["hit_phenotype"].tolist(),
            strict=True,
        )
        cells = [
            {
                "id": i,
                "well": well,
                "x_um": x,
                "y_um": y,
                "radius_um": r,
                "brightness": bright,
                "hit_phenotype": hit,
            }
            for i, well, x, y, r, bright, hit in columns
        ]
        return {
            "seed": self.seed,
            "parameters": self.parameters(),
            "plate": {
                "name": self.plate.name,
                "rows": self.plate.rows,
                "columns": self.plate.columns,
                "well_spacing_um": [1000.0 * v for v in self.plate.well_spacing],
                "well_size_um": [1000.0 * v for v in self.plate.well_size],
                "circular_wells": self.plate.circular_wells,
                "a1_center_xy": list(self.a1_center_xy),
                "rotation": self.rotation,
            },
            "wells": well_records,
            "cells": cells,
        }

    def parameters(self) -> dict[str, Any]:
        """The parameters of this specimen (JSON-ready)."""
        return {
            "seed": self.seed,
            "plate": self.plate.name or self.plate.model_dump(mode="json"),
            "a1_center_xy": list(self.a1_center_xy),
            "rotation": self.rotation,
            "cell_density_per_mm2": self.cell_density_per_mm2,
            "density_cv": self.density_cv,
            "empty_fraction": self.empty_fraction,
            "hit_fraction": self.hit_fraction,
            "hit_cell_fraction": self.hit_cell_fraction,
            "hit_area_factor": self.hit_area_factor,
            "hit_brightness_factor": self.hit_brightness_factor,
            "focus_um": self.focus_um,
            "focus_range_um": self.focus_range_um,
            "focus_jitter_um": self.focus_jitter_um,
        }

    def __repr__(self) -> str:
        return (
            f"<PlateSpecimen {self.plate.name or 'plate'} seed={self.seed} "
            f"cells={self.n_cells} empty={int(self._empty.sum())} "
            f"hits={int(self._hit.sum())}>"
        )

    # ----------------------------------------------------------------- helpers
    def _well_id(self, well: WellKey) -> int:
        if isinstance(well, str):
            try:
                return self._well_index[well.upper()]
            except KeyError:
                raise KeyError(f"no well {well!r} on a {self.plate.name}") from None
        r, c = (int(v) for v in well)
        if not (0 <= r < self.plate.rows and 0 <= c < self.plate.columns):
            raise KeyError(f"no well {(r, c)} on a {self.plate.name}")
        return r * self.plate.columns + c

    def _nearest_rc(self, x_um: float, y_um: float) -> tuple[int, int]:
        rc = self._stage_to_index @ (np.array([x_um, y_um], float) - self._origin)
        r = int(np.clip(np.rint(rc[0]), 0, self.plate.rows - 1))
        c = int(np.clip(np.rint(rc[1]), 0, self.plate.columns - 1))
        return r, c

    def _local(self, well: int, x_um: float, y_um: float) -> tuple[float, float]:
        """Coordinates (µm) of a stage point along a well's own x and y axes."""
        d = np.array([x_um, y_um], float) - self._well_xy[well]
        return float(d @ self._ex), float(d @ self._ey)

    def _cells_of(self, wells: Iterable[WellKey] | None) -> np.ndarray:
        if wells is None:
            return np.arange(self.n_cells)
        ids = sorted({self._well_id(w) for w in wells})
        start = self._well_start
        return np.concatenate(
            [np.arange(start[i], start[i + 1]) for i in ids] or [np.zeros(0, int)]
        ).astype(np.int64)

    def _near_by_well(
        self,
        x_um: float,
        y_um: float,
        h: int,
        w: int,
        ps: float,
        z_um: float | None,
    ) -> list[tuple[int, np.ndarray]]:
        """Cells that may show in a field, per well: ``[(well, indices), ...]``.

        With `z_um`, the reach includes the padding of that well's defocus blur.
        """
        reach_um = self._max_a + 2 * ps
        pad_um = reach_um
        if z_um is not None:
            worst = np.abs(z_um - self.focus_um - self._focus_offset).max()
            pad_um += 3.5 * self.defocus_blur_per_um * worst + 4 * ps
        half_w, half_h = w * ps / 2 + pad_um, h * ps / 2 + pad_um
        corners = np.array(
            [
                [x_um - half_w, y_um - half_h],
                [x_um + half_w, y_um - half_h],
                [x_um - half_w, y_um + half_h],
                [x_um + half_w, y_um + half_h],
            ]
        )
        rc = (corners - self._origin) @ self._stage_to_index.T
        r0 = max(math.floor(rc[:, 0].min() - 0.5), 0)
        r1 = min(math.ceil(rc[:, 0].max() + 0.5), self.plate.rows - 1)
        c0 = max(math.floor(rc[:, 1].min() - 0.5), 0)
        c1 = min(math.ceil(rc[:, 1].max() + 0.5), self.plate.columns - 1)
        out = []
        for r in range(r0, r1 + 1):
            for c in range(c0, c1 + 1):
                well = r * self.plate.columns + c
                lo, hi = self._well_start[well], self._well_start[well + 1]
                if lo == hi:
                    continue
                if z_um is None:
                    pad = reach_um
                else:
                    defocus = abs(z_um - self.focus_um - self._focus_offset[well])
                    sigma_px = self.defocus_blur_per_um * defocus / ps
                    margin = blur_margin(h, w, sigma_px)
                    pad = reach_um + margin * ps
                x, y = self._x[lo:hi], self._y[lo:hi]
                near = (np.abs(x - x_um) < w * ps / 2 + pad) & (
                    np.abs(y - y_um) < h * ps / 2 + pad
                )
                if near.any():
                    out.append((well, lo + np.flatnonzero(near)))
        return out

    def _draw(
        self,
        idx: np.ndarray,
        x_um: float,
        y_um: float,
        h: int,
        w: int,
        ps: float,
        margin: int,
        *,
        labels: bool,
    ) -> np.ndarray:
        """Noise-free photons/ms/µm² (or labels) of cells `idx`, padded by `margin`.

        The nuclei are drawn as in `LiveSpecimen`, by
        `smartscope.sim._render.draw_nuclei`.
        """
        H, W = h + 2 * margin, w + 2 * margin
        # pixel (col, row) of the padded frame looks at stage
        # (x_um + (col - margin - (w - 1) / 2) * ps, ...)
        nuclei = Nuclei(
            col=(self._x[idx] - x_um) / ps + (w - 1) / 2 + margin,
            row=(self._y[idx] - y_um) / ps + (h - 1) / 2 + margin,
            a=self._a[idx].astype(np.float64),
            b=self._b[idx].astype(np.float64),
            phi=self._phi[idx].astype(np.float64),
            bright=self._bright[idx],
            tu=self._tu[idx],
            tv=self._tv[idx],
            nu=self._nu[idx],
            nv=self._nv[idx],
        )
        if labels:
            return label_nuclei(nuclei, (idx + 1).astype(np.uint32), (H, W), ps)
        return draw_nuclei(nuclei, (H, W), ps, self._texture, self.photons_per_ms)
