"""The real-time loop: fresh frames first, nothing lost, the plan's axis order.

Behaviour only (timings live in ``smartscope bench loop``): which frames the
analysis skips and why, that frames a policy needs are never skipped, that
skipped frames are still stored and logged, that a t-major time-lapse visits
its positions round-robin, and that a segmenter runs in a child process.
"""

from __future__ import annotations

import gc
import time
from collections import Counter

import numpy as np
import pytest
from useq import MDAEvent, MDASequence

from smartscope.experiment import Experiment
from smartscope.frame import Frame
from smartscope.rundir import load_run, read_position
from smartscope.runner import Runner
from smartscope.scheduler import Scheduler
from smartscope.segment import (
    ProcessSegmenter,
    SegmenterProcessError,
    ThresholdSegmenter,
)
from smartscope.stream import FrameStream

IMAGE = np.zeros((8, 8), np.uint16)


def _frame(i: int, position: str = "p000", kind: str = "base", t: float = 0.0):
    event = MDAEvent(index={"t": i})
    return Frame(i, event, position, kind, 0.0, 0.0, 0.0, None, 10.0, t)


def _stream(**kw):
    skipped: list[tuple[int, str]] = []
    stream = FrameStream(**kw)
    stream.on_skip = lambda frame, reason: skipped.append((frame.frame_index, reason))
    return stream, skipped


def test_frames_no_policy_needs_are_superseded_by_the_newest():
    stream, skipped = _stream(maxsize=16)
    frames = [_frame(i) for i in range(5)]
    for frame in frames:
        stream.put(frame, IMAGE, required=False)
    batch = stream.get_batch(4)
    assert [f.frame_index for f, _ in batch] == [4]
    assert skipped == [(i, "superseded") for i in range(4)]
    assert stream.n_skipped == {
        "superseded": 4,
        "stale": 0,
        "sequence": 0,
        "overflow": 0,
    }
    assert [f.dropped for f in frames] == [True] * 4 + [False]


def test_planes_of_a_stack_do_not_supersede_each_other():
    """A Z plane or channel is other content, not a newer look at the same
    view: a hit cell's 3-plane stack waiting behind a busy model was analysed
    as its last plane only (under load, the centered plane lost its labels)."""
    stream, skipped = _stream(maxsize=16)
    planes = [(t, z, c) for t in range(2) for z in range(3) for c in "ab"]
    for i, (t, z, c) in enumerate(planes):
        event = MDAEvent(index={"t": t, "p": 0, "z": z, "c": "ab".index(c)})
        frame = Frame(i, event, "hit_E5_000", "hit", 0.0, 0.0, 0.0, None, 10.0, 0.0)
        stream.put(frame, IMAGE, required=False)
    got = [f.frame_index for f, _ in stream.get_batch(16)]
    # each plane and channel of the newest time point; the first time point's
    # are superseded by their own plane and channel only
    assert got == list(range(6, 12))
    assert sorted(skipped) == [(i, "superseded") for i in range(6)]


def test_required_frames_are_never_skipped_and_keep_their_order():
    stream, skipped = _stream(maxsize=16)
    for i in range(6):  # even frames needed by a policy, odd ones not
        stream.put(_frame(i, kind="base" if i % 2 == 0 else "burst"), IMAGE,
                   required=i % 2 == 0)  # fmt: skip
    got = [f.frame_index for f, _ in stream.get_batch(10)]
    assert got == [0, 2, 4, 5]  # acquisition order; the newest burst frame stays
    assert skipped == [(1, "superseded"), (3, "superseded")]


def test_stale_frames_are_skipped_but_the_newest_is_always_analysed():
    now = [10.0]
    stream, skipped = _stream(maxsize=16, max_frame_age_s=0.1, clock=lambda: now[0])
    stream.put(_frame(0, "a", t=9.5), IMAGE, required=False)  # 500 ms old
    stream.put(_frame(1, "b", t=9.95), IMAGE, required=False)  # 50 ms old
    stream.put(_frame(2, "c", t=9.0), IMAGE, required=True)  # old but needed
    assert [f.frame_index for f, _ in stream.get_batch(10)] == [1, 2]
    assert skipped == [(0, "stale")]
    # alone in the queue, even an old frame is analysed: decisions never starve
    stream.put(_frame(3, "a", t=1.0), IMAGE, required=False)
    assert [f.frame_index for f, _ in stream.get_batch(10)] == [3]


def _streamed(i: int, sequence: int | None, end: bool = False):
    frame = _frame(i, kind="stream")
    frame.sequence, frame.sequence_end = sequence, end
    return frame


def test_of_a_hardware_sequence_only_the_last_frame_is_analysed_unless_needed():
    stream, skipped = _stream(maxsize=16, sequence_last_only=True)
    assert not stream.put(_streamed(0, sequence=0), IMAGE, required=False)
    stream.put(_streamed(1, sequence=0), IMAGE, required=True)  # a policy's
    stream.put(_streamed(2, sequence=0, end=True), IMAGE, required=False)
    assert [f.frame_index for f, _ in stream.get_batch(4)] == [1, 2]
    assert skipped == [(0, "sequence")]
    # frames taken event by event are not sequence frames
    stream.put(_streamed(3, sequence=None), IMAGE, required=False)
    assert [f.frame_index for f, _ in stream.get_batch(4)] == [3]
    assert stream.n_skipped == {
        "superseded": 0,
        "stale": 0,
        "sequence": 1,
        "overflow": 0,
    }


def test_without_last_only_the_model_takes_the_newest_frames_of_a_sequence():
    stream, skipped = _stream(maxsize=16, sequence_last_only=False)
    for i in range(3):
        stream.put(_streamed(i, sequence=0), IMAGE, required=False)
        assert [f.frame_index for f, _ in stream.get_batch(4)] == [i]
    assert skipped == []


def test_a_full_queue_drops_the_oldest_frame_no_policy_needs():
    stream, skipped = _stream(maxsize=3, hard_limit=4)
    stream.put(_frame(0, "a"), IMAGE, required=True)
    stream.put(_frame(1, "b"), IMAGE, required=False)
    stream.put(_frame(2, "c"), IMAGE, required=True)
    assert stream.put(_frame(3, "d"), IMAGE, required=True)
    assert stream.n_skipped["overflow"] == 1
    stream.put(_frame(4, "e"), IMAGE, required=True)  # 4 required: at the limit
    assert stream.put(_frame(5, "f"), IMAGE, required=True)  # memory: oldest goes
    assert skipped == []  # reported from the consumer's thread, not put's
    assert [f.frame_index for f, _ in stream.get_batch(10)] == [2, 3, 4, 5]
    assert skipped == [(0, "overflow"), (1, "overflow")]


def test_stream_close_ends_the_consumer_after_the_queued_frames():
    stream, _ = _stream()
    stream.put(_frame(0), IMAGE, required=True)
    stream.close()
    assert [f.frame_index for f, _ in stream.get_batch(4)] == [0]
    assert stream.get_batch(4) is None


def _tmajor(n_pos=4, loops=3):
    return MDASequence(
        stage_positions=[(i * 600.0, 0.0, 0.0) for i in range(n_pos)],
        time_plan={"interval": 0, "loops": loops},
        axis_order="tpgcz",
    )


@pytest.mark.parametrize("travel_order", ["plan", "nearest"])
def test_a_t_major_time_lapse_visits_its_positions_round_robin(travel_order):
    sched = Scheduler(_tmajor(), travel_order=travel_order)
    order = [(e.index["t"], e.metadata["smartscope"]["position"]) for e in sched]
    visits = [t for t, _ in order]
    assert visits == sorted(visits)  # never a later timepoint before an earlier one
    assert Counter(visits) == {0: 4, 1: 4, 2: 4}
    if travel_order == "plan":  # pymmcore-plus's own order
        assert [e for e in order] == [
            (t, f"p{p:03d}") for t in range(3) for p in range(4)
        ]


class SlowThreshold(ThresholdSegmenter):
    """The rule-based segmenter, slower than the camera (60 ms a call)."""

    def segment(self, images):
        time.sleep(0.06)
        return super().segment(images)


class FailsOnEmptyFrames(ThresholdSegmenter):
    """Fails on an all-zero frame (a model that breaks on some input)."""

    def segment(self, images):
        if not np.any(images):
            raise ValueError("nothing to see")
        return super().segment(images)


class NeedsEveryBase:
    """A policy that needs every base frame and decides nothing."""

    name = "needs_every_base"

    def __init__(self):
        self.seen = []

    def on_detections(self, frame, detections, context):
        self.seen.append(frame.frame_index)
        return []

    def has_pending_work(self):
        return False

    def needs(self, frame):
        return frame.kind == "base"


def _fast_timelapse(tmp_path, policies, frames=24, **analysis):
    return Experiment.model_validate(
        {
            "name": "realtime",
            "sequence": {
                "channels": [{"config": "DAPI", "exposure": 5}],
                "time_plan": {"interval": 0, "loops": frames},
            },
            "segmenter": {"name": "test_realtime:SlowThreshold"},
            "policies": policies,
            "analysis": {"worker": "thread", "batch_size": 1, **analysis},
            "output": {"directory": str(tmp_path / "run")},
        }
    )


def test_a_slow_model_skips_stale_frames_but_stores_every_frame(tmp_path):
    # the time-lapse streams as one hardware sequence: all its newest frames
    # are offered to the model, not only the sequence's last
    exp = _fast_timelapse(tmp_path, [], sequence_frames="newest")
    with Runner(exp) as runner:
        summary = runner.run()
    gc.collect()
    assert summary.status == "completed"
    run = load_run(tmp_path / "run")
    assert len(run.frames) == 24
    data = read_position(tmp_path / "run", "p000")
    assert data.shape[0] == 24 and all(np.any(data[t]) for t in range(24))
    analysed = [r["frame_index"] for r in run.detections]
    skipped = {r["frame_index"]: r["skipped"] for r in run.skipped}
    assert sorted(analysed + list(skipped)) == list(range(24))  # each once
    assert analysed == sorted(analysed)
    assert skipped and set(skipped.values()) <= {"superseded", "stale"}
    assert 23 in analysed  # the newest frame is always analysed
    assert summary.analysis["analysed"] == len(analysed)
    assert sum(summary.analysis["skipped"].values()) == len(skipped)
    assert summary.frames_dropped == len(skipped)
    assert all(r["age_ms"] >= 60 for r in run.detections)  # at least one call
    assert run.counts()["frames_dropped"] == len(skipped)


def test_frames_a_policy_needs_are_all_analysed_in_order(tmp_path):
    exp = _fast_timelapse(tmp_path, [{"name": "test_realtime:NeedsEveryBase"}])
    with Runner(exp) as runner:
        summary = runner.run()
        seen = runner.policies[0].seen
    gc.collect()
    assert summary.status == "completed"
    assert seen == list(range(24))
    assert summary.analysis["skipped"] == {
        "superseded": 0,
        "stale": 0,
        "sequence": 0,
        "overflow": 0,
    }
    assert [r["frame_index"] for r in load_run(tmp_path / "run").detections] == list(
        range(24)
    )


def test_the_runner_acquires_a_t_major_plan_round_robin(tmp_path):
    exp = Experiment.model_validate(
        {
            "name": "tmajor",
            "sequence": _tmajor(4, 2).model_dump(mode="json", exclude_unset=True),
            "segmenter": {"name": "threshold"},
            "output": {"directory": str(tmp_path / "run")},
        }
    )
    with Runner(exp) as runner:
        runner.run()
    gc.collect()
    frames = load_run(tmp_path / "run").frames
    assert [f["position"] for f in frames] == ["p000", "p001", "p002", "p003"] * 2


def test_a_segmenter_in_a_child_process_gives_the_same_labels():
    image = np.full((96, 128), 50, np.uint16)
    image[20:40, 30:50] += 900
    image[60:80, 90:110] += 700
    local = ThresholdSegmenter().segment(np.stack([image, image[::-1]]))
    child = ProcessSegmenter("test_realtime:FailsOnEmptyFrames", {}, nice=5)
    try:
        remote = child.segment(np.stack([image, image[::-1]]))
        assert child.model_id == ThresholdSegmenter().model_id
        assert np.array_equal(remote.labels, local.labels)
        assert remote.labels.max() == 2
        bigger = child.segment(np.tile(image, (2, 2)))  # shared memory grows
        assert bigger.labels.shape == (1, 192, 256) and bigger.labels.max() == 8
        with pytest.raises(SegmenterProcessError) as failed:
            child.segment(np.zeros((1, 8, 8), np.uint16))  # fails in the child
        assert str(failed.value) == "ValueError: nothing to see"
        assert np.array_equal(child.segment(image).labels[0], local.labels[0])
    finally:
        child.close()
    assert child._proc is None  # stopped; closing twice is harmless
    child.close()


def test_a_segmenter_the_child_cannot_build_is_one_error_line():
    from smartscope import RegistryError

    with pytest.raises(RegistryError, match="unknown segmenter 'nope'"):
        ProcessSegmenter("nope")


def test_a_run_with_its_model_in_a_child_process(tmp_path):
    exp = Experiment.model_validate(
        {
            "name": "proc",
            "sequence": {
                "channels": [{"config": "DAPI", "exposure": 5}],
                "time_plan": {"interval": 0, "loops": 4},
            },
            "segmenter": {"name": "threshold"},
            "analysis": {"worker": "process"},
            "output": {"directory": str(tmp_path / "run")},
        }
    )
    runner = Runner(exp)
    try:
        assert isinstance(runner.segmenter, ProcessSegmenter)
        proc = runner.segmenter._proc
        summary = runner.run()
    finally:
        runner.close()
        gc.collect()
    assert summary.status == "completed" and summary.frames_analysed >= 1
    assert summary.frames_analysed + summary.frames_dropped == 4
    assert load_run(tmp_path / "run").info["model_id"] == ThresholdSegmenter().model_id
    assert proc.poll() is not None  # the child ended with the runner


def test_the_start_up_heap_is_frozen_while_frames_arrive_and_thawed_after(tmp_path):
    """No full collection walks torch/pydantic/MMCore's objects mid-run.

    A full collection of that heap holds the GIL for 40-130 ms here, so the
    acquisition thread would stall between frames.
    """
    exp = _fast_timelapse(tmp_path, [], frames=4)
    frozen_at_frames: list[int] = []
    runner = Runner(exp)
    try:
        runner.microscope.core.mda.events.frameReady.connect(
            lambda *_: frozen_at_frames.append(gc.get_freeze_count())
        )
        summary = runner.run()
    finally:
        runner.close()
        gc.collect()
    assert summary.status == "completed" and len(frozen_at_frames) == 4
    assert min(frozen_at_frames) > 10_000  # the imports and the core, at least
    assert gc.get_freeze_count() == 0  # handed back to gc with the runner


def test_heap_freezes_nest():
    from smartscope._threads import freeze_heap, thaw_heap

    freeze_heap()
    freeze_heap()
    thaw_heap()
    assert gc.get_freeze_count() > 0  # the outer freeze still holds
    thaw_heap()
    assert gc.get_freeze_count() == 0
    thaw_heap()  # one too many: harmless
    assert gc.get_freeze_count() == 0


RUN_IMPORTS = """
import gc, sys
from smartscope.experiment import Experiment
from smartscope.runner import Runner

with Runner(Experiment.from_file(sys.argv[1]), out_dir=sys.argv[2]) as runner:
    before = set(sys.modules)
    summary = runner.run()
print(summary.status, *sorted(set(sys.modules) - before))
del runner
gc.collect()
"""


@pytest.mark.parametrize("demo", ["find_and_center", "plate_screen"])
def test_a_run_imports_nothing_once_acquisition_has_started(tmp_path, demo):
    """Importing a module holds the interpreter lock: the writer's backend
    (tensorstore, imported by the first array a process creates) stalled
    acquisition and analysis for over a second at the first frame; a fixed
    threshold above the test frame's objects left the watershed, and frames
    of another objective the resampling, to the first real frames. Every
    import is paid while the runner sets up."""
    import subprocess
    import sys

    from conftest import ROOT

    path = ROOT / "demos" / f"{demo}.yaml"
    out = subprocess.run(
        [sys.executable, "-c", RUN_IMPORTS, str(path), str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    status, *imported = out.stdout.split()
    assert status == "completed"
    assert imported == []
