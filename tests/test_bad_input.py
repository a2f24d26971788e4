"""Bad input on the command line: one ``error:`` line, exit code 2, nothing runs.

Each case runs the real CLI in a subprocess as CI does (``CI=true``, no
terminal, no stdin) and checks the exit code, that stderr is exactly one line
naming the problem, and that no traceback is printed. Positions outside the
safety limits or not finite, plans too large to run, unknown keys at any depth
(with the closest valid key), and output paths that cannot be written are
refused before anything moves or is allocated.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import useq
import yaml
from _closed_loop import smartscope

from smartscope.limits import PlanError, check_plan_size

ROOT = Path(__file__).resolve().parents[1]
DAPI = [{"config": "DAPI", "exposure": 10}]


def _experiment(**overrides) -> dict:
    exp = {
        "name": "bad",
        "sequence": {
            "stage_positions": [{"x": 0.0, "y": 0.0, "z": 0.0, "name": "here"}],
            "channels": DAPI,
        },
    }
    exp.update(overrides)
    return exp


def _sequence(**seq) -> dict:
    return _experiment(sequence={"channels": DAPI, **seq})


def _at(**xyz) -> dict:
    return _sequence(stage_positions=[{"x": 0.0, "y": 0.0, "name": "there", **xyz}])


FIND = {"name": "find_and_center", "channel": "FITC"}

#: id -> (experiment, the text the error line must contain)
CASES: dict[str, tuple[dict, str]] = {
    "nan_position": (
        _at(x=float("nan")),
        "stage position 'there': x = nan µm is not a finite number",
    ),
    "infinite_z": (_at(z=float("inf")), "z = inf µm is not a finite number"),
    "x_1e12": (
        _at(x=1e12),
        "stage position 'there': x = 1e+12 µm is outside the X limits "
        "[-100000, 100000] µm",
    ),
    "z_minus_1e9": (_at(z=-1e9), "z = -1e+09 µm is outside the Z limits"),
    "grid_off_the_stage": (
        _sequence(
            stage_positions=[{"x": 99_900.0, "y": 0.0, "name": "edge"}],
            grid_plan={"rows": 1, "columns": 3},
        ),
        "stage position 'edge': x = 100412 µm is outside the X limits",
    ),
    "outside_experiment_limits": (
        {**_at(y=50.0), "limits": {"y_um": [-10, 10]}},
        "y = 50 µm is outside the Y limits [-10, 10] µm",
    ),
    "exposure_over_the_maximum": (
        _sequence(channels=[{"config": "DAPI", "exposure": 20000}]),
        "channel 'DAPI': exposure 20000 ms exceeds the maximum of 10000 ms",
    ),
    "grid_100000_squared": (
        _sequence(grid_plan={"rows": 100000, "columns": 100000}),
        "the base plan has 10,000,000,000 events",
    ),
    "time_plan_too_long": (
        _sequence(time_plan={"interval": 0.001, "duration": 1e8}),
        "events (1 positions x 100,000,000,001 timepoints",
    ),
    "typo_in_sequence": (
        _sequence(time_plann={"interval": 1, "loops": 3}),
        "sequence.time_plann: Extra inputs are not permitted (unknown key; did "
        "you mean 'time_plan'?)",
    ),
    "typo_in_time_plan": (
        _sequence(time_plan={"interval": 1, "loops": 3, "loopz": 4}),
        "sequence.time_plan.loopz: Extra inputs are not permitted (unknown key; "
        "did you mean 'loops'?)",
    ),
    "typo_in_a_position": (
        _sequence(stage_positions=[{"x": 0, "y": 0, "zz": 1}]),
        "sequence.stage_positions.0.zz: Extra inputs are not permitted (unknown "
        "key; did you mean 'z'?)",
    ),
    "typo_in_a_grid": (
        _sequence(grid_plan={"rows": 2, "columns": 2, "overlapp": 10}),
        "sequence.grid_plan.overlapp: Extra inputs are not permitted (unknown "
        "key; did you mean 'overlap'?)",
    ),
    "typo_at_the_top": (
        {**_experiment(), "polices": []},
        "polices: Extra inputs are not permitted (unknown key; did you mean "
        "'policies'?)",
    ),
    "typo_in_analysis": (
        _experiment(analysis={"batchsize": 2}),
        "analysis.batchsize: Extra inputs are not permitted (unknown key; did "
        "you mean 'batch_size'?)",
    ),
    "typo_in_a_policy": (
        _experiment(policies=[{**FIND, "match_radius": 6}]),
        "policies.0.match_radius: Extra inputs are not permitted (unknown key; "
        "did you mean 'match_radius_um'?)",
    ),
    "typo_in_a_policy_filter": (
        _experiment(policies=[{**FIND, "filter": {"min_aera_px": 3}}]),
        "policies.0.filter.min_aera_px: Extra inputs are not permitted (unknown "
        "key; did you mean 'min_area_px'?)",
    ),
    "typo_in_the_segmenter": (
        _experiment(segmenter={"name": "threshold", "sigma": 1.0}),
        "segmenter.sigma: Extra inputs are not permitted (unknown key; did you "
        "mean 'sigma_px'?)",
    ),
    "typo_in_limits": (
        _experiment(limits={"max_exposure": 50}),
        "limits.max_exposure: Extra inputs are not permitted (unknown key; did "
        "you mean 'max_exposure_ms'?)",
    ),
    "inverted_limits": (
        _experiment(limits={"x_um": [5, -5]}),
        "limits.x_um: the minimum must be below the maximum",
    ),
    "unknown_on_error": (
        _experiment(policies=[{"name": "skip_empty", "on_error": "explode"}]),
        "policies.0.on_error: Input should be 'disable', 'skip' or 'stop'",
    ),
    "negative_retries": (
        _experiment(hardware={"retries": -1}),
        "hardware.retries: Input should be greater than or equal to 0",
    ),
    "full_disk": (
        _experiment(output={"min_free_mb": 1e12}),
        "not enough free space for the run in",
    ),
}


def _check_one_line(result: subprocess.CompletedProcess, expected: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    assert expected in lines[0], lines[0]
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.parametrize("case", list(CASES))
def test_run_refuses_bad_input(case, tmp_path):
    data, expected = CASES[case]
    path = tmp_path / f"{case}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    out = tmp_path / "run"
    result = smartscope("run", str(path), "--out", str(out))
    _check_one_line(result, expected)
    assert not out.exists()  # nothing was written, not even the folder


@pytest.mark.parametrize("case", ["nan_position", "x_1e12", "typo_in_sequence"])
def test_validate_refuses_bad_input(case, tmp_path):
    data, expected = CASES[case]
    path = tmp_path / f"{case}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    _check_one_line(smartscope("validate", str(path)), expected)


def _output_cases(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    return {
        "out_is_a_file": (a_file, "(" + str(a_file) + ") is a file, not a directory"),
        "out_under_a_file": (
            a_file / "run",
            "a parent (" + str(a_file) + ") is a file",
        ),
        "out_unwritable": (
            Path("/sys/smartscope-cannot-write-here/run"),
            "cannot write the run to /sys/smartscope-cannot-write-here/run:",
        ),
    }


@pytest.mark.parametrize(
    "case", ["out_is_a_file", "out_under_a_file", "out_unwritable"]
)
def test_run_refuses_an_output_it_cannot_write(case, tmp_path):
    out, expected = _output_cases(tmp_path)[case]
    if case == "out_unwritable" and not Path("/sys").is_dir():
        pytest.skip("no /sys on this system")
    path = tmp_path / "ok.yaml"
    path.write_text(yaml.safe_dump(_experiment()))
    _check_one_line(smartscope("run", str(path), "--out", str(out)), expected)


def test_a_plan_whose_schedule_would_not_fit_in_memory_is_refused():
    # 360 000 positions of a time-lapse: the Scheduler keeps each one's visit
    seq = useq.MDASequence(
        grid_plan={"rows": 600, "columns": 600, "fov_width": 1, "fov_height": 1},
        time_plan={"interval": 1, "loops": 2},
        channels=["DAPI"],
    )
    with pytest.raises(PlanError, match=r"would need about 1\.\d GiB of memory"):
        check_plan_size(seq, available_bytes=2**30)
    assert check_plan_size(seq, available_bytes=8 * 2**30).events == 720_000


def test_a_disk_that_fills_during_the_run_fails_it_cleanly(tmp_path):
    """A 1.5 MB tmpfs fills after a dozen frames (root only; skipped otherwise)."""
    mnt = tmp_path / "small_disk"
    mnt.mkdir()
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1500k", "tmpfs", str(mnt)],
        capture_output=True,
    )
    if mount.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        positions = [
            {"x": 300.0 * k, "y": 0.0, "z": 0.0, "name": f"f{k}"} for k in range(40)
        ]
        data = {
            "name": "full",
            "config": str(ROOT / "hardware_configs" / "faulty.cfg"),
            "sequence": {"stage_positions": positions, "channels": DAPI},
            "analysis": {"worker": "thread"},
            "output": {"compression": "none", "min_free_mb": 0},
        }
        path = tmp_path / "full.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        out = mnt / "run"
        result = smartscope("run", str(path), "--out", str(out))

        assert result.returncode == 1, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        # the frame writer or the analysis (labels, logs) meets the full disk
        assert lines[0].startswith("error: run failed: "), lines[0]
        assert "No space left on device" in lines[0]
        assert "Traceback" not in result.stdout + result.stderr
        n_logged = len((out / "frames.jsonl").read_text().splitlines())
        assert 0 < n_logged < 40

        # with room again, resume goes on and completes the plan
        subprocess.run(["mount", "-o", "remount,size=64m", str(mnt)], check=True)
        result = smartscope("resume", str(out))
        assert result.returncode == 0, result.stderr
        info = json.loads((out / "run.json").read_text())
        assert info["status"] == "completed"
        from smartscope.rundir import load_run, read_position

        kept = {f["position"] for f in load_run(out).frames}
        assert kept == {f"f{k}" for k in range(40)}
        # a field whose array the full disk left half-created has its frame
        # written aside by the writer (overflow/), never lost
        aside = {p.name.split("_t")[0] for p in (out / "overflow").glob("*.tif")}
        for position in kept - aside:
            assert read_position(out, position).max() > 0, position
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
        shutil.rmtree(mnt, ignore_errors=True)


@pytest.mark.parametrize(
    "command",
    [
        ["segment", "{image}", "-o", "{out}/labels.tif"],
        ["export", "builtin", "-o", "{out}/model.onnx"],
        ["export", "builtin", "-f", "bioimageio", "-o", "{out}/model.zip"],
        ["train", "--out", "{out}/model", "--steps", "1", "--no-eval"],
    ],
    ids=["segment", "export_onnx", "export_bioimageio", "train"],
)
def test_model_commands_refuse_an_output_under_a_file(command, tmp_path):
    import numpy as np
    import tifffile

    image = tmp_path / "nuclei.tif"
    tifffile.imwrite(image, np.zeros((64, 64), np.uint16))
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    args = [a.format(image=image, out=a_file) for a in command]
    result = smartscope(*args)
    _check_one_line(result, f"error: {a_file}")
    assert f"{a_file} is a file, not a folder" in result.stderr
    assert a_file.read_text() == "not a directory"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["run", "x.yaml", "--bogus"], "No such option: --bogus"),
        (["segment"], "Missing argument 'image'. (see smartscope segment --help)"),
        (["bench", "segment", "--repeats", "1"], "Invalid value for '--repeats'"),
        (["frobnicate"], "No such command 'frobnicate'. (see smartscope --help)"),
    ],
    ids=["unknown_option", "missing_argument", "out_of_range", "unknown_command"],
)
def test_usage_errors_are_one_line(args, expected):
    _check_one_line(smartscope(*args), expected)
