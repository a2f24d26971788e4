"""smartscope-bioimageio: smartscope's exported package, foreign packages, errors."""

from __future__ import annotations

import gc
import importlib
import socket
import zipfile

import numpy as np
import pytest

importlib.import_module("bioimageio.core")
onnx = importlib.import_module("onnx")
from onnx import TensorProto, helper  # noqa: E402
from smartscope.segment import PSegmenter, create_segmenter  # noqa: E402
from smartscope.segment._metrics import scores  # noqa: E402
from smartscope.segment._synth import synth_sample  # noqa: E402

from smartscope_bioimageio import (  # noqa: E402
    BioimageioModelError,
    BioimageioSegmenter,
)

# bioimageio.spec leaves file handles to the garbage collector
pytestmark = [
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    yield
    gc.collect()  # its unclosed files are reported here, under this module's filters


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    """The built-in model as written by ``smartscope export --format bioimageio``."""
    from smartscope.segment._export import export_model

    out = tmp_path_factory.mktemp("bioimageio") / "builtin.bioimageio.zip"
    path = export_model("builtin", "bioimageio", out)
    gc.collect()
    return path


@pytest.fixture(scope="module")
def torch_unet():
    from smartscope.segment import UNetSegmenter

    return UNetSegmenter(device="cpu", precision="fp32", threads=2)


def _images():
    out = [synth_sample(s, (256, 256), "nuclei")[0] for s in (21, 22, 23)]
    out.append(synth_sample(24, (256, 256), "beads")[0])
    out.append(synth_sample(25, (200, 312), "nuclei")[0])
    return out


# -- the package smartscope exports --------------------------------------------------
@pytest.mark.parametrize("weights", ["torchscript", "onnx"])
def test_exported_package_matches_torch(package, torch_unet, weights):
    seg = BioimageioSegmenter(model=str(package), weights_format=weights, device="cpu")
    assert isinstance(seg, PSegmenter)
    pairs = []
    for img in _images():
        got = seg.segment(img)
        assert got.labels.shape == (1, *img.shape)
        assert len(got.scores[0]) == got.labels.max()
        pairs.append((torch_unet.segment(img).labels[0], got.labels[0]))
    result = scores(pairs)
    assert result["n_true"] > 100
    assert result["f1@0.5"] >= 0.99, result
    batch = seg.segment(np.stack(_images()[:3])).labels
    for i in range(3):
        np.testing.assert_array_equal(batch[i], pairs[i][1])


def test_the_reread_of_large_objects_matches_the_builtin_segmenters(package):
    """`reread_ratio` reads large objects again in crops, as the built-in does."""
    from smartscope.segment import UNetSegmenter

    # frames where the built-in's re-read splits objects
    images = [synth_sample(s, (256, 256), "nuclei")[0] for s in (32, 39, 45, 68)]
    ref = UNetSegmenter(device="cpu", precision="fp32", threads=2, reread_ratio=1.7)
    seg = BioimageioSegmenter(model=str(package), device="cpu", reread_ratio=1.7)
    plain = BioimageioSegmenter(model=str(package), device="cpu")
    pairs, split = [], 0
    for img in images:
        got = seg.segment(img).labels[0]
        pairs.append((ref.segment(img).labels[0], got))
        split += int(got.max()) - int(plain.segment(img).labels.max())
    assert split > 0  # the re-read split objects on these frames
    assert scores(pairs)["f1@0.5"] >= 0.99, scores(pairs)
    with pytest.raises(ValueError, match="more than 1"):
        BioimageioSegmenter(model=str(package), reread_ratio=0.5)


def test_nan_pixels_are_background(package):
    # a NaN border (registration, stitching) would spread NaN through the
    # package's normalisation and network over everything near it
    image, truth = synth_sample(21, (256, 256), "nuclei")[:2]
    seg = BioimageioSegmenter(model=str(package), device="cpu")
    clean = seg.segment(image).labels[0]
    # 16 columns: the network's grid (a shift by 8 px alone moves an object)
    holed = np.pad(image.astype(np.float32), ((0, 0), (16, 0)), constant_values=np.nan)
    labels = seg.segment(holed).labels[0]
    assert not labels[:, :16].any()
    assert scores([(clean, labels[:, 16:])])["f1@0.5"] >= 0.95
    f1 = scores([(truth, labels[:, 16:])])["f1@0.5"]
    assert f1 >= scores([(truth, clean)])["f1@0.5"] - 0.03


def test_package_settings_are_read(package):
    seg = BioimageioSegmenter(model=str(package), device="cpu")
    assert seg.output_kind(3) == "boundary3"  # from config.smartscope
    assert seg._setting("fg_threshold") == 0.6  # config.smartscope.postprocess
    assert seg.model_id.startswith("bioimageio:smartscope_3-class_U-Net-")
    assert seg.weights_used == "onnx"  # auto on CPU with onnxruntime installed
    assert seg.device_name == "cpu"
    # a looser threshold than the package's finds more foreground
    img = _images()[0]
    loose = BioimageioSegmenter(model=str(package), device="cpu", fg_threshold=0.2)
    assert (loose.segment(img).labels > 0).sum() > (seg.segment(img).labels > 0).sum()


def test_folder_and_rdf_give_the_zip_labels(package, tmp_path):
    folder = tmp_path / "unpacked"
    with zipfile.ZipFile(package) as z:
        z.extractall(folder)
    img = _images()[1]
    ref = BioimageioSegmenter(model=str(package), device="cpu").segment(img).labels
    for source in (folder, folder / "rdf.yaml"):
        seg = BioimageioSegmenter(model=str(source), device="cpu")
        np.testing.assert_array_equal(seg.segment(img).labels, ref)


def test_registered_as_entry_point(package):
    from smartscope.segment import available_segmenters

    assert "bioimageio" in available_segmenters()
    seg = create_segmenter("bioimageio", {"model": str(package), "device": "cpu"})
    assert isinstance(seg, BioimageioSegmenter)


# -- foreign packages: other outputs ------------------------------------------------
def _pointwise_onnx(path, op: str, channel_last: bool = False):
    """A per-pixel ONNX model: ``sigmoid`` (foreground) or ``identity`` (distance).

    ``sigmoid``: sigmoid(12 (x - 0.1)) of the scaled input: above 0.5 wherever
    the input is above a tenth of its range.
    """
    dims = ["b", "y", "x", 1] if channel_last else ["b", 1, "y", "x"]
    x = helper.make_tensor_value_info("raw", TensorProto.FLOAT, dims)
    y = helper.make_tensor_value_info("out", TensorProto.FLOAT, dims)
    consts = [
        helper.make_tensor("offset", TensorProto.FLOAT, [], [0.1]),
        helper.make_tensor("gain", TensorProto.FLOAT, [], [12.0]),
    ]
    if op == "sigmoid":
        nodes = [
            helper.make_node("Sub", ["raw", "offset"], ["c"]),
            helper.make_node("Mul", ["c", "gain"], ["logit"]),
            helper.make_node("Sigmoid", ["logit"], ["out"]),
        ]
    else:
        nodes = [helper.make_node("Identity", ["raw"], ["out"])]
    graph = helper.make_graph(nodes, op, [x], [y], initializer=consts)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return path


def _foreign_package(
    tmp_path, op: str, channel: str, channel_last: bool = False, size: int = 0
):
    """A bioimage.io package of a per-pixel ONNX model, as another tool writes it.

    Axes (batch, channel, y, x), or (batch, y, x, channel) with `channel_last`;
    y and x of any size (multiples of 8), or of fixed `size`.
    """
    import onnxruntime as ort
    from bioimageio.spec import save_bioimageio_package
    from bioimageio.spec.model import v0_5 as bio

    weights = _pointwise_onnx(tmp_path / "model.onnx", op, channel_last)
    image, _ = _cones()
    if size:
        image = image[:size, :size]
    x = image[None, :, :, None] if channel_last else image[None, None]
    scaled = (x - x.min()) / (x.max() - x.min() + 1e-6)
    sess = ort.InferenceSession(str(weights), providers=["CPUExecutionProvider"])
    np.save(tmp_path / "in.npy", x)
    np.save(tmp_path / "out.npy", sess.run(None, {"raw": scaled})[0])
    ref = bio.TensorId("raw")
    space = [
        bio.SpaceInputAxis(
            id=bio.AxisId(a), size=size or bio.ParameterizedSize(min=8, step=8)
        )
        for a in ("y", "x")
    ]
    descr = bio.ModelDescr(
        name=f"pointwise {op}",
        description="test model",
        authors=[bio.Author(name="test")],
        cite=[bio.CiteEntry(text="test", doi=bio.Doi("10.1002/cyto.a.23863"))],
        license=bio.LicenseId("MIT"),
        inputs=[
            bio.InputTensorDescr(
                id=ref,
                axes=_order(
                    [bio.BatchAxis(), bio.ChannelAxis(channel_names=["c"]), *space],
                    channel_last,
                ),
                test_tensor=bio.FileDescr(source=tmp_path / "in.npy"),
                preprocessing=[
                    bio.ScaleRangeDescr(
                        kwargs=bio.ScaleRangeKwargs(
                            axes=[bio.AxisId("y"), bio.AxisId("x")],
                            min_percentile=0.0,
                            max_percentile=100.0,
                        )
                    )
                ],
            )
        ],
        outputs=[
            bio.OutputTensorDescr(
                id=bio.TensorId("out"),
                axes=_order(
                    [
                        bio.BatchAxis(),
                        bio.ChannelAxis(channel_names=[channel]),
                        *[
                            bio.SpaceOutputAxis(
                                id=bio.AxisId(a),
                                size=bio.SizeReference(
                                    tensor_id=ref, axis_id=bio.AxisId(a)
                                ),
                            )
                            for a in ("y", "x")
                        ],
                    ],
                    channel_last,
                ),
                test_tensor=bio.FileDescr(source=tmp_path / "out.npy"),
            )
        ],
        weights=bio.WeightsDescr(
            onnx=bio.OnnxWeightsDescr(source=weights, opset_version=17)
        ),
    )
    return save_bioimageio_package(descr, output_path=tmp_path / f"{op}.zip")


def _order(axes, channel_last: bool):
    """(batch, channel, y, x) → (batch, y, x, channel) when `channel_last`."""
    return [axes[0], *axes[2:], axes[1]] if channel_last else axes


def _cones():
    """Two touching cones and one apart (bright centres), with their labels."""
    yy, xx = np.mgrid[0:128, 0:128].astype(np.float32)
    truth = np.zeros((128, 128), np.uint16)
    image = np.zeros((128, 128), np.float32)
    for k, (cy, cx) in enumerate([(40, 40), (40, 64), (96, 90)], start=1):
        d = np.hypot(yy - cy, xx - cx)
        inside = (d <= 13) & (image < 14 - d)
        truth[inside] = k
        image = np.maximum(image, np.clip(14 - d, 0, None))
    truth[image < 1.0] = 0
    return image, truth


@pytest.mark.parametrize("channel_last", [False, True])
def test_foreign_foreground_package(tmp_path, channel_last):
    path = _foreign_package(tmp_path, "sigmoid", "foreground", channel_last)
    image, truth = _cones()
    seg = BioimageioSegmenter(model=str(path), device="cpu")
    assert seg.output_kind(1) == "foreground"  # no config: from the channel name
    labels = seg.segment(image).labels[0]
    assert scores([(truth, labels)], thresholds=(0.5,))["f1@0.5"] == 1.0
    merged = BioimageioSegmenter(model=str(path), device="cpu", split_touching=False)
    assert merged.segment(image).labels.max() == 2


def test_fixed_size_package_runs_in_blocks(tmp_path, capfd):
    # the same model, once for any size, once for 64 x 64 only; its
    # preprocessing scales each image to its own range, so blocks normalised
    # one by one would cut the cones at other heights
    (tmp_path / "any").mkdir()
    (tmp_path / "fixed").mkdir()
    free = _foreign_package(tmp_path / "any", "sigmoid", "foreground")
    fixed = _foreign_package(tmp_path / "fixed", "sigmoid", "foreground", size=64)
    image, truth = _cones()
    image = image + np.linspace(0, 3, 128, dtype=np.float32)  # a slope: ranges differ
    want = BioimageioSegmenter(model=str(free), device="cpu").segment(image).labels
    got = BioimageioSegmenter(model=str(fixed), device="cpu").segment(image).labels
    assert got.shape == (1, 128, 128)
    np.testing.assert_array_equal(got, want)
    assert scores([(truth, got[0])], thresholds=(0.5,))["n_pred"] >= 3
    assert "block" not in capfd.readouterr().err  # no progress bar per frame


def test_foreign_distance_package(tmp_path):
    path = _foreign_package(tmp_path, "identity", "distance")
    image, truth = _cones()
    seg = BioimageioSegmenter(model=str(path), device="cpu", fg_threshold=0.05)
    assert seg.output_kind(1) == "distance"
    labels = seg.segment(image).labels[0]
    assert scores([(truth, labels)], thresholds=(0.5,))["f1@0.5"] == 1.0
    # the same map read as a foreground probability: the watershed on the
    # distance transform of the mask, not on the map; still three objects
    fg = BioimageioSegmenter(
        model=str(path), device="cpu", fg_threshold=0.05, output="foreground"
    )
    assert fg.segment(image).labels.max() == 3
    with pytest.raises(BioimageioModelError, match="needs 3 channel"):
        BioimageioSegmenter(model=str(path), output="boundary3").segment(image)


# -- errors: one line each -----------------------------------------------------------
def _one_line(exc_info) -> str:
    text = str(exc_info.value)
    assert "\n" not in text
    return text


def test_missing_remote_and_foreign_sources(tmp_path):
    with pytest.raises(BioimageioModelError) as exc:
        BioimageioSegmenter(model=str(tmp_path / "none.zip"))
    assert "not found" in _one_line(exc)
    with pytest.raises(BioimageioModelError) as exc:
        BioimageioSegmenter(model="https://example.org/rdf.yaml")
    assert "only local" in _one_line(exc)
    with pytest.raises(BioimageioModelError) as exc:
        BioimageioSegmenter(model=str(tmp_path))
    assert "no rdf.yaml" in _one_line(exc)


def test_corrupt_or_invalid_package(tmp_path, package):
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"this is no zip file")
    with pytest.raises(BioimageioModelError) as exc:
        BioimageioSegmenter(model=str(bad))
    assert "bad.zip" in _one_line(exc)
    # a package whose description lost a required field
    broken = tmp_path / "broken.zip"
    with zipfile.ZipFile(package) as src, zipfile.ZipFile(broken, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename == "rdf.yaml":
                data = data.replace(b"\ninputs:", b"\nnot_inputs:")
            dst.writestr(item.filename, data)
    with pytest.raises(BioimageioModelError) as exc:
        BioimageioSegmenter(model=str(broken))
    assert "invalid bioimage.io model broken.zip" in _one_line(exc)


def test_wrong_image_rank(package):
    seg = BioimageioSegmenter(model=str(package), device="cpu")
    with pytest.raises(ValueError) as exc:
        seg.segment(np.zeros((2, 2, 32, 32), np.float32))
    assert "(B, Y, X)" in _one_line(exc)


def _rewritten(package, out, change):
    """A copy of the `package` zip with ``change(name, data)`` applied to each file."""
    with zipfile.ZipFile(package) as src, zipfile.ZipFile(out, "w") as dst:
        for item in src.infolist():
            dst.writestr(item.filename, change(item.filename, src.read(item.filename)))
    return out


def test_missing_or_damaged_weights(tmp_path, package):
    with pytest.raises(BioimageioModelError) as exc:
        BioimageioSegmenter(model=str(package), weights_format="pytorch_state_dict")
    assert "no pytorch_state_dict weights (it has: onnx, torchscript)" in _one_line(exc)

    def truncate(name, data):
        return data[:1000] if name == "weights_torchscript.pt" else data

    # the package's description gives the weights' sha256: refused when built
    damaged = _rewritten(package, tmp_path / "damaged.zip", truncate)
    with pytest.raises(BioimageioModelError) as exc:
        BioimageioSegmenter(model=str(damaged), weights_format="torchscript")
    assert "torchscript weights of damaged.zip are damaged" in _one_line(exc)
    # the onnx weights are intact: that choice builds and runs
    seg = BioimageioSegmenter(model=str(damaged), weights_format="onnx")
    assert seg.segment(np.zeros((64, 64), np.float32)).labels.shape == (1, 64, 64)

    # without a sha256 the damage shows when the weights are loaded
    def truncate_unhashed(name, data):
        if name == "rdf.yaml":
            lines = data.decode().splitlines(keepends=True)
            return "".join(ln for ln in lines if "sha256:" not in ln).encode()
        return truncate(name, data)

    unhashed = _rewritten(package, tmp_path / "unhashed.zip", truncate_unhashed)
    seg = BioimageioSegmenter(model=str(unhashed), weights_format="torchscript")
    with pytest.raises(BioimageioModelError) as exc:
        seg.prepare()
    assert "cannot load the torchscript weights of unhashed.zip" in _one_line(exc)

    # a weights file missing from the package
    missing = tmp_path / "missing.zip"
    with zipfile.ZipFile(package) as src, zipfile.ZipFile(missing, "w") as dst:
        for item in src.infolist():
            if item.filename != "weights_torchscript.pt":
                dst.writestr(item.filename, src.read(item.filename))
    with pytest.raises(BioimageioModelError) as exc:
        BioimageioSegmenter(model=str(missing), weights_format="torchscript")
    assert "torchscript weights of missing.zip" in _one_line(exc)


def test_building_checks_the_package_but_loads_no_weights(package, monkeypatch):
    """Every experiment read builds its segmenter (validation, the run's own
    process): the prediction pipeline and its warm-up belong to the run's
    analysis process (`prepare`) or the first call."""
    import bioimageio.core

    built = []
    real = bioimageio.core.create_prediction_pipeline

    def counting(*args, **kwargs):
        built.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(bioimageio.core, "create_prediction_pipeline", counting)
    seg = BioimageioSegmenter(model=str(package), device="cpu")
    assert built == []
    seg.prepare()
    seg.prepare()
    assert built == [1]
    image = synth_sample(31, (128, 128), "nuclei")[0]
    assert seg.segment(image).labels.max() > 0
    assert built == [1]
    # the first call builds it where nothing called prepare
    fresh = BioimageioSegmenter(model=str(package), device="cpu")
    assert built == [1]
    assert fresh.segment(image).labels.max() > 0
    assert built == [1, 1]
