"""``smartscope bench``: benchmarks with JSON results.

`bench_loop` (the smart loop against plain pymmcore-plus on the same events),
`bench_burst` (a burst event by event against hardware-sequenced),
`bench_segment` (segmenters' speed and accuracy), `bench_livecell` (adaptive
live-cell imaging against fixed time-lapses, scored on ground truth),
`bench_screen` (a plate screen against fixed plans; the Scheduler on large
plates).
"""

from smartscope.bench._burst import bench_burst
from smartscope.bench._livecell import bench_livecell
from smartscope.bench._loop import bench_loop
from smartscope.bench._screen import bench_screen
from smartscope.bench._segment import bench_segment

__all__ = [
    "bench_burst",
    "bench_livecell",
    "bench_loop",
    "bench_screen",
    "bench_segment",
]
