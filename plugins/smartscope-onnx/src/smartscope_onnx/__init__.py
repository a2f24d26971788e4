"""smartscope-onnx: run ONNX segmentation models in smartscope.

Registers the segmenter ``onnx`` (entry point group ``smartscope.segmenters``):

.. code-block:: yaml

    segmenter:
      name: onnx
      model: models/builtin.onnx   # e.g. from `smartscope export --format onnx`
"""

from importlib.metadata import PackageNotFoundError, version

from smartscope.segment import foreground_to_labels

from smartscope_onnx._segmenter import OnnxModelError, OnnxSegmenter, percentile_scale

try:
    __version__ = version("smartscope-onnx")
except PackageNotFoundError:  # pragma: no cover - not installed
    __version__ = "unknown"

__all__ = [
    "OnnxModelError",
    "OnnxSegmenter",
    "foreground_to_labels",
    "percentile_scale",
]
