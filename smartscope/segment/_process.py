"""`ProcessSegmenter`: a registered segmenter run in a child process.

Inference in the acquiring process competes with acquisition for the GIL and
for the cores: on a 2-core machine a torch model next to the camera thread
slows acquisition down. `ProcessSegmenter` builds the segmenter by name in a
spawned child process (at a lower OS priority, with its own torch thread
count) and hands it frames through shared memory; the calling thread only
waits on a pipe (the GIL is free meanwhile). It implements `PSegmenter`, so
the inference worker, `warm_up` and `segment_zoomed` use it like any
segmenter. The child never loads the microscope.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
from multiprocessing import Pipe, resource_tracker
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import numpy as np

from smartscope._errors import RegistryError
from smartscope.segment._protocol import Segmentation, as_batch

__all__ = ["ProcessSegmenter", "SegmenterProcessError"]


class SegmenterProcessError(RuntimeError):
    """The segmenter's child process failed or ended."""


class ProcessSegmenter:
    """The segmenter registered as `name`, running in a child process.

    Parameters
    ----------
    name : str
        Registered segmenter name (``unet``, ``threshold``, a plugin's).
    params : dict, optional
        Its parameters (JSON-like: they are sent to the child).
    nice : int
        How much lower the child's OS priority is (0: the same).
    num_threads : int, optional
        Torch thread count in the child (for torch segmenters).
    start_timeout_s : float
        Longest wait for the child to import and build the segmenter.
    call_timeout_s : float, optional
        Longest wait for one `segment` call. A child that does not answer in
        time (a hung plugin, a deadlocked driver) is stopped, and this and
        every later call raise `SegmenterProcessError`; so does every call
        after the child died. None: wait as long as it takes.

    Raises
    ------
    RegistryError
        If the child cannot build the segmenter (unknown name, bad parameters,
        a model file that does not load): the child's one-line error; or the
        child died or did not answer while building it.
    """

    def __init__(
        self,
        name: str,
        params: dict[str, Any] | None = None,
        *,
        nice: int = 10,
        num_threads: int | None = None,
        start_timeout_s: float = 300.0,
        call_timeout_s: float | None = None,
    ) -> None:
        self.name = name
        self.call_timeout_s = call_timeout_s
        #: why the child can no longer segment (it hung or ended), once it cannot
        self._failed: str | None = None
        self._lock = threading.Lock()
        self._shm_in: SharedMemory | None = None
        self._outputs: dict[str, SharedMemory] = {}
        # a fresh interpreter (not fork: this process holds a core and threads;
        # not multiprocessing's spawn: it would re-run the user's main script)
        self._conn, child = Pipe()
        self._proc: subprocess.Popen | None = subprocess.Popen(
            [sys.executable, "-m", "smartscope.segment._child", str(child.fileno())],
            pass_fds=(child.fileno(),),
            stdin=subprocess.DEVNULL,
        )
        child.close()
        # the child imports what this process can (a user's module:Class)
        self._conn.send((name, dict(params or {}), nice, num_threads, sys.path))
        try:
            if not self._conn.poll(start_timeout_s):
                raise SegmenterProcessError(f"no answer within {start_timeout_s:g} s")
            reply = self._recv()
        except SegmenterProcessError as e:  # it died or hung while starting
            self.close()
            raise RegistryError(
                f"segmenter {name!r} failed to start in its process: {e}"
            ) from None
        except BaseException:
            self.close()
            raise
        if reply[0] != "ready":
            self.close()
            raise RegistryError(reply[1])
        _, self._model_id, self.device_name, self.pid = reply

    @property
    def model_id(self) -> str:
        """The child segmenter's `model_id`."""
        return self._model_id

    def segment(self, images: np.ndarray) -> Segmentation:
        """Segment a ``(B, Y, X)`` batch in the child process."""
        batch = np.ascontiguousarray(as_batch(images))
        with self._lock:
            if self._failed is not None:
                raise SegmenterProcessError(self._failed)
            if self._proc is None:
                raise SegmenterProcessError(f"segmenter {self.name!r} is closed")
            shm = self._input(batch.nbytes)
            np.ndarray(batch.shape, batch.dtype, buffer=shm.buf)[...] = batch
            try:
                self._conn.send((shm.name, batch.shape, batch.dtype.str))
            except OSError:
                self._recv()  # the child is gone: raises with its exit code
            timeout = self.call_timeout_s
            if timeout is not None and not self._conn.poll(timeout):
                self._proc.kill()
                self._failed = (
                    f"no answer within {timeout:g} s (analysis.segment_timeout_s); "
                    "its process was stopped"
                )
                raise SegmenterProcessError(self._failed)
            reply = self._recv()
            if reply[0] == "error":
                raise SegmenterProcessError(reply[1])
            _, out_name, shape, dtype, scores = reply
            out = self._outputs.get(out_name)
            if out is None:  # the child grew its output block: drop the old one
                for old in self._outputs.values():
                    old.close()
                out = _attach(out_name)
                self._outputs = {out_name: out}
            labels = np.ndarray(shape, np.dtype(dtype), buffer=out.buf).copy()
        return Segmentation(labels, scores)

    def _input(self, nbytes: int) -> SharedMemory:
        shm = self._shm_in
        if shm is None or shm.size < nbytes:
            if shm is not None:
                shm.close()
                shm.unlink()
            shm = self._shm_in = SharedMemory(create=True, size=max(nbytes, 1))
        return shm

    def _recv(self) -> tuple[Any, ...]:
        try:
            return self._conn.recv()
        except (EOFError, OSError):
            code = None
            if self._proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    code = self._proc.wait(5)
            self._failed = f"its process ended (exit code {code})"
            raise SegmenterProcessError(self._failed) from None

    def close(self) -> None:
        """Stop the child process and free the shared memory. Safe to call twice."""
        proc, self._proc = getattr(self, "_proc", None), None
        if proc is not None:
            with contextlib.suppress(OSError, ValueError):
                self._conn.send(None)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
            self._conn.close()
        for shm in self._outputs.values():
            shm.close()
        self._outputs.clear()
        if self._shm_in is not None:
            self._shm_in.close()
            with contextlib.suppress(FileNotFoundError):
                self._shm_in.unlink()
            self._shm_in = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


def _attach(name: str) -> SharedMemory:
    """Open a shared block the other process created (and unlinks).

    Python < 3.13 registers an attached block with this process's resource
    tracker, which would unlink it when this process ends: the creator owns it.
    """
    shm = SharedMemory(name=name)
    with contextlib.suppress(Exception):
        resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
    return shm
