"""Thread priorities: acquisition first, then writing and analysis."""

from __future__ import annotations

import os
import sys
import threading

__all__ = ["lower_thread_priority"]


def lower_thread_priority(nice: int) -> bool:
    """Lower the calling thread's OS scheduling priority by `nice` (Linux).

    On Linux a thread has its own nice value (``setpriority`` on its native
    id); elsewhere nothing changes. Returns whether it was lowered.
    """
    if nice <= 0 or not sys.platform.startswith("linux"):
        return False
    try:
        tid = threading.get_native_id()
        now = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, now + nice)
    except (OSError, AttributeError):
        return False
    return True
