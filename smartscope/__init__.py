"""smartscope: acquisition-coupled smart microscopy on Micro-Manager.

Frames acquired by a pymmcore-plus core stream, without blocking acquisition, to a
segmentation model; its detections feed policies; a scheduler turns their
decisions into the next `useq.MDAEvent`s of the same running acquisition.

``import smartscope`` stays light: torch and Qt are imported only where used, and
the heavier public names below are loaded on first access.

This module is the one documented place for the extension points:

- a policy implements `PPolicy` (or subclasses `PolicyBase`): it receives a
  `Frame`, its `Detections` and the `PolicyContext`, and returns actions
  (`AddEvents`, `SkipPosition`, `SkipWell`, `SetInterval`, `MovePosition`,
  `SetFocus`, `Stop`);
- a segmenter implements `PSegmenter`: an image batch in, a `Segmentation`
  (instance labels and optional scores) out.

Register either through an entry point (``smartscope.policies`` /
``smartscope.segmenters``) or name a policy by import path
(``mypackage.policies:MyPolicy``) in the experiment file.
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
    from smartscope.frame import Frame
    from smartscope.microscope import Microscope
    from smartscope.policies import PolicyBase, PolicyContext, PPolicy
    from smartscope.runner import Runner, RunSummary, run_experiment
    from smartscope.scheduler import (
        Action,
        AddEvents,
        MovePosition,
        SetFocus,
        SetInterval,
        SkipPosition,
        SkipWell,
        Stop,
    )
    from smartscope.segment import PSegmenter, Segmentation

_ACTIONS = (
    "Action",
    "AddEvents",
    "MovePosition",
    "SetFocus",
    "SetInterval",
    "SkipPosition",
    "SkipWell",
    "Stop",
)
_LAZY = {
    "Detections": "smartscope.detections",
    "Experiment": "smartscope.experiment",
    "Frame": "smartscope.frame",
    "Microscope": "smartscope.microscope",
    "PPolicy": "smartscope.policies",
    "PSegmenter": "smartscope.segment",
    "PolicyBase": "smartscope.policies",
    "PolicyContext": "smartscope.policies",
    "RunSummary": "smartscope.runner",
    "Runner": "smartscope.runner",
    "Segmentation": "smartscope.segment",
    "run_experiment": "smartscope.runner",
    **dict.fromkeys(_ACTIONS, "smartscope.scheduler"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'smartscope' has no attribute {name!r}")


__all__ = [
    "Action",
    "AddEvents",
    "ConfigError",
    "Detections",
    "Experiment",
    "ExperimentError",
    "Frame",
    "Microscope",
    "MovePosition",
    "PPolicy",
    "PSegmenter",
    "PolicyBase",
    "PolicyContext",
    "RegistryError",
    "RunSummary",
    "Runner",
    "Segmentation",
    "SetFocus",
    "SetInterval",
    "SkipPosition",
    "SkipWell",
    "SmartscopeError",
    "Stop",
    "__version__",
    "run_experiment",
]
