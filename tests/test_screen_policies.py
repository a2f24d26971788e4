"""Screening policies (well quota, hit detection, object autofocus) on a plate.

`_simulate` is the closed loop of ``test_live_policies.py`` adapted to a fixed
`PlateSpecimen`: the Scheduler serves events on a simulated clock, the specimen
renders each at its stage X/Y/Z, camera ROI and objective, and the real
`InferenceWorker` segments it (threshold segmenter), asks the policies and
applies their actions — deterministic, checked against the plate's ground
truth.
"""

from __future__ import annotations

import gc

import numpy as np
import pytest
import useq
from _closed_loop import simulate
from useq import MDAEvent, MDASequence

from smartscope.frame import event_tag, well_of
from smartscope.microscope import Objective
from smartscope.policies import (
    HitDetection,
    ObjectAutofocus,
    WellQuota,
    available_policies,
    create_policy,
)
from smartscope.scheduler import AddEvents, Scheduler, SetFocus, SkipWell
from smartscope.segment import create_segmenter
from smartscope.sim.plate import PlateSpecimen

SENSOR = 256  # px at 1 µm/px: small fields keep the tests quick
OBJECTIVES = {  # the turret of plate.cfg
    "10X": Objective((("Objective", "State", "1"),), 1.0),
    "40X": Objective((("Objective", "State", "0"),), 0.25),
}
FILTER = {"min_area_px": 40}  # nuclei are ≥ 60 µm²; no specks
SEGMENTER = {"threshold": 200, "min_area_px": 20, "min_distance_px": 8}


@pytest.fixture(scope="module")
def plate():
    return PlateSpecimen(0)


@pytest.fixture(scope="module")
def segmenter():
    return create_segmenter("threshold", SEGMENTER)


@pytest.fixture(scope="module")
def wells(plate):
    """Seven wells: normal ones (one first: it sets the hit reference), 3 hits,
    one empty — as the truth says."""
    truth = {w["id"]: w for w in plate.ground_truth(wells=[])["wells"]}
    normal = [w for w in truth.values() if not w["empty"] and not w["hit"]]
    hits = [w for w in truth.values() if w["hit"]]
    empty = [w for w in truth.values() if w["empty"]]
    chosen = [normal[0], hits[0], empty[0], normal[1], hits[2], normal[2], hits[3]]
    # the search must reach each well's focus, e.g. -7.6 µm at E5
    assert {w["id"] for w in chosen if w["hit"]} == {"B9", "E5", "E10"}
    return chosen


def _sequence(plate, wells, rows=3, columns=3):
    plan = plate.well_plate_plan(
        selected_wells=([w["row"] for w in wells], [w["col"] for w in wells]),
        well_points_plan=useq.GridRowsColumns(
            rows=rows, columns=columns, fov_width=SENSOR, fov_height=SENSOR
        ),
    )
    return MDASequence(
        stage_positions=plan, channels=[{"config": "DAPI", "exposure": 10}]
    )


def _simulate(specimen, plan, policies, segmenter, **kw):
    """The closed loop on the fixed plate; returns frames and the Scheduler."""
    frames, _, sched = simulate(
        specimen,
        plan,
        policies,
        segmenter,
        sensor=SENSOR,
        rng=np.random.default_rng(0),
        **kw,
    )
    return frames, sched


def _base_fields(frames):
    """Base positions imaged, per well, in order."""
    out: dict[str, list[str]] = {}
    for f in frames:
        if f.kind == "base":
            out.setdefault(well_of(f.position), []).append(f.position)
    return out


@pytest.fixture(scope="module")
def screen(plate, wells, segmenter):
    """The three policies together over 7 wells × 3×3 fields."""
    quota = WellQuota(max_cells=25, filter=FILTER)
    focus = ObjectAutofocus(filter=FILTER, min_objects=3)
    hits = HitDetection(filter=FILTER, z_plan={"range": 2, "step": 1})
    frames, sched = _simulate(
        plate, _sequence(plate, wells), [quota, focus, hits], segmenter
    )
    return frames, sched, quota, focus, hits


# ------------------------------------------------------------------ well quota
def test_well_quota_by_fields_holds_exactly(plate, wells, segmenter):
    quota = WellQuota(max_fields=2, filter=FILTER)
    frames, sched = _simulate(plate, _sequence(plate, wells), [quota], segmenter)
    fields = _base_fields(frames)
    assert set(fields) == {w["id"] for w in wells}
    for well, imaged in fields.items():
        assert imaged == [f"{well}_0000", f"{well}_0001"]  # no third field
        assert quota.report()["wells"][well]["stopped"].startswith("field quota")
    assert sched.n_skipped == len(wells) * 7  # the other 7 fields of each well
    assert sum(n for _, n, _ in sched.skipped_log) == sched.n_skipped
    assert quota.report()["n_wells_stopped"] == len(wells)


def test_well_quota_by_cells_stops_right_after_the_crossing_field(screen, wells):
    frames, sched, quota, _, _ = screen
    fields = _base_fields(frames)
    report = quota.report()["wells"]
    for w in wells:
        well, st = w["id"], report[w["id"]]
        counted = quota.well(well)
        assert counted["fields"] == fields[well]  # every field imaged was counted
        if w["empty"]:  # nothing to count: every field is imaged
            assert len(fields[well]) == 9 and st["cells"] == 0
            assert st["stopped"] == "plan exhausted"
            continue
        # the well stopped at the first field that reached 25 cells
        assert st["stopped"].startswith("cell quota")
        assert sum(counted["field_cells"][:-1]) < 25 <= st["cells"]
        assert st["fields"] < 9 and st["fields_after_stop"] == 0
    assert sched.n_skipped == sum(9 - len(v) for v in fields.values())


def test_skip_well_drops_queued_added_events_and_refuses_new_ones():
    plan = MDASequence(
        stage_positions=[
            {"x": 0, "y": 0, "name": "A1_0000"},
            {"x": 10, "y": 0, "name": "A1_0001"},
            {"x": 100, "y": 0, "name": "A10_0000"},
            {"x": 110, "y": 0, "name": "A1_0002"},
        ]
    )
    sched = Scheduler(plan)
    skipped = []
    sched.events.eventsSkipped.connect(lambda *a: skipped.append(a))
    assert event_tag(next(sched))["position"] == "A1_0000"
    extra = AddEvents((MDAEvent(pos_name="A1_0000", x_pos=1),), priority=-1)
    assert sched.apply(extra).applied
    out = sched.apply(SkipWell("A1", reason="quota"))
    assert (
        out.applied
        and out.n_dropped == 1
        and skipped == [("A1", 1, "position skipped")]
    )
    assert not sched.apply(extra).applied  # a skipped well takes nothing new
    assert not sched.apply(SkipWell("A1")).applied
    rest = [event_tag(e)["position"] for e in sched]
    assert rest == ["A10_0000"]  # "A10_" is another well
    assert sched.n_skipped == 3


# --------------------------------------------------------------- hit detection
def test_hit_detection_finds_the_hit_wells_and_targets_hit_cells(screen, wells, plate):
    frames, _, _, _, hits = screen
    truth_hits = {w["id"] for w in wells if w["hit"]}
    found = set(hits.hits)
    tp = len(found & truth_hits)
    recall, precision = tp / len(truth_hits), tp / max(len(found), 1)
    assert recall == 1.0 and precision == 1.0
    report = hits.report()["wells"]
    for w in wells:
        r = report[w["id"]]
        assert r["hit"] == w["hit"]
        if not w["hit"]:
            assert r["targets"] == 0 and r["fraction"] < 0.05
    # every target: a 64 µm ROI Z-stack (3 planes) centered on a phenotype cell
    cells = plate.cell_table(truth_hits)
    xy = np.column_stack([cells["x_um"], cells["y_um"]])
    targets = hits.targets()
    assert len(targets) >= 3 * len(truth_hits)
    on_phenotype, offsets = 0, []
    for x, y in targets:
        d = np.hypot(*(xy - (x, y)).T)
        offsets.append(d.min() / cells["radius_um"][np.argmin(d)])
        on_phenotype += bool(cells["hit_phenotype"][np.argmin(d)])
        # the target point lies inside a nucleus (not between two)
        assert plate.truth_labels(x, y, shape=(1, 1))[0, 0] > 0
    print(
        f"targets {len(targets)}, on phenotype cells {on_phenotype}, "
        f"offset/radius median {np.median(offsets):.2f} max {max(offsets):.2f}"
    )
    assert on_phenotype == len(targets)
    assert np.median(offsets) < 0.25
    hit_frames = [f for f in frames if f.kind == "hit"]
    assert len(hit_frames) == 3 * len(targets)
    assert all(f.event.roi.width == 64 for f in hit_frames)
    assert {f.position.rsplit("_", 1)[0] for f in hit_frames} == {
        f"hit_{w}" for w in truth_hits
    }


def test_hit_cells_through_the_40x_are_measured_where_they_are(plate, wells, segmenter):
    """Hit frames at 0.25 µm/px through a camera ROI, analysed by the worker.

    The worker maps their pixels to the stage with the ROI's offset, and
    resamples them to the survey's scale for the segmenter, which then finds
    each targeted nucleus whole, once (at 0.25 µm/px itself, the threshold
    segmenter cuts a nucleus into 5-10 pieces).
    """
    chosen = wells[:2]  # a normal well (the reference), then a hit well
    assert [w["hit"] for w in chosen] == [False, True]
    hits = HitDetection(  # 4x the exposure: a 16th of the light per pixel
        filter=FILTER,
        objective="40X",
        field_um=48,
        exposure_ms=40,
        max_targets_per_well=4,
    )
    seen = []
    frames, _ = _simulate(
        plate,
        _sequence(plate, chosen),
        [hits],
        segmenter,
        objectives=OBJECTIVES,
        on_detections=lambda f, d: seen.append((f, d)),
    )
    on_target = [(f, d) for f, d in seen if f.kind == "hit"]
    assert len(on_target) == len(hits.targets()) == 4
    cells = plate.cell_table([chosen[1]["id"]])
    for frame, det in on_target:
        assert frame.pixel_size_um == 0.25
        roi = frame.event.roi  # 48 µm at 0.25 µm/px, in the sensor's middle
        assert (roi.offset_x, roi.width) == ((SENSOR - 192) // 2, 192)
        assert det.labels.shape == (192, 192)
        o = det.objects
        xy = np.column_stack([o["stage_x_um"], o["stage_y_um"]])
        # the targeted nucleus: one object, at the stage position (without the
        # ROI offset it would be 8 µm off), whole
        d = np.hypot(*(xy - frame.stage_xy_um).T)
        (k,) = np.flatnonzero(d < 4.0)
        assert len(det) == 1  # no neighbour within 24 µm, no piece of it
        target = plate.truth_labels(*frame.stage_xy_um, shape=(1, 1))[0, 0]
        assert target > 0
        radius = cells["radius_um"][cells["id"] == target][0]
        assert o["area_px"][k] * 0.25**2 == pytest.approx(np.pi * radius**2, rel=0.3)
    # the survey is back on the 10X
    assert {f.pixel_size_um for f in frames if f.kind == "base"} == {1.0}


def test_operator_decisions_change_what_is_imaged(plate, wells, segmenter, screen):
    """Through the approval gate: all approved, the same run; all rejected, the
    plain plan (every field, at the plan's Z, no hit targets)."""

    def policies():
        return [
            WellQuota(max_cells=25, filter=FILTER),
            ObjectAutofocus(filter=FILTER, min_objects=3),
            HitDetection(filter=FILTER, z_plan={"range": 2, "step": 1}),
        ]

    def imaged(frames):
        return [(f.position, f.kind, f.stage_z_um) for f in frames]

    plan = _sequence(plate, wells)
    approved, sched = _simulate(plate, plan, policies(), segmenter, operator=bool)
    assert imaged(approved) == imaged(screen[0])
    gate = sched.approval
    assert gate.n_approved == len(gate.proposals) > 0 and gate.n_rejected == 0

    rejected, sched = _simulate(
        plate, plan, policies(), segmenter, operator=lambda p: False
    )
    assert [f.kind for f in rejected] == ["base"] * len(wells) * 9
    assert {f.stage_z_um for f in rejected} == {0.0}
    assert sched.n_skipped == 0
    gate = sched.approval
    assert gate.n_rejected == len(gate.proposals) > 0


# ------------------------------------------------------------ object autofocus
def test_object_autofocus_images_later_fields_in_focus(screen, wells):
    frames, _, _, focus, _ = screen
    report = focus.report()["wells"]
    truth = {w["id"]: w for w in wells}
    errors, first_errors = [], []
    last_focus = 0.0  # the plan's Z until a first well is focused
    for well in dict.fromkeys(well_of(f.position) for f in frames if f.kind == "base"):
        w, best = truth[well], truth[well]["focus_um"]
        base = [f for f in frames if f.kind == "base" and well_of(f.position) == well]
        if w["empty"]:  # no cells, no search: imaged at the last focus found
            assert well not in report
            assert all(f.stage_z_um == pytest.approx(last_focus) for f in base)
            continue
        search = report[well]["searches"][-1]
        assert search["result"] == "focused"
        assert report[well]["z_um"] == pytest.approx(focus.focus(well), abs=1e-3)
        k = [f.position for f in base].index(search["field"])
        # fields up to the searched one follow the plate: the last well's focus,
        # and the search is centered there; later fields are at the well's own
        for f in base[: k + 1]:
            assert f.stage_z_um == pytest.approx(last_focus)
        assert search["start_z_um"] == pytest.approx(last_focus, abs=1e-3)
        if last_focus != 0.0:
            first_errors.append(last_focus - best)
        assert len(base) > k + 1
        for f in base[k + 1 :]:
            errors.append(f.stage_z_um - best)
            assert abs(f.stage_z_um - best) < 1.0
        last_focus = focus.focus(well)
    # the truth focus of these wells is far from the plan's Z for some
    assert max(abs(w["focus_um"]) for w in wells if not w["empty"]) > 5
    print(
        f"focus error of later fields: max {np.abs(errors).max():.2f} µm; of "
        f"first fields (the last well's focus): max {np.abs(first_errors).max():.2f}"
    )
    assert np.abs(errors).max() < 0.5
    assert first_errors


def test_set_focus_keeps_a_relative_z_plan_and_served_fields():
    plan = MDASequence(
        stage_positions=[
            {"x": 0, "y": 0, "z": 1, "name": "B2_0000"},
            {"x": 9, "y": 0, "z": 1, "name": "B2_0001"},
            {"x": 99, "y": 0, "z": 1, "name": "C3_0000"},
        ],
        z_plan={"range": 2, "step": 1},
    )
    sched = Scheduler(plan)
    first = [next(sched) for _ in range(3)]
    assert [e.z_pos for e in first] == [0, 1, 2]
    assert sched.apply(SetFocus("B2", 5.0)).applied
    rest = [(event_tag(e)["position"], e.z_pos) for e in sched]
    assert rest == [("B2_0001", 4), ("B2_0001", 5), ("B2_0001", 6)] + [
        ("C3_0000", 0),
        ("C3_0000", 1),
        ("C3_0000", 2),
    ]


def test_set_focus_of_every_well_leaves_wells_with_their_own_focus():
    plan = MDASequence(
        stage_positions=[
            {"x": 0, "y": 0, "z": 0, "name": "B2_0000"},
            {"x": 9, "y": 0, "z": 0, "name": "B2_0001"},
            {"x": 99, "y": 0, "z": 0, "name": "C3_0000"},
            {"x": 199, "y": 0, "z": 0, "name": "D4_0000"},
        ],
    )
    sched = Scheduler(plan)
    assert sched.apply(SetFocus("C3", -2.0)).applied
    assert sched.apply(SetFocus("*", 3.0)).applied  # e.g. B2's focus was found
    z = {event_tag(e)["position"]: e.z_pos for e in sched}
    assert z == {"B2_0000": 3.0, "B2_0001": 3.0, "C3_0000": -2.0, "D4_0000": 3.0}


def test_properties_an_event_changes_are_put_back_after_it():
    """A hit target through the 40X: the next survey field is on the 10X again."""
    state = {("Objective", "State"): "1"}  # the microscope: 10X
    plan = MDASequence(
        stage_positions=[
            {"x": 0, "y": 0, "name": "B2_0000"},
            {"x": 9, "y": 0, "name": "B2_0001"},
        ]
    )
    sched = Scheduler(plan, property_value=lambda d, p: state[(d, p)])
    first = next(sched)
    assert not first.properties
    zoom = [("Objective", "State", "0")]
    targets = tuple(
        MDAEvent(x_pos=1, y_pos=1, pos_name=f"hit_B2_{k:03d}", properties=zoom)
        for k in range(2)
    )
    assert sched.apply(AddEvents(targets, priority=10)).applied
    served = []
    for event in sched:
        served.append(event)
        for d, p, v in event.properties or ():
            state[(d, p)] = v  # what the engine does
    assert [tuple(e.properties or ()) for e in served] == [
        (("Objective", "State", "0"),),
        (("Objective", "State", "0"),),  # still the 40X: nothing to put back
        (("Objective", "State", "1"),),  # B2_0001: the 10X again
    ]
    assert state[("Objective", "State")] == "1"


def test_screen_policies_are_registered():
    assert {"well_quota", "hit_detection", "object_autofocus"} <= set(
        available_policies()
    )
    assert isinstance(create_policy("well_quota", {"max_fields": 2}), WellQuota)
    assert isinstance(create_policy("object_autofocus", {}), ObjectAutofocus)
    assert isinstance(create_policy("hit_detection", {}), HitDetection)
    with pytest.raises(ValueError, match="max_cells"):
        WellQuota()


# ------------------------------------------------------- through the real core
def test_screen_runs_through_the_runner_on_plate_cfg(tmp_path, plate):
    from pymmcore_plus import find_micromanager

    from smartscope._resources import hardware_configs_dir
    from smartscope.experiment import Experiment
    from smartscope.rundir import read_jsonl
    from smartscope.runner import Runner

    if not find_micromanager():
        pytest.fail(
            "Micro-Manager demo adapters not found: pip install mm-test-adapters",
            pytrace=False,
        )
    truth = {w["id"]: w for w in plate.ground_truth(wells=[])["wells"]}
    chosen = [truth["A1"], truth["B9"], truth["A8"]]  # normal, hit, empty
    plan = plate.well_plate_plan(
        selected_wells=([w["row"] for w in chosen], [w["col"] for w in chosen]),
        well_points_plan=useq.GridRowsColumns(
            rows=2, columns=2, fov_width=512, fov_height=512
        ),
    )
    exp = Experiment.model_validate(
        {
            "name": "screen",
            "config": str(hardware_configs_dir() / "plate.cfg"),
            "sequence": MDASequence(
                stage_positions=plan, channels=[{"config": "DAPI", "exposure": 20}]
            ),
            "segmenter": {"name": "threshold", **SEGMENTER},
            "policies": [
                {"name": "well_quota", "max_fields": 2, "filter": FILTER},
                {
                    "name": "object_autofocus",
                    "z_range_um": 8,
                    "z_step_um": 2,
                    "filter": FILTER,
                },
                {"name": "hit_detection", "min_cells": 2, "filter": FILTER},
            ],
            "analysis": {"analyze": "all"},
            # quotas act on the very next field, however loaded the machine is
            "scheduler": {"max_analysis_lag": 0},
        }
    )
    with Runner(exp, out_dir=tmp_path / "run") as runner:
        summary = runner.run()
        reports = {p.name: p.report() for p in runner.policies}
    gc.collect()
    assert summary.status == "completed"
    decisions = read_jsonl(tmp_path / "run" / "decisions.jsonl")
    applied = [a for d in decisions for a in d["actions"] if a["status"] == "applied"]
    kinds = {a["type"] for a in applied}
    assert {"skip_well", "set_focus", "add_events"} <= kinds
    frames = read_jsonl(tmp_path / "run" / "frames.jsonl")
    base = [f for f in frames if f["kind"] == "base"]
    per_well: dict[str, int] = {}
    for f in base:
        well = f["position"].split("_")[0]
        per_well[well] = per_well.get(well, 0) + 1
    assert max(per_well.values()) <= 2 and summary.events_skipped >= 1  # quota
    assert {f["kind"] for f in frames} >= {"base", "autofocus", "hit"}
    assert reports["hit_detection"]["hits"] == ["B9"]
    for well in ("A1", "B9"):  # the focus found is the well's
        z = reports["object_autofocus"]["wells"][well]["z_um"]
        assert z == pytest.approx(truth[well]["focus_um"], abs=1.0)
    assert "A8" not in reports["object_autofocus"]["wells"]


def teardown_module():
    gc.collect()
