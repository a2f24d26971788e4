"""smartscope-cellpose with a Cellpose 4 model file made in the test (no download).

Cellpose 4 always builds a Cellpose-SAM network (a ViT-L encoder and a
per-patch readout). `_squares_model` sets a few of its weights by hand so that
the network computes something checkable: every transformer block adds zero
(its norms are zeroed, so attention and MLP see zeros), the encoder passes the
mean of each 8x8 patch through, and the readout turns it into a cell
probability (positive for bright patches) and flows pointing at each patch's
centre. Bright 8x8 squares aligned to the patch grid therefore come out as
one mask each. The file holds only those weights (about 10 MB); Cellpose loads
it like any other model file (``load_state_dict(strict=False)``), and the
weights it does not hold cannot change the output.
"""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch
from smartscope.segment import PSegmenter, create_segmenter
from smartscope.segment._metrics import scores

from smartscope_cellpose import CellposeModelError, CellposeSegmenter
from smartscope_cellpose._compat import import_cellpose_models

PS = 8  # Cellpose-SAM's patch size


cp_models = import_cellpose_models()  # what the plugin itself imports


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Network connections and Cellpose's model download fail the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(cp_models, "cache_model_path", refuse)


def _squares_model(path):
    """Write the hand-set Cellpose-SAM weights described in the module docstring."""
    dim, n_out = 1024, 3 * PS * PS
    sd = {
        "W2": torch.eye(n_out).reshape(n_out, 3, PS, PS),
        "diam_labels": torch.tensor([30.0]),
        "diam_mean": torch.tensor([30.0]),
        "encoder.pos_embed": torch.zeros(1, 32, 32, dim),
    }
    # patch embedding: feature 0 = patch mean - 0.5, feature 1 = 1
    w = torch.zeros(dim, 3, PS, PS)
    w[0, 0] = 1.0 / PS**2
    b = torch.zeros(dim)
    b[0], b[1] = -0.5, 1.0
    sd["encoder.patch_embed.proj.weight"] = w
    sd["encoder.patch_embed.proj.bias"] = b
    # every block adds zero: zeroed norms feed zeros to attention and MLP, and
    # their zero biases keep the output zero
    for i in range(24):
        for key, n in [
            ("norm1.weight", dim),
            ("norm1.bias", dim),
            ("norm2.weight", dim),
            ("norm2.bias", dim),
            ("attn.qkv.bias", 3 * dim),
            ("attn.proj.bias", dim),
            ("mlp.lin1.bias", 4 * dim),
            ("mlp.lin2.bias", dim),
        ]:
            sd[f"encoder.blocks.{i}.{key}"] = torch.zeros(n)
    # neck: [f0, -f0, f1, -f1, 0, ...] → channel norms keep the sign of f0
    n0 = torch.zeros(256, dim, 1, 1)
    n0[0, 0], n0[1, 0], n0[2, 1], n0[3, 1] = 1, -1, 1, -1
    n2 = torch.zeros(256, 256, 3, 3)
    for c in range(4):
        n2[c, c, 1, 1] = 1
    sd["encoder.neck.0.weight"] = n0
    sd["encoder.neck.2.weight"] = n2
    for k in (1, 3):
        sd[f"encoder.neck.{k}.weight"] = torch.ones(256)
        sd[f"encoder.neck.{k}.bias"] = torch.zeros(256)
    # readout: cellprob = the sign-carrying feature; flows (5 x unit vectors,
    # Cellpose's scale) point at the centre of the patch
    ow = torch.zeros(n_out, 256, 1, 1)
    ob = torch.zeros(n_out)
    c = (PS - 1) / 2
    for py in range(PS):
        for px in range(PS):
            k = py * PS + px
            vy, vx = c - py, c - px
            norm = float(np.hypot(vy, vx))
            ob[k] = 5 * vy / norm
            ob[PS * PS + k] = 5 * vx / norm
            ow[2 * PS * PS + k, 0] = 1.0
    sd["out.weight"] = ow
    sd["out.bias"] = ob
    torch.save(sd, path)
    return path


def _squares(step: int, offset: int) -> tuple[np.ndarray, np.ndarray]:
    """Bright 8x8 squares on the patch grid of a 240² image, and their labels.

    Cellpose pads an image by 8 px (one patch) each side and cuts it into
    256² tiles: 240² is one tile (256² would be four), and the squares stay
    on the network's patch grid.
    """
    rng = np.random.default_rng(step)
    image = np.full((240, 240), 10.0, np.float32)
    truth = np.zeros((240, 240), np.uint16)
    k = 0
    for gy in range(offset, 30, step):
        for gx in range(offset, 30, step):
            k += 1
            sl = np.s_[gy * PS : gy * PS + PS, gx * PS : gx * PS + PS]
            image[sl], truth[sl] = 100.0, k
    return image + rng.normal(0, 2, image.shape).astype(np.float32), truth


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    return _squares_model(tmp_path_factory.mktemp("cellpose") / "squares_cp4")


@pytest.fixture(scope="module")
def segmenter(model_file):
    return CellposeSegmenter(model=str(model_file), device="cpu")


def test_segments_with_a_local_model(segmenter, model_file):
    assert isinstance(segmenter, PSegmenter)
    assert segmenter.model_id.startswith("cellpose:squares_cp4-")
    assert segmenter.device_name == "cpu"
    (img_a, truth_a), (img_b, truth_b) = _squares(5, 2), _squares(4, 1)
    result = segmenter.segment(np.stack([img_a, img_b]))
    assert result.labels.shape == (2, 240, 240)
    assert result.labels.dtype == np.uint16
    for labels, truth, score in zip(result.labels, (truth_a, truth_b), result.scores):
        assert scores([(truth, labels)])["f1@0.5"] == 1.0
        assert len(score) == labels.max() == truth.max()
        assert (score > 0.9).all()  # cell probability inside the squares


def test_nan_pixels_are_background(segmenter):
    # a float image with a NaN border (registration, stitching): Cellpose's
    # percentile normalisation would turn every pixel into NaN and find nothing
    image, truth = _squares(5, 2)  # squares from row 16 on
    image[:6] = np.nan
    image[:, -3:] = np.inf
    labels = segmenter.segment(image).labels[0]
    assert scores([(truth, labels)])["f1@0.5"] == 1.0


def test_validating_a_spec_checks_the_file_but_builds_no_network(
    model_file, tmp_path, monkeypatch
):
    """Every experiment read builds its segmenter: for Cellpose 4 that was a
    whole Cellpose-SAM network (~1.2 GB, seconds) in the acquisition process,
    besides the one the run's analysis process builds."""
    from smartscope.experiment import SegmenterSpec

    models = import_cellpose_models()
    built = []
    real = models.CellposeModel

    def counting(*args, **kwargs):
        built.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(models, "CellposeModel", counting)
    seg = SegmenterSpec(name="cellpose", model=str(model_file), device="cpu").build()
    assert built == []
    assert seg.device_name == "cpu"
    junk = tmp_path / "junk"
    junk.write_bytes(b"no torch file")
    with pytest.raises(ValueError, match="not a PyTorch file"):
        SegmenterSpec(name="cellpose", model=str(junk))
    assert built == []
    seg.prepare()  # what the run's analysis process does before it is ready
    assert built == [1]
    img, truth = _squares(3, 1)
    labels = seg.segment(img).labels[0]
    assert built == [1]  # once
    assert scores([(truth, labels)])["f1@0.5"] == 1.0


def test_registered_as_entry_point(model_file, tmp_path):
    from smartscope.segment import available_segmenters

    assert "cellpose" in available_segmenters()
    with pytest.raises(CellposeModelError):
        create_segmenter("cellpose", {"model": str(tmp_path / "missing")})


# -- errors: one line each, and never a download -------------------------------------
def _one_line(exc_info) -> str:
    text = str(exc_info.value)
    assert "\n" not in text
    return text


@pytest.mark.parametrize("name", ["cpsam", "cpsam_v2", "missing/model"])
def test_refuses_names_and_missing_paths(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CellposeModelError) as exc:
        CellposeSegmenter(model=name)
    assert "not found" in _one_line(exc)
    with pytest.raises(CellposeModelError) as exc:
        CellposeSegmenter(model=str(tmp_path))
    assert "a folder" in _one_line(exc)


def test_refuses_files_that_are_no_cellpose4_model(tmp_path):
    old = tmp_path / "cyto3"
    torch.save({"downsample.0.weight": torch.zeros(2)}, old)
    with pytest.raises(CellposeModelError) as exc:
        CellposeSegmenter(model=str(old))
    assert "not a Cellpose 4 model" in _one_line(exc)
    junk = tmp_path / "junk"
    junk.write_bytes(b"no torch file")
    with pytest.raises(CellposeModelError) as exc:
        CellposeSegmenter(model=str(junk))
    assert "cannot read Cellpose model junk: not a PyTorch file" in _one_line(exc)
    flat = tmp_path / "flat"
    torch.save({"W2": torch.zeros(3)}, flat)
    with pytest.raises(CellposeModelError) as exc:
        CellposeSegmenter(model=str(flat))
    assert "not the 4-D readout" in _one_line(exc)


def test_weights_that_do_not_fit_the_network_fail_in_one_line(model_file, tmp_path):
    """What only loading finds (a weight of the wrong shape): at `prepare`, in
    one line that says which weight."""
    state = torch.load(model_file, weights_only=True)
    state["encoder.patch_embed.proj.bias"] = torch.zeros(7)
    odd = tmp_path / "odd"
    torch.save(state, odd)
    seg = CellposeSegmenter(model=str(odd), device="cpu")  # the file looks right
    with pytest.raises(CellposeModelError) as exc:
        seg.prepare()
    text = _one_line(exc)
    assert text.startswith("cannot load Cellpose model odd:")
    assert "encoder.patch_embed.proj.bias" in text


def test_wrong_image_rank(segmenter):
    with pytest.raises(ValueError) as exc:
        segmenter.segment(np.zeros((1, 1, 64, 64), np.float32))
    assert "(B, Y, X)" in _one_line(exc)


def test_smartscope_segment_runs_a_cellpose_file(model_file, tmp_path):
    """The command line, in a fresh process, as a user runs it (where
    torchvision cannot load next to this torch, without it)."""
    import subprocess
    import sys
    from pathlib import Path

    import tifffile

    img, truth = _squares(4, 2)
    tifffile.imwrite(tmp_path / "squares.tif", img)
    cli = Path(sys.executable).with_name("smartscope")
    done = subprocess.run(
        [str(cli), "segment", str(tmp_path / "squares.tif"), "--model", str(model_file)]
        + ["--device", "cpu", "-o", str(tmp_path / "labels.tif")],
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    labels = tifffile.imread(tmp_path / "labels.tif")
    assert scores([(truth, labels)])["f1@0.5"] == 1.0
