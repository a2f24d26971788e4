"""ONNX export of a smartscope model (the built-in one or a trained one).

The exported graph is the network as a consumer outside smartscope needs it:

* input ``raw``: ``(B, 1, Y, X)`` float32, percentile-scaled per image
  (`NORM_PERCENTILES`: 5th percentile → 0, 99.8th → 1; the standard
  bioimage.io ``scale_range``),
  Y and X multiples of 16 (of ``2 ** (levels - 1)`` for other architectures);
* inside: the rest of smartscope's normalisation (values above 1 compressed
  as ``1 + log1p(x - 1)``, values below -1 clipped), the U-Net and a softmax;
* output ``probabilities``: ``(B, 3, Y, X)`` background / interior / boundary.

So percentile scaling outside plus this graph gives exactly the probabilities
of `UNetSegmenter` (fp32), and instances follow from
`smartscope.segment._postprocess.probabilities_to_labels`. The file's
``metadata_props`` say so (``smartscope.*`` keys), which the
``smartscope-onnx`` plugin reads.

The legacy TorchScript-based exporter (``dynamo=False``) is used: it needs only
the ``onnx`` package, where torch's default exporter also needs ``onnxscript``.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from smartscope._errors import SmartscopeError, first_line
from smartscope.segment._model import ModelFile, load_model_file
from smartscope.segment._postprocess import NORM_PERCENTILES, percentiles_text

if TYPE_CHECKING:
    from torch import nn

#: ONNX operator set of the export (ONNX Runtime ≥ 1.12 runs it)
OPSET = 17
INPUT_NAME = "raw"
OUTPUT_NAME = "probabilities"
CLASSES = ("background", "interior", "boundary")


class ExportError(SmartscopeError):
    """A model cannot be exported (missing package, unknown format, bad path)."""


def _require(module: str, purpose: str) -> Any:
    try:
        return __import__(module)
    except ImportError:
        raise ExportError(
            f"{purpose} needs the {module!r} package: pip install {module}"
        ) from None


@contextlib.contextmanager
def written_whole(out: Path) -> Iterator[Path]:
    """A hidden path beside `out` to write to; moved onto `out` only on success.

    An export that fails or is killed part way leaves no half-written file
    (or folder) at `out`, and an earlier one there untouched: the new one
    replaces it in one rename (a folder: the old one is moved aside first).
    An `OSError` on the way (not writable, disk full) is an `ExportError`
    naming `out`.
    """
    import shutil

    partial = out.with_name(f".{out.stem}.partial{out.suffix}")  # same suffix
    shutil.rmtree(partial, ignore_errors=True)
    partial.unlink(missing_ok=True)
    try:
        yield partial
        if partial.is_dir() and out.is_dir():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            partial.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            partial.replace(out)
    except OSError as exc:  # a folder not writable, a full disk ...
        reason = exc.strerror or first_line(exc)
        raise ExportError(f"cannot write {out}: {reason}") from None
    finally:
        if partial.is_dir():
            shutil.rmtree(partial, ignore_errors=True)
        else:
            partial.unlink(missing_ok=True)


def packaged_network(model: str | Path = "builtin") -> tuple[nn.Module, ModelFile]:
    """The exported network of `model` (eval mode, fp32, CPU) and its model file.

    ``percentile-scaled image → compression → SmartUNet → softmax``; see the
    module docstring for the contract.
    """
    import torch
    from torch import nn

    from smartscope.segment._model import ModelFileError
    from smartscope.segment._net import SmartUNet

    mf = load_model_file(model)
    arch = mf.meta.get("arch", {})
    try:
        net = SmartUNet(tuple(arch["widths"]), int(arch["depth"]))
        net.load_state_dict(mf.state_dict)
    except (KeyError, RuntimeError, TypeError) as exc:
        raise ModelFileError(
            f"{mf.path} does not match the SmartUNet architecture: {first_line(exc)}"
        ) from None

    class PackagedUNet(nn.Module):
        """`SmartUNet` with smartscope's input compression and a softmax."""

        def __init__(self, unet: nn.Module) -> None:
            super().__init__()
            self.unet = unet

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            # normalize(): above 1 → 1 + log1p(x - 1); below -1 → -1
            high = 1 + torch.log1p(torch.clamp(x - 1, min=0.0))
            x = torch.clamp(torch.where(x > 1, high, x), min=-1.0)
            return torch.softmax(self.unet(x), dim=1)

    return PackagedUNet(net).eval(), mf


@contextlib.contextmanager
def quiet_onnx_export() -> Iterator[None]:
    """Silence torch 2.13's deprecation warnings for the legacy ONNX exporter."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r".*legacy TorchScript-based ONNX")
        yield


def input_multiple(mf: ModelFile) -> int:
    """Y and X of the network's input must be multiples of this."""
    return 1 << (len(mf.meta["arch"]["widths"]) - 1)


def metadata(mf: ModelFile) -> dict[str, str]:
    """The ``smartscope.*`` metadata written into exported ONNX files."""
    return {
        "smartscope.model_id": mf.model_id,
        "smartscope.source_sha256": mf.sha256,
        "smartscope.normalize": "percentile {:g} {:g}".format(*NORM_PERCENTILES),
        "smartscope.output": "boundary3",
        "smartscope.activation": "none",
        "smartscope.classes": ",".join(CLASSES),
        "smartscope.multiple": str(input_multiple(mf)),
    }


def export_onnx(model: str | Path, out: str | Path, opset: int = OPSET) -> Path:
    """Write `model` (``"builtin"`` or a ``.pt`` model file) as an ONNX file.

    Batch, Y and X are dynamic axes; the file passes ``onnx.checker``. It is
    written beside `out` and moved onto it once checked (`written_whole`).

    Raises
    ------
    ModelFileError
        If `model` is missing, corrupt or not a smartscope model.
    ExportError
        If the ``onnx`` package is not installed or `out` cannot be written.
    """
    onnx = _require("onnx", "ONNX export")
    net, mf = packaged_network(model)
    out = Path(out)
    if out.is_dir():
        raise ExportError(f"{out} is a folder; give the .onnx file to write")
    if not out.parent.exists():
        raise ExportError(f"folder {out.parent} does not exist")
    with written_whole(out) as partial:
        _write_onnx(onnx, net, mf, partial, opset)
    return out


def _write_onnx(
    onnx: Any, net: nn.Module, mf: ModelFile, out: Path, opset: int
) -> None:
    """The ONNX export of `net` with `mf`'s metadata, checked, at `out`."""
    import torch

    dummy = torch.zeros(1, 1, 64, 64)
    axes = {0: "batch", 2: "y", 3: "x"}
    with quiet_onnx_export(), torch.no_grad():
        torch.onnx.export(
            net,
            (dummy,),
            str(out),
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: axes},
            opset_version=opset,
            do_constant_folding=True,
        )
    proto = onnx.load(str(out))
    proto.doc_string = (
        f"smartscope model {mf.model_id}: (B,1,Y,X) percentile-scaled image "
        f"({percentiles_text()}), Y and X multiples of {input_multiple(mf)} -> "
        "(B,3,Y,X) "
        "background/interior/boundary probabilities"
    )
    del proto.metadata_props[:]
    for key, value in metadata(mf).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    onnx.save(proto, str(out))
