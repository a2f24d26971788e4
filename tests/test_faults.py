"""Faults on the hardware path, contained component faults, threads, limits.

Hardware faults are injected by real Python devices (``smartscope.sim.faulty``
on ``hardware_configs/faulty.cfg``, loaded by UniMMCore): a camera whose snaps
fail and an XY stage whose moves fail, at an attempt and for as many attempts
as their properties say. Component faults come from real modules of policies
and segmenters written to a temporary folder and named by import path in the
experiment file, as a user would.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from _closed_loop import smartscope
from useq import MDAEvent

from smartscope.engine import LimitViolation
from smartscope.experiment import Experiment
from smartscope.limits import SafetyLimits
from smartscope.microscope import Microscope
from smartscope.rundir import load_run, read_jsonl, read_position
from smartscope.runner import Runner

ROOT = Path(__file__).resolve().parents[1]
FAULTY_CFG = ROOT / "hardware_configs" / "faulty.cfg"

#: a policy and a segmenter module, as a user writes them (imported by path)
MODULE = '''
"""Policies and a segmenter that fail when told to (smartscope fault tests)."""
import threading

import numpy as np
from pydantic import PrivateAttr
from useq import MDAEvent

from smartscope.scheduler import AddEvents, MovePosition
from smartscope.segment import Segmentation, ThresholdSegmenter


class Flaky:
    """Raises in on_detections at its `fail_at`-th frame (1-based)."""

    name = "flaky"

    def __init__(self, fail_at=3, every=False):
        self.fail_at, self.every = fail_at, every
        self.frames = []
        self.threads = set()

    def on_detections(self, frame, detections, context):
        self.threads.add(threading.current_thread().name)
        self.frames.append(frame.frame_index)
        n = len(self.frames)
        if n == self.fail_at or (self.every and n > self.fail_at):
            raise ValueError(f"flaky policy broke at its frame {n}")
        return []

    def has_pending_work(self):
        self.threads.add(threading.current_thread().name)
        return False


class PendingFails(Flaky):
    """has_pending_work raises once it has seen a frame."""

    name = "pending_fails"

    def __init__(self):
        super().__init__(fail_at=0)

    def has_pending_work(self):
        self.threads.add(threading.current_thread().name)
        if self.frames:
            raise RuntimeError("pending-work check broke")
        return False


class PendingAlwaysFails(Flaky):
    """has_pending_work always raises."""

    name = "pending_always_fails"

    def __init__(self):
        super().__init__(fail_at=0)

    def has_pending_work(self):
        raise RuntimeError("pending-work check always breaks")


class NeedsFails(Flaky):
    """needs(frame) raises at the second frame."""

    name = "needs_fails"

    def __init__(self):
        super().__init__(fail_at=0)
        self.asked = 0

    def needs(self, frame):
        self.asked += 1
        if frame.frame_index == 1:
            raise KeyError("needs broke")
        return True


class Wild:
    """Proposes one target far outside the stage limits, one inside, and a
    move of its position outside them, at the first frame."""

    name = "wild"

    def __init__(self, x_um=1.0e9, exposure_ms=5.0):
        self.x_um, self.exposure_ms = x_um, exposure_ms
        self.done = False

    def on_detections(self, frame, detections, context):
        if self.done:
            return []
        self.done = True
        far = MDAEvent(x_pos=self.x_um, y_pos=0.0, exposure=5.0, pos_name="far")
        near = MDAEvent(
            x_pos=10.0, y_pos=10.0, exposure=self.exposure_ms, pos_name="near"
        )
        return [
            AddEvents((far,), reason="far away"),
            AddEvents((near,), reason="close by"),
            MovePosition(frame.position, x_um=float("nan"), y_um=0.0),
        ]

    def has_pending_work(self):
        return False


class FlakySegmenter(ThresholdSegmenter):
    """The threshold baseline, failing at some calls (1-based; the runner's
    warm-up is call 1): raising at `fail_calls`, returning labels of the
    wrong shape at `wrong_calls`."""

    fail_calls: tuple = ()
    wrong_calls: tuple = ()
    _n: int = PrivateAttr(0)

    def segment(self, images):
        self._n += 1
        out = super().segment(images)
        if self._n in self.fail_calls:
            raise RuntimeError("model crashed")
        if self._n in self.wrong_calls:
            return Segmentation([lab[:10, :10] for lab in out.labels], out.scores)
        return out


class Stuck(ThresholdSegmenter):
    """The threshold baseline that, from call `stuck_from` on, hangs (sleeps
    an hour) or, with `exit_code`, ends its process."""

    stuck_from: int = 2
    exit_code: int | None = None
    _n: int = PrivateAttr(0)

    def segment(self, images):
        self._n += 1
        if self._n >= self.stuck_from:
            if self.exit_code is not None:
                import os

                os._exit(self.exit_code)
            import time

            time.sleep(3600)
        return super().segment(images)


class DiesInItsProcess(ThresholdSegmenter):
    """Builds in the experiment's check, dies as its child process builds it."""

    def model_post_init(self, context):
        import os
        import sys

        if sys.argv[0].endswith("_child.py"):
            os._exit(7)


class BareLabels(ThresholdSegmenter):
    """Returns the labels array alone, not a Segmentation (a common shortcut)."""

    def segment(self, images):
        return super().segment(images).labels


class OneScore(ThresholdSegmenter):
    """Gives one score per image, whatever the number of objects."""

    def segment(self, images):
        out = super().segment(images)
        return Segmentation(out.labels, [np.ones(1) for _ in out.labels])


class SparseLabels(ThresholdSegmenter):
    """The threshold baseline numbering its objects as another tool might:
    int64, from 70 000 up in steps of 2**33."""

    def segment(self, images):
        out = super().segment(images)
        labels = [
            np.where(lab > 0, 70_000 + lab.astype(np.int64) * 2**33, 0)
            for lab in out.labels
        ]
        return Segmentation(labels, out.scores)
'''


@pytest.fixture
def modules(tmp_path, monkeypatch):
    """A real module of faulty policies, importable as ``faultmods``."""
    folder = tmp_path / "mods"
    folder.mkdir()
    (folder / "faultmods.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(folder))
    # and for the `smartscope` command run as a subprocess
    paths = [str(folder), os.environ.get("PYTHONPATH", "")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in paths if p))
    sys.modules.pop("faultmods", None)
    yield folder
    sys.modules.pop("faultmods", None)


def _positions(n: int = 9) -> list[dict]:
    return [{"x": 100.0 * k, "y": 0.0, "z": 0.0, "name": f"f{k}"} for k in range(n)]


def _write(tmp_path: Path, **sections) -> Path:
    """An experiment file on the faulty microscope: 9 fields, one frame each."""
    exp = {
        "name": "faults",
        "config": str(FAULTY_CFG),
        "sequence": {
            "stage_positions": _positions(),
            "channels": [{"config": "DAPI", "exposure": 5}],
        },
        "segmenter": {"name": "threshold", "sigma_px": 1.0, "min_area_px": 6},
        "analysis": {"worker": "thread", "batch_size": 1},
        "scheduler": {"max_analysis_lag": 0},  # decisions before the next field
        "hardware": {"retries": 2, "retry_backoff_s": 0.01},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(exp.get(key), dict):
            exp[key] = {**exp[key], **value}
        else:
            exp[key] = value
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(exp, sort_keys=False))
    return path


def _run(path: Path, out: Path) -> tuple[Runner, object]:
    exp = Experiment.from_file(path)
    with Runner(exp, out_dir=out) as runner:
        summary = runner.run()
        props = {
            label: {p: runner.microscope.core.getProperty(label, p) for p in names}
            for label, names in (
                ("Camera", ("SnapAttempts",)),
                ("XY", ("MoveAttempts",)),
            )
        }
    gc.collect()
    return runner, summary, props


def _objects(out: Path) -> list[tuple]:
    """Each analysed frame's objects: frame, labels, centroids, areas."""
    return [
        (
            r["frame_index"],
            r["objects"]["label"],
            r["objects"]["x_px"],
            r["objects"]["area_px"],
        )
        for r in read_jsonl(out / "detections.jsonl")
    ]


def _frames_on_disk(out: Path) -> list[dict]:
    """frames.jsonl, each frame's position readable with a non-empty image."""
    frames = load_run(out).frames
    for f in frames:
        image = read_position(out, f["position"])
        assert image.size and image.max() > 0, f["position"]
    return frames


# ------------------------------------------------------------ device faults
def test_snap_fault_fails_the_run_with_device_call_and_error(tmp_path):
    path = _write(
        tmp_path,
        properties=[["Camera", "FailAtSnap", "5"]],
        hardware={"retries": 1},
    )
    out = tmp_path / "run"
    _, summary, props = _run(path, out)

    assert summary.status == "failed"
    assert summary.fault["device"] == "Camera"
    assert summary.fault["call"] == "snapImage"
    assert summary.fault["attempts"] == 2  # one try and one retry
    assert summary.fault["error"] == "InjectedFault: injected fault at snap attempt 6"
    assert summary.fault["event"]["smartscope"]["position"] == "f4"
    assert summary.error.startswith("device fault: Camera: snapImage failed")
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "failed"
    assert info["summary"]["fault"] == summary.fault
    # every frame acquired before the fault is on disk and readable
    frames = _frames_on_disk(out)
    assert [f["position"] for f in frames] == ["f0", "f1", "f2", "f3"]
    assert int(props["Camera"]["SnapAttempts"]) == 6


@pytest.mark.parametrize(
    ("retries", "status", "frames", "attempts"),
    [(2, "completed", 9, 11), (1, "failed", 2, 4)],
    ids=["recovers", "too-few-retries"],
)
def test_transient_snap_fault_is_retried(tmp_path, retries, status, frames, attempts):
    path = _write(
        tmp_path,
        properties=[["Camera", "FailAtSnap", "3"], ["Camera", "FailTimes", "2"]],
        hardware={"retries": retries},
    )
    out = tmp_path / "run"
    _, summary, props = _run(path, out)

    assert summary.status == status, summary.error
    assert len(_frames_on_disk(out)) == frames
    assert int(props["Camera"]["SnapAttempts"]) == attempts
    assert summary.hardware["failed_attempts"] == 2
    assert summary.hardware["calls_retried"] == (1 if status == "completed" else 0)


def test_stage_fault_fails_the_run_at_the_move(tmp_path):
    path = _write(tmp_path, properties=[["XY", "FailAtMove", "7"]])
    out = tmp_path / "run"
    _, summary, props = _run(path, out)

    assert summary.status == "failed"
    assert summary.fault["device"] == "XY"
    assert summary.fault["call"] == "setXYPosition"
    assert summary.fault["attempts"] == 3
    assert summary.fault["event"]["x_um"] == 600.0
    assert len(_frames_on_disk(out)) == 6
    assert int(props["XY"]["MoveAttempts"]) == 9  # 6 moves, then 3 attempts


def test_device_fault_on_the_command_line_then_resume(tmp_path):
    path = _write(
        tmp_path,
        properties=[["Camera", "FailAtSnap", "7"]],
        hardware={"retries": 0},
    )
    out = tmp_path / "run"
    result = smartscope("run", str(path), "--out", str(out))

    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: run failed: device fault: Camera: snapImage")
    assert "Traceback" not in result.stdout + result.stderr
    assert len(_frames_on_disk(out)) == 6

    # the fault is gone for the next session (the camera counts its snaps
    # again): resume images the three missing fields and completes
    result = smartscope("resume", str(out))
    assert result.returncode == 0, result.stderr
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "completed"
    frames = _frames_on_disk(out)
    assert sorted(f["position"] for f in frames) == [f"f{k}" for k in range(9)]


def test_engine_never_sends_a_move_outside_the_limits():
    scope = Microscope(FAULTY_CFG)
    try:
        limits = SafetyLimits(x_um=(-1000.0, 1000.0), y_um=(-1000.0, 1000.0))
        scope.use_safe_engine(limits=limits)
        scope.run([MDAEvent(x_pos=5.0, y_pos=5.0), MDAEvent(x_pos=5e6, y_pos=0.0)])
        scope.wait(30)
        assert isinstance(scope.run_error, LimitViolation)
        assert "x = 5e+06 µm is outside the X limits" in str(scope.run_error)
        core = scope.core
        assert int(core.getProperty("XY", "MoveAttempts")) == 1  # the first only
        assert tuple(core.getXYPosition()) == (5.0, 5.0)
    finally:
        scope.close()
        gc.collect()


# --------------------------------------------------------- component faults
@pytest.mark.parametrize(
    ("on_error", "status", "n_frames", "calls"),
    [
        ("disable", "completed_with_errors", 9, 3),
        ("skip", "completed_with_errors", 9, 9),
        ("stop", "failed", 3, 3),
    ],
)
def test_policy_fault_is_contained(
    modules, tmp_path, on_error, status, n_frames, calls
):
    policy = {"name": "faultmods:Flaky", "fail_at": 3, "on_error": on_error}
    path = _write(tmp_path, policies=[policy])
    out = tmp_path / "run"
    runner, summary, _ = _run(path, out)

    assert summary.status == status
    assert len(_frames_on_disk(out)) == n_frames  # the base plan went on
    assert runner.policies[0].frames == list(range(calls))
    fault = {
        "component": "policy",
        "name": "flaky",
        "call": "on_detections",
        "frame_index": 2,
        "error": "ValueError: flaky policy broke at its frame 3",
        "on_error": on_error,
    }
    assert summary.errors == [fault]
    info = json.loads((out / "run.json").read_text())
    assert info["summary"]["errors"] == [fault]
    logged = [d for d in read_jsonl(out / "decisions.jsonl") if "error" in d]
    assert len(logged) == 1
    assert logged[0]["policy"] == "flaky"
    assert logged[0]["trigger"]["frame_index"] == 2
    assert logged[0]["on_error"] == on_error
    if status == "failed":
        assert "policy flaky failed in on_detections at frame 2" in summary.error


def test_pending_work_is_asked_on_the_worker_thread_and_a_fault_there_is_contained(
    modules, tmp_path
):
    path = _write(
        tmp_path,
        policies=[{"name": "faultmods:PendingFails"}, {"name": "faultmods:Flaky"}],
    )
    out = tmp_path / "run"
    runner, summary, _ = _run(path, out)

    assert summary.status == "completed_with_errors"
    assert len(_frames_on_disk(out)) == 9
    assert [(e["name"], e["call"], e["frame_index"]) for e in summary.errors] == [
        ("pending_fails", "has_pending_work", 0),
        ("flaky", "on_detections", 2),
    ]
    pending, _ = runner.policies
    assert pending.frames == [0]  # disabled after its fault
    # no policy method ever ran on the acquisition thread
    for policy in runner.policies:
        assert policy.threads <= {"smartscope-inference", "MainThread"}
        assert "smartscope-inference" in policy.threads


def test_a_pending_work_check_that_always_fails_is_logged_once_under_skip(
    modules, tmp_path
):
    policy = {"name": "faultmods:PendingAlwaysFails", "on_error": "skip"}
    path = _write(tmp_path, policies=[policy])
    out = tmp_path / "run"
    runner, summary, _ = _run(path, out)

    assert summary.status == "completed_with_errors"
    assert runner.policies[0].frames == list(range(9))  # still asked (skip)
    assert summary.n_errors == 1
    assert summary.errors[0]["call"] == "has_pending_work"
    logged = [d for d in read_jsonl(out / "decisions.jsonl") if "error" in d]
    assert len(logged) == 1


def test_a_fault_in_needs_is_contained_and_the_frames_still_analysed(modules, tmp_path):
    path = _write(tmp_path, policies=[{"name": "faultmods:NeedsFails"}])
    out = tmp_path / "run"
    runner, summary, _ = _run(path, out)

    assert summary.status == "completed_with_errors"
    assert [(e["call"], e["frame_index"]) for e in summary.errors] == [("needs", 1)]
    policy = runner.policies[0]
    assert policy.asked == 2  # disabled after its fault: never asked again
    assert policy.frames == [0]  # disabled before frame 1 reached it
    assert summary.frames_analysed == 9
    assert len(_frames_on_disk(out)) == 9


def test_segmenter_fault_skips_the_frame(modules, tmp_path):
    # one frame per call (batch_size 1, analysis before the next field): the
    # segmenter raises on frame 3 and returns labels of the wrong shape for 5
    segmenter = {"name": "faultmods:FlakySegmenter", "fail_calls": [5]}
    path = _write(tmp_path, segmenter={**segmenter, "wrong_calls": [7]})
    out = tmp_path / "run"
    _, summary, _ = _run(path, out)

    assert summary.status == "completed_with_errors"
    assert len(_frames_on_disk(out)) == 9  # the base plan went on
    assert summary.frames_analysed == 7
    assert summary.analysis["segmenter_errors"] == 2
    assert [(e["component"], e["frame_index"]) for e in summary.errors] == [
        ("segmenter", 3),
        ("segmenter", 5),
    ]
    assert summary.errors[0]["error"] == "RuntimeError: model crashed"
    assert "labels of shape (10, 10)" in summary.errors[1]["error"]
    skipped = [r for r in read_jsonl(out / "detections.jsonl") if "error" in r]
    assert [(r["frame_index"], r["skipped"]) for r in skipped] == [
        (3, "error"),
        (5, "error"),
    ]


def test_segmenter_fault_can_stop_the_run(modules, tmp_path):
    path = _write(
        tmp_path,
        segmenter={"name": "faultmods:FlakySegmenter", "fail_calls": [3]},
        analysis={"on_error": "stop"},
    )
    out = tmp_path / "run"
    _, summary, _ = _run(path, out)

    assert summary.status == "failed"
    assert summary.error.startswith("segmenter failed at frame 1: RuntimeError")
    assert len(_frames_on_disk(out)) == 2


@pytest.mark.parametrize(
    ("exit_code", "error"),
    [
        (
            None,
            "no answer within 2 s (analysis.segment_timeout_s); its process "
            "was stopped",
        ),
        (139, "its process ended (exit code 139)"),
    ],
    ids=["hangs", "dies"],
)
def test_a_segmenter_process_that_hangs_or_dies_is_a_fault_not_a_hang(
    modules, tmp_path, exit_code, error, capfd
):
    # call 1 is the warm-up; frames 0 and 1 are analysed, then it hangs/dies
    path = _write(
        tmp_path,
        segmenter={"name": "faultmods:Stuck", "stuck_from": 4, "exit_code": exit_code},
        analysis={"worker": "process", "segment_timeout_s": 2},
    )
    out = tmp_path / "run"
    runner, summary, _ = _run(path, out)

    assert summary.status == "completed_with_errors"
    assert len(_frames_on_disk(out)) == 9  # acquisition went on without it
    assert summary.frames_analysed == 2
    assert summary.analysis["segmenter_errors"] == 7
    assert summary.errors[0]["frame_index"] == 2
    assert summary.errors[0]["error"] == f"SegmenterProcessError: {error}"
    with pytest.raises(ProcessLookupError):  # the child is gone
        os.kill(runner.segmenter.pid, 0)
    # the shared memory it left is cleaned up without a warning on the terminal
    assert "leaked shared_memory" not in capfd.readouterr().err


@pytest.mark.parametrize(
    ("segmenter", "error"),
    [
        (
            {"name": "faultmods:Stuck", "stuck_from": 1},
            "error: segmenter 'faultmods:Stuck' failed on a test frame before "
            "acquisition: no answer within 2 s (analysis.segment_timeout_s); its "
            "process was stopped",
        ),
        (
            {"name": "faultmods:DiesInItsProcess"},
            "error: segmenter 'faultmods:DiesInItsProcess' failed to start in its "
            "process: its process ended (exit code 7)",
        ),
    ],
    ids=["hangs on its test frame", "dies as it starts"],
)
def test_a_segmenter_that_cannot_start_is_one_line(modules, tmp_path, segmenter, error):
    path = _write(
        tmp_path,
        segmenter=segmenter,
        analysis={"worker": "process", "segment_timeout_s": 2},
    )
    result = smartscope("run", str(path), "--out", str(tmp_path / "run"))
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == error
    assert not (tmp_path / "run").exists()  # nothing acquired, nothing left


def test_sparse_wide_labels_are_renumbered_not_wrapped(modules, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    plain = _write(tmp_path / "a", segmenter={"name": "threshold", "min_area_px": 6})
    sparse = _write(
        tmp_path / "b", segmenter={"name": "faultmods:SparseLabels", "min_area_px": 6}
    )
    _run(plain, tmp_path / "a" / "run")
    _, summary, _ = _run(sparse, tmp_path / "b" / "run")

    assert summary.status == "completed" and summary.analysis["segmenter_errors"] == 0
    assert _objects(tmp_path / "b" / "run") == _objects(tmp_path / "a" / "run")


@pytest.mark.parametrize("worker", ["thread", "process"])
def test_a_bare_labels_array_is_taken_as_the_segmentation(modules, tmp_path, worker):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    plain = _write(tmp_path / "a", segmenter={"name": "threshold", "min_area_px": 6})
    bare = _write(
        tmp_path / "b",
        segmenter={"name": "faultmods:BareLabels", "min_area_px": 6},
        analysis={"worker": worker},
    )
    _run(plain, tmp_path / "a" / "run")
    _, summary, _ = _run(bare, tmp_path / "b" / "run")

    assert summary.status == "completed" and summary.frames_analysed == 9
    assert _objects(tmp_path / "b" / "run") == _objects(tmp_path / "a" / "run")


def test_scores_that_do_not_fit_the_labels_are_the_segmenters_fault(modules, tmp_path):
    # with find_and_center the policy used to fail on the short score column
    path = _write(
        tmp_path,
        segmenter={"name": "faultmods:OneScore", "min_area_px": 6},
        policies=[{"name": "find_and_center", "survey_channel": "DAPI"}],
    )
    _, summary, _ = _run(path, tmp_path / "run")

    assert summary.status == "completed_with_errors"
    components = {e["component"] for e in summary.errors}
    assert components == {"segmenter"}, summary.errors
    assert "scores for" in summary.errors[0]["error"]


def test_import_path_policy_fault_on_the_command_line_exits_3(modules, tmp_path):
    path = _write(tmp_path, policies=[{"name": "faultmods:Flaky", "fail_at": 2}])
    out = tmp_path / "run"
    result = smartscope("run", str(path), "--out", str(out))
    assert result.returncode == 3, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("warning: run completed with errors: completed, with 1")
    assert "policy flaky in on_detections at frame 1" in lines[0]
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "completed_with_errors"
    assert len(info["summary"]["errors"]) == 1
    # a run that completed with errors is not resumed
    again = smartscope("resume", str(out))
    assert again.returncode == 0
    assert "nothing to resume" in again.stdout


# ------------------------------------------------------------------ threads
def test_pause_time_is_not_counted_by_the_schedule(tmp_path):
    exp = Experiment.model_validate(
        {
            "name": "pause",
            "sequence": {
                "time_plan": {"interval": 0.5, "loops": 4},
                "channels": [{"config": "DAPI", "exposure": 5}],
            },
            "analysis": {"enabled": False},
        }
    )
    times: list[float] = []
    with Runner(exp, out_dir=tmp_path / "run") as runner:
        runner.events.frameAcquired.connect(lambda f: times.append(time.perf_counter()))
        runner.start()
        deadline = time.monotonic() + 30
        while not times and time.monotonic() < deadline:
            time.sleep(0.005)
        runner.pause()
        time.sleep(1.5)
        runner.resume()
        summary = runner.finish()
    gc.collect()

    assert summary.frames_acquired == 4
    gaps = np.diff(times)
    assert gaps[0] > 1.5 + 0.4  # the pause, then the interval
    # not served back to back after it (as when the pause counted: ~0.01 s)
    assert np.all(gaps[1:] > 0.25), gaps
    # counted, the pause would have made the visits after it ~1 s late
    assert summary.schedule["lateness_s"]["base"]["max"] < 0.5


HALF_BAD_CFG = """\
Property,Core,Initialize,0
Device,DHub,DemoCamera,DHub
Device,Z,DemoCamera,DStage
Device,Cam,DemoCamera,DCam
Parent,Z,DHub
Parent,Cam,DHub
Property,Core,Initialize,1
#py pyDevice,XY,smartscope_no_such_module,NoStage
"""


def test_core_is_released_when_a_config_fails_half_way(tmp_path):
    cfg = tmp_path / "half.cfg"
    cfg.write_text(HALF_BAD_CFG)
    script = textwrap.dedent(
        f"""
        import gc
        from smartscope._errors import ConfigError
        from smartscope.microscope import Microscope
        try:
            Microscope({str(cfg)!r})
        except ConfigError as e:
            print("config error:", str(e).splitlines()[0][:60])
        else:
            raise SystemExit("the half-bad config loaded")
        alive = [o for o in gc.get_objects() if type(o).__name__ == "UniMMCore"]
        print("cores alive:", len(alive))  # released at once, not left to gc
        scope = Microscope()
        print("second microscope:", scope.image_shape)
        scope.close()
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr
    assert "config error: cannot load hardware config" in result.stdout
    assert "cores alive: 0" in result.stdout
    assert "second microscope: (512, 512)" in result.stdout
    assert "Abort" not in result.stderr and "FATAL" not in result.stderr


# ------------------------------------------------------------------- limits
def test_actions_outside_the_limits_are_refused_and_never_sent(modules, tmp_path):
    path = _write(
        tmp_path,
        policies=[{"name": "faultmods:Wild"}],
        limits={"x_um": [-5000, 5000], "max_exposure_ms": 50},
    )
    out = tmp_path / "run"
    _, summary, props = _run(path, out)

    assert summary.status == "completed"
    actions = [a for d in read_jsonl(out / "decisions.jsonl") for a in d["actions"]]
    assert [(a["type"], a["status"]) for a in actions] == [
        ("add_events", "refused"),
        ("add_events", "applied"),
        ("move_position", "refused"),
    ]
    assert actions[0]["outcome"] == (
        "outside the safety limits: far: x = 1e+09 µm is outside the X limits "
        "[-5000, 5000] µm"
    )
    assert "not a finite number" in actions[2]["outcome"]
    assert summary.schedule["limit_refusals"] == 2
    frames = load_run(out).frames
    assert sorted(f["position"] for f in frames) == sorted(
        [f"f{k}" for k in range(9)] + ["near"]
    )
    assert int(props["XY"]["MoveAttempts"]) == 10  # 9 fields and the near target
    info = json.loads((out / "run.json").read_text())
    assert info["limits"]["x_um"] == [-5000, 5000]
    assert info["limits"]["sources"]["x_um"] == "experiment"


def test_an_exposure_above_the_maximum_is_refused(modules, tmp_path):
    path = _write(
        tmp_path,
        policies=[{"name": "faultmods:Wild", "x_um": 20.0, "exposure_ms": 80.0}],
        limits={"max_exposure_ms": 50},
    )
    out = tmp_path / "run"
    _run(path, out)
    actions = [a for d in read_jsonl(out / "decisions.jsonl") for a in d["actions"]]
    assert [a["status"] for a in actions] == ["applied", "refused", "refused"]
    assert "exposure 80 ms exceeds the maximum of 50 ms" in actions[1]["outcome"]
    assert "near" not in {f["position"] for f in load_run(out).frames}


def test_scheduler_refuses_a_focus_or_move_outside_the_limits():
    from useq import MDASequence

    from smartscope.scheduler import MovePosition, Scheduler, SetFocus

    plan = MDASequence(
        stage_positions=[{"x": 0, "y": 0, "z": 0, "name": "A1_0000"}],
        time_plan={"interval": 1, "loops": 2},
        z_plan={"range": 4, "step": 2},
    )
    limits = SafetyLimits(z_um=(-10.0, 10.0), x_um=(-100.0, 100.0))
    sched = Scheduler(plan, limits=limits)
    # the focus plus the Z plan's +2 µm plane would be at 11 µm
    focus = sched.apply(SetFocus("A1", 9.0))
    assert not focus.applied
    assert focus.reason == (
        "outside the safety limits: z = 11 µm is outside the Z limits [-10, 10] µm"
    )
    assert sched.apply(SetFocus("A1", 7.0)).applied
    move = sched.apply(MovePosition("A1_0000", x_um=150.0, y_um=0.0))
    assert not move.applied and "x = 150 µm" in move.reason
    assert sched.apply(MovePosition("A1_0000", x_um=50.0, y_um=0.0)).applied
    assert sched.n_limit_refusals == 2


def test_limits_come_from_the_experiment_then_the_config_then_defaults():
    with Microscope() as scope:
        config = scope.config_limits()
    assert "z_um" not in config  # the demo focus stage has no position limits
    assert config["max_exposure_ms"] > 0  # the demo camera's Exposure limit
    limits = SafetyLimits.resolve({"x_um": (-1.0, 1.0), "z_um": None}, config)
    assert limits.x_um == (-1.0, 1.0)
    assert limits.y_um == (-100_000.0, 100_000.0)
    assert limits.z_um == (-10_000.0, 10_000.0)
    assert limits.max_exposure_ms == config["max_exposure_ms"]
    assert limits.sources == {
        "x_um": "experiment",
        "y_um": "default",
        "z_um": "default",
        "max_exposure_ms": "config",
    }
    gc.collect()
