"""`FrameView`: one camera frame, its segmentation, contrast and cursor readout."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
from qtpy.QtCore import QPointF, QRectF, Qt
from qtpy.QtGui import QColor, QImage, QPainter, QPen
from qtpy.QtWidgets import (
    QCheckBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSizePolicy,
    QVBoxLayout,
    QWidget,
)
from superqt import QLabeledRangeSlider

if TYPE_CHECKING:
    from qtpy.QtGui import QMouseEvent, QPaintEvent

    from smartscope.detections import Detections

__all__ = ["FrameView", "outline_mask"]

OUTLINE_COLOR = QColor(255, 200, 0)  # object outlines (amber)
FILL_COLOR = QColor(255, 200, 0, 70)  # object interiors (translucent amber)
CENTROID_COLOR = QColor(0, 230, 255)  # centroid crosses (cyan)


def outline_mask(labels: np.ndarray) -> np.ndarray:
    """Boolean mask of the pixels on the edge of each labelled object."""
    lab = np.asarray(labels)
    edge = np.zeros(lab.shape, dtype=bool)
    diff_x = lab[:, 1:] != lab[:, :-1]
    diff_y = lab[1:, :] != lab[:-1, :]
    edge[:, 1:] |= diff_x
    edge[:, :-1] |= diff_x
    edge[1:, :] |= diff_y
    edge[:-1, :] |= diff_y
    edge[0, :] = edge[-1, :] = True
    edge[:, 0] = edge[:, -1] = True
    return edge & (lab > 0)


_OVERLAYS: OrderedDict[int, tuple[Detections, np.ndarray, QImage]] = OrderedDict()


def overlay_image(detections: Detections) -> tuple[np.ndarray, QImage]:
    """RGBA outlines (and translucent interiors) of the objects, as a QImage.

    The last few are cached, so the live and the analysed view showing the same
    frame build it once.
    """
    key = id(detections)
    hit = _OVERLAYS.get(key)
    if hit is not None and hit[0] is detections:
        return hit[1], hit[2]
    labels = np.asarray(detections.labels)
    rgba = np.zeros((*labels.shape, 4), dtype=np.uint8)
    rgba[labels > 0] = FILL_COLOR.getRgb()
    rgba[outline_mask(labels)] = OUTLINE_COLOR.getRgb()
    h, w = labels.shape
    image = QImage(rgba.data, w, h, 4 * w, QImage.Format.Format_RGBA8888)
    _OVERLAYS[key] = (detections, rgba, image)
    while len(_OVERLAYS) > 4:
        _OVERLAYS.popitem(last=False)
    return rgba, image


class _Canvas(QWidget):
    """Paints the frame scaled to fit, the outlines and the centroids."""

    def __init__(self, view: FrameView) -> None:
        super().__init__(view)
        self._view = view
        self.setMouseTracking(True)
        self.setMinimumSize(200, 200)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)

    def image_rect(self) -> QRectF:
        """Where the image lands in the widget (aspect kept, centered)."""
        image = self._view._qimage
        if image is None:
            return QRectF()
        w, h = image.width(), image.height()
        scale = min(self.width() / w, self.height() / h)
        dw, dh = w * scale, h * scale
        return QRectF((self.width() - dw) / 2, (self.height() - dh) / 2, dw, dh)

    def paintEvent(self, event: QPaintEvent) -> None:
        view = self._view
        painter = QPainter(self)
        painter.fillRect(self.rect(), Qt.GlobalColor.black)
        drawn = 0
        if view._qimage is not None:
            rect = self.image_rect()
            painter.drawImage(rect, view._qimage)
            if view._overlay is not None and view.show_overlay:
                painter.drawImage(rect, view._overlay)
            det = view.detections
            if det is not None and view.show_overlay and len(det):
                scale = rect.width() / view._qimage.width()
                painter.setPen(QPen(CENTROID_COLOR, 1.2))
                gap, arm = 4.0, 9.0  # a reticle that leaves the object visible
                for x, y in det.centroids_px:
                    p = QPointF(
                        rect.x() + (x + 0.5) * scale, rect.y() + (y + 0.5) * scale
                    )
                    for dx, dy in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                        painter.drawLine(
                            p + QPointF(dx * gap, dy * gap),
                            p + QPointF(dx * arm, dy * arm),
                        )
                    drawn += 1
            painter.setPen(QColor(230, 230, 230))
            painter.drawText(
                self.rect().adjusted(6, 4, -6, -4),
                Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignTop,
                view.caption,
            )
        else:
            painter.setPen(QColor(150, 150, 150))
            painter.drawText(self.rect(), Qt.AlignmentFlag.AlignCenter, "no frame yet")
        painter.end()
        view.n_drawn_objects = drawn

    def mouseMoveEvent(self, event: QMouseEvent) -> None:
        pos = event.position() if hasattr(event, "position") else event.localPos()
        self._view._cursor_at(pos, self.image_rect())


class FrameView(QWidget):
    """A frame with its segmentation drawn over it.

    Contrast limits sit on a superqt range slider (auto-contrast: 0.1-99.9
    percentiles of each new frame); the pixel value and the stage position
    under the cursor are shown below. Drawing is done only when `set_frame`
    or `set_detections` gives something new.

    Parameters
    ----------
    title : str
        Shown above the frame.
    bit_depth : int
        Camera bit depth: the range of the contrast slider.
    """

    def __init__(self, title: str, *, bit_depth: int = 16, parent=None) -> None:
        super().__init__(parent)
        self.title = title
        self.caption = title
        self.image: np.ndarray | None = None
        self.detections: Detections | None = None
        self.stage_xy_um: tuple[float, float] | None = None
        self.event_id: int | None = None
        self.frame_index: int | None = None
        self.pixel_offset: tuple[float, float] = (0.0, 0.0)
        self.show_overlay = True
        self.n_drawn_objects = 0
        self.to_stage: Callable[[np.ndarray, tuple[float, float]], np.ndarray] | None
        self.to_stage = None
        self._qimage: QImage | None = None
        self._overlay: QImage | None = None
        # the arrays behind the QImages (QImage does not own the memory)
        self._grey: np.ndarray | None = None
        self._rgba: np.ndarray | None = None
        self._lut_cache: tuple[tuple[int, int], np.ndarray] | None = None
        self._full_top = 65535
        self._range_fitted = False

        self.canvas = _Canvas(self)
        self.slider = QLabeledRangeSlider(Qt.Orientation.Horizontal)
        self.slider.setEdgeLabelMode(self.slider.EdgeLabelMode.NoLabel)
        self.set_bit_depth(bit_depth)
        self.slider.valueChanged.connect(self._on_limits)
        self.auto_contrast = QCheckBox("auto")
        self.auto_contrast.setChecked(True)
        self.auto_contrast.setToolTip("Contrast from the 0.1-99.9 % percentiles")
        self.auto_contrast.toggled.connect(self._on_auto_toggled)
        self.overlay_box = QCheckBox("segmentation")
        self.overlay_box.setChecked(True)
        self.overlay_box.toggled.connect(self._on_overlay_toggled)
        self.reset_button = QPushButton("full range")
        self.reset_button.clicked.connect(self._full_range)
        self.cursor_label = QLabel("move the cursor over the image")
        self.cursor_label.setTextInteractionFlags(
            Qt.TextInteractionFlag.TextSelectableByMouse
        )

        controls = QHBoxLayout()
        controls.addWidget(self.slider, 1)
        controls.addWidget(self.auto_contrast)
        controls.addWidget(self.overlay_box)
        controls.addWidget(self.reset_button)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(2, 2, 2, 2)
        layout.addWidget(self.canvas, 1)
        layout.addLayout(controls)
        layout.addWidget(self.cursor_label)

    # ------------------------------------------------------------ contrast
    def set_bit_depth(self, bits: int) -> None:
        """Set the contrast slider's range to ``[0, 2**bits - 1]``.

        Auto-contrast then narrows the slider to the data (a power of two above
        the brightest pixels seen), so dim 16-bit frames stay adjustable.
        """
        top = (1 << max(1, min(int(bits), 16))) - 1
        self._full_top = top
        self._range_fitted = False
        self.slider.blockSignals(True)
        self.slider.setRange(0, top)
        self.slider.setValue((0, top))
        self.slider.blockSignals(False)

    @property
    def limits(self) -> tuple[int, int]:
        """Current contrast limits (low, high)."""
        lo, hi = self.slider.value()
        return int(lo), int(hi)

    def _on_limits(self, _value: object) -> None:
        if self.auto_contrast.isChecked() and not self.slider.signalsBlocked():
            # a user drag turns auto-contrast off
            self.auto_contrast.blockSignals(True)
            self.auto_contrast.setChecked(False)
            self.auto_contrast.blockSignals(False)
        self._render_image()
        self.canvas.update()

    def _on_auto_toggled(self, on: bool) -> None:
        if on and self.image is not None:
            self._apply_auto_contrast()
            self._render_image()
            self.canvas.update()

    def _on_overlay_toggled(self, on: bool) -> None:
        self.show_overlay = on
        self.canvas.update()

    def _full_range(self) -> None:
        self.auto_contrast.setChecked(False)
        self.slider.setRange(0, self._full_top)
        self.slider.setValue((0, self._full_top))

    def _apply_auto_contrast(self) -> None:
        assert self.image is not None
        sample = self.image[::4, ::4]
        lo, hi = np.percentile(sample, [0.1, 99.9])
        if self._lut_cache is not None:  # keep the table if hardly changed
            (old_lo, old_hi), _ = self._lut_cache
            tol = 0.02 * max(old_hi - old_lo, 1)
            if abs(lo - old_lo) <= tol and abs(hi - old_hi) <= tol:
                lo, hi = old_lo, old_hi
        lo, hi = int(lo), max(int(hi), int(lo) + 1)
        top = min(self._full_top, (1 << int(max(hi, 1) * 2).bit_length()) - 1)
        fit = top != self.slider.maximum() and (
            top > self.slider.maximum() or not self._range_fitted
        )
        if (lo, hi) == self.limits and not fit:
            return
        self.slider.blockSignals(True)
        if fit:
            self.slider.setRange(0, top)
            self._range_fitted = True
        self.slider.setValue((lo, min(hi, self.slider.maximum())))
        self.slider.blockSignals(False)

    # -------------------------------------------------------------- frames
    def set_frame(
        self,
        image: np.ndarray,
        *,
        stage_xy_um: tuple[float, float] | None = None,
        event_id: int | None = None,
        frame_index: int | None = None,
        caption: str = "",
        detections: Detections | None = None,
        pixel_offset: tuple[float, float] = (0.0, 0.0),
    ) -> None:
        """Show `image` (and its `detections`, if known).

        `pixel_offset` is where the image's first pixel lies on the sensor (a
        camera ROI), for the stage position under the cursor.
        """
        self.image = np.asarray(image)
        self.pixel_offset = pixel_offset
        self.stage_xy_um = stage_xy_um
        self.event_id = event_id
        self.frame_index = frame_index
        self.caption = f"{self.title}  {caption}".strip()
        if self.auto_contrast.isChecked():
            self._apply_auto_contrast()
        self._render_image()
        self._set_overlay(detections)
        self.canvas.update()

    def set_detections(self, detections: Detections | None) -> None:
        """Draw the segmentation of the frame shown (outlines and centroids)."""
        self._set_overlay(detections)
        self.canvas.update()

    def _render_image(self) -> None:
        if self.image is None:
            return
        img = self.image
        if img.dtype in (np.uint8, np.uint16):
            grey = np.take(self._lut(), img)  # one lookup per pixel
        else:
            lo, hi = self.limits
            scaled = (img.astype(np.float32) - lo) * (255.0 / max(hi - lo, 1))
            grey = np.clip(scaled, 0, 255).astype(np.uint8)
        grey = np.ascontiguousarray(grey)
        h, w = grey.shape
        self._grey = grey
        self._qimage = QImage(grey.data, w, h, w, QImage.Format.Format_Grayscale8)

    def _lut(self) -> np.ndarray:
        """uint16 → uint8 lookup table of the current contrast limits."""
        limits = self.limits
        if self._lut_cache is None or self._lut_cache[0] != limits:
            lo, hi = limits
            values = np.arange(65536, dtype=np.float32)
            lut = np.clip((values - lo) * (255.0 / max(hi - lo, 1)), 0, 255)
            self._lut_cache = (limits, lut.astype(np.uint8))
        return self._lut_cache[1]

    def _set_overlay(self, detections: Detections | None) -> None:
        self.detections = detections
        if detections is None or self.image is None:
            self._overlay = None
            return
        labels = np.asarray(detections.labels)
        if labels.shape != self.image.shape:
            self.detections, self._overlay = None, None
            return
        self._rgba, self._overlay = overlay_image(detections)
        self.caption = self.caption.split("  [")[0] + f"  [{len(detections)} objects]"

    # --------------------------------------------------------------- cursor
    def _cursor_at(self, pos: QPointF, rect: QRectF) -> None:
        if self.image is None or rect.isEmpty():
            return
        h, w = self.image.shape
        x = (pos.x() - rect.x()) / rect.width() * w
        y = (pos.y() - rect.y()) / rect.height() * h
        if not (0 <= x < w and 0 <= y < h):
            self.cursor_label.setText("")
            return
        self.cursor_label.setText(self.describe_pixel(x, y))

    def describe_pixel(self, x: float, y: float) -> str:
        """``x, y: value`` and, when the stage position is known, stage µm."""
        assert self.image is not None
        col, row = int(x), int(y)
        text = f"x {col}  y {row}  value {self.image[row, col]}"
        if self.to_stage is not None and self.stage_xy_um is not None:
            px = np.array([x, y]) + np.asarray(self.pixel_offset, dtype=float)
            sx, sy = self.to_stage(px, self.stage_xy_um)
            text += f"   stage x {sx:.1f} µm  y {sy:.1f} µm"
        label = self.detections.labels[row, col] if self.detections is not None else 0
        if label:
            text += f"   object {int(label)}"
        return text
