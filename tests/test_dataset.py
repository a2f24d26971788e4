"""One OME-Zarr hierarchy per run (``RUN_DIR/run.ome.zarr``) that tools open.

Checked with yaozarrs (OME-Zarr 0.5 validation, offline), napari-ome-zarr's
reader and ``smartscope view``'s layers, against what the run logged
(frames.jsonl) and the experiment asked for: scales, stage translations,
channel names and colours, NGFF labels, plates; after a crash, a resume and a
re-analysis; and a run in the layout before the hierarchy still reads.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import yaozarrs
from _closed_loop import kill_9_when, smartscope

from smartscope.rundir import (
    Hierarchy,
    PlateGeometry,
    load_run,
    position_attrs,
    read_jsonl,
    read_position,
)

ROOT = Path(__file__).resolve().parents[1]
DEMO_CFG = ROOT / "hardware_configs" / "demo.cfg"
SENSOR = 512  # the demo camera's full frame, pixels


def _valid(run_dir: Path) -> None:
    """The run's hierarchy is valid OME-Zarr 0.5 (raises otherwise)."""
    yaozarrs.validate_zarr_store(str(run_dir / "run.ome.zarr"))


def _transform(ome: dict, kind: str) -> list[float]:
    ds = ome["multiscales"][0]["datasets"][0]
    return next(t[kind] for t in ds["coordinateTransformations"] if t["type"] == kind)


def test_a_run_is_one_valid_hierarchy_placed_at_its_stage_positions(demo_run):
    out, _, exp = demo_run
    _valid(out)
    frames = read_jsonl(out / "frames.jsonl")
    hierarchy = Hierarchy.open(out)
    assert sorted(hierarchy.keys()) == sorted({f["position"] for f in frames})
    for f in frames:
        if f["array"]["t"] or f["array"]["z"]:
            continue  # the first plane of each position sets its placement
        ome = position_attrs(out, f["position"])
        ps = f["pixel_size_um"] or 1.0
        scale, shift = _transform(ome, "scale"), _transform(ome, "translation")
        assert scale[-2:] == [ps, ps]
        # the image's top-left pixel, (SENSOR - 1) / 2 pixels from the center
        half = (SENSOR - 1) / 2 * ps
        assert shift[-1] == pytest.approx(f["stage_x_um"] - half, abs=1e-6)
        assert shift[-2] == pytest.approx(f["stage_y_um"] - half, abs=1e-6)
        assert shift[2] == pytest.approx(f["stage_z_um"], abs=1e-6)
        channel = ome["omero"]["channels"][0]
        assert channel["label"] == f["channel"]
        assert channel["color"] == {"DAPI": "0000FF", "FITC": "00FF00"}[f["channel"]]
    # the targets' Z-stacks were taken 2 µm apart (the demo's z_plan step)
    step = exp.policies[0].params["z_plan"]["step"]
    targets = [k for k in hierarchy.keys() if k.startswith("target_")]
    assert targets
    for key in targets:
        assert _transform(position_attrs(out, key), "scale")[2] == step


def test_labels_are_ngff_labels_of_their_image(demo_run):
    out, _, _ = demo_run
    run = load_run(out)
    analysed = {d["position"] for d in run.detections}
    assert analysed
    for key in analysed:
        labels = out / "run.ome.zarr" / key / "labels"
        names = json.loads((labels / "zarr.json").read_text())["attributes"]["ome"]
        assert names["labels"] == ["segmentation"]
        attrs = json.loads((labels / "segmentation" / "zarr.json").read_text())
        ome = attrs["attributes"]["ome"]
        assert ome["image-label"]["source"]["image"] == "../../"
        image = read_position(out, key)
        lab = read_position(out, key, labels=True)
        assert lab.shape == image.shape and lab.max() > 0
        # the labels sit where their image sits
        image_ome = position_attrs(out, key)
        assert _transform(ome, "translation") == _transform(image_ome, "translation")


def test_the_ome_xml_lists_every_series_for_napari(demo_run):
    out, _, _ = demo_run
    root = out / "run.ome.zarr"
    series = json.loads((root / "OME" / "zarr.json").read_text())
    paths = series["attributes"]["ome"]["series"]
    xml = ET.parse(root / "OME" / "METADATA.ome.xml").getroot()
    ids = [e.attrib["ID"] for e in xml if e.tag.endswith("Image")]
    assert ids == [f"Image:{p}" for p in paths]


def test_napari_ome_zarr_opens_the_whole_run(demo_run):
    from napari_ome_zarr import napari_get_reader

    out, _, _ = demo_run
    reader = napari_get_reader(str(out / "run.ome.zarr"))
    assert reader is not None
    layers = reader(str(out / "run.ome.zarr"))
    kinds = [kind for _, _, kind in layers]
    n_positions = len(Hierarchy.open(out).keys())
    analysed = {d["position"] for d in load_run(out).detections}
    assert kinds.count("image") == n_positions
    assert kinds.count("labels") == len(analysed)


def test_smartscope_view_places_positions_labels_and_targets(demo_run):
    from smartscope.view import run_layers

    out, _, _ = demo_run
    layers = run_layers(out)
    images = [(d, kw) for d, kw, k in layers if k == "image"]
    by_position = {kw["metadata"]["position"]: kw for _, kw in images}
    for f in read_jsonl(out / "frames.jsonl"):
        kw = by_position[f["position"]]
        half = (SENSOR - 1) / 2 * (f["pixel_size_um"] or 1.0)
        assert kw["translate"][-1] == pytest.approx(f["stage_x_um"] - half, abs=1e-6)
    assert any(k == "labels" for _, _, k in layers)
    points = next(d for d, _, k in layers if k == "points")
    added = {
        e["position"]: e
        for d in load_run(out).decisions
        for a in d["actions"]
        if a["status"] == "applied"
        for e in a.get("events", [])
    }
    assert len(points) == len(added)
    x = {round(p[1], 6) for p in points}  # (y, x)
    assert x == {round(e["x_um"], 6) for e in added.values()}


def test_view_of_an_unknown_position_is_one_error_line(demo_run):
    out, _, _ = demo_run
    result = smartscope("view", str(out), "--position", "nowhere")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "no position 'nowhere'" in result.stderr


PLATE = f"""\
name: tiny_plate
config: {ROOT / "hardware_configs" / "plate.cfg"}
sequence:
  stage_positions:
    plate: 96-well
    a1_center_xy: [0.0, 0.0]
    selected_wells: [[4, 4, 5], [4, 5, 5]]
    well_points_plan: {{fov_width: 512, fov_height: 512, rows: 1, columns: 2}}
  channels:
    - {{config: DAPI, exposure: 10}}
segmenter: {{name: threshold, threshold: 200, min_area_px: 20, min_distance_px: 8}}
policies:
  - name: hit_detection
    min_cells: 3
    max_targets_per_well: 2
    filter: {{min_area_px: 40}}
    objective: 40X
    exposure_ms: 40
"""


@pytest.fixture(scope="module")
def plate_run(tmp_path_factory):
    exp = tmp_path_factory.mktemp("plate") / "plate.yaml"
    exp.write_text(PLATE)
    out = exp.parent / "run"
    result = smartscope("run", str(exp), "--out", str(out), timeout=300)
    assert result.returncode == 0, result.stderr
    return out


def test_a_plate_run_is_an_ngff_plate_with_its_wells_fields_and_hits(plate_run):
    out = plate_run
    _valid(out)
    root = json.loads((out / "run.ome.zarr" / "zarr.json").read_text())
    plate = root["attributes"]["ome"]["plate"]
    assert len(plate["rows"]) == 8 and len(plate["columns"]) == 12
    frames = read_jsonl(out / "frames.jsonl")
    wells = {f["position"].split("_")[0] for f in frames if f["kind"] == "base"}
    assert {w["path"] for w in plate["wells"]} == {f"{w[0]}/{w[1:]}" for w in wells}
    geometry = PlateGeometry.from_json(plate)
    for f in frames:  # every frame lies in its well's field, hits too
        row, col, fld = geometry.place(f["position"])
        well = json.loads((out / "run.ome.zarr" / row / col / "zarr.json").read_text())
        paths = [i["path"] for i in well["attributes"]["ome"]["well"]["images"]]
        assert fld in paths
        assert f["array"]["path"] == f"{row}/{col}/{fld}"
    kinds = {a["name"] for a in plate.get("acquisitions", [])}
    assert kinds == {f["kind"] for f in frames}
    assert "hit" in kinds  # the demo plate's E5 and F6 are hit wells


TIMELAPSE = f"""\
name: crash
config: {DEMO_CFG}
sequence:
  stage_positions:
{"".join(f"    - {{x: {600.0 * i}, y: 0.0, z: 0.0}}" + chr(10) for i in range(6))}\
  channels:
    - {{config: DAPI, exposure: 40}}
  z_plan: {{range: 4, step: 2}}
  axis_order: pcz
segmenter: {{name: threshold}}
"""


def test_the_hierarchy_is_valid_after_a_crash_a_resume_and_a_reanalysis(tmp_path):
    exp = tmp_path / "crash.yaml"
    exp.write_text(TIMELAPSE)
    out = tmp_path / "run"
    kill_9_when(
        ["run", str(exp), "--out", str(out)],
        out,
        lambda frames: len({f["position"] for f in frames}) >= 3,
    )
    assert json.loads((out / "run.json").read_text())["status"] == "running"
    _valid(out)  # killed mid-run: still valid, listing only what exists
    # an image whose creation was cut short (a crash, a full disk): on disk,
    # never listed; the resume must move it aside and image the position anew
    orphan = Hierarchy.open(out).keys()[0]
    Hierarchy.open(out).remove_image(orphan)
    assert [k for k, _ in Hierarchy.open(out).orphans()] == [orphan]
    result = smartscope("resume", str(out), timeout=300)
    assert result.returncode == 0, result.stderr
    _valid(out)
    assert sorted(Hierarchy.open(out).keys()) == [f"p{i:03d}" for i in range(6)]
    assert (out / "partial" / f"{orphan}.partial-1" / "0").is_dir()
    assert not Hierarchy.open(out).orphans()
    for key in Hierarchy.open(out).keys():
        image = read_position(out, key)
        assert image.shape[:3] == (1, 1, 3) and all(
            np.any(image[0, 0, z]) for z in range(3)
        )
        scale = _transform(position_attrs(out, key), "scale")
        assert scale[2] == 2.0  # the plan's Z step
    result = smartscope(
        "reanalyze", str(out), "--model", "threshold", "--name", "again", timeout=300
    )
    assert result.returncode == 0, result.stderr
    _valid(out)
    labels = json.loads(
        (out / "run.ome.zarr" / "p000" / "labels" / "zarr.json").read_text()
    )
    assert labels["attributes"]["ome"]["labels"] == ["segmentation", "again"]


def test_a_run_in_the_layout_before_the_hierarchy_still_reads(tmp_path):
    """``images/<key>.ome.zarr`` + ``labels/``: readers, report and view."""
    from ome_writers import AcquisitionSettings, Dimension, create_stream

    out = tmp_path / "old"
    planes = {}
    for folder in ("images", "labels"):
        dims = [
            Dimension(name="t", count=None, chunk_size=1, type="time"),
            Dimension(name="c", count=1, chunk_size=1, type="channel"),
            Dimension(name="z", count=1, chunk_size=1, type="space"),
            Dimension(name="y", count=32, chunk_size=32, type="space"),
            Dimension(name="x", count=32, chunk_size=32, type="space"),
        ]
        stream = create_stream(
            AcquisitionSettings(
                root_path=str(out / folder / "p000.ome.zarr"),
                dimensions=dims,
                dtype="uint16",
                format="ome-zarr",
                overwrite=True,
            )
        )
        plane = np.full((32, 32), 7 if folder == "images" else 1, np.uint16)
        stream.append(plane)
        stream.close()
        planes[folder] = plane
    frame = {
        "frame_index": 0,
        "position": "p000",
        "kind": "base",
        "stage_x_um": 0.0,
        "stage_y_um": 0.0,
        "array": {"position": "p000", "t": 0, "c": 0, "z": 0},
    }
    (out / "frames.jsonl").write_text(json.dumps(frame) + "\n")
    (out / "run.json").write_text(json.dumps({"status": "completed"}))
    assert np.array_equal(read_position(out, "p000")[0, 0, 0], planes["images"])
    assert np.array_equal(
        read_position(out, "p000", labels=True)[0, 0, 0], planes["labels"]
    )
    assert load_run(out).counts()["positions"] == 1
    result = smartscope("report", str(out))
    assert result.returncode == 0, result.stderr
    from smartscope.view import run_layers

    kinds = [k for _, _, k in run_layers(out)]
    assert kinds == ["image", "labels"]
