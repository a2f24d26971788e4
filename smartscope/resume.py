"""Go on with a run that crashed, was killed (even ``kill -9``) or interrupted.

``smartscope resume RUN_DIR``: `smartscope.rundir.inspect_run` reads what the
run directory holds and sorts its positions (finished, skipped, partial,
pending; see `smartscope.rundir` for the rules), `prepare_resume` repairs the
directory and builds a `Runner` that images only what is missing and first
replays the kept analysed frames into the policies, and `finish_resume`
writes the whole run's counts. `resume_run` does all three.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from smartscope._errors import ExperimentError, first_line
from smartscope.experiment import Experiment, format_validation_error
from smartscope.rundir import (
    ResumeError,
    RunState,
    counts_from_logs,
    inspect_run,
    prepare_directory,
)
from smartscope.runner import ResumePoint, Runner, RunSummary

__all__ = ["finish_resume", "prepare_resume", "resume_run"]


def prepare_resume(state: RunState, *, config: str | Path | None = None) -> Runner:
    """Repair the logs, move partial arrays aside and build the `Runner`.

    The runner is not started; run it like any other (``runner.run()``), then
    call `finish_resume`. `config` overrides the hardware config the run used.

    Raises
    ------
    ResumeError
        If the run completed, or its experiment cannot be read.
    """
    if state.completed:
        raise ResumeError(f"{state.directory}: the run completed; nothing to resume")
    experiment = _load_experiment(state)
    cfg = config if config is not None else state.info.get("hardware_config")
    cfg_path = experiment.config_path(cfg)  # ConfigError if it is gone

    done, resumed = prepare_directory(state)
    point = ResumePoint(
        done_positions=frozenset(done),
        first_frame_index=state.next_frame_index,
        first_decision_id=state.next_decision_id,
        replay=tuple(state.replay),
        stored=frozenset(state.stored),
        info={
            "started_at": state.info.get("started_at") or "",
            "resumed": resumed,
        },
    )
    return Runner(
        experiment, config=cfg_path, out_dir=state.directory, resume_point=point
    )


def finish_resume(runner: Runner, summary: RunSummary) -> RunSummary:
    """Write the whole run's counts to ``run.json``; return its `RunSummary`.

    `summary` is the finished session's own; the returned one counts every
    session from the logs (``latency_ms`` and ``schedule`` stay the session's).
    """
    directory = runner.directory
    info = json.loads((directory / "run.json").read_text(encoding="utf-8"))
    resumed = info.get("resumed") or [{}]
    resumed[-1]["summary"] = summary.to_json()
    before = float(resumed[-1].get("wall_time_before_s") or 0.0)
    counts: dict[str, Any] = counts_from_logs(directory)
    total = replace(
        summary, wall_time_s=round(before + summary.wall_time_s, 3), **counts
    )
    info["summary"] = total.to_json()
    info["summary_note"] = (
        "counts cover every session of the run (from the logs; frames_acquired "
        "includes the frames of partial positions moved aside); wall_time_s sums "
        "the sessions (a killed one up to its last frame); latency_ms and "
        "schedule cover the last session only"
    )
    runner.storage.write_run_json(info)  # type: ignore[union-attr]
    return total


def resume_run(run_dir: str | Path, *, config: str | Path | None = None) -> RunSummary:
    """Resume an interrupted run and return the whole run's `RunSummary`.

    A completed run (with errors or not) is left as it is (its stored summary
    is returned).

    Examples
    --------
    >>> summary = resume_run("runs/plate-20250101-220000")
    """
    state = inspect_run(run_dir)
    if state.completed or state.status == "completed_with_errors":
        stored = state.info.get("summary") or {}
        try:
            return RunSummary(**stored)
        except TypeError:
            raise ResumeError(
                f"{run_dir}: the run completed; nothing to resume"
            ) from None
    runner = prepare_resume(state, config=config)
    try:
        return finish_resume(runner, runner.run())
    finally:
        runner.close()


def _load_experiment(state: RunState) -> Experiment:
    import yaml
    from pydantic import ValidationError

    path = state.directory / "experiment.yaml"
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise ResumeError(f"cannot read {path}: {first_line(e)}") from None
    if not isinstance(data, dict):
        raise ResumeError(f"{path}: expected a mapping of experiment fields")
    source = (state.info.get("experiment") or {}).get("source")
    try:
        return Experiment.model_validate({**data, "source": source})
    except ValidationError as e:
        raise ExperimentError(f"{path}: {format_validation_error(e)}") from None
