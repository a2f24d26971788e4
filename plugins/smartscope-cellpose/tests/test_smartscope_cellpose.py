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

import importlib
import importlib.abc
import importlib.machinery
import socket
import sys
import types

import numpy as np
import pytest
import torch
from smartscope.segment import PSegmenter, create_segmenter
from smartscope.segment._metrics import scores

from smartscope_cellpose import CellposeModelError, CellposeSegmenter

PS = 8  # Cellpose-SAM's patch size


def _import_cellpose():
    """Import cellpose; bridge a torchvision that cannot load, if need be.

    A CUDA torchvision wheel next to a CPU-only torch fails on import
    ("operator torchvision::nms does not exist"). Cellpose imports torchvision
    only for training augmentations and segment-anything's prompt utilities,
    which inference never calls; for the import, stand-in modules that raise
    when used are put in its place, and taken out again afterwards.
    """
    try:
        import torchvision  # noqa: F401
    except Exception:
        for name in [n for n in sys.modules if n.split(".")[0] == "torchvision"]:
            del sys.modules[name]
    else:
        return importlib.import_module("cellpose.models")

    class _Unavailable(types.ModuleType):
        def __getattr__(self, attr):
            if attr.startswith("__"):
                raise AttributeError(attr)

            def unavailable(*args, **kwargs):
                raise RuntimeError(f"torchvision is unavailable ({self.__name__})")

            return unavailable

    class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] == "torchvision":
                return importlib.machinery.ModuleSpec(name, self, is_package=True)
            return None

        def create_module(self, spec):
            module = _Unavailable(spec.name)
            module.__path__ = []
            return module

        def exec_module(self, module):
            pass

    finder = _Finder()
    sys.meta_path.insert(0, finder)
    try:
        return importlib.import_module("cellpose.models")
    finally:
        sys.meta_path.remove(finder)
        for name in [n for n in sys.modules if n.split(".")[0] == "torchvision"]:
            del sys.modules[name]


cp_models = _import_cellpose()


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


def test_wrong_image_rank(segmenter):
    with pytest.raises(ValueError) as exc:
        segmenter.segment(np.zeros((1, 1, 64, 64), np.float32))
    assert "(B, Y, X)" in _one_line(exc)
