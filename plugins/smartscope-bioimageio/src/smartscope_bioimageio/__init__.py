"""smartscope-bioimageio: run bioimage.io model packages in smartscope.

Registers the segmenter ``bioimageio`` (entry point group
``smartscope.segmenters``):

.. code-block:: yaml

    segmenter:
      name: bioimageio
      model: builtin.bioimageio.zip  # from `smartscope export --format bioimageio`
"""

from importlib.metadata import PackageNotFoundError, version

from smartscope.segment import foreground_to_labels

from smartscope_bioimageio._segmenter import BioimageioModelError, BioimageioSegmenter

try:
    __version__ = version("smartscope-bioimageio")
except PackageNotFoundError:  # pragma: no cover - not installed
    __version__ = "unknown"

__all__ = ["BioimageioModelError", "BioimageioSegmenter", "foreground_to_labels"]
