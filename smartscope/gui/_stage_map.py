"""`StageMap`: where the microscope has been, is, and will go, in stage µm."""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

import numpy as np
from qtpy.QtCore import QPointF, QRectF, Qt
from qtpy.QtGui import QBrush, QColor, QPainter, QPen, QPolygonF
from qtpy.QtWidgets import QSizePolicy, QWidget

if TYPE_CHECKING:
    from qtpy.QtGui import QMouseEvent, QPaintEvent

__all__ = ["StageMap"]

TILE = QColor(120, 120, 120)
VISITED = QColor(70, 130, 200, 90)
DETECTED = QColor(60, 200, 90)
UPCOMING = QColor(255, 150, 0)
CURRENT = QColor(230, 40, 40)

_MAX_POINTS = 50_000


class StageMap(QWidget):
    """Survey tiles, detected objects, visited and upcoming positions, current FOV.

    Everything is in stage µm with Y pointing down, as in the camera image of
    an unrotated camera; the view fits whatever has been added.
    """

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.fov_um: tuple[float, float] = (512.0, 512.0)
        self.tiles: list[tuple[float, float]] = []
        self.visited: dict[tuple[int, int], tuple[float, float]] = {}
        self._detected: dict[tuple[int, int], tuple[float, float]] = {}
        self.upcoming: list[tuple[float, float]] = []
        self.current: tuple[float, float] | None = None
        self.setMinimumSize(220, 220)
        self.setMouseTracking(True)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        self._hover = ""

    # ---------------------------------------------------------------- data
    def clear(self) -> None:
        """Forget everything (a new run)."""
        self.tiles.clear()
        self.visited.clear()
        self._detected.clear()
        self.upcoming = []
        self.current = None
        self.update()

    def set_plan(
        self, tiles: list[tuple[float, float]], fov_um: tuple[float, float]
    ) -> None:
        """The base plan's stage positions (drawn as FOV-sized tiles)."""
        self.tiles = list(tiles)
        self.fov_um = fov_um
        self.update()

    def add_visit(self, x_um: float, y_um: float) -> None:
        """A frame was acquired at ``(x, y)``: it becomes the current FOV."""
        self.visited.setdefault((round(x_um), round(y_um)), (x_um, y_um))
        self.current = (x_um, y_um)

    def add_detections(self, points_um: np.ndarray) -> None:
        """Stage positions ``(N, 2)`` of detected objects.

        An object seen again (within 1 µm) is drawn once.
        """
        points = np.asarray(points_um, dtype=float).reshape(-1, 2)
        points = points[np.isfinite(points).all(axis=1)]
        if len(self._detected) >= _MAX_POINTS:
            return
        for x, y in points.tolist():
            self._detected.setdefault((round(x), round(y)), (x, y))

    def set_upcoming(self, points: list[tuple[float, float]]) -> None:
        """Positions of the queued events, in the order they will be visited."""
        self.upcoming = list(points)

    @property
    def detected(self) -> np.ndarray:
        """Detected object positions so far (one per object), ``(N, 2)`` µm."""
        if not self._detected:
            return np.zeros((0, 2))
        return np.array(list(self._detected.values()))

    # ------------------------------------------------------------- drawing
    def _bounds(self) -> QRectF:
        fw, fh = self.fov_um
        xs: list[float] = []
        ys: list[float] = []
        for x, y in [*self.tiles, *self.visited.values(), *self.upcoming]:
            xs += [x - fw / 2, x + fw / 2]
            ys += [y - fh / 2, y + fh / 2]
        det = self.detected
        if len(det):
            xs += [float(det[:, 0].min()), float(det[:, 0].max())]
            ys += [float(det[:, 1].min()), float(det[:, 1].max())]
        if not xs:
            return QRectF(-fw, -fh, 2 * fw, 2 * fh)
        x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
        pad = 0.05 * max(x1 - x0, y1 - y0, 1.0)
        return QRectF(x0 - pad, y0 - pad, x1 - x0 + 2 * pad, y1 - y0 + 2 * pad)

    def _transform(self) -> tuple[float, float, float, QRectF]:
        world = self._bounds()
        margin = 8
        avail_w = max(self.width() - 2 * margin, 1)
        avail_h = max(self.height() - 2 * margin - 16, 1)
        scale = min(avail_w / world.width(), avail_h / world.height())
        ox = margin + (avail_w - world.width() * scale) / 2 - world.x() * scale
        oy = margin + 16 + (avail_h - world.height() * scale) / 2 - world.y() * scale
        return scale, ox, oy, world

    def paintEvent(self, event: QPaintEvent) -> None:
        painter = QPainter(self)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        painter.fillRect(self.rect(), QColor(25, 25, 28))
        scale, ox, oy, _ = self._transform()
        fw, fh = self.fov_um[0] * scale, self.fov_um[1] * scale

        def pt(x: float, y: float) -> QPointF:
            return QPointF(ox + x * scale, oy + y * scale)

        def fov_rect(x: float, y: float) -> QRectF:
            c = pt(x, y)
            return QRectF(c.x() - fw / 2, c.y() - fh / 2, fw, fh)

        painter.setPen(QPen(TILE, 1, Qt.PenStyle.DashLine))
        painter.setBrush(Qt.BrushStyle.NoBrush)
        for x, y in self.tiles:
            painter.drawRect(fov_rect(x, y))
        painter.setPen(Qt.PenStyle.NoPen)
        painter.setBrush(QBrush(VISITED))
        for x, y in self.visited.values():
            painter.drawRect(fov_rect(x, y))
        det = self.detected
        if len(det):
            pen = QPen(DETECTED, 4.0)
            pen.setCapStyle(Qt.PenCapStyle.RoundCap)
            painter.setPen(pen)
            xy = det * scale + (ox, oy)
            painter.drawPoints(QPolygonF([QPointF(x, y) for x, y in xy.tolist()]))
            painter.setPen(Qt.PenStyle.NoPen)
        if self.upcoming:
            painter.setPen(QPen(UPCOMING, 1))
            painter.setBrush(Qt.BrushStyle.NoBrush)
            points = [pt(x, y) for x, y in self.upcoming]
            for a, b in itertools.pairwise(points):
                painter.drawLine(a, b)
            for p in points:
                painter.drawEllipse(p, 4.0, 4.0)
        if self.current is not None:
            painter.setPen(QPen(CURRENT, 2))
            painter.setBrush(Qt.BrushStyle.NoBrush)
            painter.drawRect(fov_rect(*self.current))

        # legend
        painter.setPen(QColor(220, 220, 220))
        legend = [
            (TILE, "tiles"),
            (VISITED.lighter(150), "visited"),
            (DETECTED, f"detected ({len(det)})"),
            (UPCOMING, f"upcoming ({len(self.upcoming)})"),
            (CURRENT, "field of view"),
        ]
        x = 6
        for color, text in legend:
            painter.fillRect(QRectF(x, 5, 9, 9), color)
            painter.drawText(QPointF(x + 12, 14), text)
            x += 18 + painter.fontMetrics().horizontalAdvance(text) + 6
        if self._hover:
            painter.drawText(
                self.rect().adjusted(6, 0, -6, -4),
                Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignBottom,
                self._hover,
            )
        painter.end()

    def mouseMoveEvent(self, event: QMouseEvent) -> None:
        pos = event.position() if hasattr(event, "position") else event.localPos()
        scale, ox, oy, _ = self._transform()
        x, y = (pos.x() - ox) / scale, (pos.y() - oy) / scale
        self._hover = f"stage x {x:.0f} µm  y {y:.0f} µm"
        self.update()
