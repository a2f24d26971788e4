"""The plugins in ``plugins/`` seen from smartscope: entry points, experiments, runs.

Each plugin's own behaviour is tested in ``plugins/<name>/tests``; here, that
an installed plugin is found by name, validated as part of an experiment,
built in the analysis child process, and drives a real run. A plugin that is
not installed fails its tests with the command that installs it (the README's
test command installs all four).
"""

from __future__ import annotations

import gc
import importlib
import socket
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import numpy as np
import pytest

from smartscope.policies import available_policies
from smartscope.segment import available_segmenters, create_segmenter

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = {  # distribution: (segmenters, policies)
    "smartscope-example": (["gaussian_otsu"], ["brightest_target"]),
    "smartscope-onnx": (["onnx"], []),
    "smartscope-bioimageio": (["bioimageio"], []),
    "smartscope-cellpose": (["cellpose"], []),
}


def _require(dist: str) -> None:
    try:
        distribution(dist)
    except PackageNotFoundError:
        pytest.fail(
            f"{dist} is not installed: the README's test command installs the "
            f"plugins (pip install -e plugins/{dist})",
            pytrace=False,
        )


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_every_plugin_folder_is_listed():
    folders = {p.name for p in (ROOT / "plugins").iterdir() if p.is_dir()}
    assert folders == set(PLUGINS)
    for name in folders:  # an installable distribution with tests and a README
        for part in ("pyproject.toml", "README.md", "tests"):
            assert (ROOT / "plugins" / name / part).exists(), (name, part)


@pytest.mark.parametrize("dist", sorted(PLUGINS))
def test_installed_plugins_are_found_by_name(dist):
    _require(dist)
    segmenters, policies = PLUGINS[dist]
    assert set(segmenters) <= set(available_segmenters())
    assert set(policies) <= set(available_policies())


def _experiment(tmp_path, segmenter: str, policies: str = "[]"):
    from smartscope.experiment import Experiment

    path = tmp_path / "exp.yaml"
    path.write_text(
        f"""
name: plugins
config: {ROOT / "hardware_configs" / "demo.cfg"}
sequence:
  stage_positions:
    - {{x: 0.0, y: 0.0, z: 0.0, name: p0}}
    - {{x: 700.0, y: 0.0, z: 0.0, name: p1}}
  channels:
    - {{config: DAPI, exposure: 10}}
segmenter: {segmenter}
policies: {policies}
analysis: {{analyze: base}}
"""
    )
    return Experiment.from_file(path)


def test_experiment_with_plugin_segmenter_and_policy(tmp_path):
    _require("smartscope-example")
    from smartscope._errors import SmartscopeError

    exp = _experiment(
        tmp_path,
        "{name: gaussian_otsu, sigma_px: 2}",
        "[{name: brightest_target, exposure_ms: 30}]",
    )
    assert exp.segmenter.build().sigma_px == 2
    assert exp.policies[0].build().exposure_ms == 30
    with pytest.raises(SmartscopeError) as exc:  # a misspelt parameter
        _experiment(tmp_path, "{name: gaussian_otsu, sigma: 2}")
    assert "sigma" in str(exc.value) and "\n" not in str(exc.value)


def test_missing_model_file_is_one_line_in_an_experiment(tmp_path):
    _require("smartscope-onnx")
    from smartscope._errors import SmartscopeError

    with pytest.raises(SmartscopeError) as exc:
        _experiment(tmp_path, f"{{name: onnx, model: {tmp_path / 'none.onnx'}}}")
    assert "ONNX model not found" in str(exc.value)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("name", ["gaussian_otsu", "onnx"])
def test_plugin_segmenter_in_the_analysis_process(name, tmp_path):
    """Runs build segmenters by name in a child process: plugins work there too."""
    from smartscope.segment import ProcessSegmenter
    from smartscope.segment._synth import synth_sample

    _require("smartscope-example" if name == "gaussian_otsu" else "smartscope-onnx")
    params: dict = {}
    if name == "onnx":
        importlib.import_module("onnx")
        from smartscope.segment._export import export_model

        model = export_model("builtin", "onnx", tmp_path / "b.onnx")
        params = {"model": str(model), "device": "cpu"}
    images = np.stack([synth_sample(s, (128, 160), "nuclei")[0] for s in (3, 4)])
    here = create_segmenter(name, params).segment(images)
    child = ProcessSegmenter(name, params, nice=0)
    try:
        there = child.segment(images)
        assert child.model_id == create_segmenter(name, params).model_id
    finally:
        child.close()
    assert here.labels.max() > 0
    np.testing.assert_array_equal(there.labels, here.labels)


def test_example_plugins_drive_a_real_run(tmp_path):
    """The demo microscope, the template's segmenter and policy, end to end."""
    _require("smartscope-example")
    from smartscope.rundir import load_run
    from smartscope.runner import Runner

    exp = _experiment(
        tmp_path,
        "{name: gaussian_otsu, sigma_px: 1.5, min_area_px: 6}",
        "[{name: brightest_target, exposure_ms: 30}]",
    )
    out = tmp_path / "run"
    with Runner(exp, out_dir=out) as runner:
        summary = runner.run()
    gc.collect()
    assert summary.status == "completed", summary.reason
    run = load_run(out)
    kinds = [f.get("kind", "base") for f in run.frames]
    assert kinds.count("base") == 2
    assert kinds.count("target") == 2  # one brightest object per position
    targets = [f for f in run.frames if f.get("kind") == "target"]
    assert all(f["exposure_ms"] == 30 for f in targets)
    assert {f["position"] for f in targets} == {"brightest_p0_0", "brightest_p1_0"}
    added = [
        a
        for d in run.decisions
        for a in d.get("actions", [])
        if a.get("type") == "add_events" and a.get("status") == "applied"
    ]
    assert len(added) == 2
    assert all(a["reason"].startswith("brightest object of p") for a in added)
