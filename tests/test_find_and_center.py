"""The demo experiment, end to end on the real demo core."""

from __future__ import annotations

import json

import numpy as np

from smartscope.detections import Detections
from smartscope.rundir import read_jsonl, read_position
from smartscope.segment import ThresholdSegmenter

CENTER = np.array([255.5, 255.5])


def _frames(out):
    return read_jsonl(out / "frames.jsonl")


def test_demo_completes_and_records_run(demo_run):
    out, summary, _ = demo_run
    assert summary.status == "completed"
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "completed"
    assert info["summary"]["frames_acquired"] == summary.frames_acquired
    assert info["model_id"].startswith("threshold-")
    assert info["versions"]["pymmcore-plus"].startswith("0.18")
    assert info["seed"] == 0
    assert summary.frames_dropped == 0
    assert (out / "experiment.yaml").is_file()


def test_every_target_is_centered(demo_run):
    """Re-segment each targeted frame: the object sits within 2 px of center."""
    out, _, _ = demo_run
    seg = ThresholdSegmenter(min_area_px=6)
    targets = [f for f in _frames(out) if f["kind"] == "target"]
    assert len(targets) >= 10
    by_pos: dict[str, list[dict]] = {}
    for f in targets:
        by_pos.setdefault(f["position"], []).append(f)
    for pos, frames in by_pos.items():
        data = read_position(out, pos)
        assert data.shape[2] == 3  # the Z-stack
        focus = next(f for f in frames if f["array"]["z"] == 1)  # survey focus
        a = focus["array"]
        img = data[a["t"], a["c"], a["z"]]
        det = Detections.from_labels(seg.segment(img).labels[0], img)
        dist = np.hypot(*(det.centroids_px - CENTER).T)
        assert dist.min() <= 2.0, f"{pos}: nearest object {dist.min():.2f} px away"


def test_each_object_is_targeted_once(demo_run):
    out, _, exp = demo_run
    frames = _frames(out)
    targets = {}
    for f in frames:
        if f["kind"] == "target":
            targets[f["position"]] = (f["stage_x_um"], f["stage_y_um"])
    pts = np.array(list(targets.values()))
    d = np.hypot(*(pts[:, None] - pts[None]).transpose(2, 0, 1))
    np.fill_diagonal(d, np.inf)
    assert d.min() > 5, "two targets for the same object"

    # every non-border object seen in the survey (tiles overlap by 10%) was
    # targeted: objects seen twice in overlapping tiles count once
    radius = exp.policies[0].params["match_radius_um"]
    seen = []
    for rec in read_jsonl(out / "detections.jsonl"):
        o = rec["objects"]
        for x, y, area, border in zip(
            o["stage_x_um"], o["stage_y_um"], o["area_px"], o["touches_border"]
        ):
            if area >= 10 and not border:
                seen.append((x, y))
    seen = np.array(seen)
    dup_pairs = 0
    for i in range(len(seen)):
        if np.any(np.hypot(*(seen[:i] - seen[i]).T) < radius):
            dup_pairs += 1
    assert dup_pairs > 0, "the demo grid should see some objects twice"
    assert len(targets) == len(seen) - dup_pairs
    for p in seen:
        assert np.hypot(*(pts - p).T).min() < radius


def test_targets_trace_back_to_their_survey_frame(demo_run):
    out, _, _ = demo_run
    frames = {f["frame_index"]: f for f in _frames(out)}
    decisions = {d["decision_id"]: d for d in read_jsonl(out / "decisions.jsonl")}
    targets = [f for f in frames.values() if f["kind"] == "target"]
    assert targets
    for f in targets:
        decision = decisions[f["decision_id"]]
        trigger = frames[decision["trigger"]["frame_index"]]
        assert f["trigger_frame"] == trigger["frame_index"]
        assert trigger["kind"] == "base" and trigger["channel"] == "DAPI"
        assert trigger["frame_index"] < f["frame_index"]
        # the target lies inside the survey tile that triggered it
        assert abs(f["stage_x_um"] - trigger["stage_x_um"]) < 256
        assert abs(f["stage_y_um"] - trigger["stage_y_um"]) < 256
        # and the decision lists this very event
        events = [e for a in decision["actions"] for e in a.get("events", [])]
        assert f["event_id"] in {e["event_id"] for e in events}
    for d in decisions.values():
        assert (
            d["latency_ms"]["frame_to_queued"] >= d["latency_ms"]["frame_to_detections"]
        )


def test_targets_visited_in_short_travel_order(demo_run):
    """Within one decision, nearest-neighbour order beats the detection order."""
    out, _, _ = demo_run
    for d in read_jsonl(out / "decisions.jsonl"):
        events = [e for a in d["actions"] for e in a.get("events", [])]
        firsts = {}
        for e in events:
            firsts.setdefault(e["position"], (e["x_um"], e["y_um"]))
        pts = np.array(
            [(d["trigger"]["stage_um"]["x"], d["trigger"]["stage_um"]["y"])]
            + list(firsts.values())
        )
        if len(pts) < 4:
            continue
        path = np.hypot(*np.diff(pts, axis=0).T).sum()
        by_label = pts[[0, *np.argsort(pts[1:, 1]) + 1]]  # a raster order
        raster = np.hypot(*np.diff(by_label, axis=0).T).sum()
        assert path <= raster * 1.01


def test_every_frame_is_in_the_dataset(demo_run):
    out, summary, _ = demo_run
    frames = _frames(out)
    assert len(frames) == summary.frames_acquired
    cache = {}
    for f in frames:
        a = f["array"]
        if a["position"] not in cache:
            cache[a["position"]] = read_position(out, a["position"])
        assert cache[a["position"]][a["t"], a["c"], a["z"]].any()
    # survey tiles have labels
    for f in frames:
        if f["kind"] == "base":
            labels = read_position(out, f["position"], labels=True)
            assert labels[f["array"]["t"], 0, 0].max() > 0
