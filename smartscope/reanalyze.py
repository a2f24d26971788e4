"""Re-segment a finished run with another model on dask.distributed.

``reanalyze(run_dir, model)`` reads every acquired frame back from the run's
images (all of them, also those the live loop never analysed), segments them
on the workers of a dask.distributed cluster (a `distributed.LocalCluster` by
default, an existing cluster when a scheduler address is given) and writes

* the new instance labels as another NGFF labels image of each position,
  ``run.ome.zarr/<position>/labels/<name>`` beside the live ``segmentation``
  (dims ``(t, c, z, y, x)`` in the order of the image), through the same
  ome-writers path (runs written before the hierarchy:
  ``labels-<name>/<position>/``);
* ``reanalysis-<name>.json``: per frame and overall, object counts of the live
  labels and the new ones, and how far they agree: F1 at IoU 0.5, mean IoU of
  the matched objects, whether the two label images are identical; model ids,
  wall time and the workers that did the work; the frames the segmenter
  failed on (empty labels) with their error, and ``status``
  (``completed`` or ``completed_with_errors``).

The client reads the images and sends each task its planes (a small stack of
one position's planes), so workers need not see the run directory; each worker
builds the segmenter once (cached by its spec and, for a model file, the file's
size and modification time) and runs torch on one thread. Workers in other
processes or on other machines (``dask scheduler`` / ``dask worker``) need
smartscope installed; a model file is sent by its absolute path and must be
readable at that path on the workers.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

from smartscope._errors import SmartscopeError, first_line
from smartscope.rundir import (
    HIERARCHY,
    Hierarchy,
    PositionArrays,
    load_run,
    position_path,
    read_position,
)
from smartscope.segment._registry import available_segmenters, model_spec
from smartscope.stream import zoom_factor

if TYPE_CHECKING:
    from smartscope.segment import PSegmenter

__all__ = [
    "ReanalysisError",
    "compare_labels",
    "parse_model",
    "reanalysis_name",
    "reanalyze",
]

#: what a --model value ending so is: a model file (else: a segmenter name)
MODEL_SUFFIXES = (".pt", ".ts", ".pth", ".onnx", ".zip", ".yaml")
DASK_HINT = 'reanalyze needs dask.distributed: pip install "smartscope[dask]"'
#: how long to try to reach a scheduler given by address, then for a first worker
CONNECT_TIMEOUT_S = 5.0
WORKER_TIMEOUT_S = 30.0
#: default longest wait for a segmenter's answer (as ``analysis.segment_timeout_s``)
SEGMENT_TIMEOUT_S = 120.0
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class ReanalysisError(SmartscopeError):
    """A run or model cannot be re-analysed (bad directory, model, name, dask)."""


# ------------------------------------------------------------------ model spec
def parse_model(model: str | dict[str, Any]) -> dict[str, Any]:
    """A ``--model`` value as a segmenter spec ``{"name": ..., <params>}``.

    Accepted: ``builtin`` (the built-in U-Net), a path to a model file (as
    ``smartscope segment --model`` takes it: ``.pt`` for the U-Net, ``.onnx``,
    a bioimage.io package, a Cellpose model; `model_spec`), a registered
    segmenter name (``unet``, ``threshold``, a plugin's) optionally with
    parameters, ``threshold:sigma_px=2,min_area_px=6``
    (values parsed as YAML), a user's segmenter class by import path
    (``package.module:ClassName``, parameters after a second ``:``), or a
    mapping as in an experiment file. Values may be YAML lists or mappings
    (``channels=[0,1]``).
    """
    if isinstance(model, dict):
        if not isinstance(model.get("name"), str):
            raise ReanalysisError(f"a model spec needs a 'name': {model!r}")
        return dict(model)
    text = str(model).strip()
    if not text:
        raise ReanalysisError("empty model spec")
    if text == "builtin":
        return {"name": "unet", "model": "builtin"}
    if "=" not in text and (
        "/" in text
        or "\\" in text
        or Path(text).suffix.lower() in MODEL_SUFFIXES
        or Path(text).exists()
    ):
        if Path(text).suffix.lower() in (".pt", ".ts"):
            return {"name": "unet", "model": text}
        return model_spec(text)  # .onnx, a bioimage.io package, a Cellpose file
    name, _, rest = text.partition(":")
    cls, colon, params = rest.partition(":")
    if cls.strip().isidentifier() and name.strip() not in available_segmenters():
        # an import path, 'package.module:ClassName'
        name, rest = f"{name.strip()}:{cls.strip()}", params if colon else ""
    spec: dict[str, Any] = {"name": name.strip()}
    # commas inside [...] or {...} belong to a value (fail_calls=[3,5])
    items = re.split(r",(?![^\[\]{}]*[\]}])", rest)
    for item in filter(None, (p.strip() for p in items)):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ReanalysisError(
                f"bad model parameter {item!r} in {text!r} (expected key=value)"
            )
        try:
            spec[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            spec[key.strip()] = value
    return spec


def reanalysis_name(spec: dict[str, Any], model_id: str | None = None) -> str:
    """Default output name of a segmenter spec.

    ``unet-builtin``; a model file's stem (a ``model.pt`` written by
    ``smartscope train`` is named after its folder); else the segmenter's
    `model_id` (``threshold-08b35c2d``: parameters included) or its name.
    """
    if spec["name"] == "unet":
        model = str(spec.get("model", "builtin"))
        if model == "builtin":
            return "unet-builtin"
        path = Path(model)
        stem = path.parent.name if path.stem == "model" and path.parent.name else ""
        return _safe_name(stem or path.stem)
    return _safe_name(model_id or spec["name"])


def _safe_name(text: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "model"
    return name


def _resolve_model_path(spec: dict[str, Any]) -> dict[str, Any]:
    """The spec with a model file that exists here as an absolute path.

    Workers in another process run in another working directory.
    """
    model = spec.get("model")
    if isinstance(model, str) and model != "builtin":
        path = Path(model).expanduser()
        if path.exists():
            return {**spec, "model": str(path.resolve())}
    return spec


def _spec_key(spec: dict[str, Any]) -> str:
    """A spec as the JSON key of the workers' segmenter cache.

    A model file's size and modification time are part of the key, so that a
    long-lived worker does not reuse a model whose file was replaced since.
    """
    key: dict[str, Any] = {"spec": spec}
    model = spec.get("model")
    if isinstance(model, str) and model != "builtin":
        try:
            st = Path(model).stat()
        except OSError:
            pass
        else:
            key["file"] = [st.st_size, st.st_mtime_ns]
    return json.dumps(key, sort_keys=True, default=str)


def _build(spec: dict[str, Any]) -> PSegmenter:
    """Build and warm up a segmenter (lazy imports are not thread-safe)."""
    from smartscope.segment import create_segmenter
    from smartscope.stream import warm_up

    params = {k: v for k, v in spec.items() if k != "name"}
    try:
        segmenter = create_segmenter(spec["name"], params)
    except SmartscopeError:
        raise
    except (ValueError, TypeError) as e:
        from pydantic import ValidationError

        from smartscope.experiment import format_validation_error

        why = (
            format_validation_error(e)
            if isinstance(e, ValidationError)
            else first_line(e)
        )
        raise ReanalysisError(
            f"invalid parameters for segmenter {spec['name']!r}: {why}"
        ) from None
    warm_up(segmenter, (64, 64))
    return segmenter


def _build_in_time(spec: dict[str, Any], timeout_s: float | None) -> PSegmenter:
    """`_build` on a thread of its own, given up after `timeout_s` (a hung model).

    The thread is left behind (a daemon: it does not keep the process alive).
    """
    box: dict[str, Any] = {}

    def build() -> None:
        try:
            box["segmenter"] = _build(spec)
        except BaseException as e:
            box["error"] = e

    thread = threading.Thread(target=build, name="smartscope-build", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise ReanalysisError(
            f"segmenter {spec['name']!r} did not segment a test frame within "
            f"{timeout_s:g} s"
        )
    error = box.get("error")
    if isinstance(error, SmartscopeError):
        raise error
    if error is not None:
        raise ReanalysisError(
            f"segmenter {spec['name']!r} failed on a test frame: "
            f"{type(error).__name__}: {first_line(error)}"
        ) from None
    return box["segmenter"]


# ------------------------------------------------------------ worker side
_SEGMENTERS: dict[str, Any] = {}
_SEGMENTERS_LOCK = threading.Lock()


def _worker_segmenter(key: str) -> Any:
    """The segmenter of a spec, built once per worker process (or reused)."""
    with _SEGMENTERS_LOCK:
        seg = _SEGMENTERS.get(key)
        if seg is None:
            seg = _SEGMENTERS[key] = _build(json.loads(key)["spec"])
            torch = sys.modules.get("torch")  # only torch segmenters import it
            if torch is not None:
                torch.set_num_threads(1)  # one thread per worker (process)
        return seg


def _segment_task(
    key: str, planes: np.ndarray, zoom: float | None = None
) -> tuple[np.ndarray | str, str, str]:
    """Segment a ``(B, Y, X)`` stack on a worker → labels, model id, worker.

    `zoom`: planes of another objective are segmented resampled to the run's
    pixel size, as the live analysis did (`smartscope.stream.zoom_factor`).
    A segmenter that fails (raises, or gives labels that do not fit) gives
    its error line instead of the labels: the task itself succeeds, so the
    worker does not log a traceback for a fault the JSON reports.
    """
    from distributed import get_worker

    from smartscope.segment._protocol import as_segmentation, instance_labels
    from smartscope.stream import segment_zoomed

    seg = _worker_segmenter(key)
    worker = get_worker().address
    try:
        if zoom:
            labels = np.stack([segment_zoomed(seg, plane, zoom)[0] for plane in planes])
        else:
            labels = np.asarray(as_segmentation(seg.segment(planes)).labels)
        if labels.shape != planes.shape:
            raise ValueError(
                f"segmenter returned labels of shape {labels.shape} for images of "
                f"shape {planes.shape}"
            )
        labels = np.stack([instance_labels(lab, lab.shape) for lab in labels])
    except Exception as e:
        return f"{type(e).__name__}: {first_line(e)}", seg.model_id, worker
    return labels, seg.model_id, worker


# ------------------------------------------------------------ comparison
def compare_labels(old: np.ndarray, new: np.ndarray) -> dict[str, Any]:
    """Agreement of two label images: counts, F1 at IoU 0.5, matched IoU.

    Objects match one to one when their IoU is above 0.5; ``mean_iou`` is the
    mean IoU of the matched pairs (None without any), ``f1@0.5`` is 1.0 when
    both images are empty.
    """
    from smartscope.segment._metrics import iou_matrix, match_counts

    iou = iou_matrix(old, new)
    tp, fp, fn = match_counts(iou, 0.5)
    matched = iou[iou > 0.5]
    denom = 2 * tp + fp + fn
    return {
        "n_old": int(iou.shape[0]),
        "n_new": int(iou.shape[1]),
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "f1@0.5": round(2 * tp / denom, 4) if denom else 1.0,
        "mean_iou": round(float(matched.mean()), 4) if matched.size else None,
        "iou_sum": float(matched.sum()),
        "identical": bool(np.array_equal(old, new)),
    }


# ------------------------------------------------------------ the run
@dataclass
class _Position:
    key: str
    order: str  # "cz" or "zc": axes of the stored array after t
    nc: int
    nz: int
    frames: list[dict[str, Any]] = field(default_factory=list)

    def plane_index(self, t: int, c: int, z: int) -> tuple[int, int, int]:
        return (t, c, z) if self.order == "cz" else (t, z, c)

    def linear(self, rec: dict[str, Any]) -> int:
        t, c, z = rec["t"], rec["c"], rec["z"]
        inner = c * self.nz + z if self.order == "cz" else z * self.nc + c
        return t * self.nc * self.nz + inner


def _load_run(directory: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    if not directory.is_dir():
        raise ReanalysisError(f"no run directory at {directory}")
    has_frames = (directory / "frames.jsonl").is_file()
    has_images = (directory / HIERARCHY).is_dir() or (directory / "images").is_dir()
    if not has_frames or not has_images:
        raise ReanalysisError(
            f"{directory} is not a run directory (no frames.jsonl or {HIERARCHY}/)"
        )
    run = load_run(directory)
    unreadable = [n for n in run.notes if n.startswith("run.json is unreadable")]
    if unreadable:
        raise ReanalysisError(f"{directory}/{unreadable[0]}")
    frames = [r for r in run.frames if isinstance(r.get("array"), dict)]
    if not frames:
        raise ReanalysisError(f"{directory} has no acquired frames")
    return run.info, frames


def _run_segmenter(directory: Path, info: dict[str, Any]) -> dict[str, Any]:
    spec = (info.get("experiment") or {}).get("segmenter")
    if not isinstance(spec, dict) and (directory / "experiment.yaml").is_file():
        try:
            exp = yaml.safe_load((directory / "experiment.yaml").read_text("utf-8"))
            spec = (exp or {}).get("segmenter")
        except (OSError, yaml.YAMLError):
            spec = None
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise ReanalysisError(
            f"{directory} records no segmenter (run.json, experiment.yaml): "
            "give a model"
        )
    return dict(spec)


def _axes_order(directory: Path, position: str) -> str:
    meta = position_path(directory, position) / "zarr.json"
    try:
        attrs = json.loads(meta.read_text(encoding="utf-8"))["attributes"]
        axes = [a["name"] for a in attrs["ome"]["multiscales"][0]["axes"]]
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return "cz"
    return "zc" if axes.index("z") < axes.index("c") else "cz"


def _positions(directory: Path, frames: list[dict[str, Any]]) -> list[_Position]:
    latest: dict[tuple[str, int, int, int], dict[str, Any]] = {}
    for rec in frames:  # a resumed run may list an index twice: the last counts
        a = rec["array"]
        try:
            where = (str(a["position"]), int(a["t"]), int(a["c"]), int(a["z"]))
        except (KeyError, TypeError, ValueError):
            continue
        latest[where] = {
            "frame_index": int(rec.get("frame_index", -1)),
            "position": where[0],
            "t": where[1],
            "c": where[2],
            "z": where[3],
            "kind": rec.get("kind"),
            "channel": rec.get("channel"),
            "pixel_size_um": rec.get("pixel_size_um"),
        }
    by_pos: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for rec in sorted(latest.values(), key=lambda r: r["frame_index"]):
        by_pos[rec["position"]].append(rec)
    out = []
    for key, recs in by_pos.items():
        pos = _Position(key, _axes_order(directory, key), 1, 1, recs)
        out.append(pos)
    return out


def _analysed_live(directory: Path) -> tuple[set[int], set[str]]:
    analysed, model_ids = set(), set()
    for r in load_run(directory).detections:
        if not r.get("dropped"):
            analysed.add(int(r["frame_index"]))
            if r.get("model_id"):
                model_ids.add(str(r["model_id"]))
    return analysed, model_ids


def _connect(scheduler: str | None, workers: int, processes: bool) -> tuple[Any, Any]:
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise ReanalysisError(DASK_HINT) from None
    if scheduler:
        try:
            client = Client(scheduler, timeout=f"{CONNECT_TIMEOUT_S:g}s")
        except Exception as e:
            why = (  # refused, timed out, a bad address; else garbage from a
                # server that is no dask scheduler (even a MemoryError)
                first_line(e)
                if isinstance(e, OSError | TimeoutError | ValueError)
                else f"no dask scheduler answers there ({type(e).__name__})"
            )
            raise ReanalysisError(
                f"cannot connect to the dask scheduler at {scheduler}: {why}"
            ) from None
        try:
            client.wait_for_workers(1, timeout=WORKER_TIMEOUT_S)
        except (OSError, TimeoutError):
            client.close()
            raise ReanalysisError(
                f"the dask scheduler at {scheduler} has no workers "
                f"(none joined within {WORKER_TIMEOUT_S:g} s)"
            ) from None
        return client, None
    cluster = LocalCluster(
        n_workers=workers,
        threads_per_worker=1,
        processes=processes,
        dashboard_address=None,
        silence_logs=40,  # logging.ERROR
    )
    try:
        return Client(cluster), cluster
    except BaseException:
        cluster.close()
        raise


def reanalyze(
    run_dir: str | Path,
    model: str | dict[str, Any] | None = None,
    *,
    name: str | None = None,
    scheduler: str | None = None,
    workers: int = 1,
    processes: bool = True,
    batch_size: int = 4,
    timeout_s: float | None = SEGMENT_TIMEOUT_S,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Re-segment every frame of a run on dask.distributed; write labels and JSON.

    Frames the segmenter fails on (it raises, or its labels do not fit) get
    empty labels and their error in the JSON (``"error"``; ``status``
    ``completed_with_errors``); the others are done. A segmenter that gives
    no answer within `timeout_s` (hung) fails the frames left, and its
    local workers are stopped.

    Parameters
    ----------
    run_dir : path
        A run directory (finished, interrupted or failed).
    model : str | dict, optional
        See `parse_model`. Default: the run's own segmenter (run.json, else
        experiment.yaml), so the new labels reproduce the live ones.
    name : str, optional
        Output name: ``labels-<name>/`` and ``reanalysis-<name>.json``
        (default: `reanalysis_name` of the model). Both are replaced if present.
    scheduler : str, optional
        Address of an existing dask scheduler (``tcp://host:8786``); default: a
        `distributed.LocalCluster`, closed at the end.
    workers : int
        Workers of the local cluster (one thread each).
    processes : bool
        Local workers as processes (True) or threads of this process.
    batch_size : int
        Planes of one position segmented per task.
    timeout_s : float, optional
        Longest wait for any task to finish (and for the segmenter to be
        built and segment a test frame here); None: no limit.
    progress : callable, optional
        Called with a line of text as positions finish.

    Returns
    -------
    dict
        What ``reanalysis-<name>.json`` holds (see the module docstring).

    Raises
    ------
    ReanalysisError
        Not a run directory, no segmenter recorded, bad name, dask missing or
        the scheduler unreachable; `RegistryError` / `ModelFileError` for an
        unknown segmenter or a bad model file.
    """
    t0 = time.perf_counter()
    directory = Path(run_dir)
    info, frames = _load_run(directory)
    spec = parse_model(model) if model is not None else _run_segmenter(directory, info)
    spec = _resolve_model_path(spec)
    if name is not None and (not _NAME.match(name) or len(name) > 100):
        raise ReanalysisError(
            f"bad reanalysis name {name!r} (letters, digits, '.', '_', '-')"
        )
    if workers < 1 or batch_size < 1:
        raise ReanalysisError("workers and batch_size must be at least 1")
    try:
        import distributed  # noqa: F401
    except ImportError:
        raise ReanalysisError(DASK_HINT) from None

    key = _spec_key(spec)
    # bad model → one clear error before any cluster
    segmenter = _build_in_time(spec, timeout_s)
    model_id = segmenter.model_id
    name = name or reanalysis_name(spec, model_id)
    positions = _positions(directory, frames)
    analysed, live_ids = _analysed_live(directory)
    live_model_id = info.get("model_id") or (
        next(iter(live_ids)) if len(live_ids) == 1 else None
    )
    pixel_size_um = float(info.get("pixel_size_um") or 1.0)
    torch = sys.modules.get("torch")
    torch_threads = torch.get_num_threads() if torch is not None else None

    if scheduler is None and not processes:
        with _SEGMENTERS_LOCK:  # in-process workers reuse the model built here
            _SEGMENTERS[key] = segmenter
    client, cluster = _connect(scheduler, workers, processes)
    try:
        writer = _labels_writer(directory, name, pixel_size_um)
        try:
            records, used, worker_ids = _run_tasks(
                client,
                key,
                directory,
                positions,
                analysed,
                writer,
                batch_size=batch_size,
                timeout_s=timeout_s,
                progress=progress,
            )
        finally:
            writer.close()
        nthreads = client.nthreads()
        address = scheduler or "local"
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
        with _SEGMENTERS_LOCK:
            _SEGMENTERS.pop(key, None)
        torch = sys.modules.get("torch")
        if torch is not None and torch_threads is not None:
            torch.set_num_threads(torch_threads)

    failures = Counter(r["error"] for r in records if "error" in r)
    result = {
        "run_dir": str(directory),
        "status": "completed_with_errors" if failures else "completed",
        "errors": [{"error": e, "frames": n} for e, n in failures.most_common()],
        "name": name,
        "labels": _labels_place(directory, name),
        "model": {
            "spec": spec,
            "model_id": model_id,
            "worker_model_ids": sorted(worker_ids),
        },
        "live_model_id": live_model_id,
        "same_model": live_model_id == model_id,
        "overall": _overall(records),
        "frames": [{k: v for k, v in r.items() if k != "iou_sum"} for r in records],
        "wall_time_s": round(time.perf_counter() - t0, 3),
        "cluster": {
            "scheduler": address,
            "n_workers": len(nthreads),
            "n_threads": int(sum(nthreads.values())),
            "processes": None if scheduler else processes,
            "workers_used": sorted(used),
        },
    }
    path = directory / f"reanalysis-{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)
    result["path"] = str(path)
    return result


def _chunks(
    positions: list[_Position], batch_size: int, directory: Path
) -> Iterator[tuple[_Position, list[dict[str, Any]], np.ndarray, bool]]:
    """(position, frames, planes, last chunk of the position), one read each."""
    for pos in positions:
        try:
            images = read_position(directory, pos.key)
        except FileNotFoundError:  # listed, but its array was never created
            continue
        pos.nc, pos.nz = (
            (images.shape[1], images.shape[2])
            if pos.order == "cz"
            else (images.shape[2], images.shape[1])
        )
        recs = [r for r in pos.frames if _inside(images.shape, pos, r)]
        recs.sort(key=pos.linear)
        pos.frames = recs
        for i in range(0, len(recs), batch_size):
            chunk = recs[i : i + batch_size]
            planes = np.stack(
                [images[pos.plane_index(r["t"], r["c"], r["z"])] for r in chunk]
            )
            yield pos, chunk, planes, i + batch_size >= len(recs)
        del images


def _labels_writer(directory: Path, name: str, pixel_size_um: float) -> PositionArrays:
    """Where the new labels go: each image's labels (a re-run replaces them)."""
    if (directory / HIERARCHY / "zarr.json").is_file():
        hierarchy = Hierarchy.open(directory)
        for key in hierarchy.keys():
            hierarchy.remove_labels(key, name)
    else:  # a run written before the hierarchy: labels-<name>/<position>/
        root = directory / f"labels-{name}"
        if root.exists():
            shutil.rmtree(root)
        hierarchy = Hierarchy(root)
    return PositionArrays(hierarchy, labels=name, pixel_size_um=pixel_size_um)


def _labels_place(directory: Path, name: str) -> str:
    """Where `reanalyze` wrote the labels named `name`, for people."""
    if (directory / HIERARCHY / "zarr.json").is_file():
        return f"{HIERARCHY}/<position>/labels/{name}"
    return f"labels-{name}/<position>/labels/{name}"


def _inside(shape: tuple[int, ...], pos: _Position, rec: dict[str, Any]) -> bool:
    idx = pos.plane_index(rec["t"], rec["c"], rec["z"])
    return all(0 <= i < n for i, n in zip(idx, shape[:3], strict=True))


def _run_tasks(
    client: Any,
    key: str,
    directory: Path,
    positions: list[_Position],
    analysed: set[int],
    writer: PositionArrays,
    *,
    batch_size: int,
    timeout_s: float | None,
    progress: Callable[[str], None] | None,
) -> tuple[list[dict[str, Any]], set[str], set[str]]:
    """Segment every chunk on the cluster; write each position when it is done.

    A task that fails (the segmenter raised, or gave labels that do not fit)
    fails its frames only: they are listed with the error and get empty
    labels. When no task finishes within `timeout_s` (a hung segmenter), the
    tasks are cancelled and every frame not yet segmented fails so.
    """
    from distributed import wait

    window = max(2, 2 * sum(client.nthreads().values()))
    results: dict[str, dict[int, np.ndarray]] = defaultdict(dict)
    errors: dict[str, dict[int, str]] = defaultdict(dict)
    left: dict[str, int] = defaultdict(int)
    submitted_all: set[str] = set()
    finished: set[str] = set()
    by_key = {p.key: p for p in positions}
    records: list[dict[str, Any]] = []
    used: set[str] = set()
    model_ids: set[str] = set()
    futures: dict[Any, tuple[_Position, list[dict[str, Any]]]] = {}
    chunks = _chunks(positions, batch_size, directory)

    def submit_next() -> bool:
        item = next(chunks, None)
        if item is None:
            return False
        pos, chunk, planes, last = item
        data = client.scatter(planes, hash=False)
        zoom = zoom_factor(chunk[0]["pixel_size_um"], writer.pixel_size_um)
        fut = client.submit(_segment_task, key, data, zoom, pure=False)
        futures[fut] = (pos, chunk)
        left[pos.key] += 1
        if last:
            submitted_all.add(pos.key)
        return True

    def finish(pos: _Position) -> None:
        records.extend(
            _finish_position(
                directory,
                pos,
                results.pop(pos.key, {}),
                errors.pop(pos.key, {}),
                analysed,
                writer,
            )
        )
        finished.add(pos.key)
        if progress is not None:
            progress(f"{pos.key}: {len(pos.frames)} frame(s)")

    while len(futures) < window and submit_next():
        pass
    while futures:
        try:
            done, _ = wait(
                list(futures), timeout=timeout_s, return_when="FIRST_COMPLETED"
            )
        except TimeoutError:  # a hung segmenter: what is left fails
            done = set()
        if not done:
            client.cancel(list(futures))
            futures.clear()
            why = f"segmenter did not answer within {timeout_s:g} s"
            for pos in positions:
                if pos.key not in finished:
                    for rec in pos.frames:
                        linear = pos.linear(rec)
                        if linear not in results[pos.key]:
                            errors[pos.key].setdefault(linear, why)
                    finish(pos)
            break
        for fut in done:
            pos, chunk = futures.pop(fut)
            try:
                labels, mid, worker = fut.result()
            except Exception as e:  # the worker died, the segmenter did not build
                labels = f"{type(e).__name__}: {first_line(e)}"
            else:
                model_ids.add(mid)
                used.add(worker)
            if isinstance(labels, str):
                for rec in chunk:
                    errors[pos.key][pos.linear(rec)] = labels
            else:
                for rec, plane in zip(chunk, labels, strict=True):
                    results[pos.key][pos.linear(rec)] = plane
            left[pos.key] -= 1
            if left[pos.key] == 0 and pos.key in submitted_all:
                finish(by_key[pos.key])
        while len(futures) < window and submit_next():
            pass
    records.sort(key=lambda r: r["frame_index"])
    return records, used, model_ids


def _finish_position(
    directory: Path,
    pos: _Position,
    planes: dict[int, np.ndarray],
    errors: dict[int, str],
    analysed: set[int],
    writer: PositionArrays,
) -> list[dict[str, Any]]:
    """Write a position's new labels in order; one comparison row per frame.

    A frame the segmenter failed on gets empty labels and its error.
    """
    try:
        old = read_position(directory, pos.key, labels=True)
    except FileNotFoundError:
        old = None
    shape = {"c": pos.nc, "z": pos.nz, "order": pos.order}
    empty: np.ndarray | None = None
    out = []
    for rec in pos.frames:  # linear order: what PositionArrays needs
        error = errors.get(pos.linear(rec))
        if error is None:
            new = planes[pos.linear(rec)]
        else:
            if empty is None:
                size = read_position(directory, pos.key).shape[-2:]
                empty = np.zeros(size, np.uint16)
            new = empty
        writer.write(
            new,
            {
                "position": pos.key,
                "shape": shape,
                "visit": rec["t"],
                "c": rec["c"],
                "z": rec["z"],
                "pixel_size_um": rec["pixel_size_um"],
            },
        )
        row: dict[str, Any] = {
            "frame_index": rec["frame_index"],
            "position": pos.key,
            "array": {"t": rec["t"], "c": rec["c"], "z": rec["z"]},
            "kind": rec["kind"],
            "channel": rec["channel"],
            "analysed_live": rec["frame_index"] in analysed,
        }
        idx = pos.plane_index(rec["t"], rec["c"], rec["z"])
        if error is not None:
            row.update(
                {
                    "n_old": None,
                    "n_new": None,
                    "f1@0.5": None,
                    "mean_iou": None,
                    "identical": None,
                    "error": error,
                }
            )
        elif row["analysed_live"] and old is not None and _fits(old.shape, idx):
            row.update(compare_labels(old[idx], new))
        else:
            row.update(
                {
                    "n_old": None,
                    "n_new": len(np.unique(new[new > 0])),
                    "f1@0.5": None,
                    "mean_iou": None,
                    "identical": None,
                }
            )
        out.append(row)
    return out


def _fits(shape: tuple[int, ...], idx: tuple[int, int, int]) -> bool:
    return all(i < n for i, n in zip(idx, shape[:3], strict=True))


def _overall(records: list[dict[str, Any]]) -> dict[str, Any]:
    compared = [r for r in records if r["identical"] is not None]
    tp = sum(r["tp"] for r in compared)
    fp = sum(r["fp"] for r in compared)
    fn = sum(r["fn"] for r in compared)
    denom = 2 * tp + fp + fn
    failed = [r for r in records if "error" in r]
    return {
        "n_frames": len(records),
        "n_compared": len(compared),
        "n_new_only": len(records) - len(compared) - len(failed),
        "n_failed": len(failed),
        "objects_old": sum(r["n_old"] for r in compared),
        "objects_new_compared": sum(r["n_new"] for r in compared),
        "objects_new": sum(r["n_new"] for r in records if "error" not in r),
        "f1@0.5": round(2 * tp / denom, 4) if denom else (1.0 if compared else None),
        "mean_iou": round(sum(r["iou_sum"] for r in compared) / tp, 4) if tp else None,
        "identical_fraction": (
            round(sum(r["identical"] for r in compared) / len(compared), 4)
            if compared
            else None
        ),
    }
