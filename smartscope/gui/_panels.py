"""Tables and editors of the live window.

Upcoming events, the decision log, pending approvals, policy parameters.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from qtpy.QtCore import Qt, Signal
from qtpy.QtGui import QBrush, QColor
from qtpy.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QDoubleSpinBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QTreeWidget,
    QTreeWidgetItem,
    QVBoxLayout,
    QWidget,
)

from smartscope._errors import ExperimentError
from smartscope.frame import event_tag

if TYPE_CHECKING:
    from useq import MDAEvent

    from smartscope.approval import ApprovalGate, Proposal
    from smartscope.experiment import Experiment

__all__ = ["ApprovalPanel", "DecisionLog", "PolicyEditor", "UpcomingTable"]

STATUS_COLORS = {
    "applied": QColor(60, 170, 80),
    "refused": QColor(210, 60, 60),
    "pending": QColor(230, 150, 0),
}


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


# ------------------------------------------------------------------ upcoming
class UpcomingTable(QTableWidget):
    """The Scheduler's upcoming events, in the order they will run.

    Queued (added) events first, then each time-lapse position's next visit
    (kind "base", no event id yet).
    """

    COLUMNS = (
        "#",
        "event",
        "position",
        "kind",
        "x µm",
        "y µm",
        "z µm",
        "channel",
        "exposure ms",
        "decision",
        "trigger frame",
    )

    def __init__(self, parent=None) -> None:
        super().__init__(0, len(self.COLUMNS), parent)
        self.setHorizontalHeaderLabels(self.COLUMNS)
        self.verticalHeader().setVisible(False)
        self.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.horizontalHeader().setSectionResizeMode(
            QHeaderView.ResizeMode.ResizeToContents
        )
        self._shown: list[tuple] = []

    def set_events(self, events: list[MDAEvent]) -> None:
        """Show `events` (redraws only when the list changed)."""
        ids = [
            (
                event_tag(e).get("event_id"),
                event_tag(e).get("position"),
                e.index.get("t"),
            )
            for e in events
        ]
        if ids == self._shown:
            return
        self._shown = ids
        self.setRowCount(len(events))
        for row, event in enumerate(events):
            tag = event_tag(event)
            values = (
                row + 1,
                tag.get("event_id"),
                tag.get("position", event.pos_name),
                tag.get("kind"),
                event.x_pos,
                event.y_pos,
                event.z_pos,
                event.channel.config if event.channel else None,
                event.exposure,
                tag.get("decision_id"),
                tag.get("trigger_frame"),
            )
            for col, value in enumerate(values):
                self.setItem(row, col, QTableWidgetItem(_fmt(value)))


# -------------------------------------------------------------- decision log
class DecisionLog(QTreeWidget):
    """Every decision as it is made: trigger frame → action → events, latencies.

    One row per action; its events are the row's children. A proposal waiting
    for the operator is "pending" until approved ("applied") or rejected
    ("refused", with the reason).
    """

    COLUMNS = (
        "t s",
        "decision",
        "policy",
        "trigger",
        "objects",
        "action",
        "status",
        "events",
        "frame→detections ms",
        "frame→decision ms",
        "frame→queued ms",
    )

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.setColumnCount(len(self.COLUMNS))
        self.setHeaderLabels(self.COLUMNS)
        self.setRootIsDecorated(True)
        self.setUniformRowHeights(True)
        self.header().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        self._by_proposal: dict[int, QTreeWidgetItem] = {}
        # resolutions that arrived before their decision's row (both come through
        # the GUI thread's queue, the operator may be quicker than the log)
        self._early: dict[int, Proposal] = {}
        self.records: list[dict[str, Any]] = []

    def add_decision(self, record: dict[str, Any]) -> None:
        """Append a ``decisions.jsonl`` record (one row per action)."""
        self.records.append(record)
        trig = record.get("trigger") or {}
        lat = record.get("latency_ms") or {}
        trigger = f"frame {trig.get('frame_index')} @ {trig.get('position', '')}"
        for action in record.get("actions") or []:
            status = action.get("status", "")
            events = action.get("events") or action.get("proposed_events") or []
            item = QTreeWidgetItem(
                [
                    _fmt(trig.get("t_acquired_s"), 2),
                    _fmt(record.get("decision_id")),
                    str(record.get("policy", "")),
                    trigger,
                    _fmt(record.get("n_detections")),
                    _describe_action(action),
                    _status_text(action),
                    str(len(events) or action.get("n_dropped", "") or ""),
                    _fmt(lat.get("frame_to_detections")),
                    _fmt(lat.get("frame_to_decision")),
                    _fmt(lat.get("frame_to_queued")),
                ]
            )
            _color(item, status)
            _add_event_children(item, events)
            self.addTopLevelItem(item)
            if status == "pending" and "proposal_id" in action:
                pid = int(action["proposal_id"])
                self._by_proposal[pid] = item
                if pid in self._early:
                    self._show_resolution(item, self._early.pop(pid))
        self.scrollToBottom()

    def resolve(self, proposal: Proposal) -> None:
        """Update the row of a proposal the operator (or a timeout) resolved."""
        self.records.append(proposal.record or {})
        item = self._by_proposal.pop(proposal.proposal_id, None)
        if item is None:  # its decision's row is not there yet
            self._early[proposal.proposal_id] = proposal
            return
        self._show_resolution(item, proposal)

    def _show_resolution(self, item: QTreeWidgetItem, proposal: Proposal) -> None:
        record = proposal.record or {}
        if not record.get("actions"):
            return
        action = record["actions"][0]
        approval = record.get("approval") or {}
        who = {"operator": "operator", "timeout": "auto", "run": "run end"}.get(
            str(approval.get("by")), str(approval.get("by"))
        )
        item.setText(6, f"{_status_text(action)} ({who})")
        _color(item, action.get("status", ""))
        if action.get("events"):
            item.takeChildren()
            _add_event_children(item, action["events"])
            item.setText(7, str(len(action["events"])))

    def row_statuses(self) -> list[str]:
        """The status column of every row (for tests and summaries)."""
        items = (self.topLevelItem(i) for i in range(self.topLevelItemCount()))
        return [item.text(6) for item in items if item is not None]


def _children(item: QTreeWidgetItem | None) -> list[QTreeWidgetItem]:
    """The child items of a tree item (none for a missing item)."""
    if item is None:
        return []
    kids = (item.child(i) for i in range(item.childCount()))
    return [k for k in kids if k is not None]


def _describe_action(action: dict[str, Any]) -> str:
    kind = str(action.get("type", "")).replace("_", " ")
    if action.get("position"):
        kind += f" {action['position']}"
    reason = action.get("reason")
    return f"{kind}: {reason}" if reason else kind


def _status_text(action: dict[str, Any]) -> str:
    status = str(action.get("status", ""))
    if status == "refused" and action.get("outcome"):
        return f"refused: {action['outcome']}"
    return status


def _color(item: QTreeWidgetItem, status: str) -> None:
    color = STATUS_COLORS.get(status)
    if color is not None:
        item.setForeground(6, QBrush(color))


def _add_event_children(item: QTreeWidgetItem, events: list[dict[str, Any]]) -> None:
    for ev in events[:200]:
        where = f"x {_fmt(ev.get('x_um'))} y {_fmt(ev.get('y_um'))}"
        if ev.get("z_um") is not None:
            where += f" z {_fmt(ev.get('z_um'))}"
        child = QTreeWidgetItem(
            [
                "",
                "",
                "",
                str(ev.get("position") or ""),
                "",
                f"{where}  {ev.get('channel') or ''} {_fmt(ev.get('exposure_ms'))} ms",
                "",
                _fmt(ev.get("event_id")),
            ]
        )
        item.addChild(child)


# ----------------------------------------------------------------- approvals
class ApprovalPanel(QWidget):
    """Operator approval: pending proposals and approve / reject buttons.

    Before a run: whether approval mode is on and the auto-approve timeout.
    During a run: one row per pending proposal; approve or reject the selected
    rows, or all of them.
    """

    COLUMNS = ("proposal", "policy", "trigger frame", "proposed", "waiting s")
    changed = Signal()

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.gate: ApprovalGate | None = None
        self.enabled_box = QCheckBox("Operator approval")
        self.enabled_box.setToolTip(
            "Actions proposed by policies wait for approve / reject; the base "
            "plan goes on meanwhile."
        )
        self.timeout = QDoubleSpinBox()
        self.timeout.setRange(0, 3600)
        self.timeout.setDecimals(1)
        self.timeout.setSuffix(" s")
        self.timeout.setSpecialValueText("never")
        self.timeout.setToolTip("Approve what nobody answered after this long")
        self.timeout.valueChanged.connect(self._on_timeout)

        self.table = QTableWidget(0, len(self.COLUMNS))
        self.table.setHorizontalHeaderLabels(self.COLUMNS)
        self.table.verticalHeader().setVisible(False)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.horizontalHeader().setStretchLastSection(False)
        self.table.horizontalHeader().setSectionResizeMode(
            3, QHeaderView.ResizeMode.Stretch
        )

        self.approve_button = QPushButton("Approve")
        self.reject_button = QPushButton("Reject")
        self.approve_all_button = QPushButton("Approve all")
        self.reject_all_button = QPushButton("Reject all")
        self.approve_button.clicked.connect(self.approve_selected)
        self.reject_button.clicked.connect(self.reject_selected)
        self.approve_all_button.clicked.connect(self.approve_all)
        self.reject_all_button.clicked.connect(self.reject_all)
        self.summary = QLabel("")

        top = QHBoxLayout()
        top.addWidget(self.enabled_box)
        top.addWidget(QLabel("auto-approve after"))
        top.addWidget(self.timeout)
        top.addStretch(1)
        buttons = QHBoxLayout()
        for b in (
            self.approve_button,
            self.reject_button,
            self.approve_all_button,
            self.reject_all_button,
        ):
            buttons.addWidget(b)
        buttons.addStretch(1)
        buttons.addWidget(self.summary)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(2, 2, 2, 2)
        layout.addLayout(top)
        layout.addWidget(self.table, 1)
        layout.addLayout(buttons)
        self._rows: list[int] = []
        self.refresh()

    @property
    def auto_approve_s(self) -> float | None:
        """The timeout chosen (None: never)."""
        value = float(self.timeout.value())
        return value if value > 0 else None

    def set_gate(self, gate: ApprovalGate | None) -> None:
        """Attach the running gate (None: approval off for this run)."""
        self.gate = gate
        self.enabled_box.setEnabled(gate is None)
        self.refresh()

    def _on_timeout(self, _value: float) -> None:
        if self.gate is not None:
            self.gate.auto_approve_s = self.auto_approve_s

    def refresh(self, now_s: float | None = None) -> None:
        """Show the gate's pending proposals (cheap when nothing changed)."""
        gate = self.gate
        pending = gate.pending() if gate is not None else []
        ids = [p.proposal_id for p in pending]
        if ids != self._rows:
            self._rows = ids
            self.table.setRowCount(len(pending))
            for row, p in enumerate(pending):
                values = (p.proposal_id, p.kind, p.trigger_frame, p.describe(), "")
                for col, value in enumerate(values):
                    item = QTableWidgetItem(_fmt(value))
                    item.setToolTip(_fmt(value))
                    self.table.setItem(row, col, item)
        if now_s is not None:
            for row, p in enumerate(pending):
                cell = self.table.item(row, 4)
                if cell is not None:
                    cell.setText(f"{max(0.0, now_s - p.t_proposed_s):.1f}")
        on = gate is not None
        for b in (self.approve_button, self.reject_button):
            b.setEnabled(on and bool(pending))
        for b in (self.approve_all_button, self.reject_all_button):
            b.setEnabled(on and bool(pending))
        if gate is None:
            off = not self.enabled_box.isChecked()
            self.summary.setText("approval off" if off else "")
        else:
            self.summary.setText(
                f"pending {len(pending)}  approved {gate.n_approved}  "
                f"rejected {gate.n_rejected}"
            )

    def selected_ids(self) -> list[int]:
        """Proposal ids of the selected rows."""
        rows = sorted({i.row() for i in self.table.selectedIndexes()})
        return [self._rows[r] for r in rows if r < len(self._rows)]

    def approve_selected(self) -> None:
        if self.gate is not None:
            for pid in self.selected_ids():
                self.gate.approve(pid)
        self.refresh()

    def reject_selected(self) -> None:
        if self.gate is not None:
            for pid in self.selected_ids():
                self.gate.reject(pid)
        self.refresh()

    def approve_all(self) -> None:
        if self.gate is not None:
            self.gate.approve_all()
        self.refresh()

    def reject_all(self) -> None:
        if self.gate is not None:
            self.gate.reject_all()
        self.refresh()


# ------------------------------------------------------------------ policies
class PolicyEditor(QTreeWidget):
    """The experiment's policies and their parameters, editable before a run.

    Values are YAML (``10``, ``true``, ``FITC``, ``{range: 4, step: 2}``);
    nested settings (``filter``) are shown one level deep. `experiment`
    returns the experiment with the edits (validated); `save` writes it back to
    a YAML file.
    """

    def __init__(self, experiment: Experiment, parent=None) -> None:
        super().__init__(parent)
        self.setColumnCount(2)
        self.setHeaderLabels(("policy / parameter", "value"))
        self.header().setSectionResizeMode(0, QHeaderView.ResizeMode.ResizeToContents)
        self.set_experiment(experiment)

    def set_experiment(self, experiment: Experiment) -> None:
        """Show `experiment`'s policies (edits are discarded)."""
        self._experiment = experiment
        self.clear()
        self._initial: dict[int, str] = {}
        for spec in experiment.policies:
            top = QTreeWidgetItem([spec.name, ""])
            self.addTopLevelItem(top)
            for key, value in _policy_params(spec).items():
                if isinstance(value, dict) and value and key != "z_plan":
                    parent = QTreeWidgetItem([key, ""])
                    top.addChild(parent)
                    for sub, subvalue in value.items():
                        self._add_row(parent, sub, subvalue, (key, sub))
                else:
                    self._add_row(top, key, value, (key,))
            top.setExpanded(True)
            for child in _children(top):
                child.setExpanded(True)

    def _add_row(
        self, parent: QTreeWidgetItem, key: str, value: Any, path: tuple[str, ...]
    ) -> None:
        text = _yaml_text(value)
        item = QTreeWidgetItem([key, text])
        item.setFlags(item.flags() | Qt.ItemFlag.ItemIsEditable)
        item.setData(0, Qt.ItemDataRole.UserRole, path)
        parent.addChild(item)
        self._initial[id(item)] = text

    def set_value(self, policy: int, path: str, value: Any) -> None:
        """Set parameter `path` (``"max_targets"``, ``"filter.min_area_px"``)."""
        item = self._find(policy, tuple(path.split(".")))
        item.setText(1, _yaml_text(value))

    def _find(self, policy: int, path: tuple[str, ...]) -> QTreeWidgetItem:
        stack = _children(self.topLevelItem(policy))
        while stack:
            item = stack.pop()
            if item.data(0, Qt.ItemDataRole.UserRole) == path:
                return item
            stack += _children(item)
        raise KeyError(".".join(path))

    def policies(self) -> list[dict[str, Any]]:
        """The policy list with the edits, as in the YAML file."""
        out = []
        for index, spec in enumerate(self._experiment.policies):
            params = copy.deepcopy(spec.params)
            stack = _children(self.topLevelItem(index))
            while stack:
                item = stack.pop()
                stack += _children(item)
                path = item.data(0, Qt.ItemDataRole.UserRole)
                if not path or item.text(1) == self._initial.get(id(item)):
                    continue
                try:
                    value = yaml.safe_load(item.text(1)) if item.text(1) else None
                except yaml.YAMLError:
                    raise ExperimentError(
                        f"{spec.name}.{'.'.join(path)}: not a YAML value: "
                        f"{item.text(1)!r}"
                    ) from None
                target = params
                for key in path[:-1]:
                    target = target.setdefault(key, {})
                target[path[-1]] = value
            out.append({"name": spec.name, **params})
        return out

    def experiment(self) -> Experiment:
        """The experiment with the edited policies.

        Raises
        ------
        ExperimentError
            When an edited value is not valid for its policy.
        """
        from pydantic import ValidationError

        from smartscope.experiment import format_validation_error

        exp = self._experiment
        try:
            return exp.model_validate(
                {**_experiment_data(exp), "policies": self.policies()}
            )
        except ValidationError as e:
            raise ExperimentError(format_validation_error(e)) from None

    def save(self, path: str | Path) -> Path:
        """Write the experiment, with the edited policies, to a YAML file."""
        path = Path(path)
        exp = self.experiment()
        source = exp.source
        data: dict[str, Any] | None = None
        if source is not None and Path(source).is_file():
            loaded = yaml.safe_load(Path(source).read_text(encoding="utf-8"))
            data = loaded if isinstance(loaded, dict) else None
        if data is None:
            data = _experiment_data(exp)
            data.pop("source", None)
        data["policies"] = self.policies()
        config = data.get("config")
        if (
            config
            and not Path(config).is_absolute()
            and source is not None
            and path.resolve().parent != Path(source).parent
        ):
            data["config"] = str(exp.config_path())  # keep it loadable from there
        path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        return path


def _policy_params(spec: Any) -> dict[str, Any]:
    """Every parameter of a policy: the file's values over the defaults."""
    try:
        policy = spec.build()
        dump = getattr(policy, "model_dump", None)
        params = dump(mode="json", exclude={"name"}) if dump else {}
    except Exception:
        params = {}
    for key, value in copy.deepcopy(spec.params).items():
        default = params.get(key)
        if isinstance(value, dict) and isinstance(default, dict):
            params[key] = {**default, **value}
        else:
            params[key] = value
    return params


def _experiment_data(exp: Experiment) -> dict[str, Any]:
    data = exp.model_dump(mode="json")
    data["sequence"] = exp.sequence.model_dump(mode="json", exclude_unset=True)
    data["source"] = exp.source
    return data


def _yaml_text(value: Any) -> str:
    if value is None:
        return ""
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()
