"""The template plugin: its segmenter, its policy, and that smartscope finds both."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError
from scipy import ndimage as ndi
from smartscope.detections import Detections
from smartscope.frame import Frame
from smartscope.policies import PolicyContext, PPolicy, create_policy
from smartscope.scheduler import AddEvents
from smartscope.segment import PSegmenter, create_segmenter
from smartscope.segment._metrics import scores
from useq import MDAEvent

from smartscope_example import BrightestTarget, GaussianOtsuSegmenter

DISCS = [((30, 30), 8, 400.0), ((30, 90), 6, 900.0), ((90, 60), 10, 250.0)]


def _discs(discs=DISCS, shape=(128, 128), seed=0):
    """Blurred bright discs on a noisy background, and their labels."""
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    truth = np.zeros(shape, np.uint16)
    clean = np.zeros(shape, np.float32)
    for k, ((cy, cx), r, bright) in enumerate(discs, start=1):
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
        truth[inside] = k
        clean[inside] = bright
    rng = np.random.default_rng(seed)
    image = ndi.gaussian_filter(clean, 1.0) + 100 + rng.normal(0, 10, shape)
    return image.astype(np.float32), truth


def _frame(position="p0", kind="base"):
    return Frame(
        frame_index=0,
        event=MDAEvent(),
        position=position,
        kind=kind,
        stage_x_um=1000.0,
        stage_y_um=2000.0,
        stage_z_um=5.0,
        channel="DAPI",
        exposure_ms=10.0,
        t_acquired=0.0,
    )


def _detections(image, labels):
    def to_stage(px):  # pixel (x, y) → stage µm: 0.5 µm pixels around (1000, 2000)
        return (px - 63.5) * 0.5 + np.array([1000.0, 2000.0])

    return Detections.from_labels(labels, image, to_stage=to_stage)


# -- segmenter ------------------------------------------------------------------
def test_segmenter_finds_the_discs():
    seg = GaussianOtsuSegmenter()
    assert isinstance(seg, PSegmenter)
    (a, truth_a), (b, truth_b) = _discs(), _discs(DISCS[:2], seed=1)
    result = seg.segment(np.stack([a, b]))
    assert result.labels.shape == (2, 128, 128)
    assert result.labels.dtype == np.uint16
    assert scores([(truth_a, result.labels[0])])["f1@0.5"] == 1.0
    assert scores([(truth_b, result.labels[1])])["f1@0.5"] == 1.0
    assert seg.segment(np.full((64, 64), 7.0)).labels.max() == 0  # flat frame


def test_segmenter_takes_nan_pixels_as_background():
    image, truth = _discs()  # discs from row 20 on
    image[:5] = np.nan  # the NaN border of a registered float image
    labels = GaussianOtsuSegmenter().segment(image).labels[0]
    assert scores([(truth, labels)])["f1@0.5"] == 1.0


def test_segmenter_parameters():
    image, _ = _discs()
    all_three = GaussianOtsuSegmenter().segment(image).labels[0]
    areas = np.bincount(all_three.ravel())[1:]
    assert len(areas) == 3
    # one pixel more than the smallest object: exactly that one is dropped
    small = GaussianOtsuSegmenter(min_area_px=int(areas.min()) + 1)
    kept = small.segment(image).labels[0]
    assert kept.max() == 2
    assert sorted(np.bincount(kept.ravel())[1:]) == sorted(areas)[1:]
    assert small.model_id != GaussianOtsuSegmenter().model_id
    with pytest.raises(ValidationError):
        GaussianOtsuSegmenter(sigma=2)  # a typo is an error, not ignored
    with pytest.raises(ValueError, match=r"\(B, Y, X\)"):
        GaussianOtsuSegmenter().segment(np.zeros((1, 1, 8, 8)))


# -- policy ---------------------------------------------------------------------
def test_policy_targets_the_brightest_object_once_per_position():
    image, truth = _discs()
    det = _detections(image, truth)
    policy = BrightestTarget(exposure_ms=50)
    assert isinstance(policy, PPolicy)
    actions = policy.on_detections(_frame(), det, PolicyContext())
    assert len(actions) == 1 and isinstance(actions[0], AddEvents)
    (event,) = actions[0].events
    brightest = int(np.argmax(det.objects["mean_intensity"]))
    assert det.objects["label"][brightest] == 2  # the 900-bright disc
    assert event.x_pos == pytest.approx(det.objects["stage_x_um"][brightest])
    assert event.y_pos == pytest.approx(det.objects["stage_y_um"][brightest])
    assert event.x_pos == pytest.approx(1000 + (90 - 63.5) * 0.5, abs=0.3)
    assert event.z_pos == 5.0
    assert event.exposure == 50
    assert event.channel.config == "DAPI"
    assert event.metadata["smartscope"]["kind"] == "target"
    # once per position; another position gets its own
    assert policy.on_detections(_frame(), det, PolicyContext()) == []
    assert len(policy.on_detections(_frame("p1"), det, PolicyContext())) == 1
    # its own target frames do not trigger more targets
    fresh = BrightestTarget()
    assert fresh.on_detections(_frame(kind="target"), det, PolicyContext()) == []


def test_policy_skips_small_and_border_objects():
    discs = [((30, 30), 8, 400.0), ((3, 90), 6, 900.0), ((90, 60), 2, 2000.0)]
    image, truth = _discs(discs)
    det = _detections(image, truth)
    (action,) = BrightestTarget(min_area_px=20).on_detections(
        _frame(), det, PolicyContext()
    )
    # the brightest touches the border, the next is too small: the 400 disc
    assert action.events[0].metadata["smartscope"]["object"]["label"] == 1
    empty = _detections(image, np.zeros_like(truth))
    assert BrightestTarget().on_detections(_frame(), empty, PolicyContext()) == []


# -- registration ---------------------------------------------------------------
def test_smartscope_finds_both_through_entry_points():
    seg = create_segmenter("gaussian_otsu", {"sigma_px": 2.0})
    assert isinstance(seg, GaussianOtsuSegmenter) and seg.sigma_px == 2.0
    policy = create_policy("brightest_target", {"exposure_ms": 20})
    assert isinstance(policy, BrightestTarget) and policy.exposure_ms == 20
