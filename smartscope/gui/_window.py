"""`MainWindow`: watch a run, see what the model found and what comes next, veto.

Threads: the acquisition thread only calls `_Feed.on_frame_ready` /
`_Feed.on_frame_acquired`, which store a reference and count (never wait, never
touch Qt). Detections, decisions, scheduled events and approval proposals come
through psygnal connections with ``thread="main"``; a `QTimer` on the GUI
thread (``redraw_hz``, 10 by default) delivers them (``psygnal.emit_queued``)
and redraws the newest frame only if a new one arrived. Nothing in the window
waits for the acquisition.
"""

from __future__ import annotations

import itertools
import os
import sys
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import psygnal
from qtpy.QtCore import QEventLoop, Qt, QTimer, Signal
from qtpy.QtWidgets import (
    QApplication,
    QDockWidget,
    QFileDialog,
    QGridLayout,
    QHBoxLayout,
    QLabel,
    QMainWindow,
    QPushButton,
    QSplitter,
    QVBoxLayout,
    QWidget,
)

from smartscope._errors import SmartscopeError
from smartscope.approval import ApprovalGate
from smartscope.frame import event_tag
from smartscope.gui._frame_view import FrameView
from smartscope.gui._panels import (
    ApprovalPanel,
    DecisionLog,
    PolicyEditor,
    UpcomingTable,
)
from smartscope.gui._stage_map import StageMap

if TYPE_CHECKING:
    from qtpy.QtGui import QCloseEvent
    from useq import MDAEvent

    from smartscope.approval import Proposal
    from smartscope.detections import Detections
    from smartscope.experiment import Experiment
    from smartscope.frame import Frame
    from smartscope.runner import Runner, RunSummary

__all__ = ["MainWindow", "attach_window", "ensure_app", "run_gui"]

_PLAN_EVENTS_SHOWN = 2_000  # base-plan events read for the stage map's tiles


class _Feed:
    """What the acquisition thread hands the window: references and counts."""

    def __init__(self) -> None:
        self.latest: tuple[np.ndarray, MDAEvent, dict] | None = None
        self.recent: deque[tuple[np.ndarray, MDAEvent, dict]] = deque(maxlen=64)
        self.acquired: deque[Frame] = deque(maxlen=10_000)
        self.n_frames = 0
        self.dose_ms = 0.0

    def on_frame_ready(self, img: np.ndarray, event: MDAEvent, meta: dict) -> None:
        """Acquisition thread: keep a reference to the newest frame."""
        item = (img, event, meta)
        self.latest = item
        self.recent.append(item)
        self.n_frames += 1

    def on_frame_acquired(self, frame: Frame) -> None:
        """Acquisition thread: remember where it was taken and the exposure."""
        self.acquired.append(frame)
        self.dose_ms += frame.exposure_ms or 0.0

    def image_of(self, event_id: int) -> tuple[np.ndarray, MDAEvent, dict] | None:
        """One of the last 64 frames, by the Scheduler's event id."""
        for item in reversed(list(self.recent)):  # list(): an atomic copy
            if event_tag(item[1]).get("event_id") == event_id:
                return item
        return None


class MainWindow(QMainWindow):
    """The live window of a smartscope run.

    Parameters
    ----------
    experiment : Experiment, optional
        What Start runs (its policies can be edited before). Without one the
        window can only watch a runner given to `attach`.
    config : str | Path, optional
        Hardware config overriding the experiment's.
    out_dir : str | Path, optional
        Run directory (default: ``runs/<name>-<time>``).
    redraw_hz : float
        How often the window redraws the newest frame and refreshes.
    """

    runEnded = Signal(object)  # RunSummary | None, from the watcher thread

    def __init__(
        self,
        experiment: Experiment | None = None,
        *,
        config: str | Path | None = None,
        out_dir: str | Path | None = None,
        redraw_hz: float = 10.0,
        parent: QWidget | None = None,
    ) -> None:
        super().__init__(parent)
        self.experiment = experiment
        self.config = config
        self.out_dir = Path(out_dir) if out_dir else None
        self.runner: Runner | None = None
        self.summary: RunSummary | None = None
        self.last_error = ""
        self._owns_runner = False
        self._external = False  # watching a runner given to `attach`
        self._n_runs = 0
        self.feed = _Feed()
        self._watcher: threading.Thread | None = None
        self._detections: OrderedDict[int, Detections] = OrderedDict()
        self._newest_analysed: tuple[Frame, Detections] | None = None
        self._shown_n = 0
        self._ticks = itertools.count()
        self._lat_n = -1
        self._lat_text = "-"
        self._to_stage: Callable[[np.ndarray, tuple[float, float]], np.ndarray]
        self._connections: list[tuple[Any, Callable]] = []
        self.setWindowTitle("smartscope")
        self._build()
        self.runEnded.connect(self._on_run_ended)
        self._timer = QTimer(self)
        self._timer.setInterval(max(10, int(1000 / redraw_hz)))
        self._timer.timeout.connect(self._tick)
        self._timer.start()
        self._update_controls()

    # ------------------------------------------------------------------ UI
    def _build(self) -> None:
        self.live_view = FrameView("live")
        self.analysed_view = FrameView("last analysed")
        views = QSplitter(Qt.Orientation.Horizontal)
        views.addWidget(self.live_view)
        views.addWidget(self.analysed_view)
        self.setCentralWidget(views)

        # run controls and counters
        self.start_button = QPushButton("Start")
        self.pause_button = QPushButton("Pause")
        self.cancel_button = QPushButton("Cancel")
        self.start_button.clicked.connect(self.start)
        self.pause_button.clicked.connect(self.toggle_pause)
        self.cancel_button.clicked.connect(self.cancel)
        self.status_label = QLabel("ready")
        self.status_label.setWordWrap(True)
        buttons = QHBoxLayout()
        for b in (self.start_button, self.pause_button, self.cancel_button):
            buttons.addWidget(b)
        grid = QGridLayout()
        self.counters: dict[str, QLabel] = {}
        names = (
            ("frames", "frames"),
            ("analysed", "analysed"),
            ("drops", "analysis drops"),
            ("detections", "detections"),
            ("decisions", "decisions"),
            ("scheduled", "events scheduled"),
            ("queued", "events queued"),
            ("latency", "frame→decision p50/p99"),
            ("dose", "light dose"),
            ("elapsed", "elapsed"),
        )
        for row, (key, text) in enumerate(names):
            grid.addWidget(QLabel(text), row, 0)
            value = QLabel("0")
            value.setAlignment(Qt.AlignmentFlag.AlignRight)
            grid.addWidget(value, row, 1)
            self.counters[key] = value
        run_box = QWidget()
        run_layout = QVBoxLayout(run_box)
        run_layout.addLayout(buttons)
        run_layout.addWidget(self.status_label)
        run_layout.addLayout(grid)
        run_layout.addStretch(1)
        self._dock("Run", run_box, Qt.DockWidgetArea.LeftDockWidgetArea)

        # policies
        self.policy_editor: PolicyEditor | None = None
        policy_box = QWidget()
        policy_layout = QVBoxLayout(policy_box)
        policy_layout.setContentsMargins(2, 2, 2, 2)
        if self.experiment is not None:
            self.policy_editor = PolicyEditor(self.experiment)
            policy_layout.addWidget(self.policy_editor, 1)
        self.save_button = QPushButton("Save experiment as…")
        self.save_button.clicked.connect(self._save_dialog)
        self.save_button.setEnabled(self.policy_editor is not None)
        policy_layout.addWidget(self.save_button)
        self._dock("Policies", policy_box, Qt.DockWidgetArea.LeftDockWidgetArea)

        # stage map and approvals
        self.stage_map = StageMap()
        right = Qt.DockWidgetArea.RightDockWidgetArea
        self._dock("Stage map (µm)", self.stage_map, right)
        self.approval_panel = ApprovalPanel()
        self._dock("Operator approval", self.approval_panel, right)

        # upcoming events and decision log
        self.decision_log = DecisionLog()
        self.upcoming_table = UpcomingTable()
        bottom = Qt.DockWidgetArea.BottomDockWidgetArea
        log_dock = self._dock("Decision log", self.decision_log, bottom)
        up_dock = self._dock("Upcoming events", self.upcoming_table, bottom)
        self.splitDockWidget(log_dock, up_dock, Qt.Orientation.Horizontal)
        self.resize(1600, 1000)

    def _dock(
        self, title: str, widget: QWidget, area: Qt.DockWidgetArea
    ) -> QDockWidget:
        dock = QDockWidget(title, self)
        dock.setObjectName(title)
        dock.setWidget(widget)
        dock.setFeatures(
            QDockWidget.DockWidgetFeature.DockWidgetMovable
            | QDockWidget.DockWidgetFeature.DockWidgetFloatable
        )
        self.addDockWidget(area, dock)
        return dock

    def _update_controls(self) -> None:
        running = self.is_running()
        can_start = not running and self.experiment is not None and not self._external
        self.start_button.setEnabled(can_start)
        self.pause_button.setEnabled(running)
        self.cancel_button.setEnabled(running)
        self.pause_button.setText("Resume" if self.is_paused() else "Pause")
        if self.policy_editor is not None:
            self.policy_editor.setEnabled(not running)
        self.approval_panel.enabled_box.setEnabled(not running)

    # ------------------------------------------------------------------ runs
    def is_running(self) -> bool:
        """Whether a run is going (started and not finished)."""
        return self._watcher is not None and self._watcher.is_alive()

    def is_paused(self) -> bool:
        """Whether the running acquisition is paused."""
        try:
            return self.is_running() and self.runner.is_paused()  # type: ignore[union-attr]
        except RuntimeError:  # microscope closed
            return False

    def start(self) -> bool:
        """Build a `Runner` from the (edited) experiment and start it.

        Returns False, with the reason in the status line and `last_error`,
        when the experiment or the hardware set-up is invalid.
        """
        from smartscope.runner import Runner

        if self.is_running() or self.experiment is None:
            return False
        try:
            experiment = (
                self.policy_editor.experiment()
                if self.policy_editor is not None
                else self.experiment
            )
            gate = None
            if self.approval_panel.enabled_box.isChecked():
                gate = ApprovalGate(auto_approve_s=self.approval_panel.auto_approve_s)
            self._release_runner()
            self.status_label.setText("loading the microscope…")
            QApplication.processEvents()
            runner = Runner(
                experiment,
                config=self.config,
                out_dir=self._next_out_dir(),
                approval=gate if gate is not None else False,
            )
        except SmartscopeError as e:
            self.show_error(str(e))
            return False
        except Exception as e:  # hardware: the core could not be set up
            self.show_error(f"cannot start: {type(e).__name__}: {e}")
            return False
        self.attach(runner, owned=True)
        try:
            self.start_attached()
        except Exception as e:
            self.show_error(f"cannot start: {type(e).__name__}: {e}")
            self._release_runner()
            return False
        return True

    def _next_out_dir(self) -> Path | None:
        self._n_runs += 1
        if self.out_dir is None or self._n_runs == 1:
            return self.out_dir
        return self.out_dir.with_name(f"{self.out_dir.name}-{self._n_runs}")

    def attach(self, runner: Runner, *, owned: bool = False) -> None:
        """Watch `runner` (not started yet): connect to its signals and core.

        An `owned` runner is closed by the window when its run ends.
        """
        self.runner = runner
        self._owns_runner = owned
        self._external = not owned
        self.summary = None
        self.last_error = ""
        self.feed = _Feed()
        self._detections.clear()
        self._newest_analysed = None
        self._shown_n = 0
        self._lat_n = -1
        self._lat_text = "-"
        self.decision_log.clear()
        self.stage_map.clear()

        microscope = runner.microscope
        core = microscope.core
        affine = microscope.affine.copy()
        center = microscope.image_center_px()

        def to_stage(px: np.ndarray, stage_xy: tuple[float, float]) -> np.ndarray:
            d = np.asarray(px, dtype=float) - center
            return np.asarray(stage_xy) + d @ affine[:, :2].T + affine[:, 2]

        self._to_stage = to_stage
        bits = int(core.getImageBitDepth() or 16)
        for view in (self.live_view, self.analysed_view):
            view.to_stage = to_stage
            view.set_bit_depth(bits)
        tiles: dict[tuple[int, int], tuple[float, float]] = {}
        for event in itertools.islice(runner.plan, _PLAN_EVENTS_SHOWN):
            if event.x_pos is not None and event.y_pos is not None:
                xy = (float(event.x_pos), float(event.y_pos))
                tiles.setdefault((round(xy[0]), round(xy[1])), xy)
        self.stage_map.set_plan(list(tiles.values()), microscope.fov_um)

        feed = self.feed
        ev = runner.events
        self._connect(core.mda.events.frameReady, feed.on_frame_ready)
        self._connect(ev.frameAcquired, feed.on_frame_acquired)
        self._connect(ev.detectionsReady, self._on_detections, thread="main")
        self._connect(ev.decisionMade, self._on_decision, thread="main")
        self.approval_panel.set_gate(runner.approval)
        if runner.approval is not None:
            resolved = runner.approval.events.resolved
            self._connect(resolved, self._on_resolved, thread="main")
        self.status_label.setText(
            f"{runner.experiment.name}: {microscope.config_path}\n→ {runner.directory}"
        )

    def _connect(self, signal: Any, slot: Callable, **kwargs: Any) -> None:
        signal.connect(slot, **kwargs)
        self._connections.append((signal, slot))

    def _disconnect_all(self) -> None:
        for signal, slot in self._connections:
            try:
                signal.disconnect(slot)
            except Exception:  # already gone with its core
                pass
        self._connections.clear()

    def start_attached(self) -> None:
        """Start the attached runner and watch for its end (returns at once)."""
        runner = self.runner
        assert runner is not None
        runner.start()

        def watch() -> None:
            summary = None
            try:
                runner.wait()
                summary = runner.finish()
            except Exception as e:  # reported in the status line
                self.last_error = f"the run failed to finish: {e}"
            finally:
                self.runEnded.emit(summary)

        self._watcher = threading.Thread(
            target=watch, name="smartscope-gui-watcher", daemon=True
        )
        self._watcher.start()
        self._update_controls()

    def toggle_pause(self) -> None:
        """Pause the acquisition at the next event, or resume it."""
        if not self.is_running():
            return
        assert self.runner is not None
        if self.is_paused():
            self.runner.resume()
        else:
            self.runner.pause()
        self._update_controls()

    def cancel(self) -> None:
        """Stop after the current event; what was acquired stays on disk."""
        if self.is_running():
            assert self.runner is not None
            self.runner.cancel("cancelled by the operator")

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the run's watcher is done (not for use in slots)."""
        if self._watcher is None:
            return True
        self._watcher.join(timeout)
        return not self._watcher.is_alive()

    def _on_run_ended(self, summary: RunSummary | None) -> None:
        self.summary = summary
        self._tick()  # last drawing and counters
        self._refresh()
        self._disconnect_all()
        if summary is not None:
            self.status_label.setText(
                f"run {summary.status} ({summary.reason}): "
                f"{summary.frames_acquired} frames\n→ {summary.directory}"
            )
        elif self.last_error:
            self.show_error(self.last_error)
        if self._owns_runner:
            self._release_runner()
        self.approval_panel.set_gate(None)
        self._update_controls()

    def _release_runner(self) -> None:
        runner = self.runner
        if runner is not None and self._owns_runner:
            self._disconnect_all()
            runner.close()  # releases the core
            self._owns_runner = False

    def show_error(self, message: str) -> None:
        """Put an error in the status line (no modal dialog)."""
        self.last_error = message
        self.status_label.setText(f"error: {message}")

    # ---------------------------------------------------------- thread-side
    def _on_detections(self, frame: Frame, detections: Detections) -> None:
        self._detections[frame.event_id] = detections
        while len(self._detections) > 32:
            self._detections.popitem(last=False)
        self._newest_analysed = (frame, detections)
        if len(detections):
            self.stage_map.add_detections(detections.centroids_um)

    def _on_decision(self, record: dict) -> None:
        self.decision_log.add_decision(record)

    def _on_resolved(self, proposal: Proposal) -> None:
        self.decision_log.resolve(proposal)

    # ---------------------------------------------------------------- timer
    def _tick(self) -> None:
        psygnal.emit_queued()
        feed = self.feed
        if feed.n_frames != self._shown_n and feed.latest is not None:
            self._shown_n = feed.n_frames
            img, event, meta = feed.latest
            event_id = event_tag(event).get("event_id")
            self.live_view.set_frame(
                img,
                stage_xy_um=_stage_xy(event, meta),
                event_id=event_id,
                frame_index=feed.n_frames - 1,
                caption=_caption(feed.n_frames - 1, event),
                detections=None if event_id is None else self._detections.get(event_id),
                pixel_offset=_roi_offset(event),
            )
        elif (
            self.live_view.detections is None
            and (shown := self.live_view.event_id) is not None
            and shown in self._detections
        ):
            self.live_view.set_detections(self._detections[shown])
        if self._newest_analysed is not None:
            frame, det = self._newest_analysed
            self._newest_analysed = None
            item = feed.image_of(frame.event_id)
            if item is not None:
                img, event, meta = item
                self.analysed_view.set_frame(
                    img,
                    stage_xy_um=frame.stage_xy_um,
                    event_id=frame.event_id,
                    frame_index=frame.frame_index,
                    caption=_caption(frame.frame_index, event),
                    detections=det,
                    pixel_offset=_roi_offset(event),
                )
        while feed.acquired:
            f = feed.acquired.popleft()
            self.stage_map.add_visit(f.stage_x_um, f.stage_y_um)
        if next(self._ticks) % 4 == 0:  # slower things (tables, map) at ~2.5 Hz
            self._refresh()

    def _refresh(self) -> None:
        runner = self.runner
        if runner is None:
            return
        sched, worker, stream = runner.scheduler, runner.worker, runner.stream
        if sched is not None:
            upcoming = sched.upcoming(200, include_base=True)
            self.upcoming_table.set_events(upcoming)
            self.stage_map.set_upcoming(
                [
                    (float(e.x_pos), float(e.y_pos))
                    for e in upcoming
                    if e.x_pos is not None and e.y_pos is not None
                ]
            )
            self.stage_map.update()
        c = self.counters
        c["frames"].setText(str(runner._frame_count))
        c["analysed"].setText(str(worker.n_analysed if worker else 0))
        c["drops"].setText(str(stream.n_dropped if stream else 0))
        c["detections"].setText(str(worker.n_detections if worker else 0))
        c["decisions"].setText(str(worker.n_decisions if worker else 0))
        scheduled = worker.n_events_scheduled if worker else 0
        if runner.approval is not None:
            scheduled += runner.approval.n_events_scheduled
        c["scheduled"].setText(str(scheduled))
        c["queued"].setText(str(sched.queued if sched else 0))
        c["latency"].setText(self._latency_text(worker))
        c["dose"].setText(f"{self.feed.dose_ms / 1000:.2f} s exposure")
        elapsed = runner.clock() if runner._t0 and self.summary is None else None
        if self.summary is not None:
            elapsed = self.summary.wall_time_s
        c["elapsed"].setText(f"{elapsed:.1f} s" if elapsed is not None else "-")
        now = runner.clock() if runner._t0 else None
        self.approval_panel.refresh(now)
        self._update_controls()

    def _latency_text(self, worker: Any) -> str:
        if worker is None:
            return "-"
        values = worker.latencies_ms["frame_to_decision"]
        if len(values) != self._lat_n:
            self._lat_n = len(values)
            if values:
                p50, p99 = np.percentile(list(values), [50, 99])
                self._lat_text = f"{p50:.0f} / {p99:.0f} ms"
        return self._lat_text

    # -------------------------------------------------------------- output
    def save_screenshot(self, path: str | Path) -> Path:
        """Save the whole window as an image (``widget.grab()``)."""
        self._tick()
        self._refresh()
        QApplication.processEvents()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if not self.grab().save(str(path)):
            raise OSError(f"cannot write the screenshot {path}")
        return path

    def _save_dialog(self) -> None:
        if self.policy_editor is None:
            return
        source = self.experiment.source if self.experiment else None
        path, _ = QFileDialog.getSaveFileName(
            self,
            "Save experiment",
            str(source or "experiment.yaml"),
            "YAML (*.yaml *.yml)",
        )
        if path:
            try:
                self.policy_editor.save(path)
                self.status_label.setText(f"saved {path}")
            except SmartscopeError as e:
                self.show_error(str(e))

    def closeEvent(self, event: QCloseEvent) -> None:
        """Cancel a run in progress, wait for it to finish, release the core."""
        self._timer.stop()
        if self.is_running():
            self.cancel()
            self.wait()
        self._disconnect_all()
        psygnal.emit_queued()  # nothing queued for this window may outlive it
        if self._owns_runner:
            self._release_runner()
        super().closeEvent(event)


def _stage_xy(event: MDAEvent, meta: dict) -> tuple[float, float]:
    pos = meta.get("position") or {}
    return (
        float(pos.get("x", event.x_pos or 0.0)),
        float(pos.get("y", event.y_pos or 0.0)),
    )


def _roi_offset(event: MDAEvent) -> tuple[float, float]:
    roi = getattr(event, "roi", None)  # a camera ROI: pixels offset on the sensor
    return (float(roi.offset_x), float(roi.offset_y)) if roi else (0.0, 0.0)


def _caption(index: int, event: MDAEvent) -> str:
    tag = event_tag(event)
    channel = event.channel.config if event.channel else ""
    return f"#{index}  {tag.get('position', '')}  {tag.get('kind', '')}  {channel}"


# ------------------------------------------------------------------ entry
def ensure_app(*, offscreen: bool = False) -> QApplication:
    """The running `QApplication`, created if needed (offscreen on request)."""
    app = QApplication.instance()
    if app is None:
        if offscreen:
            os.environ["QT_QPA_PLATFORM"] = "offscreen"
        app = QApplication([])
    return app  # type: ignore[return-value]


def attach_window(runner: Runner) -> Callable[[], RunSummary]:
    """Open an (offscreen) window on `runner`; return the function that runs it.

    The returned ``run()`` starts the runner, runs the Qt event loop until the
    run is finished, closes the window and returns the `RunSummary` — the
    windowed counterpart of ``runner.run()`` (used by ``bench loop --gui``).
    """
    ensure_app(offscreen=True)
    window = MainWindow(runner.experiment)
    window.attach(runner)
    window.show()

    def run() -> RunSummary:
        loop = QEventLoop()
        window.runEnded.connect(loop.quit)
        window.start_attached()
        loop.exec()
        summary = window.summary
        window.close()
        window.deleteLater()
        if summary is None:
            raise RuntimeError("the run failed to finish")
        return summary

    return run


def run_gui(
    experiment: Experiment,
    *,
    config: str | Path | None = None,
    out_dir: str | Path | None = None,
    approval: bool = False,
    screenshot: str | Path | None = None,
    frames: int = 20,
) -> int:
    """Open the window (``smartscope gui``); return the exit code.

    With `screenshot`, run the experiment at once, save a screenshot of the
    window after `frames` frames (once the newest analysed frame is drawn),
    cancel what is left of the run and close.

    Raises
    ------
    SmartscopeError
        With `screenshot`, when the run cannot start (bad config, hardware).
    """
    app = ensure_app(offscreen=screenshot is not None and not _has_display())
    window = MainWindow(experiment, config=config, out_dir=out_dir)
    window.approval_panel.enabled_box.setChecked(approval)
    window.show()
    if screenshot is None:
        try:
            app.exec()
        finally:
            window.close()
        return 0

    t_start = time.monotonic()

    def check() -> None:
        running = window.is_running()
        if running and window.feed.n_frames < frames:
            return
        drawn = window.analysed_view.detections is not None
        if running and not drawn and time.monotonic() - t_start < 30:
            return  # wait for the segmentation of an analysed frame
        poll.stop()
        window.save_screenshot(screenshot)
        window.cancel()
        if not window.is_running():
            app.quit()

    poll = QTimer()
    poll.setInterval(50)
    poll.timeout.connect(check)
    window.runEnded.connect(lambda _s: None if poll.isActive() else app.quit())
    try:
        if not window.start():
            raise SmartscopeError(window.last_error)
        poll.start()
        app.exec()
    finally:
        poll.stop()
        window.close()
    return 0


def _has_display() -> bool:
    return bool(
        os.environ.get("DISPLAY")
        or os.environ.get("WAYLAND_DISPLAY")
        or os.environ.get("QT_QPA_PLATFORM")
        or sys.platform in ("win32", "darwin")
    )
