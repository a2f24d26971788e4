"""Synthetic fluorescence images with exact instance ground truth.

Training and validation data for the built-in model are generated here, in
process, from a seed: nothing is downloaded. A sample is rendered in two
steps so that training can re-draw the camera part for every epoch:

1. `render_scene` draws the specimen: instance labels and a clean, blurred,
   unevenly illuminated intensity image (float, peak about 1).
2. `apply_camera` turns that into what a camera records: photon (Poisson) and
   read (Gaussian) noise, an offset, a gain, a bit depth (8, 12, 16 bit or
   float) and clipping.

Scene kinds
-----------
``nuclei``
    Star-convex, elliptical, irregular nuclei from 3 to 40 px radius, alone,
    touching or in dense clusters, with chromatin texture, nucleoli, bright
    condensed (mitotic) nuclei, a wide spread of brightness within a field,
    out-of-focus haze and unlabelled out-of-focus neighbours. A nucleus's
    label ends at its visible edge: where its blurred light has fallen half
    way from its interior to its surroundings, the line annotators draw on
    real nuclei (`NUCLEUS_EDGE_FRACTION`).
``beads``
    Gaussian spots like the DemoCamera's ``Fluorescent Beads`` (sigma about
    2 px at focus, wider with defocus); a bead's label is where its own
    profile exceeds a quarter of its peak.
``empty``
    Background, illumination and noise only (no objects): the model must
    answer "nothing here" for empty fields.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import numpy as np
from scipy import ndimage as ndi

from smartscope.segment._postprocess import boundary_classes

SceneKind = Literal["nuclei", "beads", "empty"]
SceneStyle = Literal["classic", "widefield"]
Overlap = Literal["press", "add"]
KIND_WEIGHTS: dict[SceneKind, float] = {"nuclei": 0.78, "beads": 0.16, "empty": 0.06}
BEAD_LABEL_FRACTION = 0.25  # a bead's label: its profile above 25 % of its peak
#: a nucleus's label: its pixels where the blurred image stands at least this
#: fraction of the way from the nucleus's surroundings to its interior (the
#: half-maximum edge annotators outline on real images; before 2026-12-05 the
#: label was the nucleus's full extent before the blur, about 1 px wider, and
#: the network drew real nuclei that much too wide)
NUCLEUS_EDGE_FRACTION = 0.5


class Scene(NamedTuple):
    """A clean synthetic specimen: float intensity (peak ~1) and instance labels."""

    image: np.ndarray
    labels: np.ndarray
    kind: str


def _smooth_noise(rng: np.random.Generator, shape, sigma: float) -> np.ndarray:
    """Gaussian-filtered white noise scaled to unit standard deviation."""
    field = ndi.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    std = float(field.std())
    return field / std if std > 0 else field


def _illumination(rng: np.random.Generator, shape) -> np.ndarray:
    """Smooth multiplicative illumination (vignetting, gradients), mean ~1."""
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float32)
    yy = yy / shape[0] - rng.uniform(0.2, 0.8)
    xx = xx / shape[1] - rng.uniform(0.2, 0.8)
    vignette = 1.0 - rng.uniform(0.0, 0.6) * (yy**2 + xx**2)
    gradient = 1.0 + rng.uniform(-0.3, 0.3) * yy + rng.uniform(-0.3, 0.3) * xx
    lowfreq = 1.0 + rng.uniform(0.0, 0.15) * _smooth_noise(rng, shape, max(shape) / 6)
    return np.clip(vignette * gradient * lowfreq, 0.2, None)


def _place_centers(
    rng: np.random.Generator, shape, radii: np.ndarray, min_sep: float
) -> tuple[np.ndarray, np.ndarray]:
    """Centers for objects of `radii`: uniform or clustered, little overlap."""
    h, w = shape
    n = len(radii)
    clustered = rng.random() < 0.5
    if clustered:
        n_clusters = max(1, int(rng.integers(1, 6)))
        cluster_xy = rng.uniform(0, 1, (n_clusters, 2)) * (h, w)
        spread = (
            rng.uniform(1.5, 5.0)
            * float(np.median(radii))
            * np.sqrt(max(1.0, n / n_clusters) / 3)
        )
    kept_xy: list[np.ndarray] = []
    kept_r: list[float] = []
    xy = np.empty((0, 2))
    rr = np.empty(0)
    attempts = 0
    i = 0
    while i < n and attempts < 6 * n + 50:
        attempts += 1
        r = radii[i]
        if clustered and rng.random() < 0.8:
            c = cluster_xy[rng.integers(n_clusters)]
            p = c + rng.normal(0, spread, 2)
        else:
            p = rng.uniform(0, 1, 2) * (h, w)
        if not (-r < p[0] < h + r and -r < p[1] < w + r):
            continue
        if len(rr):
            d = np.hypot(*(xy - p).T)
            if np.any(d < min_sep * (rr + r)):
                continue
        kept_xy.append(p)
        kept_r.append(r)
        xy = np.asarray(kept_xy)
        rr = np.asarray(kept_r)
        i += 1
    return xy.reshape(-1, 2), rr


def _render_nuclei(
    rng: np.random.Generator,
    shape,
    max_radius: float = 36.0,
    style: SceneStyle = "classic",
    overlap: Overlap | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    h, w = shape
    real = style == "widefield"
    r_mean = float(np.exp(rng.uniform(np.log(3.0), np.log(max_radius))))
    coverage = rng.uniform(0.08, 0.6) if real else rng.uniform(0.03, 0.55)
    n = int(coverage * h * w / (np.pi * r_mean**2))
    n = int(np.clip(n, 1, 1500))
    radii = r_mean * np.exp(rng.normal(0, rng.uniform(0.08, 0.3), n))
    radii = np.clip(radii, 2.2, 60)
    # widefield: crowded fields where many nuclei touch or press together;
    # in half of them nuclei overlap and their light adds up (a widefield
    # image is a projection: where two nuclei lie on top of each other the
    # overlap is brighter than either, as measured on real nuclei images)
    if real and overlap is None:
        overlap = "add" if rng.random() < 0.5 else "press"
    additive = real and overlap == "add"
    if additive:
        min_sep = rng.uniform(0.6, 0.95)
    else:
        min_sep = rng.uniform(0.7, 1.0) if real else rng.uniform(0.78, 1.05)
    centers, radii = _place_centers(rng, shape, radii, min_sep)

    image = np.zeros(shape, np.float32)
    labels = np.zeros(shape, np.int32)
    # widefield: where nuclei press together each pixel goes to the nucleus
    # it is deepest inside (relative radius), a flat contact with both
    # nuclei's edges meeting there, instead of one occluding the other
    depth_map = np.full(shape, np.inf, np.float32) if real else None
    # per-image texture fields shared by all nuclei (chromatin-like)
    tex_sigma = rng.uniform(0.6, max(0.8, r_mean / 4))
    texture = _smooth_noise(rng, shape, tex_sigma)
    tex_amp = rng.uniform(0.0, 0.45)
    spots = np.zeros(shape, np.float32)
    if rng.random() < 0.4:  # bright chromocenters or dark nucleoli
        k = int(coverage * h * w / max(4.0, (r_mean / 2) ** 2))
        ys = rng.integers(0, h, k)
        xs = rng.integers(0, w, k)
        spots[ys, xs] = 1.0
        spots = ndi.gaussian_filter(spots, max(0.7, r_mean / 6))
        spots /= max(float(spots.max()), 1e-6)
        spots *= rng.choice([-0.5, 0.8])
    bright_spread = rng.uniform(0.0, np.log(12.0))
    gamma_img = rng.uniform(0.0, 0.7)
    if real:
        # widefield nuclei: in-focus nuclei share a brightness (log-normal
        # spread) and a few (mitotic, G2, doublets) are 1.8-6x brighter at
        # full size, so after percentile normalisation the typical in-focus
        # nucleus is dim (0.1-0.3) beside saturating neighbours
        base_sigma = rng.uniform(0.08, 0.45)
        bright_frac = rng.uniform(0.0, 0.15) if rng.random() < 0.75 else 0.0
        bright_gain = (np.log(1.8), np.log(6.0))
        tex_amp *= 0.5
    for label, ((cy, cx), r) in enumerate(zip(centers, radii, strict=False), start=1):
        aspect = 1.0 + min(1.6, abs(rng.normal(0, 0.25)))
        if real:  # smooth, often elongated ellipses
            aspect = 1.0 + min(1.3, (aspect - 1.0) * 1.8)
        theta0 = rng.uniform(0, np.pi)
        harm_k = np.arange(2, 7)
        harm_a = rng.normal(0, 0.035, len(harm_k)) * rng.uniform(0.3, 1.5)
        if real:
            harm_a = harm_a * 0.5
        harm_p = rng.uniform(0, 2 * np.pi, len(harm_k))
        condensed = rng.random() < (0.02 if real else 0.04)
        if condensed:
            r = max(2.2, r * 0.6)
            radii[label - 1] = r
        a_major = r * np.sqrt(aspect)
        ext = int(np.ceil(a_major * 1.35)) + 2
        y0, y1 = max(0, int(cy) - ext), min(h, int(cy) + ext + 1)
        x0, x1 = max(0, int(cx) - ext), min(w, int(cx) + ext + 1)
        if y1 <= y0 or x1 <= x0:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        dy, dx = yy - cy, xx - cx
        phi = np.arctan2(dy, dx) - theta0
        d = np.hypot(dy, dx)
        # ellipse radius at angle phi, semi-axes r*sqrt(aspect), r/sqrt(aspect)
        a, b = r * np.sqrt(aspect), r / np.sqrt(aspect)
        radius = a * b / np.sqrt((b * np.cos(phi)) ** 2 + (a * np.sin(phi)) ** 2)
        radius = radius * (
            1.0
            + (
                harm_a[:, None, None]
                * np.cos(harm_k[:, None, None] * phi + harm_p[:, None, None])
            ).sum(0)
        )
        cover = light = np.clip(radius - d + 0.5, 0.0, 1.0)
        inside = cover > 0.5
        if not inside.any():
            continue
        if real:
            brightness = float(np.exp(rng.normal(0, base_sigma)))
            if rng.random() < bright_frac:
                brightness *= float(np.exp(rng.uniform(*bright_gain)))
        else:
            brightness = float(np.exp(-rng.uniform(0, bright_spread)))
        if condensed:
            brightness = min(1.6, brightness * 2.0)
        gamma = float(np.clip(gamma_img + rng.normal(0, 0.1), 0, 1))
        rel = np.clip(d / np.maximum(radius, 1e-3), 0, 1)
        profile = (1.0 - 0.85 * rel**2) ** gamma if gamma > 0 else 1.0
        sub_tex = 1.0 + (tex_amp * (1.6 if condensed else 1.0)) * texture[y0:y1, x0:x1]
        sub_tex = sub_tex + spots[y0:y1, x0:x1]
        obj = brightness * profile * np.clip(sub_tex, 0.15, None)
        if depth_map is not None:
            rel_d = d / np.maximum(radius, 1e-3)
            deeper = rel_d < depth_map[y0:y1, x0:x1]
            cover = np.where(deeper, cover, 0.0)
            inside = inside & deeper
            depth_map[y0:y1, x0:x1][inside] = rel_d[inside]
        region = image[y0:y1, x0:x1]
        if additive:
            image[y0:y1, x0:x1] = region + light * obj  # all its light
        else:
            image[y0:y1, x0:x1] = region * (1 - cover) + cover * obj
        labels[y0:y1, x0:x1][inside] = label

    # remove remnants of occluded objects (under 40 % of a disc of their radius)
    if labels.any():
        areas = np.bincount(labels.ravel(), minlength=len(radii) + 1)
        expected = np.zeros_like(areas, dtype=np.float64)
        expected[1 : len(radii) + 1] = np.pi * radii**2
        bad = (areas > 0) & (areas < 0.4 * expected)
        bad[0] = False
        if bad.any():
            labels[bad[labels]] = 0
        # split-off fragments of one label: keep only the largest piece
        labels = _largest_piece_per_label(labels)

    # unlabelled out-of-focus neighbours and haze
    if real:
        # out of focus means blurred, not dim: a ghost is a wide, soft blob
        # well below the typical in-focus nucleus, so dim sharp nuclei stay
        # objects
        typical = float(np.median(image[labels > 0])) if labels.any() else 1.0
        if rng.random() < 0.3:
            ghost = np.zeros(shape, np.float32)
            k = max(1, int(n * rng.uniform(0.05, 0.3)))
            ghost[rng.integers(0, h, k), rng.integers(0, w, k)] = 1.0
            ghost = ndi.gaussian_filter(ghost, r_mean * rng.uniform(1.0, 1.8))
            ghost /= max(float(ghost.max()), 1e-6)
            image += typical * rng.uniform(0.05, 0.35) * ghost * (labels == 0)
        if rng.random() < 0.3:
            haze = ndi.gaussian_filter(image, r_mean * rng.uniform(1.5, 4.0))
            image += rng.uniform(0.02, 0.15) * haze
        psf = rng.uniform(0.8, 2.6)
        return ndi.gaussian_filter(image, psf), labels
    if rng.random() < 0.35:
        ghost = np.zeros(shape, np.float32)
        k = max(1, int(n * rng.uniform(0.05, 0.4)))
        ys = rng.integers(0, h, k)
        xs = rng.integers(0, w, k)
        ghost[ys, xs] = 1.0
        ghost = ndi.gaussian_filter(ghost, r_mean * rng.uniform(0.8, 1.5))
        ghost /= max(float(ghost.max()), 1e-6)
        image += rng.uniform(0.03, 0.15) * ghost * (labels == 0)
    if rng.random() < 0.5:
        haze = ndi.gaussian_filter(image, r_mean * rng.uniform(1.5, 4.0))
        image += rng.uniform(0.05, 0.35) * haze
    psf = rng.uniform(0.5, 1.6) * (rng.uniform(1.2, 2.8) if rng.random() < 0.2 else 1)
    image = ndi.gaussian_filter(image, psf)
    return image, labels


def _visible_edges(
    image: np.ndarray,
    labels: np.ndarray,
    fraction: float = NUCLEUS_EDGE_FRACTION,
    rim_px: float = 3.0,
) -> np.ndarray:
    """Trim each label's rim to where `image` shows the object's edge.

    A pixel within `rim_px` of its object's outline (or of a touching
    neighbour) stays in the object only where the clean, blurred `image`
    reaches `fraction` of the way from the object's surroundings (mean of a
    ring 3-4 px outside it, where no object lies) to its interior (mean of
    its pixels deeper than `rim_px`; an object without such pixels: its
    brightest pixel). Deeper pixels always stay, so dark nucleoli make no
    holes; of a label cut in pieces the largest stays.
    """
    lab = labels.astype(np.int32)
    n = int(lab.max())
    if n == 0:
        return labels
    inside = lab > 0
    # interior: object pixels whose 4-neighbours are all of the same object
    interior = boundary_classes(lab) == 1
    deep = ndi.distance_transform_edt(interior) + 1 >= rim_px
    deep &= inside
    index = np.arange(n + 1)
    counts = np.bincount(lab[deep], minlength=n + 1)
    level = np.bincount(lab[deep], weights=image[deep], minlength=n + 1)
    level = np.where(
        counts > 0,
        level / np.maximum(counts, 1),
        np.asarray(ndi.maximum(image, lab, index), np.float64),
    )
    near = ndi.grey_dilation(lab, size=(9, 9))
    ring = (near > 0) & ~ndi.binary_dilation(inside, iterations=2)
    ring_counts = np.bincount(near[ring], minlength=n + 1)
    ring_sum = np.bincount(near[ring], weights=image[ring], minlength=n + 1)
    surround = np.where(
        ring_counts > 0,
        ring_sum / np.maximum(ring_counts, 1),
        float(np.percentile(image, 5)),
    )
    edge = surround + fraction * (level - surround)
    keep = inside & (deep | (image >= edge[lab]))
    return _largest_piece_per_label(np.where(keep, lab, 0))


def _largest_piece_per_label(labels: np.ndarray) -> np.ndarray:
    """Keep, for every label, only its largest 4-connected piece (vectorised)."""
    pieces, n = ndi.label(labels > 0)
    if n == 0:
        return labels
    # pieces of the same label that are touching are one piece in `pieces` only
    # if they share the label; relabel by (label, piece) pairs
    pair = labels.astype(np.int64) * (n + 1) + pieces
    uniq, inverse, counts = np.unique(pair, return_inverse=True, return_counts=True)
    owner = uniq // (n + 1)
    # per owner, the piece with the largest count wins
    order = np.lexsort((-counts, owner))
    first = np.ones(len(order), bool)
    first[1:] = owner[order][1:] != owner[order][:-1]
    keep = np.zeros(len(uniq), bool)
    keep[order[first]] = True
    keep[owner == 0] = True
    out = labels.copy()
    out[~keep[inverse.reshape(labels.shape)]] = 0
    return out


def _render_beads(rng: np.random.Generator, shape) -> tuple[np.ndarray, np.ndarray]:
    h, w = shape
    density = float(np.exp(rng.uniform(np.log(2), np.log(60))))  # per 512² field
    n = max(1, int(rng.poisson(density * h * w / 512**2)))
    sigma0 = rng.uniform(1.6, 2.4) * (
        rng.uniform(1.0, 2.2) if rng.random() < 0.3 else 1
    )
    ys = rng.uniform(-3, h + 3, n)
    xs = rng.uniform(-3, w + 3, n)
    amps = np.exp(rng.normal(0, 0.3, n))
    sig = sigma0 * np.exp(rng.normal(0, 0.05, n))
    image = np.zeros(shape, np.float32)
    own = np.zeros(shape, np.float32)  # strongest single-bead contribution
    labels = np.zeros(shape, np.int32)
    for i in range(n):
        ext = int(np.ceil(4 * sig[i]))
        y0, y1 = max(0, int(ys[i]) - ext), min(h, int(ys[i]) + ext + 1)
        x0, x1 = max(0, int(xs[i]) - ext), min(w, int(xs[i]) + ext + 1)
        if y1 <= y0 or x1 <= x0:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        g = np.exp(-((yy - ys[i]) ** 2 + (xx - xs[i]) ** 2) / (2 * sig[i] ** 2))
        image[y0:y1, x0:x1] += amps[i] * g
        win = (g > BEAD_LABEL_FRACTION) & (g * amps[i] > own[y0:y1, x0:x1])
        labels[y0:y1, x0:x1][win] = i + 1
        own[y0:y1, x0:x1] = np.maximum(own[y0:y1, x0:x1], g * amps[i] * (g > 0))
    labels = _largest_piece_per_label(labels)
    image /= max(float(image.max()), 1e-6)
    return image, labels


def render_scene(
    rng: np.random.Generator,
    shape: tuple[int, int] = (256, 256),
    kind: SceneKind | None = None,
    max_radius: float = 36.0,
    style: SceneStyle = "classic",
    overlap: Overlap | None = None,
    edge_fraction: float | None = NUCLEUS_EDGE_FRACTION,
) -> Scene:
    """Draw one clean specimen (before the camera) with its instance labels.

    `max_radius` bounds the mean nucleus radius of a scene (px; drawn
    log-uniformly from 3). `style` ``"classic"`` is the original world (the
    validation set is drawn from it, so its numbers stay comparable);
    ``"widefield"`` is closer to real widefield nuclei images: in-focus nuclei
    of one brightness with a few 2-6x brighter ones, crowded touching nuclei,
    out-of-focus ghosts that are blurred rather than merely dim, less haze,
    a higher background. Where widefield nuclei overlap, `overlap`
    ``"press"`` gives each pixel to the nucleus it is deepest inside (a flat
    contact) and ``"add"`` adds the nuclei's light as well (the overlap is
    brighter, as in a projection); None draws one of them per scene.
    A nucleus's label ends where the blurred image stands `edge_fraction` of
    the way from its surroundings to its interior (`_visible_edges`; None:
    its full extent before the blur, the labels before 2026-12-05).
    """
    if kind is None:
        kinds = list(KIND_WEIGHTS)
        p = np.asarray(list(KIND_WEIGHTS.values()))
        kind = kinds[int(rng.choice(len(kinds), p=p / p.sum()))]
    if kind == "nuclei":
        image, labels = _render_nuclei(rng, shape, max_radius, style, overlap)
        if edge_fraction is not None:
            labels = _visible_edges(image, labels, edge_fraction)
    elif kind == "beads":
        image, labels = _render_beads(rng, shape)
    elif kind == "empty":
        image = np.zeros(shape, np.float32)
        labels = np.zeros(shape, np.int32)
    else:
        raise ValueError(f"unknown scene kind {kind!r}")
    peak = float(np.percentile(image, 99.9)) if image.any() else 1.0
    image = image / max(peak, 1e-6)
    background = rng.uniform(0.0, 0.12) if kind != "beads" else rng.uniform(0, 0.05)
    if style == "widefield" and kind == "nuclei":
        background = rng.uniform(0.0, 0.2)
    image = (image + background) * _illumination(rng, shape)
    return Scene(image.astype(np.float32), _relabel(labels), kind)


def _relabel(labels: np.ndarray) -> np.ndarray:
    """Consecutive labels 1..N as uint16 (0 stays background)."""
    uniq, inverse = np.unique(labels, return_inverse=True)
    if uniq[0] != 0:
        inverse = inverse + 1
    return inverse.reshape(labels.shape).astype(np.uint16)


def apply_camera(
    rng: np.random.Generator, image: np.ndarray, depth: str | None = None
) -> np.ndarray:
    """Record a clean `image` with a random camera: noise, gain, offset, bit depth.

    Returns uint8/uint16 (8, 12 or 16 bit) or float32, like real files do.
    """
    photons = float(np.exp(rng.uniform(np.log(8.0), np.log(3000.0))))
    signal = rng.poisson(np.clip(image, 0, None) * photons).astype(np.float32)
    signal += rng.normal(0, rng.uniform(0.0, 3.0), image.shape).astype(np.float32)
    signal /= photons  # back to ~[0, 1]
    if depth is None:
        depth = str(rng.choice(["8", "12", "16", "float"], p=[0.45, 0.2, 0.2, 0.15]))
    if depth == "float":
        return (signal * rng.uniform(0.01, 1000.0) + rng.uniform(-5, 5)).astype(
            np.float32
        )
    top = {"8": 255, "12": 4095, "16": 65535}[depth]
    # dim 8-bit files are common (nuclei at 10-40 grey levels); some saturate
    peak = float(np.exp(rng.uniform(np.log(min(20, top)), np.log(top * 1.15))))
    offset = rng.uniform(0, 0.05) * top if rng.random() < 0.5 else 0.0
    out = np.round(signal * peak + offset)
    out = np.clip(out, 0, top)
    return out.astype(np.uint8 if depth == "8" else np.uint16)


def synth_sample(
    seed: int | np.random.Generator,
    shape: tuple[int, int] = (256, 256),
    kind: SceneKind | None = None,
    depth: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One camera image and its uint16 instance labels, reproducible from `seed`."""
    rng = np.random.default_rng(seed)
    scene = render_scene(rng, shape, kind)
    return apply_camera(rng, scene.image, depth), scene.labels


def validation_set(
    n: int = 48, shape: tuple[int, int] = (256, 256), seed: int = 2018
) -> list[tuple[np.ndarray, np.ndarray, SceneKind]]:
    """The fixed synthetic validation set: ``(image, labels, kind)`` triples.

    Nuclei and beads in the training proportions, never generated by the
    training seeds (training draws from a different seed sequence).
    """
    out: list[tuple[np.ndarray, np.ndarray, SceneKind]] = []
    root = np.random.SeedSequence([seed, 7])
    kinds: list[SceneKind] = ["nuclei", "nuclei", "nuclei", "nuclei", "beads"]
    for i, child in enumerate(root.spawn(n)):
        rng = np.random.default_rng(child)
        kind = kinds[i % len(kinds)]
        scene = render_scene(rng, shape, kind)
        out.append((apply_camera(rng, scene.image), scene.labels, kind))
    return out


def large_nuclei_set(
    n: int = 6, seed: int = 5000
) -> list[tuple[np.ndarray, np.ndarray, str]]:
    """Nuclei of 40-70 px radius (512² frames), 8-bit: a size stress test.

    Scenes whose median nucleus radius is at least 18 px are rendered at 256²
    and enlarged 2x (bilinear image, nearest labels) before the camera, so
    the objects exceed the default training range (mean radius ≤ 36 px).
    """
    out: list[tuple[np.ndarray, np.ndarray, str]] = []
    for i in range(2000):
        rng = np.random.default_rng([seed, i])
        scene = render_scene(rng, (256, 256), "nuclei")
        areas = np.bincount(scene.labels.ravel())[1:]
        if not areas.size or np.median(areas) < np.pi * 18**2:
            continue
        image = ndi.zoom(scene.image, 2, order=1)
        labels = np.kron(scene.labels, np.ones((2, 2), np.uint16))
        out.append((apply_camera(rng, image, "8"), labels, "nuclei"))
        if len(out) == n:
            break
    return out
