"""Normalisation before the network and instance labels after it (vectorised)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

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
#: objects of at least this many times the median object area are split at
#: a waist of their shape (`split_waists`), where a lobe stands this fraction
#: of the object's deepest distance above the saddle; chosen on synthetic
#: sets (ratio 1.2-2.5, fraction 0.03-0.15 tried; docs/benchmarks.md)
WAIST_RATIO = 1.5
WAIST_DYNAMIC = 0.075
#: such an object is also split along the straight cut between two notches of
#: its outline (`split_notches`) at least this deep (px, from its convex hull)
#: when the cut is at most `NOTCH_CUT` x their summed depth and both parts are
#: convex (area over convex-hull area at least `NOTCH_SOLIDITY`); chosen on
#: the synthetic sets (docs/benchmarks.md, Session 32); the cut limit 5 (was
#: 3: pairs pressed up to 0.45 of their short semi-axis into each other, whose
#: cut is 5.06x the summed depth) on a world of strongly pressed pairs of
#: real-sized nuclei (Session 36)
NOTCH_DEPTH_PX = 1.5
NOTCH_CUT = 5.0
NOTCH_SOLIDITY = 0.93


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


def fill_non_finite(images: np.ndarray) -> np.ndarray:
    """`images` with NaN and infinite pixels set to their plane's background.

    For a plugin whose model normalises the image itself (Cellpose's
    percentiles, a bioimage.io package's ``scale_range``): a few NaN pixels
    at the border of a registered or stitched float image turn those
    percentiles, and so every pixel, into NaN (a Cellpose model then finds
    nothing), and a network spreads NaN over everything its convolutions
    reach. Each ``(Y, X)`` plane's non-finite pixels get the value
    `normalize` maps to 0, the plane's lower `NORM_PERCENTILES` point of its
    finite pixels (0 where it has none): background, as the built-in model
    reads them. Integer images, and float images without such pixels, come
    back as they are; otherwise a float32 copy.
    """
    arr = np.asarray(images)
    if arr.dtype.kind != "f":
        return arr
    bad = ~np.isfinite(arr)
    if not bad.any():
        return arr
    out = arr.astype(np.float32)  # a copy: `arr` is the caller's
    planes = out.reshape(-1, *out.shape[-2:])
    for plane, mask in zip(planes, bad.reshape(planes.shape), strict=True):
        if mask.any():
            good = plane[~mask]
            fill = np.percentile(good, NORM_PERCENTILES[0]) if good.size else 0.0
            plane[mask] = fill
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
    rounds: int = 8,
) -> np.ndarray:
    """Merge small pieces into the larger object they touch.

    An object smaller than `fraction` x the frame's median object area
    (`typical_area`) that shares at least `min_contact` 4-connected pixel edges
    with an object at least `ratio` times its size joins the neighbour it shares
    the most edges with (a piece split off a nucleus by a stray boundary, or a
    bright spot seeded apart from its nucleus). Two touching pieces that
    together are still under `fraction` x the median join too, the smaller into
    the larger (halves of one small, bright nucleus the network cut in two; on
    the synthetic sets no F1 lower; on a real image of 125 nuclei 4 false
    objects fewer and one nucleus more found). Other small objects that touch
    nothing, or touch only objects of their own size (beads, daughter nuclei),
    stay.
    Repeated (at most `rounds` times) until nothing more joins: a piece
    that touched only other pieces joins once they have joined their
    nucleus (a nucleus the network cut into several pieces; large nuclei
    F1 0.735 -> 0.84 on `bench segment`'s set, the synthetic sets not
    lower). Vectorised; beyond one pass over the frame a round's cost
    follows the small objects' pixels. Labels keep their numbers (merged
    ones vanish); `labels` itself comes back when nothing joins.
    """
    return _merge_fragments(labels, fraction, ratio, min_contact, rounds)[0]


def _merge_fragments(
    labels: np.ndarray,
    fraction: float = FRAGMENT_FRACTION,
    ratio: float = 2.0,
    min_contact: int = 2,
    rounds: int = 8,
) -> tuple[np.ndarray, np.ndarray | None]:
    """`merge_fragments`, and the areas (a bincount) of its result.

    The areas come back for the splits after it (None when the frame holds
    fewer than two objects or `fraction` is 0). The frame is counted and
    scanned once: later rounds update the areas and look only at the pixels
    of the pieces that were small before, unless the median grew enough to
    make a new one small (a 512² frame: ~2 ms the first round, ~0.3 ms each
    later one, where a whole-frame round took ~2.4 ms).
    """
    lab = np.asarray(labels)
    n = int(lab.max()) if lab.size else 0
    if n < 2 or fraction <= 0:
        return labels, None
    areas = np.bincount(lab.ravel(), minlength=n + 1)
    h, w = lab.shape
    stride = w + 2
    flat: np.ndarray | None = None  # a zero-padded copy, written in place
    at = np.zeros(0, np.intp)  # its flat indices of the small pieces' pixels
    was_small = np.zeros(n + 1, bool)
    joined = False
    for _ in range(max(1, rounds)):
        present = areas[1:][areas[1:] > 0]
        limit = fraction * typical_area(present)
        small = areas < limit
        small[0] = False
        if not small.any():
            break
        if flat is None:
            padded = np.zeros((h + 2, stride), lab.dtype)
            padded[1:-1, 1:-1] = lab
            flat = padded.ravel()
        # the 4-neighbours of the small objects' pixels only, so the cost
        # follows the fragments, not the frame
        if (small & ~was_small).any():
            at = np.flatnonzero(small[flat])
        else:  # pieces only ever grow by taking small pieces' pixels
            at = at[small[flat[at]]]
        was_small = small
        target = _fragment_targets(flat, at, stride, areas, limit, ratio, min_contact)
        if target is None:
            break
        flat[at] = target[flat[at]]
        moved = np.flatnonzero(target != np.arange(n + 1))
        np.add.at(areas, target[moved], areas[moved])
        areas[moved] = 0
        joined = True
    if not joined or flat is None:
        return labels, areas
    return flat.reshape(h + 2, stride)[1:-1, 1:-1].copy(), areas


def _fragment_targets(
    flat: np.ndarray,
    at: np.ndarray,
    stride: int,
    areas: np.ndarray,
    limit: float,
    ratio: float,
    min_contact: int,
) -> np.ndarray | None:
    """One round of `merge_fragments`: the label each label joins (or None).

    `flat` is the zero-padded labels (row `stride`), `at` the flat indices of
    the pixels of the objects under `limit` px (the fragments).
    """
    n = len(areas) - 1
    own = flat[at].astype(np.int64)
    src = np.tile(own, 4)
    dst = np.concatenate([flat[at + step] for step in (-1, 1, -stride, stride)])
    dst = dst.astype(np.int64)
    keep = (dst > 0) & (dst != src)
    src, dst = src[keep], dst[keep]
    # a larger neighbour, or one that together with this piece is still a
    # fragment (two halves of one small nucleus): the smaller joins the larger
    # (the lower label between equals, so no two pieces swap)
    larger = (areas[dst] > areas[src]) | ((areas[dst] == areas[src]) & (dst < src))
    keep = (areas[dst] >= ratio * areas[src]) | (
        larger & (areas[src] + areas[dst] < limit)
    )
    if not keep.any():
        return None
    pair, count = np.unique(src[keep] * (n + 1) + dst[keep], return_counts=True)
    frm, to = pair // (n + 1), pair % (n + 1)
    order = np.lexsort((-count, frm))  # per fragment, most shared edges first
    frm, to, count = frm[order], to[order], count[order]
    first = np.ones(len(frm), bool)
    first[1:] = frm[1:] != frm[:-1]
    ok = first & (count >= min_contact)
    if not ok.any():
        return None
    target = np.arange(n + 1)
    target[frm[ok]] = to[ok]
    # a fragment may join a fragment that joins another (areas at least double
    # at each step, so this settles in a few rounds)
    while True:
        nxt = target[target]
        if np.array_equal(nxt, target):
            break
        target = nxt
    return target


def probabilities_to_labels(
    probs: np.ndarray,
    fg_threshold: float = 0.6,
    seed_threshold: float = 0.6,
    min_seed_px: int = 2,
    min_area_px: int = 8,
    grow_steps: int = 4,
    fragment_fraction: float = FRAGMENT_FRACTION,
    waist_ratio: float | None = WAIST_RATIO,
) -> tuple[np.ndarray, np.ndarray]:
    """Instance labels and per-object scores from ``(3, Y, X)`` class probabilities.

    Seeds are the connected interior regions (interior probability above
    `seed_threshold`); seeds grow over the foreground (interior + boundary
    above `fg_threshold`) by up to `grow_steps` pixels; foreground left
    without a seed (tiny objects that are all boundary) becomes objects of its
    own. Pieces under `fragment_fraction` of the median object area
    (`typical_area`: specks of debris do not count in it) join the larger
    object they touch (`merge_fragments`; 0 turns this off).
    Objects of at least `waist_ratio` x the median area are split at a
    waist of their shape (`split_waists`), then between two notches of their
    outline into two convex parts (`split_notches`; None turns both off).
    Objects under `min_area_px` are dropped.
    Whole-array numpy/scipy work, except a short loop over the few objects
    of at least `waist_ratio` x the median area.

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
    labels, areas = _merge_fragments(_grow(seeds, fg, grow_steps), fragment_fraction)
    if waist_ratio is not None:
        # both splits look at the same large objects: counted and boxed once
        # unless the first split changed them
        large: _Large | None = _large_objects(labels, waist_ratio, min_area_px, areas)
        split = split_waists(labels, waist_ratio, min_area_px=min_area_px, large=large)
        if split is not labels:
            labels, large = split, None
        labels = split_notches(
            labels, waist_ratio, min_area_px=min_area_px, large=large
        )
    return finish_labels(labels, fg_prob, fg, min_area_px)


class _Large(NamedTuple):
    """The objects of at least some multiple of a frame's median area."""

    labels: np.ndarray  #: their labels, ascending
    median: float  #: the median object area (px)
    boxes: list  #: `ndi.find_objects` slices, by label - 1 (up to the last)


#: objects under this fraction of the area-weighted median object do not count
#: in a frame's median object area (`typical_area`)
DEBRIS_FRACTION = 0.25


def typical_area(areas: np.ndarray) -> float:
    """A frame's median object area (px) from its objects' `areas` (0 for none).

    The median of the objects of at least `DEBRIS_FRACTION` x the
    area-weighted median (the area of the object that holds the median
    object pixel). Specks of debris, ghost fragments and pieces of a
    nucleus, however many, hold few pixels: they do not move the weighted
    median and do not count in the median, which stays that of the
    nuclei. A plain median of 7 nuclei and 12 specks is a speck's area, so
    the pieces of a nucleus stopped joining it and every nucleus counted
    as large (docs/benchmarks.md, Session 35). An object holding over half
    of all object pixels sets the median itself, so it is never "large": a
    clump of nuclei stays whole, and so does one large nucleus among a few
    small ones (leaving it out cut such nuclei on the synthetic sets; Session
    36).
    """
    a = np.sort(np.asarray(areas, np.float64).ravel())
    if a.size == 0:
        return 0.0
    cum = np.cumsum(a)
    weighted = a[min(int(np.searchsorted(cum, cum[-1] / 2)), a.size - 1)]
    return float(np.median(a[a >= DEBRIS_FRACTION * weighted]))


def _large_objects(
    labels: np.ndarray,
    ratio: float,
    min_area_px: int = 1,
    areas: np.ndarray | None = None,
) -> _Large:
    """The objects of at least `ratio` x the median area, the median, boxes.

    The median counts objects of at least `min_area_px`; no labels (and a
    median of 0) with fewer than two such objects. `areas` (a bincount of
    `labels`) when already counted.
    """
    if areas is None:
        n = int(labels.max()) if labels.size else 0
        areas = np.bincount(labels.ravel(), minlength=n + 1)
    present = areas[1:][areas[1:] >= max(1, min_area_px)]
    if present.size < 2:
        return _Large(np.zeros(0, np.int64), 0.0, [])
    median = typical_area(present)
    big = np.flatnonzero(areas >= ratio * median)
    big = big[big > 0]
    boxes = ndi.find_objects(labels, max_label=int(big[-1])) if big.size else []
    return _Large(big, median, boxes)


def split_waists(
    labels: np.ndarray,
    ratio: float = WAIST_RATIO,
    dynamic: float = WAIST_DYNAMIC,
    min_fraction: float = 0.4,
    min_area_px: int = 8,
    large: _Large | None = None,
) -> np.ndarray:
    """Split objects of at least `ratio` x the median area at a waist.

    Two nuclei pressed together that the network sees as one (no dip in
    its maps between them) still show the notches where their outlines
    meet. In an object that large, the distance to its edge has one peak
    per lobe; peaks that stand at least `dynamic` x the object's deepest
    distance above the saddle to a higher one (h-domes: one marker per dome,
    however many tops a flat ridge has) seed a watershed of the distance
    inside the object, and the object is split into those parts unless one
    is under `min_fraction` x the median area (objects under `min_area_px`,
    which will be dropped, do not count in the median). A single convex
    nucleus has one peak, however large, elongated or turned. Returns
    `labels` itself when nothing splits, else a copy (new labels above the
    largest). `large`: those objects when already found (`_large_objects`).
    """
    from skimage.morphology import local_maxima, reconstruction
    from skimage.segmentation import watershed

    lab = np.asarray(labels)
    big, median, boxes = large or _large_objects(lab, ratio, min_area_px)
    if big.size == 0:
        return labels
    n = int(lab.max())
    out: np.ndarray | None = None
    next_label = n + 1
    for i in big:
        ys, xs = boxes[i - 1]
        window = (
            slice(max(0, ys.start - 1), ys.stop + 1),
            slice(max(0, xs.start - 1), xs.stop + 1),
        )
        mine = lab[window] == i
        depth = ndi.distance_transform_edt(mine)
        deepest = float(depth.max())
        if deepest < 2:
            continue
        # the peaks of an object over 48 px across are found on every second
        # pixel (the domes are the costly step: ~0.8 ms a 70 px object)
        step = 2 if max(mine.shape) > 48 else 1
        coarse = depth[::step, ::step]
        # each dome's top holds a regional maximum of the distance (the domes
        # only remove maxima): with a single one, as most large single nuclei
        # have, there is no waist, and the domes need not be built
        if _regional_maxima(coarse, mine[::step, ::step]) < 2:
            continue
        # the h-domes: each peak lowered by h stays a plateau of its own only
        # where it stands h above the saddle to a higher one (skimage's
        # `h_maxima` marks the tops themselves: the ridge of a long nucleus
        # turned off the pixel grid has several, a fraction of a pixel apart)
        domes = reconstruction(coarse - dynamic * deepest, coarse)
        found = local_maxima(domes) & mine[::step, ::step]
        peaks = np.zeros(mine.shape, np.int32)
        peaks[::step, ::step], k = ndi.label(found, np.ones((3, 3), bool))
        if k < 2:
            continue
        parts = watershed(-depth, peaks, mask=mine)
        sizes = np.bincount(parts.ravel(), minlength=k + 1)[1:]
        if (sizes < min_fraction * median).any():
            continue
        if out is None:
            out = lab.astype(np.int32)
        sub = out[window]
        for j in range(2, k + 1):
            sub[parts == j] = next_label
            next_label += 1
    return labels if out is None else out


def _regional_maxima(image: np.ndarray, mask: np.ndarray) -> int:
    """How many regional maxima (8-connected plateaus) `image` has in `mask`.

    The pixels that equal their 3x3 maximum hold every regional maximum, and
    two maxima never share a connected piece of them (neighbours in such a
    piece are equal): one piece, so one maximum, is settled without
    `local_maxima` (~45 against ~120 µs on a nucleus-sized window).
    """
    from skimage.morphology import local_maxima

    eight = np.ones((3, 3), bool)
    flat_tops = (image == ndi.maximum_filter(image, footprint=eight)) & mask
    if ndi.label(flat_tops, eight)[1] < 2:
        return int(flat_tops.any())
    return int(ndi.label(local_maxima(image) & mask, eight)[1])


def split_notches(
    labels: np.ndarray,
    ratio: float = WAIST_RATIO,
    min_depth: float = NOTCH_DEPTH_PX,
    max_cut: float = NOTCH_CUT,
    min_solidity: float = NOTCH_SOLIDITY,
    min_fraction: float = 0.4,
    min_area_px: int = 8,
    large: _Large | None = None,
) -> np.ndarray:
    """Split objects of at least `ratio` x the median area between two notches.

    Two convex nuclei pressed side by side along a long, flat contact make
    one object whose distance to its edge has a single peak, on the contact
    (so `split_waists` keeps it whole), but whose outline has a notch at each
    end of the contact. Between two neighbouring corners of the outline's
    convex hull the outline dents inwards; its notch is the point farthest
    from that hull edge (the depth). Among notches at least `min_depth` px
    deep, the pair whose straight cut is shortest relative to their summed
    depth is tried: the object is split along the cut when the cut runs
    inside it, is at most `max_cut` x the summed depth, and leaves two
    parts, each at least `min_fraction` x the median area (objects under
    `min_area_px` do not count in the median) and convex (area over
    convex-hull area at least `min_solidity`). A single nucleus, a
    kidney-shaped one included, has at most one such notch or does not fall
    into two convex halves. Outline geometry only (no per-pixel work but
    the final split): ~0.6 ms an object on 2 CPU cores. Returns `labels`
    itself when nothing splits, else a copy (new labels above the largest).
    `large`: those objects when already found (`_large_objects`).
    """
    from scipy.spatial import ConvexHull, QhullError
    from skimage.draw import polygon
    from skimage.measure import find_contours

    lab = np.asarray(labels)
    big, median, boxes = large or _large_objects(lab, ratio, min_area_px)
    if big.size == 0:
        return labels
    out: np.ndarray | None = None
    next_label = int(lab.max()) + 1
    for i in big:
        window = boxes[i - 1]
        mine = lab[window] == i
        # the outer outline, along pixel edges (padded: closed at the border)
        outline = max(find_contours(np.pad(mine, 1).astype(np.float32), 0.5), key=len)
        outline = outline[:-1] - 1.0
        if len(outline) < 8:
            continue
        # start the outline at a hull corner: each hull edge's stretch of
        # outline is then one slice
        try:
            corners = np.sort(ConvexHull(outline).vertices)
        except QhullError:  # a degenerate (flat) outline
            continue
        outline = np.roll(outline, -corners[0], axis=0)
        corners = corners - corners[0]
        which = np.searchsorted(corners, np.arange(len(outline)), side="right") - 1
        start = outline[corners[which]]
        edge = outline[corners[(which + 1) % len(corners)]] - start
        rel = outline - start
        depth = np.abs(rel[:, 0] * edge[:, 1] - rel[:, 1] * edge[:, 0]) / np.maximum(
            np.hypot(edge[:, 0], edge[:, 1]), 1e-9
        )
        ends = np.append(corners[1:], len(outline))
        notches: list[tuple[int, float]] = []
        for k in np.flatnonzero(np.maximum.reduceat(depth, corners) >= min_depth):
            j = int(corners[k] + np.argmax(depth[corners[k] : ends[k]]))
            notches.append((j, float(depth[j])))
        best: tuple[float, tuple[np.ndarray, np.ndarray]] | None = None
        for x in range(len(notches)):
            for y in range(x + 1, len(notches)):
                (ia, da), (ib, db) = sorted((notches[x], notches[y]))
                pa, pb = outline[ia], outline[ib]
                length = float(np.hypot(*(pa - pb)))
                rate = length / (da + db)
                if rate > max_cut or (best is not None and rate >= best[0]):
                    continue
                # the cut runs inside the object
                steps = np.linspace(0.0, 1.0, max(2, int(2 * length) + 1))[:, None]
                on = np.rint(pa + steps * (pb - pa)).astype(int)
                on = np.clip(on, 0, np.array(mine.shape) - 1)
                if mine[on[:, 0], on[:, 1]].mean() < 0.9:
                    continue
                parts = (
                    outline[ia : ib + 1],
                    np.concatenate([outline[ib:], outline[: ia + 1]]),
                )
                if min(_area(part) for part in parts) < min_fraction * median:
                    continue
                best = (rate, parts)
        if best is None:
            continue
        parts = best[1]
        if any(_area(part) < min_solidity * ConvexHull(part).volume for part in parts):
            continue
        # the second part: the object's pixels whose centres lie inside it
        rr, cc = polygon(parts[1][:, 0], parts[1][:, 1], mine.shape)
        second = np.zeros_like(mine)
        second[rr, cc] = True
        second &= mine
        if not second.any() or second.sum() == mine.sum():
            continue
        if out is None:
            out = lab.astype(np.int32)
        out[window][second] = next_label
        next_label += 1
    return labels if out is None else out


def _area(poly: np.ndarray) -> float:
    """Area of a closed polygon ``(N, 2)`` (shoelace)."""
    y, x = poly[:, 0], poly[:, 1]
    return 0.5 * abs(float(np.dot(y, np.roll(x, -1)) - np.dot(x, np.roll(y, -1))))


def finish_labels(
    labels: np.ndarray, fg_prob: np.ndarray, fg: np.ndarray, min_area_px: int = 8
) -> tuple[np.ndarray, np.ndarray]:
    """Drop objects under `min_area_px`, number the rest 1..K, score them.

    The last step of `probabilities_to_labels` (and of a re-read, see
    `reread_windows`): `labels` (any numbering) lie inside the foreground
    `fg`; an object's score is its mean foreground probability `fg_prob`.
    Returns uint16 labels and float32 scores.
    """
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


#: objects of at least this many times the frame's median object area are
#: read again in a crop of their own (`reread_windows`) where a segmenter's
#: ``reread_ratio`` turns it on; 1.7 was chosen on the synthetic tuning sets
#: (1.4-2.0 alike there; 1.7 reads fewer crops than 1.4)
REREAD_RATIO = 1.7
#: side (px at the network's input) of the crop around such an object
REREAD_SIDE = 96


class Rereads(NamedTuple):
    """What `reread_windows` found: large objects and their crops."""

    windows: list[tuple[int, int, int]]  #: (label, y0, x0) per large object
    shape: tuple[int, int]  #: the crops' common shape
    median_area: float  #: the frame's median object area (px)


def reread_windows(
    labels: np.ndarray, ratio: float = REREAD_RATIO, side: int = REREAD_SIDE
) -> Rereads:
    """Large objects and the crops to read them again in.

    An object of at least `ratio` x the frame's median object area may be
    two or more nuclei the network saw as one: normalised over the whole
    frame, the faint dip between two dim nuclei pressed together is lost.
    Read again in a crop normalised on its own, the network often separates
    them (`split_by_reread`). The crops share one shape (one batch): `side`
    px, or 1.25 x the largest such object's extent if that is more, never
    more than the frame; each is centred on its object and shifted to lie
    inside the frame. No windows when the frame has fewer than two objects
    or none that large.
    """
    lab = np.asarray(labels)
    big, median, boxes = _large_objects(lab, ratio)
    if big.size == 0:
        return Rereads([], (0, 0), median)
    h, w = lab.shape
    extent = max(
        max(boxes[i - 1][0].stop - boxes[i - 1][0].start for i in big),
        max(boxes[i - 1][1].stop - boxes[i - 1][1].start for i in big),
    )
    want = max(side, int(np.ceil(1.25 * extent)))
    ch, cw = min(h, want), min(w, want)
    out = []
    for i in big:
        ys, xs = boxes[i - 1]
        y0 = min(max(0, (ys.start + ys.stop - ch) // 2), h - ch)
        x0 = min(max(0, (xs.start + xs.stop - cw) // 2), w - cw)
        out.append((int(i), y0, x0))
    return Rereads(out, (ch, cw), median)


def split_by_reread(
    labels: np.ndarray,
    label: int,
    y0: int,
    x0: int,
    crop_labels: np.ndarray,
    next_label: int,
    median_area: float,
    min_fraction: float = 0.3,
    inside: float = 0.6,
) -> int:
    """Split object `label` of `labels` (in place) as the crop read it.

    `crop_labels` are the instances of the crop at ``(y0, x0)``. The crop's
    objects that lie mostly (`inside`) within the object and cover at least
    `min_fraction` x `median_area` (the frame's median object) are its
    parts; with two or more, every part but the largest gets a new label
    from `next_label` on (the rest of the object keeps `label`). Returns the
    next free label.
    """
    ch, cw = crop_labels.shape
    window = labels[y0 : y0 + ch, x0 : x0 + cw]
    mine = window == label
    parts, counts = np.unique(crop_labels[mine], return_counts=True)
    if parts.size < 2:
        return next_label
    totals = np.bincount(crop_labels.ravel(), minlength=int(parts.max()) + 1)
    good = (
        (parts > 0)
        & (counts >= min_fraction * median_area)
        & (counts >= inside * totals[parts])
    )
    if good.sum() < 2:
        return next_label
    order = np.argsort(-counts[good])
    for part in parts[good][order[1:]]:
        window[mine & (crop_labels == part)] = next_label
        next_label += 1
    return next_label


def reread_large(
    image: np.ndarray,
    probs: np.ndarray,
    labels: np.ndarray,
    scores: np.ndarray,
    read: Callable[[np.ndarray], Sequence[np.ndarray]],
    ratio: float = REREAD_RATIO,
    side: int = REREAD_SIDE,
    fg_threshold: float = 0.6,
    seed_threshold: float = 0.6,
    min_area_px: int = 8,
    fragment_fraction: float = FRAGMENT_FRACTION,
) -> tuple[np.ndarray, np.ndarray]:
    """`labels` with large objects split where a crop of their own says so.

    `labels` and `scores` come from `probabilities_to_labels` on `probs`,
    the ``(3, Y, X)`` class probabilities of `image`. The objects of at
    least `ratio` x the median area (`reread_windows`) are cut out of the
    raw `image` as ``(N, Y', X')`` crops (one batch) and handed to `read`,
    which must normalise each crop on its own and return its class
    probabilities (the model's own path); each crop's instances may split its
    object (`split_by_reread`, parts of at least 0.3 x the median area and
    never under `fragment_fraction` x it). Returns the labels and scores
    unchanged when nothing splits; else renumbered labels (small objects
    dropped as `probabilities_to_labels` does) and fresh scores.
    """
    found = reread_windows(labels, ratio, side)
    if not found.windows:
        return labels, scores
    ch, cw = found.shape
    crops = np.stack([image[y : y + ch, x : x + cw] for _, y, x in found.windows])
    out = labels.astype(np.int32)
    first = next_label = int(out.max()) + 1
    for (label, y, x), cp in zip(found.windows, read(crops), strict=True):
        crop_labels, _ = probabilities_to_labels(
            cp,
            fg_threshold=fg_threshold,
            seed_threshold=seed_threshold,
            min_area_px=min_area_px,
            fragment_fraction=fragment_fraction,
            waist_ratio=None,  # a crop's median is not the frame's
        )
        # no part is a piece `merge_fragments` would fold into a neighbour:
        # the re-read only splits (parts of 0.3-0.4 x the median, folded
        # again frame-wide, joined other objects they touched)
        next_label = split_by_reread(
            out,
            label,
            y,
            x,
            crop_labels,
            next_label,
            found.median_area,
            min_fraction=max(0.3, fragment_fraction),
        )
    if next_label == first:
        return labels, scores  # nothing split
    fg_prob = probs[1] + probs[2]
    return finish_labels(out, fg_prob, fg_prob > fg_threshold, min_area_px)
