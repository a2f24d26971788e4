"""`smartscope report`: one self-contained HTML page about a run directory."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import useq
from PIL import Image

from smartscope.frame import Frame
from smartscope.report import _report as report
from smartscope.report import write_report
from smartscope.rundir import NotARunError, RunStorage, read_jsonl

# viridis at 0 and 1 (matplotlib's colormap)
VIRIDIS_0 = (68, 1, 84)
VIRIDIS_1 = (253, 231, 37)
PNG = re.compile(r'<img id="(\w+)" src="data:image/png;base64,([^"]+)"')


def _png(uri_b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri_b64))).convert("RGB"))


def _gallery_pngs(page: str) -> list[np.ndarray]:
    gallery = page.split('id="gallery"', 1)[1].split("</div>", 1)[0]
    found = re.findall(r'<img src="data:image/png;base64,([^"]+)"', gallery)
    return [_png(b) for b in found]


def _self_contained(page: str) -> bool:
    return not re.search(r'(?:src|href)="(?!data:)', page)


# ----------------------------------------------------------------- a plate run
def _disk(shape: tuple[int, int], centers: list[tuple[int, int]]) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    labels = np.zeros(shape, np.uint16)
    for i, (y, x) in enumerate(centers, start=1):
        labels[(yy - y) ** 2 + (xx - x) ** 2 <= 36] = i
    return labels


class _Writer:
    """Writes a run directory the way a Runner does, frame by frame."""

    def __init__(self, directory) -> None:
        self.storage = RunStorage(directory)
        self.n = 0
        self.rng = np.random.default_rng(0)

    def frame(self, position, kind="base", *, z=0, nz=1, visit=0, **tag) -> Frame:
        meta = {
            "position": position,
            "kind": kind,
            "visit": visit,
            "c": 0,
            "z": z,
            "shape": {"c": 1, "z": nz, "order": "cz"},
            **tag,
        }
        frame = Frame(
            frame_index=self.n,
            event=useq.MDAEvent(metadata={"smartscope": meta}),
            position=position,
            kind=kind,
            stage_x_um=0.0,
            stage_y_um=0.0,
            stage_z_um=float(z),
            channel="DAPI",
            exposure_ms=10.0 if kind == "base" else 25.0,
            t_acquired=0.1 * self.n,
            event_id=self.n,
        )
        self.n += 1
        return frame

    def acquire(self, frame: Frame, centers: list[tuple[int, int]], analyse=True):
        labels = _disk((64, 64), centers)
        image = (100 + 20 * self.rng.random((64, 64)) + 800 * (labels > 0)).astype(
            np.uint16
        )
        self.storage.write_frame(image, frame)
        if analyse:
            self.storage.write_labels(labels, frame)
            t = frame.t_acquired
            self.storage.log_detections(
                {
                    "frame_index": frame.frame_index,
                    "position": frame.position,
                    "n_detections": len(centers),
                    "t_acquired_s": t,
                    "t_analysed_s": t + 0.02 + 0.001 * frame.frame_index,
                    "t_decided_s": t + 0.03 + 0.001 * frame.frame_index,
                }
            )


@pytest.fixture
def plate_run(tmp_path):
    """A 96-well screen: A1 (2 fields, 7 cells), B3 (2), D2 (0), C5 skipped.

    A1's first field triggers a 3-plane 'hit' stack, analysed, with labels.
    """
    run_dir = tmp_path / "plate"
    w = _Writer(run_dir)
    trigger = w.frame("A1_0000")
    w.acquire(trigger, [(16, 16), (40, 40), (16, 48)])
    w.acquire(w.frame("A1_0001"), [(20, 20), (44, 20), (30, 50), (50, 50)])
    w.acquire(w.frame("B3_0000"), [(32, 32), (10, 50)])
    w.acquire(w.frame("D2_0000"), [])
    for z in range(3):
        hit = w.frame("hit_0000", "hit", z=z, nz=3, decision_id=0, trigger_frame=0)
        w.acquire(hit, [(32, 32)])
    storage = w.storage
    storage.log_decision(
        {
            "decision_id": 0,
            "policy": "find_hits",
            "trigger": {"frame_index": 0, "position": "A1_0000"},
            "n_detections": 3,
            "actions": [
                {
                    "type": "add_events",
                    "status": "applied",
                    "events": [{"position": "hit_0000"}] * 3,
                }
            ],
            "latency_ms": {
                "frame_to_detections": 20.0,
                "frame_to_decision": 30.0,
                "frame_to_queued": 31.0,
            },
        }
    )
    storage.log_decision(
        {
            "decision_id": 1,
            "policy": "find_hits",
            "trigger": {"frame_index": 1, "position": "A1_0001"},
            "actions": [
                {"type": "add_events", "status": "refused", "outcome": "dose spent"}
            ],
            "latency_ms": {"frame_to_queued": 12.0},
        }
    )
    storage.log_decision(
        {
            "decision_id": 2,
            "policy": "skip_empty",
            "trigger": {"frame_index": 2, "position": "B3_0000"},
            "actions": [
                {"type": "skip_position", "position": "C5_0000", "status": "applied"}
            ],
        }
    )
    storage.write_run_json(
        {
            "status": "completed",
            "experiment": {"name": "plate_screen"},
            "plan": {"stage_positions": {"plate": {"rows": 8, "columns": 12}}},
            "model_id": "threshold-test",
            "summary": None,
        }
    )
    storage.close()
    return run_dir


def test_plate_report_heat_map_gallery_and_decisions(plate_run):
    path = write_report(plate_run)
    assert path == plate_run / "report.html"
    page = path.read_text(encoding="utf-8")
    assert _self_contained(page)
    assert "<h1>plate_screen</h1>" in page
    assert "counted from the logs" in page  # run.json without a summary
    assert '<th>frames acquired</th><td class="n">7</td>' in page
    assert '<th>detections</th><td class="n">12</td>' in page

    # heat map: A1 = 3 + 4 cells (the maximum), D2 imaged with 0, C5 skipped
    # and never imaged, every other well never imaged
    pictures = dict(PNG.findall(page))
    heat = _png(pictures["heatmap"])
    layout = report._PlateLayout(8, 12)

    def color(well: str) -> tuple[int, ...]:
        x0, y0, _, y1 = layout.box(ord(well[0]) - 65, int(well[1:]) - 1)
        return tuple(heat[(y0 + y1) // 2, x0 + 3])

    assert color("A1") == VIRIDIS_1  # the maximum count
    assert color("D2") == VIRIDIS_0  # imaged, no cells
    # B3: 2 of 7 cells, 2/7 of the way up viridis: 1/7 from its 1/4 anchor
    # (59, 82, 139) to its 1/2 anchor (33, 145, 140)
    assert np.abs(np.subtract(color("B3"), (55.3, 91.0, 139.1))).max() <= 1
    assert color("H12") == color("C5") == report.NOT_IMAGED_RGB
    x0, y0, x1, y1 = layout.box(2, 4)  # C5: crossed out
    assert (heat[y0:y1, x0:x1] == report.SKIPPED_RGB).all(axis=-1).any()
    assert "3 wells imaged" in page and "1 with skipped positions" in page
    assert re.search(r"<td>A1</td><td class=\"n\">7</td>", page)

    # gallery: the one hit visit, its middle plane, label outlines drawn
    (thumb,) = _gallery_pngs(page)
    assert (thumb == report.OUTLINE_RGB).all(axis=-1).any()
    assert "hit_0000" in page and "t 0, c 0, z 1 of 3 frames" in page

    # histograms and dose
    for name in ("frame-to-detections", "frame-to-decision", "frame-to-queued"):
        box = page.split(f'id="hist-{name}"', 1)[1].split("</figure>", 1)[0]
        assert "<svg" in box and "<rect" in box
    assert "interval-between-frames" in page
    assert (
        '<td>hit_0000</td><td>hit</td>\n<td class="n">3</td><td class="n">75</td>'
        in (page)
    )

    # decisions: per policy, applied / refused, refusal reasons
    table = page.split('id="decisions"', 1)[1].split("</table>", 1)[0]
    assert "find_hits" in table and "skip_empty" in table
    assert "1 &times; dose spent" in page


def test_report_of_demo_run(demo_run, tmp_path):
    out_dir, summary, _ = demo_run
    path = write_report(out_dir, tmp_path / "demo.html")
    page = path.read_text(encoding="utf-8")
    assert _self_contained(page)
    assert "<h1>find_and_center</h1>" in page
    assert "completed" in page
    for label, value in (
        ("frames acquired", summary.frames_acquired),
        ("detections", summary.detections),
        ("decisions", summary.decisions),
        ("events scheduled", summary.events_scheduled),
    ):
        assert f'<th>{label}</th><td class="n">{value:,}</td>' in page
    assert 'id="schedule"' in page and "stage travel" in page

    # not a plate: counts per tile as a bar chart, no heat map
    assert 'id="heatmap"' not in page
    assert "<svg" in page.split('id="position-counts"', 1)[1][:200]

    # one thumbnail per targeted bead (a 3-plane stack each), at most 48
    frames = read_jsonl(out_dir / "frames.jsonl")
    visits = {(f["position"], f["array"]["t"]) for f in frames if f["kind"] != "base"}
    assert visits
    thumbs = _gallery_pngs(page)
    assert len(thumbs) == min(len(visits), report.GALLERY_MAX)
    assert all(t.shape[:2] == (report.THUMB_PX,) * 2 for t in thumbs)
    assert all(t.std() > 0 for t in thumbs)  # contrast-stretched, not blank

    for name in ("frame-to-detections", "frame-to-decision", "frame-to-queued"):
        assert "<svg" in page.split(f'id="hist-{name}"', 1)[1].split("</figure>")[0]
    table = page.split('id="decisions"', 1)[1].split("</table>", 1)[0]
    assert "find_and_center" in table and "add_events" in table


def test_report_of_unfinished_run_shows_what_exists(tmp_path):
    run_dir = tmp_path / "crashed"
    run_dir.mkdir()
    (run_dir / "run.json").write_text(
        json.dumps({"status": "running", "started_at": "2025-01-01T00:00:00+00:00"})
    )
    lines = [
        {"frame_index": i, "position": "p000", "kind": "base", "t_acquired": 0.5 * i}
        for i in range(3)
    ]
    text = "\n".join(json.dumps(r) for r in lines) + '\n{"frame_index": 3, "pos'
    (run_dir / "frames.jsonl").write_text(text)  # cut off mid-line by the crash
    page = write_report(run_dir, tmp_path / "out").read_text(encoding="utf-8")
    assert "never finalised" in page
    assert "no detections.jsonl" in page and "no decisions.jsonl" in page
    assert '<th>frames acquired</th><td class="n">3</td>' in page
    assert "No targeted acquisitions" in page and "No decisions." in page
    assert "<svg" in page.split('id="hist-interval-between-frames"', 1)[1][:600]


def test_not_a_run_directory(tmp_path):
    with pytest.raises(NotARunError, match="not a run directory"):
        write_report(tmp_path)


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "CI": "true", "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "smartscope.cli", "report", *args],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        env=env,
    )


def test_cli_report(plate_run, tmp_path):
    out = tmp_path / "sub" / "screen.html"
    result = _cli(str(plate_run), "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out)
    assert out.is_file()

    result = _cli(str(tmp_path / "sub"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "not a run directory" in lines[0]


def test_gallery_shows_targets_before_autofocus_planes():
    def shot(i: int, kind: str) -> report._Shot:
        record = {"frame_index": i, "kind": kind}
        return report._Shot(f"{kind}_{i}", 0, 0, 0, record, 1)

    shots = [shot(i, "autofocus") for i in range(40)]
    shots += [shot(100 + i, "hit") for i in range(5)]
    picked = report._pick_shots(shots, 8)
    assert [s.record["kind"] for s in picked].count("hit") == 5
    assert len(picked) == 8
    assert [s.record["frame_index"] for s in picked] == sorted(
        s.record["frame_index"] for s in picked
    )
    only_hits = report._pick_shots([shot(i, "hit") for i in range(20)], 8)
    assert len(only_hits) == 8
