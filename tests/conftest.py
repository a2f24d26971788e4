from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "demos" / "find_and_center.yaml"
FIXTURES = Path(__file__).parent / "fixtures"


def _require_demo_adapters() -> None:
    from pymmcore_plus import find_micromanager

    if not find_micromanager():
        pytest.fail(
            "Micro-Manager demo adapters not found: pip install mm-test-adapters",
            pytrace=False,
        )


@pytest.fixture
def microscope():
    """A Microscope on the demo config, released after the test."""
    from smartscope.microscope import Microscope

    _require_demo_adapters()
    scope = Microscope()
    yield scope
    scope.close()
    gc.collect()


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """Run the demo experiment once; tests inspect its output directory."""
    from smartscope.experiment import Experiment
    from smartscope.runner import Runner

    _require_demo_adapters()
    out = tmp_path_factory.mktemp("demo") / "run"
    exp = Experiment.from_file(DEMO)
    with Runner(exp, out_dir=out) as runner:
        summary = runner.run()
    gc.collect()
    return out, summary, exp
