"""Segmenters: the protocol, the rule-based baseline, the built-in model.

`PSegmenter`, `ThresholdSegmenter`, the deep-learning `UNetSegmenter`
(registered as ``unet``), the registry, and the steps a plugin's model may
share: `fill_non_finite` before a model that normalises the image itself,
and after it `foreground_to_labels` and `reread_large` (which reads large
objects again in crops of their own).

`UNetSegmenter` is imported lazily (it imports torch).
"""

from smartscope.segment._instances import foreground_to_labels
from smartscope.segment._postprocess import fill_non_finite, reread_large
from smartscope.segment._process import ProcessSegmenter, SegmenterProcessError
from smartscope.segment._protocol import PSegmenter, Segmentation, as_batch
from smartscope.segment._registry import (
    available_segmenters,
    create_segmenter,
    segmenter_factory,
    segmenter_for_model,
)
from smartscope.segment._threshold import ThresholdSegmenter


def __getattr__(name: str):
    if name == "UNetSegmenter":
        from smartscope.segment._dl import UNetSegmenter

        return UNetSegmenter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "PSegmenter",
    "ProcessSegmenter",
    "Segmentation",
    "SegmenterProcessError",
    "ThresholdSegmenter",
    "UNetSegmenter",
    "as_batch",
    "available_segmenters",
    "create_segmenter",
    "fill_non_finite",
    "foreground_to_labels",
    "reread_large",
    "segmenter_factory",
    "segmenter_for_model",
]
