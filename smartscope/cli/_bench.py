"""``smartscope bench ...``: the benchmarks, JSON with ``--json``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from smartscope.cli._app import (
    ConfigOpt,
    DeviceOpt,
    ModelOpt,
    bad_input,
    bench_app,
    check_device,
    check_model_options,
    emit,
    err_console,
    user_errors,
)

if TYPE_CHECKING:
    pass


@bench_app.command("loop")
def bench_loop_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON only.")] = False,
    frames: Annotated[int, typer.Option(min=1, help="Frames in the base plan.")] = 60,
    exposure_ms: Annotated[float, typer.Option(min=0.1)] = 10.0,
    repeats: Annotated[int, typer.Option(min=1)] = 3,
    segmenter: Annotated[
        str, typer.Option(help="Registered segmenter (built-in model: unet).")
    ] = "unet",
    device: DeviceOpt = "auto",
    positions: Annotated[
        str, typer.Option(help="Position counts to run, comma-separated.")
    ] = "1,4",
    load: Annotated[
        bool, typer.Option("--load", help="Keep one core busy while measuring.")
    ] = False,
    config: ConfigOpt = None,
    gui: Annotated[
        bool,
        typer.Option(
            "--gui",
            help="Also time smart runs with the live window attached (offscreen).",
        ),
    ] = False,
) -> None:
    """The same events through bare pymmcore-plus, pymmcore-plus + OME-Zarr, smartscope.

    Per arm and position count: acquisition wall time and its ratio to bare
    pymmcore-plus (the plainest event-by-event acquisition), frames
    stored; for smartscope, frames analysed and skipped by reason, frame age
    at decision and frame→decision p50/p99, the device. Goals: ratio ≤ 1.05,
    p50 ≤ 80 ms, p99 ≤ 150 ms, no frame missing, the same event order in
    every arm. With --gui, also with the live window attached (gui_ratio:
    window / headless, goal ≤ 1.05). On the demo config a ratio a little under
    1 at one position is the demo XY stage, not a faster loop: MMCore sleeps
    ~10 ms when it finds the stage busy right after a set, which bare
    pymmcore-plus always does (docs/benchmarks.md).
    """
    from smartscope.bench import bench_loop

    check_device(device)
    try:
        counts = [int(p) for p in positions.split(",") if p.strip()]
    except ValueError:
        bad_input(f"--positions must be integers separated by commas: {positions!r}")
    if not counts or min(counts) < 1:
        bad_input(f"--positions must be integers ≥ 1: {positions!r}")
    attach = None
    if gui:
        try:
            from smartscope.gui import attach_window
        except ImportError as e:
            bad_input(f'--gui needs Qt ({e}): pip install "smartscope[gui]"')
        attach = attach_window
    with user_errors():
        result = bench_loop(
            config=config,
            frames=frames,
            exposure_ms=exposure_ms,
            repeats=repeats,
            segmenter=segmenter,
            device=device,
            positions=counts,
            attach=attach,
            load=load,
        )
    emit(result, as_json)


@bench_app.command("burst")
def bench_burst_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON only.")] = False,
    frames: Annotated[int, typer.Option(min=2, help="Frames of the burst.")] = 100,
    exposure_ms: Annotated[float, typer.Option(min=0.1)] = 10.0,
    chunk_frames: Annotated[
        int, typer.Option(min=2, help="Longest hardware sequence (frames).")
    ] = 20,
    repeats: Annotated[int, typer.Option(min=1)] = 5,
    segmenter: Annotated[
        str, typer.Option(help="Registered segmenter the smartscope runs use.")
    ] = "threshold",
    load: Annotated[
        bool, typer.Option("--load", help="Keep one core busy while measuring.")
    ] = False,
    fast_image: Annotated[
        bool,
        typer.Option(
            "--fast-image",
            help="DemoCamera FastImage: no image rendering (the camera's own cost).",
        ),
    ] = False,
    config: ConfigOpt = None,
) -> None:
    """A burst at one position: event by event vs hardware-sequenced.

    The same FRAMES frames (one position, EXPOSURE_MS each, no wait) through
    the smartscope runner event by event and in hardware sequences of
    CHUNK_FRAMES (frames stored and analysed), and through bare pymmcore-plus
    event by event and as one sequence (the camera's own rate). Reports
    burst_fps, event_fps, camera_fps and exposure_limited_fps, frames stored,
    analysed and skipped, and the time from each sequence's last frame to the
    next event's start. Goals: sequenced ≥ 90 % of the exposure-limited rate,
    no frame lost, that time within one frame interval, the same order.
    """
    from smartscope.bench import bench_burst

    with user_errors():
        result = bench_burst(
            config=config,
            frames=frames,
            exposure_ms=exposure_ms,
            chunk_frames=chunk_frames,
            repeats=repeats,
            segmenter=segmenter,
            load=load,
            fast_image=fast_image,
        )
    emit(result, as_json)


@bench_app.command("segment")
def bench_segment_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON only.")] = False,
    model: ModelOpt = "builtin",
    device: DeviceOpt = "auto",
    repeats: Annotated[int, typer.Option(min=3, help="Timed calls per size.")] = 30,
    threads: Annotated[Optional[int], typer.Option(min=1)] = None,  # noqa: UP045
    scale: Annotated[float, typer.Option(help="Input scale of the model.")] = 1.0,
    reread: Annotated[
        Optional[float],  # noqa: UP045
        typer.Option(
            help="The model (and its exports) read objects of at least this many "
            "times the median area again in crops of their own (off by default)."
        ),
    ] = None,
    views: Annotated[
        int,
        typer.Option(
            help="The model averages its reading over the frame turned and "
            "mirrored 8 ways (8) or reads it once (1)."
        ),
    ] = 1,
    real_image: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(
            help="A real image (TIFF/PNG/.npy) to score on too, with --real-mask "
            "[env SMARTSCOPE_BENCH_REAL_IMAGE]."
        ),
    ] = None,
    real_mask: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(
            help="Its ground-truth instance labels: a label image, or a folder "
            "of one mask per object (DSB-2018 masks/) [env "
            "SMARTSCOPE_BENCH_REAL_MASK]."
        ),
    ] = None,
    add_model: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option(
            "--add-model",
            help="Also measure this model file through the plugin its type picks "
            "(.onnx, a bioimage.io package, a Cellpose file); repeatable.",
        ),
    ] = None,
    exports: Annotated[
        bool,
        typer.Option(
            help="Run the onnx and bioimageio plugins on the model exported to "
            "their formats (a temporary folder) when no --add-model is theirs."
        ),
    ] = True,
    config: ConfigOpt = None,
) -> None:
    """Segmentation speed and accuracy of every installed segmenter.

    A table of the model and every installed segmenter (plugins included):
    p50/p99 ms/frame at 512² and 2048²; F1@0.5 and mean AP on the synthetic
    validation set, DemoCamera beads and, with --real-image and --real-mask,
    a real labelled image of your own (also turned and mirrored: the mean and
    least F1 over its 8 views). Plugins that run model files run the
    --add-model files of their type, else the model exported to ONNX and to a
    bioimage.io package (the round trip); the rest is listed as skipped.

    Goals: F1@0.5 ≥ 0.90 (synthetic validation) and ≥ 0.88 on the real image
    as given; 512² p50 ≤ 50 ms on CPU;
    2048² p50 ≤ 5 ms on a GPU.
    """
    from smartscope.bench import bench_segment

    check_device(device)
    check_model_options(scale, reread, views)
    with user_errors():
        result = bench_segment(
            model=model,
            device=device,
            repeats=repeats,
            threads=threads,
            scale=scale,
            reread_ratio=reread,
            views=views,
            config=config,
            real_image=real_image,
            real_mask=real_mask,
            add_models=add_model or (),
            exports=exports,
        )
    emit(result, as_json)


@bench_app.command("livecell")
def bench_livecell_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON only.")] = False,
    seconds: Annotated[
        float, typer.Option(min=5, help="Run seconds of each of the three runs.")
    ] = 60.0,
    seed: Annotated[int, typer.Option(help="Seed of the specimen.")] = 7,
    acceleration: Annotated[
        float, typer.Option(min=1, help="Simulated seconds per run second.")
    ] = 120.0,
    slow: Annotated[float, typer.Option(min=0.1, help="Slow interval (s).")] = 2.5,
    fast: Annotated[float, typer.Option(min=0.05, help="Fast interval (s).")] = 0.5,
    keep: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(help="Keep the three runs (data, ground truth) in this folder."),
    ] = None,
    load: Annotated[
        bool, typer.Option("--load", help="Keep one core busy while measuring.")
    ] = False,
) -> None:
    """Adaptive live-cell imaging vs fixed slow and fixed fast time-lapses.

    Runs demos/live_mitosis.yaml (event-triggered bursts, adaptive interval,
    cell following, dose budget) and fixed slow / fast time-lapses of the same
    fixed-seed simulated specimen over the same simulated time, and scores each
    against the specimen's ground truth: divisions imaged at the fast rate
    inside their pre-division window, light dose received by the cells, frames,
    cells harmed, tracking of the followed cell and timepoint lateness. Goals:
    adaptive catches ≥ 95 % of divisions with ≤ 30 % of the fixed-fast dose; the
    followed cell stays within 10 % of the field width of the center in ≥ 95 %
    of its frames; they should also hold with the machine's other core kept
    busy (--load). About 3 × SECONDS of wall time.
    """
    from smartscope.bench import bench_livecell

    def progress(msg: str) -> None:
        if not as_json:
            err_console.print(msg, markup=False, highlight=False)

    with user_errors():
        result = bench_livecell(
            duration_s=seconds,
            seed=seed,
            acceleration=acceleration,
            slow_interval_s=slow,
            fast_interval_s=fast,
            out_dir=keep,
            progress=progress,
            load=load,
        )
    emit(result, as_json)


@bench_app.command("screen")
def bench_screen_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON only.")] = False,
    wells: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(min=1, help="First wells of the demo's 12 (default: all)."),
    ] = None,
    keep: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(help="Keep the smart and fixed runs in this folder."),
    ] = None,
) -> None:
    """Headless plate screen vs fixed plans; the Scheduler on large plates.

    Runs demos/plate_screen.yaml on hardware_configs/plate.cfg and the same
    wells as two fixed plans (every field: without analysis, and with software
    autofocus per well): fields imaged vs planned, wall times, time saved and
    time to analysed results, seconds per frame kind, fields imaged in focus,
    hits found vs the plate's ground truth (recall, precision), wells meeting
    their quota, empty wells' fields, stage travel. Then iterates a Scheduler
    alone (no hardware) over 96×9, 384×9 and 384×36 plate plans: µs per event
    (goal ≤ 1 ms) and its own peak memory (tracemalloc, apart from useq's
    reading of the plan) as the plan grows (goal: flat, ≤ 1.5× the smallest).
    """
    from smartscope.bench import bench_screen

    def progress(msg: str) -> None:
        if not as_json:
            err_console.print(msg, markup=False, highlight=False)

    with user_errors():
        result = bench_screen(wells=wells, out_dir=keep, progress=progress)
    emit(result, as_json)
