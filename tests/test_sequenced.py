"""Hardware-sequenced runs and streamed bursts on the real demo cores.

A run of frames at one place with one setting and no wait is acquired as one
camera sequence (`pymmcore_plus.core.SequencedEvent`), every frame still
stored and logged on its own; a `Stream` runs in chunks between which
decisions apply; a camera that cannot sequence falls back to snaps, saying so
once; pause and cancel take effect between sequences; a killed streamed run
resumes; the live-cell camera streams and its run is still scored.
"""

from __future__ import annotations

import gc
import itertools
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytest
from _closed_loop import all_stored, smartscope
from pydantic import PrivateAttr
from pymmcore_plus.core import SequencedEvent
from useq import MDAEvent

from smartscope.experiment import Experiment
from smartscope.frame import event_tag
from smartscope.policies import PolicyBase
from smartscope.rundir import inspect_run, read_jsonl
from smartscope.runner import Runner
from smartscope.scheduler import ExtendStream, StopStream, Stream
from smartscope.sim.camera import live_cell_camera

ROOT = Path(__file__).resolve().parents[1]
DEMO_CFG = ROOT / "hardware_configs" / "demo.cfg"
LIVE_CFG = ROOT / "hardware_configs" / "livecells.cfg"
TESTS = Path(__file__).resolve().parent
EXPOSURE_MS = 10.0


# ------------------------------------------------------------ test policies
class StreamOnce(PolicyBase):
    """At the first base frame, stream `n_frames` at its place (``<pos>_s``).

    At the first analysed stream frame it stops the stream (`stop`) or extends
    it by `extend` frames. Used by name (``test_sequenced:StreamOnce``).
    """

    name: Literal["stream_once"] = "stream_once"
    n_frames: int = 100
    chunk_frames: int = 10
    stop: bool = False
    extend: int = 0
    roi: bool = False

    _started: bool = PrivateAttr(False)
    _answered: bool = PrivateAttr(False)

    def has_pending_work(self) -> bool:
        return self._started and not self._answered and (self.stop or self.extend)

    def on_detections(self, frame: Any, detections: Any, context: Any) -> list:
        tag = event_tag(frame.event)
        if frame.kind == "base":
            if self._started:
                return []
            self._started = True
            roi = None
            if self.roi:
                roi = {"offset_x": 224, "offset_y": 224, "width": 64, "height": 64}
            event = MDAEvent(
                x_pos=frame.stage_x_um,
                y_pos=frame.stage_y_um,
                z_pos=frame.stage_z_um,
                exposure=EXPOSURE_MS,
                channel={"config": "DAPI", "group": context.channel_group},
                roi=roi,
                pos_name=f"{frame.position}_s",
            )
            return [Stream(event, self.n_frames, self.chunk_frames, reason="test")]
        if "stream" in tag and not self._answered:
            self._answered = True
            if self.stop:
                return [StopStream(str(tag["stream"]), reason="seen enough")]
            if self.extend:
                return [ExtendStream(str(tag["stream"]), self.extend, reason="more")]
        return []


def _experiment(
    *,
    config: Path = DEMO_CFG,
    loops: int = 1,
    positions: int = 1,
    max_sequence_frames: int = 100,
    sequence: str = "auto",
    policies: list[dict] | None = None,
    properties: list | None = None,
    channels: list[dict] | None = None,
    axis_order: str | None = None,
) -> Experiment:
    seq: dict[str, Any] = {
        "stage_positions": [
            {"x": 600.0 * i, "y": 0.0, "z": 0.0, "name": "AB"[i] if i < 2 else f"P{i}"}
            for i in range(positions)
        ],
        "channels": channels or [{"config": "DAPI", "exposure": EXPOSURE_MS}],
    }
    if axis_order:
        seq["axis_order"] = axis_order
    if loops > 1:
        seq["time_plan"] = {"interval": 0, "loops": loops}
    return Experiment.model_validate(
        {
            "name": "sequenced",
            "config": str(config),
            "properties": properties or [],
            "sequence": seq,
            "segmenter": {"name": "threshold"},
            "policies": policies or [],
            "analysis": {"analyze": "all"},
            "scheduler": {
                "sequence": sequence,
                "max_sequence_frames": max_sequence_frames,
            },
        }
    )


def _run(exp: Experiment, out: Path, *, during: Any = None) -> tuple[Any, list, Any]:
    """Run `exp`; the events pymmcore-plus started, in order, and the runner."""
    started: list[MDAEvent] = []
    with Runner(exp, out_dir=out) as runner:
        runner.microscope.core.mda.events.eventStarted.connect(started.append)
        if during is None:
            summary = runner.run()
        else:
            runner.start()
            during(runner)
            runner.wait()
            summary = runner.finish()
    gc.collect()
    return summary, started, runner


def _sizes(started: list[MDAEvent]) -> list[int]:
    """Frames of each started event (a plain event: 0)."""
    return [len(e.events) if isinstance(e, SequencedEvent) else 0 for e in started]


# ------------------------------------------------------------ sequencing
def test_a_run_of_sequenceable_events_becomes_sequenced_events(tmp_path):
    summary, started, _ = _run(
        _experiment(loops=30, max_sequence_frames=12), tmp_path / "seq"
    )
    assert summary.status == "completed", summary.reason
    assert _sizes(started) == [12, 12, 6]  # 30 frames, sequences of at most 12
    # the camera was asked for all 30 at once and ran on across the boundaries
    assert summary.hardware["camera_sequences"] == 3
    assert summary.hardware["camera_starts"] == 1
    # each sequenced frame comes with its own event, in the plan's order
    inner = [e.index["t"] for s in started for e in s.events]
    assert inner == list(range(30))
    # pymmcore-plus logs every event it runs: a sequence is one short line
    assert str(started[1]) == (
        "FrameSequence(12 frames: t=12..23, p=0, c=0; pos_name='A', exposure=10.0)"
    )
    assert summary.schedule["sequences"] == {
        "n": 3,
        "frames": 30,
        "max_frames": 12,
        "off": None,
        "chosen_ahead": 2,  # the second and third, during the last frame before
    }

    # the same plan with sequencing off: thirty events, none sequenced
    summary, started, _ = _run(_experiment(loops=30, sequence="off"), tmp_path / "off")
    assert summary.status == "completed"
    assert _sizes(started) == [0] * 30
    frames = read_jsonl(tmp_path / "off" / "frames.jsonl")
    assert {(f["sequence"], f["sequence_end"]) for f in frames} == {(None, False)}


def test_a_camera_run_never_asks_for_more_frames_than_its_buffer_holds(tmp_path):
    # 8 MB of sequence buffer hold 16 demo frames (512 x 512, 16 bit): the
    # camera run of a 40-frame time-lapse stops (by itself) within them, and
    # each later sequence starts the camera again instead of overflowing it
    from smartscope.microscope import Microscope

    exp = _experiment(loops=40)
    with Microscope(exp.config) as microscope:
        microscope.core.setCircularBufferMemoryFootprint(8)
        with Runner(exp, microscope=microscope, out_dir=tmp_path / "run") as runner:
            started: list[MDAEvent] = []
            microscope.core.mda.events.eventStarted.connect(started.append)
            summary = runner.run()
    gc.collect()
    assert summary.status == "completed", summary.reason
    assert _sizes(started) == [16, 16, 8]
    assert summary.hardware["camera_starts"] == 3
    frames = read_jsonl(tmp_path / "run" / "frames.jsonl")
    assert [f["index"]["t"] for f in frames] == list(range(40))


def test_events_that_cannot_share_a_sequence_are_not_merged(tmp_path):
    # two positions visited round-robin: no two neighbours share a place
    summary, started, _ = _run(_experiment(loops=4, positions=2), tmp_path / "rr")
    assert summary.status == "completed"
    assert _sizes(started) == [0] * 8
    assert [e.pos_name for e in started] == ["A", "B"] * 4


def test_every_sequenced_frame_is_stored_and_logged_with_its_own_index_and_time(
    tmp_path,
):
    out = tmp_path / "run"
    summary, started, _ = _run(_experiment(loops=40, max_sequence_frames=20), out)
    assert summary.status == "completed"
    assert _sizes(started) == [20, 20]
    frames = read_jsonl(out / "frames.jsonl")
    assert [f["frame_index"] for f in frames] == list(range(40))
    assert [f["array"]["t"] for f in frames] == list(range(40))
    assert [f["index"]["t"] for f in frames] == list(range(40))
    assert len({f["event_id"] for f in frames}) == 40
    # each frame has the camera's time of its own exposure: never closer than
    # one exposure to the frame before it (frames popped together would be)
    times = [f["t_clock"] for f in frames]
    gaps = np.diff(times)
    assert (gaps >= 0.9 * EXPOSURE_MS / 1000).all(), gaps
    # every frame is on disk, with data
    assert all_stored(out, frames)
    # every frame analysed or counted as skipped
    skipped = summary.analysis["skipped"]
    assert summary.frames_analysed + sum(skipped.values()) == 40
    logged = read_jsonl(out / "detections.jsonl")
    assert sorted(r["frame_index"] for r in logged) == list(range(40))
    # each frame names its sequence; no policy needs these frames, so only the
    # last of each sequence is analysed (analysis.sequence_frames: last)
    assert [f["sequence"] for f in frames] == [0] * 20 + [1] * 20
    assert [f["frame_index"] for f in frames if f["sequence_end"]] == [19, 39]
    assert [r["frame_index"] for r in logged if "skipped" not in r] == [19, 39]
    assert skipped["sequence"] == 38


def test_a_sequenced_frame_is_not_stamped_older_than_it_is(tmp_path):
    """The demo camera stamps a run's frames from when its thread started, up
    to ~200 ms after the sequence was started: taken as the frames' wait in
    the buffer, every frame of that run was logged ~200 ms old at delivery
    (its frame→decision latency and its age for ``max_frame_age_ms`` with
    it)."""
    out = tmp_path / "run"
    delivered: list[float] = []  # the run's clock when each frame arrived
    with Runner(_experiment(loops=40, max_sequence_frames=20), out_dir=out) as runner:
        runner.microscope.core.mda.events.frameReady.connect(
            lambda *_: delivered.append(runner.run_clock())
        )
        summary = runner.run()
    gc.collect()
    assert summary.status == "completed"
    frames = read_jsonl(out / "frames.jsonl")
    assert [f["sequence"] for f in frames] == [0] * 20 + [1] * 20
    stamped = np.array([f["t_clock"] for f in frames])
    arrived = np.array(delivered)
    assert len(arrived) == 40
    # a sequence's first frame is popped as soon as the camera has it
    for first in (0, 20):
        assert abs(stamped[first] - arrived[first]) < 0.05, (stamped, arrived)
    # no frame stamped after it arrived; later ones keep their own exposure
    assert (stamped <= arrived + 0.05).all()
    assert (np.diff(stamped) >= 0.9 * EXPOSURE_MS / 1000).all(), np.diff(stamped)


def test_each_sequence_runs_at_its_exposure_and_a_boundary_resends_nothing(tmp_path):
    # channels outer, time inner: six DAPI frames at 10 ms, then six FITC
    # frames at 20 ms, two sequences; a sequence's set-up sends only what
    # changed, so the camera's own exposure (read at every frame) must follow
    exp = _experiment(
        loops=6,
        axis_order="pct",
        channels=[
            {"config": "DAPI", "exposure": EXPOSURE_MS},
            {"config": "FITC", "exposure": 2 * EXPOSURE_MS},
        ],
    )
    seen: list[tuple[float, float]] = []
    with Runner(exp, out_dir=tmp_path / "run") as runner:
        core = runner.microscope.core
        core.mda.events.frameReady.connect(
            lambda img, event, meta: seen.append((event.exposure, core.getExposure()))
        )
        summary = runner.run()
    gc.collect()
    assert summary.status == "completed", summary.reason
    assert summary.schedule["sequences"]["n"] == 2
    assert seen == [(EXPOSURE_MS, EXPOSURE_MS)] * 6 + [(2 * EXPOSURE_MS,) * 2] * 6
    assert summary.hardware["camera_starts"] == 2  # another setting: a restart

    # the base frame (an event on its own, set up in full) sends its exposure;
    # the stream's four chunks at the same place and exposure send nothing
    exp = _experiment(policies=_stream_policy(n_frames=40, chunk_frames=10))
    sent: list[float] = []
    with Runner(exp, out_dir=tmp_path / "stream") as runner:
        core = runner.microscope.core
        core.events.exposureChanged.connect(lambda camera, value: sent.append(value))
        summary = runner.run()
        time.sleep(0.2)  # MMCore posts its notifications from its own thread
    gc.collect()
    assert summary.status == "completed", summary.reason
    assert summary.schedule["sequences"]["n"] == 4
    assert sent == [EXPOSURE_MS]
    assert summary.hardware["camera_starts"] == 1


@pytest.mark.parametrize("ahead", [True, False])
def test_the_next_sequence_is_chosen_while_the_camera_takes_the_last_frame(
    tmp_path, ahead
):
    # the engine asks the Scheduler for the next sequence after the last frame
    # but one (the camera is taking the last); with choose_ahead off, only after
    # the last frame. Both happen on the acquisition thread, in a fixed order.
    exp = _experiment(loops=60, max_sequence_frames=10)
    exp = exp.model_copy(
        update={"scheduler": exp.scheduler.model_copy(update={"choose_ahead": ahead})}
    )
    log: list[tuple[str, Any]] = []  # ("served", sequence) / ("frame", event id)
    with Runner(exp, out_dir=tmp_path / "run") as runner:
        runner.microscope.core.mda.events.frameReady.connect(
            lambda img, event, meta: log.append(("frame", event_tag(event)["event_id"]))
        )
        runner.start()
        runner.scheduler.events.sequenceServed.connect(
            lambda seq: log.append(("served", seq.metadata["smartscope"]))
        )
        runner.wait()
        summary = runner.finish()
    gc.collect()
    assert summary.status == "completed", summary.reason
    assert summary.schedule["sequences"]["n"] == 6
    served = [(k, tag) for k, (what, tag) in enumerate(log) if what == "served"]
    frame_at = {eid: k for k, (what, eid) in enumerate(log) if what == "frame"}
    assert len(served) >= 4  # connected while the first sequence ran
    for (_, before), (k, tag) in itertools.pairwise(served):
        last = frame_at[before["event_ids"][-1]]
        but_one = frame_at[before["event_ids"][-2]]
        if ahead:
            assert but_one < k < last
        else:
            assert last < k < frame_at[tag["event_ids"][0]]
    chosen = summary.schedule["sequences"]["chosen_ahead"]
    assert chosen == (5 if ahead else 0)
    # chosen ahead, each next sequence continues the camera's run of 60
    assert summary.hardware["camera_starts"] == (1 if ahead else 6)


# ------------------------------------------------------------ streams
def _stream_policy(**params: Any) -> list[dict]:
    return [{"name": "test_sequenced:StreamOnce", **params}]


def test_a_stop_between_chunks_ends_the_stream(tmp_path):
    out = tmp_path / "run"
    exp = _experiment(
        policies=_stream_policy(n_frames=3000, chunk_frames=10, stop=True)
    )
    summary, started, _ = _run(exp, out)
    assert summary.status == "completed", summary.reason
    frames = read_jsonl(out / "frames.jsonl")
    streamed = [f for f in frames if f["position"] == "A_s"]
    n = len(streamed)
    # stopped long before its 3000 frames, after whole chunks of 10
    assert 10 <= n < 3000
    assert n % 10 == 0
    assert _sizes(started)[1:] == [10] * (n // 10)
    assert [f["array"]["t"] for f in streamed] == list(range(n))
    stops = [
        a
        for d in read_jsonl(out / "decisions.jsonl")
        for a in d["actions"]
        if a["type"] == "stop_stream"
    ]
    assert len(stops) == 1 and stops[0]["status"] == "applied"
    assert stops[0]["outcome"] == f"stream at A_s ends after {n} frames"
    assert summary.schedule["streams"]["ended"] == {"A_s": "stopped: seen enough"}
    # one camera run, stopped with the stream (no frame after it was stored)
    assert summary.hardware["camera_starts"] == 1
    assert summary.hardware["camera_sequences"] == n // 10
    # streamed frames are not needed by any policy: analysed or counted skipped
    skipped = summary.analysis["skipped"]
    assert summary.frames_analysed + sum(skipped.values()) == len(frames)


def test_an_extension_between_chunks_lengthens_the_stream(tmp_path):
    out = tmp_path / "run"
    exp = _experiment(policies=_stream_policy(n_frames=20, chunk_frames=10, extend=15))
    summary, started, _ = _run(exp, out)
    assert summary.status == "completed", summary.reason
    streamed = [f for f in read_jsonl(out / "frames.jsonl") if f["position"] == "A_s"]
    assert [f["array"]["t"] for f in streamed] == list(range(35))
    assert sorted(_sizes(started)[1:]) == [5, 10, 10, 10]
    assert summary.schedule["streams"]["ended"] == {"A_s": "completed"}
    # the camera ran for the 20 frames planned at first, then for the 15 more
    assert summary.hardware["camera_starts"] == 2


# ------------------------------------------------------------ fallback
def _live(**kw: Any) -> Experiment:
    return _experiment(config=LIVE_CFG, **kw)


def test_a_camera_that_cannot_sequence_falls_back_and_says_so_once(tmp_path, caplog):
    exp = _live(
        loops=12,
        max_sequence_frames=4,
        properties=[["Camera", "SequenceAcquisition", "No"]],
    )
    out = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="smartscope.run"):
        with Runner(exp, out_dir=out) as runner:
            started: list = []
            runner.microscope.core.mda.events.eventStarted.connect(started.append)
            summary = runner.run()
            camera = live_cell_camera(runner.microscope.core)
            n_snaps, sequences = len(camera.snap_log), list(camera.sequence_log)
    gc.collect()
    assert summary.status == "completed", summary.reason
    # the first sequence was refused and snapped frame by frame; then every
    # event on its own
    assert _sizes(started) == [4] + [0] * 8
    assert sequences == [] and n_snaps == 12
    frames = read_jsonl(out / "frames.jsonl")
    assert [f["array"]["t"] for f in frames] == list(range(12))
    assert all_stored(out, frames)
    lines = [r for r in caplog.records if "hardware sequencing off" in r.message]
    assert len(lines) == 1
    assert "SequenceAcquisition: No" in lines[0].message
    assert "SequenceAcquisition: No" in summary.schedule["sequences"]["off"]

    # the same camera with sequences on streams them
    summary, started, _ = _run(_live(loops=12, max_sequence_frames=4), tmp_path / "on")
    assert _sizes(started) == [4, 4, 4]


def test_the_fallback_is_one_line_of_run_log(tmp_path):
    exp = _live(
        loops=8,
        max_sequence_frames=4,
        properties=[["Camera", "SequenceAcquisition", "No"]],
    )
    path = tmp_path / "exp.yaml"
    path.write_text(exp.to_yaml())
    out = tmp_path / "run"
    result = smartscope("run", str(path), "--out", str(out))
    assert result.returncode == 0, result.stderr
    log = (out / "run.log").read_text().splitlines()
    lines = [line for line in log if "hardware sequencing off" in line]
    assert len(lines) == 1, log
    assert "cannot start a sequence acquisition" in lines[0]
    assert len(read_jsonl(out / "frames.jsonl")) == 8


# ------------------------------------------------------------ pause, cancel
def _wait_for(condition: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_pause_takes_effect_between_sequences(tmp_path):
    out = tmp_path / "run"
    seen: dict[str, Any] = {}

    def during(runner: Runner) -> None:
        first = threading.Event()
        runner.events.frameAcquired.connect(lambda f: first.set())
        assert first.wait(60)
        runner.pause()
        sched = runner.scheduler
        # paused: every frame served is acquired and nothing more is served
        _wait_for(lambda: runner._frame_count == sched.n_served)
        seen["paused_at"] = runner._frame_count
        time.sleep(0.3)
        seen["after_wait"] = runner._frame_count
        runner.resume()

    summary, started, _ = _run(
        _experiment(loops=200, max_sequence_frames=20), out, during=during
    )
    assert summary.status == "completed", summary.reason
    # the sequence under way finished; none started while paused
    assert seen["paused_at"] % 20 == 0 and 0 < seen["paused_at"] < 200
    assert seen["after_wait"] == seen["paused_at"]
    assert _sizes(started) == [20] * 10
    frames = read_jsonl(out / "frames.jsonl")
    assert [f["array"]["t"] for f in frames] == list(range(200))


def test_cancel_keeps_every_frame_the_camera_took(tmp_path):
    out = tmp_path / "run"
    exp = _live(loops=400, max_sequence_frames=100)
    counts: dict[str, int] = {}

    def during(runner: Runner) -> None:
        some = threading.Event()
        runner.events.frameAcquired.connect(
            lambda f: some.set() if f.frame_index >= 30 else None
        )
        assert some.wait(60)
        runner.cancel("enough")

    with Runner(exp, out_dir=out) as runner:
        started: list = []
        runner.microscope.core.mda.events.eventStarted.connect(started.append)
        runner.start()
        during(runner)
        runner.wait()
        summary = runner.finish()
        camera = live_cell_camera(runner.microscope.core)
        counts["snaps"] = len(camera.snap_log)
        counts["sequences"] = len(camera.sequence_log)
    gc.collect()
    assert summary.status == "interrupted"
    frames = read_jsonl(out / "frames.jsonl")
    # stopped inside the first 100-frame sequence; every exposure the camera
    # made is a stored, logged frame
    assert counts["sequences"] == 1 and _sizes(started) == [100]
    assert 30 <= len(frames) < 100
    assert counts["snaps"] == len(frames) == summary.frames_acquired
    assert [f["array"]["t"] for f in frames] == list(range(len(frames)))
    assert all_stored(out, frames)


# ------------------------------------------------------------ resume
def test_a_killed_streamed_run_resumes_with_each_frame_once(tmp_path):
    exp = _experiment(policies=_stream_policy(n_frames=400, chunk_frames=10))
    path = tmp_path / "exp.yaml"
    path.write_text(exp.to_yaml())
    out = tmp_path / "run"
    env = {
        **os.environ,
        "CI": "true",
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "smartscope.cli", "run", str(path), "--out", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        env=env,
    )
    frames_log = out / "frames.jsonl"

    def streamed() -> int:
        if not frames_log.exists():
            return 0
        return sum(f["position"] == "A_s" for f in read_jsonl(frames_log))

    deadline = time.monotonic() + 120
    while proc.poll() is None and streamed() < 40:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    killed_at = streamed()
    assert 40 <= killed_at < 400, "the stream ended before the kill"
    assert json.loads((out / "run.json").read_text())["status"] == "running"
    state = inspect_run(out)
    assert "A" in state.finished

    result = subprocess.run(
        [sys.executable, "-m", "smartscope.cli", "resume", str(out)],
        capture_output=True,
        text=True,
        timeout=180,
        stdin=subprocess.DEVNULL,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "completed"
    frames = [f for f in read_jsonl(frames_log) if not f.get("partial")]
    # the base field was not imaged again; the stream has its 400 frames once,
    # the kept ones and the rest of it under a fresh name
    assert [f["position"] for f in frames if f["kind"] == "base"] == ["A"]
    stream = [f for f in frames if f["position"].startswith("A_s")]
    assert len(stream) == 400
    assert len({f["frame_index"] for f in read_jsonl(frames_log)}) == len(
        read_jsonl(frames_log)
    )
    assert all_stored(out, stream)


# ------------------------------------------------------------ live cells
def test_the_live_cell_camera_streams_and_its_run_is_scored(tmp_path):
    out = tmp_path / "run"
    exp = _live(
        positions=1,
        policies=_stream_policy(n_frames=60, chunk_frames=20, roi=True),
        properties=[["Camera", "Acceleration", "60"]],
    )
    with Runner(exp, out_dir=out) as runner:
        started: list = []
        runner.microscope.core.mda.events.eventStarted.connect(started.append)
        summary = runner.run()
        camera = live_cell_camera(runner.microscope.core)
        sequences = list(camera.sequence_log)
        snaps = list(camera.snap_log)
    gc.collect()
    assert summary.status == "completed", summary.reason
    assert _sizes(started) == [0, 20, 20, 20]
    # three sequences of 20 from one camera run of exactly the stream's 60
    # exposures: started once, never stopped between chunks, no extra exposure
    assert [(s["n_requested"], s["n_frames"]) for s in sequences] == [(60, 60)]
    assert summary.hardware["camera_sequences"] == 3
    assert summary.hardware["camera_starts"] == 1
    frames = read_jsonl(out / "frames.jsonl")
    assert len(frames) == len(snaps) == 61
    # every exposure lines up with its frame: the base field, then 64 µm ROIs
    # centred on the stream's place
    for snap, frame in zip(snaps, frames, strict=True):
        width = 512.0 if frame["kind"] == "base" else 64.0
        assert snap["width_um"] == pytest.approx(width)
    streamed = snaps[1:]
    assert all(s["x_um"] == pytest.approx(snaps[0]["x_um"], abs=1) for s in streamed)
    # the specimen lives on during a sequence: each streamed exposure is at
    # least one exposure (x Acceleration 60) later on its clock than the last
    steps = np.diff([s["t_s"] for s in streamed])
    assert (steps >= 0.9 * EXPOSURE_MS / 1000 * 60).all(), steps
    # the specimen's report scores the run frame by frame
    report = json.loads((out / "specimen_report.json").read_text())
    assert report["frames"] == {"total": 61, "base": 1, "stream_once": 60}
    assert report["dose"]["n_frames"] == 61
    assert report["dose"]["exposure_ms"] == pytest.approx(61 * EXPOSURE_MS)
    assert "n_divisions" in report["divisions"]


# ------------------------------------------------------------ benchmark
def test_bench_burst_runs_the_same_frames_in_every_arm(tmp_path):
    from smartscope.bench import bench_burst

    result = bench_burst(frames=20, chunk_frames=10, repeats=1, workdir=tmp_path)
    arms = result["arms"]
    assert set(arms) == {
        "event_by_event", "sequenced", "bare_event_by_event", "bare_sequenced"
    }  # fmt: skip
    assert all(arm["same_order"] for arm in arms.values())
    assert all(arm["frames_acquired"] == 20 for arm in arms.values())
    seqd, ebe = arms["sequenced"], arms["event_by_event"]
    assert (seqd["sequences"], ebe["sequences"]) == (2, 0)
    assert arms["bare_sequenced"]["sequences"] == 1
    assert seqd["frames_missing"] == ebe["frames_missing"] == 0
    assert seqd["frames_counted"] == ebe["frames_counted"] == 20
    # one boundary per sequenced run (the warm-up's 8 frames are one sequence)
    assert seqd["between_sequences_ms"]["n"] == 1
    assert seqd["dead_time_ms"]["p50"] is not None
    assert result["exposure_limited_fps"] == 100.0
    assert set(result["goals"]) >= {"no_frame_lost", "same_order"}
