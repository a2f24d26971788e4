"""The `smartscope` command as a user runs it: exit codes, messages, output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _closed_loop import all_stored, smartscope

from smartscope.rundir import read_jsonl

FIXTURES = Path(__file__).parent / "fixtures"
BAD = sorted(
    p for p in FIXTURES.glob("*.yaml") if p.read_text().startswith("# expect:")
)


def _expected(path: Path) -> str:
    return path.read_text().splitlines()[0].removeprefix("# expect:").strip()


@pytest.mark.parametrize("path", BAD, ids=[p.stem for p in BAD])
def test_bad_experiment_exits_2_with_one_line(path, tmp_path):
    result = smartscope("run", str(path), "--out", str(tmp_path / "run"))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert _expected(path) in lines[0]
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.parametrize("path", BAD, ids=[p.stem for p in BAD])
def test_validate_rejects_bad_experiment(path):
    result = smartscope("validate", str(path))
    assert result.returncode == 2
    assert _expected(path) in result.stderr


def test_missing_experiment_file(tmp_path):
    result = smartscope("run", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == f"error: experiment file not found: {tmp_path / 'nope.yaml'}"
    )


def test_missing_config_option(tmp_path):
    demo = Path(__file__).parents[1] / "demos" / "find_and_center.yaml"
    result = smartscope("run", str(demo), "--config", str(tmp_path / "x.cfg"))
    assert result.returncode == 2
    assert "hardware config not found" in result.stderr


def test_validate_accepts_the_demo():
    demo = Path(__file__).parents[1] / "demos" / "find_and_center.yaml"
    result = smartscope("validate", str(demo))
    assert result.returncode == 0, result.stderr
    assert "4 base events" in result.stdout


def test_demo_command_prints_summary(tmp_path):
    out = tmp_path / "demo"
    result = smartscope("demo", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "run completed" in result.stdout
    assert "frames acquired" in result.stdout
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "completed"
    # a second run into the same directory is refused, not overwritten
    again = smartscope("demo", "--out", str(out))
    assert again.returncode == 2
    assert "already holds a run" in again.stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_leaves_a_readable_interrupted_run(tmp_path, sig):
    out = tmp_path / "run"
    env = {**os.environ, "CI": "true"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "smartscope.cli",
            "run",
            str(FIXTURES / "timelapse.yaml"),
            "--out",
            str(out),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    frames_log = out / "frames.jsonl"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if frames_log.exists() and len(read_jsonl(frames_log)) >= 4:
            break
        time.sleep(0.1)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "interrupted"
    assert sig.name in info["summary"]["reason"]
    frames = read_jsonl(frames_log)
    assert 4 <= len(frames) < 400
    assert all_stored(out, frames)


def test_a_killed_benchmark_leaves_no_core_busy(tmp_path):
    """`--load`'s spinning process ends with the benchmark, even on kill -9."""
    script = (
        "import os, time\n"
        "from smartscope.bench._loop import busy_core\n"
        "with busy_core(True):\n"
        "    print(os.getpid(), flush=True)\n"
        "    time.sleep(120)\n"
    )
    bench = subprocess.Popen(
        [sys.executable, "-c", script],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        pid = int(bench.stdout.readline())
        children = Path(f"/proc/{pid}/task/{pid}/children")
        deadline = time.monotonic() + 10
        while not children.read_text().split() and time.monotonic() < deadline:
            time.sleep(0.05)
        (spinner,) = (int(c) for c in children.read_text().split())
        assert Path(f"/proc/{spinner}").exists()
    finally:
        bench.kill()
        bench.wait()
        bench.stdout.close()

    def running() -> bool:  # an exited, unreaped process is a zombie (Z)
        try:
            stat = Path(f"/proc/{spinner}/stat").read_text()
        except OSError:
            return False
        return stat.rsplit(")", 1)[1].split()[0] != "Z"

    deadline = time.monotonic() + 10
    while running() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not running()  # gone with its parent


def _has_cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("loop", "--segmenter", "nope"), "unknown segmenter 'nope'"),
        (("burst", "--segmenter", "nope"), "unknown segmenter 'nope'"),
        (("loop", "--segmenter", "onnx"), "segmenter: "),
        pytest.param(
            ("loop", "--device", "cuda"),
            "CUDA is not available",
            marks=pytest.mark.skipif(_has_cuda(), reason="this machine has CUDA"),
        ),
    ],
)
def test_bench_with_a_bad_segmenter_is_one_line(args, message):
    result = smartscope("bench", *args, "--json", timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: segmenter: "), lines
    assert message in lines[0]
    assert result.stdout == ""  # stopped before any arm ran


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--reread", "0.5"), "--reread must be more than 1"),
        (("--scale", "0"), "--scale must be in"),
    ],
)
def test_bench_segment_bad_model_options_are_one_line(args, message):
    result = smartscope("bench", "segment", *args, "--json", timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert result.stdout == ""


def test_bench_loop_reports_json():
    result = smartscope(
        "bench", "loop", "--json", "--frames", "8", "--repeats", "1", timeout=300
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["benchmark"] == "loop"
    assert data["frames"] == 8 and data["repeats"] == 1
    assert data["exposure_limited_s"] == pytest.approx(8 * data["exposure_ms"] / 1e3)
    assert set(data["cases"]) == {"1", "4"}  # the default position counts
    for key, case in data["cases"].items():
        assert case["positions"] == int(key) and case["frames"] == 8
        assert case["same_order"]
        arms = case["arms"]
        assert set(arms) == {"bare", "ome_zarr", "smartscope"}
        for arm in arms.values():  # one run each: the median is that run
            assert arm["runs_s"] == [arm["wall_s"]]
            assert arm["ratio_to_bare"] == pytest.approx(
                arm["wall_s"] / arms["bare"]["wall_s"], rel=1e-3
            )
        assert arms["ome_zarr"]["frames_stored"] == 8
        smart = arms["smartscope"]
        assert smart["frames_acquired"] == smart["frames_stored"] == 8
        assert smart["frames_missing"] == 0
        # every frame analysed or skipped for a reason; the newest is analysed
        assert smart["frames_analysed"] + sum(smart["frames_skipped"].values()) == 8
        assert smart["frames_not_analysed"] == 8 - smart["frames_analysed"]
        assert smart["frames_analysed"] >= 1
        assert data["goals"][f"{key}_positions_no_frame_missing"] is True
        assert data["goals"][f"{key}_positions_same_order"] is True
    assert data["meets_goals"] == all(data["goals"].values())
    last = data["cases"]["4"]["arms"]["smartscope"]  # the flat keys: the last case
    assert data["ratio"] == last["ratio_to_bare"]
    assert data["smart_wall_s"] == last["wall_s"]


def _broken_plugin(root: Path) -> None:
    """A third-party distribution whose code fails: on import, or on start.

    A ``*.dist-info`` folder on the path is how pip installs a distribution;
    `importlib.metadata` finds its entry points the same way.
    """
    (root / "broken_plugin").mkdir(parents=True)
    (root / "broken_plugin" / "__init__.py").write_text(
        "class Starts:\n"
        "    def __init__(self, **params):\n"
        "        raise RuntimeError('licence server unreachable')\n"
    )
    (root / "broken_plugin" / "needs_tf.py").write_text(
        "raise ImportError('No module named tensorflow')\n"
    )
    (root / "broken_plugin" / "typo.py").write_text("class Policy(:\n    pass\n")
    info = root / "broken_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.1\n"
    )
    (info / "entry_points.txt").write_text(
        "[smartscope.segmenters]\n"
        "tf_seg = broken_plugin.needs_tf:Segmenter\n"
        "licensed = broken_plugin:Starts\n"
        "[smartscope.policies]\n"
        "tf_policy = broken_plugin.needs_tf:Policy\n"
    )


@pytest.mark.parametrize(
    ("segmenter", "policy", "message"),
    [
        (
            "tf_seg",
            "skip_empty",
            "segmenter 'tf_seg' (from broken-plugin): cannot import "
            "'broken_plugin.needs_tf:Segmenter': ImportError: No module named "
            "tensorflow",
        ),
        (
            "licensed",
            "skip_empty",
            "segmenter 'licensed' failed to start: RuntimeError: licence server "
            "unreachable",
        ),
        (
            "threshold",
            "tf_policy",
            "policy 'tf_policy' (from broken-plugin): cannot import "
            "'broken_plugin.needs_tf:Policy': ImportError",
        ),
        (  # a user's own policy by import path, with a syntax error
            "threshold",
            "'broken_plugin.typo:Policy'",
            "policy 'broken_plugin.typo:Policy': cannot import "
            "'broken_plugin.typo:Policy': SyntaxError: invalid syntax",
        ),
    ],
)
def test_a_broken_plugin_is_one_line(segmenter, policy, message, tmp_path, monkeypatch):
    _broken_plugin(tmp_path / "site")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "site"))
    config = Path(__file__).parents[1] / "hardware_configs" / "demo.cfg"
    experiment = tmp_path / "x.yaml"
    experiment.write_text(
        f"config: {config}\n"
        "sequence: {stage_positions: [{x: 0, y: 0}]}\n"
        f"segmenter: {{name: {segmenter}}}\n"
        f"policies: [{{name: {policy}}}]\n"
    )
    for command in ("validate", "run"):
        result = smartscope(command, str(experiment), timeout=120)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), lines
        assert message in lines[0]
