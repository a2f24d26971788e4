"""The run's OME-Zarr hierarchy: where each position's image and labels live.

One hierarchy per run, ``RUN_DIR/run.ome.zarr`` (OME-Zarr 0.5, zarr v3)::

    run.ome.zarr/
      zarr.json              bioformats2raw.layout 3 (positions), or an NGFF plate
      OME/zarr.json          positions: "series", the image paths in order
      OME/METADATA.ome.xml   positions: one OME Image per position, with its
                             stage position (what napari-ome-zarr lists)
      <key>/                 positions: one multiscale image per position key
        zarr.json            axes t, c, z, y, x; scale (µm per pixel of its
                             objective, the Z step, the time interval) and
                             translation (its stage position); omero channels
        0/                   the (t, c, z, y, x) array, one chunk per frame
        labels/zarr.json     the names of its label images
        labels/segmentation/ the live instance labels (``image-label``)
        labels/<name>/       labels a re-analysis added
      <row>/<col>/           plates: a well (``ome.well``: its fields)
        <field>/             plates: a field image, laid out as above

A plate run (a `useq.WellPlatePlan`) is written as an NGFF plate: the well of a
position key is its first token that names a well of the plate (``B3_0004``,
``hit_B3_002``, ``af_B3``) and the rest of the key is the field's path
(``0004``, ``hit002``, ``af``); base fields, hit and autofocus acquisitions are
the plate's acquisitions. Positions of a plate run with no well go under
``other/`` (outside the plate's metadata).

Every metadata file is replaced atomically and only lists images that exist,
so the hierarchy is valid at every moment of a run, after a crash too.
"""

from __future__ import annotations

import json
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

__all__ = [
    "HIERARCHY",
    "LABELS_NAME",
    "PARTIAL",
    "PARTIAL_DIR",
    "Hierarchy",
    "PlateGeometry",
    "array_names",
    "position_path",
]

#: The hierarchy's folder in a run directory.
HIERARCHY = "run.ome.zarr"
#: Name of the live labels of each image.
LABELS_NAME = "segmentation"
#: Where a resume moves partly imaged positions (outside the hierarchy), and
#: the infix of their names (``<key>.partial-<n>``).
PARTIAL_DIR = "partial"
PARTIAL = ".partial-"
OME_VERSION = "0.5"

_WELL = re.compile(r"^([A-Za-z]{1,2})0*(\d{1,3})$")
_NOT_ALNUM = re.compile(r"[^A-Za-z0-9]+")


@dataclass(frozen=True)
class PlateGeometry:
    """Row and column names of a plate (``A``..; ``1``..) and its name."""

    rows: tuple[str, ...]
    columns: tuple[str, ...]
    name: str = "plate"

    @classmethod
    def from_plan(cls, plan: Any) -> PlateGeometry | None:
        """The plate of a `useq.WellPlatePlan` (None for other position plans)."""
        import useq

        positions = getattr(plan, "stage_positions", None)
        if not isinstance(positions, useq.WellPlatePlan):
            return None
        plate = positions.plate
        rows = tuple(_row_name(i) for i in range(int(plate.rows)))
        cols = tuple(str(j + 1) for j in range(int(plate.columns)))
        return cls(rows, cols, str(plate.name or "plate"))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PlateGeometry:
        return cls(
            tuple(str(r["name"]) for r in data["rows"]),
            tuple(str(c["name"]) for c in data["columns"]),
            str(data.get("name") or "plate"),
        )

    def place(self, key: str) -> tuple[str, str, str] | None:
        """``(row, column, field)`` of a position key; None without a well."""
        tokens = key.split("_")
        for k, token in enumerate(tokens):
            m = _WELL.match(token)
            if m is None:
                continue
            row, col = m.group(1).upper(), str(int(m.group(2)))
            if row in self.rows and col in self.columns:
                rest = "".join(tokens[:k] + tokens[k + 1 :])
                return row, col, _NOT_ALNUM.sub("", rest) or "0"
        return None


def _row_name(i: int) -> str:
    name = ""
    i += 1
    while i:
        i, r = divmod(i - 1, 26)
        name = chr(65 + r) + name
    return name


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Replace a JSON file atomically (a crash leaves the old or the new one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def read_attrs(path: Path) -> dict[str, Any]:
    """The ``attributes`` of a zarr v3 group or array folder (empty if none)."""
    try:
        return json.loads((path / "zarr.json").read_text()).get("attributes") or {}
    except (OSError, ValueError):
        return {}


def _group(attrs: dict[str, Any]) -> dict[str, Any]:
    return {"zarr_format": 3, "node_type": "group", "attributes": attrs}


@dataclass
class _Acquisition:
    id: int
    name: str


@dataclass
class Hierarchy:
    """Paths and metadata of a run's ``run.ome.zarr`` (see the module doc).

    `add_image` is called once a position's image exists on disk, `add_labels`
    once one of its label images does; both update the metadata above them.
    Thread-safe (images are written on the writer thread, labels on the
    analysis thread).
    """

    root: Path
    plate: PlateGeometry | None = None
    _series: list[str] = field(default_factory=list)
    _images: dict[str, dict[str, Any]] = field(default_factory=dict)
    _wells: dict[tuple[str, str], list[dict[str, Any]]] = field(default_factory=dict)
    _acquisitions: dict[str, _Acquisition] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    # ------------------------------------------------------------- creating
    @classmethod
    def create(cls, run_dir: Path, plate: PlateGeometry | None) -> Hierarchy:
        """Start (or, resuming, reopen) the hierarchy of a run directory."""
        root = Path(run_dir) / HIERARCHY
        if (root / "zarr.json").is_file():
            return cls.open(run_dir)
        self = cls(root, plate)
        self._write_root()
        return self

    @classmethod
    def open(cls, run_dir: Path) -> Hierarchy:
        """The hierarchy of a run directory as it is on disk."""
        root = Path(run_dir) / HIERARCHY
        ome = read_attrs(root).get("ome") or {}
        if "plate" in ome:
            plate = PlateGeometry.from_json(ome["plate"])
            self = cls(root, plate)
            for acq in ome["plate"].get("acquisitions") or []:
                name = str(acq.get("name", acq["id"]))
                self._acquisitions[name] = _Acquisition(int(acq["id"]), name)
            for well in ome["plate"].get("wells") or []:
                row, col = str(well["path"]).split("/")
                images = (read_attrs(root / row / col).get("ome") or {}).get("well")
                self._wells[(row, col)] = list((images or {}).get("images") or [])
        else:
            self = cls(root, None)
            series = read_attrs(root / "OME").get("ome") or {}
            self._series = [str(s) for s in series.get("series") or []]
            for key in self._series:
                self._images[key] = _image_info(root / key)
        return self

    # ---------------------------------------------------------------- paths
    def path_of(self, key: str) -> str:
        """Path of a position's image in the hierarchy (relative to its root)."""
        if self.plate is None:
            return key
        place = self.plate.place(key)
        if place is None:
            return f"other/{key}"
        return "/".join(place)

    def image_dir(self, key: str) -> Path:
        return self.root / self.path_of(key)

    def labels_dir(self, key: str, name: str = LABELS_NAME) -> Path:
        return self.image_dir(key) / "labels" / name

    def keys(self) -> list[str]:
        """Position keys of the images the hierarchy lists, in order."""
        if self.plate is None:
            return list(self._series)
        out = []
        for (row, col), images in self._wells.items():
            for image in images:
                key = _image_key(self.root / row / col / str(image["path"]))
                out.append(key or f"{row}{col}_{image['path']}")
        other = self.root / "other"
        if other.is_dir():
            out += sorted(p.name for p in other.iterdir() if p.is_dir())
        return out

    def orphans(self) -> list[tuple[str, Path]]:
        """``(key, folder)`` of image folders on disk the metadata does not list.

        What a crash during an image's creation leaves (`add_image` lists an
        image only once it exists).
        """
        listed = {self.image_dir(k) for k in self.keys()}
        if self.plate is None:
            candidates = [
                p for p in self.root.iterdir() if p.is_dir() and p.name != "OME"
            ]
        else:
            candidates = [
                field
                for row in self.root.iterdir()
                if row.is_dir() and row.name in self.plate.rows
                for col in row.iterdir()
                if col.is_dir()
                for field in col.iterdir()
                if field.is_dir()
            ]
            other = self.root / "other"
            if other.is_dir():
                candidates += [p for p in other.iterdir() if p.is_dir()]
        out = []
        for folder in sorted(candidates):
            if folder in listed:
                continue
            key = _image_key(folder)
            if key is None:  # metadata never written: name it by its path
                key = "_".join(folder.relative_to(self.root).parts)
            out.append((key, folder))
        return out

    # ------------------------------------------------------------- metadata
    def add_image(self, key: str, *, kind: str = "base", stage_um: Any = None) -> None:
        """List a position's image (it exists on disk) in the metadata above it."""
        with self._lock:
            if self.plate is None:
                if key in self._series:
                    return
                self._series.append(key)
                self._images[key] = {"stage_um": stage_um}
                self._write_series()
                return
            place = self.plate.place(key)
            if place is None:
                return
            row, col, fld = place
            acq = self._acquisitions.get(kind)
            if acq is None:
                acq = self._acquisitions[kind] = _Acquisition(
                    len(self._acquisitions), kind
                )
            images = self._wells.setdefault((row, col), [])
            if any(i["path"] == fld for i in images):
                return
            images.append({"path": fld, "acquisition": acq.id})
            self._write_well(row, col)
            self._write_root()

    def remove_image(self, key: str) -> None:
        """Take a position's image out of the metadata (before it is moved)."""
        with self._lock:
            if self.plate is None:
                if key not in self._series:
                    return
                self._series.remove(key)
                self._images.pop(key, None)
                self._write_series()
                return
            place = self.plate.place(key)
            if place is None:
                return
            row, col, fld = place
            images = self._wells.get((row, col), [])
            images[:] = [i for i in images if i["path"] != fld]
            if images:
                self._write_well(row, col)
            else:
                del self._wells[(row, col)]
                self._write_root()
                (self.root / row / col / "zarr.json").unlink(missing_ok=True)

    def add_labels(self, key: str, name: str = LABELS_NAME) -> None:
        """List a label image of a position (it exists on disk) in its image."""
        with self._lock:
            folder = self.image_dir(key) / "labels"
            names = list((read_attrs(folder).get("ome") or {}).get("labels") or [])
            if name in names:
                return
            names.append(name)
            write_json(
                folder / "zarr.json",
                _group({"ome": {"version": OME_VERSION, "labels": names}}),
            )

    def remove_labels(self, key: str, name: str) -> None:
        """Delete a label image of a position and unlist it (re-analysis)."""
        import shutil

        with self._lock:
            folder = self.image_dir(key) / "labels"
            names = list((read_attrs(folder).get("ome") or {}).get("labels") or [])
            if name in names:
                names.remove(name)
                if names:
                    write_json(
                        folder / "zarr.json",
                        _group({"ome": {"version": OME_VERSION, "labels": names}}),
                    )
                else:
                    (folder / "zarr.json").unlink()
            shutil.rmtree(folder / name, ignore_errors=True)

    def _write_series(self) -> None:
        """``OME/zarr.json`` and the OME-XML: the images, in order (none: no file)."""
        if self._series:
            write_json(
                self.root / "OME" / "zarr.json",
                _group({"ome": {"version": OME_VERSION, "series": self._series}}),
            )
        else:
            (self.root / "OME" / "zarr.json").unlink(missing_ok=True)
        self._write_ome_xml()

    def _write_well(self, row: str, col: str) -> None:
        images = self._wells[(row, col)]
        write_json(
            self.root / row / col / "zarr.json",
            _group({"ome": {"version": OME_VERSION, "well": {"images": images}}}),
        )

    def _write_root(self) -> None:
        if self.plate is None:
            ome: dict[str, Any] = {"version": OME_VERSION, "bioformats2raw.layout": 3}
            write_json(self.root / "zarr.json", _group({"ome": ome}))
            return
        wells = sorted(self._wells)
        rows = list(self.plate.rows)
        cols = list(self.plate.columns)
        plate: dict[str, Any] = {
            "name": self.plate.name,
            "rows": [{"name": r} for r in rows],
            "columns": [{"name": c} for c in cols],
            "wells": [
                {
                    "path": f"{r}/{c}",
                    "rowIndex": rows.index(r),
                    "columnIndex": cols.index(c),
                }
                for r, c in wells
            ],
            "field_count": max((len(v) for v in self._wells.values()), default=0),
        }
        if self._acquisitions:
            plate["acquisitions"] = [
                {"id": a.id, "name": a.name}
                for a in sorted(self._acquisitions.values(), key=lambda a: a.id)
            ]
        if not plate["wells"]:
            plate.pop("field_count")
        write_json(
            self.root / "zarr.json",
            _group({"ome": {"version": OME_VERSION, "plate": plate}}),
        )

    def _write_ome_xml(self) -> None:
        """One OME Image per position (what napari-ome-zarr lists), atomically."""
        lines = [
            '<?xml version="1.0" encoding="UTF-8"?>',
            '<OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06" '
            'Creator="smartscope">',
        ]
        for k, key in enumerate(self._series):
            stage = self._images.get(key, {}).get("stage_um")
            image_id, name = quoteattr("Image:" + key), quoteattr(key)
            lines.append(f"  <Image ID={image_id} Name={name}>")
            lines.append(
                f'    <Pixels ID="Pixels:{k}" DimensionOrder="XYZCT" Type="uint16" '
                'SizeX="1" SizeY="1" SizeZ="1" SizeC="1" SizeT="1">'
            )
            lines.append("      <MetadataOnly/>")
            if stage is not None:
                x, y = (float(v) for v in stage[:2])
                lines.append(
                    f'      <Plane TheZ="0" TheC="0" TheT="0" PositionX="{x}" '
                    f'PositionXUnit="µm" PositionY="{y}" PositionYUnit="µm"/>'
                )
            lines.append("    </Pixels>")
            lines.append("  </Image>")
        lines.append("</OME>")
        path = self.root / "OME" / "METADATA.ome.xml"
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
        os.replace(tmp, path)


def _image_key(image_dir: Path) -> str | None:
    """The position key an image group was written for (its multiscales name)."""
    ome = read_attrs(image_dir).get("ome") or {}
    for ms in ome.get("multiscales") or []:
        if ms.get("name"):
            return str(ms["name"])
    return None


def _image_info(image_dir: Path) -> dict[str, Any]:
    ome = read_attrs(image_dir).get("ome") or {}
    for ms in ome.get("multiscales") or []:
        for t in ms.get("datasets", [{}])[0].get("coordinateTransformations", []):
            if t.get("type") == "translation":
                z_y_x = t["translation"][-3:]
                return {"stage_um": (z_y_x[2], z_y_x[1])}
    return {"stage_um": None}


def position_path(run_dir: str | Path, position: str, *, labels: bool = False) -> Path:
    """The folder of a position's image (or live labels) in a run directory.

    The run's ``run.ome.zarr`` (``<image>/labels/segmentation`` for labels);
    a position a resume moved aside lies in ``partial/``; runs written before
    the hierarchy keep ``images/<position>.ome.zarr`` (``labels/`` likewise).
    """
    run_dir = Path(run_dir)
    if (run_dir / HIERARCHY / "zarr.json").is_file():
        if PARTIAL in position:
            base = run_dir / PARTIAL_DIR / position
            return base / "labels" / LABELS_NAME if labels else base
        hierarchy = Hierarchy(run_dir / HIERARCHY, _plate_of(run_dir))
        if labels:
            return hierarchy.labels_dir(position)
        return hierarchy.image_dir(position)
    folder = "labels" if labels else "images"
    return run_dir / folder / f"{position}.ome.zarr"


def _plate_of(run_dir: Path) -> PlateGeometry | None:
    """The plate geometry of a run's hierarchy (None: positions), cached by mtime."""
    path = run_dir / HIERARCHY / "zarr.json"
    try:
        stamp = path.stat().st_mtime_ns
    except OSError:
        return None
    cached = _PLATES.get(path)
    if cached is None or cached[0] != stamp:
        ome = read_attrs(path.parent).get("ome") or {}
        plate = PlateGeometry.from_json(ome["plate"]) if "plate" in ome else None
        cached = _PLATES[path] = (stamp, plate)
    return cached[1]


_PLATES: dict[Path, tuple[int, PlateGeometry | None]] = {}


def array_names(run_dir: str | Path) -> set[str]:
    """Position keys with an image or labels on disk (moved-aside ones included)."""
    run_dir = Path(run_dir)
    names: set[str] = set()
    if (run_dir / HIERARCHY / "zarr.json").is_file():
        names.update(Hierarchy.open(run_dir).keys())
        partial = run_dir / PARTIAL_DIR
        if partial.is_dir():
            names.update(p.name for p in partial.iterdir() if p.is_dir())
    for folder in ("images", "labels"):  # runs written before the hierarchy
        for path in (run_dir / folder).glob("*.ome.zarr"):
            names.add(path.name.removesuffix(".ome.zarr"))
    return names
