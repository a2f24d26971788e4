"""The segmenter's child process (``python -m smartscope.segment._child FD``).

Started by `smartscope.segment.ProcessSegmenter`: builds the segmenter by
name, then segments the batches the parent puts in shared memory, until the
parent says stop or goes away. Not imported by the package.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from multiprocessing.connection import Connection
from multiprocessing.shared_memory import SharedMemory

import numpy as np

from smartscope._errors import first_line
from smartscope._threads import freeze_heap
from smartscope.segment._process import _attach
from smartscope.segment._protocol import as_segmentation, prepare


def serve(conn: Connection) -> None:
    """The child process: build the segmenter, then segment what comes."""
    name, params, nice, num_threads, path = conn.recv()
    sys.path[:] = path + [p for p in sys.path if p not in path]
    if nice > 0:
        with contextlib.suppress(OSError):
            os.nice(nice)
    try:
        from smartscope.segment._registry import create_segmenter

        segmenter = create_segmenter(name, params)
        torch = sys.modules.get("torch")
        if num_threads and torch is not None:
            torch.set_num_threads(num_threads)
        prepare(segmenter)  # compile now: start-up, not the first call
    except Exception as e:
        conn.send(("error", f"segmenter {name!r}: {first_line(e)}"))
        return
    freeze_heap()  # the loaded model and imports: out of every later collection
    device = str(getattr(segmenter, "device_name", "cpu"))
    conn.send(("ready", segmenter.model_id, device, os.getpid()))
    inputs: dict[str, SharedMemory] = {}
    out: SharedMemory | None = None
    try:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                return
            if msg is None:
                return
            shm_name, shape, dtype = msg
            try:
                shm = inputs.get(shm_name)
                if shm is None:
                    for old in inputs.values():
                        old.close()
                    inputs = {shm_name: _attach(shm_name)}
                    shm = inputs[shm_name]
                images = np.ndarray(shape, np.dtype(dtype), buffer=shm.buf)
                result = as_segmentation(segmenter.segment(images))
                labels = np.ascontiguousarray(result.labels)
                if out is None or out.size < labels.nbytes:
                    if out is not None:
                        out.close()
                        out.unlink()
                    out = SharedMemory(create=True, size=max(labels.nbytes, 1))
                view = np.ndarray(labels.shape, labels.dtype, buffer=out.buf)
                view[...] = labels
                scores = (
                    None
                    if result.scores is None
                    else [np.asarray(s) for s in result.scores]
                )
                conn.send(("ok", out.name, labels.shape, labels.dtype.str, scores))
            except Exception as e:
                conn.send(("error", f"{type(e).__name__}: {first_line(e)}"))
    finally:
        for shm in inputs.values():
            shm.close()
        if out is not None:
            out.close()
            with contextlib.suppress(FileNotFoundError):
                out.unlink()


if __name__ == "__main__":
    # Ctrl-C reaches the whole process group: the parent decides what stops
    # (it ends the run, then this process), so no traceback from here
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # if the parent has to stop this process (a hung segmenter), the resource
    # tracker it started unlinks the shared memory left behind: without its
    # "leaked shared_memory objects" warning on the user's terminal
    quiet = "ignore::UserWarning:multiprocessing.resource_tracker"
    os.environ["PYTHONWARNINGS"] = ",".join(
        w for w in (os.environ.get("PYTHONWARNINGS"), quiet) if w
    )
    serve(Connection(int(sys.argv[1])))
