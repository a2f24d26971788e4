"""Segmenters: the `PSegmenter` protocol, the rule-based baseline and a registry."""

from smartscope.segment._protocol import PSegmenter, Segmentation, as_batch
from smartscope.segment._registry import available_segmenters, create_segmenter
from smartscope.segment._threshold import ThresholdSegmenter

__all__ = [
    "PSegmenter",
    "Segmentation",
    "ThresholdSegmenter",
    "as_batch",
    "available_segmenters",
    "create_segmenter",
]
