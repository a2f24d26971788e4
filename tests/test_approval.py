"""Operator approval mode: policy actions wait for approve / reject."""

from __future__ import annotations

import gc
import time

import pytest

from smartscope.approval import REFUSED_BY_OPERATOR, ApprovalGate
from smartscope.experiment import Experiment
from smartscope.rundir import read_jsonl
from smartscope.runner import Runner


def small_experiment(loops: int = 3, max_targets: int = 2) -> Experiment:
    """One bead field imaged `loops` times; find_and_center targets 2 beads."""
    return Experiment.model_validate(
        {
            "name": "approval",
            "sequence": {
                "stage_positions": [{"x": 0, "y": 0, "z": 0, "name": "field"}],
                "channels": [{"config": "DAPI", "exposure": 5}],
                "time_plan": {"interval": 0.15, "loops": loops},
            },
            "segmenter": {"name": "threshold", "sigma_px": 1.0, "min_area_px": 6},
            "policies": [
                {
                    "name": "find_and_center",
                    "survey_channel": "DAPI",
                    "channel": "FITC",
                    "exposure_ms": 5,
                    "filter": {"min_area_px": 10, "exclude_border": True},
                    "max_targets": max_targets,
                }
            ],
            "analysis": {"analyze": "base"},
        }
    )


def wait_for(condition, timeout: float = 20.0) -> None:
    t0 = time.monotonic()
    while not condition():
        if time.monotonic() - t0 > timeout:
            raise AssertionError("timed out waiting")
        time.sleep(0.02)


@pytest.fixture
def make_runner(tmp_path):
    runners: list[Runner] = []

    def make(**kwargs) -> Runner:
        exp = kwargs.pop("experiment", None) or small_experiment()
        runner = Runner(exp, out_dir=tmp_path / f"run{len(runners)}", **kwargs)
        runners.append(runner)
        return runner

    yield make
    for runner in runners:
        try:
            if runner.summary is None and runner._thread is not None:
                runner.cancel("test teardown")
                runner.finish()
        finally:
            runner.close()
    gc.collect()


def frames_of(runner: Runner, kind: str) -> list[dict]:
    return [
        f for f in read_jsonl(runner.directory / "frames.jsonl") if f["kind"] == kind
    ]


def test_rejected_actions_are_refused_and_not_acquired_while_base_plan_goes_on(
    make_runner,
):
    runner = make_runner(approval=True)
    gate = runner.approval
    proposed = []
    gate.events.proposed.connect(proposed.append)
    runner.start()
    wait_for(lambda: gate.pending())
    # the base plan keeps going while the operator has not decided
    wait_for(lambda: runner._frame_count >= 3)
    assert gate.pending(), "the proposal still waits for the operator"
    assert runner.is_running(), "the run does not end while a proposal is pending"

    rejected = gate.reject_all()
    summary = runner.finish()

    assert summary.status == "completed"
    assert [p.status for p in rejected] == ["rejected"]
    assert len(proposed) == 1
    assert frames_of(runner, "target") == []
    assert len(frames_of(runner, "base")) == 3
    assert summary.events_scheduled == 0
    records = read_jsonl(runner.directory / "decisions.jsonl")
    pending = [r for r in records if "approval" not in r]
    resolved = [r for r in records if "approval" in r]
    assert pending[0]["actions"][0]["status"] == "pending"
    assert len(pending[0]["actions"][0]["proposed_events"]) == 2
    assert resolved[0]["decision_id"] == pending[0]["decision_id"]
    assert resolved[0]["approval"]["status"] == "rejected"
    assert resolved[0]["approval"]["by"] == "operator"
    assert resolved[0]["actions"][0]["status"] == "refused"
    assert resolved[0]["actions"][0]["outcome"] == REFUSED_BY_OPERATOR


def test_approved_actions_are_acquired_and_traced_to_their_trigger(make_runner):
    runner = make_runner(approval=True)
    gate = runner.approval
    runner.start()
    wait_for(lambda: gate.pending())
    (proposal,) = gate.pending()
    assert "add 2 event(s) at 2 position(s)" in proposal.describe()
    assert gate.approve(proposal.proposal_id).status == "approved"
    assert gate.approve(proposal.proposal_id) is None  # already resolved
    summary = runner.finish()

    targets = frames_of(runner, "target")
    assert len(targets) == 2
    assert {t["trigger_frame"] for t in targets} == {proposal.trigger_frame}
    assert {t["decision_id"] for t in targets} == {proposal.decision_id}
    assert summary.events_scheduled == 2
    resolved = [
        r for r in read_jsonl(runner.directory / "decisions.jsonl") if "approval" in r
    ]
    assert resolved[0]["approval"]["status"] == "approved"
    assert resolved[0]["actions"][0]["status"] == "applied"
    assert len(resolved[0]["actions"][0]["events"]) == 2


def test_auto_approve_after_a_timeout(make_runner):
    runner = make_runner(approval=ApprovalGate(auto_approve_s=0.3))
    summary = runner.run()  # nobody answers: approved after 0.3 s
    assert summary.status == "completed"
    assert len(frames_of(runner, "target")) == 2
    (resolved,) = [
        r for r in read_jsonl(runner.directory / "decisions.jsonl") if "approval" in r
    ]
    assert resolved["approval"]["by"] == "timeout"
    assert resolved["approval"]["waited_ms"] >= 250


def test_cancel_refuses_what_is_still_pending(make_runner):
    runner = make_runner(approval=True)
    runner.start()
    wait_for(lambda: runner.approval.pending())
    runner.cancel("cancelled by the operator")
    summary = runner.finish()
    assert summary.status == "interrupted"
    assert not runner.approval.pending()
    (resolved,) = [
        r for r in read_jsonl(runner.directory / "decisions.jsonl") if "approval" in r
    ]
    assert resolved["approval"]["by"] == "run"
    assert resolved["actions"][0]["status"] == "refused"
    assert frames_of(runner, "target") == []


def test_without_approval_actions_apply_at_once(make_runner):
    runner = make_runner()
    assert runner.approval is None
    runner.run()
    assert len(frames_of(runner, "target")) == 2
