"""The ``smartscope`` command line.

Commands: ``run``, ``resume``, ``demo``, ``validate`` (`smartscope.cli._run`);
``report``, ``reanalyze``, ``gui``, ``segment``, ``train``
(`smartscope.cli._tools`); ``bench loop | segment | livecell | screen``
(`smartscope.cli._bench`). Bad input is one ``error:`` line and exit code 2; a
failed run exits 1, an interrupted one 130.
"""

from __future__ import annotations

import sys
from typing import Any

from smartscope.cli import _bench, _run, _tools  # noqa: F401  (register commands)
from smartscope.cli._app import EXIT_BAD_INPUT, app, err_console, user_error_message

__all__ = ["app", "main"]


def main() -> None:
    """Entry point of the ``smartscope`` console script.

    Usage errors (an unknown option, a value out of range, a missing
    argument) are one ``error:`` line too, naming the command's ``--help``.
    """
    import typer

    # click's base exception: typer >= 0.20 vendors click, older typer uses it
    click_exception: type[Exception] = next(
        c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException"
    )
    try:
        code = app(prog_name="smartscope", standalone_mode=False)
    except click_exception as e:
        usage: Any = e
        ctx = getattr(usage, "ctx", None)
        where = ctx.command_path if ctx is not None else "smartscope"
        message = " ".join(usage.format_message().split())
        if message:  # (empty: a group called without its command printed help)
            err_console.print(
                f"error: {message} (see {where} --help)", markup=False, highlight=False
            )
        sys.exit(usage.exit_code)
    except typer.Abort:  # end of input at a prompt
        sys.exit(1)
    except Exception as e:  # a user error raised outside a guarded block
        error = user_error_message(e)
        if error is None:
            raise
        err_console.print(f"error: {error}", markup=False, highlight=False)
        sys.exit(EXIT_BAD_INPUT)
    sys.exit(code if isinstance(code, int) else 0)
