"""Export of the built-in (or a trained) model: ONNX and bioimage.io, offline."""

from __future__ import annotations

import gc
import importlib
import json
import socket
import sys
import zipfile

import numpy as np
import pytest

from smartscope.segment._export import (
    ExportError,
    default_export_path,
    export_model,
)
from smartscope.segment._model import ModelFileError

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
    gc.collect()  # unclosed files are reported here, under this module's filters


def _scaled(image: np.ndarray, percentiles: tuple[float, float]) -> np.ndarray:
    """The exported models' input: the two percentiles → 0 and 1."""
    img = image.astype(np.float32)
    lo, hi = np.percentile(img, percentiles)
    return ((img - lo) / (hi - lo))[None, None].astype(np.float32)


@pytest.fixture(scope="module")
def builtin_onnx(tmp_path_factory):
    importlib.import_module("onnx")
    return export_model("builtin", "onnx", tmp_path_factory.mktemp("x") / "b.onnx")


def test_onnx_export_is_the_torch_network(builtin_onnx):
    onnx = importlib.import_module("onnx")
    ort = importlib.import_module("onnxruntime")
    from smartscope.segment import UNetSegmenter
    from smartscope.segment._synth import synth_sample

    model = onnx.load(str(builtin_onnx))
    onnx.checker.check_model(model)
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["smartscope.output"] == "boundary3"
    assert meta["smartscope.model_id"].startswith("builtin-")
    # what a consumer scales the input with: the 5th and 99.8th percentiles
    assert meta["smartscope.normalize"] == "percentile 5 99.8"
    (inp,) = model.graph.input
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert dims == ["batch", 1, "y", "x"]  # any batch and image size
    sess = ort.InferenceSession(str(builtin_onnx), providers=["CPUExecutionProvider"])
    ref = UNetSegmenter(device="cpu", precision="fp32", threads=2)
    for seed, shape in [(1, (256, 256)), (2, (192, 320))]:
        image, _ = synth_sample(seed, shape, "nuclei")
        (probs,) = sess.run(None, {"raw": _scaled(image, (5, 99.8))})
        assert probs.shape == (1, 3, *shape)
        np.testing.assert_allclose(probs[0].sum(0), 1, atol=1e-5)
        np.testing.assert_allclose(probs[0], ref.probabilities(image), atol=1e-4)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A model file as `smartscope train` writes it: a tiny random 3-level U-Net."""
    import torch

    from smartscope.segment._model import save_model_file
    from smartscope.segment._net import SmartUNet

    torch.manual_seed(0)
    net = SmartUNet((4, 8, 16), 1).eval()
    pt = tmp_path_factory.mktemp("tiny") / "tiny.pt"
    meta = {"name": "tiny", "arch": {"widths": [4, 8, 16], "depth": 1}}
    save_model_file(pt, net.state_dict(), meta)
    return pt, net


def test_onnx_export_of_a_trained_model_file(tmp_path, tiny_model):
    onnx = importlib.import_module("onnx")
    ort = importlib.import_module("onnxruntime")
    import torch

    pt, net = tiny_model
    out = export_model(pt, "onnx", tmp_path / "tiny.onnx")
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["smartscope.multiple"] == "4"  # 3 levels: multiples of 4
    assert meta["smartscope.model_id"].startswith("tiny-")
    x = np.random.default_rng(0).random((2, 1, 64, 48), dtype=np.float32)
    (probs,) = ort.InferenceSession(str(out)).run(None, {"raw": x})
    with torch.no_grad():
        expected = torch.softmax(net(torch.from_numpy(x)), dim=1).numpy()
    np.testing.assert_allclose(probs, expected, atol=1e-5)


def test_export_command_takes_the_model_as_argument(tmp_path, tiny_model):
    from _closed_loop import smartscope

    onnx = importlib.import_module("onnx")
    pt, _ = tiny_model
    out = tmp_path / "cli.onnx"
    done = smartscope("export", str(pt), "--format", "onnx", "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(out)
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["smartscope.model_id"].startswith("tiny-")
    # two different models: one line, exit 2, nothing written
    other = tmp_path / "other.onnx"
    done = smartscope("export", str(pt), "-m", "builtin.pt", "-o", str(other))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: two models given: {str(pt)!r} and --model 'builtin.pt'"
    ]
    assert not other.exists()


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    importlib.import_module("bioimageio.spec")
    importlib.import_module("onnx")
    out = tmp_path_factory.mktemp("x") / "builtin.bioimageio.zip"
    path = export_model("builtin", "bioimageio", out)
    gc.collect()
    return path


def test_bioimageio_package_is_valid_offline(package):
    from bioimageio.spec import load_description

    from smartscope.segment._export_bioimageio import validate_package

    summary = validate_package(package)  # perform_io_checks: every sha256
    assert summary.status == "valid-format"
    assert not [e for d in summary.details for e in d.errors]
    descr = load_description(package, perform_io_checks=True)
    assert str(descr.format_version).startswith("0.5.")
    assert descr.weights.torchscript is not None and descr.weights.onnx is not None
    assert str(descr.license) == "BSD-3-Clause"
    assert str(descr.cite[0].doi) == "10.1002/cyto.a.23863"
    assert descr.authors and descr.documentation and descr.covers
    assert descr.config.model_extra["smartscope"]["output"] == "boundary3"
    with zipfile.ZipFile(package) as z:
        names = set(z.namelist())
        assert {"rdf.yaml", "README.md", "cover.png"} <= names
        assert {"test_input.npy", "test_output.npy"} <= names
        with z.open("cover.png") as fh:
            from PIL import Image

            assert Image.open(fh).size == (512, 256)  # 2:1, as bioimage.io asks
        assert "## Validation" in z.read("README.md").decode()


@pytest.mark.parametrize("weights", ["torchscript", "onnx"])
def test_bioimageio_core_reproduces_the_test_output(package, weights):
    """``bioimageio test``: both weights give the packaged test output."""
    core = importlib.import_module("bioimageio.core")
    if weights == "onnx":
        importlib.import_module("onnxruntime")
    import warnings

    with warnings.catch_warnings():  # torch.jit.load is deprecated in torch 2.13
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        summary = core.test_model(package, weight_format=weights)
    failed = [d.name for d in summary.details if d.status == "failed"]
    assert summary.status == "passed", failed


def test_bioimageio_folder_output_of_a_trained_model(tmp_path, tiny_model):
    importlib.import_module("bioimageio.spec")
    importlib.import_module("onnx")
    from smartscope.segment._export_bioimageio import validate_package

    out = export_model(tiny_model[0], "bioimageio", tmp_path / "pkg")
    assert out.is_dir() and (out / "rdf.yaml").exists()
    assert validate_package(out / "rdf.yaml").status == "valid-format"
    rdf = (out / "rdf.yaml").read_text()
    assert "weights_torchscript.pt" in rdf and "scale_range" in rdf
    assert "step: 4" in rdf  # the input sizes the 3-level network takes
    assert "No metrics were recorded" in (out / "README.md").read_text()
    # written over by the next export; a folder of other files is refused
    assert export_model(tiny_model[0], "bioimageio", out) == out
    mine = tmp_path / "my_images"
    mine.mkdir()
    (mine / "README.md").write_text("my notes")
    with pytest.raises(ExportError, match="folder with other files"):
        export_model(tiny_model[0], "bioimageio", mine)
    with pytest.raises(ExportError, match=r"README\.md is a file; give a folder"):
        export_model(tiny_model[0], "bioimageio", mine / "README.md")
    assert [p.name for p in mine.iterdir()] == ["README.md"]
    assert (mine / "README.md").read_text() == "my notes"


def test_a_failed_export_leaves_no_half_file_and_the_earlier_one_whole(
    tmp_path, tiny_model, monkeypatch
):
    """An export that fails after writing part of its output (a fault injected
    into its last step) leaves nothing at a new path and the earlier export at
    an old one as it was: files are written beside the output and moved onto
    it in one rename."""
    onnx = importlib.import_module("onnx")
    spec = importlib.import_module("bioimageio.spec")
    from smartscope.segment import _export_bioimageio

    pt = tiny_model[0]
    before = {
        "onnx": export_model(pt, "onnx", tmp_path / "m.onnx").read_bytes(),
        "zip": export_model(pt, "bioimageio", tmp_path / "m.zip").read_bytes(),
    }
    folder = export_model(pt, "bioimageio", tmp_path / "pkg")
    files = {p.name: p.read_bytes() for p in folder.iterdir()}
    listing = sorted(p.name for p in tmp_path.iterdir())

    def injected(*args, **kwargs):
        raise RuntimeError("injected fault")

    monkeypatch.setattr(onnx.checker, "check_model", injected)
    for name in ("m.onnx", "new.onnx"):
        with pytest.raises(RuntimeError, match="injected"):
            export_model(pt, "onnx", tmp_path / name)
    monkeypatch.undo()
    monkeypatch.setattr(_export_bioimageio, "validate_package", injected)
    for name in ("m.zip", "new.zip"):
        with pytest.raises(RuntimeError, match="injected"):
            export_model(pt, "bioimageio", tmp_path / name)
    monkeypatch.undo()
    real = spec.save_bioimageio_package_as_folder

    def written_then_failed(descr, output_path):
        real(descr, output_path=output_path)
        raise RuntimeError("injected fault")

    monkeypatch.setattr(spec, "save_bioimageio_package_as_folder", written_then_failed)
    for name in ("pkg", "new_pkg"):
        with pytest.raises(RuntimeError, match="injected"):
            export_model(pt, "bioimageio", tmp_path / name)
    assert sorted(p.name for p in tmp_path.iterdir()) == listing  # no partials
    assert (tmp_path / "m.onnx").read_bytes() == before["onnx"]
    assert (tmp_path / "m.zip").read_bytes() == before["zip"]
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == files


# -- dispatch and errors: one line each ---------------------------------------------
def test_default_paths_and_unknown_format(tmp_path):
    assert str(default_export_path("builtin", "onnx")) == "builtin.onnx"
    assert str(default_export_path("runs/m.pt", "bioimageio")) == "m.bioimageio.zip"
    with pytest.raises(ExportError) as exc:
        export_model("builtin", "tensorflow", tmp_path / "x")
    assert (
        str(exc.value)
        == "unknown export format 'tensorflow' (formats: onnx, bioimageio)"
    )


def test_bad_model_and_output_paths(tmp_path):
    importlib.import_module("onnx")
    with pytest.raises(ModelFileError, match="not found"):
        export_model(tmp_path / "missing.pt", "onnx", tmp_path / "x.onnx")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model")
    with pytest.raises(ModelFileError) as exc:
        export_model(junk, "onnx", tmp_path / "x.onnx")
    assert "\n" not in str(exc.value)
    with pytest.raises(ExportError, match="does not exist"):
        export_model("builtin", "onnx", tmp_path / "no" / "x.onnx")
    with pytest.raises(ExportError, match="is a folder"):
        export_model("builtin", "onnx", tmp_path)


@pytest.mark.skipif(sys.platform != "linux", reason="/proc is Linux's")
def test_an_output_folder_that_cannot_be_written_is_named(tmp_path):
    # /proc takes no new files whoever runs the tests (root included)
    importlib.import_module("onnx")
    for fmt, name in (("onnx", "m.onnx"), ("bioimageio", "m.zip")):
        with pytest.raises(ExportError, match=rf"^cannot write /proc/{name}: "):
            export_model("builtin", fmt, f"/proc/{name}")


def test_card_of_export_matches_model(builtin_onnx):
    """The exported file names the model it came from (sha256 of builtin.pt)."""
    onnx = importlib.import_module("onnx")
    from smartscope.segment._model import BUILTIN_CARD

    card = json.loads(BUILTIN_CARD.read_text())
    meta = {p.key: p.value for p in onnx.load(str(builtin_onnx)).metadata_props}
    assert meta["smartscope.source_sha256"] == card["files"]["builtin.pt"]["sha256"]
