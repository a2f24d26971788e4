"""Locate the demos and hardware configs that ship with smartscope.

In a source checkout (or an editable install) they are the top-level ``demos/``
and ``hardware_configs/`` folders; a wheel carries copies in ``smartscope/_data``.
"""

from __future__ import annotations

from pathlib import Path

_PKG = Path(__file__).resolve().parent


def _data_dir(name: str) -> Path:
    for candidate in (_PKG.parent / name, _PKG / "_data" / name):
        if candidate.is_dir():
            return candidate
    return _PKG.parent / name  # pragma: no cover - broken install


def demos_dir() -> Path:
    """Folder holding the demo experiment files."""
    return _data_dir("demos")


def hardware_configs_dir() -> Path:
    """Folder holding the bundled Micro-Manager configuration files."""
    return _data_dir("hardware_configs")


def default_config() -> Path:
    """The demo microscope: ``hardware_configs/demo.cfg``."""
    return hardware_configs_dir() / "demo.cfg"
