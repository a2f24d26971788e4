"""Commands around runs and models: report, reanalyze, gui, segment, train."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import numpy as np
import typer
from rich.table import Table

from smartscope.cli._app import (
    EXIT_COMPLETED_WITH_ERRORS,
    ConfigOpt,
    DeviceOpt,
    ModelOpt,
    OutOpt,
    app,
    bad_input,
    check_device,
    check_model_options,
    console,
    err_console,
    user_errors,
)

if TYPE_CHECKING:
    pass


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="Run directory.", show_default=False)],
    out: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option("--out", "-o", help="HTML file (default: RUN_DIR/report.html)."),
    ] = None,
) -> None:
    """Write a self-contained HTML report of a run, and print its path.

    Counts, scheduler stats, a per-well heat map (plates) or per-position
    counts, a gallery of the targeted acquisitions with their label outlines,
    latency and frame-interval histograms, light dose and the policies'
    decisions. Works on completed, interrupted and failed runs.
    """
    from smartscope.report import write_report

    with user_errors():
        path = write_report(run_dir, out)
    console.print(str(path), markup=False, highlight=False, soft_wrap=True)


@app.command()
def view(
    run_dir: Annotated[Path, typer.Argument(help="Run directory.", show_default=False)],
    position: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option("--position", "-p", help="Only this position (its key)."),
    ] = None,
    screenshot: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(help="Save a screenshot of the window there and close it."),
    ] = None,
) -> None:
    r"""Open a run in napari: positions placed in stage µm, labels, targets.

    Every position's image (one layer per channel, µm per pixel of its
    objective, Z step, time interval) at its stage position, its labels (live
    and re-analysed) overlaid, and the decision log's targets as points.
    Needs the view extra: pip install "smartscope\[view]".
    """
    try:
        from smartscope.view import view_run
    except ImportError as e:
        bad_input(f'view needs napari ({e}): pip install "smartscope[view]"')
    try:
        import napari  # noqa: F401
    except ImportError as e:
        bad_input(f'view needs napari ({e}): pip install "smartscope[view]"')
    with user_errors():
        shot = view_run(run_dir, position, screenshot=screenshot)
    if shot is not None:
        console.print(str(shot), markup=False, highlight=False, soft_wrap=True)


@app.command()
def reanalyze(
    run_dir: Annotated[Path, typer.Argument(help="Run directory.", show_default=False)],
    model: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(
            "--model",
            "-m",
            help="A segmenter name with optional parameters (unet, threshold, "
            "'threshold:sigma_px=2'), 'builtin' or a model file (.pt) "
            "[default: the run's own segmenter].",
            show_default=False,
        ),
    ] = None,
    name: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="Output name: labels-NAME/, reanalysis-NAME.json."),
    ] = None,
    scheduler: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="Address of a running dask scheduler (tcp://host:8786)."),
    ] = None,
    workers: Annotated[
        int, typer.Option(min=1, help="Workers of the local cluster.")
    ] = 2,
    timeout: Annotated[
        float,
        typer.Option(
            min=0,
            help="Longest wait (s) for the segmenter's next answer; then the "
            "frames left fail (a hung model). 0: no limit.",
        ),
    ] = 120.0,
) -> None:
    r"""Re-segment a finished run with another model on dask.distributed.

    Every frame (also those never analysed live) is segmented on a local
    cluster (or the cluster at --scheduler); writes labels-NAME/ beside labels/
    and reanalysis-NAME.json comparing the new labels with the live ones
    (object counts, F1 at IoU 0.5, mean IoU, identical frames). Frames the
    segmenter fails on get empty labels and their error in the JSON (exit
    code 3). Needs the dask extra: pip install "smartscope\[dask]".
    """
    from smartscope.reanalyze import reanalyze as run_reanalysis

    with user_errors():
        result = run_reanalysis(
            run_dir,
            model,
            name=name,
            scheduler=scheduler,
            workers=workers,
            timeout_s=timeout or None,
        )
    o, c = result["overall"], result["cluster"]

    def num(value: Any) -> str:
        return "n/a" if value is None else f"{value:g}"

    table = Table(title=f"reanalysis {result['name']}", show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column()
    rows = [
        ("model", f"{result['model']['model_id']} (live: {result['live_model_id']})"),
        ("frames", f"{o['n_frames']} ({o['n_compared']} analysed live)"),
        ("objects", f"{o['objects_new_compared']} new vs {o['objects_old']} live"),
        ("F1@0.5", num(o["f1@0.5"])),
        ("mean IoU", num(o["mean_iou"])),
        ("identical frames", num(o["identical_fraction"])),
        ("objects, all frames", str(o["objects_new"])),
        ("failed frames", str(o["n_failed"])),
        ("workers", f"{len(c['workers_used'])} used of {c['n_workers']}"),
        ("wall time", f"{result['wall_time_s']:.1f} s"),
        ("labels", str(Path(result["run_dir"]) / result["labels"])),
        ("comparison", result["path"]),
    ]
    for row in rows:
        table.add_row(*row)
    console.print(table, markup=False, highlight=False)
    if result["errors"]:
        first = result["errors"][0]
        err_console.print(
            f"warning: the segmenter failed on {o['n_failed']} of {o['n_frames']} "
            f"frame(s) (empty labels; see {result['path']}): {first['error']}",
            markup=False,
            highlight=False,
        )
        raise typer.Exit(EXIT_COMPLETED_WITH_ERRORS)


@app.command()
def gui(
    experiment: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Argument(
            help="Experiment YAML file (default: the demo experiment).",
            show_default=False,
        ),
    ] = None,
    config: ConfigOpt = None,
    out: OutOpt = None,
    demo: Annotated[
        bool, typer.Option("--demo", help="Open demos/find_and_center.yaml.")
    ] = False,
    approval: Annotated[
        bool,
        typer.Option(
            "--approval", help="Start with operator approval of policy actions on."
        ),
    ] = False,
    screenshot: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(
            "--screenshot",
            help="Run at once, save a PNG of the window after --frames frames, "
            "cancel the rest and exit (offscreen without a display).",
        ),
    ] = None,
    frames: Annotated[
        int, typer.Option(min=1, help="Frames before the --screenshot.")
    ] = 20,
) -> None:
    r"""Open the live window: frames, segmentation, stage map, decisions, veto.

    Start / pause / cancel the run, edit the policies before starting (and save
    them back to YAML), approve or reject the actions policies propose
    (--approval), and watch frames, analysis drops, latency and light dose.
    Needs the gui extra: pip install "smartscope\[gui]".
    """
    from smartscope._resources import demos_dir
    from smartscope.experiment import Experiment

    if demo and experiment is not None:
        bad_input("give an experiment file or --demo, not both")
    path = experiment or demos_dir() / "find_and_center.yaml"
    with user_errors():
        exp = Experiment.from_file(path)
        exp.config_path(config)  # a missing config fails here, not in the window
    try:
        from smartscope.gui import run_gui
    except ImportError as e:
        bad_input(f'the GUI needs Qt ({e}): pip install "smartscope[gui]"')
    with user_errors():
        code = run_gui(
            exp,
            config=config,
            out_dir=out,
            approval=approval,
            screenshot=screenshot,
            frames=frames,
        )
    if screenshot is not None:
        err_console.print(f"screenshot: {screenshot}", markup=False, highlight=False)
    if code:
        raise typer.Exit(code)


@app.command()
def segment(
    image: Annotated[
        Path,
        typer.Argument(
            help="TIFF (2D or a stack with leading T/Z/C axes), PNG, JPEG, .npy."
        ),
    ],
    out: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option("--out", "-o", help="Labels TIFF (default: IMAGE_labels.tif)."),
    ] = None,
    model: Annotated[
        str,
        typer.Option(
            "--model",
            "-m",
            help="'builtin', a model file from `smartscope train`, or a plugin's "
            "model: .onnx, a bioimage.io package (.zip, rdf.yaml, folder), a "
            "Cellpose file.",
        ),
    ] = "builtin",
    device: DeviceOpt = "auto",
    scale: Annotated[
        float, typer.Option(help="Resize before the network (0.5 for large nuclei).")
    ] = 1.0,
    threads: Annotated[Optional[int], typer.Option(min=1, help="CPU threads.")] = None,  # noqa: UP045
    reread: Annotated[
        Optional[float],  # noqa: UP045
        typer.Option(
            help="Read objects of at least this many times the median area again "
            "in crops of their own, split where that finds parts (1.7 "
            "recommended; off by default)."
        ),
    ] = None,
    views: Annotated[
        int,
        typer.Option(
            help="Built-in model: 8 averages the network over the image turned "
            "and mirrored 8 ways (more accurate, ~3x slower); 1 reads it once."
        ),
    ] = 1,
) -> None:
    """Segment an image or stack into uint16 instance labels of the same shape.

    --model picks the segmenter from the file: builtin or a .pt from
    `smartscope train` (the built-in U-Net), .onnx (plugin smartscope-onnx), a
    bioimage.io package .zip / rdf.yaml / folder (smartscope-bioimageio), any
    other file a Cellpose model (smartscope-cellpose).
    """
    from smartscope.segment import segmenter_for_model
    from smartscope.segment._io import (
        default_output,
        read_image,
        segment_array,
        write_labels,
    )
    from smartscope.segment._protocol import prepare

    check_device(device)
    check_model_options(scale, reread, views)
    with user_errors():
        arr = read_image(image)
        seg = segmenter_for_model(
            model,
            device=device,
            threads=threads,
            scale=scale,
            reread_ratio=reread,
            views=views,
        )
        prepare(seg)  # the built-in model's one-time compile: not per plane
        t0 = time.perf_counter()
        labels = segment_array(seg, arr)
        dt = time.perf_counter() - t0
        path = write_labels(out or default_output(image), labels)
    planes = int(np.prod(arr.shape[:-2])) if arr.ndim > 2 else 1
    n_obj = [int(p.max()) for p in labels.reshape(-1, *labels.shape[-2:])]
    err_console.print(
        f"{image.name}: {planes} plane(s) {arr.shape[-2]}x{arr.shape[-1]}, "
        f"{sum(n_obj)} objects ({seg.model_id}, "
        f"{getattr(seg, 'device_name', 'cpu')}, "
        f"{dt * 1000 / planes:.0f} ms/plane) → {path}",
        markup=False,
        highlight=False,
    )


@app.command()
def export(
    model_arg: Annotated[
        Optional[str],  # noqa: UP045
        typer.Argument(
            metavar="MODEL",
            help="'builtin' or a model file from `smartscope train` (or --model).",
            show_default=False,
        ),
    ] = None,
    model: ModelOpt = "builtin",
    fmt: Annotated[
        str, typer.Option("--format", "-f", help="onnx | bioimageio")
    ] = "onnx",
    out: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(
            "--out",
            "-o",
            help=".onnx file; bioimage.io: a .zip, else a folder "
            "[default: MODEL.onnx / MODEL.bioimageio.zip]",
        ),
    ] = None,
) -> None:
    r"""Export the built-in (or a trained) model as ONNX or a bioimage.io package.

    ONNX: the U-Net with smartscope's input scaling and a softmax in the graph
    (run it with the smartscope-onnx plugin or any ONNX runtime). bioimage.io:
    a 0.5 package (rdf.yaml, TorchScript and ONNX weights, test tensors, cover,
    citation, license) that the bioimage.io validator accepts offline. Needs
    the export extra: pip install "smartscope\[export]".
    """
    from smartscope.segment._export import export_model

    if model_arg is not None:
        if model != "builtin" and model != model_arg:
            bad_input(f"two models given: {model_arg!r} and --model {model!r}")
        model = model_arg
    if fmt not in ("onnx", "bioimageio"):
        bad_input(f"--format must be onnx or bioimageio, not {fmt!r}")
    with user_errors():
        path = export_model(model, fmt, out)
    console.print(str(path), markup=False, highlight=False, soft_wrap=True)


@app.command()
def train(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path(
        "models/my-model"
    ),
    data: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(
            "--data",
            help="Folder of image/label pairs (images/ + labels/ TIFFs, "
            "NAME.tif + NAME_labels.tif, or DSB-2018's ID/images/ + ID/masks/). "
            "Without it: synthetic data only.",
        ),
    ] = None,
    init: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option("--init", help="Fine-tune from 'builtin' or a model file."),
    ] = None,
    steps: Annotated[int, typer.Option(min=1, help="Optimiser steps.")] = 6000,
    batch_size: Annotated[int, typer.Option(min=1)] = 8,
    crop: Annotated[int, typer.Option(min=32, help="Training crop side (px).")] = 256,
    lr: Annotated[float, typer.Option(min=0.0, help="Peak learning rate.")] = 3e-3,
    seed: Annotated[int, typer.Option(help="Seed (same seed, same model).")] = 0,
    pool: Annotated[
        int, typer.Option(min=1, help="Synthetic scenes kept in memory.")
    ] = 1000,
    synthetic_fraction: Annotated[
        float,
        typer.Option(min=0.0, max=1.0, help="Share of synthetic crops (with --data)."),
    ] = 0.25,
    max_radius: Annotated[
        float, typer.Option(min=4.0, help="Largest mean nucleus radius (px).")
    ] = 36.0,
    widefield_fraction: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=1.0,
            help="Share of synthetic nuclei scenes in the widefield style "
            "(crowded, pressed-together nuclei of one brightness).",
        ),
    ] = 0.6,
    contact_weight: Annotated[
        float,
        typer.Option(
            min=0.0, help="Extra loss weight where two objects touch (x class weight)."
        ),
    ] = 4.0,
    gamma_fraction: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=1.0,
            help="Share of crops whose normalised intensities are raised to a "
            "random power in --gamma-range (softer or harder nuclei profiles).",
        ),
    ] = 0.0,
    gamma_range: Annotated[
        tuple[float, float],
        typer.Option(min=0.05, max=20.0, help="Lowest and highest power."),
    ] = (0.55, 1.3),
    threads: Annotated[Optional[int], typer.Option(min=1)] = None,  # noqa: UP045
    no_eval: Annotated[
        bool, typer.Option("--no-eval", help="Skip the validation metrics.")
    ] = False,
) -> None:
    """Train a segmentation model (synthetic data, and/or your TIFF pairs).

    Writes OUT/model.pt, its TorchScript export OUT/model.ts and card
    OUT/model.json (sha256, recipe, metrics); OUT/checkpoint.pt is saved as
    it goes and a rerun with the same OUT continues from it.
    """
    from smartscope.segment._export import write_card
    from smartscope.segment._train import TrainConfig
    from smartscope.segment._train import train as run_training

    if gamma_range[0] > gamma_range[1]:
        bad_input(f"--gamma-range: lowest {gamma_range[0]:g} above highest")

    cfg = TrainConfig(
        steps=steps,
        batch_size=batch_size,
        crop=crop,
        lr=lr,
        seed=seed,
        pool_size=pool,
        synthetic_fraction=synthetic_fraction if data else 1.0,
        max_radius=max_radius,
        widefield_fraction=widefield_fraction,
        contact_weight=contact_weight,
        gamma_fraction=gamma_fraction,
        gamma_range=gamma_range,
        threads=threads,
    )
    with user_errors(), _TrainProgress(steps) as progress:
        model_pt = run_training(cfg, out, user_data=data, init=init, progress=progress)
    with user_errors():
        card = write_card(model_pt, name=out.name, metrics={} if no_eval else None)
    err_console.print(
        f"model: {model_pt}\ncard:  {card}", markup=False, highlight=False
    )


class _TrainProgress:
    """A rich progress bar on a terminal; a line every 5 % otherwise (CI, logs)."""

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self.tty = err_console.is_terminal
        self._bar: Any = None
        self._task: Any = None
        self._next = 0

    def __enter__(self) -> _TrainProgress:
        if self.tty:
            from rich.progress import (
                BarColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(
                TextColumn("training"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total} loss {task.fields[loss]}"),
                TimeRemainingColumn(),
                console=err_console,
            )
            self._bar.start()
            self._task = self._bar.add_task("train", total=self.steps, loss="-")
        return self

    def __call__(self, p: Any) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=p.step, loss=f"{p.loss:.4f}")
        elif p.step >= self._next or p.step == p.steps:
            err_console.print(
                f"step {p.step}/{p.steps} loss {p.loss:.4f} lr {p.lr:.2e} "
                f"{p.elapsed_s:.0f} s",
                markup=False,
                highlight=False,
            )
            self._next = p.step + max(1, p.steps // 20)

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.stop()
