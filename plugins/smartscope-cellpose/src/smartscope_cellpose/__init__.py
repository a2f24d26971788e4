"""smartscope-cellpose: run Cellpose 4 models (local files) in smartscope.

Registers the segmenter ``cellpose`` (entry point group ``smartscope.segmenters``):

.. code-block:: yaml

    segmenter:
      name: cellpose
      model: ~/.cellpose/models/cpsam   # a local Cellpose 4 weights file
"""

from importlib.metadata import PackageNotFoundError, version

from smartscope_cellpose._segmenter import CellposeModelError, CellposeSegmenter

try:
    __version__ = version("smartscope-cellpose")
except PackageNotFoundError:  # pragma: no cover - not installed
    __version__ = "unknown"

__all__ = ["CellposeModelError", "CellposeSegmenter"]
