"""Model files: the shipped weights, their card and hash, user models.

A smartscope model file (``.pt``) is a ``torch.save`` dict with
``format: "smartscope-model"``, the architecture, the weights and the
training metadata; it loads with ``weights_only=True`` (no code runs). The
built-in model lives in ``smartscope/segment/models/``: ``builtin.pt``, its
TorchScript export ``builtin.ts``, and ``builtin.json`` (the model card's
data: sha256 of both files, metrics, recipe). Loading the built-in model
checks the hash; any file that is not a model gives a one-line error.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smartscope._errors import SmartscopeError, first_line

FORMAT = "smartscope-model"
FORMAT_VERSION = 1
MODELS_DIR = Path(__file__).parent / "models"
BUILTIN = MODELS_DIR / "builtin.pt"
BUILTIN_TS = MODELS_DIR / "builtin.ts"
BUILTIN_CARD = MODELS_DIR / "builtin.json"


class ModelFileError(SmartscopeError):
    """A model file is missing, corrupt, or not a smartscope model."""


@dataclass
class ModelFile:
    """A loaded model file: weights plus metadata."""

    path: Path
    sha256: str
    meta: dict[str, Any]
    state_dict: dict[str, Any]

    @property
    def model_id(self) -> str:
        """``<name>-<first 12 hex of the file's sha256>``."""
        return f"{self.meta.get('name', self.path.stem)}-{self.sha256[:12]}"


def sha256_of(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_model_file(path: str | Path, state_dict: dict, meta: dict[str, Any]) -> str:
    """Write a model file; returns its sha256."""
    import torch

    path = Path(path)
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "meta": json.loads(json.dumps(meta)),  # plain JSON types only
        "state_dict": {k: v.detach().cpu().clone() for k, v in state_dict.items()},
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return sha256_of(path)


def builtin_card() -> dict[str, Any]:
    """The shipped model's card data (``builtin.json``)."""
    try:
        return json.loads(BUILTIN_CARD.read_text())
    except FileNotFoundError:
        raise ModelFileError(
            f"the built-in model card is missing ({BUILTIN_CARD}); reinstall smartscope"
        ) from None
    except json.JSONDecodeError as exc:
        raise ModelFileError(f"the built-in model card is corrupt: {exc}") from None


def resolve_model(model: str | Path) -> tuple[Path, str | None]:
    """``builtin`` or a path → (file, expected sha256 or None)."""
    if str(model) == "builtin":
        card = builtin_card()
        return BUILTIN, card["files"]["builtin.pt"]["sha256"]
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelFileError(f"model file not found: {path}")
    if path.is_dir():
        raise ModelFileError(f"model path is a folder, expected a .pt file: {path}")
    expected = None
    sidecar = path.with_suffix(".json")
    if sidecar.exists():
        try:
            files = json.loads(sidecar.read_text()).get("files", {})
            expected = files.get(path.name, {}).get("sha256")
        except (json.JSONDecodeError, AttributeError):
            expected = None
    return path, expected


def load_model_file(model: str | Path) -> ModelFile:
    """Load ``builtin`` or a model file path, checking hash and format.

    Raises
    ------
    ModelFileError
        Missing file, sha256 mismatch with the card, unreadable or foreign file.
    """
    import torch

    path, expected = resolve_model(model)
    if not path.exists():
        raise ModelFileError(f"model file not found: {path}")
    digest = sha256_of(path)
    if expected is not None and digest != expected:
        raise ModelFileError(
            f"model file {path.name} is corrupt or was changed: sha256 {digest[:12]}… "
            f"does not match its card ({expected[:12]}…)"
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        # any bytes can reach the unpickler: a text file raises IndexError
        # inside torch.load, other files other errors; all mean one thing here
        msg = first_line(exc)
        if "weights_only" in str(exc):
            msg = "not a weights-only PyTorch file"
        elif not isinstance(exc, (RuntimeError, OSError, EOFError, ValueError)):
            msg = f"not a PyTorch file ({type(exc).__name__}: {msg})"
        raise ModelFileError(f"cannot read model file {path}: {msg}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ModelFileError(
            f"{path} is not a smartscope model file (train one with `smartscope train`)"
        )
    if payload.get("format_version", 0) > FORMAT_VERSION:
        raise ModelFileError(
            f"{path} needs a newer smartscope (model format "
            f"{payload.get('format_version')})"
        )
    return ModelFile(path, digest, payload["meta"], payload["state_dict"])
