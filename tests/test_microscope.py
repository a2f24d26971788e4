from __future__ import annotations

import os

import numpy as np
import pytest

from smartscope import ConfigError
from smartscope.microscope import Microscope, resolve_config
from smartscope.segment import ThresholdSegmenter


def test_demo_config_shows_beads(microscope):
    core = microscope.core
    assert core.getProperty(core.getCameraDevice(), "Mode") == "Fluorescent Beads"
    assert microscope.pixel_size_um == 1.0
    assert microscope.image_shape == (512, 512)
    np.testing.assert_allclose(microscope.affine, [[1, 0, 0], [0, 1, 0]])


def test_identity_geometry(microscope):
    center = microscope.image_center_px()
    np.testing.assert_allclose(center, [255.5, 255.5])
    np.testing.assert_allclose(microscope.pixel_to_stage(center, (10, 20)), [10, 20])
    # one pixel right / down is one µm in +x / +y
    np.testing.assert_allclose(
        microscope.pixel_to_stage(center + [1, 2], (10, 20)), [11, 22]
    )


@pytest.mark.parametrize(
    "affine",
    [
        (0.0, -0.5, 0.0, 0.5, 0.0, 0.0),  # rotated 90°, 0.5 µm/px
        (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0),  # camera mirrored in x
        (0.0, 2.0, 0.0, 2.0, 0.0, 0.0),  # x/y swapped, 2 µm/px
    ],
)
def test_non_identity_affine(microscope, affine):
    core = microscope.core
    core.setPixelSizeAffine(core.getCurrentPixelSizeConfig(), list(affine))
    np.testing.assert_allclose(microscope.affine.ravel(), affine)
    center = microscope.image_center_px()
    a, b, _, d, e, _ = affine
    # a pixel 10 columns right and 4 rows down of center
    got = microscope.pixel_to_stage(center + [10, 4], (100, -50))
    np.testing.assert_allclose(got, [100 + a * 10 + b * 4, -50 + d * 10 + e * 4])
    # round trip for many points
    pts = np.random.default_rng(0).uniform(0, 512, size=(20, 2))
    back = microscope.stage_to_pixel(microscope.pixel_to_stage(pts, (3, 4)), (3, 4))
    np.testing.assert_allclose(back, pts, atol=1e-9)


def test_moving_to_a_bead_centers_it(microscope):
    """Real demo camera: the stage position from pixel_to_stage centers a bead."""
    core = microscope.core
    seg = ThresholdSegmenter(min_area_px=6)

    def snap(x, y):
        core.setXYPosition(x, y)
        core.waitForSystem()
        core.snapImage()
        return core.getImage()

    from smartscope.detections import Detections

    img = snap(0, 0)
    det = Detections.from_labels(
        seg.segment(img).labels[0],
        img,
        to_stage=lambda px: microscope.pixel_to_stage(px, (0, 0)),
    )
    inner = det.select(~det.objects["touches_border"])
    assert len(inner["label"]) >= 3
    for x_um, y_um in list(zip(inner["stage_x_um"], inner["stage_y_um"]))[:3]:
        img = snap(x_um, y_um)
        d2 = Detections.from_labels(seg.segment(img).labels[0], img)
        dist = np.hypot(*(d2.centroids_px - microscope.image_center_px()).T)
        assert dist.min() < 1.0


def test_missing_config_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        resolve_config(tmp_path / "nope.cfg")


def test_unloadable_config_is_a_config_error(tmp_path):
    bad = tmp_path / "bad.cfg"
    bad.write_text("Device,Camera,NoSuchLibrary,NoSuchCam\n")
    from pymmcore_plus import CMMCorePlus

    scope = Microscope(core=CMMCorePlus())
    try:
        with pytest.raises(ConfigError, match="cannot load hardware config"):
            scope.load_config(bad)
    finally:
        scope.close()


def test_objective_presets_with_their_pixel_sizes(microscope):
    objectives = microscope.objectives()
    assert {k: v.pixel_size_um for k, v in objectives.items()} == {
        "10X": 1.0,
        "20X": 0.5,
        "40X": 0.25,
    }
    assert objectives["40X"].properties == (("Objective", "State", "0"),)
    assert microscope.objectives("NoSuchGroup") == {}


def test_pixels_of_a_frame_through_another_objective(microscope):
    # taken at 0.25 µm/px while the microscope is back on 10X (1 µm/px)
    assert microscope.pixel_size_um == 1.0
    center = microscope.image_center_px()
    px = center + np.array([[40.0, -8.0]])
    np.testing.assert_allclose(
        microscope.pixel_to_stage(px, (100.0, 50.0), 0.25), [[110.0, 48.0]]
    )
    np.testing.assert_allclose(
        microscope.pixel_to_stage(px, (100.0, 50.0)), [[140.0, 42.0]]
    )


def _os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux /proc")
def test_close_stops_the_cores_callback_thread_even_if_the_core_is_still_held():
    # A device fault's traceback can keep the core alive after close(). MMCore
    # then still owns a C++ thread delivering notifications into Python; one
    # delivered during interpreter shutdown aborts the process ("FATAL:
    # exception not rethrown", exit 134). close() must stop that thread itself.
    import pymmcore

    scope = Microscope()
    held = scope.core  # what a stored traceback does
    held.unloadAllDevices()  # device threads gone: what remains is the core's
    before = _os_threads()
    scope.close()
    after_close = _os_threads()
    # the reference check: unregistering the callback by hand stops one more
    # thread only if close() left it running
    pymmcore.CMMCore.registerCallback(held, None)
    assert _os_threads() == after_close
    assert after_close == before - 1
    del held
