"""Objects named by import path (``package.module:Name``), for the registries."""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import EntryPoint
from typing import Any

from smartscope._errors import RegistryError, SmartscopeError, first_line

__all__ = ["build_component", "import_path", "load_entry_point"]


def import_path(path: str, what: str) -> Any:
    """The object at ``package.module:Name`` (``Name`` may be dotted).

    Raises
    ------
    RegistryError
        If the module does not import or has no such name; `what` says what
        was being looked up (``"policy 'x'"``).
    """
    module, _, attr = path.partition(":")
    try:
        obj: Any = import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise RegistryError(f"{what}: cannot import {path!r} ({e})") from e
    except Exception as e:  # the module's own code failed (SyntaxError, ...)
        raise RegistryError(
            f"{what}: cannot import {path!r}: {type(e).__name__}: {first_line(e)}"
        ) from e
    return obj


def load_entry_point(ep: EntryPoint, what: str) -> Any:
    """What entry point `ep` names; a plugin that fails to import is one line.

    A third-party plugin may raise anything while it imports (a missing
    dependency, a syntax error, a licence check); it becomes a
    `RegistryError` naming the plugin's distribution and entry point.
    """
    try:
        return ep.load()
    except Exception as e:
        dist = f" (from {ep.dist.name})" if ep.dist is not None else ""
        raise RegistryError(
            f"{what}{dist}: cannot import {ep.value!r}: "
            f"{type(e).__name__}: {first_line(e)}"
        ) from e


def build_component(factory: Any, params: dict[str, Any] | None, what: str) -> Any:
    """``factory(**params)``; a plugin's unexpected failure is one line.

    Invalid parameters (pydantic's `ValidationError`, a `TypeError` for an
    unknown keyword, any `ValueError`) and smartscope's own errors pass
    through for the caller to word; any other exception from the plugin's
    code becomes a `RegistryError` naming it.
    """
    try:
        return factory(**(params or {}))
    except (SmartscopeError, ValueError, TypeError):
        raise
    except Exception as e:
        raise RegistryError(
            f"{what} failed to start: {type(e).__name__}: {first_line(e)}"
        ) from e
