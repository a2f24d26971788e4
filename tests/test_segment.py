from __future__ import annotations

import numpy as np
import pytest

from smartscope import RegistryError
from smartscope.detections import Detections
from smartscope.segment import (
    PSegmenter,
    ThresholdSegmenter,
    available_segmenters,
    create_segmenter,
)


def _blobs(centers, shape=(128, 128), radius=6.0, amp=1000.0, dtype=np.uint16):
    yy, xx = np.indices(shape)
    img = np.zeros(shape)
    for y, x in centers:
        img += amp * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * (radius / 2) ** 2))
    return (img + 50).astype(dtype)


def test_threshold_segmenter_is_a_segmenter():
    seg = create_segmenter("threshold", {"sigma_px": 1.5})
    assert isinstance(seg, PSegmenter)
    assert seg.model_id.startswith("threshold-")
    assert seg.model_id != ThresholdSegmenter().model_id
    assert "threshold" in available_segmenters()


def test_unknown_segmenter():
    with pytest.raises(RegistryError, match="unknown segmenter 'nope'"):
        create_segmenter("nope")


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_touching_objects_are_split(dtype):
    amp = 200 if dtype == np.uint8 else 1000
    img = _blobs([(40, 40), (40, 50), (90, 90)], amp=amp, dtype=dtype)
    out = ThresholdSegmenter().segment(img)
    labels = out.labels[0]
    assert labels.shape == img.shape and labels.dtype == np.uint16
    assert labels.max() == 3
    det = Detections.from_labels(labels, img)
    got = det.centroids_px[np.argsort(det.centroids_px[:, 0] + det.centroids_px[:, 1])]
    # touching blobs pull each other's centroid a little
    np.testing.assert_allclose(got, [[40, 40], [50, 40], [90, 90]], atol=1.5)


def test_batches_and_bad_shapes():
    seg = ThresholdSegmenter()
    batch = np.stack([_blobs([(30, 30)]), _blobs([(60, 60), (100, 20)])])
    labels = seg.segment(batch).labels
    assert labels.shape == batch.shape
    assert [lab.max() for lab in labels] == [1, 2]
    with pytest.raises(ValueError, match=r"expected a \(Y, X\) image"):
        seg.segment(np.zeros((2, 3, 64, 64)))
    assert seg.segment(np.zeros((64, 64))).labels.max() == 0  # blank frame


def test_detections_table():
    labels = np.zeros((20, 30), np.uint16)
    labels[2:6, 3:9] = 7  # 4 x 6 box
    labels[15:20, 25:30] = 2  # touches the corner
    image = np.ones_like(labels, dtype=float) * 10
    det = Detections.from_labels(
        labels, image, to_stage=lambda px: px * 2 + 100, frame_index=5, model_id="m"
    )
    assert len(det) == 2
    o = det.objects
    np.testing.assert_array_equal(o["label"], [2, 7])
    np.testing.assert_allclose(o["area_px"], [25, 24])
    np.testing.assert_allclose(o["x_px"], [27, 5.5])
    np.testing.assert_allclose(o["y_px"], [17, 3.5])
    np.testing.assert_allclose(o["stage_x_um"], [154, 111])
    np.testing.assert_array_equal(o["touches_border"], [True, False])
    np.testing.assert_array_equal(
        np.column_stack([o["bbox_y0"], o["bbox_x0"], o["bbox_y1"], o["bbox_x1"]]),
        [[15, 25, 20, 30], [2, 3, 6, 9]],
    )
    assert (
        Detections.from_labels(np.zeros((5, 5), int), np.zeros((5, 5)))
        .objects["label"]
        .size
        == 0
    )
    with pytest.raises(ValueError, match="same 2D shape"):
        Detections.from_labels(labels, image[:5])
