"""The live window (pytest-qt, offscreen) on the real demo core."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _closed_loop import paused_with_nothing_under_way
from qtpy.QtCore import Qt
from qtpy.QtGui import QImage

from smartscope.approval import REFUSED_BY_OPERATOR
from smartscope.experiment import Experiment
from smartscope.gui import MainWindow
from smartscope.gui._frame_view import OUTLINE_COLOR
from smartscope.rundir import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "demos" / "find_and_center.yaml"
RUN_TIMEOUT_MS = 60_000


def experiment(
    positions=((0, 0),), *, loops=1, interval=0.0, max_targets=None, exposure=5
) -> Experiment:
    """Bead fields in DAPI; find_and_center images beads centered in FITC."""
    sequence = {
        "stage_positions": [
            {"x": x, "y": y, "z": 0, "name": f"f{i}"}
            for i, (x, y) in enumerate(positions)
        ],
        "channels": [{"config": "DAPI", "exposure": exposure}],
    }
    if loops > 1:
        sequence["time_plan"] = {"interval": interval, "loops": loops}
    policy = {
        "name": "find_and_center",
        "survey_channel": "DAPI",
        "channel": "FITC",
        "exposure_ms": 5,
        "filter": {"min_area_px": 10, "exclude_border": True},
    }
    if max_targets:
        policy["max_targets"] = max_targets
    return Experiment.model_validate(
        {
            "name": "gui",
            "sequence": sequence,
            "segmenter": {"name": "threshold", "sigma_px": 1.0, "min_area_px": 6},
            "policies": [policy],
            "analysis": {"analyze": "base"},
        }
    )


@pytest.fixture
def open_window(qtbot, tmp_path):
    """Open windows; each is closed (run cancelled, core released) afterwards."""
    windows: list[MainWindow] = []

    def open_(exp: Experiment, **kwargs) -> MainWindow:
        window = MainWindow(exp, out_dir=tmp_path / f"run{len(windows)}", **kwargs)
        windows.append(window)
        window.show()
        return window

    yield open_
    for window in windows:
        try:
            window.close()
        finally:
            if window.runner is not None:
                window.runner.close()
    gc.collect()


def wait_for_end(qtbot, window: MainWindow):
    with qtbot.waitSignal(window.runEnded, timeout=RUN_TIMEOUT_MS):
        pass
    return window.summary


def overlay_pixels(widget) -> int:
    """Pixels of the outline colour in a rendering of `widget`."""
    image = widget.grab().toImage().convertToFormat(QImage.Format.Format_RGB888)
    h, w, bpl = image.height(), image.width(), image.bytesPerLine()
    arr = np.frombuffer(image.constBits(), np.uint8, bpl * h).reshape(h, bpl)
    rgb = arr[:, : 3 * w].reshape(h, w, 3).astype(int)
    target = np.array(OUTLINE_COLOR.getRgb()[:3])
    return int((np.abs(rgb - target).sum(axis=2) < 40).sum())


def test_start_from_the_window_frames_arrive_and_overlay_matches_detections(
    qtbot, open_window
):
    window = open_window(experiment([(0, 0), (600, 0)], max_targets=2))
    qtbot.mouseClick(window.start_button, Qt.MouseButton.LeftButton)
    assert window.is_running(), window.last_error
    qtbot.waitUntil(lambda: window.live_view.image is not None, timeout=20_000)
    summary = wait_for_end(qtbot, window)

    assert summary.status == "completed"
    assert window.feed.n_frames == summary.frames_acquired == 4  # 2 tiles, 2 targets
    assert window.counters["frames"].text() == "4"
    assert window.counters["analysed"].text() == "2"
    # the last analysed frame is drawn with as many objects as it has detections
    view = window.analysed_view
    assert view.detections is not None and view.frame_index is not None
    logged = {
        r["frame_index"]: r["n_detections"]
        for r in read_jsonl(Path(summary.directory) / "detections.jsonl")
    }
    assert logged[view.frame_index] > 0
    view.canvas.repaint()
    assert view.n_drawn_objects == len(view.detections) == logged[view.frame_index]
    assert overlay_pixels(view.canvas) > 0
    view.overlay_box.setChecked(False)  # the operator can hide it
    view.canvas.repaint()
    assert view.n_drawn_objects == 0 and overlay_pixels(view.canvas) == 0
    # the decision log and the stage map show what happened
    qtbot.waitUntil(
        lambda: window.decision_log.row_statuses() == ["applied"], timeout=5_000
    )
    assert len(window.stage_map.tiles) == 2
    assert 0 < len(window.stage_map.detected) <= summary.detections
    # the cursor readout names the pixel value and the stage position
    text = view.describe_pixel(10.0, 20.0)
    assert f"value {view.image[20, 10]}" in text and "stage x" in text


def test_approve_and_reject_change_what_is_acquired_and_the_log(qtbot, open_window):
    window = open_window(experiment([(0, 0), (3000, 0)]))
    panel = window.approval_panel
    panel.enabled_box.setChecked(True)
    assert window.start(), window.last_error
    gate = window.runner.approval
    qtbot.waitUntil(lambda: panel.table.rowCount() == 2, timeout=20_000)
    # both base tiles were acquired while the proposals waited
    assert window.runner._frame_count == 2 and window.is_running()
    first, second = gate.pending()

    panel.table.selectRow(0)
    qtbot.mouseClick(panel.approve_button, Qt.MouseButton.LeftButton)
    panel.table.selectRow(0)  # the other one moved up
    qtbot.mouseClick(panel.reject_button, Qt.MouseButton.LeftButton)
    summary = wait_for_end(qtbot, window)

    frames = read_jsonl(Path(summary.directory) / "frames.jsonl")
    targets = [f for f in frames if f["kind"] == "target"]
    assert targets, "the approved action was acquired"
    assert {f["trigger_frame"] for f in targets} == {first.trigger_frame}
    assert len(targets) == len(first.action.events)
    assert first.status == "approved" and second.status == "rejected"
    # the log widget catches up on the GUI timer (10 Hz), not at once
    expected = ["applied (operator)", f"refused: {REFUSED_BY_OPERATOR} (operator)"]
    qtbot.waitUntil(
        lambda: window.decision_log.row_statuses() == expected, timeout=5_000
    )
    resolved = [
        r
        for r in read_jsonl(Path(summary.directory) / "decisions.jsonl")
        if "approval" in r
    ]
    assert [r["actions"][0]["status"] for r in resolved] == ["applied", "refused"]
    assert resolved[1]["actions"][0]["outcome"] == REFUSED_BY_OPERATOR


def test_approve_all_pending_at_once(qtbot, open_window):
    window = open_window(experiment([(0, 0), (3000, 0)]))
    panel = window.approval_panel
    panel.enabled_box.setChecked(True)
    assert window.start(), window.last_error
    qtbot.waitUntil(lambda: panel.table.rowCount() == 2, timeout=20_000)
    first, second = window.runner.approval.pending()
    qtbot.mouseClick(panel.approve_all_button, Qt.MouseButton.LeftButton)
    summary = wait_for_end(qtbot, window)
    frames = read_jsonl(Path(summary.directory) / "frames.jsonl")
    triggers = {f["trigger_frame"] for f in frames if f["kind"] == "target"}
    assert triggers == {first.trigger_frame, second.trigger_frame}
    qtbot.waitUntil(
        lambda: window.decision_log.row_statuses() == ["applied (operator)"] * 2,
        timeout=5_000,
    )
    qtbot.waitUntil(lambda: panel.table.rowCount() == 0, timeout=5_000)


def test_auto_approve_after_the_timeout_set_in_the_window(qtbot, open_window):
    window = open_window(experiment([(0, 0), (3000, 0)], max_targets=3))
    window.approval_panel.enabled_box.setChecked(True)
    window.approval_panel.timeout.setValue(0.5)  # nobody answers
    assert window.start(), window.last_error
    summary = wait_for_end(qtbot, window)
    assert summary.status == "completed"
    assert summary.events_scheduled == 3
    qtbot.waitUntil(
        lambda: window.decision_log.row_statuses() == ["applied (auto)"],
        timeout=5_000,
    )


def test_pause_resume_and_cancel(qtbot, open_window):
    window = open_window(experiment(loops=400, interval=0.02))
    assert window.start(), window.last_error
    qtbot.waitUntil(lambda: window.runner._frame_count >= 3, timeout=20_000)

    qtbot.mouseClick(window.pause_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: window.pause_button.text() == "Resume", timeout=5_000)
    # the event under way, if any, has finished and none can start
    qtbot.waitUntil(
        lambda: paused_with_nothing_under_way(window.runner), timeout=20_000
    )
    paused_at = window.runner._frame_count
    served = window.runner.scheduler.n_served
    qtbot.wait(600)  # 30 intervals of the plan
    assert window.runner._frame_count == paused_at, "no frames while paused"
    assert window.runner.scheduler.n_served == served

    qtbot.mouseClick(window.pause_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: window.runner._frame_count > paused_at + 2, timeout=10_000)

    qtbot.mouseClick(window.cancel_button, Qt.MouseButton.LeftButton)
    summary = wait_for_end(qtbot, window)
    assert summary.status == "interrupted"
    assert summary.frames_acquired < 400
    assert "cancelled by the operator" in summary.reason
    assert window.start_button.isEnabled() and not window.cancel_button.isEnabled()


def test_policies_edited_before_start_are_validated_and_saved(
    qtbot, open_window, tmp_path
):
    window = open_window(Experiment.from_file(DEMO))
    editor = window.policy_editor
    editor.set_value(0, "max_targets", 3)
    editor.set_value(0, "filter.min_area_px", 12)
    saved = editor.save(tmp_path / "edited.yaml")
    reread = Experiment.from_file(saved)
    params = reread.policies[0].params
    assert params["max_targets"] == 3
    assert params["filter"] == {"min_area_px": 12, "exclude_border": True}
    assert reread.sequence == Experiment.from_file(DEMO).sequence
    assert reread.config_path() == Experiment.from_file(DEMO).config_path()

    editor.set_value(0, "exposure_ms", -5)
    assert not window.start()
    assert "exposure_ms" in window.last_error
    assert window.runner is None


def test_gui_screenshot_command_writes_a_picture_of_the_run(tmp_path):
    shot = tmp_path / "gui.png"
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "smartscope.cli",
            "gui",
            "--demo",
            "--screenshot",
            str(shot),
            "--frames",
            "6",
            "--out",
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr
    image = QImage(str(shot))
    assert image.width() >= 800 and image.height() >= 600
    assert overlay_pixels_of(image) > 0, "the segmentation overlay is visible"
    grey = image.convertToFormat(QImage.Format.Format_Grayscale8)
    arr = np.frombuffer(grey.constBits(), np.uint8, grey.bytesPerLine() * grey.height())
    assert arr.std() > 10, "not blank"
    run = read_jsonl(tmp_path / "run" / "frames.jsonl")
    assert len(run) >= 6


def overlay_pixels_of(image: QImage) -> int:
    image = image.convertToFormat(QImage.Format.Format_RGB888)
    h, w, bpl = image.height(), image.width(), image.bytesPerLine()
    arr = np.frombuffer(image.constBits(), np.uint8, bpl * h).reshape(h, bpl)
    rgb = arr[:, : 3 * w].reshape(h, w, 3).astype(int)
    target = np.array(OUTLINE_COLOR.getRgb()[:3])
    return int((np.abs(rgb - target).sum(axis=2) < 40).sum())


def test_gui_command_bad_input_is_one_error_line(tmp_path):
    from typer.testing import CliRunner

    from smartscope.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "gui" in result.output
    result = runner.invoke(app, ["gui", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 2
    assert "error: experiment file not found" in result.output
    result = runner.invoke(app, ["gui", str(DEMO), "--demo"])
    assert result.exit_code == 2 and "not both" in result.output
    result = runner.invoke(app, ["gui", "--demo", "--config", str(tmp_path / "x.cfg")])
    assert result.exit_code == 2 and "error:" in result.output


def test_import_smartscope_does_not_import_qt():
    code = (
        "import sys, smartscope, smartscope.runner, smartscope.approval;"
        "bad = [m for m in sys.modules if m == 'smartscope.gui' or m.split('.')[0] "
        "in ('qtpy', 'PySide6', 'PyQt5', 'PyQt6', 'superqt')];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_bench_loop_with_the_window_attached(qapp):
    from smartscope.bench import bench_loop
    from smartscope.bench._loop import GOAL_RATIO
    from smartscope.gui import attach_window

    # the window is what is tested: the rule-based segmenter (in a thread)
    # spares four model loads in child processes
    result = bench_loop(
        frames=4, repeats=1, positions=1, segmenter="threshold", attach=attach_window
    )
    case = result["cases"]["1"]
    gui, smart = case["arms"]["gui"], case["arms"]["smartscope"]
    assert result["gui_frames_acquired"] == gui["frames_acquired"] == 4
    assert gui["frames_stored"] == 4 and gui["frames_missing"] == 0
    assert case["same_order"]  # the window changes nothing of what is acquired
    # one run of each arm: the medians are those runs, the ratio theirs
    assert gui["runs_s"] == [gui["wall_s"]] == [result["gui_wall_s"]]
    assert result["gui_ratio"] == pytest.approx(gui["wall_s"] / smart["wall_s"], 1e-3)
    assert result["gui_meets_goal"] == (result["gui_ratio"] <= GOAL_RATIO)


def test_contrast_slider_auto_and_manual(qtbot):
    from smartscope.gui import FrameView

    view = FrameView("test", bit_depth=16)
    qtbot.addWidget(view)
    image = np.full((64, 64), 100, np.uint16)
    image[20:30, 20:30] = 900
    view.set_frame(image)
    lo, hi = view.limits
    assert lo >= 100 and 800 <= hi <= 900  # auto: the data's percentiles
    assert view.slider.maximum() < 65535  # the slider fits the data
    grey_auto = view._grey.copy()
    assert grey_auto[25, 25] == 255 and grey_auto[0, 0] == 0

    view.slider.setValue((0, 1800))  # the operator drags: auto-contrast goes off
    assert not view.auto_contrast.isChecked()
    assert view._grey[25, 25] == int(900 * 255 / 1800)
    view.set_frame(image * 2)  # manual limits stay for new frames
    assert view.limits == (0, 1800)
    view.reset_button.click()
    assert view.limits == (0, 65535)
