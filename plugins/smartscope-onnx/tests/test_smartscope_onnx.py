"""smartscope-onnx: the exported built-in model, foreign ONNX models, errors."""

from __future__ import annotations

import socket

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402
from smartscope.segment import PSegmenter, create_segmenter  # noqa: E402
from smartscope.segment._metrics import scores  # noqa: E402
from smartscope.segment._synth import synth_sample  # noqa: E402

from smartscope_onnx import OnnxModelError, OnnxSegmenter  # noqa: E402


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture(scope="module")
def builtin_onnx(tmp_path_factory):
    from smartscope.segment._export import export_model

    return export_model("builtin", "onnx", tmp_path_factory.mktemp("onnx") / "b.onnx")


@pytest.fixture(scope="module")
def torch_unet():
    from smartscope.segment import UNetSegmenter

    return UNetSegmenter(device="cpu", precision="fp32", threads=2)


def _images():
    """Synthetic camera images: nuclei, beads, and a size that is no multiple of 16."""
    out = [synth_sample(s, (256, 256), "nuclei")[0] for s in (11, 12, 13)]
    out.append(synth_sample(14, (256, 256), "beads")[0])
    out.append(synth_sample(15, (200, 312), "nuclei")[0])
    return out


def _save(model, path):
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _pointwise_model(path, *, channels: int = 1, in_rank: int = 4, in_ch: int = 1):
    """ONNX model: per-pixel foreground from the scaled image (no training).

    ``channels=1``: sigmoid(12 (x - 0.5)) (a probability); ``channels=2``:
    logits ``[-12 (x - 0.5), 12 (x - 0.5)]`` for background/foreground.
    """
    dims = ["b", in_ch, "y", "x"] if in_rank == 4 else ["y", "x"][:in_rank]
    x = helper.make_tensor_value_info("raw", TensorProto.FLOAT, dims)
    half = helper.make_tensor("half", TensorProto.FLOAT, [], [0.5])
    gain = helper.make_tensor("gain", TensorProto.FLOAT, [], [12.0])
    nodes = [
        helper.make_node("Sub", ["raw", "half"], ["centred"]),
        helper.make_node("Mul", ["centred", "gain"], ["logit"]),
    ]
    if channels == 1:
        nodes.append(helper.make_node("Sigmoid", ["logit"], ["out"]))
    else:
        nodes += [
            helper.make_node("Neg", ["logit"], ["neg"]),
            helper.make_node("Concat", ["neg", "logit"], ["out"], axis=1),
        ]
    out_dims = ["b", channels, "y", "x"] if in_rank == 4 else dims
    y = helper.make_tensor_value_info("out", TensorProto.FLOAT, out_dims)
    graph = helper.make_graph(nodes, "pointwise", [x], [y], initializer=[half, gain])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return _save(model, path)


def _discs() -> tuple[np.ndarray, np.ndarray]:
    """Two touching discs and one apart, on a noisy background, with labels."""
    yy, xx = np.mgrid[0:128, 0:128]
    truth = np.zeros((128, 128), np.uint16)
    for k, (cy, cx) in enumerate([(40, 40), (40, 64), (96, 90)], start=1):
        truth[(yy - cy) ** 2 + (xx - cx) ** 2 <= 13**2] = k
    rng = np.random.default_rng(0)
    image = 100 + 900 * (truth > 0) + rng.normal(0, 20, truth.shape)
    return image.astype(np.float32), truth


# -- the exported built-in model ---------------------------------------------------
def test_builtin_export_matches_torch(builtin_onnx, torch_unet):
    seg = OnnxSegmenter(model=str(builtin_onnx), device="cpu", threads=2)
    assert isinstance(seg, PSegmenter)
    images = _images()
    pairs = []
    for img in images:
        ref = torch_unet.segment(img).labels[0]
        got = seg.segment(img)
        assert got.labels.shape == (1, *img.shape)
        assert got.labels.dtype == np.uint16
        np.testing.assert_allclose(
            seg.probabilities(img)[0], torch_unet.probabilities(img), atol=1e-3
        )
        pairs.append((ref, got.labels[0]))
    result = scores(pairs)
    assert result["n_true"] > 100  # the comparison is not between empty images
    assert result["f1@0.5"] >= 0.99, result
    # a batch gives what single images give
    batch = seg.segment(np.stack(images[:3])).labels
    for i in range(3):
        np.testing.assert_array_equal(batch[i], pairs[i][1])


def test_the_reread_of_large_objects_matches_the_builtin_segmenters(builtin_onnx):
    """`reread_ratio` reads large objects again in crops, as the built-in does."""
    from smartscope.segment import UNetSegmenter

    # frames where the built-in's re-read splits objects (none of them large
    # enough for its test-time scale, which is its own)
    images = [synth_sample(s, (256, 256), "nuclei")[0] for s in (32, 39, 45, 68)]
    ref = UNetSegmenter(device="cpu", precision="fp32", threads=2, reread_ratio=1.7)
    seg = OnnxSegmenter(model=str(builtin_onnx), device="cpu", reread_ratio=1.7)
    plain = OnnxSegmenter(model=str(builtin_onnx), device="cpu")
    pairs, split = [], 0
    for img in images:
        got = seg.segment(img).labels[0]
        pairs.append((ref.segment(img).labels[0], got))
        split += int(got.max()) - int(plain.segment(img).labels.max())
    assert split > 0  # the re-read split objects on these frames
    assert scores(pairs)["f1@0.5"] >= 0.99, scores(pairs)


@pytest.mark.parametrize("normalize", ["percentile", "none"])
def test_a_nan_border_leaves_the_rest_of_the_image_as_it_was(builtin_onnx, normalize):
    """NaN pixels (a registered float image's border) made every percentile
    NaN, so the whole image normalised to NaN and nothing was found; with
    ``normalize: none`` the network spread them over their surroundings."""
    seg = OnnxSegmenter(
        model=str(builtin_onnx), device="cpu", threads=2, normalize=normalize
    )
    img, _ = synth_sample(6, (384, 384), kind="nuclei", depth="16")
    img = img.astype(np.float32)
    if normalize == "none":  # the user's own scaling
        img = (img - np.percentile(img, 5)) / (
            np.percentile(img, 99.8) - np.percentile(img, 5)
        )
    border = img.copy()
    border[:6, :] = np.nan
    border[:, :6] = np.nan
    inner = (slice(16, None), slice(16, None))
    clean = seg.segment(img).labels[0]
    got = seg.segment(border).labels[0]
    result = scores([(clean[inner], got[inner])])
    assert result["n_true"] > 50 and result["f1@0.5"] >= 0.97, result


def test_metadata_drives_settings(builtin_onnx, tmp_path):
    seg = OnnxSegmenter(model=str(builtin_onnx), device="cpu")
    assert seg.metadata["smartscope.output"] == "boundary3"
    assert seg.model_id.startswith("onnx:b-")
    assert seg.providers == ["CPUExecutionProvider"]  # device="cpu"
    assert seg.device_name == "cpu"
    assert seg._percentiles() == (5.0, 99.8)  # smartscope.normalize
    # without metadata, output kind and activation are recognised from the data
    # (the percentiles are then the common 1st and 99.8th: given here)
    model = onnx.load(str(builtin_onnx))
    del model.metadata_props[:]
    bare = _save(model, tmp_path / "bare.onnx")
    assert OnnxSegmenter(model=str(bare), device="cpu")._percentiles() == (1.0, 99.8)
    plain = OnnxSegmenter(model=str(bare), device="cpu", percentiles=(5, 99.8))
    assert plain.metadata == {}
    img = _images()[0]
    np.testing.assert_array_equal(plain.segment(img).labels, seg.segment(img).labels)
    # other percentiles change the input, hence the probabilities
    other = OnnxSegmenter(model=str(bare), device="cpu", percentiles=(0, 100))
    assert not np.allclose(other.probabilities(img), seg.probabilities(img), atol=1e-2)


def test_registered_as_entry_point(builtin_onnx):
    from smartscope.segment import available_segmenters

    assert "onnx" in available_segmenters()
    seg = create_segmenter("onnx", {"model": str(builtin_onnx), "device": "cpu"})
    assert isinstance(seg, OnnxSegmenter)


# -- foreign models: foreground output -----------------------------------------------
@pytest.mark.parametrize("channels", [1, 2])
def test_foreground_output_splits_touching(tmp_path, channels):
    path = _pointwise_model(tmp_path / f"fg{channels}.onnx", channels=channels)
    image, truth = _discs()
    seg = OnnxSegmenter(model=str(path), device="cpu", fg_threshold=0.5)
    labels = seg.segment(image).labels[0]
    assert scores([(truth, labels)])["f1@0.5"] == 1.0
    merged = OnnxSegmenter(
        model=str(path), device="cpu", fg_threshold=0.5, split_touching=False
    )
    assert merged.segment(image).labels[0].max() == 2  # the touching pair is one


def test_small_objects_dropped(tmp_path):
    path = _pointwise_model(tmp_path / "fg.onnx")
    image, _ = _discs()
    image[5:7, 120:122] = 1000  # a 4-pixel speck
    kept = OnnxSegmenter(model=str(path), device="cpu", min_area_px=1)
    dropped = OnnxSegmenter(model=str(path), device="cpu", min_area_px=8)
    assert kept.segment(image).labels.max() == 4
    assert dropped.segment(image).labels.max() == 3


# -- errors: one line each -----------------------------------------------------------
def _one_line(exc_info) -> str:
    text = str(exc_info.value)
    assert "\n" not in text
    return text


def test_missing_model(tmp_path):
    with pytest.raises(OnnxModelError) as exc:
        OnnxSegmenter(model=str(tmp_path / "nope.onnx"))
    assert "not found" in _one_line(exc)


@pytest.mark.parametrize("content", [b"not an onnx file at all", "truncated"])
def test_corrupt_model(tmp_path, builtin_onnx, content):
    path = tmp_path / "bad.onnx"
    if content == "truncated":
        data = builtin_onnx.read_bytes()
        content = data[: len(data) // 2]
    path.write_bytes(content)
    with pytest.raises(OnnxModelError) as exc:
        OnnxSegmenter(model=str(path))
    assert "cannot load ONNX model bad.onnx" in _one_line(exc)


def test_wrong_input_rank_or_channels(tmp_path):
    with pytest.raises(OnnxModelError) as exc:
        OnnxSegmenter(model=str(_pointwise_model(tmp_path / "r2.onnx", in_rank=2)))
    assert "rank 2" in _one_line(exc)
    with pytest.raises(OnnxModelError) as exc:
        OnnxSegmenter(model=str(_pointwise_model(tmp_path / "c3.onnx", in_ch=3)))
    assert "3 channels" in _one_line(exc)


def test_wrong_image_rank_and_output_kind(tmp_path):
    seg = OnnxSegmenter(model=str(_pointwise_model(tmp_path / "fg.onnx")))
    with pytest.raises(ValueError) as exc:
        seg.segment(np.zeros((1, 2, 32, 32), np.float32))
    assert "(B, Y, X)" in _one_line(exc)
    forced = OnnxSegmenter(model=str(tmp_path / "fg.onnx"), output="boundary3")
    with pytest.raises(OnnxModelError) as exc:
        forced.segment(np.zeros((32, 32), np.float32))
    assert "3 channels" in _one_line(exc)


# -- foreign models: fixed sizes and channels-last layouts ---------------------------
def _blur_model(path, dims, *, channels_last=False):
    """ONNX model: a 5 x 5 box blur, then sigmoid(12 (x - 0.5)), input `dims`.

    The blur makes each output pixel depend on its neighbours, so tiles
    stitched without enough overlap would show their seams.
    """
    x = helper.make_tensor_value_info("raw", TensorProto.FLOAT, dims)
    box = helper.make_tensor("box", TensorProto.FLOAT, [1, 1, 5, 5], [1 / 25] * 25)
    half = helper.make_tensor("half", TensorProto.FLOAT, [], [0.5])
    gain = helper.make_tensor("gain", TensorProto.FLOAT, [], [12.0])
    nodes = []
    src = "raw"
    if channels_last:
        nodes.append(
            helper.make_node("Transpose", ["raw"], ["nchw"], perm=[0, 3, 1, 2])
        )
        src = "nchw"
    nodes += [
        helper.make_node("Conv", [src, "box"], ["blur"], pads=[2, 2, 2, 2]),
        helper.make_node("Sub", ["blur", "half"], ["centred"]),
        helper.make_node("Mul", ["centred", "gain"], ["logit"]),
        helper.make_node("Sigmoid", ["logit"], ["prob"]),
    ]
    if channels_last:
        nodes.append(
            helper.make_node("Transpose", ["prob"], ["out"], perm=[0, 2, 3, 1])
        )
    else:
        nodes.append(helper.make_node("Identity", ["prob"], ["out"]))
    y = helper.make_tensor_value_info("out", TensorProto.FLOAT, dims)
    graph = helper.make_graph(nodes, "blur", [x], [y], initializer=[box, half, gain])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return _save(model, path)


def test_fixed_size_models_are_tiled_and_channels_last_read(tmp_path):
    free = OnnxSegmenter(  # the image as it is (no padding to a multiple)
        model=str(_blur_model(tmp_path / "free.onnx", ["b", 1, "y", "x"])),
        device="cpu",
        multiple=1,
    )
    assert free.tile is None
    variants = {
        "tiles of 64": _blur_model(tmp_path / "t64.onnx", [1, 1, 64, 64]),
        "tiles of 48 x 80, batch 2": _blur_model(tmp_path / "t48.onnx", [2, 1, 48, 80]),
        "channels last": _blur_model(
            tmp_path / "nhwc.onnx", ["b", "y", "x", 1], channels_last=True
        ),
        "channels last, tiles of 64": _blur_model(
            tmp_path / "nhwc64.onnx", [1, 64, 64, 1], channels_last=True
        ),
    }
    image, truth = _discs()
    wide = np.tile(image, (2, 3))[:200, :312]  # no multiple of any tile
    for name, path in variants.items():
        seg = OnnxSegmenter(model=str(path), device="cpu", fg_threshold=0.5, multiple=1)
        for img in (image, wide):
            np.testing.assert_allclose(
                seg.probabilities(img), free.probabilities(img), atol=1e-5, err_msg=name
            )
        labels = seg.segment(np.stack([image, image, image])).labels
        for lab in labels:  # an odd batch through a fixed batch of 2
            assert scores([(truth, lab)])["f1@0.5"] == 1.0, name
    # an image smaller than the tile is padded (reflected) to it
    tiled = OnnxSegmenter(model=str(variants["tiles of 64"]), device="cpu")
    assert tiled.tile == (64, 64)
    small = image[20:60, 20:70]
    got = tiled.probabilities(small)
    assert got.shape == (1, 1, 40, 50)
    np.testing.assert_allclose(
        got[0, 0, 2:-2, 2:-2], free.probabilities(small)[0, 0, 2:-2, 2:-2], atol=1e-5
    )


@pytest.mark.parametrize("dims", [["b", "y", "x", 3], [1, 256, 256, 3]])
def test_multichannel_channels_last_is_refused(tmp_path, dims):
    x = helper.make_tensor_value_info("raw", TensorProto.FLOAT, dims)
    y = helper.make_tensor_value_info("out", TensorProto.FLOAT, dims)
    graph = helper.make_graph(
        [helper.make_node("Identity", ["raw"], ["out"])], "rgb", [x], [y]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(OnnxModelError) as exc:
        OnnxSegmenter(model=str(_save(model, tmp_path / "rgb.onnx")))
    assert "has 3 channels; smartscope segments single-channel images" in _one_line(exc)


def test_an_image_far_smaller_than_the_tile(tmp_path):
    tiled = OnnxSegmenter(
        model=str(_blur_model(tmp_path / "t64.onnx", [1, 1, 64, 64])), device="cpu"
    )
    image = np.zeros((12, 9), np.float32)
    image[3:8, 2:6] = 1000.0
    labels = tiled.segment(image).labels
    assert labels.shape == (1, 12, 9) and labels.max() == 1
