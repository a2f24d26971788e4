"""`smartscope resume`: a run killed with SIGKILL goes on without re-imaging."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from _closed_loop import kill_9_when, smartscope

from smartscope.rundir import (
    ResumeError,
    inspect_run,
    position_path,
    read_jsonl,
    read_position,
)

DEMO_CFG = Path(__file__).parents[1] / "hardware_configs" / "demo.cfg"
N_POSITIONS = 12
N_Z = 3

POSITIONS = "".join(
    f"    - {{x: {600.0 * (i % 4)}, y: {600.0 * (i // 4)}, z: 0.0}}\n"
    for i in range(N_POSITIONS)
)
EXPERIMENT = f"""\
name: resume_screen
config: {DEMO_CFG}
sequence:
  stage_positions:
{POSITIONS}  channels:
    - {{config: DAPI, exposure: 50}}
  z_plan: {{range: 4, step: 2}}
  axis_order: pcz
segmenter: {{name: threshold, sigma_px: 1.0}}
"""


def _run_and_kill_9(
    experiment: Path, out: Path, far_enough: Callable[[list[dict]], bool]
) -> None:
    """`smartscope run` in a subprocess, SIGKILLed once `far_enough(frames)`."""
    kill_9_when(["run", str(experiment), "--out", str(out)], out, far_enough)
    assert json.loads((out / "run.json").read_text())["status"] == "running"


def _fields(run_dir: Path) -> Counter:
    """(position, c, z) of the stored base frames, with how often each is stored."""
    return Counter(
        (f["array"]["position"], f["array"]["c"], f["array"]["z"])
        for f in read_jsonl(run_dir / "frames.jsonl")
        if f["kind"] == "base" and not f.get("partial")
    )


def _fields_on_disk(run_dir: Path) -> int:
    """Fields whose every frame is on disk (0 before the run has started)."""
    try:
        return len(inspect_run(run_dir).finished)
    except ResumeError:  # no run.json yet
        return 0


@pytest.fixture(scope="module")
def experiment(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("exp") / "screen.yaml"
    path.write_text(EXPERIMENT)
    return path


@pytest.fixture(scope="module")
def reference(experiment, tmp_path_factory) -> Path:
    """The same experiment, uninterrupted."""
    out = tmp_path_factory.mktemp("ref") / "run"
    result = smartscope("run", str(experiment), "--out", str(out))
    assert result.returncode == 0, result.stderr
    return out


def test_kill_9_then_resume_equals_an_uninterrupted_run(
    experiment, reference, tmp_path
):
    out = tmp_path / "run"
    # killed once three fields are on disk, not merely logged: under load the
    # writer runs a few fields behind the frames log (by design, off the
    # acquisition's path), and this test needs two whole fields after it
    # removes a chunk of one
    _run_and_kill_9(experiment, out, lambda frames: _fields_on_disk(out) >= 3)
    frames_log = out / "frames.jsonl"

    # what a kill can leave: a log line cut off mid-write, a frame logged whose
    # chunk never reached the disk
    with frames_log.open("a") as fh:
        fh.write('{"frame_index": 999, "position": "p0')
    before = inspect_run(out)
    assert before.finished, "killed before any field was finished"
    lost = before.finished[0]
    chunk = position_path(out, lost) / "0" / "c" / "0" / "0" / "1" / "0"
    (chunk / "0").unlink()
    state = inspect_run(out)
    assert lost in state.partial
    kept = set(state.finished)
    assert kept and len(kept) < N_POSITIONS
    kept_data = {p: read_position(out, p) for p in kept}

    result = smartscope("resume", str(out))
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr

    # the same fields as the uninterrupted run, each stored exactly once
    fields = _fields(out)
    assert set(fields) == set(_fields(reference))
    assert len(fields) == N_POSITIONS * N_Z
    assert set(fields.values()) == {1}
    # finished fields were not imaged again: their arrays are untouched
    for p, data in kept_data.items():
        assert (read_position(out, p) == data).all()
    # every array opens with its full shape and every stored frame has data
    for p in {p for p, _, _ in fields}:
        assert read_position(out, p).shape[:3] == (1, 1, N_Z)
    frames = read_jsonl(frames_log)
    arrays = {}  # each position read once
    for f in frames:
        a = f["array"]
        if a["position"] not in arrays:  # moved-aside arrays open too
            arrays[a["position"]] = read_position(out, a["position"])
        data = arrays[a["position"]]
        if not f.get("partial"):
            assert data[a["t"], a["c"], a["z"]].any()
    assert len({f["frame_index"] for f in frames}) == len(frames)  # unique
    assert all(f["frame_index"] != 999 for f in frames)  # the cut-off line is gone
    # the partly imaged fields were moved aside, not overwritten
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "completed"
    (resumed,) = info["resumed"]
    assert resumed["finished_positions"] == len(kept)
    assert lost in resumed["partial"]
    pointed = {f["array"]["position"] for f in frames}
    for name, moved in resumed["moved_aside"].items():
        assert name in state.partial
        # its logged frames point at it (and opened above); a kill between an
        # image's group and its first array leaves one with no frame at all
        has_array = (position_path(out, moved) / "0").is_dir()
        assert has_array or moved not in pointed
    assert resumed["moved_aside"][lost] in pointed
    assert info["summary"]["frames_acquired"] == len(frames)
    assert info["summary"]["positions"] == N_POSITIONS


def test_resume_of_a_completed_run_does_nothing(reference):
    before = (reference / "run.json").read_text()
    result = smartscope("resume", str(reference))
    assert result.returncode == 0, result.stderr
    assert "nothing to resume" in result.stdout
    assert (reference / "run.json").read_text() == before


@pytest.mark.parametrize("content", [None, "not json", '{"status": "running"}'])
def test_resume_of_a_directory_without_a_run_exits_2(tmp_path, content):
    if content is not None:
        (tmp_path / "run.json").write_text(content)
    result = smartscope("resume", str(tmp_path))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr


# ------------------------------------------------------ policies after a resume
PLATE_DEMO = Path(__file__).parents[1] / "demos" / "plate_screen.yaml"


@pytest.fixture(scope="module")
def plate_experiment(tmp_path_factory) -> Path:
    """The plate demo on its first six wells: E4..E9 (E5 a hit well, E9 empty)."""
    text = PLATE_DEMO.read_text()
    text = text.replace(
        "config: ../hardware_configs/plate.cfg",
        f"config: {PLATE_DEMO.parents[1] / 'hardware_configs' / 'plate.cfg'}",
    )
    rows = "      - [4, 4, 4, 4, 4, 4, 5, 5, 5, 5, 5, 5]\n"
    cols = "      - [3, 4, 5, 6, 7, 8, 8, 7, 6, 5, 4, 3]\n"
    assert rows in text and cols in text
    text = text.replace(rows, "      - [4, 4, 4, 4, 4, 4]\n")
    text = text.replace(cols, "      - [3, 4, 5, 6, 7, 8]\n")
    path = tmp_path_factory.mktemp("plate") / "plate6.yaml"
    path.write_text(text)
    return path


def _stored(run_dir: Path) -> Counter:
    """(array, t, c, z) of every frame kept in the run (base, hits, autofocus)."""
    return Counter(
        (f["array"]["position"], f["array"]["t"], f["array"]["c"], f["array"]["z"])
        for f in read_jsonl(run_dir / "frames.jsonl")
        if not f.get("partial")
    )


def test_kill_9_mid_well_then_resume_keeps_the_policies_state(
    plate_experiment, tmp_path
):
    """Quota counts, a well's focus and hit wells survive a kill -9."""
    reference = tmp_path / "ref"
    result = smartscope("run", str(plate_experiment), "--out", str(reference))
    assert result.returncode == 0, result.stderr

    out = tmp_path / "run"
    # in the middle of well E6: after its autofocus and its first fields, with
    # the hit well E5 (and its targets) behind
    _run_and_kill_9(
        plate_experiment,
        out,
        lambda frames: any(f["position"] == "E6_0002" for f in frames),
    )
    state = inspect_run(out)
    assert {"E5_0000", "E6_0000", "hit_E5_000", "af_E6"} <= set(
        state.finished + state.skipped + state.kept_added
    )
    kept = {p: read_position(out, p) for p in state.finished + state.kept_added}
    # the policies are given again every analysed frame of what is kept (not
    # those skipped for fresher ones or failed)
    analysed = {
        r["frame_index"]
        for r in read_jsonl(out / "detections.jsonl")
        if r.get("frame_index") is not None and not {"error", "skipped"} & set(r)
    }
    kept_names = set(state.finished + state.skipped + state.kept_added)
    to_replay = [
        f
        for f in read_jsonl(out / "frames.jsonl")
        if f["array"]["position"] in kept_names
        and f["frame_index"] in analysed
        and not f.get("partial")
        and not f.get("dropped")
    ]
    assert len(state.replay) == len(to_replay) > 0

    result = smartscope("resume", str(out))
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    said = " ".join(result.stdout.split())  # the console wraps long lines
    assert f"{len(state.replay)} analysed frames given to the policies" in said

    # the very same frames as the uninterrupted run, each stored once: no field
    # of E6 beyond its quota, no second autofocus of E6, the hit targets of E5
    # not imaged again
    stored = _stored(out)
    assert stored == _stored(reference)
    assert set(stored.values()) == {1}
    for p, data in kept.items():
        assert (read_position(out, p) == data).all()
    for name in {p for p, *_ in stored}:
        assert read_position(out, name).any()  # every array opens, with data
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "completed"
    assert info["resumed"][0]["replayed_frames"] == len(to_replay)
    ref_info = json.loads((reference / "run.json").read_text())
    # the policies' own account covers the whole run, as if never interrupted
    assert info["policy_reports"] == ref_info["policy_reports"]
    assert info["policy_reports"]["hit_detection"]["hits"] == ["E5"]


def test_replay_queues_again_only_the_targets_not_stored(tmp_path):
    """A decision replayed after a resume adds only what is not on disk yet."""
    import numpy as np
    from useq import MDAEvent, MDASequence

    from smartscope.detections import Detections
    from smartscope.frame import Frame
    from smartscope.policies import FindAndCenter, PolicyContext
    from smartscope.rundir import RunStorage, event_location
    from smartscope.scheduler import Scheduler
    from smartscope.stream import FrameStream, InferenceWorker

    sched = Scheduler(MDASequence(stage_positions=[(0.0, 0.0, 0.0)]), clock=lambda: 0)
    storage = RunStorage(tmp_path)
    policy = FindAndCenter()
    worker = InferenceWorker(
        FrameStream(),
        None,  # type: ignore[arg-type]  # replay segments nothing
        [policy],
        sched,
        to_stage=lambda px, xy, _ps: px - 256 + np.asarray(xy),
        context=PolicyContext(),
        clock=lambda: 0.0,
        storage=storage,
    )
    labels = np.zeros((512, 512), np.uint16)
    labels[100:120, 100:120] = 1
    labels[300:320, 400:420] = 2
    image = np.where(labels > 0, 500, 100).astype(np.uint16)
    det = Detections.from_labels(
        labels, image, to_stage=lambda px: px - 256, frame_index=7
    )
    event = MDAEvent(x_pos=0.0, y_pos=0.0, z_pos=0.0, index={"t": 0})
    frame = Frame(7, event, "p000", "base", 0.0, 0.0, 0.0, "DAPI", 10.0, 1.0)
    frame.t_clock = -2.0
    on_disk = {("target_0000", 0, 0, 0)}  # the nearer target was imaged

    n = worker.replay([(frame, det)], stored=lambda e: event_location(e) in on_disk)
    storage.close()

    assert n == 1
    assert policy.n_targets == 2  # the policy remembers both objects
    (queued,) = sched.upcoming()
    assert queued.pos_name == "target_0001"
    (decision,) = read_jsonl(tmp_path / "decisions.jsonl")
    assert decision["replayed"] is True
    assert decision["trigger"]["frame_index"] == 7
    assert decision["actions"][0]["n_events"] == 1
