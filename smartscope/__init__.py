"""smartscope: acquisition-coupled smart microscopy on Micro-Manager.

Frames acquired by a pymmcore-plus core stream, without blocking acquisition, to a
segmentation model; its detections feed policies; a scheduler turns their
decisions into the next `useq.MDAEvent`s of the same running acquisition.

``import smartscope`` stays light: torch and Qt are imported only where used, and
the heavier public names below are loaded on first access.
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("smartscope")
except PackageNotFoundError:  # pragma: no cover
    __version__ = "uninstalled"

from smartscope._errors import (
    ConfigError,
    ExperimentError,
    RegistryError,
    SmartscopeError,
)

if TYPE_CHECKING:
    from smartscope.detections import Detections
    from smartscope.experiment import Experiment
    from smartscope.microscope import Microscope
    from smartscope.runner import Runner, RunSummary, run_experiment

_LAZY = {
    "Detections": "smartscope.detections",
    "Experiment": "smartscope.experiment",
    "Microscope": "smartscope.microscope",
    "RunSummary": "smartscope.runner",
    "Runner": "smartscope.runner",
    "run_experiment": "smartscope.runner",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'smartscope' has no attribute {name!r}")


__all__ = [
    "ConfigError",
    "Detections",
    "Experiment",
    "ExperimentError",
    "Microscope",
    "RegistryError",
    "RunSummary",
    "Runner",
    "SmartscopeError",
    "__version__",
    "run_experiment",
]
