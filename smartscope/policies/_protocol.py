"""The policy protocol, the context a policy sees, and the base of the built-ins."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from smartscope.microscope import Objective

if TYPE_CHECKING:
    from smartscope.detections import Detections
    from smartscope.frame import Frame
    from smartscope.scheduler import Action

__all__ = ["ObjectFilter", "PPolicy", "PolicyBase", "PolicyContext"]


@dataclass(frozen=True)
class PolicyContext:
    """What a policy may know about the microscope and the run.

    Attributes
    ----------
    fov_um : (float, float)
        Field of view (width, height) in µm.
    pixel_size_um : float
        Pixel size at the sample (of the objective the run starts with).
    channel_group : str
        The config group holding channel presets.
    clock : callable, optional
        The Scheduler's clock (seconds; the time base of ``min_start_time`` and
        of `Frame.t_clock`).
    objectives : dict[str, Objective]
        The presets of the objective config group (``"Objective"`` in the demo
        configs: ``10X``, ``20X``, ``40X``) with the device properties that
        select each and its calibrated pixel size; empty without such a group.
        An added event that carries an objective's properties is imaged with
        it; the Scheduler puts the run's objective back afterwards.
    """

    fov_um: tuple[float, float] = (512.0, 512.0)
    pixel_size_um: float = 1.0
    channel_group: str = "Channel"
    clock: Callable[[], float] | None = None
    objectives: Mapping[str, Objective] = field(default_factory=dict)

    def objective(self, name: str) -> Objective:
        """The objective preset `name`.

        Raises
        ------
        KeyError
            If the config has no such preset (the message lists those it has).
        """
        try:
            return self.objectives[name]
        except KeyError:
            have = ", ".join(self.objectives) or "none"
            raise KeyError(f"no objective preset {name!r} (presets: {have})") from None

    @property
    def sensor_px(self) -> tuple[int, int]:
        """Camera ``(width, height)`` in pixels."""
        return (
            round(self.fov_um[0] / self.pixel_size_um),
            round(self.fov_um[1] / self.pixel_size_um),
        )

    def now(self) -> float:
        """The Scheduler's clock now (0.0 without one)."""
        return float(self.clock()) if self.clock is not None else 0.0


@runtime_checkable
class PPolicy(Protocol):
    """Detections in, actions out.

    Threads (the contract a runner keeps, so a policy needs no locks):

    - ``on_detections`` and ``has_pending_work`` are called on the inference
      worker thread only (``on_detections`` once per analysed frame, in
      acquisition order; ``has_pending_work`` after each of the policy's
      decisions and about every 0.1 s while no frame is waiting). The
      Scheduler, on the acquisition thread, reads the answer the worker last
      published and never calls the policy. Before the worker starts,
      ``smartscope resume`` replays earlier frames through ``on_detections`` on
      the thread that builds the run. These methods may change the policy's
      state; both must be quick and must not block.
    - ``needs(frame)`` (optional) is called on the acquisition thread for
      every frame: it must only read the frame and the policy's
      configuration, never state that ``on_detections`` changes.
    - ``report()`` (optional) is called once the run is over (the worker has
      stopped).

    An exception from any of them is a fault of the policy: it is logged in
    ``decisions.jsonl`` (with the frame) and ``run.json``, and the policy's
    ``on_error`` (experiment file) decides: ``disable`` it (default), ``skip``
    that frame, or ``stop`` the run. The base plan goes on otherwise, and the
    run ends ``completed_with_errors``.
    """

    name: str

    def on_detections(
        self, frame: Frame, detections: Detections, context: PolicyContext
    ) -> Sequence[Action]:
        """Return the actions this frame calls for (may be empty)."""
        ...

    def has_pending_work(self) -> bool:
        """True while the policy will still add work without a new frame."""
        ...

    # Optional: ``needs(frame) -> bool`` says whether the policy needs `frame`
    # analysed. Frames no policy needs may be skipped for fresher ones when the
    # model falls behind the camera; a policy without ``needs`` needs every
    # frame. (Not part of the runtime check, so older policies still conform.)


class ObjectFilter(BaseModel):
    """Which detected objects count: size, intensity, score and border limits."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    min_area_px: float = Field(0.0, ge=0)
    max_area_px: float = Field(math.inf, gt=0)
    min_intensity: float = -math.inf
    max_intensity: float = math.inf
    min_score: float = 0.0
    exclude_border: bool = Field(
        True,
        description="Ignore objects touching the image edge (seen whole in an "
        "overlapping tile).",
    )

    def mask(self, detections: Detections) -> np.ndarray:
        """Boolean mask of the objects that pass."""
        o = detections.objects
        keep = (
            (o["area_px"] >= self.min_area_px)
            & (o["area_px"] <= self.max_area_px)
            & (o["mean_intensity"] >= self.min_intensity)
            & (o["mean_intensity"] <= self.max_intensity)
            & (o["score"] >= self.min_score)
        )
        if self.exclude_border:
            keep &= ~o["touches_border"].astype(bool)
        return keep


class PolicyBase(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    survey_channel: str | None = Field(
        None,
        description="Only base-plan frames of this channel preset are analysed "
        "by the policy (None: every base-plan frame).",
    )

    def _is_survey(self, frame: Frame) -> bool:
        return frame.kind == "base" and (
            self.survey_channel is None or frame.channel == self.survey_channel
        )

    def has_pending_work(self) -> bool:
        return False

    def needs(self, frame: Frame) -> bool:
        """Whether this policy needs `frame` analysed (then it is never skipped).

        The built-ins need their survey frames (base-plan frames of
        `survey_channel`); the frames they add themselves (bursts, follows,
        targets) may be skipped for fresher ones when the model falls behind.
        """
        return self._is_survey(frame)
