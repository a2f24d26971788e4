"""Instance-segmentation accuracy: IoU matching, F1 and the DSB-2018 mean AP.

Matching is one-to-one between predicted and true objects with IoU above a
threshold (for thresholds ≥ 0.5 a match is unique, so no assignment solver
is needed). The IoU table is built from one contingency count over the
pixels (vectorised; no loop per object).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

#: IoU thresholds of the mean AP (Data Science Bowl 2018 definition)
AP_THRESHOLDS = (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9)


def iou_matrix(true: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """``(n_true, n_pred)`` IoU of every true/predicted object pair.

    Labels need not be consecutive; rows/columns follow sorted unique labels.
    """
    t = np.asarray(true).ravel()
    p = np.asarray(pred).ravel()
    if t.shape != p.shape:
        raise ValueError(f"shape mismatch: {np.shape(true)} vs {np.shape(pred)}")
    t_ids, t_inv = np.unique(t, return_inverse=True)
    p_ids, p_inv = np.unique(p, return_inverse=True)
    nt, np_ = len(t_ids), len(p_ids)
    counts = np.bincount(t_inv * np_ + p_inv, minlength=nt * np_).reshape(nt, np_)
    area_t = counts.sum(1, keepdims=True)
    area_p = counts.sum(0, keepdims=True)
    union = area_t + area_p - counts
    iou = counts / np.maximum(union, 1)
    keep_t = t_ids != 0
    keep_p = p_ids != 0
    return iou[keep_t][:, keep_p]


def match_counts(iou: np.ndarray, threshold: float) -> tuple[int, int, int]:
    """(TP, FP, FN) at an IoU threshold ≥ 0.5."""
    if threshold < 0.5:
        raise ValueError("thresholds below 0.5 need an assignment solver")
    n_true, n_pred = iou.shape
    tp = int((iou > threshold).sum()) if iou.size else 0
    return tp, n_pred - tp, n_true - tp


def scores(
    pairs: Iterable[tuple[np.ndarray, np.ndarray]],
    thresholds: Sequence[float] = AP_THRESHOLDS,
) -> dict[str, float]:
    """Dataset accuracy of ``(true, pred)`` label pairs.

    Returns
    -------
    dict
        ``f1@0.5``, ``precision@0.5``, ``recall@0.5`` (objects pooled over the
        dataset), ``mean_ap`` (per-image DSB-2018 score TP/(TP+FP+FN) averaged
        over `thresholds`, then over images), ``n_true`` and ``n_pred``.
    """
    tp5 = fp5 = fn5 = 0
    n_true = n_pred = 0
    per_image_ap = []
    for true, pred in pairs:
        iou = iou_matrix(true, pred)
        n_true += iou.shape[0]
        n_pred += iou.shape[1]
        aps = []
        for thr in thresholds:
            tp, fp, fn = match_counts(iou, thr)
            if thr == 0.5:
                tp5, fp5, fn5 = tp5 + tp, fp5 + fp, fn5 + fn
            denom = tp + fp + fn
            aps.append(tp / denom if denom else 1.0)
        per_image_ap.append(float(np.mean(aps)))
    precision = tp5 / (tp5 + fp5) if tp5 + fp5 else 1.0
    recall = tp5 / (tp5 + fn5) if tp5 + fn5 else 1.0
    f1 = 2 * tp5 / (2 * tp5 + fp5 + fn5) if (tp5 + fp5 + fn5) else 1.0
    return {
        "f1@0.5": round(f1, 4),
        "precision@0.5": round(precision, 4),
        "recall@0.5": round(recall, 4),
        "mean_ap": round(float(np.mean(per_image_ap)) if per_image_ap else 1.0, 4),
        "n_true": n_true,
        "n_pred": n_pred,
    }
