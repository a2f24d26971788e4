"""Commands that run experiments: run, resume, demo, validate; the live display."""

from __future__ import annotations

import contextlib
import logging
import re
import signal
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from smartscope.cli._app import (
    EXIT_COMPLETED_WITH_ERRORS,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    ConfigOpt,
    ExperimentArg,
    OutOpt,
    OverwriteOpt,
    app,
    console,
    err_console,
    user_errors,
)

if TYPE_CHECKING:
    from smartscope.runner import Runner, RunSummary


@app.command()
def run(
    experiment: ExperimentArg,
    config: ConfigOpt = None,
    out: OutOpt = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Run an experiment: acquire, analyse, decide, and write the dataset.

    Writes run.ome.zarr (one OME-Zarr hierarchy: every position's image at
    its stage position with its labels; plates as an NGFF plate), frames.jsonl,
    detections.jsonl, decisions.jsonl and run.json to the run directory, and
    prints a summary.
    On a simulated live specimen (hardware_configs/livecells.cfg) it also
    writes the ground truth and prints what the run caught (divisions imaged
    fast, light dose, cells harmed, a followed cell's centering).
    Ctrl-C (or SIGTERM) stops after the current event; what was acquired stays
    readable and run.json says "interrupted" (exit code 130).

    Exit codes: 0 completed; 1 failed (a hardware call that kept failing after
    its retries, a write error, a policy or segmenter with on_error: stop):
    every frame so far is on disk, run.json says why, `smartscope resume`
    goes on; 2 bad input, nothing ran (experiment, config, a plan too large
    or outside the safety limits, an output path that is a file, unwritable
    or on a full disk); 3 completed with errors (a policy or the segmenter
    failed on some frames and was disabled or skipped them, as its on_error
    says; run.json lists the errors); 130 interrupted.
    """
    _run_experiment_file(experiment, config=config, out=out, overwrite=overwrite)


@app.command()
def resume(
    run_dir: Annotated[Path, typer.Argument(help="Run directory.", show_default=False)],
    config: ConfigOpt = None,
) -> None:
    """Go on with a run that crashed, was killed or interrupted, in its directory.

    Fields whose frames are all on disk (and analysed) are kept and not imaged
    again; partly imaged ones are moved aside (partial/<key>.partial-N)
    and imaged again; the logs are appended to and run.json records the resume.
    The policies first see the kept frames again, so quotas, focus and hit wells
    carry on. A completed run (with errors or not) is left alone. Exit codes as
    for `run`.
    """
    from smartscope.resume import finish_resume, prepare_resume
    from smartscope.rundir import inspect_run

    with user_errors():
        state = inspect_run(run_dir)
    if state.completed or state.status == "completed_with_errors":
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
    with user_errors():
        runner = prepare_resume(state, config=config)
    try:
        summary = finish_resume(runner, _run_with_display(runner))
    finally:
        runner.close()  # releases the core before exit (avoids an abort)
    _print_summary(summary)
    _exit_for(summary)


def _exit_for(summary: RunSummary) -> None:
    """The exit code (and one stderr line) of a finished run."""
    if summary.status == "interrupted":
        raise typer.Exit(EXIT_INTERRUPTED)
    if summary.status == "failed":
        err_console.print(
            f"error: run failed: {summary.error}", markup=False, highlight=False
        )
        raise typer.Exit(EXIT_FAILED)
    if summary.status == "completed_with_errors":
        err_console.print(
            f"warning: run completed with errors: {summary.reason}",
            markup=False,
            highlight=False,
        )
        raise typer.Exit(EXIT_COMPLETED_WITH_ERRORS)


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

    Loads the config (to check channel presets and property settings), checks
    the base plan's size and every stage position and exposure against the
    safety limits, and releases the config again. Nothing moves.
    """
    from smartscope.experiment import Experiment
    from smartscope.limits import plan_size
    from smartscope.microscope import Microscope
    from smartscope.runner import check_experiment

    with user_errors():
        exp = Experiment.from_file(experiment)
        cfg = exp.config_path(config)
        scope = Microscope(cfg)
        try:
            plan, _ = check_experiment(exp, scope)
        finally:
            scope.close()
    bound = plan_size(plan).events or 0
    n_events = sum(1 for _ in plan) if bound <= 100_000 else f"at most {bound:,}"
    policies = ", ".join(p.name for p in exp.policies) or "none"
    console.print(
        f"[green]ok[/green] {experiment}: {n_events} base events, segmenter "
        f"{exp.segmenter.name}, policies: {policies}, config {cfg}"
    )


def _run_experiment_file(
    path: Path, *, config: Path | None, out: Path | None, overwrite: bool
) -> None:
    from smartscope.experiment import Experiment
    from smartscope.runner import Runner

    with user_errors():
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
        live = next(iter(runner.device_reports.values()), None)
    finally:
        runner.close()  # releases the core before exit (avoids an abort)
    _print_summary(summary)
    if live is not None:
        _print_live_report(live)
    _exit_for(summary)


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
        with user_errors():
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


class _QuietFileHandler(logging.FileHandler):
    """``run.log``: a record that cannot be written (a full disk) is dropped.

    The run itself reports the failure; logging's own traceback would only
    bury that one line on the terminal.
    """

    def handleError(self, record: logging.LogRecord) -> None:
        pass


@contextlib.contextmanager
def _run_log(directory: Path) -> Any:
    """Write ``run.log`` in the run directory while the run goes on.

    The status lines, and WARNING+ records of smartscope and pymmcore-plus.
    """
    directory.mkdir(parents=True, exist_ok=True)
    handler = _QuietFileHandler(directory / "run.log", mode="a", encoding="utf-8")
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
        with contextlib.suppress(OSError):  # a full disk: what is lost is lost
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

        from smartscope.frame import base_position_key, well_of

        plan = runner.plan
        if not isinstance(plan.stage_positions, useq.WellPlatePlan):
            names = [p.name or "" for p in plan.stage_positions]
            if not names or not all(_WELL_FIELD.match(n) for n in names):
                return None
        fields: dict[str, str] = {}
        for event in plan.model_copy(update={"time_plan": None}):
            key = base_position_key(event)
            fields[key] = well_of(key)
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
    if summary.n_errors:
        rows.insert(1, ("errors", f"{summary.n_errors} (run.json: summary.errors)"))
    for k, v in rows:
        table.add_row(k, Text(v))  # plain text: a reason may hold brackets
    console.print(table)
