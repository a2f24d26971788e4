"""The virtual screening plate and its Micro-Manager camera, against ground truth."""

from __future__ import annotations

import gc
import json

import numpy as np
import pytest
import useq
from scipy import ndimage

from smartscope._resources import hardware_configs_dir
from smartscope.sim.plate import PlateSpecimen

PLATE_CFG = hardware_configs_dir() / "plate.cfg"
OFFSET = PlateSpecimen.offset_adu


@pytest.fixture(scope="module")
def plate96() -> PlateSpecimen:
    return PlateSpecimen(3)


@pytest.fixture(scope="module")
def plate384() -> PlateSpecimen:
    return PlateSpecimen(3, plate="384-well")


def _wells(spec: PlateSpecimen) -> list[dict]:
    return spec.ground_truth(wells=[])["wells"]


def _sharpness(img: np.ndarray) -> float:
    """Variance of the Laplacian: large for sharp edges."""
    return float(ndimage.laplace(img.astype(float)).var())


# ------------------------------------------------------------------ specimen
def test_same_seed_same_plate() -> None:
    a, b, c = PlateSpecimen(7), PlateSpecimen(7), PlateSpecimen(8)
    assert a.ground_truth() == b.ground_truth()
    assert a.ground_truth(wells=[]) != c.ground_truth(wells=[])
    x, y = a.well_center_um("C5")
    frames = [s.render(x, y, a.well_focus_um("C5")) for s in (a, b, c)]
    np.testing.assert_array_equal(frames[0], frames[1])
    assert not np.array_equal(frames[0], frames[2])
    truth = a.ground_truth(wells=["C5"])
    json.dumps(truth)  # JSON-ready
    assert {c["well"] for c in truth["cells"]} <= {"C5"}
    assert len(truth["wells"]) == 96
    well_keys = {"id", "row", "col", "n_cells", "empty", "hit", "focus_um"}
    assert set(truth["wells"][0]) >= well_keys
    cell_keys = {"id", "well", "x_um", "y_um", "radius_um", "hit_phenotype"}
    assert set(truth["cells"][0]) >= cell_keys


@pytest.mark.parametrize(
    ("plate", "empty_fraction", "hit_fraction", "n_empty", "n_hit"),
    [
        ("96-well", 0.15, 0.05, 14, 5),
        ("96-well", 0.5, 0.001, 48, 1),  # at least one hit
        ("96-well", 0.0, 0.0, 0, 0),
        ("384-well", 0.15, 0.05, 58, 19),
    ],
)
def test_empty_and_hit_wells_as_configured(
    plate: str, empty_fraction: float, hit_fraction: float, n_empty: int, n_hit: int
) -> None:
    spec = PlateSpecimen(
        1, plate=plate, empty_fraction=empty_fraction, hit_fraction=hit_fraction
    )
    wells = _wells(spec)
    empty = [w for w in wells if w["empty"]]
    hits = [w for w in wells if w["hit"]]
    assert len(empty) == n_empty and len(hits) == n_hit
    assert all(w["n_cells"] == 0 for w in empty)
    assert all(w["n_cells"] > 100 and not w["empty"] for w in hits)
    assert sum(w["n_cells"] for w in wells) == spec.n_cells

    # the phenotype: in about 60 % of the cells of hit wells, nowhere else
    table = spec.cell_table()
    in_hit = np.isin(table["well"], [w["id"] for w in hits])
    assert not table["hit_phenotype"][~in_hit].any()
    if n_hit:
        assert table["hit_phenotype"][in_hit].mean() == pytest.approx(0.6, abs=0.03)


@pytest.mark.parametrize("fixture", ["plate96", "plate384"])
def test_cells_lie_inside_their_wells(fixture: str, request) -> None:
    spec: PlateSpecimen = request.getfixturevalue(fixture)
    table = spec.cell_table()
    truth = spec.ground_truth(wells=[])
    half_x, half_y = (s / 2 for s in truth["plate"]["well_size_um"])
    centers = {w["id"]: (w["x_um"], w["y_um"]) for w in truth["wells"]}
    cx, cy = np.array([centers[w] for w in table["well"]]).T
    dx, dy = table["x_um"] - cx, table["y_um"] - cy
    semi_major = table["radius_um"] / np.sqrt(table["aspect"])
    if truth["plate"]["circular_wells"]:
        assert half_x == half_y
        assert np.all(np.hypot(dx, dy) + semi_major <= half_x + 1e-6)
    else:
        assert np.all(np.abs(dx) + semi_major <= half_x + 1e-6)
        assert np.all(np.abs(dy) + semi_major <= half_y + 1e-6)
    # cells fill their well, not just its middle
    assert np.abs(dx).max() > 0.9 * half_x and np.abs(dy).max() > 0.9 * half_y
    sample = np.random.default_rng(0).choice(spec.n_cells, 300, replace=False)
    for i in sample:
        assert spec.well_at(table["x_um"][i], table["y_um"][i]) == table["well"][i]
    # between wells there is nothing
    x, y = spec.well_center_um("B2")
    gap = (truth["plate"]["well_spacing_um"][0]) / 2
    assert spec.well_at(x + gap, y) is None
    assert not spec.truth_labels(x + gap, y, shape=(64, 64)).any()


def test_empty_wells_are_dark_and_hits_larger_and_brighter(plate96) -> None:
    wells = _wells(plate96)
    empty = next(w for w in wells if w["empty"])
    x, y = empty["x_um"], empty["y_um"]
    assert not plate96.truth_labels(x, y).any()
    assert plate96.cells_in_view(x, y).size == 0
    img = plate96.render(x, y, empty["focus_um"], exposure_ms=50)
    assert abs(float(np.median(img)) - OFFSET) < 30
    assert img.max() < OFFSET + 60  # background and noise only

    def measure(well: dict) -> tuple[float, float]:
        """Mean area (px) and mean signal of the nuclei in a field of a well."""
        x, y, z = well["x_um"], well["y_um"], well["focus_um"]
        labels = plate96.truth_labels(x, y)
        img = plate96.render(x, y, z, exposure_ms=20).astype(float) - OFFSET
        ids, areas = np.unique(labels[labels > 0], return_counts=True)
        assert ids.size >= 5
        return float(areas.mean()), float(img[labels > 0].mean())

    hits = [measure(w) for w in wells if w["hit"]]
    wells = [w for w in wells if not w["empty"]]
    normal = [measure(w) for w in [w for w in wells if not w["hit"]][:10]]
    hit_area, hit_signal = np.mean(hits, axis=0)
    area, signal = np.mean(normal, axis=0)
    assert hit_area > 1.2 * area
    assert hit_signal > 1.3 * signal

    table = plate96.cell_table()
    pheno = table["hit_phenotype"]
    r2 = table["radius_um"] ** 2
    ratio = r2[pheno].mean() / r2[~pheno].mean()
    assert ratio == pytest.approx(1.6, rel=0.05)
    ratio = table["brightness"][pheno].mean() / table["brightness"][~pheno].mean()
    assert ratio == pytest.approx(2.0, rel=0.1)


@pytest.mark.parametrize(
    ("plate", "a1_center_xy", "rotation"),
    [
        ("96-well", (0.0, 0.0), None),
        ("384-well", (0.0, 0.0), None),
        ("96-well", (-50_000.0, 30_000.0), 3.0),
    ],
)
def test_well_plate_plan_positions_land_in_the_intended_wells(
    plate: str, a1_center_xy: tuple[float, float], rotation: float | None
) -> None:
    spec = PlateSpecimen(
        0, plate=plate, a1_center_xy=a1_center_xy, rotation=rotation, empty_fraction=0
    )
    rows, cols = spec.plate.shape
    plan = useq.WellPlatePlan(
        plate=plate,
        a1_center_xy=a1_center_xy,
        rotation=rotation,
        selected_wells=([0, 0, rows - 1, rows - 1, 2], [0, cols - 1, 0, cols - 1, 5]),
        well_points_plan=useq.GridRowsColumns(
            rows=3, columns=3, fov_width=512, fov_height=512
        ),
    )
    assert plan == spec.well_plate_plan(
        selected_wells=plan.selected_wells, well_points_plan=plan.well_points_plan
    )
    names = spec.plate.all_well_names
    assert len(plan) == 45
    for pos in plan:
        intended = str(names[pos.plate_row, pos.plate_col])
        assert spec.well_at(pos.x, pos.y) == intended
        # and what the camera would see there are cells of that well
        ids = spec.cells_in_view(pos.x, pos.y)
        assert ids.size > 3
        wells = set(spec.cell_table()["well"][ids - 1].tolist())
        assert wells == {intended}
    # well centers coincide with the plan's
    for pos in plan.selected_well_positions:
        center = spec.well_center_um((pos.plate_row, pos.plate_col))
        np.testing.assert_allclose(center, (pos.x, pos.y), atol=1e-6)


def test_each_well_is_sharpest_at_its_own_focus(plate96) -> None:
    wells = [w for w in _wells(plate96) if not w["empty"]]
    focus = np.array([w["focus_um"] for w in wells])
    assert np.abs(focus).max() < 5 + 2 * 1.5 + 1e-6
    assert focus.std() > 1.0  # wells differ: per-well autofocus is needed
    lo, hi = wells[int(np.argmin(focus))], wells[int(np.argmax(focus))]
    assert hi["focus_um"] - lo["focus_um"] > 4
    rng = np.random.default_rng(0)
    for well in (lo, hi):
        x, y, f = well["x_um"] + 300, well["y_um"] - 200, well["focus_um"]
        dz = np.arange(-6, 7)
        sharpness = [
            _sharpness(plate96.render(x, y, f + d, exposure_ms=20, rng=rng)) for d in dz
        ]
        assert dz[int(np.argmax(sharpness))] == 0
        best = max(sharpness)
        assert sharpness[0] < 0.5 * best and sharpness[-1] < 0.5 * best
        assert plate96.blur_sigma_um(x, y, f) == pytest.approx(0.0, abs=1e-9)


def test_384_well_plate_builds_and_renders(plate384) -> None:
    assert plate384.n_wells == 384
    assert 1e5 < plate384.n_cells < 1e6
    # per-cell state stays small (no per-pixel or per-well images are kept)
    arrays = [v for v in vars(plate384).values() if isinstance(v, np.ndarray)]
    assert sum(a.nbytes for a in arrays) / plate384.n_cells < 120
    well = next(w for w in _wells(plate384) if w["n_cells"] > 500)
    img = plate384.render(well["x_um"], well["y_um"], well["focus_um"] + 3)
    assert img.shape == (512, 512) and img.dtype == np.uint16
    labels = plate384.truth_labels(well["x_um"], well["y_um"])
    assert labels.dtype == np.uint32 and labels.max() > 0
    assert img[labels > 0].mean() > img[labels == 0].mean() + 100
    truth = plate384.ground_truth(wells=[well["id"]])
    assert len(truth["cells"]) == well["n_cells"]


# -------------------------------------------------------------- the device
@pytest.fixture
def scope():
    """A `Microscope` on ``plate.cfg``, released after the test."""
    from pymmcore_plus import find_micromanager

    from smartscope.microscope import Microscope

    if not find_micromanager():
        pytest.fail(
            "Micro-Manager demo adapters not found: pip install mm-test-adapters",
            pytrace=False,
        )
    microscope = Microscope(PLATE_CFG)
    yield microscope
    microscope.close()
    gc.collect()


def _goto(core, x: float, y: float, z: float) -> None:
    core.setXYPosition(x, y)
    core.setPosition(z)
    core.waitForSystem()


def test_config_loads_with_the_plate_camera(scope) -> None:
    from pymmcore_plus.experimental.unicore import UniMMCore

    from smartscope.sim.plate_device import PlateCamera, plate_camera

    core = scope.core
    assert isinstance(core, UniMMCore)
    assert core.isPyDevice("Camera") and scope.image_shape == (512, 512)
    assert core.getPixelSizeUm() == 1.0
    assert "DAPI" in core.getAvailableConfigs("Channel")
    camera = plate_camera(core)
    assert isinstance(camera, PlateCamera) and camera.owning_core() is core
    first = camera.specimen
    assert first.plate.name == "96-well" and first.seed == 0
    core.setProperty("Camera", "Plate", "384-well")
    core.setProperty("Camera", "Seed", 4)
    core.setProperty("Camera", "EmptyFraction", 0.25)
    core.setProperty("Camera", "HitFraction", 0.1)
    spec = camera.specimen
    assert spec is not first and spec.plate.name == "384-well" and spec.seed == 4
    wells = _wells(spec)
    assert sum(w["empty"] for w in wells) == 96
    assert sum(w["hit"] for w in wells) == round(0.1 * 384)


def test_snap_matches_the_specimen_at_a_well(scope) -> None:
    from smartscope.sim.plate_device import plate_camera

    core = scope.core
    camera = plate_camera(core)
    spec = camera.specimen
    well = next(w for w in _wells(spec) if w["hit"])
    x, y, z = well["x_um"] + 700, well["y_um"] - 400, well["focus_um"] + 1.0
    _goto(core, x, y, z)
    x, y = core.getXYPosition()
    z = core.getPosition()
    core.snapImage()
    img = core.getImage()
    assert img.dtype == np.uint16 and img.shape == (512, 512)

    expected = spec.render(x, y, z, rng=np.random.default_rng(1))
    r = np.corrcoef(img.ravel().astype(float), expected.ravel().astype(float))[0, 1]
    assert r > 0.95
    labels = spec.truth_labels(x, y)
    bright = img > OFFSET + 40
    assert (bright & (labels > 0)).sum() / (bright | (labels > 0)).sum() > 0.6
    assert camera.snap_log[-1] == {
        "t_s": camera.snap_log[-1]["t_s"],
        "x_um": x,
        "y_um": y,
        "z_um": z,
        "width_um": 512.0,
        "height_um": 512.0,
        "exposure_ms": 10.0,
        "intensity": 1.0,
    }

    # a camera ROI reads out the same pixels of the same field
    core.setROI(100, 50, 200, 128)
    core.snapImage()
    roi = core.getImage()
    assert roi.shape == (128, 200)
    a, b = roi.astype(float).ravel(), img[50:178, 100:300].astype(float).ravel()
    assert np.corrcoef(a, b)[0, 1] > 0.95
    assert camera.snap_log[-1]["width_um"] == 200.0
    core.clearROI()


def test_mda_over_a_well_plate_plan_sees_each_well(scope) -> None:
    from smartscope.sim.plate_device import plate_camera

    core = scope.core
    spec = plate_camera(core).specimen
    frames: list[tuple[np.ndarray, useq.MDAEvent]] = []
    core.mda.events.frameReady.connect(lambda img, ev, _m: frames.append((img, ev)))
    wells = _wells(spec)
    chosen = [next(w for w in wells if w["empty"]), next(w for w in wells if w["hit"])]
    plan = spec.well_plate_plan(
        selected_wells=([w["row"] for w in chosen], [w["col"] for w in chosen])
    )
    core.mda.run(useq.MDASequence(stage_positions=plan, channels=["DAPI"]))
    assert len(frames) == 2
    for (img, event), well in zip(frames, chosen):
        assert event.pos_name == well["id"]
        labels = spec.truth_labels(event.x_pos, event.y_pos)
        if well["empty"]:
            assert not labels.any() and img.max() < OFFSET + 60
        else:
            assert img[labels > 0].mean() > img[labels == 0].mean() + 100
