"""bioimage.io model package of a smartscope model (format 0.5, ``bioimageio.spec``).

The package holds the network of `_export_onnx.packaged_network` twice, as
TorchScript and as ONNX, with the standard ``scale_range`` pre-processing
(`NORM_PERCENTILES` per image: 5th and 99.8th), a test input and its expected output
(``.npy``), a cover image, documentation, citation, license and authors.
``config.smartscope`` records how instances are made from the probabilities
(the ``smartscope-bioimageio`` plugin reads it).

Everything is written and validated offline: the description holds no URL,
so ``perform_io_checks`` (which checks every file's sha256) never needs the
network.
"""

from __future__ import annotations

import tempfile
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

import numpy as np

from smartscope.segment._export_onnx import (
    CLASSES,
    INPUT_NAME,
    OPSET,
    OUTPUT_NAME,
    ExportError,
    _require,
    export_onnx,
    input_multiple,
    packaged_network,
    written_whole,
)
from smartscope.segment._model import ModelFile
from smartscope.segment._postprocess import (
    FRAGMENT_FRACTION,
    NORM_PERCENTILES,
    NOTCH_CUT,
    NOTCH_DEPTH_PX,
    NOTCH_SOLIDITY,
    REREAD_RATIO,
    REREAD_SIDE,
    WAIST_DYNAMIC,
    WAIST_RATIO,
)

#: postprocessing of the probabilities, as `UNetSegmenter` does it by default
POSTPROCESS = {
    "fg_threshold": 0.6,
    "seed_threshold": 0.6,
    "min_area_px": 8,
    "fragment_fraction": FRAGMENT_FRACTION,
}
TEST_SHAPE = (256, 256)
_CITATION = (
    "Caicedo JC et al. (2019) Evaluation of Deep Learning Strategies for Nucleus "
    "Segmentation in Fluorescence Images. Cytometry A 95(9):952-965 (the "
    "3-class background/interior/boundary U-Net)"
)
_DOI = "10.1002/cyto.a.23863"


def scale_range(image: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """bioimage.io ``scale_range`` over Y, X with smartscope's percentiles."""
    img = np.asarray(image, np.float32)
    lo, hi = np.percentile(img, NORM_PERCENTILES, axis=(-2, -1), keepdims=True)
    return ((img - lo) / (hi - lo + eps)).astype(np.float32)


def _test_image() -> np.ndarray:
    """A fixed synthetic nuclei image (16-bit camera) as float32."""
    from smartscope.segment._synth import synth_sample

    image, _ = synth_sample(20240516, TEST_SHAPE, kind="nuclei", depth="16")
    return image.astype(np.float32)


def _cover(image: np.ndarray, probs: np.ndarray, path: Path) -> Path:
    """2:1 PNG: the scaled input (left) and its instances in colour (right)."""
    from PIL import Image

    from smartscope.segment._postprocess import probabilities_to_labels

    labels, _ = probabilities_to_labels(
        probs,
        fg_threshold=POSTPROCESS["fg_threshold"],
        seed_threshold=POSTPROCESS["seed_threshold"],
        min_area_px=int(POSTPROCESS["min_area_px"]),
        fragment_fraction=POSTPROCESS["fragment_fraction"],
    )
    grey = np.clip(scale_range(image), 0, 1)
    grey8 = (grey * 255).astype(np.uint8)
    rgb = np.repeat(grey8[..., None], 3, axis=2)
    rng = np.random.default_rng(0)
    palette = rng.integers(60, 256, (int(labels.max()) + 1, 3)).astype(np.uint8)
    palette[0] = 0
    right = palette[labels]
    both = np.concatenate([rgb, right], axis=1)
    Image.fromarray(both).resize((512, 256), Image.Resampling.NEAREST).save(path)
    return path


def _metrics_table(mf: ModelFile) -> str:
    import json

    card_path = mf.path.with_suffix(".json")  # builtin.json for the built-in
    try:
        val = json.loads(card_path.read_text())["metrics"]["synthetic_val"]
    except (OSError, ValueError, KeyError, TypeError):
        return "No metrics were recorded with this model file."
    rows = [
        f"| {name} | {m['f1@0.5']:.3f} | {m['mean_ap']:.3f} |"
        for name, m in val.items()
        if isinstance(m, dict) and "f1@0.5" in m
    ]
    return (
        f"Synthetic validation set of smartscope ({val.get('images')} images "
        "of 256², seeds never used in training):\n\n"
        "| segmenter | F1@0.5 | mean AP (DSB 2018) |\n|---|---|---|\n" + "\n".join(rows)
    )


def _documentation(mf: ModelFile, path: Path) -> Path:
    lo, hi = NORM_PERCENTILES
    text = f"""# smartscope U-Net `{mf.model_id}`

A compact 3-class U-Net (background / interior / boundary) for instance
segmentation of 2D fluorescence images (nuclei, cells, beads), exported from
smartscope, an acquisition-coupled smart microscopy controller (source model
sha256 `{mf.sha256}`).

## Input
`{INPUT_NAME}`: one channel, `(batch, channel, y, x)` float32; y and x
multiples of {input_multiple(mf)} (pad with reflection). Pre-processing
`scale_range`: per image, the {lo:g}th percentile maps to 0 and the {hi:g}th
to 1. Inside the network
values above 1 are compressed as `1 + log1p(x - 1)` and values below -1
clipped, as smartscope does.

## Output
`{OUTPUT_NAME}`: `(batch, 3, y, x)` softmax probabilities of
{", ".join(CLASSES)}.

## Instances
Connected regions of interior probability > {POSTPROCESS["seed_threshold"]}
(at least 2 px) are seeds; seeds grow over the foreground (interior + boundary
probability > {POSTPROCESS["fg_threshold"]}) by up to 4 pixel rings; foreground
that no seed reaches becomes its own object; a piece under
{POSTPROCESS["fragment_fraction"]} x the median object area joins an object
at least twice its size that it touches, or a larger piece it touches if the
two together are still under that area (repeated until nothing more joins);
an object of at least {WAIST_RATIO:g} x the median area is split where its
shape has a waist (h-domes of its distance transform, {WAIST_DYNAMIC:g} x the
deepest distance, seed a watershed), or else along the straight cut between
two notches of its outline (at least {NOTCH_DEPTH_PX:g} px deep from its
convex hull, the cut at most {NOTCH_CUT:g} x their summed depth) when both
parts are convex (solidity at least {NOTCH_SOLIDITY:g}); objects under
{POSTPROCESS["min_area_px"]} px are dropped. In Python:
`smartscope.segment._postprocess.probabilities_to_labels`, or the
`smartscope-bioimageio` plugin (segmenter `bioimageio`) with this package.
Optionally (smartscope's `reread_ratio`, off by default), objects of at
least {REREAD_RATIO} x the median object area are read again, each in a
{REREAD_SIDE} px crop around it (pre-processed as above, so normalised on its
own), and split where the crop's instances give two or more parts of at least
0.4 x the median area (`smartscope.segment.reread_large`).

## Training data and metrics
Trained on synthetic images only (star-convex nuclei, beads, empty fields,
simulated cameras), generated in process by smartscope; nothing downloaded.
A nucleus is labelled to its half-maximum edge, the line annotators draw on
real nuclei.

{_metrics_table(mf)}

## Validation
The package carries a test input (a synthetic 16-bit nuclei image,
`test_input.npy`) and the probabilities the TorchScript weights give for it
(`test_output.npy`); `bioimageio test` reproduces them with either weights
format. The ONNX weights are exported from the same network and agree with it
to about 1e-6. In smartscope, the `smartscope-onnx` and `smartscope-bioimageio`
plugins are tested to give the same instances as the built-in PyTorch path
(F1 ≥ 0.99 on synthetic images).

## Limitations
Not trained on real images; bright-field, H&E and other transmitted-light
images are out of scope. Very large nuclei (> 40 px radius) are segmented
less well; downscale the image first.
"""
    path.write_text(text)
    return path


def _describe(mf: ModelFile, files: dict[str, Path]) -> Any:
    """The `ModelDescr` of the package (files are local paths)."""
    import torch
    from bioimageio.spec.model import v0_5 as bio

    ref = bio.TensorId(INPUT_NAME)
    step = input_multiple(mf)
    spatial = [
        bio.SpaceInputAxis(
            id=bio.AxisId(ax), size=bio.ParameterizedSize(min=step, step=step)
        )
        for ax in ("y", "x")
    ]
    lo, hi = NORM_PERCENTILES
    inp = bio.InputTensorDescr(
        id=ref,
        description="fluorescence image, one channel",
        axes=[
            bio.BatchAxis(),
            bio.ChannelAxis(channel_names=[bio.Identifier("fluorescence")]),
            *spatial,
        ],
        test_tensor=bio.FileDescr(source=files["test_input"]),
        sample_tensor=bio.FileDescr(source=files["sample_input"]),
        data=bio.IntervalOrRatioDataDescr(type="float32"),
        preprocessing=[
            bio.ScaleRangeDescr(
                kwargs=bio.ScaleRangeKwargs(
                    axes=[bio.AxisId("y"), bio.AxisId("x")],
                    min_percentile=lo,
                    max_percentile=hi,
                )
            )
        ],
    )
    out = bio.OutputTensorDescr(
        id=bio.TensorId(OUTPUT_NAME),
        description="softmax probabilities of background, interior, boundary",
        axes=[
            bio.BatchAxis(),
            bio.ChannelAxis(channel_names=[bio.Identifier(c) for c in CLASSES]),
            *[
                bio.SpaceOutputAxis(
                    id=bio.AxisId(ax),
                    size=bio.SizeReference(tensor_id=ref, axis_id=bio.AxisId(ax)),
                )
                for ax in ("y", "x")
            ],
        ],
        test_tensor=bio.FileDescr(source=files["test_output"]),
        sample_tensor=bio.FileDescr(source=files["sample_output"]),
        data=bio.IntervalOrRatioDataDescr(type="float32", range=(0.0, 1.0)),
    )
    torch_version = bio.Version(torch.__version__.split("+")[0])
    weights = bio.WeightsDescr(
        torchscript=bio.TorchscriptWeightsDescr(
            source=files["torchscript"], pytorch_version=torch_version
        ),
        onnx=bio.OnnxWeightsDescr(
            source=files["onnx"], opset_version=OPSET, parent="torchscript"
        ),
    )
    return bio.ModelDescr(
        name="smartscope 3-class U-Net",
        description=(
            "Instance segmentation of 2D fluorescence images (nuclei, cells, "
            "beads): background/interior/boundary probabilities from a compact "
            "U-Net, exported from smartscope."
        ),
        authors=[bio.Author(name="smartscope developers")],
        cite=[bio.CiteEntry(text=_CITATION, doi=bio.Doi(_DOI))],
        license=bio.LicenseId("BSD-3-Clause"),
        documentation=bio.FileDescr(source=files["documentation"]),
        covers=[bio.FileDescr(source=files["cover"])],
        tags=[
            "segmentation",
            "instance-segmentation",
            "nuclei",
            "fluorescence-light-microscopy",
            "2d",
            "unet",
            "pytorch",
            "onnx",
            "smartscope",
        ],
        version=bio.Version(_smartscope_version()),
        inputs=[inp],
        outputs=[out],
        weights=weights,
        config=bio.Config(
            smartscope={
                "model_id": mf.model_id,
                "source_sha256": mf.sha256,
                "output": "boundary3",
                "classes": list(CLASSES),
                "postprocess": dict(POSTPROCESS),
                "normalize": {"percentiles": list(NORM_PERCENTILES)},
            }
        ),
    )


def _smartscope_version() -> str:
    try:
        return package_version("smartscope")
    except Exception:  # running from a source tree without metadata
        return "0.0.0"


def validate_package(path: str | Path) -> Any:
    """Validate a package offline (every file's sha256 checked); its summary.

    Raises
    ------
    ExportError
        With the first error, if the package is not valid.
    """
    _require("bioimageio.spec", "bioimage.io validation")
    from bioimageio.spec import load_description

    descr = load_description(Path(path), perform_io_checks=True)
    summary = descr.validation_summary
    if summary.status not in ("valid-format", "passed"):
        errors = [e for d in summary.details for e in d.errors]
        first = f"{errors[0].loc}: {errors[0].msg}" if errors else summary.status
        raise ExportError(f"invalid bioimage.io package {path}: {first}")
    return summary


def export_bioimageio(model: str | Path, out: str | Path) -> Path:
    """Write `model` (``"builtin"`` or a ``.pt`` model file) as a bioimage.io package.

    `out` ending in ``.zip`` gets a zipped package, anything else a folder
    holding ``rdf.yaml`` and the files it names (a new or empty folder, or
    one holding an earlier package, which is written over; never a folder of
    other files). The package is written beside `out` and validated
    (offline) there, then moved onto `out` (`written_whole`): a failed export
    leaves no half package.

    Raises
    ------
    ModelFileError
        If `model` is missing, corrupt or not a smartscope model.
    ExportError
        If ``bioimageio.spec`` or ``onnx`` is missing, or the package is invalid.
    """
    _require("bioimageio.spec", "bioimage.io export")
    import tifffile
    import torch
    from bioimageio.spec import (
        save_bioimageio_package,
        save_bioimageio_package_as_folder,
    )

    from smartscope.segment._dl import quiet_torchscript

    out = Path(out)
    zipped = out.suffix.lower() == ".zip"
    if zipped and out.is_dir():
        raise ExportError(f"{out} is a folder; give a .zip file or a folder name")
    if not out.parent.exists():
        raise ExportError(f"folder {out.parent} does not exist")
    if not zipped and out.is_file():
        raise ExportError(
            f"{out} is a file; give a folder (new, empty or holding an earlier "
            "package) or a .zip"
        )
    if (
        not zipped
        and out.is_dir()
        and any(out.iterdir())
        and not (out / "rdf.yaml").exists()
    ):
        # the package's README.md, cover.png ... would land among (and over)
        # the user's files; a folder holding a package is written over
        raise ExportError(
            f"{out} is a folder with other files in it; give a new or empty "
            "folder, one holding an earlier package, or a .zip"
        )
    net, mf = packaged_network(model)
    with tempfile.TemporaryDirectory(prefix="smartscope-bioimageio-") as tmp:
        work = Path(tmp)
        files = {
            "torchscript": work / "weights_torchscript.pt",
            "onnx": work / "weights.onnx",
            "test_input": work / "test_input.npy",
            "test_output": work / "test_output.npy",
            "cover": work / "cover.png",
            "documentation": work / "README.md",
            "sample_input": work / "sample_input.tif",
            "sample_output": work / "sample_output.tif",
        }
        with quiet_torchscript():
            torch.jit.script(net).save(str(files["torchscript"]))
        export_onnx(model, files["onnx"])
        image = _test_image()
        x = scale_range(image)[None, None]
        with torch.no_grad():
            probs = net(torch.from_numpy(x)).numpy()
        np.save(files["test_input"], image[None, None])
        np.save(files["test_output"], probs)
        tifffile.imwrite(files["sample_input"], image.astype(np.uint16))
        tifffile.imwrite(files["sample_output"], probs[0], photometric="minisblack")
        _cover(image, probs[0], files["cover"])
        _documentation(mf, files["documentation"])
        descr = _describe(mf, files)
        # written beside `out` and validated there: a failed or killed export
        # leaves no half package (and an earlier one untouched)
        with written_whole(out) as partial:
            if zipped:
                save_bioimageio_package(descr, output_path=partial)
            else:
                save_bioimageio_package_as_folder(descr, output_path=partial)
            validate_package(partial)
    return out
