"""Normalisation before the network and instance labels after it (vectorised)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

#: percentiles mapped to 0 and 1 by `normalize`. The 5th, not the 1st (what the
#: shipped network was trained with): chosen on the synthetic tuning sets,
#: where the 3rd-10th all raise F1 and mean AP over the 1st (widefield
#: 0.793 -> 0.815, classic 0.933 -> 0.935, validation 0.934 -> 0.935, beads
#: and large nuclei not lower; docs/benchmarks.md, `bench segment`)
NORM_PERCENTILES = (5.0, 99.8)
_SAMPLE_PIXELS = 1 << 16


def percentiles_text() -> str:
    """``"5th → 0, 99.8th → 1"``: `NORM_PERCENTILES` in words (cards, exports)."""

    def nth(p: float) -> str:
        n = f"{p:g}"
        last = {"1": "st", "2": "nd", "3": "rd"}.get(n[-1], "th")
        return n + ("th" if n.endswith(("11", "12", "13")) else last)

    lo, hi = NORM_PERCENTILES
    return f"{nth(lo)} → 0, {nth(hi)} → 1"


#: pieces under this fraction of the median object that touch a larger object
#: join it (`merge_fragments`); chosen on a synthetic tuning set
FRAGMENT_FRACTION = 0.4


def normalize(image: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Map the `NORM_PERCENTILES` (5th and 99.8th) to 0 and 1 (float32).

    Robust to bit depth (8/12/16 bit, float), offsets and intensity drift.
    Percentiles come from a strided sample of at most 65 536 pixels, so the
    cost does not grow with the frame. Values above 1 are compressed
    logarithmically (``1 + log1p(x - 1)``) and values below -1 clipped: a few
    bright beads in a dark field would otherwise reach hundreds. A flat image
    maps to zeros. Pixels that are not finite (NaN borders of a registered
    or stitched float image, infinities) are left out of the percentiles and
    mapped to 0 (background); a few of them used to turn every percentile,
    and so the whole image, into NaN.
    """
    floating = np.asarray(image).dtype.kind in "fc"  # camera frames: integers
    img = np.asarray(image, dtype=np.float32)
    step = max(1, int(np.sqrt(img.size / _SAMPLE_PIXELS)))
    sample = img[::step, ::step].ravel()
    if floating:
        sample = sample[np.isfinite(sample)]
        if sample.size == 0:
            return np.zeros(img.shape, np.float32)
    lo, hi = np.percentile(sample, NORM_PERCENTILES)
    scale = hi - lo
    if not np.isfinite(scale) or scale < eps * max(1.0, abs(float(hi))):
        return np.zeros(img.shape, np.float32)
    out = (img - np.float32(lo)) * np.float32(1.0 / scale)
    if floating:
        bad = ~np.isfinite(out)
        if bad.any():
            out[bad] = 0.0
    high = out > 1
    if high.any():
        out[high] = 1 + np.log1p(out[high] - 1)
    np.maximum(out, -1, out=out)
    return out


def median_object_radius(
    foreground: np.ndarray, min_area_px: int = 8, step: int = 2
) -> float:
    """Equivalent radius (px) of the median connected piece of `foreground`.

    The foreground (interior + boundary) of a nucleus stays one piece even
    where a network splits its interior, so this measures object size before
    instances exist. Measured on every `step`-th pixel in each direction (1 ms
    instead of 2.6 at 512²; within a few percent for objects above ~4 px
    radius). Pieces under `min_area_px` are ignored; 0 when none.
    """
    pieces, n = ndi.label(foreground[::step, ::step])
    if n == 0:
        return 0.0
    areas = np.bincount(pieces.ravel(), minlength=n + 1)[1:] * float(step * step)
    areas = areas[areas >= min_area_px]
    return float(np.sqrt(np.median(areas) / np.pi)) if areas.size else 0.0


def boundary_classes(labels: np.ndarray, contact_width: int = 1) -> np.ndarray:
    """Training target: 0 background, 1 interior, 2 boundary (uint8).

    A pixel of an object is boundary when a 4-neighbour belongs to another
    object or to the background (so touching objects are separated by two
    boundary pixels). With `contact_width` > 1, an object's pixels within
    that many pixels (chessboard distance) of another object are boundary
    too: touching objects are then separated by ``2 * contact_width``
    boundary pixels, which interior seeds do not bridge; growing the seeds
    (`probabilities_to_labels`, 4 px) gives the pixels back.
    """
    lab = np.asarray(labels)
    pad = np.pad(lab, 1, mode="edge")
    centre = pad[1:-1, 1:-1]
    edge = (
        (pad[:-2, 1:-1] != centre)
        | (pad[2:, 1:-1] != centre)
        | (pad[1:-1, :-2] != centre)
        | (pad[1:-1, 2:] != centre)
    )
    out = (lab > 0).astype(np.uint8)
    out[edge & (lab > 0)] = 2
    if contact_width > 1 and lab.any():
        size = 2 * int(contact_width) + 1
        big = np.iinfo(np.int64).max
        lab64 = lab.astype(np.int64)
        hi = ndi.maximum_filter(lab64, size)
        lo = ndi.minimum_filter(np.where(lab64 > 0, lab64, big), size)
        out[(lab64 > 0) & (lo < big) & (hi != lo)] = 2
    return out


def _grow(seeds: np.ndarray, fg: np.ndarray, steps: int) -> np.ndarray:
    """Grow `seeds` over `fg` by up to `steps` 4-connected pixel rings.

    Only the foreground pixels without a seed (the thin boundary band, a few
    percent of the frame) are visited: each step gathers their four
    neighbours' labels through flat indices of a padded copy, so a step costs
    O(band) instead of O(frame). Foreground that no seed reaches becomes
    objects of its own (tiny objects that are all boundary).
    """
    h, w = seeds.shape
    stride = w + 2
    padded = np.zeros((h + 2, stride), np.int32)
    padded[1:-1, 1:-1] = seeds
    flat = padded.ravel()
    band = np.flatnonzero(fg & (seeds == 0))
    band = band + (band // w) * 2 + stride + 1  # (y, x) -> padded flat index
    for _ in range(steps):
        if band.size == 0:
            break
        neighbours = np.maximum(
            np.maximum(flat[band - 1], flat[band + 1]),
            np.maximum(flat[band - stride], flat[band + stride]),
        )
        got = neighbours > 0
        if not got.any():
            break
        flat[band[got]] = neighbours[got]  # all gathered before any write
        band = band[~got]
    grown = padded[1:-1, 1:-1]
    if band.size:
        rest = np.zeros(padded.shape, bool)
        rest.ravel()[band] = True
        extra, _ = ndi.label(rest[1:-1, 1:-1])
        grown = np.where(extra > 0, extra + grown.max(), grown)
    return grown


def merge_fragments(
    labels: np.ndarray,
    fraction: float = FRAGMENT_FRACTION,
    ratio: float = 2.0,
    min_contact: int = 2,
) -> np.ndarray:
    """Merge small pieces into the larger object they touch.

    An object smaller than `fraction` x the frame's median object area that
    shares at least `min_contact` 4-connected pixel edges with an object at
    least `ratio` times its size joins the neighbour it shares the most edges
    with (a piece split off a nucleus by a stray boundary, or a bright spot
    seeded apart from its nucleus). Small objects that touch nothing, or
    touch only objects of their own size (beads, daughter nuclei), stay.
    Vectorised; beyond one pass over the frame the cost follows the small
    objects' pixels. Labels keep their numbers (merged ones vanish).
    """
    lab = np.asarray(labels)
    n = int(lab.max()) if lab.size else 0
    if n < 2 or fraction <= 0:
        return labels
    areas = np.bincount(lab.ravel(), minlength=n + 1)
    present = areas[1:][areas[1:] > 0]
    small = areas < fraction * float(np.median(present))
    small[0] = False
    if not small.any():
        return labels
    # the 4-neighbours of the small objects' pixels only (flat indices into a
    # zero-padded copy), so the cost follows the fragments, not the frame
    h, w = lab.shape
    stride = w + 2
    padded = np.zeros((h + 2, stride), lab.dtype)
    padded[1:-1, 1:-1] = lab
    flat = padded.ravel()
    at = np.flatnonzero(small[flat])
    own = flat[at].astype(np.int64)
    src = np.tile(own, 4)
    dst = np.concatenate([flat[at + step] for step in (-1, 1, -stride, stride)])
    dst = dst.astype(np.int64)
    keep = (dst > 0) & (dst != src)
    src, dst = src[keep], dst[keep]
    keep = areas[dst] >= ratio * areas[src]
    if not keep.any():
        return labels
    pair, count = np.unique(src[keep] * (n + 1) + dst[keep], return_counts=True)
    frm, to = pair // (n + 1), pair % (n + 1)
    order = np.lexsort((-count, frm))  # per fragment, most shared edges first
    frm, to, count = frm[order], to[order], count[order]
    first = np.ones(len(frm), bool)
    first[1:] = frm[1:] != frm[:-1]
    ok = first & (count >= min_contact)
    if not ok.any():
        return labels
    target = np.arange(n + 1)
    target[frm[ok]] = to[ok]
    # a fragment may join a fragment that joins another (areas at least double
    # at each step, so this settles in a few rounds)
    while True:
        nxt = target[target]
        if np.array_equal(nxt, target):
            break
        target = nxt
    out = lab.copy()
    out.ravel()[(at // stride - 1) * w + at % stride - 1] = target[own]
    return out


def probabilities_to_labels(
    probs: np.ndarray,
    fg_threshold: float = 0.6,
    seed_threshold: float = 0.6,
    min_seed_px: int = 2,
    min_area_px: int = 8,
    grow_steps: int = 4,
    fragment_fraction: float = FRAGMENT_FRACTION,
) -> tuple[np.ndarray, np.ndarray]:
    """Instance labels and per-object scores from ``(3, Y, X)`` class probabilities.

    Seeds are the connected interior regions (interior probability above
    `seed_threshold`); seeds grow over the foreground (interior + boundary
    above `fg_threshold`) by up to `grow_steps` pixels; foreground left
    without a seed (tiny objects that are all boundary) becomes objects of its
    own. Pieces under `fragment_fraction` of the median object area join
    the larger object they touch (`merge_fragments`; 0 turns this off).
    Objects under `min_area_px` are dropped.
    Whole-array numpy/scipy work only, no per-object Python loop.

    Returns
    -------
    labels : (Y, X) uint16
    scores : (N,) float32, mean foreground probability of each object
    """
    interior = probs[1]
    fg_prob = probs[1] + probs[2]
    fg = fg_prob > fg_threshold
    seeds, n_seeds = ndi.label((interior > seed_threshold) & fg)
    if n_seeds and min_seed_px > 1:
        sizes = np.bincount(seeds.ravel(), minlength=n_seeds + 1)
        small = sizes < min_seed_px
        small[0] = False
        if small.any():
            seeds[small[seeds]] = 0
    labels = merge_fragments(_grow(seeds, fg, grow_steps), fragment_fraction)
    n = int(labels.max())
    if n == 0:
        return np.zeros(fg.shape, np.uint16), np.zeros(0, np.float32)
    # objects lie inside the foreground: count over its pixels only (a
    # quarter of a typical frame; the weighted count is the costly one)
    at = np.flatnonzero(fg)
    flat = labels.ravel()[at]
    areas = np.bincount(flat, minlength=n + 1)
    sums = np.bincount(flat, weights=fg_prob.ravel()[at], minlength=n + 1)
    keep = areas >= max(1, min_area_px)
    keep[0] = False
    scores = (sums[keep] / areas[keep]).astype(np.float32)
    if keep[1:].all():
        return labels.astype(np.uint16), scores
    # consecutive relabel 1..K in label order, dropping the small ones
    new_id = np.zeros(n + 1, np.uint16)
    new_id[keep] = np.arange(1, int(keep.sum()) + 1)
    return new_id[labels], scores
