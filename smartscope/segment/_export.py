"""Finishing a trained model: exports (TorchScript, ONNX, bioimage.io), metrics, card.

`export_model` is what ``smartscope export`` calls; the ONNX and bioimage.io
exports live in `_export_onnx` and `_export_bioimageio`.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

from smartscope.segment._export_bioimageio import export_bioimageio
from smartscope.segment._export_onnx import ExportError, export_onnx
from smartscope.segment._model import load_model_file, sha256_of
from smartscope.segment._postprocess import (
    DEBRIS_FRACTION,
    FRAGMENT_FRACTION,
    REREAD_RATIO,
    REREAD_SIDE,
    WAIST_RATIO,
    percentiles_text,
)

#: formats `export_model` writes, and the suffix of their default file name
EXPORT_FORMATS = {"onnx": ".onnx", "bioimageio": ".bioimageio.zip"}


def default_export_path(model: str | Path, fmt: str) -> Path:
    """``<model stem><suffix of fmt>`` in the working folder (``builtin.onnx``)."""
    stem = "builtin" if str(model) == "builtin" else Path(model).stem
    return Path(stem + EXPORT_FORMATS.get(fmt, f".{fmt}"))


def export_model(model: str | Path, fmt: str, out: str | Path | None = None) -> Path:
    """Export `model` (``"builtin"`` or a ``.pt`` model file) in format `fmt`.

    ``onnx``: one ``.onnx`` file (`export_onnx`); ``bioimageio``: a
    bioimage.io model package, zipped when `out` ends in ``.zip``, else a
    folder (`export_bioimageio`). `out` defaults to `default_export_path`.
    Returns the path written.

    Raises
    ------
    ExportError
        Unknown format, missing optional package (``onnx``,
        ``bioimageio.spec``) or an output path that cannot be written.
    ModelFileError
        Missing, corrupt or foreign model file.
    """
    if fmt not in EXPORT_FORMATS:
        raise ExportError(
            f"unknown export format {fmt!r} (formats: {', '.join(EXPORT_FORMATS)})"
        )
    out = Path(out) if out is not None else default_export_path(model, fmt)
    if fmt == "onnx":
        return export_onnx(model, out)
    return export_bioimageio(model, out)


def export_torchscript(model_pt: str | Path, out: str | Path) -> Path:
    """Save the network of `model_pt` as TorchScript.

    Input: normalised ``(B, 1, Y, X)`` float32, Y and X multiples of 16;
    output: ``(B, 3, Y, X)`` background/interior/boundary logits.
    """
    import torch

    from smartscope.segment._net import SmartUNet

    mf = load_model_file(model_pt)
    arch = mf.meta["arch"]
    net = SmartUNet(tuple(arch["widths"]), int(arch["depth"]))
    net.load_state_dict(mf.state_dict)
    from smartscope.segment._dl import quiet_torchscript

    out = Path(out)
    with quiet_torchscript():
        scripted = torch.jit.script(net.eval())
        scripted.save(str(out))
    return out


def measure(model_pt: str | Path, n_val: int = 48) -> dict[str, Any]:
    """Accuracy of `model_pt` and the baseline on the synthetic validation set."""
    from smartscope.segment import ThresholdSegmenter
    from smartscope.segment._dl import UNetSegmenter
    from smartscope.segment._evaluate import evaluate
    from smartscope.segment._synth import validation_set

    val = validation_set(n_val)
    images = [v[0] for v in val]
    truths = [v[1] for v in val]
    return {
        "synthetic_val": {
            "images": len(val),
            "model": evaluate(
                UNetSegmenter(model=str(model_pt), device="cpu"), images, truths
            ),
            "threshold_baseline": evaluate(ThresholdSegmenter(), images, truths),
        }
    }


def write_card(
    model_pt: str | Path,
    name: str | None = None,
    metrics: dict[str, Any] | None = None,
    torchscript: bool = True,
) -> Path:
    """Write ``<model>.ts`` and ``<model>.json`` (the card) beside `model_pt`.

    The card holds the sha256 of both files, architecture, training recipe
    and metrics; `load_model_file` checks the ``.pt`` hash against it.
    """
    model_pt = Path(model_pt)
    model_pt.with_suffix(".json").unlink(missing_ok=True)  # a stale card's hash
    mf = load_model_file(model_pt)
    files = {model_pt.name: {"sha256": mf.sha256, "bytes": model_pt.stat().st_size}}
    if torchscript:
        ts = export_torchscript(model_pt, model_pt.with_suffix(".ts"))
        files[ts.name] = {"sha256": sha256_of(ts), "bytes": ts.stat().st_size}
    card = {
        "name": name or mf.meta.get("name") or model_pt.stem,
        "architecture": {
            **mf.meta["arch"],
            "output": "3-class logits: background, interior, boundary",
            "input": "(B, 1, Y, X) float32, normalised per image "
            f"(percentiles {percentiles_text()}); Y, X multiples of 16",
            "parameters": int(
                sum(
                    v.numel()
                    for v in mf.state_dict.values()
                    if v.dtype.is_floating_point
                )
            ),
        },
        "training": mf.meta.get("training", {}),
        "metrics": metrics if metrics is not None else measure(model_pt),
        "files": files,
        "platform": {
            "python": platform.python_version(),
            "machine": platform.machine(),
        },
    }
    path = model_pt.with_suffix(".json")
    path.write_text(json.dumps(card, indent=2) + "\n")
    return path


_WHY = """\
A 3-class U-Net (background / interior / boundary) was chosen over a
distance-map or star-convex head because its instances come from two cheap
whole-array steps (label the interior, grow it over the boundary band), which
keeps post-processing at about 10 ms per 512² frame, and because boundary
classification is local, so it holds for nuclei far larger than the receptive
field needs to see. Star-convex polygons need per-object NMS (a Python loop in
the hot path) and fail on non-convex nuclei; distance maps need a seeded
watershed that costs 10-20 ms per 512² on this CPU.

The network is shaped for CPU latency (profiled on 2 cores at 512²): strided
convolutions instead of max pooling (max pooling at full resolution cost 11 ms),
additive instead of concatenated skips (concatenation cost 9 ms per forward),
8 channels at full resolution, pixel-shuffle upsampling (at inference fused
into the last skip addition, one pass over the full-resolution tensors instead
of two; a 512² call 6-14 % faster), channels-last, frozen TorchScript
(BatchNorm folded) and bf16 weights on CPUs with AMX.
"""


def _command(tr: dict[str, Any], init: str | None) -> str:
    opts = (
        f"--steps {tr.get('steps')} --batch-size {tr.get('batch_size')} "
        f"--crop {tr.get('crop')} --lr {tr.get('lr')} --seed {tr.get('seed')} "
        f"--pool {tr.get('pool_size')} --max-radius {tr.get('max_radius', 36.0)}"
    )
    wide = tr.get("widefield_fraction", 0.0)
    contact = tr.get("contact_weight", 0.0)
    opts += f" --widefield-fraction {wide:g} --contact-weight {contact:g}"
    if tr.get("gamma_fraction"):
        lo, hi = tr.get("gamma_range", (0.55, 1.3))
        opts += (
            f" --gamma-fraction {tr['gamma_fraction']:g} --gamma-range {lo:g} {hi:g}"
        )
    if tr.get("threads"):
        opts += f" --threads {tr['threads']}"
    cmd = f"`smartscope train --out OUT {opts}" + (f" --init {init}`" if init else "`")
    # TrainConfig fields that are not command options
    edge = tr.get("nucleus_edge_fraction")
    labels = (
        "its full extent" if edge is None else f"{edge:g} of the way to its interior"
    )
    cmd += (
        f" (contact boundary width {tr.get('contact_width', 1)} px;"
        f" a nucleus labelled to {labels})"
    )
    return cmd


def _chain(tr: dict[str, Any]) -> list[dict[str, Any]]:
    """A training record's stages, oldest first (a fine-tune records its start)."""
    chain = []
    while tr:
        chain.append(tr)
        tr = (tr.get("extra") or {}).get("init_training") or {}
    return chain[::-1]


def _same_stage(a: dict[str, Any], b: dict[str, Any]) -> bool:
    def key(stage: dict[str, Any]) -> str:
        return json.dumps(
            {k: v for k, v in stage.items() if k not in ("extra", "init")},
            sort_keys=True,
        )

    return key(a) == key(b)


def _stages(tr: dict[str, Any]) -> str:
    """The training command(s), oldest first, one numbered line each.

    A model averaged from several fine-tunes (`average_models`) lists the
    stages they share once, then each one's own stages (6a, 7a, 6b, ...),
    then the average.
    """
    members = [_chain(m) for m in tr.get("average_of", [])]
    first = members[0] if members else _chain(tr)
    shared = len(first)
    if members:  # the stages every member shares, oldest first
        shared = 0
        while all(len(c) > shared for c in members) and all(
            _same_stage(c[shared], first[shared]) for c in members
        ):
            shared += 1
    lines = []
    for i, stage in enumerate(first[:shared], start=1):
        init = f"STAGE{i - 1}/model.pt" if i > 1 else None
        lines.append(f"{i}. {_command(stage, init)} ({stage.get('seconds')} s)")
    if not members:
        return "\n".join(lines)
    last = []
    listed: list[tuple[dict[str, Any], str]] = []  # a stage two members share
    for letter, chain in zip("abcdefgh", members, strict=False):
        init = f"STAGE{shared}/model.pt" if shared else None
        name = str(shared)
        for j, stage in enumerate(chain[shared:], start=shared + 1):
            known = [n for st, n in listed if _same_stage(st, stage)]
            if known:
                name = known[0]
            else:
                name = f"{j}{letter}"
                line = f"{_command(stage, init)} ({stage.get('seconds')} s)"
                lines.append(f"{name}. {line}")
                listed.append((stage, name))
            init = f"STAGE{name}/model.pt"
        last.append(f"STAGE{name}")
    final = shared + 1 + max(len(c) - shared for c in members)
    lines.append(
        f"{final}. the weights of {', '.join(last)} averaged"
        " (`smartscope.segment._train.average_models`)"
    )
    return "\n".join(lines)


def write_card_markdown(card: dict[str, Any], path: str | Path) -> Path:
    """Human-readable model card (``MODEL_CARD.md``) from the card data."""
    arch = card["architecture"]
    tr = card.get("training", {})
    # an averaged model: its members' settings (they share them) stand for it
    first = (tr.get("average_of") or [tr])[0]
    val = card.get("metrics", {}).get("synthetic_val", {})
    rows = []
    for name in ("model", "threshold_baseline"):
        m = val.get(name)
        if m:
            rows.append(
                f"| {name} | {m['f1@0.5']:.3f} | {m['precision@0.5']:.3f} | "
                f"{m['recall@0.5']:.3f} | {m['mean_ap']:.3f} |"
            )
    other = []
    for key, per in card.get("metrics", {}).items():
        if key == "synthetic_val" or not isinstance(per, dict):
            continue
        desc = per.get("description", "")
        for name, m in per.items():
            if isinstance(m, dict) and "f1@0.5" in m:
                other.append(
                    f"| {key} | {name} | {m['f1@0.5']:.3f} | {m['mean_ap']:.3f} | "
                    f"{desc} |"
                )
    other_table = ""
    if other:
        other_table = (
            "\nOther evaluation data (never used for training):\n\n"
            "| data | segmenter | F1@0.5 | mean AP | what |\n|---|---|---|---|---|\n"
            + "\n".join(other)
            + "\n"
        )
    files = "\n".join(
        f"| `{name}` | {info['bytes']:,} | `{info['sha256']}` |"
        for name, info in card["files"].items()
    )
    text = f"""# Model card: `{card["name"]}`

The built-in instance segmenter of smartscope for 2D fluorescence images
(nuclei, cells, beads). It ships inside the package; nothing is downloaded.

## Architecture
`SmartUNet`, widths {arch["widths"]}, depth {arch["depth"]} convolutions per
level, {arch["parameters"]:,} parameters.
Input: {arch["input"]}. Output: {arch["output"]}.
Instances: interior components (p > 0.6) grown over the foreground
(interior + boundary > 0.6) by up to 4 px; seedless foreground becomes its own
object; a piece under {FRAGMENT_FRACTION:g} x the median object area joins
an object at least twice its size that it touches, or a larger piece it
touches if the two together are still under that area (repeated until
nothing more joins); an object of at least {WAIST_RATIO:g} x the median area
is split where its shape has a waist, or else between two notches of its
outline into two convex parts; objects under 8 px are
dropped (thresholds chosen on a tuning set of other seeds than the validation
set). The median object area counts only objects of at least
{DEBRIS_FRACTION:g} x the area-weighted median, so specks of debris do not
set it. Objects of at least {REREAD_RATIO:g} x the median object area are read
again, each in a crop of its own ({REREAD_SIDE} px at the network's input)
normalised on its own, and split where that read finds two or more parts
(`reread_ratio` of the segmenter).

### Why this design
{_WHY}
## Training recipe
{_stages(tr)}
(AdamW, weight decay {first.get("weight_decay")}, linear warm-up then cosine decay,
cross-entropy with class weights background 1, interior 1, boundary 2.5
(pixels where two objects touch weighted 1 + contact weight times more) plus
0.5 x soft Dice on the foreground, bf16 autocast on CPU where supported,
gradient clipping 5; at the end the BatchNorm statistics are recomputed
over 40 fresh batches). Each stage ran on
{card.get("platform", {}).get("machine", "?")} with 2 CPU cores (seconds
above; a stage with `--threads 1` shared them with another run); final
smoothed loss {first.get("final_loss") and round(first["final_loss"], 4)}.

## Data
Synthetic only, generated in process from the seed (`smartscope/segment/_synth.py`):
star-convex elliptical nuclei (scene mean radius from 3 px to `--max-radius`),
alone, touching and in clusters, chromatin texture, nucleoli / chromocenters,
condensed bright nuclei, out-of-focus haze and unlabelled out-of-focus
neighbours, uneven illumination, PSF and defocus blur, in two styles:
"classic" (a 12-fold spread of brightness within a field, dim ghosts; the
validation set's style) and "widefield" (in-focus nuclei of one brightness,
log-normal spread, with a few 1.8-6x brighter full-size ones, so after
normalisation the typical nucleus is dim; smooth, often elongated ellipses;
crowded nuclei pressed together with flat contacts or, in half the scenes,
overlapping with their light added, so the overlap is brighter, as in a
widefield projection; out-of-focus ghosts that are wide blurred blobs well
below the in-focus brightness; softer PSF);
A nucleus's label ends at its visible edge, where the blurred image stands
half way from its surroundings to its interior (the half-maximum line
annotators draw on real nuclei; stages recorded without
`nucleus_edge_fraction` labelled a nucleus to its full extent before the
blur, about 1 px wider). DemoCamera-like Gaussian beads (labelled above
25 % of their peak); empty fields. A pool of
{first.get("pool_size")} scenes is refreshed by one scene per step, and every
crop gets a fresh camera: Poisson (8-3000 photons at peak) and Gaussian read
noise, offsets, 8/12/16-bit or float, dim 8-bit files, saturation; flips and
90° rotations. Normalisation: percentiles {percentiles_text()}.

## Metrics
Fixed synthetic validation set ({val.get("images")} images of 256², 4 nuclei : 1
beads, seeds never used in training). F1, precision and recall at IoU 0.5
pooled over objects; mean AP is the Data Science Bowl 2018 score
(TP / (TP + FP + FN) averaged over IoU 0.5-0.9, per image).

| segmenter | F1@0.5 | precision | recall | mean AP |
|---|---|---|---|---|
{chr(10).join(rows)}
{other_table}
Speed and accuracy on real DemoCamera frames: `smartscope bench segment --json`.

## Limitations
Trained on synthetic images only; it has not seen a real nucleus image.
Measure it on a labelled image of yours with `smartscope bench segment
--real-image IMAGE --real-mask LABELS` (the built-in model reads F1@0.5
0.88-0.92 on a public annotated widefield image of 125 nuclei turned and
mirrored; its card gives the details). Nuclei pressed side by side
with no intensity dip between them are still the main source of errors on
real images (two nuclei come out as one), and the outlines of very bright,
saturated nuclei are the least accurate.
`synthetic_large_nuclei` in `smartscope bench segment` tracks nuclei of
40-70 px radius: a network cuts them into pieces, which join their nucleus
until nothing more joins (the built-in model: F1 0.88 at scale 1), and a
frame whose median object (foreground piece) is over 28 px radius is
segmented again at the scale that brings it to 28 px
(`max_object_radius_px`; the built-in model: F1 0.92, mean AP 0.87).
Bright-field, H&E and
other transmitted-light images are out of scope.

## Files
| file | bytes | sha256 |
|---|---|---|
{files}

`{card["name"]}.ts` is the TorchScript export of the same network
(`torch.jit.load`, no smartscope needed; normalise the input as above).
"""
    path = Path(path)
    path.write_text(text)
    return path
