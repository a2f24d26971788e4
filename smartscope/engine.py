"""`SafeEngine`: pymmcore-plus's MDA engine with retried, checked hardware calls.

pymmcore-plus's `MDAEngine` logs a failed snap, stage move, channel or property
change as a warning and goes on (a frame silently missing, a frame taken at the
wrong place). During a smartscope run every hardware call of an event — XY
stage, focus, channel preset, exposure, device properties, camera ROI,
shutter, snap — is instead retried on error (`retries` times, waiting
`retry_backoff_s`, doubled after each try), then raises a `DeviceFault` naming
the device, the call and the error: the runner ends the run ``failed`` with
it. Moves and exposures outside the run's `SafetyLimits` are never sent: they
raise `LimitViolation` before the hardware is touched.

A ``SequencedEvent`` the Scheduler hands over (a run of frames at one place
with one setting) is set up with the same checked calls and acquired as one
camera sequence: frames are popped from the camera's buffer one by one, each
with its own event. A cancel stops the camera and still delivers the frames
it had taken; a camera that cannot start a sequence makes the engine fall
back to event-by-event snaps for the rest of the run (`on_cannot_sequence`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from pymmcore_plus import DeviceType, Keyword
from pymmcore_plus.core import SequencedEvent
from pymmcore_plus.mda import MDAEngine, SkipEvent

from smartscope._errors import first_line

if TYPE_CHECKING:
    from pymmcore_plus import CMMCorePlus
    from pymmcore_plus.mda._protocol import PImagePayload
    from useq import MDAEvent

    from smartscope.limits import SafetyLimits

__all__ = [
    "DeviceFault",
    "FrameSequence",
    "LimitViolation",
    "SafeEngine",
    "sequence_capacity",
]

T = TypeVar("T")
_log = logging.getLogger("smartscope.engine")


def sequence_capacity(core: CMMCorePlus) -> tuple[int, str | None]:
    """Longest camera sequence `core` can acquire, in frames, and why not if < 2.

    A camera sequence is limited by the circular (sequence) buffer that holds
    its frames until they are popped: its capacity in full frames. Without a
    camera, or with several camera channels (a multi-camera), nothing is
    sequenced.
    """
    camera = core.getCameraDevice()
    if not camera:
        return 0, "no camera"
    try:
        channels = core.getNumberOfCameraChannels()
        capacity = int(core.getBufferTotalCapacity())
        if capacity <= 0:  # not allocated yet: what its memory footprint will hold
            frame_bytes = max(1, int(core.getImageBufferSize()))
            capacity = int(core.getCircularBufferMemoryFootprint()) * 2**20
            capacity //= frame_bytes
    except Exception as e:
        return 0, f"{camera}: cannot read its sequence buffer: {first_line(e)}"
    if channels > 1:
        return 0, f"{camera} has {channels} camera channels"
    if capacity < 2:
        return capacity, f"the sequence buffer of {camera} holds {capacity} frame(s)"
    return capacity, None


class FrameSequence(SequencedEvent):
    """A run of frames at one place with one setting: one camera sequence.

    A ``SequencedEvent`` whose text form is one short line (pymmcore-plus logs
    every event it runs: the full form lists every frame's event, ~2 ms for 20
    frames, at each sequence boundary of a run).
    """

    def __str__(self) -> str:
        first, last = self.events[0], self.events[-1]
        span = ", ".join(
            f"{k}={v}" if last.index.get(k) == v else f"{k}={v}..{last.index.get(k)}"
            for k, v in first.index.items()
        )
        return (
            f"FrameSequence({len(self.events)} frames: {span}; "
            f"pos_name={self.pos_name!r}, exposure={self.exposure})"
        )

    __repr__ = __str__


class DeviceFault(RuntimeError):
    """A hardware call that kept failing: which device, which call, what error."""

    def __init__(
        self,
        device: str,
        call: str,
        error: BaseException | str,
        *,
        attempts: int = 1,
        event: MDAEvent | None = None,
    ) -> None:
        self.device = device
        self.call = call
        self.error = (
            error
            if isinstance(error, str)
            else f"{type(error).__name__}: {first_line(error)}"
        )
        self.attempts = attempts
        self.event = event
        tries = f" after {attempts} attempts" if attempts > 1 else ""
        super().__init__(f"{device}: {call} failed{tries}: {self.error}")

    def to_json(self) -> dict[str, Any]:
        """``run.json`` form: device, call, error, attempts and the event."""
        out: dict[str, Any] = {
            "device": self.device,
            "call": self.call,
            "error": self.error,
            "attempts": self.attempts,
        }
        if self.event is not None:
            out["event"] = {
                "index": {str(k): int(v) for k, v in self.event.index.items()},
                "x_um": self.event.x_pos,
                "y_um": self.event.y_pos,
                "z_um": self.event.z_pos,
                "channel": self.event.channel.config if self.event.channel else None,
                "smartscope": dict(self.event.metadata.get("smartscope") or {}),
            }
        return out


class LimitViolation(DeviceFault):
    """A move or exposure outside the run's safety limits, refused unsent."""

    def __init__(
        self, device: str, call: str, reason: str, *, event: MDAEvent | None = None
    ) -> None:
        super().__init__(device, call, f"refused: {reason}", event=event)


class SafeEngine(MDAEngine):
    """An `MDAEngine` whose hardware calls are retried, checked, and never silent.

    Parameters
    ----------
    mmc : CMMCorePlus
        The core.
    retries : int
        Further tries of a failing hardware call (0: none).
    retry_backoff_s : float
        Wait before the first retry; doubled before each further one.
    limits : SafetyLimits, optional
        Moves and exposures outside these are refused (`LimitViolation`).
    on_cannot_sequence : callable, optional
        ``on_cannot_sequence(reason)``, called once when the camera refuses a
        sequence acquisition (the engine then snaps every frame on its own).
    hold : callable, optional
        ``hold()`` → None (go on), ``"pause"`` or ``"stop"``, asked before each
        event is set up. While it says ``"pause"`` the event waits; ``"stop"``
        skips it. pymmcore-plus checks its own pause only until it starts
        sleeping towards an event's start time, so a pause that lands in that
        last sleep (up to 0.5 s) would otherwise still take the frame.
    choose_ahead : callable, optional
        Called once while the camera takes the last frame of a sequence (e.g.
        `Scheduler.choose_ahead`, returning the event chosen): the next event
        is then ready the moment that frame arrives, and the camera stands
        still for less time between sequences. With it, a sequence's camera
        run is asked for the frames planned at its place (``camera_frames`` in
        its ``metadata["smartscope"]``, at most `max_run_frames`), and a chosen
        sequence with the same setting that fits in that run is taken from it
        without stopping the camera; otherwise the camera is stopped after the
        last frame. Its errors are logged, never raised.
    **kwargs
        Passed to `MDAEngine` (hardware sequencing is off by default: adaptive
        runs execute event by event).

    Attributes
    ----------
    n_retried : int
        Hardware calls that failed at first and then succeeded.
    n_failed_attempts : int
        Failed attempts, retried or not.
    sequence_refused : str or None
        Why the camera could not sequence (None while it can).
    n_sequences : int
        Camera sequences acquired.
    n_camera_starts : int
        Times the camera was started for them: a sequence that continues the
        one before (same setting, chosen while the camera took that one's last
        frame) is taken from the same camera run, with no restart.
    holding : bool
        Whether an event is waiting in its set-up because `hold` says pause.
    """

    def __init__(
        self,
        mmc: CMMCorePlus,
        *,
        retries: int = 2,
        retry_backoff_s: float = 0.1,
        limits: SafetyLimits | None = None,
        on_cannot_sequence: Callable[[str], None] | None = None,
        hold: Callable[[], str | None] | None = None,
        choose_ahead: Callable[[], object] | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("use_hardware_sequencing", False)
        super().__init__(mmc, **kwargs)
        self.retries = max(0, int(retries))
        self.retry_backoff_s = max(0.0, float(retry_backoff_s))
        self.limits = limits
        self.n_retried = 0
        self.n_failed_attempts = 0
        self._event: MDAEvent | None = None
        self.on_cannot_sequence = on_cannot_sequence
        self.hold = hold
        self.choose_ahead = choose_ahead
        self.holding = False  # an event waits in set-up for `hold` to let it go
        self.sequence_refused: str | None = None
        self.n_sequences = 0
        self.n_camera_starts = 0
        # the sequence chosen ahead that the running camera goes on into, and
        # the camera run's start (ms on the runner's clock: frame times)
        self._runs_into: Any = None
        self._run_t0_ms = 0.0
        #: the runner's zero on the wall and performance clocks, and where the
        #: camera's own clock (a frame's ElapsedTime-ms) has its zero on the
        #: runner's (None until the camera run's first frame): `_frame_time_ms`
        self._runner_zero = (0.0, 0.0)
        self._camera_zero_ms: float | None = None
        self._camera_left = 0  # frames the running camera takes after this sequence
        #: most frames one camera run may be asked for (the runner sets the
        #: sequence buffer's capacity: a run then never overflows the buffer,
        #: however far behind the popping falls); None: no bound
        self.max_run_frames: int | None = None
        # where this engine last sent the stages (a sequence's set-up moves only
        # if that changed; None: unknown)
        self._xy_at: tuple[float, float] | None = None
        self._z_at: float | None = None
        self._unchanged_only = False
        self._sent = False  # whether this set-up sent a device anything

    # ---------------------------------------------------------------- retries
    def call(self, device: str, name: str, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)``, retried on error; a `DeviceFault` once retries run out."""
        wait = self.retry_backoff_s
        for attempt in range(1, self.retries + 2):
            try:
                result = fn(*args)
            except Exception as e:
                self.n_failed_attempts += 1
                if attempt > self.retries:
                    raise DeviceFault(
                        device, name, e, attempts=attempt, event=self._event
                    ) from e
                _log.warning(
                    "%s: %s failed (attempt %d of %d), retrying in %.3g s: %s",
                    device,
                    name,
                    attempt,
                    self.retries + 1,
                    wait,
                    first_line(e),
                )
                time.sleep(wait)
                wait *= 2
            else:
                if attempt > 1:
                    self.n_retried += 1
                return result
        raise AssertionError("unreachable")  # pragma: no cover

    def stats(self) -> dict[str, int]:
        """Retried calls, failed attempts and camera sequences (``run.json``)."""
        return {
            "retries": self.retries,
            "calls_retried": self.n_retried,
            "failed_attempts": self.n_failed_attempts,
            "camera_sequences": self.n_sequences,
            "camera_starts": self.n_camera_starts,
        }

    def _refuse(self, device: str, call: str, reason: str | None) -> None:
        if reason:
            raise LimitViolation(device, call, reason, event=self._event)

    # ------------------------------------------------------------------ setup
    def setup_sequence(self, sequence: Any) -> Any:
        self._xy_at = self._z_at = None
        return super().setup_sequence(sequence)

    def setup_event(self, event: MDAEvent) -> None:
        self._event = event
        core = self.mmcore
        held = self.hold is not None and self.hold() is not None
        if self._runs_into is not None:
            if event is self._runs_into and not held:
                return  # the same setting, the camera still running: send nothing
            self._runs_into = None
            self._stop_camera()
        if held:
            self._wait_while_held(event)
        if isinstance(event, SequencedEvent) and (
            event.x_sequence
            or event.z_sequence
            or event.exposure_sequence
            or event.slm_sequence
            or event.property_sequences
        ):  # pymmcore-plus's own hardware sequencing (turned on by hand)
            super().setup_event(event)
            return
        if self.limits is not None:  # nothing moves unless all of it may
            self._refuse("event", "check limits", self.limits.why_not(event))
        self._sent = False
        if isinstance(event, SequencedEvent):
            # one setting for every frame: set up like one event; stages and
            # exposure are sent only if they changed (a stream's next chunk
            # sends nothing, so the camera stands still for less time)
            if core.isSequenceRunning():
                self._stop_camera()
                self._sent = True
            self._unchanged_only = True
            try:
                self.setup_single_event(event)
            finally:
                self._unchanged_only = False
        else:
            self.setup_single_event(event)
            self._sent = True
        if self._sent:  # nothing sent: nothing to wait for
            self.call("system", "waitForSystem", core.waitForSystem)

    def _wait_while_held(self, event: MDAEvent) -> None:
        """Wait while `hold` says pause; skip the event if it says stop."""
        assert self.hold is not None
        self.holding = True
        try:
            while (state := self.hold()) == "pause":
                time.sleep(0.01)
        finally:
            self.holding = False
        if state == "stop":
            frames = len(getattr(event, "events", ()) or ()) or 1
            raise SkipEvent(frames, "the run was stopped while paused")

    def setup_single_event(self, event: MDAEvent) -> None:
        """Set XY, Z, channel, exposure, properties and ROI; raise on failure."""
        core = self.mmcore
        self._set_event_xy_position(event)
        if event.z_pos is not None:
            self._set_event_z(event)
        if event.slm_image is not None:
            self._sent = True
            self._set_event_slm_image(event)
        self._set_event_channel(event)
        if event.exposure is not None and not (
            self._unchanged_only and core.getExposure() == float(event.exposure)
        ):
            self._sent = True
            self.call(
                core.getCameraDevice(), "setExposure", core.setExposure, event.exposure
            )
        if event.properties is not None:
            self._set_event_properties(event.properties)
        if event.roi is not None:
            self._sent = True
            self._set_event_roi(event)
        if (
            getattr(self, "_autoshutter_was_set", False)
            and event.keep_shutter_open
            and core.getAutoShutter()
        ):
            self._sent = True
            core.setAutoShutter(False)
            self.call(
                core.getShutterDevice(), "setShutterOpen", core.setShutterOpen, True
            )

    def _set_event_xy_position(self, event: MDAEvent) -> None:
        x, y = event.x_pos, event.y_pos
        if x is None and y is None:
            return
        core = self.mmcore
        stage = core.getXYStageDevice()
        if not stage:
            return
        if x is None or y is None:
            cx, cy = self.call(stage, "getXYPosition", core.getXYPosition)
            x = cx if x is None else x
            y = cy if y is None else y
        if self._unchanged_only and self._xy_at == (float(x), float(y)):
            return
        if self.limits is not None:
            self._refuse(stage, "setXYPosition", self.limits.why_not_xy(x, y))
        self._xy_at = None
        self._sent = True
        self.call(stage, "setXYPosition", core.setXYPosition, float(x), float(y))
        self._xy_at = (float(x), float(y))

    def _set_event_z(self, event: MDAEvent) -> None:
        core = self.mmcore
        focus = core.getFocusDevice()
        if not focus or event.z_pos is None:
            return
        correction = self._z_correction.setdefault(event.index.get("p", None), 0.0)
        z = float(event.z_pos) + correction
        if self._unchanged_only and self._z_at == z:
            return
        if self.limits is not None:
            self._refuse(focus, "setZPosition", self.limits.why_not_z(z))
        self._z_at = None
        self._sent = True
        self.call(focus, "setZPosition", core.setZPosition, z)
        self._z_at = z

    def _set_event_channel(self, event: MDAEvent) -> None:
        ch = event.channel
        if ch is None:
            return
        core = self.mmcore
        if (ch.group, ch.config) != core._last_config:
            self._sent = True
            self.call(
                f"{ch.group}:{ch.config}",
                "setConfig",
                core.setConfig,
                ch.group,
                ch.config,
            )

    def _set_event_properties(self, properties: Sequence[Any]) -> None:
        core = self.mmcore
        if properties:
            self._sent = True
        for dev, prop, value in properties:
            if prop == Keyword.Position:
                kind = core.getDeviceType(dev)
                self._xy_at = self._z_at = None  # a stage moves outside the plan
                if kind == DeviceType.XYStage:
                    x, y, *_ = value
                    if self.limits is not None:
                        self._refuse(dev, "setXYPosition", self.limits.why_not_xy(x, y))
                    self.call(
                        dev,
                        "setXYPosition",
                        core.setXYPosition,
                        dev,
                        float(x),
                        float(y),
                    )
                    continue
                if kind == DeviceType.Stage:
                    if self.limits is not None:
                        self._refuse(dev, "setPosition", self.limits.why_not_z(value))
                    self.call(dev, "setPosition", core.setPosition, dev, float(value))
                    continue
            self.call(dev, f"setProperty({prop})", core.setProperty, dev, prop, value)

    def _set_event_roi(self, event: MDAEvent) -> None:
        roi = event.roi
        if roi is None:
            return
        core = self.mmcore

        def set_roi() -> None:
            core.clearROI()
            core.setROI(roi.offset_x, roi.offset_y, roi.width, roi.height)

        self.call(core.getCameraDevice(), "setROI", set_roi)

    # ------------------------------------------------------------------- exec
    def teardown_event(self, event: MDAEvent) -> None:
        """pymmcore-plus's teardown, without turning on an auto-shutter that is on.

        Setting it again costs 0.1-0.4 ms of property notifications at every
        event, between a sequence's last frame and the next event.
        """
        was_set = getattr(self, "_autoshutter_was_set", False)
        if was_set and self.mmcore.getAutoShutter():
            self._autoshutter_was_set = False
            try:
                super().teardown_event(event)
            finally:
                self._autoshutter_was_set = True
        else:
            super().teardown_event(event)

    def exec_single_event(self, event: MDAEvent) -> Iterator[PImagePayload | None]:
        """Snap (retried) and yield the image(s); a `DeviceFault` if it cannot."""
        from pymmcore_plus.mda._engine import ImagePayload

        self._event = event
        if event.slm_image is not None:
            self._exec_event_slm_image(event.slm_image)
        core = self.mmcore
        self.call(core.getCameraDevice(), "snapImage", core.snapImage)
        t0 = event.metadata.get("runner_t0") or time.perf_counter()
        event_time_ms = (time.perf_counter() - t0) * 1000
        if not event.keep_shutter_open and getattr(self, "_autoshutter_was_set", False):
            self.call(
                core.getShutterDevice() or "shutter",
                "setShutterOpen",
                core.setShutterOpen,
                False,
            )
        n_channels = core.getNumberOfCameraChannels()
        for cam in range(n_channels):
            meta = self.get_frame_metadata(
                event,
                runner_time_ms=event_time_ms,
                camera_device=core.getPhysicalCameraDevice(cam),
                include_position=self._include_frame_position_metadata is not False,
            )
            sub_event = event
            if n_channels > 1:
                sub_event = event.model_copy(
                    update={"index": {**event.index, "cam": cam}}
                )
            image = self.call(core.getCameraDevice(), "getImage", core.getImage, cam)
            yield ImagePayload(image, sub_event, meta)  # type: ignore[misc]

    # -------------------------------------------------------------- sequences
    def exec_sequenced_event(self, event: Any) -> Any:  # the payload generator
        """Acquire a ``SequencedEvent`` as one camera sequence, frame by frame.

        Each frame comes with its own event (``event.events[k]``). A cancel
        stops the camera and still delivers the frames it had taken. A
        sequence chosen ahead to continue the last one (see `choose_ahead`)
        takes its frames from the camera run already going. A camera that
        refuses to start a sequence gets the frames snapped one by one (and
        `on_cannot_sequence` is told, once). Frames that never come, a
        stalled camera or an overflowed buffer raise a `DeviceFault`.
        """
        core = self.mmcore
        self._event = event
        if self.sequence_refused is None and core.getNumberOfCameraChannels() > 1:
            self._refuse_sequencing(
                f"{core.getNumberOfCameraChannels()} camera channels (a multi-camera "
                "sequence is not streamed by smartscope)"
            )
        if self.sequence_refused is not None:
            yield from self._exec_each(event)
            return
        t0 = event.metadata.get("runner_t0") or time.perf_counter()
        t0_ms = (time.perf_counter() - t0) * 1000
        if event.slm_image is not None:
            self._exec_event_slm_image(event.slm_image)
        camera = core.getCameraDevice()
        if event is self._runs_into:
            # its frames come from the camera's run (still running, or done
            # with them waiting in its buffer)
            self._runs_into = None
            self._camera_left -= len(event.events)
            self.n_sequences += 1
            yield from self._pop_sequence(event, camera, self._run_t0_ms)
            return
        self._runs_into = None
        # the frames planned at this place: the sequences after this one, chosen
        # ahead, may continue the camera's run
        n = len(event.events)
        frames = n
        if self.choose_ahead is not None:
            planned = event.metadata.get("smartscope", {}).get("camera_frames", n)
            frames = max(n, int(planned))
            if self.max_run_frames is not None:
                frames = max(n, min(frames, self.max_run_frames))
        try:
            core.startSequenceAcquisition(frames, 0, True)
        except Exception as e:
            self._refuse_sequencing(
                f"{camera} cannot start a sequence acquisition: {first_line(e)}"
            )
            yield from self._exec_each(event)
            return
        self.n_sequences += 1
        self.n_camera_starts += 1
        self._run_t0_ms, self._camera_left = t0_ms, frames - n
        self._runner_zero = (time.time() - (time.perf_counter() - t0), t0)
        self._camera_zero_ms = None
        self.post_sequence_started(event)
        yield from self._pop_sequence(event, camera, t0_ms)

    def _pop_sequence(
        self, event: Any, camera: str, t0_ms: float
    ) -> Iterator[PImagePayload | None]:
        core = self.mmcore
        n = len(event.events)
        count = 0
        stopping = False
        timeout = self._initial_timeout(event)
        deadline = time.monotonic() + timeout
        # no frame comes sooner than one exposure after the last: sleep until
        # a millisecond before then, and only then poll every 0.5 ms (polling
        # all along took CPU from the camera's own thread on a busy machine)
        exposure_s = (event.exposure or core.getExposure() or 0.0) / 1000.0
        next_frame = time.monotonic() + exposure_s
        while count < n:
            if core.getRemainingImageCount():
                img, meta = core.popNextImageAndMD()
                timeout = self._frame_timeout(event)
                now = time.monotonic()
                deadline = now + timeout
                next_frame = now + exposure_s
                remaining = core.getRemainingImageCount()
                payload = self._create_seqimg_payload_from_popped(
                    img,
                    meta,
                    event=event.events[count],
                    channel=0,
                    event_t0=t0_ms,
                    remaining=remaining,
                )
                frame_meta: dict[str, Any] = payload[2]  # type: ignore[assignment]
                frame_meta["runner_time_ms"] = self._frame_time_ms(
                    meta, remaining, exposure_s * 1000
                )
                # which frame of which sequence (the runner's Frame.sequence)
                frame_meta["sequence"] = {
                    "index": self.n_sequences - 1,
                    "frame": count,
                    "frames": n,
                }
                signal = yield payload
                count += 1
                if signal == "cancel" and not stopping:
                    # the camera stops; the frames it already took still come
                    core.stopSequenceAcquisition()
                    stopping = True
                    self._runs_into = None
                elif count == n - 1 and not stopping:
                    # while the camera takes the last frame
                    self._runs_into = self._continuation(event, self._choose_ahead())
            elif core.isSequenceRunning():
                if time.monotonic() > deadline:
                    core.stopSequenceAcquisition()
                    raise DeviceFault(
                        camera,
                        "sequence acquisition",
                        f"no frame for {timeout:.1f} s ({count} of {n} came)",
                        event=event,
                    )
                time.sleep(max(0.0005, next_frame - 0.001 - time.monotonic()))
            elif not core.getRemainingImageCount():
                break  # the camera has stopped and its buffer is empty
        if self._runs_into is None and core.isSequenceRunning():
            core.stopSequenceAcquisition()  # done: the next set-up finds it stopped
        if core.isBufferOverflowed():
            raise DeviceFault(
                camera, "sequence acquisition", "the sequence buffer overflowed"
            )
        if count < n and not stopping:
            raise DeviceFault(
                camera,
                "sequence acquisition",
                f"{n - count} of {n} frames never came",
                event=event,
            )

    def _frame_time_ms(self, meta: Any, remaining: int, exposure_ms: float) -> float:
        """When a popped frame was taken, in ms on the runner's clock.

        The camera stamps a run's frames (``ElapsedTime-ms``) from its own
        start, not from when `startSequenceAcquisition` was called (the demo
        camera's first call in a process returns ~200 ms later, its clock
        starting then): its zero on the runner's clock is fixed
        once per camera run, from the run's first frame, as the earliest of
        when that frame was popped (less one exposure per frame still waiting
        behind it) and when MMCore received it (``TimeReceivedByCore``). Each
        frame then keeps the camera's own spacing. Without the camera's time,
        the pop time less the frames waiting behind it.
        """
        wall0, perf0 = self._runner_zero
        popped_ms = (time.perf_counter() - perf0) * 1000
        newest_ms = popped_ms - remaining * exposure_ms  # the frame was taken by then
        try:
            camera_ms = float(meta.get(Keyword.Elapsed_Time_ms))
        except Exception:
            return newest_ms
        if self._camera_zero_ms is None:
            zero = newest_ms - camera_ms
            received = _received_ms(meta, wall0)
            if received is not None and self._run_t0_ms <= received <= popped_ms:
                zero = min(zero, received - camera_ms)
            self._camera_zero_ms = zero
        return self._camera_zero_ms + camera_ms

    def _choose_ahead(self) -> Any:
        """The event `choose_ahead` chose (None: none, or no such hook)."""
        if self.choose_ahead is None:
            return None
        try:
            return self.choose_ahead()
        except Exception as e:  # the next event is then chosen as usual
            _log.warning("choosing the next event ahead failed: %s", first_line(e))
            return None

    def _continuation(self, current: Any, chosen: Any) -> Any:
        """`chosen` if the running camera can go on into it, else None.

        A `FrameSequence` at the same place with the same channel, exposure,
        ROI, shutter and properties as `current`, of no more frames than the
        camera run was asked for beyond `current` (its ``camera_frames``).
        """
        if not isinstance(chosen, FrameSequence):
            return None
        if not 0 < len(chosen.events) <= self._camera_left:
            return None
        same = all(
            getattr(chosen, attr) == getattr(current, attr)
            for attr in (
                "x_pos",
                "y_pos",
                "z_pos",
                "channel",
                "exposure",
                "roi",
                "properties",
                "keep_shutter_open",
            )
        )
        return chosen if same and chosen.slm_image is None else None

    def _stop_camera(self) -> None:
        core = self.mmcore
        if core.isSequenceRunning():
            self.call(
                core.getCameraDevice(),
                "stopSequenceAcquisition",
                core.stopSequenceAcquisition,
            )

    def teardown_sequence(self, sequence: Any) -> None:
        """pymmcore-plus's teardown, after stopping a camera left running."""
        self._runs_into = None
        try:
            self._stop_camera()
        finally:
            super().teardown_sequence(sequence)

    def _exec_each(self, event: Any) -> Iterator[PImagePayload | None]:
        """The frames of a ``SequencedEvent`` snapped one by one (no sequence)."""
        t0 = event.metadata.get("runner_t0")
        for sub in event.events:
            if t0 is not None:
                sub.metadata["runner_t0"] = t0
            for payload in self.exec_single_event(sub):
                if (yield payload) == "cancel":
                    return

    def _refuse_sequencing(self, reason: str) -> None:
        if self.sequence_refused is not None:
            return
        self.sequence_refused = reason
        if self.on_cannot_sequence is not None:
            self.on_cannot_sequence(reason)


def _received_ms(meta: Any, wall0: float) -> float | None:
    """MMCore's ``TimeReceivedByCore`` of a frame, in ms after `wall0`."""
    from datetime import datetime

    try:
        text = meta.get("TimeReceivedByCore")
        when = datetime.strptime(str(text), "%Y-%m-%d %H:%M:%S.%f").timestamp()
    except Exception:
        return None
    return (when - wall0) * 1000
