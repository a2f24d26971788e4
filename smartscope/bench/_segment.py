"""``smartscope bench segment``: every installed segmenter on the same images.

Speed (p50/p99 ms per image at each size) and accuracy (F1@0.5, mean AP) on
the synthetic validation set, on large synthetic nuclei, on frames of the real
DemoCamera and, when one is given locally, on a real annotated image
(``real_image``/``real_mask``, or the ``SMARTSCOPE_BENCH_REAL_IMAGE`` and
``SMARTSCOPE_BENCH_REAL_MASK`` environment variables). Nothing is downloaded.
"""

from __future__ import annotations

import gc
import os
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from smartscope._errors import first_line
from smartscope.microscope import Microscope
from smartscope.segment._evaluate import bead_truth

__all__ = ["bench_segment", "democam_bead_set", "real_image_set"]

REAL_IMAGE_ENV = "SMARTSCOPE_BENCH_REAL_IMAGE"
REAL_MASK_ENV = "SMARTSCOPE_BENCH_REAL_MASK"

SEGMENT_GOAL_P50_MS_CPU_512 = 50.0
SEGMENT_GOAL_P50_MS_GPU_2048 = 5.0
SEGMENT_GOAL_F1 = 0.90
SEGMENT_GOAL_F1_REAL = 0.88


def democam_bead_set(
    n_fields: int = 4, defocus_um: tuple[float, ...] = (0.0, 2.0, 4.0), config=None
) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """Frames of the real DemoCamera (demo config) with bead ground truth.

    For each of `n_fields` stage positions, one frame per Z offset in
    `defocus_um` (wider and dimmer with defocus). The DemoCamera renders beads
    without noise, so each frame's truth is exact: `bead_truth` of the frame
    itself, the rule the synthetic beads are labelled with. Returns
    ``(image, truth, defocus)`` triples.
    The core is released before returning.
    """
    out = []
    mic = Microscope()
    try:
        mic.load_config(config)
        core = mic.core
        core.setExposure(10.0)
        x0, y0 = core.getXPosition(), core.getYPosition()
        z0 = core.getPosition()
        for i in range(n_fields):
            core.setXYPosition(x0 + 700.0 * i, y0 + 350.0 * (i % 2))
            for dz in defocus_um:
                core.setPosition(z0 + dz)
                core.waitForSystem()
                image = core.snap().copy()
                out.append((image, bead_truth(image), dz))
        core.setPosition(z0)
        core.setXYPosition(x0, y0)
        core.waitForSystem()
    finally:
        mic.close()
    return out


def real_image_set(
    image: str | Path, mask: str | Path
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(image, labels)`` planes of a local annotated image and its label mask.

    2D images or stacks (every plane whose mask holds objects). `mask` is a
    label image or a folder of one mask per object (the Data Science Bowl
    2018's ``masks/``; `read_labels`). A clear `SmartscopeError` when the
    files are missing, unreadable or of different shapes, or the mask is no
    label image (`check_labels`).
    """
    from smartscope._errors import SmartscopeError
    from smartscope.segment._io import read_image, read_labels

    img = read_image(image)
    lab = read_labels(mask, f"real mask {Path(mask).name}")
    if img.shape != lab.shape:
        raise SmartscopeError(
            f"real image {Path(image).name} {img.shape} and mask "
            f"{Path(mask).name} {lab.shape} differ in shape"
        )
    planes = zip(
        img.reshape(-1, *img.shape[-2:]), lab.reshape(-1, *lab.shape[-2:]), strict=True
    )
    out = [(i, m) for i, m in planes if m.any()]
    if not out:
        raise SmartscopeError(f"real mask {Path(mask).name} holds no objects")
    return out


def _view_spread(seg: Any, real: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
    """Scores on the real images turned by 90° steps and mirrored (8 views).

    A network on a pixel grid is not exactly equivariant, so the same nuclei
    turned by 90° or mirrored are read a little differently; the spread over
    the 8 views says how far one image's figure can move by that alone.
    ``{"f1@0.5": {mean, min, max, views}, "mean_ap": {...}}``.
    """
    from smartscope.segment._dl import VIEWS, turned
    from smartscope.segment._evaluate import evaluate

    def view(a: np.ndarray, turns: int, mirror: bool) -> np.ndarray:
        return np.ascontiguousarray(turned(a, turns, mirror))

    f1: list[float] = []
    ap: list[float] = []
    for turns, mirror in VIEWS:  # the views `UNetSegmenter(views=8)` averages
        got = evaluate(
            seg,
            [view(img, turns, mirror) for img, _ in real],
            [view(lab, turns, mirror) for _, lab in real],
        )
        f1.append(got["f1@0.5"])
        ap.append(got["mean_ap"])

    def spread(values: list[float]) -> dict[str, float]:
        return {
            "mean": round(float(np.mean(values)), 4),
            "min": round(min(values), 4),
            "max": round(max(values), 4),
            "views": len(values),
        }

    return {"f1@0.5": spread(f1), "mean_ap": spread(ap)}


def _build_segmenters(
    dl: Any,
    main: str,
    *,
    model: str,
    device: str,
    threads: int | None,
    add_models: Sequence[str | Path],
    exports: Path | None,
    reread_ratio: float | None = None,
) -> tuple[dict[str, Any], dict[str, str], dict[str, str]]:
    """Every installed segmenter, and what each runs.

    The built-in U-Net is `dl` under the name `main`. A plugin that needs a
    model file runs the files of `add_models` its file type picks (rows
    ``<plugin>:<file name>``; a file that cannot be run is the user's error);
    otherwise the ``onnx`` and ``bioimageio`` plugins run `model` exported to
    their format in the folder `exports` (rows ``onnx`` and ``bioimageio``,
    where the ``export`` extra is installed). The rest is listed with the
    reason it was not measured. Returns the segmenters, the skipped plugins
    and the model each row ran.
    """
    from smartscope.segment import (
        ThresholdSegmenter,
        available_segmenters,
        create_segmenter,
    )
    from smartscope.segment._registry import model_spec

    built: dict[str, Any] = {main: dl, "threshold": ThresholdSegmenter()}
    runs: dict[str, str] = {main: model, "threshold": "(rule-based)"}
    skipped: dict[str, str] = {}
    given: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for path in add_models:
        spec = model_spec(path, device=device, threads=threads)
        given.setdefault(spec.pop("name"), []).append((str(path), spec))
    for name in available_segmenters():
        if name in ("unet", "threshold"):
            continue
        if name in given:
            for path, params in given[name]:
                row = f"{name}:{Path(path).name}"
                built[row], runs[row] = create_segmenter(name, params), path
            continue
        try:
            built[name], runs[name] = create_segmenter(name, {}), "(none needed)"
            continue
        except Exception as exc:  # a plugin's own error: report, go on
            needs_model = "model" in str(exc) and "required" in str(exc).lower()
            if not needs_model:
                skipped[name] = (
                    f"cannot build it: {type(exc).__name__}: {first_line(exc)}"
                )
                continue
        fmt = name if name in ("onnx", "bioimageio") else None  # export formats
        if fmt is None or exports is None:
            skipped[name] = (
                "needs a model file (give one with --add-model); not measured"
            )
            continue
        try:
            path = _export(model, fmt, exports)
            params = model_spec(
                path, device=device, threads=threads, reread_ratio=reread_ratio
            )
            params.pop("name")
            built[name] = create_segmenter(name, params)
            runs[name] = f"{model} exported to {fmt}"
        except Exception as exc:
            skipped[name] = (
                f"needs a model file; {model} exported to {fmt} did not run: "
                + first_line(exc)
            )
    return built, skipped, runs


def _export(model: str, fmt: str, folder: Path) -> Path:
    """`model` exported to `fmt` (``onnx`` or ``bioimageio``) in `folder`."""
    from smartscope.segment._export import export_model

    out = folder / ("model.onnx" if fmt == "onnx" else "bioimageio")
    return export_model(model, fmt, out)


def _latency_ms(
    segmenter: Any, image: np.ndarray, repeats: int, budget_s: float = 30.0
) -> dict[str, float]:
    """p50/p99 ms of `repeats` calls after a warm-up call.

    Fewer calls (at least 3) for a segmenter whose calls would take longer
    than `budget_s` in all (a Cellpose ViT on a CPU); ``n`` says how many.
    """
    from smartscope.segment._protocol import prepare

    prepare(segmenter)  # one-time compile / load: not a call's cost
    t0 = time.perf_counter()
    segmenter.segment(image[None])  # warm-up (caches, JIT, allocator)
    first = time.perf_counter() - t0
    repeats = max(3, min(repeats, int(budget_s / max(first, 1e-6))))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        segmenter.segment(image[None])
        times.append((time.perf_counter() - t0) * 1000)
    return {
        "p50": round(float(np.percentile(times, 50)), 2),
        "p99": round(float(np.percentile(times, 99)), 2),
        "n": repeats,
    }


def bench_segment(
    model: str = "builtin",
    device: str = "auto",
    sizes: tuple[int, ...] = (512, 2048),
    repeats: int = 30,
    n_val: int = 48,
    bead_fields: int = 4,
    threads: int | None = None,
    scale: float = 1.0,
    reread_ratio: float | None = None,
    views: int = 1,
    config: str | Path | None = None,
    real_image: str | Path | None = None,
    real_mask: str | Path | None = None,
    all_segmenters: bool = True,
    add_models: Sequence[str | Path] = (),
    exports: bool = True,
) -> dict[str, Any]:
    """Speed and accuracy of every installed segmenter on the same images.

    Latency: full ``segment`` calls (normalise, network, post-processing) on
    one synthetic nuclei frame per size, p50/p99 over `repeats` (a third of
    that at sizes above 1024). Accuracy: F1 at IoU 0.5 and DSB-2018 mean AP
    on the fixed synthetic validation set (`validation_set`), on nuclei of
    40-70 px radius (`large_nuclei_set`, a size stress test), on real
    DemoCamera bead frames at 0, 2 and 4 µm defocus and, when `real_image`
    and `real_mask` (or the ``SMARTSCOPE_BENCH_REAL_IMAGE`` /
    ``SMARTSCOPE_BENCH_REAL_MASK`` environment variables) name a local
    annotated image, on it (``real_nuclei``), and on its 8 views turned by
    90° steps and mirrored (``real_nuclei_8_views``: mean, min and max; a
    network on a pixel grid reads the same nuclei a little differently when
    turned, so that spread is how far one image's figure moves by chance).

    The built-in model (``builtin``, or ``model`` for another model file) and
    the threshold baseline are always measured; with `all_segmenters` so is
    every other installed segmenter (`available_segmenters`): those that
    build without parameters as they are; the plugins that run model files
    on each file of `add_models` their type picks (``.onnx``, a bioimage.io
    package, a Cellpose file; rows ``<plugin>:<file name>``), else, with
    `exports`, ``onnx`` and ``bioimageio`` on the measured model
    exported to their format (in a temporary folder; needs the ``export``
    extra). The others are listed in ``skipped`` with the reason; ``models``
    says what each row ran. ``table`` has one row per segmenter: F1@0.5 and
    mean AP on each data set, p50/p99 ms at each size. `reread_ratio`
    turns on the re-read of large objects (`reread_large`) for the model and
    its exports; `views` 8 the model's test-time augmentation (its exports
    read each frame once).
    """
    from smartscope.segment._dl import UNetSegmenter

    real_image = real_image or os.environ.get(REAL_IMAGE_ENV) or None
    real_mask = real_mask or os.environ.get(REAL_MASK_ENV) or None
    if bool(real_image) != bool(real_mask):
        from smartscope._errors import SmartscopeError

        raise SmartscopeError("a real image needs both an image and its label mask")
    real = real_image_set(real_image, real_mask) if real_image and real_mask else []

    dl = UNetSegmenter(
        model=model,
        device=device,
        threads=threads,
        scale=scale,
        reread_ratio=reread_ratio,
        views=views,
    )
    main = "builtin" if model == "builtin" else "model"
    # bioimageio.spec leaves the package's files open for the garbage
    # collector: they are closed (quietly) before the exports' folder goes
    with (
        warnings.catch_warnings(),
        tempfile.TemporaryDirectory(prefix="smartscope-bench-") as tmp,
    ):
        warnings.simplefilter("ignore", ResourceWarning)
        segmenters, skipped, runs = _build_segmenters(
            dl,
            main,
            model=model,
            device=device,
            threads=threads,
            add_models=add_models if all_segmenters else (),
            exports=Path(tmp) if exports and all_segmenters else None,
            reread_ratio=reread_ratio,
        )
        if not all_segmenters:
            segmenters = {k: segmenters[k] for k in (main, "threshold")}
            skipped = {}
        result = _measure(
            segmenters,
            skipped,
            runs,
            dl,
            main,
            sizes,
            repeats,
            n_val,
            bead_fields,
            scale,
            config,
            real,
            real_image,
        )
        del segmenters
        gc.collect()
    return result


def _measure(
    segmenters: dict[str, Any],
    skipped: dict[str, str],
    runs: dict[str, str],
    dl: Any,
    main: str,
    sizes: tuple[int, ...],
    repeats: int,
    n_val: int,
    bead_fields: int,
    scale: float,
    config: str | Path | None,
    real: list[tuple[np.ndarray, np.ndarray]],
    real_image: str | Path | None,
) -> dict[str, Any]:
    """`bench_segment`'s measurements, while the exported models exist."""
    import torch

    from smartscope.segment._evaluate import evaluate
    from smartscope.segment._synth import (
        large_nuclei_set,
        synth_sample,
        validation_set,
    )

    latency: dict[str, dict[str, Any]] = {name: {} for name in segmenters}
    for size in sizes:
        image, _ = synth_sample(1000 + size, (size, size), kind="nuclei", depth="16")
        n = repeats if size <= 1024 else max(5, repeats // 3)
        for name, seg in segmenters.items():
            latency[name][str(size)] = _latency_ms(seg, image, n)

    val = validation_set(n_val)
    large = large_nuclei_set(max(1, n_val // 8))
    accuracy: dict[str, dict[str, Any]] = {
        "synthetic_val": {},
        "synthetic_large_nuclei": {},
        "democam_beads": {},
    }
    for name, seg in segmenters.items():
        for key, data in (("synthetic_val", val), ("synthetic_large_nuclei", large)):
            accuracy[key][name] = evaluate(
                seg, [v[0] for v in data], [v[1] for v in data]
            )
    beads = democam_bead_set(n_fields=bead_fields, config=config)
    for name, seg in segmenters.items():
        accuracy["democam_beads"][name] = evaluate(
            seg, [b[0] for b in beads], [b[1] for b in beads]
        )
    views: dict[str, dict[str, Any]] = {}
    if real:
        accuracy["real_nuclei"] = {
            name: evaluate(seg, [r[0] for r in real], [r[1] for r in real])
            for name, seg in segmenters.items()
        }
        views = {name: _view_spread(seg, real) for name, seg in segmenters.items()}
    table = []
    for name in segmenters:
        row: dict[str, Any] = {"segmenter": name}
        for key, per in accuracy.items():
            row[f"{key}.f1@0.5"] = per[name]["f1@0.5"]
            row[f"{key}.mean_ap"] = per[name]["mean_ap"]
        if views:
            row["real_nuclei_8_views.f1@0.5_mean"] = views[name]["f1@0.5"]["mean"]
            row["real_nuclei_8_views.f1@0.5_min"] = views[name]["f1@0.5"]["min"]
        for side, lat in latency[name].items():
            row[f"p50_ms_{side}"] = lat["p50"]
            row[f"p99_ms_{side}"] = lat["p99"]
        table.append(row)
    cpu = dl.device_name == "cpu"
    p50_512 = latency[main].get("512", {}).get("p50")
    p50_2048 = latency[main].get("2048", {}).get("p50")
    f1 = accuracy["synthetic_val"][main]["f1@0.5"]
    goals = {"f1@0.5_synthetic_val>=0.90": f1 >= SEGMENT_GOAL_F1}
    if real:
        goals["f1@0.5_real_nuclei>=0.88"] = (
            accuracy["real_nuclei"][main]["f1@0.5"] >= SEGMENT_GOAL_F1_REAL
        )
    if cpu and p50_512 is not None:
        goals["p50_512_cpu<=50ms"] = p50_512 <= SEGMENT_GOAL_P50_MS_CPU_512
    if not cpu and p50_2048 is not None:
        goals["p50_2048_gpu<=5ms"] = p50_2048 <= SEGMENT_GOAL_P50_MS_GPU_2048
    return {
        "benchmark": "segment",
        "device": dl.device_name,
        "settings": {
            "model_id": dl.model_id,
            "precision": dl.dtype_name,
            "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "scale": scale,
            "views": dl.views,
            "tile": dl.tile,
            "torch": torch.__version__,
        },
        "table": table,
        "models": {name: runs[name] for name in segmenters},
        "skipped": skipped,
        "latency_ms": latency,
        "accuracy": accuracy,
        "real_nuclei_8_views": views or None,
        "validation": {
            "synthetic_images": len(val),
            "large_nuclei_images": len(large),
            "bead_frames": len(beads),
            "real_images": len(real),
            "real_image": str(real_image) if real else None,
        },
        "goals_met": goals,
    }
