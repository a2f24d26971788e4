"""`write_report`: one self-contained HTML page about a run directory.

The page shows what the run was (experiment, status, hardware, model,
versions), what it did (counts, the Scheduler's lateness, travel and dose), what
it found (a per-well heat map of counts on plates, a bar chart of counts per
position otherwise, a gallery of the targeted acquisitions with their label
outlines), how fast it was (latency and frame-interval histograms), how much
light it used (exposure per position) and what its policies decided (actions
applied and refused, and why).

Pictures are PNG (Pillow) or inline SVG and are embedded in the page, so the
report is one file that can be mailed or archived next to the data. Whatever a
run left behind is shown: an interrupted or failed run, or one without
detections or labels, still gets a report.

Examples
--------
>>> from smartscope.report import write_report
>>> write_report("runs/demo")  # doctest: +SKIP
PosixPath('runs/demo/report.html')
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from smartscope.frame import well_of
from smartscope.rundir import RunRecords, load_run, position_path

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["render_report", "thumbnail", "write_report"]

GALLERY_MAX = 48
"""Most thumbnails in the gallery (chosen evenly over the run)."""
THUMB_PX = 192
"""Longest side of a gallery thumbnail, pixels."""
OUTLINE_RGB = (255, 255, 0)
"""Colour of label outlines drawn over thumbnails."""
NOT_IMAGED_RGB = (205, 205, 205)
SKIPPED_RGB = (215, 35, 35)
MAX_BARS = 100
_NA = "\u2013"  # en dash: no value

# row letter A-P, column 1-24 (as useq's WellPlatePlan names its positions)
_WELL = re.compile(r"^([A-P])0?([1-9]|1\d|2[0-4])$")
_STANDARD_PLATES = ((2, 3), (3, 4), (4, 6), (6, 8), (8, 12), (16, 24))
# viridis, sampled at 0, 1/4, 1/2, 3/4, 1
_VIRIDIS = np.array(
    [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]],
    dtype=float,
)


# ----------------------------------------------------------------- numbers
def _num(value: Any, digits: int = 3) -> str:
    """A number for people: thousands grouped, a few significant digits."""
    if value is None:
        return _NA
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    if isinstance(value, (float, np.floating)):
        x = float(value)
        if not np.isfinite(x):
            return str(x)
        if x == 0:
            return "0"
        if abs(x) >= 10 ** (digits - 1):
            return f"{x:,.0f}"
        return f"{x:.{digits}g}"
    return str(value)


def _when(stamp: Any) -> str:
    if not stamp:
        return _NA
    try:
        t = datetime.fromisoformat(str(stamp))
    except ValueError:
        return str(stamp)
    zone = t.tzname() or ""
    return t.strftime("%Y-%m-%d %H:%M:%S") + (f" {zone}" if zone else "")


def _wall_time_s(run: RunRecords) -> tuple[float | None, str]:
    if run.summary.get("wall_time_s") is not None:
        return float(run.summary["wall_time_s"]), ""
    try:
        start = datetime.fromisoformat(str(run.info["started_at"]))
        end = datetime.fromisoformat(str(run.info["finished_at"]))
        return (end - start).total_seconds(), ""
    except (KeyError, TypeError, ValueError):
        pass
    times = [f["t_acquired"] for f in run.frames if f.get("t_acquired") is not None]
    return (max(times), "at least (last frame)") if times else (None, "")


# ------------------------------------------------------------------ counts
_COUNT_ROWS = (
    ("frames_acquired", "frames acquired"),
    ("frames_analysed", "frames analysed"),
    ("frames_dropped", "analysis drops"),
    ("detections", "detections"),
    ("decisions", "decisions"),
    ("events_scheduled", "events scheduled"),
    ("events_skipped", "events skipped"),
    ("base_events", "base events"),
    ("positions", "positions"),
)


def _counts(run: RunRecords) -> tuple[list[tuple[str, str]], str]:
    source = run.summary
    note = ""
    if not source:
        source = run.counts()
        note = "run.json has no summary (the run never finished): counted from the logs"
    rows = [(label, _num(source.get(key))) for key, label in _COUNT_ROWS]
    kinds = Counter(str(f.get("kind", "base")) for f in run.frames)
    if kinds:
        by_kind = ", ".join(f"{n:,} {k}" for k, n in kinds.most_common())
        rows.insert(1, ("frames by kind", by_kind))
    return rows, note


def _schedule_rows(schedule: dict[str, Any]) -> list[tuple[str, str]]:
    if not schedule:
        return []
    rows = []
    for kind, late in (schedule.get("lateness_s") or {}).items():
        if not isinstance(late, dict):
            continue
        rows.append(
            (
                f"lateness of {kind} events (s)",
                f"n {_num(late.get('n'))}, p50 {_num(late.get('p50'))}, "
                f"p99 {_num(late.get('p99'))}, max {_num(late.get('max'))}",
            )
        )
    rows += [
        ("missed deadlines", _num(schedule.get("missed_deadlines"))),
        ("stage travel (µm)", _num(schedule.get("travel_um"))),
        ("light dose (exposure ms)", _num(schedule.get("total_dose_ms"))),
        ("dose budget per position (ms)", _num(schedule.get("dose_budget_ms"))),
        ("dose refusals", _num(schedule.get("dose_refusals"))),
    ]
    return rows


# ------------------------------------------------------------------ counts
def _base_counts(run: RunRecords) -> dict[str, tuple[int, int]]:
    """``{base position: (detections summed, analysed frames)}`` in plan order."""
    kinds = run.frame_kinds
    out: dict[str, list[int]] = {}
    for f in run.frames:
        if f.get("kind", "base") == "base" and f.get("position") is not None:
            out.setdefault(str(f["position"]), [0, 0])
    for r in run.detections:
        pos = str(r.get("position"))
        kind = kinds.get(int(r["frame_index"]))
        if kind == "base" or (kind is None and pos in out):
            entry = out.setdefault(pos, [0, 0])
            entry[0] += int(r.get("n_detections", 0))
            entry[1] += 1
    return {k: (v[0], v[1]) for k, v in out.items()}


def _skipped_positions(run: RunRecords) -> set[str]:
    return {
        str(a.get("position"))
        for d in run.decisions
        for a in d.get("actions", [])
        if a.get("type") == "skip_position" and a.get("status") == "applied"
    }


def _well(position: str) -> tuple[int, int] | None:
    """``(row, column)``, 0-based, of a plate position such as ``"B12_0003"``."""
    m = _WELL.match(well_of(position))
    return (ord(m.group(1)) - ord("A"), int(m.group(2)) - 1) if m else None


def _well_name(row: int, col: int) -> str:
    return f"{chr(ord('A') + row)}{col + 1}"


def _plate_shape(run: RunRecords, wells: list[tuple[int, int]]) -> tuple[int, int]:
    plan = run.info.get("plan") or {}
    positions = plan.get("stage_positions")
    plate = positions.get("plate") if isinstance(positions, dict) else None
    if isinstance(plate, str):  # a useq plate name, e.g. "384-well"
        try:
            import useq

            known = useq.WellPlate.from_str(plate)
            plate = {"rows": known.rows, "columns": known.columns}
        except Exception:
            plate = None
    if isinstance(plate, dict) and plate.get("rows") and plate.get("columns"):
        rows, cols = int(plate["rows"]), int(plate["columns"])
    else:
        rows, cols = 0, 0
    need_r = max(r for r, _ in wells) + 1
    need_c = max(c for _, c in wells) + 1
    if rows >= need_r and cols >= need_c:
        return rows, cols
    for rows, cols in _STANDARD_PLATES:
        if rows >= need_r and cols >= need_c:
            return rows, cols
    return need_r, need_c


@dataclass
class _WellStat:
    """Counts of one plate well."""

    count: int = 0
    analysed_frames: int = 0
    positions: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def imaged(self) -> bool:
        return bool(self.positions)


def _plate(
    run: RunRecords,
) -> tuple[dict[tuple[int, int], _WellStat], tuple[int, int]] | None:
    """Per-well stats and plate shape, or None when the run is not a plate."""
    counts = _base_counts(run)
    skipped = _skipped_positions(run)
    if not counts or any(_well(p) is None for p in counts):
        return None
    wells: dict[tuple[int, int], _WellStat] = {}
    for pos, (n, frames) in counts.items():
        stat = wells.setdefault(_well(pos), _WellStat())  # type: ignore[arg-type]
        stat.count += n
        stat.analysed_frames += frames
        stat.positions.append(pos)
    for pos in skipped:
        rc = _well(pos)
        if rc is not None:
            wells.setdefault(rc, _WellStat()).skipped.append(pos)
    return wells, _plate_shape(run, list(wells))


# ---------------------------------------------------------------- pictures
def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType
        return ImageFont.load_default()


def _viridis(value: float) -> tuple[int, int, int]:
    x = min(max(value, 0.0), 1.0) * (len(_VIRIDIS) - 1)
    i = min(int(x), len(_VIRIDIS) - 2)
    rgb = _VIRIDIS[i] + (x - i) * (_VIRIDIS[i + 1] - _VIRIDIS[i])
    return (int(rgb[0]), int(rgb[1]), int(rgb[2]))


@dataclass(frozen=True)
class _PlateLayout:
    """Where the wells of a `rows` x `cols` plate are drawn in the heat map."""

    rows: int
    cols: int
    left: int = 26
    top: int = 22

    @property
    def cell(self) -> int:
        return 44 if self.cols <= 12 else 30

    def box(self, row: int, col: int) -> tuple[int, int, int, int]:
        """Pixel box (x0, y0, x1, y1) of a well's cell in the heat map."""
        x0 = self.left + col * self.cell
        y0 = self.top + row * self.cell
        return (x0 + 1, y0 + 1, x0 + self.cell - 2, y0 + self.cell - 2)

    @property
    def size(self) -> tuple[int, int]:
        return (
            max(self.left + self.cols * self.cell + 8, 360),
            self.top + self.rows * self.cell + 56,
        )


def _heatmap(
    wells: dict[tuple[int, int], _WellStat], rows: int, cols: int
) -> Image.Image:
    """A plate's wells coloured by count; grey: never imaged; red X: skipped."""
    from PIL import Image, ImageDraw

    layout = _PlateLayout(rows, cols)
    img = Image.new("RGB", layout.size, "white")
    draw = ImageDraw.Draw(img)
    font, small = _font(12), _font(10 if cols > 12 else 11)
    cell = layout.cell
    for c in range(cols):
        x = layout.left + c * cell + cell // 2
        draw.text((x, layout.top - 4), str(c + 1), fill="black", font=font, anchor="md")
    for r in range(rows):
        y = layout.top + r * cell + cell // 2
        draw.text(
            (layout.left - 6, y), chr(65 + r), fill="black", font=font, anchor="rm"
        )
    vmax = max((w.count for w in wells.values() if w.imaged), default=0) or 1
    for r in range(rows):
        for c in range(cols):
            stat = wells.get((r, c))
            box = layout.box(r, c)
            if stat is None or not stat.imaged:
                draw.rectangle(box, fill=NOT_IMAGED_RGB)
            else:
                value = stat.count / vmax
                draw.rectangle(box, fill=_viridis(value))
                center = ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
                text = "black" if value > 0.6 else "white"
                draw.text(center, str(stat.count), fill=text, font=small, anchor="mm")
            if stat is not None and stat.skipped:
                x0, y0, x1, y1 = box
                draw.line((x0 + 2, y0 + 2, x1 - 2, y1 - 2), fill=SKIPPED_RGB, width=2)
                draw.line((x0 + 2, y1 - 2, x1 - 2, y0 + 2), fill=SKIPPED_RGB, width=2)
    # legend: colour bar 0..max, grey swatch, skipped swatch
    y0 = layout.top + rows * cell + 14
    bar_w = 150
    for i in range(bar_w):
        color = _viridis(i / (bar_w - 1))
        draw.line((layout.left + i, y0, layout.left + i, y0 + 12), fill=color)
    draw.text((layout.left, y0 + 15), "0", fill="black", font=small, anchor="lt")
    draw.text(
        (layout.left + bar_w, y0 + 15), str(vmax), fill="black", font=small, anchor="rt"
    )
    x = layout.left + bar_w + 16
    draw.rectangle((x, y0, x + 12, y0 + 12), fill=NOT_IMAGED_RGB)
    draw.text((x + 16, y0 + 6), "not  imaged", fill="black", font=small, anchor="lm")
    x += 90
    draw.line((x, y0, x + 12, y0 + 12), fill=SKIPPED_RGB, width=2)
    draw.line((x, y0 + 12, x + 12, y0), fill=SKIPPED_RGB, width=2)
    draw.text((x + 16, y0 + 6), "skipped", fill="black", font=small, anchor="lm")
    return img


def _png_uri(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _to_uint8(plane: np.ndarray) -> np.ndarray:
    """Contrast-stretch the 1st-99.8th percentile to 0-255."""
    a = np.asarray(plane, dtype=np.float32)
    lo, hi = np.percentile(a, (1, 99.8))
    if hi <= lo:
        hi = lo + 1.0
    return ((a - lo) * (255.0 / (hi - lo))).clip(0, 255).astype(np.uint8)


def _outlines(labels: np.ndarray) -> np.ndarray:
    """Pixels of a label image on the edge of an object."""
    edge = np.zeros(labels.shape, dtype=bool)
    inner = labels[1:, :] != labels[:-1, :]
    edge[1:, :] |= inner
    edge[:-1, :] |= inner
    inner = labels[:, 1:] != labels[:, :-1]
    edge[:, 1:] |= inner
    edge[:, :-1] |= inner
    return edge & (labels > 0)


def thumbnail(
    plane: np.ndarray, labels: np.ndarray | None = None, size: int = THUMB_PX
) -> Image.Image:
    """An RGB thumbnail of an image plane, contrast-stretched, labels outlined."""
    from PIL import Image

    h, w = plane.shape[-2:]
    scale = size / max(h, w)
    shape = (max(1, round(w * scale)), max(1, round(h * scale)))
    gray = Image.fromarray(_to_uint8(plane))
    resample = Image.Resampling.BOX if scale < 1 else Image.Resampling.NEAREST
    rgb = np.asarray(gray.resize(shape, resample).convert("RGB")).copy()
    if labels is not None and labels.shape == plane.shape and labels.any():
        small = Image.fromarray(labels.astype(np.int32)).resize(
            shape, Image.Resampling.NEAREST
        )
        rgb[_outlines(np.asarray(small))] = OUTLINE_RGB
    return Image.fromarray(rgb)


class _Arrays:
    """Per-position image and label arrays of a run, opened once, read by plane."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._stores: dict[tuple[str, str], Any] = {}

    def _store(self, folder: str, position: str) -> Any:
        key = (folder, position)
        if key not in self._stores:
            path = position_path(self.directory, position, labels=folder == "labels")
            path = path / "0"
            store = None
            if path.is_dir():
                import tensorstore as ts

                spec = {
                    "driver": "zarr3",
                    "kvstore": {"driver": "file", "path": str(path)},
                }
                store = ts.open(spec).result()
            self._stores[key] = store
        return self._stores[key]

    def plane(
        self, position: str, t: int, c: int, z: int, *, labels: bool = False
    ) -> np.ndarray | None:
        """One ``(y, x)`` plane, or None where the array holds no such frame."""
        store = self._store("labels" if labels else "images", position)
        if store is None:
            return None
        where = {"t": t, "c": c, "z": z}
        names = list(store.domain.labels)
        if not all(names[:3]):  # no dimension names: (t, c, z, y, x)
            names = ["t", "c", "z", "y", "x"]
        index: list[int | slice] = []
        for name, n in zip(names, store.domain.shape, strict=False):
            if name in where:
                if where[name] >= n:
                    return None
                index.append(where[name])
            else:
                index.append(slice(None))
        return np.asarray(store[tuple(index)].read().result()).squeeze()


@dataclass
class _Shot:
    position: str
    t: int
    c: int
    z: int
    record: dict[str, Any]
    n_frames: int


def _shots(run: RunRecords) -> list[_Shot]:
    """One shot per targeted visit (position, t): its first channel, middle Z."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for f in run.frames:
        where = f.get("array")
        if f.get("kind", "base") == "base" or not isinstance(where, dict):
            continue
        key = (str(where.get("position", f.get("position"))), int(where.get("t", 0)))
        groups[key].append(f)
    shots = []
    for (pos, t), frames in groups.items():
        c = min(int(f["array"].get("c", 0)) for f in frames)
        same_c = sorted(
            (f for f in frames if int(f["array"].get("c", 0)) == c),
            key=lambda f: int(f["array"].get("z", 0)),
        )
        mid = same_c[len(same_c) // 2]
        shots.append(_Shot(pos, t, c, int(mid["array"].get("z", 0)), mid, len(frames)))
    shots.sort(key=lambda s: int(s.record.get("frame_index", 0)))
    return shots


def _evenly(items: list[Any], n: int) -> list[Any]:
    if len(items) <= n:
        return items
    if n <= 0:
        return []
    picks = np.unique(np.linspace(0, len(items) - 1, n).round().astype(int))
    return [items[i] for i in picks]


def _pick_shots(shots: list[_Shot], n: int) -> list[_Shot]:
    """At most `n` shots spread over the run, targets before autofocus planes.

    Hits, targeted cells and bursts first; autofocus planes fill what room is
    left.
    """
    targets = [s for s in shots if s.record.get("kind") != "autofocus"]
    focus = [s for s in shots if s.record.get("kind") == "autofocus"]
    chosen = _evenly(targets, n)
    chosen += _evenly(focus, n - len(chosen))
    return sorted(chosen, key=lambda s: int(s.record.get("frame_index", 0)))


def _gallery(run: RunRecords) -> tuple[list[dict[str, Any]], int]:
    shots = _shots(run)
    arrays = _Arrays(run.directory)
    items = []
    for shot in _pick_shots(shots, GALLERY_MAX):
        rec = shot.record
        item = {
            "position": shot.position,
            "kind": rec.get("kind"),
            "frame_index": rec.get("frame_index"),
            "trigger_frame": _num(rec.get("trigger_frame")),
            "decision_id": _num(rec.get("decision_id")),
            "where": f"t {shot.t}, c {shot.c}, z {shot.z}"
            + (f" of {shot.n_frames} frames" if shot.n_frames > 1 else ""),
            "channel": rec.get("channel"),
            "src": None,
            "labels": False,
            "problem": None,
        }
        try:
            plane = arrays.plane(shot.position, shot.t, shot.c, shot.z)
            labels = arrays.plane(shot.position, shot.t, shot.c, shot.z, labels=True)
        except Exception as e:  # an unfinished array: show the others
            item["problem"] = f"unreadable: {type(e).__name__}"
        else:
            if plane is None or plane.ndim != 2:
                item["problem"] = "image not stored"
            else:
                item["labels"] = labels is not None and bool(labels.any())
                item["src"] = _png_uri(thumbnail(plane, labels))
        items.append(item)
    return items, len(shots)


# ---------------------------------------------------------------- SVG charts
def _svg_histogram(values: list[float], unit: str, *, bins: int = 30) -> str:
    """A histogram as inline SVG (counts per bin, p50 and p99 marked)."""
    width, height = 460, 200
    left, right, top, bottom = 44, 12, 24, 34
    data = np.asarray([v for v in values if v is not None and np.isfinite(v)])
    if data.size == 0:
        return ""
    lo, hi = float(data.min()), float(data.max())
    if hi - lo <= 1e-6 * max(abs(lo), abs(hi), 1.0):  # all (nearly) equal
        lo, hi = lo - 0.5, hi + 0.5
    counts, edges = np.histogram(data, bins=bins, range=(lo, hi))
    pw, ph = width - left - right, height - top - bottom
    top_count = int(counts.max()) or 1

    def x_of(v: float) -> float:
        return left + (v - lo) / (hi - lo) * pw

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" class="chart" role="img">'
    ]
    for n, a, b in zip(counts, edges[:-1], edges[1:], strict=True):
        if not n:
            continue
        h = n / top_count * ph
        parts.append(
            f'<rect x="{x_of(a):.1f}" y="{top + ph - h:.1f}" '
            f'width="{max(x_of(b) - x_of(a) - 1, 1):.1f}" height="{h:.1f}" '
            f'fill="#3b6ea8"><title>{n} in {_num(float(a))}\u2013{_num(float(b))} '
            f"{html.escape(unit)}</title></rect>"
        )
    p50, p99 = np.percentile(data, [50, 99])
    for p, name, color in ((p50, "p50", "#d95f02"), (p99, "p99", "#b2182b")):
        x = x_of(float(p))
        # label right of the line, or left of it near the right edge
        tx, anchor = (x + 2, "start") if x < left + pw - 24 else (x - 2, "end")
        ty = top - (13 if name == "p50" else 3)  # above the bars
        parts.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{top + ph}" '
            f'stroke="{color}" stroke-dasharray="3,2"/>'
            f'<text x="{tx:.1f}" y="{ty}" fill="{color}" font-size="10" '
            f'text-anchor="{anchor}">{name}</text>'
        )
    axis_y = top + ph
    parts.append(
        f'<line x1="{left}" x2="{left + pw}" y1="{axis_y}" y2="{axis_y}" '
        'stroke="#444"/>'
        f'<line x1="{left}" x2="{left}" y1="{top}" y2="{axis_y}" stroke="#444"/>'
    )
    for v in (lo, (lo + hi) / 2, hi):
        x = x_of(v)
        anchor = "start" if v == lo else ("end" if v == hi else "middle")
        parts.append(
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{axis_y}" y2="{axis_y + 4}" '
            f'stroke="#444"/><text x="{x:.1f}" y="{axis_y + 15}" font-size="10" '
            f'text-anchor="{anchor}">{_num(v)}</text>'
        )
    parts.append(
        f'<text x="{left + pw / 2:.1f}" y="{height - 3}" font-size="11" '
        f'text-anchor="middle">{html.escape(unit)}</text>'
        f'<text x="{left - 4}" y="{top + 8}" font-size="10" '
        f'text-anchor="end">{top_count}</text>'
        f'<text x="{left - 4}" y="{axis_y}" font-size="10" text-anchor="end">0</text>'
        "</svg>"
    )
    return "".join(parts)


def _svg_bars(items: list[tuple[str, float, str]], unit: str) -> str:
    """A horizontal bar chart as inline SVG: ``(label, value, tooltip)`` rows."""
    if not items:
        return ""
    row, width = 16, 640
    label_w = min(220, 8 + 7 * max(len(label) for label, _, _ in items))
    value_w = 80
    pw = width - label_w - value_w
    vmax = max(v for _, v, _ in items) or 1.0
    height = row * len(items) + 18
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" class="chart" role="img">'
    ]
    for i, (label, value, tip) in enumerate(items):
        y = i * row
        w = value / vmax * pw
        parts.append(
            f'<text x="{label_w - 6}" y="{y + 12}" font-size="11" '
            f'text-anchor="end">{html.escape(label)}</text>'
            f'<rect x="{label_w}" y="{y + 3}" width="{max(w, 0.5):.1f}" height="11" '
            f'fill="#3b6ea8"><title>{html.escape(tip)}</title></rect>'
            f'<text x="{label_w + w + 4:.1f}" y="{y + 12}" '
            f'font-size="11">{_num(value)}</text>'
        )
    y = row * len(items) + 14
    parts.append(
        f'<text x="{label_w}" y="{y}" font-size="11">{html.escape(unit)}</text></svg>'
    )
    return "".join(parts)


def _histograms(run: RunRecords) -> list[dict[str, str]]:
    def ms(rec: dict[str, Any], key: str) -> float | None:
        a, b = rec.get("t_acquired_s"), rec.get(key)
        return None if a is None or b is None else (b - a) * 1000.0

    def from_decisions(key: str) -> list[float]:
        return [
            d["latency_ms"][key]
            for d in run.decisions
            if isinstance(d.get("latency_ms"), dict)
            and d["latency_ms"].get(key) is not None
        ]

    to_det = [v for r in run.detections if (v := ms(r, "t_analysed_s")) is not None]
    to_dec = [v for r in run.detections if (v := ms(r, "t_decided_s")) is not None]
    source = "analysed frames (detections.jsonl)"
    charts = [
        ("frame → detections", to_det or from_decisions("frame_to_detections"), "ms"),
        ("frame → decision", to_dec or from_decisions("frame_to_decision"), "ms"),
        ("frame → queued", from_decisions("frame_to_queued"), "ms"),
    ]
    notes = [
        source if to_det else "decisions (decisions.jsonl)",
        source if to_dec else "decisions (decisions.jsonl)",
        "decisions (decisions.jsonl)",
    ]
    ordered = sorted(
        (f for f in run.frames if f.get("t_acquired") is not None),
        key=lambda f: int(f.get("frame_index", 0)),
    )
    times = np.array([float(f["t_acquired"]) for f in ordered])
    intervals = np.diff(times) if times.size > 1 else np.array([])
    unit = "ms"
    if intervals.size and np.median(intervals) >= 1.0:
        unit = "s"
    else:
        intervals = intervals * 1000.0
    charts.append(("interval between frames", intervals.tolist(), unit))
    notes.append("consecutive frames' acquisition times (frames.jsonl)")
    out = []
    for (title, values, u), note in zip(charts, notes, strict=True):
        data = [v for v in values if v is not None]
        stats = ""
        if data:
            p50, p99 = np.percentile(data, [50, 99])
            stats = (
                f"n {len(data):,}, p50 {_num(float(p50))}, p99 {_num(float(p99))}, "
                f"max {_num(float(max(data)))} {u}"
            )
        slug = re.sub(r"\W+", "-", title.replace("→", "to")).strip("-")
        out.append(
            {
                "id": f"hist-{slug}",
                "title": title,
                "note": note,
                "stats": stats,
                "svg": _svg_histogram(data, u),
            }
        )
    return out


# -------------------------------------------------------------- light dose
def _attributed_dose(frames: list[dict[str, Any]]) -> dict[str, float]:
    """Exposure (ms) per base position as the Scheduler attributes it.

    A frame counts for the position that its event's ``dose_position`` names
    (an added event, for the frame that triggered it), else its own position.
    Runs without a light-dose budget keep only the total in memory; this
    rebuilds the per-position dose from ``frames.jsonl``.
    """
    out: dict[str, float] = {}
    for f in frames:
        event = f.get("event") or {}
        tag = (event.get("metadata") or {}).get("smartscope") or {}
        key = str(tag.get("dose_position") or f.get("position") or "")
        exposure = f.get("exposure_ms")
        if exposure is None:
            exposure = event.get("exposure")
        out[key] = round(out.get(key, 0.0) + float(exposure or 0.0), 3)
    return out


def _dose(run: RunRecords) -> tuple[list[dict[str, Any]], str]:
    per: dict[str, dict[str, Any]] = {}
    for f in run.frames:
        pos = str(f.get("position"))
        entry = per.setdefault(
            pos, {"position": pos, "kinds": set(), "frames": 0, "exposure_ms": 0.0}
        )
        entry["kinds"].add(str(f.get("kind", "base")))
        entry["frames"] += 1
        entry["exposure_ms"] += float(f.get("exposure_ms") or 0.0)
    attributed = (run.summary.get("schedule") or {}).get("dose_ms")
    if attributed is None:  # the Scheduler kept no per-position dose: the log has it
        attributed = _attributed_dose(run.frames)
    for pos, dose in attributed.items():
        per.setdefault(
            pos, {"position": pos, "kinds": set(), "frames": 0, "exposure_ms": 0.0}
        )["scheduler_ms"] = dose
    rows = []
    for entry in per.values():
        rows.append(
            {
                **entry,
                "kinds": ", ".join(sorted(entry["kinds"])),
                "exposure": _num(entry["exposure_ms"]),
                "scheduler": _num(entry.get("scheduler_ms")),
            }
        )
    shown = rows[:MAX_BARS]
    bars = [
        (r["position"], r["exposure_ms"], f"{r['frames']} frames, {r['kinds']}")
        for r in shown
        if r["frames"]
    ]
    return rows, _svg_bars(bars, "exposure (ms) per position")


# --------------------------------------------------------------- decisions
def _decisions(run: RunRecords) -> list[dict[str, Any]]:
    """Per policy: decisions, actions by type and status, refusal reasons."""
    policies: dict[str, dict[str, Any]] = {}

    def entry(name: str) -> dict[str, Any]:
        return policies.setdefault(
            name,
            {
                "policy": name,
                "decisions": 0,
                "actions": defaultdict(Counter),
                "events": Counter(),
                "refusals": Counter(),
                "approval": Counter(),
            },
        )

    resolved: Counter[Any] = Counter()
    for d in run.decisions:
        if "approval" in d:
            resolved[d.get("decision_id")] += len(d.get("actions", []))
    for d in run.decisions:
        e = entry(str(d.get("policy") or "unknown"))
        if "approval" in d:
            e["approval"][str(d["approval"].get("status"))] += 1
        elif d.get("decision_id") is not None:
            e["decisions"] += 1
        for a in d.get("actions", []):
            status = str(a.get("status", "?"))
            kind = str(a.get("type", "?"))
            if status == "pending" and "approval" not in d:
                if resolved[d.get("decision_id")] > 0:  # counted at its resolution
                    resolved[d.get("decision_id")] -= 1
                    continue
            e["actions"][kind][status] += 1
            if status == "applied":
                e["events"][kind] += len(a.get("events", []))
            if status == "refused":
                e["refusals"][str(a.get("outcome") or "no reason given")] += 1
    out = []
    for e in policies.values():
        rows = [
            {
                "type": kind,
                "applied": statuses.get("applied", 0),
                "refused": statuses.get("refused", 0),
                "other": ", ".join(
                    f"{n} {s}"
                    for s, n in statuses.items()
                    if s not in ("applied", "refused")
                ),
                "events": e["events"].get(kind, 0),
            }
            for kind, statuses in sorted(e["actions"].items())
        ]
        out.append(
            {
                "policy": e["policy"],
                "decisions": e["decisions"],
                "rows": rows,
                "refusals": e["refusals"].most_common(5),
                "approval": ", ".join(f"{n} {s}" for s, n in e["approval"].items()),
            }
        )
    return out


# -------------------------------------------------------------------- page
#: The page's Jinja template, a file beside this module.
TEMPLATE = Path(__file__).with_name("template.html.j2")


def _context(run: RunRecords) -> dict[str, Any]:
    from markupsafe import Markup

    from smartscope import __version__

    info, summary = run.info, run.summary
    exp = info.get("experiment") or {}
    status = str(summary.get("status") or info.get("status") or "unknown")
    reason = str(summary.get("reason") or "")
    if status == "running":
        reason = "run.json was never finalised: the run crashed or is still going"
    wall, wall_note = _wall_time_s(run)
    versions = info.get("versions") or {}
    header = [
        ("run directory", str(run.directory)),
        ("started", _when(info.get("started_at"))),
        ("finished", _when(info.get("finished_at"))),
        (
            "wall time",
            f"{wall_note} {_num(wall)} s".strip() if wall is not None else _NA,
        ),
        ("hardware config", info.get("hardware_config") or _NA),
        ("pixel size", f"{_num(info.get('pixel_size_um'))} µm"),
        ("model", info.get("model_id") or _NA),
        ("seed", _num(info.get("seed"))),
        (
            "versions",
            ", ".join(
                f"{k} {v}"
                for k, v in versions.items()
                if k in ("smartscope", "pymmcore-plus", "useq-schema", "python")
            )
            or _NA,
        ),
    ]
    counts, counts_note = _counts(run)
    plate = None
    position_bars = ""
    found = _plate(run)
    if found is not None:
        wells, (rows, cols) = found
        plate = {
            "rows": rows,
            "cols": cols,
            "imaged": sum(w.imaged for w in wells.values()),
            "skipped": sum(bool(w.skipped) for w in wells.values()),
            "src": _png_uri(_heatmap(wells, rows, cols)),
            "table": [
                {
                    "well": _well_name(r, c),
                    "count": w.count if w.imaged else "not imaged",
                    "frames": w.analysed_frames,
                    "positions": ", ".join(w.positions),
                    "skipped": ", ".join(w.skipped),
                }
                for (r, c), w in sorted(wells.items())
            ],
        }
    else:
        counts_per_pos = _base_counts(run)
        bars = [
            (pos, float(n), f"{frames} analysed frames")
            for pos, (n, frames) in list(counts_per_pos.items())[:MAX_BARS]
        ]
        if any(frames for _, frames in counts_per_pos.values()):
            position_bars = _svg_bars(bars, "detections (base frames)")
        elif counts_per_pos:
            position_bars = '<p class="note">No base frame was analysed.</p>'
    gallery, n_shots = _gallery(run)
    dose_rows, dose_bars = _dose(run)
    reports = info.get("policy_reports")
    return {
        "name": exp.get("name") or run.directory.name,
        "description": exp.get("description") or "",
        "status": status,
        "reason": reason,
        "error": summary.get("error"),
        "notes": run.notes,
        "header": header,
        "counts": counts,
        "counts_note": counts_note,
        "schedule": _schedule_rows(summary.get("schedule") or {}),
        "plate": plate,
        "position_bars": Markup(position_bars),
        "n_positions": len(_base_counts(run)) if plate is None else 0,
        "gallery": gallery,
        "n_shots": n_shots,
        "any_labels": any(g["labels"] for g in gallery),
        "thumb": THUMB_PX,
        "histograms": [{**h, "svg": Markup(h["svg"])} for h in _histograms(run)],
        "dose_rows": dose_rows,
        "dose_bars": Markup(dose_bars),
        "max_bars": MAX_BARS,
        "decisions": _decisions(run),
        "analysis_errors": run.analysis_errors,
        "policy_reports": json.dumps(reports, indent=2) if reports else "",
        "versions": list(versions.items()),
        "smartscope_version": __version__,
        "directory": str(run.directory),
    }


def render_report(run_dir: str | Path) -> str:
    """The HTML report of a run directory, as a string (see `write_report`)."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATE.parent),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    return env.get_template(TEMPLATE.name).render(**_context(load_run(run_dir)))


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write a self-contained HTML report of a (finished or not) run directory.

    Parameters
    ----------
    run_dir : str | Path
        A run directory written by `Runner` (completed, interrupted or failed).
    out : str | Path, optional
        Report file (a folder: ``report.html`` in it). Default:
        ``run_dir/report.html``.

    Returns
    -------
    Path
        The report written.

    Raises
    ------
    NotARunError
        If `run_dir` holds no run.
    """
    page = render_report(run_dir)
    path = Path(out) if out is not None else Path(run_dir) / "report.html"
    if path.is_dir():
        path = path / "report.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path
