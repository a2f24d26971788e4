"""smartscope-example: a template for your own smartscope plugin.

It registers one segmenter (``gaussian_otsu``) and one policy
(``brightest_target``) through entry points; see ``pyproject.toml`` and
``plugins/README.md``.
"""

from smartscope_example._policy import BrightestTarget
from smartscope_example._segmenter import GaussianOtsuSegmenter

__all__ = ["BrightestTarget", "GaussianOtsuSegmenter"]
