"""The run directory: its records, the writer, the one reader, resume planning.

`RunStorage` writes a run (per-position OME-Zarr arrays off the acquisition
thread, JSON-lines logs, ``run.json``); `load_run` reads one back for every
tool; `inspect_run` and `prepare_directory` plan and prepare a resume.
"""

from smartscope.rundir._layout import (
    HIERARCHY,
    LABELS_NAME,
    Hierarchy,
    PlateGeometry,
    array_names,
    position_path,
)
from smartscope.rundir._records import (
    JsonLines,
    NotARunError,
    RunRecords,
    dumps,
    is_primary,
    load_run,
    read_jsonl,
)
from smartscope.rundir._resume import (
    ResumeError,
    RunState,
    counts_from_logs,
    event_location,
    inspect_run,
    prepare_directory,
    replay_frames,
)
from smartscope.rundir._writer import (
    COMPRESSIONS,
    Compression,
    PositionArrays,
    RunStorage,
    channel_color,
    open_position,
    position_attrs,
    read_position,
    warm_up_writer,
)

__all__ = [
    "COMPRESSIONS",
    "HIERARCHY",
    "LABELS_NAME",
    "Compression",
    "Hierarchy",
    "JsonLines",
    "NotARunError",
    "PlateGeometry",
    "PositionArrays",
    "ResumeError",
    "RunRecords",
    "RunState",
    "RunStorage",
    "array_names",
    "channel_color",
    "counts_from_logs",
    "dumps",
    "event_location",
    "inspect_run",
    "is_primary",
    "load_run",
    "open_position",
    "position_attrs",
    "position_path",
    "prepare_directory",
    "read_jsonl",
    "read_position",
    "replay_frames",
    "warm_up_writer",
]
