from __future__ import annotations

import re

import numpy as np
import pytest
from scipy import ndimage as ndi

from smartscope import RegistryError
from smartscope.detections import Detections
from smartscope.segment import (
    PSegmenter,
    ThresholdSegmenter,
    available_segmenters,
    create_segmenter,
    fill_non_finite,
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


def test_peak_intensity_is_the_second_brightest_pixel():
    """A hot pixel does not make a peak; a joined bright nucleus keeps its own."""
    labels = np.zeros((10, 20), np.uint16)
    image = np.full(labels.shape, 100.0)
    labels[1:4, 1:4] = 1
    image[2, 2] = 5000  # one hot pixel in a dim nucleus
    image[1, 1] = 130
    labels[5:9, 2:14] = 2  # a bright nucleus joined to a dim one
    image[5:9, 2:6] = 800
    image[6, 3] = 900
    labels[0, 19] = 3  # one pixel: its only value
    image[0, 19] = 42
    det = Detections.from_labels(labels, image)
    o = det.objects
    np.testing.assert_allclose(o["peak_intensity"], [130, 800, 42])
    slim = det.table_only()
    assert slim.labels.size == 0 and len(slim) == 3 and not slim.extra
    np.testing.assert_allclose(o["mean_intensity"][1], (15 * 800 + 900 + 32 * 100) / 48)


def test_fragments_join_the_larger_object_they_touch():
    from smartscope.segment._postprocess import merge_fragments

    lab = np.zeros((100, 60), np.uint16)
    lab[5:25, 5:25] = 1  # a nucleus (400 px)
    lab[10:14, 25:28] = 2  # a piece split off it (12 px, 4 shared edges)
    lab[5:25, 35:55] = 3  # a second nucleus
    lab[30:34, 36:39] = 4  # a small object that touches nothing: a bead
    lab[28:38, 6:16] = 5  # two small touching objects of one size, together
    lab[28:38, 16:26] = 6  # over 0.4 x the median: daughters, not fragments
    lab[28:32, 28:31] = 20  # two touching pieces that together are still a
    lab[28:32, 31:34] = 21  # fragment: halves of one small, bright nucleus
    lab[25:27, 40:50] = 7  # a sliver along nucleus 3 (10 shared edges)
    for i, y in enumerate(range(40, 100, 20)):  # more nuclei: the median is theirs
        lab[y : y + 18, 5:27] = 8 + 2 * i
        lab[y : y + 18, 35:57] = 9 + 2 * i
    out = merge_fragments(lab, fraction=0.4)
    assert (out[lab == 2] == 1).all() and (out[lab == 7] == 3).all()
    assert (out[(lab == 20) | (lab == 21)] == 20).all()
    for kept in (1, 3, 4, 5, 6, 8, 13):
        assert (out[lab == kept] == kept).all()
    assert merge_fragments(lab, fraction=0) is lab  # 0 turns it off
    # a piece between two nuclei joins the one it shares more edges with
    two = lab.copy()
    two[lab == 2] = 0
    two[10:18, 25:35] = 2  # 8 edges with nucleus 1 (its left side) ...
    two[16:18, 33:35] = 3  # ... 10 with nucleus 3, which reaches into a corner
    np.testing.assert_array_equal(merge_fragments(two, 0.4)[two == 2], 3)


def test_a_piece_that_touched_only_pieces_joins_once_they_have_joined():
    from smartscope.segment._postprocess import merge_fragments

    lab = np.zeros((80, 120), np.uint16)
    for i, x in enumerate(range(0, 120, 24)):  # five nuclei of 20 x 20
        lab[50:70, x : x + 20] = i + 1
    lab[20:40, 30:50] = 6  # a nucleus cut into pieces: its core ...
    lab[14:20, 30:50] = 7  # ... a piece along it (120 px) ...
    lab[10:14, 30:50] = 8  # ... and one beyond that (80 px, touches only 7)
    once = merge_fragments(lab, rounds=1)
    assert (once[lab == 7] == 6).all() and (once[lab == 8] == 8).all()
    out = merge_fragments(lab)
    assert (out[(lab >= 6)] == 6).all()
    for kept in range(1, 6):
        assert (out[lab == kept] == kept).all()
    assert merge_fragments(out) is out  # nothing more to join


def test_probabilities_to_labels_merges_a_split_off_piece():
    from smartscope.segment._postprocess import probabilities_to_labels

    classes = np.zeros((48, 48), np.int64)  # 0 background, 1 interior, 2 boundary
    classes[8:40, 8:40] = 1
    classes[8:40, 8] = classes[8:40, 39] = classes[8, 8:40] = classes[39, 8:40] = 2
    # a stray boundary line cuts a corner off: a seed of its own
    classes[34, 30:39] = classes[34:39, 30] = 2
    probs = np.eye(3, dtype=np.float32)[classes].transpose(2, 0, 1)
    apart, _ = probabilities_to_labels(probs, fragment_fraction=0)
    joined, scores = probabilities_to_labels(probs)
    assert apart.max() == 2 and joined.max() == 1 and len(scores) == 1
    assert (joined[8:40, 8:40] == 1).all()


def test_debris_does_not_set_the_median_object_area():
    from smartscope.segment._postprocess import typical_area

    nuclei = [6000, 6600, 7000, 7500, 7800, 11900, 13000]
    specks = [10, 11, 12, 15, 20, 25, 30, 50, 80, 90, 100, 130]
    assert typical_area(np.array(nuclei + specks)) == 7500  # their median
    assert np.median(nuclei + specks) == 90  # a plain median is a speck's
    # nuclei within a 4-fold spread of sizes all count; a lone object is its
    # own median
    spread = np.array([200, 250, 300, 400, 500, 600, 800])
    assert typical_area(spread) == 400
    assert typical_area(np.array([42])) == 42
    assert typical_area(np.zeros(0)) == 0.0


def test_a_piece_joins_its_nucleus_among_many_specks():
    from smartscope.segment._postprocess import probabilities_to_labels

    classes = np.zeros((48, 140), np.int64)  # 0 background, 1 interior, 2 boundary
    classes[8:40, 8:40] = 1
    classes[8:40, 8] = classes[8:40, 39] = classes[8, 8:40] = classes[39, 8:40] = 2
    classes[34, 30:39] = classes[34:39, 30] = 2  # a corner cut off: a piece
    for y in range(4, 44, 6):  # 35 specks of 3 x 3, more than the objects
        for x in range(60, 136, 16):
            classes[y : y + 3, x : x + 3] = 1
    probs = np.eye(3, dtype=np.float32)[classes].transpose(2, 0, 1)
    labels, _ = probabilities_to_labels(probs)
    assert (labels[9:39, 9:39] == labels[20, 20]).all()  # one nucleus, corner in
    assert labels.max() == 1 + 35  # the specks stay objects of their own


def test_median_object_radius_measures_pieces_of_foreground():
    from smartscope.segment._postprocess import median_object_radius

    yy, xx = np.indices((256, 256))
    fg = np.zeros((256, 256), bool)
    for (y, x), r in zip(
        [(40, 40), (40, 150), (150, 60), (170, 180)], [30, 30, 30, 10]
    ):
        fg |= (yy - y) ** 2 + (xx - x) ** 2 <= r**2
    fg[0:2, 250:252] = True  # a speck under min_area_px: ignored
    assert median_object_radius(fg) == pytest.approx(30, abs=1.0)
    assert median_object_radius(fg, step=1) == pytest.approx(30, abs=0.5)
    # the median, not the mean: 4 small pieces and 3 large ones read small
    for x in (40, 100, 230):
        fg |= (yy - 225) ** 2 + (xx - x) ** 2 <= 10**2
    assert median_object_radius(fg) == pytest.approx(10, abs=1.0)
    assert median_object_radius(np.zeros((64, 64), bool)) == 0.0


def test_large_objects_are_split_at_a_waist_not_along_a_long_axis():
    from smartscope.segment._postprocess import split_waists

    yy, xx = np.indices((200, 320))
    lab = np.zeros((200, 320), np.int32)
    for i, x in enumerate(range(20, 320, 40)):  # eight nuclei of radius 10
        lab[(yy - 20) ** 2 + (xx - x) ** 2 <= 100] = i + 1
    # two nuclei pressed together (two discs, notches where they meet) ...
    pair = ((yy - 80) ** 2 + (xx - 60) ** 2 <= 196) | (
        (yy - 80) ** 2 + (xx - 84) ** 2 <= 196
    )
    lab[pair] = 9
    # ... and one long single nucleus of the same area (an ellipse, 3:1)
    ellipse = ((yy - 150) / 10.5) ** 2 + ((xx - 160) / 31.5) ** 2 <= 1
    lab[ellipse] = 10
    out = split_waists(lab, ratio=2.0)
    halves = np.unique(out[pair])
    assert len(halves) == 2 and 9 in halves
    left = out[80, 50]
    assert (out[pair & (xx < 70)] == left).all() and (
        out[pair & (xx > 74)] != left
    ).all()
    assert (out[ellipse] == 10).all()  # one peak, however long
    for kept in range(1, 9):
        assert (out[lab == kept] == kept).all()
    # not when the pair is under the ratio, nor when a part would be tiny
    assert split_waists(lab, ratio=8.0) is lab
    assert split_waists(lab, ratio=2.0, min_fraction=2.0) is lab


def test_a_long_nucleus_turned_off_the_pixel_grid_is_not_split():
    # the distance transform of a long, flat-sided nucleus turned by an angle
    # has a ridge with several tops a fraction of a pixel apart: one peak,
    # not several (an h-dome, not every top of it)
    from smartscope.segment._postprocess import split_waists

    yy, xx = np.indices((300, 400))
    lab = np.zeros(yy.shape, np.int32)
    for i, x in enumerate(range(20, 400, 40)):  # ten nuclei of radius 10
        lab[(yy - 20) ** 2 + (xx - x) ** 2 <= 100] = i + 1
    singles, angles = [], [15, 20, 30, 60, 75]
    for j, (angle, cy, cx) in enumerate(
        zip(angles, [90, 90, 90, 200, 200], [60, 180, 300, 60, 180])
    ):
        # a stadium: 24 px of straight sides, 13 px caps (3.6x the median area)
        a = np.deg2rad(angle)
        along = np.clip((yy - cy) * np.sin(a) + (xx - cx) * np.cos(a), -12, 12)
        dy, dx = yy - cy - along * np.sin(a), xx - cx - along * np.cos(a)
        single = dy**2 + dx**2 <= 13**2
        lab[single] = 11 + j
        singles.append(single)
    # two nuclei pressed together, turned by 45 degrees, still split
    d = 12 / np.sqrt(2)
    pair = ((yy - 200 + d) ** 2 + (xx - 300 + d) ** 2 <= 14**2) | (
        (yy - 200 - d) ** 2 + (xx - 300 - d) ** 2 <= 14**2
    )
    lab[pair] = 20
    out = split_waists(lab)
    for j, single in enumerate(singles):
        assert (out[single] == 11 + j).all(), f"split at {angles[j]} degrees"
    assert len(np.unique(out[pair])) == 2


def test_regional_maxima_are_counted_as_local_maxima_counts_them():
    # `split_waists` skips an object whose distance map has one regional
    # maximum; the quick count must agree with skimage's on plateaus, ridges
    # and ties, or a waist would go unsplit
    from skimage.morphology import local_maxima

    from smartscope.segment._postprocess import _regional_maxima

    rng = np.random.default_rng(5)
    eight = np.ones((3, 3), bool)
    yy, xx = np.indices((40, 40))
    counts = []
    for i in range(600):
        if i % 2:  # random levels: plateaus, ties, many maxima
            h, w = rng.integers(3, 30, 2)
            img = rng.integers(0, rng.integers(2, 6), (h, w)).astype(np.float64)
            mask = rng.random((h, w)) < 0.9
        else:  # the distance map of one to three overlapping discs
            mask = np.zeros(yy.shape, bool)
            for _ in range(rng.integers(1, 4)):
                cy, cx, r = rng.uniform(10, 30), rng.uniform(10, 30), rng.uniform(3, 10)
                mask |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            img = ndi.distance_transform_edt(mask)[:: 1 + i % 4 // 2, :: 1 + i % 4 // 2]
            mask = mask[:: 1 + i % 4 // 2, :: 1 + i % 4 // 2]
        expected = ndi.label(local_maxima(img) & mask, eight)[1]
        assert _regional_maxima(img, mask) == expected
        counts.append(expected)
    assert counts.count(1) > 100 and max(counts) >= 3  # both branches ran
    assert _regional_maxima(np.ones((5, 5)), np.zeros((5, 5), bool)) == 0


def test_probabilities_to_labels_splits_as_the_public_splits_do():
    # `probabilities_to_labels` shares one count of the objects between the
    # fragment merge and both splits: the same labels as the public splits
    # called one after another on its labels without them
    from smartscope.segment._dl import UNetSegmenter
    from smartscope.segment._postprocess import (
        finish_labels,
        probabilities_to_labels,
        split_notches,
        split_waists,
    )
    from smartscope.segment._synth import render_scene

    seg = UNetSegmenter(max_object_radius_px=None)
    split_frames = 0
    for seed in (3, 11, 29, 47):
        rng = np.random.default_rng(seed)
        scene = render_scene(rng, (256, 256), kind="nuclei", style="widefield")
        probs = seg.probabilities(scene.image)
        got, _ = probabilities_to_labels(probs)
        whole, _ = probabilities_to_labels(probs, waist_ratio=None)
        split = split_notches(split_waists(whole))
        fg_prob = probs[1] + probs[2]
        expected, _ = finish_labels(split, fg_prob, fg_prob > 0.6)
        np.testing.assert_array_equal(got, expected)
        split_frames += split is not whole
    assert split_frames >= 1


def test_nuclei_pressed_side_by_side_are_split_between_their_notches():
    # two elongated nuclei pressed together along their long sides: one peak
    # of the distance to the edge (on the contact), so no waist, but a notch
    # at each end of the contact and two convex halves
    from smartscope.segment._postprocess import (
        probabilities_to_labels,
        split_notches,
        split_waists,
    )

    yy, xx = np.indices((260, 400))
    lab = np.zeros(yy.shape, np.int32)
    for i, x in enumerate(range(20, 400, 40)):  # ten nuclei of radius 10
        lab[(yy - 20) ** 2 + (xx - x) ** 2 <= 100] = i + 1

    def ellipse(cy, cx, a, b, angle):
        t = np.deg2rad(angle)
        u = (xx - cx) * np.cos(t) + (yy - cy) * np.sin(t)
        v = -(xx - cx) * np.sin(t) + (yy - cy) * np.cos(t)
        return (u / a) ** 2 + (v / b) ** 2 <= 1

    pairs = []
    # centres 14 px apart across the long axes (minor semi-axes 9: pressed
    # 4 px into each other; at 16 px apart the waist split finds them); the
    # last pair 11 px apart (p = 0.39 of the minor semi-axis: the cut is 3.8x
    # the ellipses' summed notch depth, 4-4.5x on the pixel outline; the pairs
    # merged on the real image read 3.5-3.6x), which only cut limits over 4 split
    setup = [(90, 80, 0, 7), (90, 220, 30, 7), (200, 80, 75, 7), (90, 330, 50, 5.5)]
    for j, (cy, cx, angle, half) in enumerate(setup):
        dy, dx = half * np.cos(np.deg2rad(angle)), -half * np.sin(np.deg2rad(angle))
        first = ellipse(cy + dy, cx + dx, 16, 9, angle)
        second = ellipse(cy - dy, cx - dx, 16, 9, angle)
        union = first | second
        lab[union] = 11 + j
        # pressed, they meet along the straight contact between their centres
        near = (yy - cy) * dy + (xx - cx) * dx > 0
        pairs.append((union & near, union & ~near, union))
    # singles of the same size stay whole: a long ellipse, a bean (one notch)
    single = ellipse(200, 220, 23, 12.5, 20)
    lab[single] = 20
    bean = ((yy - 200) ** 2 + (xx - 330) ** 2 <= 17**2) & ~(
        (yy - 200) ** 2 + (xx - 352) ** 2 <= 9**2
    )
    lab[bean] = 21

    assert all(len(np.unique(split_waists(lab)[union])) == 1 for *_, union in pairs)
    out = split_notches(lab)
    for first, second, union in pairs:
        assert len(np.unique(out[union])) == 2
        for half in (first, second):  # each part is one of the two nuclei
            part = out == np.bincount(out[half]).argmax()
            assert (part & half).sum() / (part | half).sum() > 0.85
    assert (out[single] == 20).all() and (out[bean] == 21).all()
    for kept in range(1, 11):
        assert (out[lab == kept] == kept).all()
    assert split_notches(lab, ratio=8.0) is lab
    assert split_notches(lab, min_solidity=0.999) is lab

    # in the instance step: a seed over both nuclei still gives two objects,
    # unless the shape splits are off
    probs = np.zeros((3, *lab.shape), np.float32)
    probs[1] = lab > 0
    probs[0] = 1 - probs[1]
    labels, _ = probabilities_to_labels(probs)
    assert all(len(np.unique(labels[union])) == 2 for *_, union in pairs)
    labels, _ = probabilities_to_labels(probs, waist_ratio=None)
    assert all(len(np.unique(labels[union])) == 1 for *_, union in pairs)


def test_fill_non_finite_reads_nan_and_inf_as_each_planes_background():
    rng = np.random.default_rng(3)
    batch = rng.normal(100, 10, (3, 40, 50)).astype(np.float32)
    batch[0, :4] = np.nan
    batch[1, :, -2:] = np.inf
    batch[1, 0, 0] = -np.inf
    batch[2] = np.nan  # nothing finite: zeros
    before = batch.copy()
    out = fill_non_finite(batch)
    np.testing.assert_array_equal(batch, before)  # the caller's array is kept
    assert np.isfinite(out).all()
    for i in (0, 1):
        finite = np.isfinite(before[i])
        np.testing.assert_array_equal(out[i][finite], before[i][finite])
        expected = np.percentile(before[i][finite], 5)  # what normalize maps to 0
        np.testing.assert_allclose(out[i][~finite], expected, rtol=1e-6)
    assert not out[2].any()
    ints = rng.integers(0, 4000, (30, 30)).astype(np.uint16)
    assert fill_non_finite(ints) is ints
    clean = before[:2, 10:20, :40]
    assert fill_non_finite(clean) is clean


def test_reread_windows_pick_large_objects_and_keep_their_crops_in_the_frame():
    from smartscope.segment._postprocess import reread_windows

    lab = np.zeros((200, 300), np.uint16)
    for i, x in enumerate(range(10, 250, 40)):  # six nuclei of 20 x 20
        lab[150:170, x : x + 20] = i + 1
    lab[2:22, 2:42] = 7  # twice their area, in the frame's corner
    lab[60:100, 200:240] = 8  # four times their area
    found = reread_windows(lab, ratio=1.7, side=96)
    assert found.median_area == 400
    assert [w[0] for w in found.windows] == [7, 8]
    assert found.shape == (96, 96)
    for label, y0, x0 in found.windows:
        assert 0 <= y0 <= 200 - 96 and 0 <= x0 <= 300 - 96
        ys, xs = np.nonzero(lab == label)  # the whole object lies in its crop
        assert ys.min() >= y0 and ys.max() < y0 + 96
        assert xs.min() >= x0 and xs.max() < x0 + 96
    assert reread_windows(lab, ratio=5.0).windows == []
    # an object larger than the crop widens every crop (1.25 x its extent);
    # the frame caps the crop
    lab[20:110, 100:140] = 9
    assert reread_windows(lab, ratio=1.7, side=96).shape == (113, 113)
    assert reread_windows(lab, ratio=1.7, side=250).shape == (200, 250)
    one = np.zeros((64, 64), np.uint16)
    one[10:50, 10:50] = 1
    assert reread_windows(one).windows == []  # no median to compare with


def test_split_by_reread_takes_only_parts_that_lie_in_the_object():
    from smartscope.segment._postprocess import split_by_reread

    lab = np.zeros((64, 64), np.int32)
    lab[10:30, 10:50] = 5  # one object that the crop sees as two
    lab[40:50, 10:20] = 6
    crop = np.zeros((64, 64), np.int32)
    crop[10:30, 10:31] = 1
    crop[10:30, 33:50] = 2
    out = lab.copy()
    nxt = split_by_reread(out, 5, 0, 0, crop, 7, median_area=300.0)
    assert nxt == 8
    assert (out[10:30, 33:50] == 7).all()  # the smaller part is new ...
    assert (out[10:30, 10:33] == 5).all()  # ... the rest keeps its label
    assert (out[40:50, 10:20] == 6).all()
    # a part under 0.3 x the median area is not a nucleus of its own
    out = lab.copy()
    assert split_by_reread(out, 5, 0, 0, crop, 7, median_area=2000.0) == 7
    np.testing.assert_array_equal(out, lab)
    # nor is a crop object that lies mostly outside the object
    wide = crop.copy()
    wide[30:60, 33:50] = 2
    out = lab.copy()
    assert split_by_reread(out, 5, 0, 0, wide, 7, median_area=300.0) == 7
    np.testing.assert_array_equal(out, lab)


# ------------------------------------------- labels from other people's models
def test_instance_labels_accepts_the_dtypes_other_tools_return():
    from smartscope.segment._protocol import instance_labels

    ref = np.zeros((6, 8), np.uint16)
    ref[1:3, 1:3], ref[4:6, 5:8] = 1, 2
    for labels in (
        ref,
        ref.astype(np.int32),
        ref.astype(np.uint64),
        ref.astype(np.float32),  # whole numbers in a float array
    ):
        out = instance_labels(labels, (6, 8))
        assert out.dtype == np.uint16
        np.testing.assert_array_equal(out, ref)
    np.testing.assert_array_equal(instance_labels(ref > 0, (6, 8)), ref > 0)
    # ids beyond uint16, sparse: renumbered 1..N in the order of their values
    sparse = np.where(ref == 1, 2**40, np.where(ref == 2, 70_000, 0)).astype(np.int64)
    np.testing.assert_array_equal(
        instance_labels(sparse, (6, 8)), np.where(ref, 3 - ref, 0)
    )
    # no background pixel at all: the ids still start at 1
    full = np.full((2, 2), 100_000, np.int64)
    full[0, 0] = 200_000
    np.testing.assert_array_equal(instance_labels(full, (2, 2)), [[2, 1], [1, 1]])


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (
            np.zeros((5, 5), np.uint16),
            "labels of shape (5, 5) for an image of shape (6, 8)",
        ),
        (np.full((6, 8), 0.5), "dtype float64 with non-integer or NaN values"),
        (np.full((6, 8), np.nan, np.float32), "dtype float32 with non-integer or NaN"),
        (np.full((6, 8), -1, np.int32), "negative labels (min -1)"),
        (np.full((6, 8), "a"), "dtype <U1: instance labels are integers"),
        (np.arange(1, 6 * 8 + 1).reshape(6, 8) + 2**20, None),  # fine: 48 objects
    ],
)
def test_instance_labels_refuses_what_is_no_label_image(labels, message):
    from smartscope.segment._protocol import instance_labels

    if message is None:
        assert instance_labels(labels, (6, 8)).max() == 48
        return
    with pytest.raises(ValueError, match=re.escape(message)):
        instance_labels(labels, (6, 8))


def test_instance_labels_refuses_more_objects_than_the_dataset_stores():
    from smartscope.segment._protocol import instance_labels

    labels = np.arange(1, 257 * 256 + 1, dtype=np.int64).reshape(257, 256)
    with pytest.raises(ValueError, match="65792 objects in one image; at most 65535"):
        instance_labels(labels, (257, 256))
