"""`smartscope resume`: a run killed with SIGKILL goes on without re-imaging."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from _closed_loop import smartscope

from smartscope.resume import inspect_run
from smartscope.storage import read_jsonl, read_position

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


def _fields(run_dir: Path) -> Counter:
    """(position, c, z) of the stored base frames, with how often each is stored."""
    return Counter(
        (f["array"]["position"], f["array"]["c"], f["array"]["z"])
        for f in read_jsonl(run_dir / "frames.jsonl")
        if f["kind"] == "base" and not f.get("partial")
    )


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
    proc = subprocess.Popen(
        [sys.executable, "-m", "smartscope.cli", "run", str(experiment)]
        + ["--out", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "CI": "true"},
    )
    frames_log = out / "frames.jsonl"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if frames_log.exists():
            imaged = {f["position"] for f in read_jsonl(frames_log)}
            if len(imaged) >= 5:
                break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert json.loads((out / "run.json").read_text())["status"] == "running"

    # what a kill can leave: a log line cut off mid-write, a frame logged whose
    # chunk never reached the disk
    with frames_log.open("a") as fh:
        fh.write('{"frame_index": 999, "position": "p0')
    before = inspect_run(out)
    assert before.finished, "killed before any field was finished"
    lost = before.finished[0]
    chunk = out / "images" / f"{lost}.ome.zarr" / "0" / "c" / "0" / "0" / "1" / "0"
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
    for f in frames:
        a = f["array"]
        data = read_position(out, a["position"])  # moved-aside arrays open too
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
    for name, moved in resumed["moved_aside"].items():
        assert (out / "images" / f"{moved}.ome.zarr").is_dir()
        assert name in state.partial
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
