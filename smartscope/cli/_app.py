"""The ``smartscope`` Typer app, its shared options, consoles and exit codes."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from smartscope import __version__
from smartscope._errors import SmartscopeError

if TYPE_CHECKING:
    pass

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

#: exit codes of `smartscope run` / `resume` / `demo` (and `validate`: 0 or 2)
EXIT_FAILED = 1  # the run failed (a device fault, ...): run.json says why
EXIT_BAD_INPUT = 2  # nothing ran: bad experiment, config, plan or output path
EXIT_COMPLETED_WITH_ERRORS = 3  # the plan ran, but a policy/segmenter failed
EXIT_INTERRUPTED = 130  # Ctrl-C or SIGTERM


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


class user_errors:
    """Turn bad input into one ``error:`` line and exit code 2.

    Bad input is a `SmartscopeError`, or an `OSError` on a file the user
    named (an output folder that cannot be created, a read-only path).
    """

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        message = user_error_message(exc) if exc is not None else None
        if message is None:
            return
        err_console.print(f"error: {message}", markup=False, highlight=False)
        raise typer.Exit(EXIT_BAD_INPUT)


def user_error_message(exc: BaseException) -> str | None:
    """The one-line message of a user error, None for anything else (a bug)."""
    if isinstance(exc, SmartscopeError):
        return str(exc)
    if isinstance(exc, OSError) and exc.filename is not None:
        path = Path(exc.filename)
        if isinstance(exc, (FileExistsError, NotADirectoryError)):
            # mkdir under a file says "File exists": name the file instead
            for part in (path, *path.parents):
                if part.is_file():
                    return f"{path}: {part} is a file, not a folder"
        return f"{path}: {exc.strerror or exc}"
    return None


def check_device(device: str) -> None:
    if device not in ("auto", "cpu", "cuda"):
        bad_input(f"--device must be auto, cpu or cuda, not {device!r}")


def check_model_options(scale: float, reread: float | None, views: int = 1) -> None:
    """``--scale``, ``--reread`` and ``--views`` of the commands that run models."""
    if not 0.05 < scale <= 4:
        bad_input(f"--scale must be in (0.05, 4], not {scale}")
    if reread is not None and not reread > 1:
        bad_input(f"--reread must be more than 1 (x the median area), not {reread}")
    if views not in (1, 8):
        bad_input(f"--views must be 1 or 8, not {views}")


def bad_input(message: str) -> None:
    err_console.print(f"error: {message}", markup=False, highlight=False)
    raise typer.Exit(EXIT_BAD_INPUT)


# ---------------------------------------------------------------------- bench
def emit(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
        return
    table = Table(title=f"bench {result.get('benchmark', '')}", show_header=False)
    for k, v in result.items():
        table.add_row(k, json.dumps(v) if isinstance(v, (dict, list)) else str(v))
    console.print(table)
