"""Training the built-in network on synthetic data and/or user TIFF pairs.

Deterministic for a seed on a given machine: the scene pool, the camera
draws, the crops and the initial weights all come from seeded generators,
and the step order is fixed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from smartscope._errors import SmartscopeError
from smartscope.segment._io import read_image, read_labels
from smartscope.segment._postprocess import boundary_classes, normalize
from smartscope.segment._synth import (
    NUCLEUS_EDGE_FRACTION,
    apply_camera,
    render_scene,
)

CLASS_WEIGHTS = (1.0, 1.0, 2.5)  # background, interior, boundary


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved in the checkpoint)."""

    steps: int = 6000
    batch_size: int = 8
    crop: int = 256
    lr: float = 3e-3
    weight_decay: float = 1e-4
    seed: int = 0
    pool_size: int = 800
    refresh_per_step: int = 1
    synthetic_fraction: float = 1.0
    max_radius: float = 36.0
    #: share of nuclei scenes drawn in the "widefield" style (see render_scene)
    widefield_fraction: float = 0.6
    #: extra loss weight on pixels where two objects touch (x class weight)
    contact_weight: float = 4.0
    #: touching objects' pixels within this many px of each other are boundary
    #: (2 was tried: interior seeds got too small, worse on real and synthetic)
    contact_width: int = 1
    #: share of crops whose normalised intensities are raised to a random
    #: power (log-uniform in `gamma_range`): profiles softer (< 1) or harder
    #: (> 1) than the renderer's, as real nuclei's are (see the model card)
    gamma_fraction: float = 0.0
    gamma_range: tuple[float, float] = (0.55, 1.3)
    #: synthetic nuclei are labelled to where the blurred image stands this
    #: fraction of the way from their surroundings to their interior (None:
    #: their full extent before the blur, as every stage before 2026-12-05)
    nucleus_edge_fraction: float | None = NUCLEUS_EDGE_FRACTION
    widths: tuple[int, ...] = (8, 16, 32, 64, 128)
    depth: int = 2
    bf16: bool = True
    threads: int | None = None
    checkpoint_every: int = 250
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainProgress:
    """What a progress callback receives after every step."""

    step: int
    steps: int
    loss: float
    lr: float
    elapsed_s: float


def read_pairs(folder: str | Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """Image/label pairs from `folder`.

    Either ``images/NAME.tif`` with ``labels/NAME.tif``, or ``NAME.tif`` with
    ``NAME_labels.tif`` (or ``NAME_masks.tif``) side by side, or the Data
    Science Bowl 2018 layout: a folder per image, ``ID/images/ID.png`` (one
    image file) with ``ID/masks/`` holding one mask per object
    (`read_labels`). Stacks are split into their 2D planes (RGB images
    averaged to grey). An unreadable file or a label image that is none (RGB,
    fractional, negative) is a one-line `SmartscopeError`.
    """
    root = Path(folder)
    if not root.is_dir():
        raise SmartscopeError(f"training data folder not found: {root}")
    pairs: list[tuple[Path, Path]] = []
    samples = [d for d in sorted(root.iterdir()) if (d / "masks").is_dir()]
    if (root / "masks").is_dir():  # one such folder itself
        samples = [root]
    if samples:  # the DSB-2018 layout
        for d in samples:
            found = [f for f in sorted((d / "images").glob("*")) if f.is_file()]
            if len(found) != 1:
                raise SmartscopeError(
                    f"{d.name}/images holds {len(found)} files (one image beside "
                    f"{d.name}/masks)"
                )
            pairs.append((found[0], d / "masks"))
    elif (root / "images").is_dir() and (root / "labels").is_dir():
        for img in sorted((root / "images").glob("*.tif*")):
            lab = root / "labels" / img.name
            if lab.exists():
                pairs.append((img, lab))
    else:
        for img in sorted(root.glob("*.tif*")):
            stem = img.name.split(".")[0]
            if stem.endswith(("_labels", "_masks")):
                continue
            for suffix in ("_labels", "_masks"):
                lab = img.with_name(stem + suffix + img.name[len(stem) :])
                if lab.exists():
                    pairs.append((img, lab))
                    break
    if not pairs:
        raise SmartscopeError(
            f"no image/label pairs in {root} (expected images/NAME.tif + "
            "labels/NAME.tif, NAME.tif + NAME_labels.tif, or ID/images/ID.png + "
            "ID/masks/*.png)"
        )
    out: list[tuple[np.ndarray, np.ndarray]] = []
    for img_path, lab_path in pairs:
        image = read_image(img_path)
        where = f"{lab_path.parent.name}/" if lab_path.is_dir() else ""
        truth = read_labels(lab_path, f"labels {where}{lab_path.name}")
        if image.shape != truth.shape:
            raise SmartscopeError(
                f"{img_path.name}: image shape {image.shape} != labels shape "
                f"{truth.shape}"
            )
        img2 = image.reshape(-1, *image.shape[-2:])
        lab2 = truth.reshape(-1, *truth.shape[-2:])
        out.extend(zip(img2, lab2, strict=False))
    return out


class _Data:
    """Batches of (normalised image, 3-class target) crops."""

    def __init__(
        self, cfg: TrainConfig, user: list[tuple[np.ndarray, np.ndarray]] | None
    ) -> None:
        self.cfg = cfg
        self.rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 1]))
        self.user = user or []
        n_pool = cfg.pool_size if cfg.synthetic_fraction > 0 or not self.user else 0
        self.pool = [self._scene() for _ in range(n_pool)]

    def _scene(self):
        wide = self.rng.random() < self.cfg.widefield_fraction
        style = "widefield" if wide else "classic"
        return render_scene(
            self.rng,
            (self.cfg.crop, self.cfg.crop),
            max_radius=self.cfg.max_radius,
            style=style,
            edge_fraction=self.cfg.nucleus_edge_fraction,
        )

    def refresh(self) -> None:
        for _ in range(self.cfg.refresh_per_step if self.pool else 0):
            self.pool[int(self.rng.integers(len(self.pool)))] = self._scene()

    def _augment(self, img: np.ndarray, lab: np.ndarray):
        k = int(self.rng.integers(4))
        img, lab = np.rot90(img, k), np.rot90(lab, k)
        if self.rng.random() < 0.5:
            img, lab = img[:, ::-1], lab[:, ::-1]
        return img, lab

    def _gamma(self, x: np.ndarray) -> np.ndarray:
        """`x` (normalised) to a random power, for `gamma_fraction` of crops."""
        if self.cfg.gamma_fraction <= 0 or self.rng.random() >= self.cfg.gamma_fraction:
            return x
        lo, hi = np.log(self.cfg.gamma_range[0]), np.log(self.cfg.gamma_range[1])
        return np.clip(x, 0, None) ** np.float32(np.exp(self.rng.uniform(lo, hi)))

    def _user_crop(self, img: np.ndarray, lab: np.ndarray):
        c = self.cfg.crop
        pad_y, pad_x = max(0, c - img.shape[0]), max(0, c - img.shape[1])
        if pad_y or pad_x:
            img = np.pad(img, ((0, pad_y), (0, pad_x)), mode="reflect")
            lab = np.pad(lab, ((0, pad_y), (0, pad_x)))
        y = int(self.rng.integers(img.shape[0] - c + 1))
        x = int(self.rng.integers(img.shape[1] - c + 1))
        return img[y : y + c, x : x + c], lab[y : y + c, x : x + c]

    def batch(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Images ``(B, 1, Y, X)``, classes ``(B, Y, X)``, contact masks."""
        xs, ys, cs = [], [], []
        for _ in range(self.cfg.batch_size):
            use_user = bool(self.user) and (
                not self.pool or self.rng.random() >= self.cfg.synthetic_fraction
            )
            if use_user:
                img, lab = self.user[int(self.rng.integers(len(self.user)))]
                img, lab = self._user_crop(img, lab)
                img = img.astype(np.float32)
            else:
                scene = self.pool[int(self.rng.integers(len(self.pool)))]
                img = apply_camera(self.rng, scene.image)
                lab = scene.labels
            img, lab = self._augment(img, lab)
            xs.append(self._gamma(normalize(np.ascontiguousarray(img))))
            lab = np.ascontiguousarray(lab)
            ys.append(boundary_classes(lab, self.cfg.contact_width))
            cs.append(contact_mask(lab))
        return np.stack(xs)[:, None], np.stack(ys).astype(np.int64), np.stack(cs)


def contact_mask(labels: np.ndarray) -> np.ndarray:
    """Pixels whose 3x3 neighbourhood holds two different objects (bool).

    The few pixels that separate touching nuclei: the boundary on both sides
    of a contact and any background gap of one pixel between two objects.
    They decide whether touching nuclei come out merged, so the loss weights
    them up (`TrainConfig.contact_weight`).
    """
    from scipy import ndimage as ndi

    lab = np.asarray(labels).astype(np.int32)
    big = np.iinfo(np.int32).max
    hi = ndi.maximum_filter(lab, 3)
    lo = ndi.minimum_filter(np.where(lab > 0, lab, big), 3)
    return (lo < big) & (hi != lo)


def train(
    cfg: TrainConfig,
    out_dir: str | Path,
    user_data: str | Path | None = None,
    init: str | Path | None = None,
    progress: Callable[[TrainProgress], None] | None = None,
    resume: bool = True,
) -> Path:
    """Train and write ``model.pt`` (plus ``checkpoint.pt``) into `out_dir`.

    Parameters
    ----------
    cfg : TrainConfig
        Steps, batch, learning rate, seed, data mix, network size.
    out_dir : path
        Receives ``checkpoint.pt`` every ``cfg.checkpoint_every`` steps (a
        rerun with the same folder continues from it) and ``model.pt`` at the
        end.
    user_data : path, optional
        A folder of image/label TIFF pairs (see `read_pairs`).
    init : path or "builtin", optional
        Start from these weights (fine-tuning) instead of a random init.
    """
    import torch

    from smartscope.segment._dl import cpu_has_bf16
    from smartscope.segment._model import load_model_file, save_model_file
    from smartscope.segment._net import SmartUNet

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    user = read_pairs(user_data) if user_data else None
    if user is not None and user_data and cfg.synthetic_fraction >= 1.0:
        cfg.synthetic_fraction = 0.25
    net = SmartUNet(tuple(cfg.widths), cfg.depth)
    if init is not None:
        loaded = load_model_file(init)
        net = SmartUNet(
            tuple(loaded.meta["arch"]["widths"]), loaded.meta["arch"]["depth"]
        )
        net.load_state_dict(loaded.state_dict)
        cfg.widths, cfg.depth = tuple(net.widths), net.depth
        cfg.extra["init_training"] = loaded.meta.get("training")
    net = net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = min(200, cfg.steps // 10)

    def lr_at(step: int) -> float:
        if step < warmup:
            return cfg.lr * (step + 1) / warmup
        t = (step - warmup) / max(1, cfg.steps - warmup)
        return cfg.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * t)))

    data = _Data(cfg, user)
    start = 0
    ckpt = out / "checkpoint.pt"
    if resume and ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
        data.rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        start = state["step"]
    weights = torch.tensor(CLASS_WEIGHTS)
    use_bf16 = bool(cfg.bf16) and cpu_has_bf16()
    net.train()
    t0 = time.perf_counter()
    ema = None
    for step in range(start, cfg.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        x, y, contact = data.batch()
        xt = torch.from_numpy(x).contiguous(memory_format=torch.channels_last)
        yt = torch.from_numpy(y)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
            logits = net(xt)
        logits = logits.float()
        # class-weighted cross-entropy, contact pixels weighted up on top
        pixel_w = weights[yt] * (1 + cfg.contact_weight * torch.from_numpy(contact))
        ce = torch.nn.functional.cross_entropy(logits, yt, reduction="none")
        loss = (ce * pixel_w).sum() / pixel_w.sum()
        # soft Dice on the foreground keeps small objects from being ignored
        prob_fg = 1 - torch.softmax(logits, 1)[:, 0]
        tgt_fg = (yt > 0).float()
        inter = (prob_fg * tgt_fg).sum((1, 2))
        dice = 1 - (2 * inter + 1) / (prob_fg.sum((1, 2)) + tgt_fg.sum((1, 2)) + 1)
        loss = loss + 0.5 * dice.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
        opt.step()
        data.refresh()
        value = float(loss.detach())
        ema = value if ema is None else 0.98 * ema + 0.02 * value
        if progress is not None:
            progress(
                TrainProgress(
                    step + 1, cfg.steps, ema, lr_at(step), time.perf_counter() - t0
                )
            )
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            tmp = ckpt.with_suffix(".tmp")
            torch.save(
                {
                    "model": net.state_dict(),
                    "optim": opt.state_dict(),
                    "rng": data.rng.bit_generator.state,
                    "torch_rng": torch.get_rng_state(),
                    "step": step + 1,
                    "config": asdict(cfg),
                },
                tmp,
            )
            tmp.replace(ckpt)
    _recalibrate_batchnorm(net, data, use_bf16)
    net.eval()
    meta = {
        "arch": {"name": "SmartUNet", "widths": list(net.widths), "depth": net.depth},
        "training": {
            **asdict(cfg),
            "widths": list(cfg.widths),
            "user_data": str(user_data) if user_data else None,
            "init": str(init) if init else None,
            "seconds": round(time.perf_counter() - t0, 1),
            "final_loss": ema,
        },
    }
    path = out / "model.pt"
    save_model_file(path, net.state_dict(), meta)
    return path


def average_models(models: list[str | Path], out: str | Path) -> Path:
    """Average the weights of fine-tunes of one network; write a model file.

    Fine-tunes that start from the same weights lie in one basin, and their
    average (a "model soup") is usually better than each, with less of the
    run-to-run spread of one training run. Every floating-point tensor is
    averaged, BatchNorm running statistics included (recomputing them on
    fresh synthetic batches instead was tried for the shipped model: nuclei
    of 40-70 px read 0.75 instead of 0.91); integer buffers come from the
    first model. The card's recipe lists the averaged models' own recipes.
    """
    from smartscope.segment._model import load_model_file, save_model_file

    if len(models) < 2:
        raise ValueError("average_models needs at least two model files")
    files = [load_model_file(m) for m in models]
    arch = files[0].meta["arch"]
    if any(f.meta["arch"] != arch for f in files[1:]):
        raise ValueError("average_models needs models of one architecture")
    state = {}
    for key, value in files[0].state_dict.items():
        if value.dtype.is_floating_point:
            state[key] = sum(f.state_dict[key].float() for f in files) / len(files)
        else:
            state[key] = value
    meta = {
        "arch": arch,
        "training": {"average_of": [f.meta.get("training", {}) for f in files]},
    }
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_model_file(path, state, meta)
    return path


def _recalibrate_batchnorm(
    net: Any, data: _Data, use_bf16: bool, batches: int = 40
) -> None:
    """Set BatchNorm running statistics to their average over fresh batches.

    The momentum average of the last steps is noisy, and the eval-mode
    network depends on it.
    """
    import torch

    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average
    net.train()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
        for _ in range(batches):
            x = data.batch()[0]
            net(torch.from_numpy(x).contiguous(memory_format=torch.channels_last))
    for bn in bns:
        bn.momentum = 0.1
