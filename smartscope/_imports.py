"""Objects named by import path (``package.module:Name``), for the registries."""

from __future__ import annotations

from importlib import import_module
from typing import Any

from smartscope._errors import RegistryError

__all__ = ["import_path"]


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
    return obj
