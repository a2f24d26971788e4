"""The ``smartscope`` command line (run, demo, validate, report, gui, bench, ...)."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from smartscope import __version__
from smartscope._errors import SmartscopeError

if TYPE_CHECKING:
    from smartscope.runner import Runner, RunSummary

app = typer.Typer(
    name="smartscope",
    help="Acquisition-coupled smart microscopy on Micro-Manager: frames stream to "
    "a segmentation model whose detections drive the next acquisition events.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
bench_app = typer.Typer(help="Benchmarks (JSON with --json).", no_args_is_help=True)
app.add_typer(bench_app, name="bench")

console = Console()
err_console = Console(stderr=True, soft_wrap=True)  # an error stays one line

EXIT_BAD_INPUT = 2
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130


def _version(value: bool) -> None:
    if value:
        console.print(f"smartscope {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Show the version."
        ),
    ] = False,
) -> None:
    """smartscope: smart microscopy controller."""


# ------------------------------------------------------------------- run/demo
ExperimentArg = Annotated[
    Path, typer.Argument(help="Experiment YAML file.", show_default=False)
]
ConfigOpt = Annotated[
    Optional[Path],  # noqa: UP045
    typer.Option("--config", "-c", help="Micro-Manager .cfg overriding the file's."),
]
OutOpt = Annotated[
    Optional[Path],  # noqa: UP045
    typer.Option("--out", "-o", help="Run directory (default: runs/<name>-<time>)."),
]
OverwriteOpt = Annotated[
    bool, typer.Option("--overwrite", help="Replace a run already in --out.")
]


@app.command()
def run(
    experiment: ExperimentArg,
    config: ConfigOpt = None,
    out: OutOpt = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Run an experiment: acquire, analyse, decide, and write the dataset.

    Writes per-position OME-Zarr images and labels, frames.jsonl,
    decisions.jsonl and run.json to the run directory, and prints a summary.
    On a simulated live specimen (hardware_configs/livecells.cfg) it also
    writes the ground truth and prints what the run caught (divisions imaged
    fast, light dose, cells harmed, a followed cell's centering).
    Ctrl-C (or SIGTERM) stops after the current event; what was acquired stays
    readable and run.json says "interrupted" (exit code 130).
    """
    _run_experiment_file(experiment, config=config, out=out, overwrite=overwrite)


@app.command()
def resume(
    run_dir: Annotated[Path, typer.Argument(help="Run directory.", show_default=False)],
    config: ConfigOpt = None,
) -> None:
    """Go on with a run that crashed, was killed or interrupted, in its directory.

    Fields whose frames are all on disk (and analysed) are kept and not imaged
    again; partly imaged ones are moved aside (images/<key>.partial-N.ome.zarr)
    and imaged again; the logs are appended to and run.json records the resume.
    The policies first see the kept frames again, so quotas, focus and hit wells
    carry on. A completed run is left alone. Exit codes as for `run`.
    """
    from smartscope.resume import finish_resume, inspect_run, prepare_resume

    with _user_errors():
        state = inspect_run(run_dir)
    if state.completed:
        console.print(
            f"{run_dir}: the run completed; nothing to resume",
            markup=False,
            highlight=False,
        )
        return
    console.print(
        f"resuming {run_dir} ({state.status}): {len(state.finished)} fields "
        f"finished, {len(state.skipped)} skipped, {len(state.partial)} partial "
        f"(moved aside, imaged again), {len(state.pending)} to image; "
        f"{len(state.replay)} analysed frames given to the policies again",
        markup=False,
        highlight=False,
    )
    with _user_errors():
        runner = prepare_resume(state, config=config)
    try:
        summary = finish_resume(runner, _run_with_display(runner))
    finally:
        runner.close()  # releases the core before exit (avoids an abort)
    _print_summary(summary)
    if summary.status == "interrupted":
        raise typer.Exit(EXIT_INTERRUPTED)
    if summary.status == "failed":
        err_console.print(f"error: run failed: {summary.error}")
        raise typer.Exit(EXIT_FAILED)


@app.command()
def demo(out: OutOpt = None, overwrite: OverwriteOpt = False) -> None:
    """Run demos/find_and_center.yaml on the demo microscope.

    Surveys a 2×2 grid of tiles of fluorescent beads, then images every bead
    centered as a Z-stack, and prints what it did.
    """
    from smartscope._resources import demos_dir

    _run_experiment_file(
        demos_dir() / "find_and_center.yaml", config=None, out=out, overwrite=overwrite
    )


@app.command()
def validate(experiment: ExperimentArg, config: ConfigOpt = None) -> None:
    """Check an experiment file against its hardware config, without acquiring.

    Loads the config (to check channel presets and property settings) and
    releases it again.
    """
    from smartscope.experiment import Experiment
    from smartscope.microscope import Microscope
    from smartscope.runner import prepare_hardware

    with _user_errors():
        exp = Experiment.from_file(experiment)
        cfg = exp.config_path(config)
        scope = Microscope(cfg)
        try:
            prepare_hardware(exp, scope)
        finally:
            scope.close()
    n_events = sum(1 for _ in exp.sequence)
    policies = ", ".join(p.name for p in exp.policies) or "none"
    console.print(
        f"[green]ok[/green] {experiment}: {n_events} base events, segmenter "
        f"{exp.segmenter.name}, policies: {policies}, config {cfg}"
    )


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

    with _user_errors():
        path = write_report(run_dir, out)
    console.print(str(path), markup=False, highlight=False, soft_wrap=True)


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
) -> None:
    r"""Re-segment a finished run with another model on dask.distributed.

    Every frame (also those never analysed live) is segmented on a local
    cluster (or the cluster at --scheduler); writes labels-NAME/ beside labels/
    and reanalysis-NAME.json comparing the new labels with the live ones
    (object counts, F1 at IoU 0.5, mean IoU, identical frames). Needs the dask
    extra: pip install "smartscope\[dask]".
    """
    from smartscope.reanalyze import reanalyze as run_reanalysis

    with _user_errors():
        result = run_reanalysis(
            run_dir, model, name=name, scheduler=scheduler, workers=workers
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
        ("workers", f"{len(c['workers_used'])} used of {c['n_workers']}"),
        ("wall time", f"{result['wall_time_s']:.1f} s"),
        ("labels", str(Path(result["run_dir"]) / result["labels"])),
        ("comparison", result["path"]),
    ]
    for row in rows:
        table.add_row(*row)
    console.print(table, markup=False, highlight=False)


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
        _bad_input("give an experiment file or --demo, not both")
    path = experiment or demos_dir() / "find_and_center.yaml"
    with _user_errors():
        exp = Experiment.from_file(path)
        exp.config_path(config)  # a missing config fails here, not in the window
    try:
        from smartscope.gui import run_gui
    except ImportError as e:
        _bad_input(f'the GUI needs Qt ({e}): pip install "smartscope[gui]"')
    with _user_errors():
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


def _run_experiment_file(
    path: Path, *, config: Path | None, out: Path | None, overwrite: bool
) -> None:
    from smartscope.experiment import Experiment
    from smartscope.runner import Runner

    with _user_errors():
        exp = Experiment.from_file(path)
        runner = Runner(exp, config=config, out_dir=out, overwrite=overwrite)
    live = None
    try:
        with _run_log(runner.directory):
            summary = _run_with_display(runner)
            _status_log.info(
                "run %s (%s): %d frames, %d skipped events, %.1f s",
                summary.status,
                summary.reason,
                summary.frames_acquired,
                summary.events_skipped,
                summary.wall_time_s,
            )
        live = _live_specimen_report(runner)
    finally:
        runner.close()  # releases the core before exit (avoids an abort)
    _print_summary(summary)
    if live is not None:
        _print_live_report(live)
    if summary.status == "interrupted":
        raise typer.Exit(EXIT_INTERRUPTED)
    if summary.status == "failed":
        err_console.print(f"error: run failed: {summary.error}")
        raise typer.Exit(EXIT_FAILED)


def _run_with_display(runner: Runner) -> RunSummary:
    """Run with a live display (or periodic lines without a terminal)."""
    stop_requested = threading.Event()

    def _on_signal(signum: int, _frame: Any) -> None:
        stop_requested.set()
        runner.cancel(f"interrupted by {signal.Signals(signum).name}")

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, _on_signal)
    console.print(
        f"[bold]smartscope[/bold] {runner.experiment.name}: config "
        f"{runner.microscope.config_path}, output {runner.directory}"
    )
    screen = _ScreenProgress.attach(runner)  # plate plans: wells, fields, hits
    try:
        with _user_errors():
            runner.start()
        if screen is None:
            _watch(runner)
        else:
            screen.watch()
        return runner.finish()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _status_text(runner: Runner) -> str:
    w, s, st = runner.worker, runner.scheduler, runner.stream
    frames = runner._frame_count
    det = w.n_detections if w else 0
    queued = s.queued if s else 0
    drops = st.n_dropped if st else 0
    scheduled = w.n_events_scheduled if w else 0
    return (
        f"frames {frames}  detections {det}  scheduled {scheduled}  "
        f"queued {queued}  analysis drops {drops}  t={runner.clock():.1f}s"
    )


def _watch(runner: Runner) -> None:
    if console.is_terminal:
        from rich.live import Live
        from rich.spinner import Spinner

        last = time.monotonic()
        with Live(console=console, refresh_per_second=4, transient=True) as live:
            while not runner.wait(0.25):
                live.update(Spinner("dots", text=_status_text(runner)))
                if time.monotonic() - last >= _STATUS_EVERY_S:
                    _status_log.info(_status_text(runner))
                    last = time.monotonic()
        return
    last = time.monotonic()
    while not runner.wait(0.25):
        if time.monotonic() - last >= _STATUS_EVERY_S:
            line = _status_text(runner)
            console.print(line, highlight=False)
            _status_log.info(line)
            last = time.monotonic()


#: seconds between status lines (without a terminal, and in run.log)
_STATUS_EVERY_S = 10.0
#: status lines of a run, written to its run.log
_status_log = logging.getLogger("smartscope.run")
#: a plate position key: ``<well>_<field>`` ("B3_0004")
_WELL_FIELD = re.compile(r"^([A-Za-z]{1,2}\d{1,3})_\d+$")


@contextlib.contextmanager
def _run_log(directory: Path) -> Any:
    """Write ``run.log`` in the run directory while the run goes on.

    The status lines, and WARNING+ records of smartscope and pymmcore-plus.
    """
    directory.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(directory / "run.log", mode="a", encoding="utf-8")
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    handler.addFilter(
        lambda r: r.levelno >= logging.WARNING or r.name == _status_log.name
    )
    loggers = [logging.getLogger("smartscope"), logging.getLogger("pymmcore-plus")]
    level, propagate = _status_log.level, _status_log.propagate
    _status_log.setLevel(logging.INFO)
    _status_log.propagate = False  # status lines go to run.log, not elsewhere
    _status_log.addHandler(handler)
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield
    finally:
        for logger in [*loggers, _status_log]:
            logger.removeHandler(handler)
        _status_log.setLevel(level)
        _status_log.propagate = propagate
        handler.close()


class _ScreenProgress:
    """Progress of a plate screen: wells, fields, cells, hits, elapsed, ETA.

    Counts come from the runner's signals (cheap handlers on the acquisition
    and inference threads) and the scheduler's counters; nothing here waits on
    the acquisition.
    """

    def __init__(self, runner: Runner, fields: dict[str, str]) -> None:
        self.runner = runner
        self.fields = fields  # field key -> well, every field of the plan
        self.n_wells = len(set(fields.values()))
        self.wells_seen: dict[str, None] = {}  # in order
        self.imaged: set[str] = set()
        self.skipped: set[str] = set()
        self.cells = 0
        self._hits: list[str] = []

    @classmethod
    def attach(cls, runner: Runner) -> _ScreenProgress | None:
        """For a plate plan (WellPlatePlan, or positions ``<well>_<field>``)."""
        import useq

        from smartscope.scheduler import base_position_key

        plan = runner.plan
        if not isinstance(plan.stage_positions, useq.WellPlatePlan):
            names = [p.name or "" for p in plan.stage_positions]
            if not names or not all(_WELL_FIELD.match(n) for n in names):
                return None
        fields: dict[str, str] = {}
        for event in plan.model_copy(update={"time_plan": None}):
            key = base_position_key(event)
            fields[key] = key.split("_", 1)[0]
        self = cls(runner, fields)
        runner.events.frameAcquired.connect(self._on_frame)
        runner.events.detectionsReady.connect(self._on_detections)
        return self

    def _on_frame(self, frame: Any) -> None:  # acquisition thread
        if frame.kind == "base" and frame.position in self.fields:
            self.imaged.add(frame.position)
            self.wells_seen[self.fields[frame.position]] = None

    def _on_detections(self, frame: Any, detections: Any) -> None:  # inference
        if frame.kind == "base" and frame.position not in self.skipped:
            self.cells += len(detections)

    def _on_skipped(self, position: str, n: int, reason: str) -> None:
        if position in self.fields:
            self.skipped.add(position)

    def hits(self) -> list[str]:
        for policy in self.runner.policies:
            if getattr(policy, "name", "") == "hit_detection":
                with contextlib.suppress(RuntimeError):  # changed while read
                    self._hits = list(policy.hits)
        return self._hits

    def numbers(self) -> dict[str, Any]:
        """Wells done/total, fields imaged/skipped/planned, cells, hits, times."""
        running = self.runner.is_running()
        imaged, skipped = len(self.imaged), len(self.skipped - self.imaged)
        planned = len(self.fields)
        done = imaged + skipped
        elapsed = self.runner.clock()
        remaining = max(planned - done, 0)
        eta = elapsed * remaining / done if done and running else None
        wells_done = len(self.wells_seen) - (1 if running and self.wells_seen else 0)
        return {
            "wells_done": wells_done,
            "wells": self.n_wells,
            "fields_imaged": imaged,
            "fields_skipped": skipped,
            "fields_planned": planned,
            "cells": self.cells,
            "hits": self.hits(),
            "elapsed_s": elapsed,
            "eta_s": eta if running else 0.0,
        }

    def line(self) -> str:
        n = self.numbers()
        eta = "?" if n["eta_s"] is None else f"{n['eta_s']:.0f} s"
        hits = ", ".join(n["hits"])
        return (
            f"wells {n['wells_done']}/{n['wells']}  fields {n['fields_imaged']} "
            f"imaged, {n['fields_skipped']} skipped of {n['fields_planned']}  "
            f"cells {n['cells']}  hits {len(n['hits'])}"
            + (f" ({hits})" if hits else "")
            + f"  elapsed {n['elapsed_s']:.0f} s  ETA {eta}"
        )

    def watch(self) -> None:
        """Show progress until acquisition ends (rich on a terminal, else lines)."""
        if self.runner.scheduler is not None:
            self.runner.scheduler.events.eventsSkipped.connect(self._on_skipped)
        last = time.monotonic()
        if console.is_terminal:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                SpinnerColumn,
                TextColumn,
            )

            with Progress(
                SpinnerColumn(),
                TextColumn("fields"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"),
                console=console,
                transient=True,
            ) as bar:
                task = bar.add_task("screen", total=len(self.fields), status="")
                while not self.runner.wait(0.25):
                    n = self.numbers()
                    eta = "?" if n["eta_s"] is None else f"{n['eta_s']:.0f} s"
                    bar.update(
                        task,
                        completed=n["fields_imaged"] + n["fields_skipped"],
                        status=f"wells {n['wells_done']}/{n['wells']}  imaged "
                        f"{n['fields_imaged']}  skipped {n['fields_skipped']}  "
                        f"cells {n['cells']}  hits {len(n['hits'])}  "
                        f"{n['elapsed_s']:.0f} s, ETA {eta}",
                    )
                    if time.monotonic() - last >= _STATUS_EVERY_S:
                        _status_log.info(self.line())
                        last = time.monotonic()
        else:
            while not self.runner.wait(0.25):
                if time.monotonic() - last >= _STATUS_EVERY_S:
                    line = self.line()
                    console.print(line, markup=False, highlight=False, soft_wrap=True)
                    _status_log.info(line)
                    last = time.monotonic()
        line = self.line()  # the final counts, always
        console.print(line, markup=False, highlight=False, soft_wrap=True)
        _status_log.info(line)


def _live_specimen_report(runner: Runner) -> dict[str, Any] | None:
    """Score a run on a simulated live specimen (None for other cameras)."""
    from smartscope.bench_livecell import live_specimen_report

    try:
        return live_specimen_report(runner)
    except Exception as e:  # scoring must not hide the run's own result
        err_console.print(f"warning: no specimen report: {e}", markup=False)
        return None


def _print_live_report(report: dict[str, Any]) -> None:
    div, dose = report["divisions"], report["dose"]
    minutes = (report["simulated_s"] or 0) / 60
    table = Table(
        title=f"live specimen, ground truth ({minutes:.0f} simulated min)",
        show_header=False,
        box=None,
    )
    table.add_column(style="bold")
    table.add_column()
    caught = (
        f"{div['n_caught']} of {div['n_divisions']} "
        f"({100 * div['fraction_caught']:.0f} %) imaged every "
        f"{report['fast_interval_run_s']:g} s up to the division"
        if div["n_divisions"]
        else "no division in the imaged fields"
    )
    frames = ", ".join(f"{v} {k}" for k, v in report["frames"].items())
    rows = [
        ("divisions caught", caught),
        ("frames", frames),
        ("light dose", f"{dose['total_cell_dose_ms']:.0f} ms·cells received"),
        ("cells harmed", f"{dose['cells_harmed']} ({dose['cells_dead']} dead)"),
    ]
    for position, f in report["follow"].items():
        rows.append(
            (
                f"followed cell at {position}",
                f"within 10 % of the field width of the center in "
                f"{100 * f['fraction_within']:.0f} % of {f['n_frames']} frames",
            )
        )
    for row in rows:
        table.add_row(*row)
    console.print(table)


def _print_summary(summary: RunSummary) -> None:
    table = Table(title=f"run {summary.status}", show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column()
    lat = summary.latency_ms.get("frame_to_decision", {})
    rows = [
        ("status", f"{summary.status} ({summary.reason})"),
        ("frames acquired", str(summary.frames_acquired)),
        ("frames analysed", str(summary.frames_analysed)),
        ("analysis drops", str(summary.frames_dropped)),
        ("detections", str(summary.detections)),
        ("decisions", str(summary.decisions)),
        ("events scheduled", str(summary.events_scheduled)),
        ("events skipped", str(summary.events_skipped)),
        ("positions", str(summary.positions)),
        (
            "frame→decision",
            f"p50 {lat.get('p50')} ms, p99 {lat.get('p99')} ms"
            if lat.get("p50") is not None
            else "n/a",
        ),
        ("wall time", f"{summary.wall_time_s:.1f} s"),
        ("output", summary.directory),
    ]
    for k, v in rows:
        table.add_row(k, v)
    console.print(table)


class _user_errors:
    """Turn bad input into one ``error:`` line and exit code 2."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        if exc is None or not isinstance(exc, SmartscopeError):
            return False
        err_console.print(f"error: {exc}", markup=False, highlight=False)
        raise typer.Exit(EXIT_BAD_INPUT)


# ------------------------------------------------------------- segment/train
ModelOpt = Annotated[
    str,
    typer.Option(
        "--model", "-m", help="'builtin' or a model file from `smartscope train`."
    ),
]
DeviceOpt = Annotated[
    str, typer.Option("--device", help="auto | cpu | cuda (auto: CUDA if available).")
]


@app.command()
def segment(
    image: Annotated[
        Path, typer.Argument(help="TIFF (2D or a stack with leading T/Z/C axes), PNG.")
    ],
    out: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option("--out", "-o", help="Labels TIFF (default: IMAGE_labels.tif)."),
    ] = None,
    model: ModelOpt = "builtin",
    device: DeviceOpt = "auto",
    scale: Annotated[
        float, typer.Option(help="Resize before the network (0.5 for large nuclei).")
    ] = 1.0,
    threads: Annotated[Optional[int], typer.Option(min=1, help="CPU threads.")] = None,  # noqa: UP045
) -> None:
    """Segment an image or stack into uint16 instance labels of the same shape."""
    from smartscope.segment._dl import UNetSegmenter
    from smartscope.segment._io import (
        default_output,
        read_image,
        segment_array,
        write_labels,
    )

    _check_device(device)
    if not 0.05 < scale <= 4:
        _bad_input(f"--scale must be in (0.05, 4], not {scale}")
    with _user_errors():
        arr = read_image(image)
        seg = UNetSegmenter(model=model, device=device, scale=scale, threads=threads)
        t0 = time.perf_counter()
        labels = segment_array(seg, arr)
        dt = time.perf_counter() - t0
        path = write_labels(out or default_output(image), labels)
    planes = int(np.prod(arr.shape[:-2])) if arr.ndim > 2 else 1
    n_obj = [int(p.max()) for p in labels.reshape(-1, *labels.shape[-2:])]
    err_console.print(
        f"{image.name}: {planes} plane(s) {arr.shape[-2]}x{arr.shape[-1]}, "
        f"{sum(n_obj)} objects ({seg.model_id}, {seg.device_name}, "
        f"{dt * 1000 / planes:.0f} ms/plane) → {path}",
        markup=False,
        highlight=False,
    )


@app.command()
def train(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path(
        "models/my-model"
    ),
    data: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(
            "--data",
            help="Folder of image/label TIFF pairs (images/ + labels/, or "
            "NAME.tif + NAME_labels.tif). Without it: synthetic data only.",
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

    cfg = TrainConfig(
        steps=steps,
        batch_size=batch_size,
        crop=crop,
        lr=lr,
        seed=seed,
        pool_size=pool,
        synthetic_fraction=synthetic_fraction if data else 1.0,
        max_radius=max_radius,
        threads=threads,
    )
    with _user_errors(), _TrainProgress(steps) as progress:
        model_pt = run_training(cfg, out, user_data=data, init=init, progress=progress)
    with _user_errors():
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


def _check_device(device: str) -> None:
    if device not in ("auto", "cpu", "cuda"):
        _bad_input(f"--device must be auto, cpu or cuda, not {device!r}")


def _bad_input(message: str) -> None:
    err_console.print(f"error: {message}", markup=False, highlight=False)
    raise typer.Exit(EXIT_BAD_INPUT)


# ---------------------------------------------------------------------- bench
@bench_app.command("loop")
def bench_loop_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON only.")] = False,
    frames: Annotated[int, typer.Option(min=1, help="Frames in the base plan.")] = 60,
    exposure_ms: Annotated[float, typer.Option(min=0.1)] = 10.0,
    repeats: Annotated[int, typer.Option(min=1)] = 3,
    config: ConfigOpt = None,
    gui: Annotated[
        bool,
        typer.Option(
            "--gui",
            help="Also time smart runs with the live window attached (offscreen).",
        ),
    ] = False,
) -> None:
    """Plain pymmcore-plus MDA vs smartscope with analysis attached (policies inert).

    Reports the wall-time ratio, frames in the dataset, frames analysed and
    dropped, and frame→decision latency p50/p99. Goal: ratio ≤ 1.05, zero frames
    missing. With --gui, also runs with the live window attached and reports
    gui_wall_s and gui_ratio (window / headless; goal ≤ 1.05).
    """
    from smartscope.bench import bench_loop

    attach = None
    if gui:
        try:
            from smartscope.gui import attach_window
        except ImportError as e:
            _bad_input(f'--gui needs Qt ({e}): pip install "smartscope[gui]"')
        attach = attach_window
    with _user_errors():
        result = bench_loop(
            config=config,
            frames=frames,
            exposure_ms=exposure_ms,
            repeats=repeats,
            attach=attach,
        )
    _emit(result, as_json)


@bench_app.command("segment")
def bench_segment_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON only.")] = False,
    model: ModelOpt = "builtin",
    device: DeviceOpt = "auto",
    repeats: Annotated[int, typer.Option(min=3, help="Timed calls per size.")] = 30,
    threads: Annotated[Optional[int], typer.Option(min=1)] = None,  # noqa: UP045
    scale: Annotated[float, typer.Option(help="Input scale of the model.")] = 1.0,
    config: ConfigOpt = None,
) -> None:
    """Segmentation speed and accuracy: the model vs the rule-based baseline.

    p50/p99 ms/frame at 512² and 2048²; F1@0.5 and mean AP on the synthetic
    validation set and on DemoCamera beads.

    Goals: F1@0.5 ≥ 0.90 (synthetic validation); 512² p50 ≤ 50 ms on CPU;
    2048² p50 ≤ 5 ms on a GPU.
    """
    from smartscope.bench import bench_segment

    _check_device(device)
    with _user_errors():
        result = bench_segment(
            model=model,
            device=device,
            repeats=repeats,
            threads=threads,
            scale=scale,
            config=config,
        )
    _emit(result, as_json)


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
    of its frames. About 3 × SECONDS of wall time.
    """
    from smartscope.bench_livecell import bench_livecell

    def progress(msg: str) -> None:
        if not as_json:
            err_console.print(msg, markup=False, highlight=False)

    with _user_errors():
        result = bench_livecell(
            duration_s=seconds,
            seed=seed,
            acceleration=acceleration,
            slow_interval_s=slow,
            fast_interval_s=fast,
            out_dir=keep,
            progress=progress,
        )
    _emit(result, as_json)


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
    from smartscope.bench_screen import bench_screen

    def progress(msg: str) -> None:
        if not as_json:
            err_console.print(msg, markup=False, highlight=False)

    with _user_errors():
        result = bench_screen(wells=wells, out_dir=keep, progress=progress)
    _emit(result, as_json)


def _emit(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
        return
    table = Table(title=f"bench {result.get('benchmark', '')}", show_header=False)
    for k, v in result.items():
        table.add_row(k, json.dumps(v) if isinstance(v, (dict, list)) else str(v))
    console.print(table)


def main() -> None:
    """Entry point of the ``smartscope`` console script."""
    try:
        app()
    except SmartscopeError as e:  # raised outside a guarded block
        err_console.print(f"error: {e}", markup=False, highlight=False)
        sys.exit(EXIT_BAD_INPUT)


if __name__ == "__main__":  # pragma: no cover
    main()
