"""The ``smartscope`` command line.

Commands: ``run``, ``resume``, ``demo``, ``validate`` (`smartscope.cli._run`);
``report``, ``reanalyze``, ``gui``, ``segment``, ``train``
(`smartscope.cli._tools`); ``bench loop | segment | livecell | screen``
(`smartscope.cli._bench`). Bad input is one ``error:`` line and exit code 2; a
failed run exits 1, an interrupted one 130.
"""

from __future__ import annotations

import sys

from smartscope._errors import SmartscopeError
from smartscope.cli import _bench, _run, _tools  # noqa: F401  (register commands)
from smartscope.cli._app import EXIT_BAD_INPUT, app, err_console

__all__ = ["app", "main"]


def main() -> None:
    """Entry point of the ``smartscope`` console script."""
    try:
        app()
    except SmartscopeError as e:  # raised outside a guarded block
        err_console.print(f"error: {e}", markup=False, highlight=False)
        sys.exit(EXIT_BAD_INPUT)
