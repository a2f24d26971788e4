"""`Microscope`: owns a Micro-Manager core, its config and the pixel↔stage geometry."""

from __future__ import annotations

import gc
import math
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from smartscope._errors import ConfigError, first_line
from smartscope._resources import default_config, hardware_configs_dir

if TYPE_CHECKING:
    from pymmcore_plus import CMMCorePlus
    from useq import MDAEvent

    from smartscope.engine import SafeEngine
    from smartscope.limits import SafetyLimits


__all__ = ["Microscope", "Objective", "resolve_config"]


def resolve_config(
    config: str | Path | None, *, relative_to: str | Path | None = None
) -> Path:
    """Find a Micro-Manager ``.cfg`` file.

    Tried in order: the path as given (absolute or relative to the working
    directory), relative to `relative_to` (an experiment file's folder), and a
    bundled file of the same name in ``hardware_configs/``. ``None`` means the demo
    microscope, ``hardware_configs/demo.cfg``.

    Raises
    ------
    ConfigError
        If no such file exists.
    """
    if config is None:
        return default_config()
    path = Path(config).expanduser()
    candidates = [path]
    if relative_to is not None and not path.is_absolute():
        candidates.append(Path(relative_to) / path)
    candidates.append(hardware_configs_dir() / path.name)
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise ConfigError(f"hardware config not found: {config}")


def _needs_unicore(path: Path) -> bool:
    """Whether a config file declares Python (unicore) devices."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return False
    return any(line.startswith("#py ") for line in text.splitlines())


class Objective(NamedTuple):
    """An objective preset: the properties that select it, its pixel size."""

    properties: tuple[tuple[str, str, str], ...]
    pixel_size_um: float


class Microscope:
    """A Micro-Manager core with its loaded config and pixel↔stage transforms.

    Parameters
    ----------
    config : str | Path | None
        Micro-Manager configuration file. ``None`` loads the demo microscope
        (``hardware_configs/demo.cfg``: DemoCamera in *Fluorescent Beads* mode).
    core : CMMCorePlus | None
        An existing core to use instead of creating one; it is then not released
        by `close`. When given, `config` is only loaded if not ``None``.

    Notes
    -----
    Pixel coordinates are ``(x, y)`` = ``(column, row)`` of the image; stage
    coordinates are µm. The core's pixel-size affine ``(a, b, c, d, e, f)`` maps a
    pixel offset from the image center to a stage offset::

        dx_um = a * dx_px + b * dy_px + c
        dy_um = d * dx_px + e * dy_px + f

    so orientation (flips, rotation, swapped axes) is honoured. A config without an
    affine falls back to ``pixel_size_um`` times the identity.

    Always call `close` (or use the microscope as a context manager): a process
    that exits while a core still holds the demo devices can abort.
    """

    def __init__(
        self,
        config: str | Path | None = None,
        *,
        core: CMMCorePlus | None = None,
    ) -> None:
        from pymmcore_plus import CMMCorePlus

        self._owns_core = core is None
        self._core: CMMCorePlus | None = core if core is not None else CMMCorePlus()
        self.config_path: Path | None = None
        self._thread: threading.Thread | None = None
        #: what ended the last run with an error (None if it did not)
        self.run_error: BaseException | None = None
        if core is None or config is not None:
            try:
                self.load_config(config)
            except BaseException:
                self.close()  # a config that failed half-way: release the core
                raise

    # ------------------------------------------------------------------ config
    @property
    def core(self) -> CMMCorePlus:
        """The pymmcore-plus core (raises once the microscope is closed)."""
        if self._core is None:
            raise RuntimeError("this Microscope has been closed")
        return self._core

    def load_config(self, config: str | Path | None = None) -> Path:
        """Load a Micro-Manager config file (see `resolve_config`).

        A config with Python device lines (``#py pyDevice,...``, e.g.
        ``livecells.cfg``) needs pymmcore-plus's `UniMMCore`; a core this
        microscope owns is swapped for one when needed.
        """
        path = resolve_config(config)
        if _needs_unicore(path):
            self._ensure_unicore()
        problem = None
        try:
            self.core.loadSystemConfiguration(str(path))
        except Exception as e:  # raised below, so no traceback keeps the core
            problem = first_line(e)
        if problem is not None:
            self._unload_devices()  # what loaded before the failing line
            raise ConfigError(f"cannot load hardware config {path}: {problem}")
        if not self.core.getCameraDevice():
            self._unload_devices()
            raise ConfigError(f"hardware config {path} defines no camera")
        self.config_path = path
        self._sensor_shape = self.image_shape  # a freshly loaded camera: full frame
        return path

    def _unload_devices(self) -> None:
        """Unload what a failed config load left in a core this microscope owns."""
        if self._owns_core and self._core is not None:
            try:
                self._core.unloadAllDevices()
            except Exception:  # pragma: no cover - best effort
                pass

    def config_limits(self) -> dict[str, Any]:
        """Safety limits the hardware config exposes (see `smartscope.limits`).

        ``z_um`` from the limits of the focus device's ``Position`` property,
        ``max_exposure_ms`` from the upper limit of the camera's ``Exposure``
        property, where the adapters define them (the demo's do not, for Z).
        Missing ones are left out.
        """
        core = self.core
        out: dict[str, Any] = {}

        def limits(device: str, prop: str) -> tuple[float, float] | None:
            try:
                if device and core.hasPropertyLimits(device, prop):
                    lo = float(core.getPropertyLowerLimit(device, prop))
                    hi = float(core.getPropertyUpperLimit(device, prop))
                    if math.isfinite(lo) and math.isfinite(hi) and lo < hi:
                        return (lo, hi)
            except Exception:  # an adapter that cannot say
                pass
            return None

        z = limits(core.getFocusDevice(), "Position")
        if z is not None:
            out["z_um"] = z
        exposure = limits(core.getCameraDevice(), "Exposure")
        if exposure is not None and exposure[1] > 0:
            out["max_exposure_ms"] = exposure[1]
        return out

    @property
    def sensor_shape(self) -> tuple[int, int]:
        """``(height, width)`` of the full camera frame (whatever ROI is set)."""
        return getattr(self, "_sensor_shape", None) or self.image_shape

    def _ensure_unicore(self) -> None:
        from pymmcore_plus.experimental.unicore import UniMMCore

        if isinstance(self.core, UniMMCore):
            return
        if not self._owns_core:
            raise ConfigError(
                "this config has Python devices (#py lines): pass a UniMMCore as "
                "`core`, or let the Microscope create its own core"
            )
        self._release_core()
        self._core = UniMMCore()

    # ---------------------------------------------------------------- geometry
    @property
    def pixel_size_um(self) -> float:
        """Size of one image pixel at the sample, in µm (1.0 if not calibrated)."""
        size = self.core.getPixelSizeUm()
        return float(size) if size > 0 else 1.0

    @property
    def affine(self) -> np.ndarray:
        """The 2×3 pixel→stage affine of the current pixel-size configuration."""
        aff = np.asarray(self.core.getPixelSizeAffine(), dtype=float)
        if aff.size != 6 or not np.any(aff[[0, 1, 3, 4]]):
            ps = self.pixel_size_um
            aff = np.array([ps, 0.0, 0.0, 0.0, ps, 0.0])
        return aff.reshape(2, 3)

    @property
    def image_shape(self) -> tuple[int, int]:
        """``(height, width)`` of the camera image in pixels."""
        return int(self.core.getImageHeight()), int(self.core.getImageWidth())

    @property
    def fov_um(self) -> tuple[float, float]:
        """``(width, height)`` of the field of view in µm."""
        height, width = self.image_shape
        corners = self._offsets_um(np.array([[0.0, 0.0], [width, 0.0], [0.0, height]]))
        return (
            float(np.hypot(*(corners[1] - corners[0]))),
            float(np.hypot(*(corners[2] - corners[0]))),
        )

    def objectives(self, group: str = "Objective") -> dict[str, Objective]:
        """The presets of the objective config `group` that have a pixel size.

        Each maps to the device properties its preset sets and the pixel size
        of the pixel-size configuration those properties select (matched
        through state labels: a preset setting ``State`` selects a pixel size
        defined on ``Label``). Empty if the config has no such group.
        """
        core = self.core
        if group not in core.getAvailableConfigGroups():
            return {}

        def canonical(device: str, prop: str, value: Any) -> tuple[str, str, str]:
            if prop == "Label":
                try:
                    return (device, "State", str(core.getStateFromLabel(device, value)))
                except Exception:  # not a state device
                    pass
            return (device, prop, str(value))

        sizes = [
            (
                {canonical(*s) for s in core.getPixelSizeConfigData(cid)},
                float(core.getPixelSizeUmByID(cid)),
            )
            for cid in core.getAvailablePixelSizeConfigs()
        ]
        out = {}
        for preset in core.getAvailableConfigs(group):
            data = core.getConfigData(group, preset)
            props = tuple((d, p, str(v)) for d, p, v in data)
            have = {canonical(*s) for s in props}
            match = [ps for settings, ps in sizes if settings and settings <= have]
            if match:
                out[str(preset)] = Objective(props, match[0])
        return out

    def python_devices(self) -> dict[str, Any]:
        """The Python (unicore ``#py``) device objects of the config, by label.

        Empty on a plain `CMMCorePlus`. The runner asks them for run files
        (see `smartscope.runner.Runner.finish`).
        """
        core = self.core
        # unicore keeps its Python devices in a manager indexed by label
        # (``_get_py_device_instance`` is its loader: (module, class), not a
        # lookup by label)
        devices = getattr(core, "_pydevices", None)
        if devices is None:
            return {}
        out = {}
        for label in core.getLoadedDevices():
            try:
                if label in devices:
                    out[str(label)] = devices[label]
            except Exception:  # a device that cannot be asked is not one of ours
                continue
        return out

    def image_center_px(self) -> np.ndarray:
        """``(x, y)`` of the full frame's center in pixel-index coordinates.

        Pixels of an image taken with a camera ROI are offset by the ROI's
        ``(offset_x, offset_y)`` before they are mapped.
        """
        height, width = self.sensor_shape
        return np.array([(width - 1) / 2.0, (height - 1) / 2.0])

    def _offsets_um(
        self, d_px: np.ndarray, aff: np.ndarray | None = None
    ) -> np.ndarray:
        aff = self.affine if aff is None else aff
        return d_px @ aff[:, :2].T + aff[:, 2]

    def pixel_to_stage(
        self,
        px_xy: Sequence[float] | np.ndarray,
        stage_xy: Sequence[float],
        pixel_size_um: float | None = None,
    ) -> np.ndarray:
        """Stage µm of pixel positions in an image taken with the stage at `stage_xy`.

        Parameters
        ----------
        px_xy : array-like, shape ``(2,)`` or ``(N, 2)``
            Pixel ``(x, y)`` = ``(column, row)``; subpixel values allowed.
        stage_xy : (float, float)
            XY stage position (µm) at which the image was acquired.
        pixel_size_um : float, optional
            Pixel size the image was taken at, if not the current one (another
            objective): the current calibration is scaled to it.
        """
        px = np.asarray(px_xy, dtype=float)
        aff = self.affine  # read once: the objective may change meanwhile
        d_um = self._offsets_um(px.reshape(-1, 2) - self.image_center_px(), aff)
        if pixel_size_um is not None:
            now = math.sqrt(abs(np.linalg.det(aff[:, :2])))
            d_um = d_um * (float(pixel_size_um) / now)
        out = np.asarray(stage_xy, dtype=float) + d_um
        return out.reshape(px.shape)

    def stage_to_pixel(
        self, points_um: Sequence[float] | np.ndarray, stage_xy: Sequence[float]
    ) -> np.ndarray:
        """Pixel ``(x, y)`` at which stage points appear with the stage at `stage_xy`.

        The inverse of `pixel_to_stage`.
        """
        pts = np.asarray(points_um, dtype=float)
        aff = self.affine
        rel = pts.reshape(-1, 2) - np.asarray(stage_xy, dtype=float) - aff[:, 2]
        px = rel @ np.linalg.inv(aff[:, :2]).T + self.image_center_px()
        return px.reshape(pts.shape)

    # -------------------------------------------------------------------- runs
    def use_safe_engine(
        self,
        *,
        retries: int = 2,
        retry_backoff_s: float = 0.1,
        limits: SafetyLimits | None = None,
    ) -> SafeEngine:
        """Run events through a `SafeEngine` (retried, checked hardware calls).

        Registers it on the core and returns it; every later `run` uses it.
        """
        from smartscope.engine import SafeEngine

        engine = SafeEngine(
            self.core, retries=retries, retry_backoff_s=retry_backoff_s, limits=limits
        )
        self.core.mda.set_engine(engine)
        return engine

    def run(
        self, events: Iterable[MDAEvent], *, output: Any = None
    ) -> threading.Thread:
        """Start acquiring `events` on the core's MDA runner; return its thread.

        Hardware sequencing is turned off: adaptive runs must execute event by
        event, or the runner would merge events the scheduler may still change.
        An exception that ends the acquisition (a `DeviceFault`, an iterator
        that raised) is kept in `run_error` instead of escaping the thread.
        """
        if self.is_running():
            raise RuntimeError("an acquisition is already running")
        core = self.core
        engine = core.mda.engine
        if engine is not None and hasattr(engine, "use_hardware_sequencing"):
            engine.use_hardware_sequencing = False
        self.run_error = None

        def acquire() -> None:
            try:
                core.mda.run(events, output=output)
            except Exception as e:  # kept for the caller, never a thread traceback
                self.run_error = e

        self._thread = threading.Thread(target=acquire, name="smartscope-mda")
        self._thread.start()
        return self._thread

    def is_running(self) -> bool:
        """Whether an acquisition is in progress."""
        return self._core is not None and self.core.mda.is_running()

    def pause(self) -> None:
        """Pause the running acquisition (at the next event boundary)."""
        self.core.mda.set_paused(True)

    def resume(self) -> None:
        """Resume a paused acquisition."""
        self.core.mda.set_paused(False)

    def is_paused(self) -> bool:
        """Whether the running acquisition is paused."""
        return self.core.mda.is_paused()

    def cancel(self) -> None:
        """Cancel the running acquisition after the current event."""
        if self._core is not None:
            self.core.mda.cancel()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the acquisition thread; return True if it has finished."""
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # ---------------------------------------------------------------- shutdown
    def close(self) -> None:
        """Cancel any run, unload the devices and release the core.

        Safe to call more than once. Releasing the core before the process exits
        avoids Micro-Manager's abort at interpreter shutdown.
        """
        if self._core is None:
            return
        if self.is_running():
            self.cancel()
            self.wait(30)
        self._release_core()

    def _release_core(self) -> None:
        core, self._core = self._core, None
        if self._owns_core and core is not None:
            try:
                core.unloadAllDevices()
            except Exception:  # pragma: no cover - best effort at shutdown
                pass
            # MMCore delivers notifications on its own C++ thread, stopped only
            # when the callback is unregistered. pymmcore-plus does that in
            # ``__del__``, but a stored exception's traceback (a device fault)
            # can keep the core alive until interpreter shutdown; a
            # notification delivered then kills the thread inside MMCore's
            # catch-all and the process aborts ("FATAL: exception not
            # rethrown"). Unregister now, whoever still holds the core.
            import pymmcore

            try:
                pymmcore.CMMCore.registerCallback(core, None)
            except Exception:  # pragma: no cover - best effort at shutdown
                pass
        del core
        gc.collect()

    def __enter__(self) -> Microscope:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._core is None else str(self.config_path)
        return f"<Microscope {state}>"
