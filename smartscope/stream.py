"""`FrameStream` and `InferenceWorker`: analysis that never blocks acquisition.

``frameReady`` (acquisition thread) only calls `FrameStream.put`, which never
waits. The `InferenceWorker` thread takes the frames worth analysing in
acquisition order (frames no policy needs are skipped when a newer one
supersedes them or they are older than ``analysis.max_frame_age_ms``, so
decisions are made on fresh frames at any frame rate; skipped frames are
counted by reason, logged and still stored), micro-batches them, segments,
measures `Detections`, asks every policy, applies their actions to the
`Scheduler` and logs each decision. The worker runs at a lower OS priority
than acquisition (``analysis.nice``), with the torch thread count set on it.
"""

from __future__ import annotations

import sys
import threading
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np
from psygnal import Signal, SignalGroup

from smartscope._errors import first_line
from smartscope._stats import StreamingPercentiles
from smartscope._threads import lower_thread_priority
from smartscope.detections import Detections
from smartscope.scheduler import AddEvents, Stream
from smartscope.segment._protocol import as_segmentation, instance_labels

if TYPE_CHECKING:
    from useq import MDAEvent

    from smartscope.frame import Frame
    from smartscope.policies import PolicyContext, PPolicy
    from smartscope.rundir import RunStorage
    from smartscope.scheduler import Scheduler
    from smartscope.segment import PSegmenter

__all__ = [
    "SKIP_REASONS",
    "FrameStream",
    "InferenceWorker",
    "WorkerEvents",
    "lower_thread_priority",
    "segment_zoomed",
    "warm_up",
    "zoom_factor",
]


def zoom_factor(
    pixel_size_um: float | None, run_pixel_size_um: float | None
) -> float | None:
    """How much to resample a frame taken through another objective, if at all.

    The segmenter sees every frame at the run's pixel size, the scale its
    parameters (or training) are for: a 40X frame of a 10X run is shrunk by
    0.25 and its labels are brought back to the frame's shape
    (`segment_zoomed`). None when the pixel sizes agree within 5 % or one is
    unknown.
    """
    ps, base = pixel_size_um, run_pixel_size_um
    if not ps or not base or abs(ps / base - 1.0) < 0.05:
        return None
    return float(ps / base)


def segment_zoomed(
    segmenter: PSegmenter, image: np.ndarray, factor: float
) -> tuple[np.ndarray, np.ndarray | None]:
    """Segment `image` resampled by `factor`; labels back at the image's shape."""
    from skimage.transform import resize

    height, width = image.shape
    small = (max(8, round(height * factor)), max(8, round(width * factor)))
    zoomed = resize(
        image.astype(np.float32), small, anti_aliasing=factor < 1, preserve_range=True
    ).astype(image.dtype)
    result = as_segmentation(segmenter.segment(zoomed[None]))
    rows = np.minimum((np.arange(height) * small[0] / height).astype(int), small[0] - 1)
    cols = np.minimum((np.arange(width) * small[1] / width).astype(int), small[1] - 1)
    found = np.asarray(result.labels[0])
    labels = found[rows[:, None], cols[None, :]]
    scores = result.scores[0] if result.scores else None
    if scores is not None and factor > 1:  # shrinking labels may lose tiny ones
        kept = np.isin(np.unique(found[found > 0]), np.unique(labels[labels > 0]))
        scores = np.asarray(scores)[kept]
    return labels, scores


def warm_up(segmenter: PSegmenter, shape: tuple[int, int]) -> float:
    """Segment one synthetic frame so imports, caches and JIT are ready.

    Called before acquisition starts; returns the seconds it took. Importing
    a module holds the interpreter lock, so whatever the first real frame
    would import stalls acquisition as well as analysis: the test frame
    holds four bright squares from 100 to 50 000 counts above the
    background, so a segmenter with a fixed threshold reaches its object
    path too (a watershed), and the resampling of frames from another
    objective (`segment_zoomed`) is imported.
    """
    import time

    from skimage.transform import resize  # noqa: F401  (segment_zoomed's)

    t0 = time.perf_counter()
    image = np.random.default_rng(0).poisson(10.0, size=shape).astype(np.uint16)
    h, w = shape[0] // 2, shape[1] // 2
    for k, level in enumerate((100, 1_000, 10_000, 50_000)):
        y, x = (k // 2) * h + h // 4, (k % 2) * w + w // 4
        image[y : y + h // 2, x : x + w // 2] += level
    segmenter.segment(image[None])
    return time.perf_counter() - t0


#: Why a frame was not analysed (counted per reason; the frame is still stored).
SKIP_REASONS = ("superseded", "stale", "sequence", "overflow")


def _view(frame: Frame) -> tuple:
    """What a later frame must share to supersede `frame`: the same view.

    The same position and kind, and the same plane: every index of its
    event but time (and position, named already): another Z plane or
    channel of a stack is other content, not a newer look at the same.
    """
    index = getattr(frame.event, "index", None) or {}
    plane = tuple(sorted((k, v) for k, v in index.items() if k not in ("t", "p")))
    return frame.position, frame.kind, plane


class FrameStream:
    """Hand-off of frames from acquisition to analysis that keeps decisions fresh.

    `put` never waits. `get_batch` hands the worker the frames worth analysing,
    in acquisition order, and skips the others:

    - a frame no policy *needs* (``required=False`` at `put`: a burst or follow
      frame, or any frame when no policy asks for it) is skipped as
      ``"superseded"`` when a newer frame of the same view (position, kind,
      Z plane and channel) is waiting, and as ``"stale"`` when it is older
      than `max_frame_age_s` and a newer frame is waiting (the newest frame is
      always analysed);
    - a required frame (a survey tile, a base field under a quota, the frame a
      burst is triggered from) is never skipped for freshness;
    - with `sequence_last_only`, of the frames no policy needs from a
      hardware sequence only the last is analysed; the others are skipped as
      ``"sequence"`` at once (a decision takes effect only between sequences,
      and each analysis during one takes CPU from the camera's streaming);
    - beyond `maxsize` waiting frames the oldest frame no policy needs goes
      (``"overflow"``); beyond `hard_limit` (memory) even required ones do.

    Every skipped frame is handed to `on_skip(frame, reason)` (the worker logs
    it and tells the Scheduler its analysis is over) and counted in
    `n_skipped`; the dataset keeps it.
    """

    def __init__(
        self,
        maxsize: int = 16,
        *,
        max_frame_age_s: float | None = None,
        clock: Callable[[], float] | None = None,
        hard_limit: int | None = None,
        sequence_last_only: bool = False,
    ) -> None:
        self.maxsize = maxsize
        self.hard_limit = hard_limit or max(16 * maxsize, 256)
        self.max_frame_age_s = max_frame_age_s
        self.sequence_last_only = sequence_last_only
        self._clock = clock
        self._items: list[tuple[Frame, np.ndarray, bool]] = []
        self._cond = threading.Condition()
        self._closed = False
        self._skips: list[tuple[Frame, str]] = []
        self.on_skip: Callable[[Frame, str], None] | None = None
        self.n_put = 0
        self.n_skipped: dict[str, int] = dict.fromkeys(SKIP_REASONS, 0)

    @property
    def n_dropped(self) -> int:
        """Frames not analysed, whatever the reason."""
        return sum(self.n_skipped.values())

    def put(self, frame: Frame, image: np.ndarray, *, required: bool = True) -> bool:
        """Queue a frame for analysis without waiting.

        Returns False if the frame itself had to go at once (``"sequence"``:
        not the last of its hardware sequence, or ``"overflow"``: the queue is
        full of frames that policies need). Skipped frames are reported to
        `on_skip` from the consumer's thread (`get_batch`), never from the
        caller's.
        """
        with self._cond:
            self._items.append((frame, image, required))
            self.n_put += 1
            if (
                self.sequence_last_only
                and not required
                and frame.sequence is not None
                and not frame.sequence_end
            ):
                self._skip(len(self._items) - 1, "sequence")
            if len(self._items) > self.maxsize:
                self._skip_unneeded()
            if len(self._items) > self.maxsize:
                optional = [k for k, it in enumerate(self._items) if not it[2]]
                if optional:
                    self._skip(optional[0], "overflow")
                elif len(self._items) > self.hard_limit:
                    self._skip(0, "overflow")
            self._cond.notify()
            return not frame.dropped

    def _skip(self, k: int, reason: str) -> None:
        frame = self._items.pop(k)[0]
        frame.dropped = True
        self.n_skipped[reason] += 1
        self._skips.append((frame, reason))

    def close(self) -> None:
        """Tell the consumer that no more frames will come (after those queued)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def get_batch(self, max_size: int, timeout: float = 0.1) -> list[Any] | None:
        """Wait for frames, skip the stale and superseded ones, take up to `max_size`.

        Returns ``None`` once the stream is closed and drained, ``[]`` on timeout.
        """
        with self._cond:
            if not self._items and not self._skips and not self._closed:
                self._cond.wait(timeout)
            self._skip_unneeded()
            batch = [(f, img) for f, img, _ in self._items[:max_size]]
            del self._items[:max_size]
            skips = sorted(self._skips, key=lambda s: s[0].frame_index)
            self._skips = []
            ended = self._closed and not batch and not self._items
        if self.on_skip is not None:
            for frame, reason in skips:
                self.on_skip(frame, reason)
        return None if ended else batch

    def _skip_unneeded(self) -> None:
        """Skip waiting frames no policy needs that are superseded or stale."""
        items = self._items
        if len(items) < 2:
            return
        now = self._clock() if self._clock is not None else None
        newest: dict[tuple, int] = {}
        for k, (frame, _, _) in enumerate(items):
            newest[_view(frame)] = k
        last = len(items) - 1
        for k in range(last - 1, -1, -1):  # backwards: pops keep indices valid
            frame, _, required = items[k]
            if required:
                continue
            if newest[_view(frame)] != k:
                self._skip(k, "superseded")
            elif (
                now is not None
                and self.max_frame_age_s is not None
                and now - frame.t_acquired > self.max_frame_age_s
            ):
                self._skip(k, "stale")

    def qsize(self) -> int:
        """Frames waiting for analysis."""
        with self._cond:
            return len(self._items)


class WorkerEvents(SignalGroup):
    """Signals of the `InferenceWorker` (emitted on the worker thread).

    ``componentFailed`` carries the record of a contained fault of a policy
    or the segmenter (see `InferenceWorker.faults`); it may also come from the
    acquisition thread (a policy's ``needs``).
    """

    detectionsReady = Signal(object, object)  # Frame, Detections
    decisionMade = Signal(dict)  # the decisions.jsonl record
    analysisFailed = Signal(str)
    componentFailed = Signal(dict)


#: what a policy fault does (`PolicySpec.on_error`); a segmenter knows skip/stop
ON_ERROR = ("disable", "skip", "stop")
#: contained faults kept in `InferenceWorker.faults` (all are counted and logged)
MAX_FAULTS_KEPT = 100


class InferenceWorker(threading.Thread):
    """Thread that segments queued frames and turns detections into actions.

    Parameters
    ----------
    stream : FrameStream
        Where frames come from.
    segmenter : PSegmenter
        Image batch → labels.
    policies : sequence of PPolicy
        Asked in order for every analysed frame.
    scheduler : Scheduler
        Receives the actions; told when each frame's analysis is finished.
    to_stage : callable
        ``to_stage(px_xy (N, 2), stage_xy, pixel_size_um) -> (N, 2)`` stage µm
        (`pixel_size_um`: the frame's, None if unknown).
    context : PolicyContext
        Passed to the policies.
    clock : callable
        Seconds since the run started.
    storage : RunStorage, optional
        Where labels, detections and decisions are written.
    batch_size : int
        Largest micro-batch of frames segmented together.
    num_threads : int, optional
        Thread count for torch-based segmenters (set on this thread).
    pixel_size_um : float, optional
        The run's pixel size: frames taken at another pixel size (another
        objective) are resampled to it for the segmenter, and their labels
        back.
    approval : ApprovalGate, optional
        Operator approval mode: actions go to ``approval.propose`` (same
        signature as ``Scheduler.apply``) and wait there for the operator,
        instead of being applied.
    nice : int
        How much lower than acquisition this thread's OS scheduling priority
        is (Linux: the thread's nice value; 0 leaves it alone).
    policy_on_error : sequence of str, optional
        Per policy, what an exception from it does: ``"disable"`` (the policy
        is not asked again), ``"skip"`` (only that frame is lost to it) or
        ``"stop"`` (the run ends, `error` set). Default: ``"stop"`` for each.
    segmenter_on_error : {"stop", "skip"}
        What a segmenter fault does: ``"skip"`` the frames it failed on, or
        ``"stop"`` the run.

    Notes
    -----
    Threads: every policy method but ``needs`` is called on this thread (or,
    before `start`, by `replay` on the caller's): ``on_detections`` per
    analysed frame, ``has_pending_work`` after each of its decisions and when
    the stream is idle. The answer is published for the Scheduler, which reads
    it on the acquisition thread through `pending_work` and never calls the
    policy itself. ``needs(frame)`` is called by the runner on the acquisition
    thread and must only read the frame and the policy's configuration.
    Contained faults (an exception from a policy, a segmenter that failed on
    a frame) are logged (``decisions.jsonl`` for policies, ``detections.jsonl``
    for the segmenter) and kept in `faults`.
    """

    def __init__(
        self,
        stream: FrameStream,
        segmenter: PSegmenter,
        policies: Sequence[PPolicy],
        scheduler: Scheduler,
        *,
        to_stage: Callable[[np.ndarray, tuple[float, float], float | None], np.ndarray],
        context: PolicyContext,
        clock: Callable[[], float],
        storage: RunStorage | None = None,
        batch_size: int = 4,
        num_threads: int | None = None,
        approval: Any | None = None,
        pixel_size_um: float | None = None,
        nice: int = 0,
        policy_on_error: Sequence[str] | None = None,
        segmenter_on_error: str = "stop",
    ) -> None:
        super().__init__(name="smartscope-inference", daemon=True)
        self.nice = nice
        stream.on_skip = self._skipped
        self.pixel_size_um = pixel_size_um
        self.events = WorkerEvents()
        self.stream = stream
        self.segmenter = segmenter
        self.policies = list(policies)
        self.scheduler = scheduler
        self.storage = storage
        self.approval = approval
        self._apply = scheduler.apply if approval is None else approval.propose
        self._to_stage = to_stage
        self._context = context
        self._clock = clock
        self.batch_size = batch_size
        self.num_threads = num_threads
        self.n_analysed = 0
        self.n_detections = 0
        self.n_decisions = 0
        self.n_events_scheduled = 0
        self.error: str | None = None
        on_error = list(policy_on_error or ["stop"] * len(self.policies))
        if len(on_error) != len(self.policies) or not set(on_error) <= set(ON_ERROR):
            raise ValueError(f"policy_on_error: one of {ON_ERROR} per policy")
        if segmenter_on_error not in ("skip", "stop"):
            raise ValueError("segmenter_on_error must be 'skip' or 'stop'")
        self.policy_on_error = on_error
        self.segmenter_on_error = segmenter_on_error
        #: contained faults (first `MAX_FAULTS_KEPT`): component, name, call,
        #: frame, error and what was done (``on_error``)
        self.faults: list[dict[str, Any]] = []
        self.n_faults = 0
        self.n_segmenter_errors = 0
        self._fault_lock = threading.Lock()
        self._disabled: set[int] = set()
        self._pending_faults: set[int] = set()
        #: each policy's last has_pending_work answer, published for the Scheduler
        self._pending = [False] * len(self.policies)
        # constant-memory summaries (n exact, percentiles within ~1 %)
        self.latencies_ms: dict[str, StreamingPercentiles] = {
            "frame_to_detections": StreamingPercentiles(),
            "frame_to_decision": StreamingPercentiles(),
            "frame_to_queued": StreamingPercentiles(),
        }
        self.age_at_decision_max_ms = 0.0
        self.refresh_pending()  # before any thread runs

    def run(self) -> None:
        lower_thread_priority(self.nice)
        torch = sys.modules.get("torch")  # only torch segmenters import it
        if self.num_threads and torch is not None:
            torch.set_num_threads(self.num_threads)
        while True:
            try:  # logging a skipped frame or a policy's fault may fail (full disk)
                if self.error is None:
                    self.refresh_pending()
                batch = self.stream.get_batch(self.batch_size)
            except Exception as e:
                self._fail(f"analysis failed: {type(e).__name__}: {first_line(e)}")
                continue  # drain what is queued until the stream closes
            if batch is None:
                return
            if batch:
                self.process(batch)

    def process(self, batch: list[tuple[Frame, np.ndarray]]) -> None:
        """Analyse a batch of ``(frame, image)`` now, on the calling thread.

        What the worker thread does with each batch it takes from the stream:
        segment, measure, ask the policies, apply (or propose) their actions,
        log; then tell the Scheduler each frame's analysis is finished. Tests
        and deterministic simulations call it directly instead of `start`.
        A policy or segmenter that raises is handled as its ``on_error`` says;
        anything else (writing labels or logs) ends the run.
        """
        try:
            if self.error is None:
                self._process(batch)
        except Exception as e:
            self._fail(f"analysis failed: {type(e).__name__}: {first_line(e)}")
            if self.storage is not None:
                try:  # best effort: the failure may be the log itself (full disk)
                    self.storage.log_detections(
                        {"error": self.error, "traceback": traceback.format_exc()}
                    )
                except Exception:
                    pass
        finally:
            for _ in batch:
                self.scheduler.analysis_finished()

    def _fail(self, message: str) -> None:
        """End the run: a fault that is not contained."""
        if self.error is None:
            self.error = message
            self.events.analysisFailed.emit(message)
        self.scheduler.stop(message)

    # ------------------------------------------------------------ policies
    def is_disabled(self, k: int) -> bool:
        """Whether policy `k` was disabled by a fault."""
        return k in self._disabled

    def pending_work(self) -> bool:
        """Whether a policy reported pending work (its last published answer).

        Any thread (the Scheduler's pending-work check); never calls a policy.
        """
        return any(p for k, p in enumerate(self._pending) if k not in self._disabled)

    def refresh_pending(self) -> None:
        """Ask every enabled policy ``has_pending_work`` and publish the answers.

        Called on the worker thread (or before it starts); a policy that
        raises is handled like any fault of it.
        """
        for k in range(len(self.policies)):
            self._refresh_pending(k)

    def _refresh_pending(self, k: int, frame: Frame | None = None) -> None:
        if k in self._disabled:
            self._pending[k] = False
            return
        try:
            self._pending[k] = bool(self.policies[k].has_pending_work())
        except Exception as e:
            self._pending[k] = False
            if k not in self._pending_faults:  # asked often: logged once (skip)
                self._pending_faults.add(k)
                self.policy_fault(k, frame, e, "has_pending_work")

    def policy_fault(
        self, k: int, frame: Frame | None, error: BaseException, call: str
    ) -> None:
        """Contain an exception from policy `k`: log it, then its ``on_error``.

        ``disable``: the policy is not asked again (its pending work no
        longer holds the run open); ``skip``: nothing more; ``stop``: the run
        ends (`error`). Safe from the acquisition thread too.
        """
        policy = self.policies[k]
        name = getattr(policy, "name", type(policy).__name__)
        action = self.policy_on_error[k]
        message = f"{type(error).__name__}: {first_line(error)}"
        if action == "disable":
            self._disabled.add(k)
            self._pending[k] = False
        self._record_fault(
            {
                "component": "policy",
                "name": name,
                "call": call,
                "frame_index": None if frame is None else frame.frame_index,
                "error": message,
                "on_error": action,
            }
        )
        if self.storage is not None:
            self.storage.log_decision(
                {
                    "decision_id": None,
                    "policy": name,
                    "error": message,
                    "call": call,
                    "on_error": action,
                    "trigger": None if frame is None else _frame_ref(frame),
                    "actions": [],
                }
            )
        if action == "stop":
            where = "" if frame is None else f" at frame {frame.frame_index}"
            self._fail(f"policy {name} failed in {call}{where}: {message}")

    def _record_fault(self, fault: dict[str, Any]) -> None:
        with self._fault_lock:
            self.n_faults += 1
            if len(self.faults) < MAX_FAULTS_KEPT:
                self.faults.append(fault)
        self.events.componentFailed.emit(fault)

    def _segmenter_fault(self, frame: Frame, error: BaseException) -> None:
        """Contain a segmenter fault on `frame`: skip the frame, or stop."""
        message = f"{type(error).__name__}: {first_line(error)}"
        name = str(getattr(self.segmenter, "model_id", type(self.segmenter).__name__))
        self.n_segmenter_errors += 1
        self._record_fault(
            {
                "component": "segmenter",
                "name": name,
                "call": "segment",
                "frame_index": frame.frame_index,
                "error": message,
                "on_error": self.segmenter_on_error,
            }
        )
        if self.storage is not None:
            self.storage.log_detections(
                {
                    "frame_index": frame.frame_index,
                    "position": frame.position,
                    "kind": frame.kind,
                    "skipped": "error",
                    "error": f"segmenter failed: {message}",
                    "on_error": self.segmenter_on_error,
                }
            )
        if self.segmenter_on_error == "stop":
            self._fail(f"segmenter failed at frame {frame.frame_index}: {message}")

    def _skipped(self, frame: Frame, reason: str) -> None:
        """A frame the stream skipped: log it; its analysis is over."""
        try:
            if self.storage is not None:
                self.storage.log_detections(
                    {
                        "frame_index": frame.frame_index,
                        "position": frame.position,
                        "kind": frame.kind,
                        "skipped": reason,
                        "age_ms": round((self._clock() - frame.t_acquired) * 1000, 3),
                    }
                )
        finally:
            self.scheduler.analysis_finished()

    @property
    def n_skipped(self) -> dict[str, int]:
        """Frames not analysed, by reason (see `FrameStream`)."""
        return dict(self.stream.n_skipped)

    # ------------------------------------------------------------------ work
    def _process(self, batch: list[tuple[Frame, np.ndarray]]) -> None:
        results = self._segment(batch)
        for (frame, image), result in zip(batch, results, strict=True):
            if self.error is not None:
                return
            if isinstance(result, BaseException):
                self._segmenter_fault(frame, result)
                continue
            labels, scores = result
            try:
                det = self._measure(frame, image, labels, scores)
            except Exception as e:  # labels a segmenter should not have made
                self._segmenter_fault(frame, e)
                continue
            self._handle(frame, image, labels, det)

    def _segment(
        self, batch: list[tuple[Frame, np.ndarray]]
    ) -> list[tuple[np.ndarray, Any] | BaseException]:
        """Labels and scores of each frame, or the exception it failed with.

        One call for a batch of one shape; when that fails (or shapes or
        objectives differ), frame by frame, so only the frames the segmenter
        fails on are lost.
        """
        images = [img for _, img in batch]
        factors = [self._zoom(frame) for frame, _ in batch]
        if len({im.shape for im in images}) == 1 and not any(factors):
            try:
                result = as_segmentation(self.segmenter.segment(np.stack(images)))
                if len(result.labels) != len(images):
                    raise ValueError(
                        f"segmenter returned {len(result.labels)} label images "
                        f"for {len(images)} frames"
                    )
                return [
                    _checked(
                        result.labels[k],
                        result.scores[k] if result.scores else None,
                        im,
                    )
                    for k, im in enumerate(images)
                ]
            except Exception as e:
                if len(batch) == 1:
                    return [e]
        out: list[tuple[np.ndarray, Any] | BaseException] = []
        for im, factor in zip(images, factors, strict=True):
            try:
                if factor:
                    labels, score = segment_zoomed(self.segmenter, im, factor)
                else:
                    r = as_segmentation(self.segmenter.segment(im[None]))
                    labels, score = r.labels[0], r.scores[0] if r.scores else None
                out.append(_checked(labels, score, im))
            except Exception as e:
                out.append(e)
        return out

    def _zoom(self, frame: Frame) -> float | None:
        return zoom_factor(frame.pixel_size_um, self.pixel_size_um)

    def _measure(
        self,
        frame: Frame,
        image: np.ndarray,
        labels: np.ndarray,
        scores: np.ndarray | None,
    ) -> Detections:
        stage_xy = frame.stage_xy_um
        roi = frame.event.roi  # a camera ROI: pixels are offset on the sensor
        offset = np.array([roi.offset_x, roi.offset_y]) if roi else np.zeros(2)
        det = Detections.from_labels(
            labels,
            image,
            to_stage=lambda px: self._to_stage(
                px + offset, stage_xy, frame.pixel_size_um
            ),
            scores=scores,
            frame_index=frame.frame_index,
            model_id=self.segmenter.model_id,
        )
        det.extra["image"] = image  # for policies that look at pixels (autofocus)
        return det

    def _handle(
        self, frame: Frame, image: np.ndarray, labels: np.ndarray, det: Detections
    ) -> None:
        frame.t_analysed = self._clock()
        self.n_analysed += 1
        self.n_detections += len(det)
        self._lat("frame_to_detections", frame.t_analysed - frame.t_acquired)
        self.events.detectionsReady.emit(frame, det)

        frame.t_decided = frame.t_analysed
        for k, policy in enumerate(self.policies):
            if k in self._disabled or self.error is not None:
                continue
            try:
                actions = list(policy.on_detections(frame, det, self._context))
            except Exception as e:
                self.policy_fault(k, frame, e, "on_detections")
                continue
            frame.t_decided = self._clock()
            self._refresh_pending(k, frame)
            if not actions:
                continue
            decision_id = self.n_decisions
            self.n_decisions += 1
            outcomes = []
            for action in actions:
                try:
                    outcome = self._apply(
                        action,
                        decision_id=decision_id,
                        trigger_frame=frame.frame_index,
                        trigger_position=frame.position,
                        kind=getattr(policy, "name", "added"),
                    )
                except Exception as e:  # an action the Scheduler cannot take
                    self.policy_fault(k, frame, e, "apply its action")
                    continue
                self.n_events_scheduled += len(outcome.events)
                outcomes.append(outcome)
            frame.t_queued = self._clock()
            record = self._decision_record(decision_id, policy, frame, det, outcomes)
            self._lat("frame_to_queued", frame.t_queued - frame.t_acquired)
            if self.storage is not None:
                self.storage.log_decision(record)
            self.events.decisionMade.emit(record)
        age_ms = (frame.t_decided - frame.t_acquired) * 1000.0
        self.latencies_ms["frame_to_decision"].add(age_ms)
        self.age_at_decision_max_ms = max(self.age_at_decision_max_ms, age_ms)

        if self.storage is not None:
            # after the decisions (writing a new array takes tens of ms), before
            # the detections line: a logged frame has its labels on disk
            self.storage.write_labels(labels, frame)
            self.storage.log_detections(
                {
                    "frame_index": frame.frame_index,
                    "position": frame.position,
                    "model_id": det.model_id,
                    "n_detections": len(det),
                    "t_acquired_s": frame.t_acquired,
                    "t_analysed_s": frame.t_analysed,
                    "t_decided_s": frame.t_decided,
                    "age_ms": round(age_ms, 3),
                    "objects": det.summary(),
                }
            )

    def replay(
        self,
        frames: Iterable[tuple[Frame, Detections]],
        *,
        stored: Callable[[MDAEvent], bool],
    ) -> int:
        """Give the policies frames analysed in an earlier session (resume).

        Call before `start`. Each policy sees each frame as it did live, on a
        clock that reads the frame's ``t_clock``. Its actions are applied to
        the Scheduler without being logged again, except that `AddEvents`
        keep only the events not `stored` yet and a `Stream` only its frames
        after the last one stored; a decision that still adds events is logged
        (with ``"replayed": true``) under a new id. Returns the number of
        frames replayed.
        """
        n = 0
        for frame, det in frames:
            t = frame.t_clock or 0.0
            context = replace(self._context, clock=_fixed_clock(t))
            for k, policy in enumerate(self.policies):
                if k in self._disabled:
                    continue
                try:
                    proposed = list(policy.on_detections(frame, det, context))
                except Exception as e:
                    self.policy_fault(k, frame, e, "on_detections (replay)")
                    continue
                actions = []
                for action in proposed:
                    if isinstance(action, AddEvents):
                        events = tuple(e for e in action.events if not stored(e))
                        if not events:
                            continue
                        action = replace(action, events=events)
                    elif isinstance(action, Stream):
                        done = _stream_frames_stored(action, stored)
                        if done >= action.n_frames:
                            continue
                        action = replace(action, n_frames=action.n_frames - done)
                    actions.append(action)
                outcomes = [
                    self.scheduler.apply(
                        a,
                        decision_id=self.n_decisions,
                        trigger_frame=frame.frame_index,
                        trigger_position=frame.position,
                        kind=getattr(policy, "name", "added"),
                    )
                    for a in actions
                ]
                requeued = [
                    o for o in outcomes if isinstance(o.action, (AddEvents, Stream))
                ]
                if not requeued:
                    continue
                self.n_events_scheduled += sum(len(o.events) for o in requeued)
                record = self._decision_record(
                    self.n_decisions, policy, frame, det, outcomes
                )
                record["replayed"] = True
                self.n_decisions += 1
                if self.storage is not None:
                    self.storage.log_decision(record)
            n += 1
        self.refresh_pending()
        return n

    def _decision_record(
        self,
        decision_id: int,
        policy: PPolicy,
        frame: Frame,
        det: Detections,
        outcomes: list[Any],
    ) -> dict[str, Any]:
        def ms(t: float | None) -> float | None:
            return None if t is None else round((t - frame.t_acquired) * 1000, 3)

        return {
            "decision_id": decision_id,
            "policy": getattr(policy, "name", type(policy).__name__),
            "model_id": det.model_id,
            "trigger": {
                "frame_index": frame.frame_index,
                "event_id": frame.event_id,
                "position": frame.position,
                "kind": frame.kind,
                "index": {str(k): int(v) for k, v in frame.event.index.items()},
                "stage_um": {
                    "x": frame.stage_x_um,
                    "y": frame.stage_y_um,
                    "z": frame.stage_z_um,
                },
                "channel": frame.channel,
                "t_acquired_s": round(frame.t_acquired, 6),
            },
            "n_detections": len(det),
            "actions": [o.to_json() for o in outcomes],
            "latency_ms": {
                "frame_to_detections": ms(frame.t_analysed),
                "frame_to_decision": ms(frame.t_decided),
                "frame_to_queued": ms(frame.t_queued),
            },
        }

    def _lat(self, key: str, seconds: float) -> None:
        self.latencies_ms[key].add(seconds * 1000.0)

    def latency_percentiles(self) -> dict[str, dict[str, float | None]]:
        """p50/p99 (ms) of each latency kind, ``None`` where nothing was measured.

        Estimates within about 1 % (`StreamingPercentiles`: the worker keeps a
        fixed-size histogram, not one number per frame); exact per-frame
        latencies are in ``detections.jsonl``.
        """
        out: dict[str, dict[str, float | None]] = {}
        for key, summary in self.latencies_ms.items():
            s = summary.summary(digits=3)
            out[key] = {"p50": s["p50"], "p99": s["p99"]}
        return out

    def analysis_summary(self) -> dict[str, Any]:
        """Frames analysed and skipped (by reason); frame age at decision (ms).

        The age of a frame at its decision is the time from its acquisition to
        the moment every policy had answered (frame→decision latency).
        """
        s = self.latencies_ms["frame_to_decision"].summary(digits=3)
        return {
            "analysed": self.n_analysed,
            "skipped": self.n_skipped,
            "segmenter_errors": self.n_segmenter_errors,
            "age_at_decision_ms": {
                "p50": s["p50"],
                "p99": s["p99"],
                "max": round(self.age_at_decision_max_ms, 3)
                if self.n_analysed
                else None,
            },
        }

    def finish(self, timeout: float | None = None) -> None:
        """Close the stream, let the worker drain what is queued, and join it."""
        self.stream.close()
        self.join(timeout)


def _stream_frames_stored(action: Stream, stored: Callable[[MDAEvent], bool]) -> int:
    """How many of a stream's first frames are stored already (resume)."""
    done = 0
    while done < action.n_frames and stored(action.frame_event(done)):
        done += 1
    return done


def _checked(labels: Any, scores: Any, image: np.ndarray) -> tuple[np.ndarray, Any]:
    """`labels` as uint16 instance labels of the image's shape (else a fault)."""
    return instance_labels(labels, image.shape), scores


def _frame_ref(frame: Frame) -> dict[str, Any]:
    """Which frame: index, event, position, kind, stage position."""
    return {
        "frame_index": frame.frame_index,
        "event_id": frame.event_id,
        "position": frame.position,
        "kind": frame.kind,
        "stage_um": {
            "x": frame.stage_x_um,
            "y": frame.stage_y_um,
            "z": frame.stage_z_um,
        },
    }


def _fixed_clock(t: float) -> Callable[[], float]:
    """A clock that always reads `t` (a replayed frame's time)."""
    return lambda: t
