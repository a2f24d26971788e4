"""`Experiment`: one YAML file = hardware config, base plan, segmenter, policies."""

from __future__ import annotations

import difflib
import math
import types
import typing
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
from smartscope.limits import PlanError, check_finite_positions, check_plan_size
from smartscope.rundir import Compression

__all__ = [
    "AnalysisSettings",
    "Experiment",
    "HardwareSettings",
    "LimitsSettings",
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

    @classmethod
    def checked(cls, spec: dict[str, Any]) -> SegmenterSpec:
        """Validate `spec` up front: `ExperimentError` in one line if it is bad.

        An unknown name, a bad parameter or ``device: cuda`` on a machine
        without CUDA stops a benchmark before it loads the microscope.
        """
        try:
            return cls.model_validate(spec)
        except ValidationError as e:
            raise ExperimentError(f"segmenter: {format_validation_error(e)}") from None


class PolicySpec(_Named):
    """A policy and its parameters, e.g. ``{name: skip_empty, min_objects: 1}``.

    ``on_error`` says what a fault of the policy (an exception from one of its
    methods) does to the run: ``disable`` (default) stops asking the policy,
    ``skip`` drops only the frame it failed on, ``stop`` ends the run
    (``failed``). Either way the fault is logged with its frame.
    """

    on_error: Literal["disable", "skip", "stop"] = "disable"

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
    sequence_frames: Literal["last", "newest"] = Field(
        "last",
        description="Which frames of a hardware sequence that no policy needs (a "
        "stream's, a plain time-lapse's) are analysed: 'last', only its last frame "
        "(the others are stored and skipped as 'sequence': a decision takes effect "
        "only between sequences, and every analysis during one takes CPU from the "
        "camera's streaming); 'newest', as many of the newest as the model keeps "
        "up with.",
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
    on_error: Literal["skip", "stop"] = Field(
        "skip",
        description="What a segmenter fault (an exception, labels of the wrong "
        "shape) does: skip the frames it failed on (logged, the run goes on and "
        "ends completed_with_errors) or stop the run (failed).",
    )
    segment_timeout_s: float | None = Field(
        120.0,
        gt=0,
        description="Longest wait for one segmenter call in its child process "
        "(worker: process). A segmenter that does not answer in time (a hung "
        "plugin or driver) is stopped, and it and every later call are "
        "segmenter faults (on_error): the run goes on without analysis, or "
        "stops. None: wait as long as it takes.",
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
        description="Longest wait of a due base visit behind added events (s); "
        "events of priority 100 or more (a focus search) still go first.",
    )
    travel_slack_s: float = Field(
        0.2,
        ge=0,
        description="With travel_order nearest: how far past its due time (s) an "
        "added event (a burst frame, a target) may fall while nearer ones of the "
        "same priority go first; beyond it the longest-overdue goes first.",
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
    sequence: Literal["auto", "off"] = Field(
        "auto",
        description="Hardware sequencing: runs of frames at one place with one "
        "setting and no wait between them (an interval-0 time-lapse, a stream) "
        "are acquired as one camera sequence, decisions are served between "
        "sequences (auto); off: every frame on its own.",
    )
    max_sequence_frames: int = Field(
        100,
        ge=2,
        description="Longest hardware sequence (frames; also bounded by the "
        "camera's sequence buffer): pauses and decisions on the plan wait at "
        "most this long (a decision one sequence more, see choose_ahead).",
    )
    choose_ahead: bool = Field(
        True,
        description="Choose the event after a hardware sequence while the camera "
        "takes the sequence's last frame, so the camera stands still for less "
        "time between sequences, or not at all where the next sequence continues "
        "this one (one camera run for the frames planned there); a decision that "
        "arrives during that last frame then waits one more sequence. false: "
        "choose only after the last frame, and restart the camera for each "
        "sequence.",
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
    min_free_mb: float = Field(
        100.0,
        ge=0,
        description="Free space (MiB) the run directory's disk must have before "
        "a run starts.",
    )


class HardwareSettings(BaseModel):
    """How hardware calls of a run are retried (see `smartscope.engine`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    retries: int = Field(
        2,
        ge=0,
        le=20,
        description="Further tries of a failing hardware call (snap, stage, "
        "focus, channel, property, shutter) before the run fails.",
    )
    retry_backoff_s: float = Field(
        0.1,
        ge=0,
        le=60,
        description="Wait before the first retry (s); doubled before each further one.",
    )


def _finite_range(value: Any) -> Any:
    if value is None:
        return value
    lo, hi = value
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"limits must be finite numbers: {[lo, hi]}")
    if lo >= hi:
        raise ValueError(f"the minimum must be below the maximum: {[lo, hi]}")
    return value


class LimitsSettings(BaseModel):
    """Safety limits: the stage box (µm) and the longest exposure (ms).

    A limit left out comes from the hardware config where its adapters
    expose one, else from the default (±100 mm in X and Y, ±10 mm in Z, 10 s
    exposure). Base-plan positions outside them are an error before anything
    moves; actions outside them are refused.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    x_um: tuple[float, float] | None = None
    y_um: tuple[float, float] | None = None
    z_um: tuple[float, float] | None = None
    max_exposure_ms: float | None = Field(None, gt=0)

    _check_range = field_validator("x_um", "y_um", "z_um")(_finite_range)

    @field_validator("max_exposure_ms")
    @classmethod
    def _check_exposure(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("max_exposure_ms must be a finite number")
        return value


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
    hardware: HardwareSettings = HardwareSettings()
    limits: LimitsSettings = LimitsSettings()
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
        try:  # before anything iterates (or allocates) the plan
            check_plan_size(seq)
            check_finite_positions(seq)
        except PlanError as e:
            raise ValueError(str(e)) from None
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
            YAML, unknown segmenter or policy, impossible values, a key the
            file should not have (at any depth, useq's ``sequence`` included:
            named with the closest valid key), a plan too large to run.
        """
        path = Path(path)
        if not path.is_file():
            raise ExperimentError(f"experiment file not found: {path}")
        try:
            data = yaml.load(path.read_text(encoding="utf-8"), _StrictLoader)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" (line {mark.line + 1})" if mark is not None else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ExperimentError(f"{path}: invalid YAML{where}: {problem}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ExperimentError(f"cannot read {path}: {e}") from None
        if not isinstance(data, dict):
            raise ExperimentError(f"{path}: expected a mapping of experiment fields")
        data.pop("source", None)  # set here, never by the file
        unknown = _unknown_key(data, cls)
        if unknown:
            raise ExperimentError(f"{path}: {unknown}")
        try:
            exp = cls.model_validate({**data, "source": path.resolve()})
        except ValidationError as e:
            raise ExperimentError(f"{path}: {format_validation_error(e)}") from None
        # useq ignores keys it does not know: check the file against the plan
        unknown = _unknown_key_in(data.get("sequence"), exp.sequence, "sequence")
        if unknown:
            raise ExperimentError(f"{path}: {unknown}")
        return exp

    def to_yaml(self) -> str:
        """The resolved experiment as YAML (written next to the data)."""
        data = self.model_dump(mode="json", exclude_unset=False)
        data["sequence"] = self.sequence.model_dump(mode="json", exclude_unset=True)
        return yaml.safe_dump(data, sort_keys=False)

    def fast_interval_s(self) -> float:
        """The experiment's fast imaging interval (run seconds).

        Its `event_burst`'s ``interval_s``, else the base plan's interval (1 s
        without one, or with an interval of 0): what a simulated live
        specimen's division capture is scored against.
        """
        for spec in self.policies:
            if spec.name == "event_burst":
                return float(spec.params.get("interval_s", 1.0))
        interval = getattr(self.sequence.time_plan, "interval", None)
        seconds = getattr(interval, "total_seconds", None)
        return float(seconds()) if seconds and seconds() > 0 else 1.0

    def config_path(self, override: str | Path | None = None) -> Path:
        """The hardware config to load (`override` wins), resolved to a file."""
        from smartscope.microscope import resolve_config

        config = override if override is not None else self.config
        base = self.source.parent if self.source else None
        return resolve_config(config, relative_to=base)


class _StrictLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses a key given twice in one mapping.

    Plain YAML loading keeps the last of two ``analysis:`` blocks and drops
    the first without a word; an experiment file says which line repeats.
    """

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<: *anchor`: its keys may be overridden
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: SafeLoader says so
                    continue
                if first is not None:
                    raise yaml.constructor.ConstructorError(
                        None,
                        None,
                        f"duplicate key {key!r} (first on line {first + 1})",
                        key_node.start_mark,
                    )
                seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def format_validation_error(error: ValidationError) -> str:
    """One line per pydantic error, joined with '; ' (first three)."""
    parts = []
    for err in error.errors()[:3]:
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function"))
        msg = str(err["msg"]).removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    more = len(error.errors()) - 3
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


# ------------------------------------------------------------- unknown keys
#: keys smartscope reads out of a useq model's mapping before useq sees it
_EXTRA_KEYS = {"stage_positions": {"well_order"}}


def _keys_of(model: type[BaseModel]) -> dict[str, str]:
    """Accepted keys of a pydantic model (names and aliases) -> field name."""
    out: dict[str, str] = {}
    for name, info in model.model_fields.items():
        if info.exclude:
            continue
        out[name] = name
        for alias in (info.alias, info.validation_alias):
            if isinstance(alias, str):
                out[alias] = name
    return out


def _suggest(key: Any, valid: list[str], where: str) -> str:
    """``<where>: Extra inputs are not permitted (did you mean 'x'?)``."""
    loc = f"{where}.{key}" if where else str(key)
    best = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.6)
    if best:
        hint = f"did you mean {best[0]!r}?"
    else:
        hint = "valid keys: " + ", ".join(sorted(valid))
    return f"{loc}: Extra inputs are not permitted (unknown key; {hint})"


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation allows (unwrapping Optional/list)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType, list, tuple):
        return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return []


def _unknown_key(raw: Any, model: type[BaseModel], where: str = "") -> str | None:
    """The first key of `raw` that `model` (or a nested model) does not accept.

    Walks the model classes; fields holding a union of several models, the
    base plan (checked against the validated plan: `_unknown_key_in`) and
    components' parameters (checked against the component's class) are
    handled by name.
    """
    if not isinstance(raw, dict):
        return None
    keys = _keys_of(model)
    for key, value in raw.items():
        if key not in keys:
            return _suggest(key, list(keys), where)
        name = keys[key]
        loc = f"{where}.{name}" if where else name
        if model is Experiment and name == "sequence":
            continue
        if model is Experiment and name == "policies" and isinstance(value, list):
            for k, item in enumerate(value):
                found = _unknown_param(item, PolicySpec, f"{loc}.{k}")
                if found:
                    return found
            continue
        if model is Experiment and name == "segmenter":
            found = _unknown_param(value, SegmenterSpec, loc)
            if found:
                return found
            continue
        models = _models_in(model.model_fields[name].annotation)
        if len(models) != 1:
            continue  # a union of models: left to pydantic
        items = value if isinstance(value, list) else [value]
        for k, item in enumerate(items):
            sub = f"{loc}.{k}" if isinstance(value, list) else loc
            found = _unknown_key(item, models[0], sub)
            if found:
                return found
    return None


def _unknown_param(raw: Any, spec: type[_Named], where: str) -> str | None:
    """An unknown parameter of a policy or segmenter whose class declares them."""
    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
        return None
    try:
        if spec is PolicySpec:
            from smartscope.policies import policy_class

            factory = policy_class(raw["name"])
        else:
            from smartscope.segment import segmenter_factory

            factory = segmenter_factory(raw["name"])
    except Exception:  # an unknown component: validation says so
        return None
    if not (isinstance(factory, type) and issubclass(factory, BaseModel)):
        return None
    if factory.model_config.get("extra") != "forbid":
        return None
    own = set(spec.model_fields)
    params = {k: v for k, v in raw.items() if k not in own}
    keys = _keys_of(factory)
    for key in params:
        if key not in keys:
            return _suggest(key, [*keys, *own], where)
    return _unknown_key(params, factory, where)


def _unknown_key_in(raw: Any, value: Any, where: str) -> str | None:
    """The first key of `raw` that the validated model `value` has no field for.

    For models that ignore unknown keys (useq's): walking the validated value
    follows whichever member of a union was chosen.
    """
    if isinstance(value, BaseModel) and isinstance(raw, dict):
        keys = _keys_of(type(value))
        extra = _EXTRA_KEYS.get(where.rsplit(".", 1)[-1], set())
        for key, sub in raw.items():
            if key in extra:
                continue
            if key not in keys:
                return _suggest(key, list(keys), where)
            found = _unknown_key_in(
                sub, getattr(value, keys[key], None), f"{where}.{key}"
            )
            if found:
                return found
    elif isinstance(raw, list) and isinstance(value, (list, tuple)):
        if len(raw) == len(value):
            for k, (r, v) in enumerate(zip(raw, value, strict=True)):
                found = _unknown_key_in(r, v, f"{where}.{k}")
                if found:
                    return found
    return None
