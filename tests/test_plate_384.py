"""demos/plate_384.yaml (validated here, not run) and `well_order` of plate plans."""

from __future__ import annotations

import itertools
from pathlib import Path

import useq
from _closed_loop import smartscope

from smartscope.experiment import Experiment

PLATE_384 = Path(__file__).resolve().parents[1] / "demos" / "plate_384.yaml"


def test_plate_384_plans_every_well_as_a_serpentine():
    exp = Experiment.from_file(PLATE_384)
    plan = exp.sequence.stage_positions
    assert isinstance(plan, useq.WellPlatePlan)
    assert plan.plate.name == "384-well"
    # the camera images the same plate as the plan
    assert ("Camera", "Plate", plan.plate.name) in exp.properties

    wells = [(int(r), int(c)) for r, c in plan.selected_well_indices]
    assert len(wells) == len(set(wells)) == 384
    assert set(wells) == {(r, c) for r in range(16) for c in range(24)}
    # a serpentine: every well is next to the one before it
    for (r0, c0), (r1, c1) in itertools.pairwise(wells):
        assert abs(r1 - r0) + abs(c1 - c0) == 1, ((r0, c0), (r1, c1))

    n_fields = len(list(plan.well_points_plan))
    positions = list(plan)
    assert len(positions) == 384 * n_fields
    assert positions[0].name.startswith("A1_")
    assert positions[24 * n_fields].name.startswith("B24_")  # row B runs back


def test_plate_384_validates_against_its_config():
    proc = smartscope("validate", str(PLATE_384))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ok ") and "1536 base events" in proc.stdout


def _plate_experiment(tmp_path: Path, stage_positions: str) -> Path:
    path = tmp_path / "plate.yaml"
    path.write_text(
        "name: wells\nconfig: plate.cfg\nsequence:\n  stage_positions:\n"
        f"{stage_positions}  channels: [DAPI]\n"
    )
    return path


def test_well_order_of_selected_wells(tmp_path):
    head = "    plate: 96-well\n    a1_center_xy: [0, 0]\n"
    # B2, B5, D3, D4, F1 (rows 1, 3, 5): the 2nd selected row runs backwards
    wells = "    selected_wells: [[5, 3, 1, 1, 3], [0, 3, 4, 1, 2]]\n"
    names = {}
    for order in ("serpentine", "row_major"):
        exp = Experiment.from_file(
            _plate_experiment(tmp_path, head + wells + f"    well_order: {order}\n")
        )
        names[order] = [p.name for p in exp.sequence.stage_positions]
    assert names["serpentine"] == ["B2", "B5", "D4", "D3", "F1"]
    assert names["row_major"] == ["B2", "B5", "D3", "D4", "F1"]


def test_bad_well_order_is_one_error_line(tmp_path):
    path = _plate_experiment(tmp_path, "    plate: 96-well\n    well_order: zigzag\n")
    result = smartscope("validate", str(path))
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error:") and "well_order must be one of" in line
