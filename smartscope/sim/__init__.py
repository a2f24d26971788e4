"""Virtual specimens with ground truth, seen through the real Micro-Manager path.

`LiveSpecimen` is a pure-numpy simulation of dividing, migrating, light-sensitive
cells; `LiveCellCamera` is the unicore Python camera device that images it (declared
in ``hardware_configs/livecells.cfg``), and `live_cell_camera` finds that device in a
loaded core. `PlateSpecimen` is a fixed-cell multi-well plate for screening (empty
wells, hit wells, per-well focus), imaged by `PlateCamera`
(``hardware_configs/plate.cfg``; `plate_camera` finds it). `smartscope.sim.evaluate`
scores runs against the ground truth. The camera modules (which import
pymmcore-plus) load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from smartscope.sim.plate import PlateSpecimen
from smartscope.sim.specimen import LiveSpecimen

if TYPE_CHECKING:
    from smartscope.sim.camera import LiveCellCamera, live_cell_camera
    from smartscope.sim.plate_device import PlateCamera, plate_camera

__all__ = [
    "LiveCellCamera",
    "LiveSpecimen",
    "PlateCamera",
    "PlateSpecimen",
    "live_cell_camera",
    "plate_camera",
]


def __getattr__(name: str) -> Any:
    if name in {"LiveCellCamera", "live_cell_camera"}:
        from smartscope.sim import camera

        return getattr(camera, name)
    if name in {"PlateCamera", "plate_camera"}:
        from smartscope.sim import plate_device

        return getattr(plate_device, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
