"""A policy in a few lines: image the brightest object of each position up close.

A policy is anything with a ``name``, ``on_detections(frame, detections,
context) -> [Action, ...]`` and ``has_pending_work()`` (the
`smartscope.policies.PPolicy` protocol). Actions are plain data
(`smartscope.scheduler.AddEvents`, `SkipPosition`, `Stop`, ...): the Scheduler
applies them, checks them against the limits and logs each one with the frame
that caused it.

.. code-block:: yaml

    policies:
      - name: brightest_target   # the entry point name (see pyproject.toml)
        exposure_ms: 50
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr
from smartscope.scheduler import Action, AddEvents
from useq import MDAEvent

if TYPE_CHECKING:  # only for type hints: policies import nothing heavy
    from smartscope.detections import Detections
    from smartscope.frame import Frame
    from smartscope.policies import PolicyContext


class BrightestTarget(BaseModel):
    """Once per position, image its brightest object centred, with more exposure.

    On each base-plan frame (the survey), the object with the highest mean
    intensity among those of at least `min_area_px` pixels that do not touch
    the image border becomes a target: one extra acquisition with the stage
    moved so that the object is at the image centre, queued ahead of the base
    plan. A position gets at most `max_per_position` targets.

    Parameters
    ----------
    min_area_px : float
        Smaller objects are not considered (noise, debris).
    channel : str, optional
        Channel preset of the target image (default: the survey frame's).
    exposure_ms : float, optional
        Exposure of the target image (default: the survey frame's).
    max_per_position : int
        Targets per base position over the whole run.
    priority : int
        Higher runs first; the base plan has priority 0.
    """

    # validate_assignment: params changed later (e.g. from a GUI) are checked too
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # `name` is how the registry and the decision log know the policy
    name: Literal["brightest_target"] = "brightest_target"
    min_area_px: float = Field(10.0, ge=0)
    channel: str | None = None
    exposure_ms: float | None = Field(None, gt=0)
    max_per_position: int = Field(1, ge=1)
    priority: int = 10

    # run state lives in private attributes: it is not a parameter
    _targets: dict[str, int] = PrivateAttr(default_factory=dict)

    def on_detections(
        self, frame: Frame, detections: Detections, context: PolicyContext
    ) -> list[Action]:
        """Called on the inference worker thread for every analysed frame.

        It must return quickly and must not block or touch the hardware:
        whatever should happen is returned as actions.
        """
        # react to survey frames only (our own targets are frames too)
        if frame.kind != "base" or len(detections) == 0:
            return []
        if self._targets.get(frame.position, 0) >= self.max_per_position:
            return []
        obj = detections.objects  # one numpy array per column, one row per object
        ok = (obj["area_px"] >= self.min_area_px) & ~obj["touches_border"].astype(bool)
        if not ok.any():
            return []
        i = int(np.flatnonzero(ok)[np.argmax(obj["mean_intensity"][ok])])
        n = self._targets.get(frame.position, 0)
        self._targets[frame.position] = n + 1
        channel = self.channel or frame.channel
        event = MDAEvent(
            # the object's centroid in stage µm: the Detections already hold it
            x_pos=float(obj["stage_x_um"][i]),
            y_pos=float(obj["stage_y_um"][i]),
            z_pos=frame.stage_z_um,
            channel={"config": channel, "group": context.channel_group}
            if channel
            else None,
            exposure=self.exposure_ms or frame.exposure_ms,
            pos_name=f"brightest_{frame.position}_{n}",  # its own array on disk
            # what the data writer and the report read about this event
            metadata={
                "smartscope": {
                    "kind": "target",
                    "object": {
                        "label": int(obj["label"][i]),
                        "mean_intensity": float(obj["mean_intensity"][i]),
                        "area_px": float(obj["area_px"][i]),
                    },
                }
            },
        )
        reason = (
            f"brightest object of {frame.position} "
            f"(mean intensity {obj['mean_intensity'][i]:.0f})"
        )
        return [AddEvents((event,), priority=self.priority, reason=reason)]

    def has_pending_work(self) -> bool:
        """True would keep the run going without new frames; we never wait."""
        return False
