"""`smartscope reanalyze`: re-segment a finished run on dask.distributed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from smartscope import RegistryError
from smartscope.reanalyze import (
    DASK_HINT,
    ReanalysisError,
    parse_model,
    reanalysis_name,
    reanalyze,
)
from smartscope.rundir import array_names, position_path, read_jsonl, read_position


def _copy(run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


def _new_labels(run: Path, position: str, name: str) -> Path:
    """Where reanalyze puts labels named `name`: beside the live ones."""
    return position_path(run, position) / "labels" / name


def _has_labels(run: Path, name: str) -> bool:
    return any(
        (position_path(run, p) / "labels" / name / "0").is_dir()
        for p in array_names(run)
    )


def _live_labels(run: Path) -> dict[str, int]:
    """Each position's live labels: the size of every chunk file on disk."""
    out = {}
    for p in array_names(run):
        folder = position_path(run, p, labels=True)
        out.update(
            {
                str(f.relative_to(run)): f.stat().st_size
                for f in folder.rglob("*")
                if f.is_file()
            }
        )
    return out


def _read(path: Path) -> np.ndarray:
    import tensorstore as ts

    store = ts.open(
        {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path / "0")}}
    ).result()
    return np.asarray(store.read().result())


def _n_objects(labels: np.ndarray) -> int:
    return len(np.unique(labels[labels > 0]))


def _matched_ious(old: np.ndarray, new: np.ndarray) -> list[float]:
    """IoU of each pair of objects (old, new) that overlap by more than half.

    Above 0.5 an object has at most one such partner: the pairs are the
    one-to-one matches at IoU 0.5.
    """
    ious = []
    for a in np.unique(old[old > 0]):
        mine = old == a
        for b in np.unique(new[mine]):
            if b == 0:
                continue
            other = new == b
            iou = (mine & other).sum() / (mine | other).sum()
            if iou > 0.5:
                ious.append(float(iou))
    return ious


def _live(run: Path) -> dict[int, dict]:
    return {
        r["frame_index"]: r
        for r in read_jsonl(run / "detections.jsonl")
        if "frame_index" in r and not r.get("dropped")
    }


def test_same_model_on_local_cluster_reproduces_live_labels(demo_run, tmp_path):
    run = _copy(demo_run[0], tmp_path)
    live_before = _live_labels(run)
    result = reanalyze(run, workers=1, processes=True)  # the run's own segmenter

    frames = read_jsonl(run / "frames.jsonl")
    live = _live(run)
    assert result["same_model"] and result["name"] == result["model"]["model_id"]
    assert result["cluster"]["scheduler"] == "local"
    assert len(result["cluster"]["workers_used"]) == 1
    overall = result["overall"]
    assert overall["n_frames"] == len(frames)
    assert overall["n_compared"] == len(live) > 0
    assert overall["f1@0.5"] == 1.0 and overall["identical_fraction"] == 1.0
    assert overall["objects_old"] == sum(r["n_detections"] for r in live.values())
    assert overall["objects_old"] == overall["objects_new_compared"]
    saved = json.loads(Path(result["path"]).read_text())
    assert saved["overall"] == overall and len(saved["frames"]) == len(frames)

    # every label plane: same layout as the images; live frames identical
    arrays: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
    for rec in frames:
        a = rec["array"]
        if a["position"] not in arrays:
            new = _read(_new_labels(run, a["position"], result["name"]))
            assert new.shape == read_position(run, a["position"]).shape
            live_dir = position_path(run, a["position"], labels=True)
            has_live = (live_dir / "0").exists()
            old = read_position(run, a["position"], labels=True) if has_live else None
            arrays[a["position"]] = (new, old)
        new, old = arrays[a["position"]]
        plane = new[a["t"], a["c"], a["z"]]
        if rec["frame_index"] in live:
            np.testing.assert_array_equal(plane, old[a["t"], a["c"], a["z"]])
        else:  # never analysed live: segmented now
            row = next(
                r for r in result["frames"] if r["frame_index"] == rec["frame_index"]
            )
            assert not row["analysed_live"] and row["n_old"] is None
            assert row["n_new"] == len(np.unique(plane[plane > 0]))
    assert _live_labels(run) == live_before


def test_other_model_writes_labels_beside_and_compares(demo_run, tmp_path):
    run = _copy(demo_run[0], tmp_path)
    lines = []
    result = reanalyze(
        run, "unet", workers=2, processes=False, progress=lines.append
    )  # the built-in U-Net vs the demo's threshold baseline

    assert result["name"] == "unet-builtin" and not result["same_model"]
    assert result["model"]["model_id"].startswith("builtin-")
    assert _has_labels(run, "segmentation") and _has_labels(run, "unet-builtin")
    saved = json.loads((run / "reanalysis-unet-builtin.json").read_text())
    live = _live(run)
    positions = {r["position"] for r in saved["frames"]}
    assert len(lines) == len(positions)
    new_labels = {p: _read(_new_labels(run, p, "unet-builtin")) for p in positions}
    for row in saved["frames"]:
        a = row["array"]
        new = new_labels[row["position"]][a["t"], a["c"], a["z"]]
        assert row["n_new"] == _n_objects(new)
        if row["analysed_live"]:
            old = read_position(run, row["position"], labels=True)
            old = old[a["t"], a["c"], a["z"]]
            assert row["n_old"] == live[row["frame_index"]]["n_detections"]
            assert row["n_old"] == _n_objects(old)
            assert row["identical"] is False
            # the comparison, counted object by object here
            ious = _matched_ious(old, new)
            n = row["n_old"] + row["n_new"]
            assert row["f1@0.5"] == pytest.approx(
                2 * len(ious) / n if n else 1.0, abs=1e-4
            )
            if ious:
                assert row["mean_iou"] == pytest.approx(np.mean(ious), abs=1e-4)
            else:
                assert row["mean_iou"] is None
        else:
            assert row["n_old"] is None and row["f1@0.5"] is None
    o = saved["overall"]
    assert o["n_compared"] == len(live) and o["identical_fraction"] == 0.0
    assert o["n_new_only"] == o["n_frames"] - o["n_compared"] > 0
    for position in positions:
        labels = _read(_new_labels(run, position, "unet-builtin"))
        assert labels.dtype == np.uint16
        assert labels.shape == read_position(run, position).shape


def test_existing_cluster_by_address(demo_run, tmp_path):
    from distributed import Client, LocalCluster

    run = _copy(demo_run[0], tmp_path)
    with LocalCluster(
        n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None
    ) as cluster:
        address = cluster.scheduler_address
        result = reanalyze(run, "threshold:sigma_px=2", scheduler=address)
        with Client(address) as client:  # still up: not ours to close
            assert client.submit(sum, [1, 2]).result() == 3
    assert result["cluster"]["scheduler"] == address
    assert result["name"] == result["model"]["model_id"] != result["live_model_id"]
    assert result["name"].startswith("threshold-")
    assert _has_labels(run, result["name"])
    assert result["overall"]["n_compared"] == len(_live(run))


# ------------------------------------------------- a cluster in other processes
DASK_CLI = Path(sys.executable).parent / "dask"


def _stop(proc: subprocess.Popen) -> None:
    """Stop a cluster process (SIGTERM: a graceful close), else kill it; reap it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


@pytest.fixture
def dask_processes(tmp_path):
    """A dask scheduler and one worker, each a ``dask`` CLI process of this venv.

    Yields the scheduler's address (read from its scheduler file) once the
    worker has joined; both processes are stopped and reaped afterwards.
    """
    from distributed import Client

    if not DASK_CLI.is_file():
        pytest.fail(
            f"no dask command line at {DASK_CLI}: pip install -e '.[test]'",
            pytrace=False,
        )
    scheduler_file = tmp_path / "scheduler.json"
    # run the cluster where the run is not: workers only see the planes sent
    cwd = tmp_path / "cluster"
    cwd.mkdir()
    env = {**os.environ, "CI": "true"}
    procs: list[subprocess.Popen] = []
    with open(tmp_path / "cluster.log", "w") as log:
        try:
            procs.append(
                subprocess.Popen(
                    [str(DASK_CLI), "scheduler", "--host", "127.0.0.1", "--port",
                     "0", "--no-dashboard", "--scheduler-file", str(scheduler_file),
                     "--idle-timeout", "300"],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=cwd, env=env,
                )
            )  # fmt: skip
            deadline = time.monotonic() + 60
            address = None
            while address is None:
                if procs[0].poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"dask scheduler did not start: {_tail(tmp_path)}")
                try:
                    address = json.loads(scheduler_file.read_text())["address"]
                except (OSError, ValueError, KeyError):
                    time.sleep(0.2)
            procs.append(
                subprocess.Popen(
                    [str(DASK_CLI), "worker", "--scheduler-file", str(scheduler_file),
                     "--nthreads", "1", "--no-nanny", "--no-dashboard",
                     "--death-timeout", "60", "--local-directory", str(cwd)],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=cwd, env=env,
                )
            )  # fmt: skip
            with Client(address, timeout="30s") as client:
                client.wait_for_workers(1, timeout=120)
            yield address
        finally:
            for proc in reversed(procs):  # the worker, then the scheduler
                _stop(proc)


def _tail(tmp_path: Path) -> str:
    return (tmp_path / "cluster.log").read_text()[-2000:]


def test_cli_on_a_cluster_of_other_processes(demo_run, tmp_path, dask_processes):
    from distributed import Client

    run = _copy(demo_run[0], tmp_path)
    live_spec = json.loads((run / "run.json").read_text())["experiment"]["segmenter"]
    params = ",".join(f"{k}={v}" for k, v in live_spec.items() if k != "name")
    model = f"{live_spec['name']}:{params}"  # the live run's segmenter, explicitly
    proc = _cli(str(run), "--model", model, "--scheduler", dask_processes)
    assert proc.returncode == 0, proc.stderr + _tail(tmp_path)

    with Client(dask_processes, timeout="30s") as client:  # still up: not ours
        workers = set(client.scheduler_info()["workers"])
    result = json.loads(next(run.glob("reanalysis-*.json")).read_text())
    assert result["cluster"]["scheduler"] == dask_processes
    assert result["cluster"]["processes"] is None
    assert set(result["cluster"]["workers_used"]) == workers  # the remote worker
    assert result["same_model"]
    assert result["model"]["worker_model_ids"] == [result["live_model_id"]]
    live = _live(run)
    overall = result["overall"]
    assert overall["n_compared"] == len(live) > 0
    assert overall["identical_fraction"] == 1.0 and overall["f1@0.5"] == 1.0
    assert overall["n_frames"] == len(read_jsonl(run / "frames.jsonl"))
    for position in {r["position"] for r in result["frames"] if r["analysed_live"]}:
        new = _read(_new_labels(run, position, result["name"]))
        old = read_position(run, position, labels=True)
        for row in result["frames"]:
            if row["position"] == position and row["analysed_live"]:
                a = row["array"]
                np.testing.assert_array_equal(
                    new[a["t"], a["c"], a["z"]], old[a["t"], a["c"], a["z"]]
                )
    assert "comparison" in proc.stdout

    # a model file given relative to here: the workers run elsewhere
    from smartscope.segment._model import BUILTIN

    shutil.copy(BUILTIN, tmp_path / "nuclei.pt")
    proc = _cli(
        str(run), "--model", "nuclei.pt", "--scheduler", dask_processes, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr + _tail(tmp_path)
    result = json.loads((run / "reanalysis-nuclei.json").read_text())
    assert result["model"]["spec"]["model"] == str(tmp_path / "nuclei.pt")
    assert result["model"]["worker_model_ids"] == [result["model"]["model_id"]]
    assert result["overall"]["n_frames"] == overall["n_frames"]
    assert _has_labels(run, "nuclei")


@pytest.mark.parametrize(
    "address",
    ["tcp://127.0.0.1:9", "nonsense", "foo://127.0.0.1:8786"],
    ids=["refused", "no-port", "bad-scheme"],
)
def test_cli_bad_scheduler_address_exits_2_with_one_line(demo_run, address):
    # a hang (no connect timeout) ends in _cli's subprocess timeout
    proc = _cli(str(demo_run[0]), "--model", "threshold", "--scheduler", address)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(
        f"error: cannot connect to the dask scheduler at {address}: "
    )
    assert not list(Path(demo_run[0]).glob("reanalysis-*.json"))


def test_model_specs_and_names():
    assert parse_model("builtin") == {"name": "unet", "model": "builtin"}
    assert parse_model("models/nuclei/model.pt") == {
        "name": "unet",
        "model": "models/nuclei/model.pt",
    }
    assert parse_model("threshold:sigma_px=2,threshold=triangle") == {
        "name": "threshold",
        "sigma_px": 2,
        "threshold": "triangle",
    }
    assert reanalysis_name(parse_model("unet")) == "unet-builtin"
    assert reanalysis_name(parse_model("x/nuclei/model.pt")) == "nuclei"
    assert reanalysis_name(parse_model("x/big.pt")) == "big"
    assert reanalysis_name({"name": "threshold"}, "threshold-1234") == (
        "threshold-1234"
    )
    with pytest.raises(ReanalysisError, match="key=value"):
        parse_model("threshold:sigma_px")
    # a user's class by import path, with parameters after a second ':'
    assert parse_model("labmods.seg:MySegmenter") == {"name": "labmods.seg:MySegmenter"}
    assert parse_model("labmods:Seg:sigma=2,sizes=[3,5],mode=fast") == {
        "name": "labmods:Seg",
        "sigma": 2,
        "sizes": [3, 5],
        "mode": "fast",
    }
    # a model file of a plugin, as `smartscope segment --model` takes it
    with pytest.raises(RegistryError, match=r"model file not found: nope\.onnx"):
        parse_model("nope.onnx")


def test_missing_dask_is_one_clear_error(demo_run, monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)
    with pytest.raises(ReanalysisError, match=r"smartscope\[dask\]") as e:
        reanalyze(demo_run[0], "threshold")
    assert str(e.value) == DASK_HINT


def test_cli_without_dask_says_how_to_install(demo_run):
    code = (
        "import sys; sys.modules['distributed'] = None; "
        "from smartscope.cli import main; "
        f"sys.argv = ['smartscope', 'reanalyze', {str(demo_run[0])!r}]; main()"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "CI": "true", "COLUMNS": "200"},
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == f"error: {DASK_HINT}"


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "CI": "true", "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "smartscope.cli", "reanalyze", *args],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        env=env,
        cwd=cwd,
    )


@pytest.mark.parametrize(
    ("where", "args", "message"),
    [
        ("missing", [], "no run directory"),
        ("empty", [], "not a run directory"),
        ("run", ["--model", "nosuch"], "unknown segmenter 'nosuch'"),
        ("run", ["--model", "missing.pt"], "model file not found"),
        ("run", ["--name", "../up"], "bad reanalysis name"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(demo_run, tmp_path, where, args, message):
    run = {
        "missing": tmp_path / "nope",
        "empty": tmp_path,
        "run": demo_run[0],
    }[where]
    proc = _cli(str(run), *args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert message in lines[0]
    assert not list(Path(demo_run[0]).glob("reanalysis-*.json"))


SEGMENTERS = """
import time

from pydantic import PrivateAttr

from smartscope.segment import ThresholdSegmenter


class Flaky(ThresholdSegmenter):
    \"\"\"Raises at its `fail_calls`-th calls (1: the test frame).\"\"\"

    fail_calls: tuple = ()
    _n: int = PrivateAttr(0)

    def segment(self, images):
        self._n += 1
        if self._n in self.fail_calls:
            raise RuntimeError("model crashed")
        return super().segment(images)


class Stuck(ThresholdSegmenter):
    \"\"\"Hangs from its `stuck_from`-th call on (a deadlocked model).\"\"\"

    stuck_from: int = 2
    _n: int = PrivateAttr(0)

    def segment(self, images):
        self._n += 1
        if self._n >= self.stuck_from:
            time.sleep(3600)
        return super().segment(images)
"""


@pytest.fixture
def lab_segmenters(tmp_path, monkeypatch):
    """A user's module of segmenters, importable as ``labsegs`` (subprocesses)."""
    folder = tmp_path / "mods"
    folder.mkdir()
    (folder / "labsegs.py").write_text(SEGMENTERS)
    paths = [str(folder), os.environ.get("PYTHONPATH", "")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in paths if p))
    return folder


def _positions_of(result: dict) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for row in result["frames"]:
        out.setdefault(row["position"], []).append(row)
    return out


def test_frames_the_segmenter_fails_on_are_listed_and_the_rest_done(
    demo_run, tmp_path, lab_segmenters
):
    """Was a traceback and exit 1, with nothing written: one bad batch lost
    the whole reanalysis."""
    run = _copy(demo_run[0], tmp_path)
    # call 1 is each build's test frame; the worker's calls 3 and 5 fail
    proc = _cli(str(run), "--model", "labsegs:Flaky:fail_calls=[3,5]", "--workers", "1")
    assert proc.returncode == 3, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: the segmenter failed")
    assert lines[0].endswith("RuntimeError: model crashed")
    result = json.loads(next(run.glob("reanalysis-*.json")).read_text())
    assert result["status"] == "completed_with_errors"
    failed = [r for r in result["frames"] if "error" in r]
    assert failed and all(r["error"] == "RuntimeError: model crashed" for r in failed)
    assert result["errors"] == [
        {"error": "RuntimeError: model crashed", "frames": len(failed)}
    ]
    assert result["overall"]["n_failed"] == len(failed)
    assert (
        len(failed)
        < result["overall"]["n_frames"]
        == len(read_jsonl(run / "frames.jsonl"))
    )
    # failed frames: empty labels; the others: objects where the image has them
    for position, rows in _positions_of(result).items():
        labels = _read(_new_labels(run, position, result["name"]))
        for row in rows:
            a = row["array"]
            plane = labels[a["t"], a["c"], a["z"]]
            if "error" in row:
                assert not plane.any() and row["n_new"] is None
            else:
                assert _n_objects(plane) == row["n_new"]
    assert result["overall"]["objects_new"] > 0


def test_a_hung_segmenter_fails_the_frames_left_after_the_timeout(
    demo_run, tmp_path, lab_segmenters
):
    """Was a reanalysis that never ended. The local worker is stopped."""
    run = _copy(demo_run[0], tmp_path)
    # the worker's test frame and first two batches pass, then it hangs
    proc = _cli(
        str(run), "--model", "labsegs:Stuck:stuck_from=4", "--workers", "1",
        "--timeout", "3",
    )  # fmt: skip
    assert proc.returncode == 3, proc.stderr
    why = "segmenter did not answer within 3 s"
    assert proc.stderr.strip().endswith(why)
    result = json.loads(next(run.glob("reanalysis-*.json")).read_text())
    done = [r for r in result["frames"] if "error" not in r]
    assert len(done) == 2  # the first two batches: one frame each (a tile)
    assert {r["error"] for r in result["frames"] if "error" in r} == {why}
    assert len(result["frames"]) == len(read_jsonl(run / "frames.jsonl"))
    for position in _positions_of(result):  # every position written
        assert _read(_new_labels(run, position, result["name"])).ndim == 5

    # hung on the test frame, here before any cluster: one line, exit 2
    proc = _cli(str(run), "--model", "labsegs:Stuck:stuck_from=1", "--timeout", "2")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == (
        "error: segmenter 'labsegs:Stuck' did not segment a test frame within 2 s"
    )
