"""`Experiment`: one YAML file = hardware config, base plan, segmenter, policies."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from useq import MDASequence

from smartscope._errors import ExperimentError, SmartscopeError
from smartscope.rundir import Compression

__all__ = [
    "AnalysisSettings",
    "Experiment",
    "OutputSettings",
    "PolicySpec",
    "SchedulerSettings",
    "SegmenterSpec",
    "format_validation_error",
]


class _Named(BaseModel):
    """``{name: ..., <params>}``: a registered component and its parameters."""

    model_config = ConfigDict(frozen=True, extra="allow")

    name: str

    @property
    def params(self) -> dict[str, Any]:
        """Everything but ``name``."""
        return dict(self.model_extra or {})


class SegmenterSpec(_Named):
    """Which segmenter and its parameters, e.g. ``{name: threshold, sigma_px: 1}``."""

    name: str = "threshold"

    @model_validator(mode="after")
    def _check(self) -> SegmenterSpec:
        from smartscope.segment import create_segmenter

        _build(create_segmenter, self.name, self.params)
        return self

    def build(self) -> Any:
        """Instantiate the segmenter."""
        from smartscope.segment import create_segmenter

        return create_segmenter(self.name, self.params)


class PolicySpec(_Named):
    """A policy and its parameters, e.g. ``{name: skip_empty, min_objects: 1}``."""

    @model_validator(mode="after")
    def _check(self) -> PolicySpec:
        from smartscope.policies import create_policy

        _build(create_policy, self.name, self.params)
        return self

    def build(self) -> Any:
        """Instantiate a fresh policy (policies keep per-run state)."""
        from smartscope.policies import create_policy

        return create_policy(self.name, self.params)


def _build(factory: Any, name: str, params: dict[str, Any]) -> Any:
    try:
        return factory(name, params)
    except SmartscopeError as e:
        raise ValueError(str(e)) from None
    except ValidationError as e:
        raise ValueError(f"{name}: {format_validation_error(e)}") from None
    except TypeError as e:
        raise ValueError(f"{name}: {e}") from None


class AnalysisSettings(BaseModel):
    """How frames are analysed during the run."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = True
    analyze: Literal["all", "base"] = Field(
        "all",
        description="Frames to analyse: every frame, or only base-plan frames "
        "(survey tiles) so targeted acquisitions do not compete for the model.",
    )
    queue_size: int = Field(
        16,
        ge=1,
        description="Frames waiting for analysis beyond which the oldest frame no "
        "policy needs is skipped ('overflow').",
    )
    batch_size: int = Field(4, ge=1, description="Largest micro-batch.")
    max_frame_age_ms: float | None = Field(
        100.0,
        gt=0,
        description="Frames no policy needs (burst and follow frames; every frame "
        "when no policy asks for it) that are older than this when the model is "
        "free, with a newer frame waiting, are skipped ('stale'): decisions are "
        "made on fresh frames. None: only superseded frames are skipped. Frames "
        "a policy needs are never skipped.",
    )
    num_threads: int | None = Field(
        None,
        ge=1,
        description="Threads for torch segmenters (default: the cores acquisition "
        "and writing leave: 1 on up to 3 cores, cores - 2 above).",
    )
    worker: Literal["auto", "process", "thread"] = Field(
        "auto",
        description="Where the segmenter runs: in a child process (frames through "
        "shared memory; acquisition keeps its GIL and cores), or on the analysis "
        "thread. auto: a process for every segmenter but the rule-based threshold.",
    )
    nice: int = Field(
        10,
        ge=0,
        le=19,
        description="How much lower the analysis' OS priority (its process or "
        "thread) is than acquisition's (Linux nice; 0: the same).",
    )


class SchedulerSettings(BaseModel):
    """How the Scheduler orders events under time pressure (see `Scheduler`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    travel_order: Literal["plan", "nearest"] = Field(
        "plan",
        description="Order of base visits due at the same time: the plan's, or the "
        "nearest to the stage first.",
    )
    max_delay_s: float = Field(
        1.0,
        ge=0,
        description="Longest wait of a due base visit behind added events (s).",
    )
    deadline_fraction: float = Field(
        0.5,
        ge=0,
        description="Lateness, as a fraction of a position's interval, that "
        "counts as a missed timepoint deadline.",
    )
    max_analysis_lag: int | None = Field(
        None,
        ge=0,
        description="Start a base field only while at most this many frames are "
        "still being analysed (0: quotas and empty-well skips take effect at the "
        "very next field; acquisition then waits for analysis between fields). "
        "None: never wait.",
    )
    dose_budget_ms: float | None = Field(
        None,
        gt=0,
        description="Light-dose budget per base position: exposure ms (at relative "
        "intensity 1) of base frames plus every event its frames trigger. Actions "
        "that would exceed it are refused, with the reason in decisions.jsonl.",
    )


class OutputSettings(BaseModel):
    """Where the run is written."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    directory: str | None = Field(
        None,
        description="Run directory (relative to the working directory). Default: "
        "runs/<name>-<timestamp>.",
    )
    overwrite: bool = False
    compression: Compression = Field(
        "blosc-zstd",
        description="Lossless compression of the image and label chunks (labels "
        "shrink about 100x, camera images 2-4x); none: raw chunks.",
    )


WELL_ORDERS = ("serpentine", "row_major")


def _order_wells(sequence: Any) -> Any:
    """Resolve ``stage_positions.well_order`` of a plate plan into `selected_wells`.

    ``well_order: serpentine`` images the selected wells (all of the plate when
    `selected_wells` is left out) row by row, every other row backwards, so the
    stage never crosses the plate back; ``row_major`` row by row, left to right.
    useq keeps the order of `selected_wells`, so the order is written there.
    """
    positions = sequence.get("stage_positions") if isinstance(sequence, dict) else None
    if not isinstance(positions, dict) or "well_order" not in positions:
        return sequence
    import useq

    positions = dict(positions)
    order = positions.pop("well_order")
    if order not in WELL_ORDERS:
        raise ValueError(
            f"stage_positions.well_order must be one of {', '.join(WELL_ORDERS)}: "
            f"{order!r}"
        )
    plan = useq.WellPlatePlan.model_validate(positions)
    wells = [(int(r), int(c)) for r, c in plan.selected_well_indices]
    rank = {r: k for k, r in enumerate(sorted({r for r, _ in wells}))}
    if order == "serpentine":  # every other selected row backwards
        wells.sort(key=lambda rc: (rc[0], -rc[1] if rank[rc[0]] % 2 else rc[1]))
    else:
        wells.sort()
    positions["selected_wells"] = [[r for r, _ in wells], [c for _, c in wells]]
    return {**sequence, "stage_positions": positions}


class Experiment(BaseModel):
    """One experiment: hardware config, base plan, segmenter, policies, output.

    Load with `Experiment.from_file`; relative paths in the file (the hardware
    config) are resolved against the file's folder, then against the bundled
    ``hardware_configs/``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = "experiment"
    description: str = ""
    config: str | None = Field(
        None,
        description="Micro-Manager .cfg; default: hardware_configs/demo.cfg.",
    )
    properties: list[tuple[str, str, str]] = Field(
        default_factory=list,
        description="Extra (device, property, value) settings applied after loading.",
    )
    channel_group: str = "Channel"
    sequence: MDASequence
    segmenter: SegmenterSpec = SegmenterSpec()
    policies: list[PolicySpec] = Field(default_factory=list)
    analysis: AnalysisSettings = AnalysisSettings()
    scheduler: SchedulerSettings = SchedulerSettings()
    output: OutputSettings = OutputSettings()
    seed: int = 0
    source: Path | None = Field(None, exclude=True)

    @field_validator("sequence", mode="before")
    @classmethod
    def _check_grid(cls, value: Any) -> Any:
        value = _order_wells(value)
        grid = value.get("grid_plan") if isinstance(value, dict) else None
        if isinstance(grid, dict) and ({"rows", "columns"} & set(grid)):
            for key in ("rows", "columns"):
                if not isinstance(grid.get(key), int) or grid[key] < 1:
                    raise ValueError(
                        f"grid_plan.{key} must be an integer ≥ 1 (empty grid)"
                    )
        return value

    @field_validator("sequence")
    @classmethod
    def _check_sequence(cls, seq: MDASequence) -> MDASequence:
        if any(p.sequence is not None for p in seq.stage_positions):
            raise ValueError("per-position sub-sequences are not supported")
        if next(iter(seq), None) is None:
            raise ValueError("the base sequence has no events")
        return seq

    # ------------------------------------------------------------------ files
    @classmethod
    def from_file(cls, path: str | Path) -> Experiment:
        """Read an experiment YAML file.

        Raises
        ------
        ExperimentError
            One line naming the file and the problem: missing file, invalid
            YAML, unknown segmenter or policy, impossible values.
        """
        path = Path(path)
        if not path.is_file():
            raise ExperimentError(f"experiment file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" (line {mark.line + 1})" if mark is not None else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ExperimentError(f"{path}: invalid YAML{where}: {problem}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ExperimentError(f"cannot read {path}: {e}") from None
        if not isinstance(data, dict):
            raise ExperimentError(f"{path}: expected a mapping of experiment fields")
        try:
            return cls.model_validate({**data, "source": path.resolve()})
        except ValidationError as e:
            raise ExperimentError(f"{path}: {format_validation_error(e)}") from None

    def to_yaml(self) -> str:
        """The resolved experiment as YAML (written next to the data)."""
        data = self.model_dump(mode="json", exclude_unset=False)
        data["sequence"] = self.sequence.model_dump(mode="json", exclude_unset=True)
        return yaml.safe_dump(data, sort_keys=False)

    def fast_interval_s(self) -> float:
        """The experiment's fast imaging interval (run seconds).

        Its `event_burst`'s ``interval_s``, else the base plan's interval (1 s
        without one): what a simulated live specimen's division capture is
        scored against.
        """
        for spec in self.policies:
            if spec.name == "event_burst":
                return float(spec.params.get("interval_s", 1.0))
        interval = getattr(self.sequence.time_plan, "interval", None)
        seconds = getattr(interval, "total_seconds", None)
        return float(seconds()) if seconds else 1.0

    def config_path(self, override: str | Path | None = None) -> Path:
        """The hardware config to load (`override` wins), resolved to a file."""
        from smartscope.microscope import resolve_config

        config = override if override is not None else self.config
        base = self.source.parent if self.source else None
        return resolve_config(config, relative_to=base)


def format_validation_error(error: ValidationError) -> str:
    """One line per pydantic error, joined with '; ' (first three)."""
    parts = []
    for err in error.errors()[:3]:
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function"))
        msg = str(err["msg"]).removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    more = len(error.errors()) - 3
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")
