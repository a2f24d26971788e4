"""`Frame`: one acquired image's identity, place and timestamps."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from useq import MDAEvent

__all__ = ["Frame", "base_position_key", "event_tag", "safe_name", "well_of"]

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def safe_name(name: str) -> str:
    """`name` with every run of characters unsafe in a file name as ``"_"``."""
    return _UNSAFE.sub("_", name).strip("_") or "pos"


def base_position_key(event: MDAEvent) -> str:
    """Stable key of the stage position of a base-plan event.

    ``<pos_name or pNNN>`` plus ``_gNNN`` for a grid tile; the key names the
    position's array in the dataset and is what `SkipPosition` refers to.
    """
    index = event.index
    key = safe_name(event.pos_name) if event.pos_name else f"p{index.get('p', 0):03d}"
    if "g" in index:
        key += f"_g{index['g']:03d}"
    return key


def well_of(position: str) -> str:
    """The well of a position key: the part before the first ``"_"``.

    Plate plans name their positions ``<well>_<field>`` (``"B3_0004"``); on
    other plans this is the position's name (grid tiles ``field_g000``,
    ``field_g001`` form the "well" ``field``). Hit and autofocus acquisitions
    keep their well's key as prefix (``hit_B3_002`` is not a well key: use the
    frame's base position).
    """
    return str(position).split("_", 1)[0]


def event_tag(event: MDAEvent) -> dict[str, Any]:
    """The ``smartscope`` block the Scheduler puts in ``MDAEvent.metadata``."""
    tag = event.metadata.get("smartscope")
    return tag if isinstance(tag, dict) else {}


@dataclass
class Frame:
    """An acquired frame as it travels from ``frameReady`` to the policies.

    Times are seconds since the run started (``time.perf_counter`` based):
    `t_acquired` when ``frameReady`` fired, `t_analysed` when its detections were
    ready, `t_decided` when every policy had answered, `t_queued` when the
    resulting events were in the Scheduler's queue. `t_clock` is the acquisition
    time on the Scheduler's clock (the time base of ``min_start_time``), which
    policies use to time the events they add. `pixel_size_um` is the pixel
    size the frame was taken at (it changes with the objective). `sequence`
    numbers the hardware sequence the frame was streamed in (0, 1, ... in the
    run; None for a frame taken event by event); `sequence_end` marks the
    sequence's last frame.
    """

    frame_index: int
    event: MDAEvent = field(repr=False)
    position: str
    kind: str
    stage_x_um: float
    stage_y_um: float
    stage_z_um: float | None
    channel: str | None
    exposure_ms: float | None
    t_acquired: float
    event_id: int = -1
    t_analysed: float | None = None
    t_decided: float | None = None
    t_queued: float | None = None
    dropped: bool = False
    t_clock: float | None = None
    pixel_size_um: float | None = None
    sequence: int | None = None
    sequence_end: bool = False

    @property
    def stage_xy_um(self) -> tuple[float, float]:
        """XY stage position at acquisition, µm."""
        return (self.stage_x_um, self.stage_y_um)

    def to_json(self) -> dict[str, Any]:
        """JSON-ready summary (no image data); ``event`` is the whole `MDAEvent`.

        `Frame.from_json` rebuilds the frame from it (``smartscope resume``
        replays the analysed frames of a killed run into its policies).
        """
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "event"}
        d["index"] = {str(k): int(v) for k, v in self.event.index.items()}
        tag = event_tag(self.event)
        for key in ("decision_id", "trigger_frame"):
            if key in tag:
                d[key] = tag[key]
        d["event"] = self.event.model_dump(mode="json", exclude_defaults=True)
        return d

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> Frame:
        """The frame of a ``frames.jsonl`` line written by `to_json`.

        Raises
        ------
        ValueError
            If the line has no ``event`` (written before smartscope logged it)
            or a field is missing.
        """
        from useq import MDAEvent

        if not isinstance(record.get("event"), dict):
            raise ValueError("the frame record has no event")
        names = {f.name for f in fields(cls)} - {"event"}
        return cls(
            event=MDAEvent.model_validate(record["event"]),
            **{k: v for k, v in record.items() if k in names},
        )
