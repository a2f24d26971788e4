"""Import ``cellpose.models`` next to a torchvision that cannot load.

A torchvision wheel built for another torch (e.g. PyPI's CUDA build next to a
CPU-only torch) fails on import ("operator torchvision::nms does not exist"),
and Cellpose imports torchvision at the top of its modules. Cellpose uses it
only for training augmentations and segment-anything's prompt utilities,
which inference never calls. So when torchvision cannot be imported, Cellpose
is imported with stand-in ``torchvision`` modules whose functions raise if
called; the stand-ins are taken out of ``sys.modules`` again afterwards, so
nothing else in the process sees them.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import logging
import sys
import types
from typing import Any

from smartscope._errors import first_line

_log = logging.getLogger("smartscope_cellpose")


def _drop_torchvision() -> None:
    for name in [n for n in sys.modules if n.split(".")[0] == "torchvision"]:
        del sys.modules[name]


class _Unavailable(types.ModuleType):
    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        module = self.__name__

        def unavailable(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError(
                f"torchvision cannot be imported here ({module}.{attr}); Cellpose "
                "inference does not use it, training does"
            )

        return unavailable


class _StandIns(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name.split(".")[0] == "torchvision":
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec: Any) -> types.ModuleType:
        module = _Unavailable(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        pass


def import_cellpose_models() -> Any:
    """``cellpose.models``, imported without torchvision if that cannot load."""
    if "cellpose.models" in sys.modules:
        return sys.modules["cellpose.models"]
    try:
        import torchvision  # noqa: F401
    except Exception as exc:
        _drop_torchvision()
        _log.warning(
            "torchvision cannot be imported (%s); Cellpose is loaded without it "
            "(inference does not use it)",
            first_line(exc),
        )
    else:
        return importlib.import_module("cellpose.models")
    finder = _StandIns()
    sys.meta_path.insert(0, finder)
    try:
        return importlib.import_module("cellpose.models")
    finally:
        sys.meta_path.remove(finder)
        _drop_torchvision()
