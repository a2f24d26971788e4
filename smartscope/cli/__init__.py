"""The ``smartscope`` command line.

Commands: ``run``, ``resume``, ``demo``, ``validate`` (`smartscope.cli._run`);
``report``, ``reanalyze``, ``gui``, ``segment``, ``train``
(`smartscope.cli._tools`); ``bench loop | segment | livecell | screen``
(`smartscope.cli._bench`). Bad input is one ``error:`` line and exit code 2; a
failed run exits 1, an interrupted one 130.
"""

from __future__ import annotations

import sys

from smartscope.cli import _bench, _run, _tools  # noqa: F401  (register commands)
from smartscope.cli._app import EXIT_BAD_INPUT, app, err_console, user_error_message

__all__ = ["app", "main"]


def main() -> None:
    """Entry point of the ``smartscope`` console script."""
    try:
        app()
    except Exception as e:  # a user error raised outside a guarded block
        message = user_error_message(e)
        if message is None:
            raise
        err_console.print(f"error: {message}", markup=False, highlight=False)
        sys.exit(EXIT_BAD_INPUT)
