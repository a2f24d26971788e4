"""Virtual specimens with ground truth, seen through the real Micro-Manager path.

`LiveSpecimen` is a pure-numpy simulation of dividing, migrating, light-sensitive
cells; `LiveCellCamera` is the unicore Python camera device that images it (declared
in ``hardware_configs/livecells.cfg``), and `live_cell_camera` finds that device in a
loaded core. The camera module (which imports pymmcore-plus) loads on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from smartscope.sim.specimen import LiveSpecimen

if TYPE_CHECKING:
    from smartscope.sim.camera import LiveCellCamera, live_cell_camera

__all__ = ["LiveCellCamera", "LiveSpecimen", "live_cell_camera"]


def __getattr__(name: str) -> Any:
    if name in {"LiveCellCamera", "live_cell_camera"}:
        from smartscope.sim import camera

        return getattr(camera, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
