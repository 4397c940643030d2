"""Detection metrics for the generated-image detector.

Convention (docs/design.md §1): the detector outputs ``p_fake = sigmoid(logit)``; label ``1`` means
*generated* (fake) and ``0`` means *real*. Every function here takes ``scores`` = ``p_fake`` in ``[0, 1]``
and ``labels`` in ``{0, 1}``, as 1-D torch tensors, numpy arrays or sequences of equal length.

- :func:`detection_metrics`: AUC, accuracy, F1, equal error rate and class counts.
- :func:`calibration_bins`: reliability-diagram bins (mean predicted ``p_fake`` vs observed fake fraction).
- :func:`save_calibration_plot`: a small PNG reliability diagram drawn with PIL (no matplotlib).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from sklearn.metrics import f1_score, roc_auc_score, roc_curve

__all__ = ["detection_metrics", "calibration_bins", "save_calibration_plot"]


def _as_1d(x: Any, name: str) -> np.ndarray:
    """Convert a torch tensor / numpy array / sequence to a flat float64 numpy array."""
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach().float().cpu().numpy()
    arr = np.asarray(x, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or Inf values")
    return arr


def _check_inputs(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert ``(scores, labels)``; returns ``(scores (N,) float64, labels (N,) int64)``."""
    s = _as_1d(scores, "scores")
    y = _as_1d(labels, "labels")
    if s.shape[0] != y.shape[0]:
        raise ValueError(f"scores and labels differ in length: {s.shape[0]} vs {y.shape[0]}")
    if s.shape[0] == 0:
        raise ValueError("scores and labels are empty")
    if not np.all((y == 0) | (y == 1)):
        raise ValueError("labels must be 0 (real) or 1 (generated)")
    return s, y.astype(np.int64)


def _equal_error_rate(labels: np.ndarray, scores: np.ndarray) -> float:
    """EER: the point on the ROC curve where FPR == FNR (= 1 - TPR), linearly interpolated.

    Along the ROC curve FPR rises and FNR falls, so ``d = FNR - FPR`` goes from >= 0 to <= 0; the EER is
    read off where the segment between the last ``d > 0`` point and the first ``d <= 0`` point crosses 0.
    """
    fpr, tpr, _ = roc_curve(labels, scores)
    fnr = 1.0 - tpr
    d = fnr - fpr  # (K,) non-increasing, d[0] = 1 (fpr = 0, tpr = 0), d[-1] = -1
    i = int(np.argmax(d <= 0))  # first index at or past the crossing
    if i == 0 or d[i] == 0:
        return float(fpr[i])
    t = d[i - 1] / (d[i - 1] - d[i])  # fraction of the segment (i-1 -> i) where d crosses 0
    return float(fpr[i - 1] + t * (fpr[i] - fpr[i - 1]))


def detection_metrics(scores: Any, labels: Any, threshold: float = 0.5) -> dict:
    """Binary detection metrics for ``p_fake`` scores.

    Args:
        scores: (N,) predicted ``p_fake`` in [0, 1] (torch tensor, numpy array or sequence).
        labels: (N,) ground truth, 1 = generated, 0 = real.
        threshold: a sample is predicted fake when ``score >= threshold`` (for ``acc`` and ``f1``).

    Returns:
        ``{"auc", "acc", "f1", "eer", "n_real", "n_fake"}``; the first four are floats in [0, 1]
        (``f1`` with the fake class as positive), the counts are ints.

    Raises:
        ValueError: lengths differ, inputs empty / non-finite / labels not binary, or only one class present
            (AUC and EER are undefined then).
    """
    s, y = _check_inputs(scores, labels)
    n_fake = int(y.sum())
    n_real = int(y.shape[0] - n_fake)
    if n_fake == 0 or n_real == 0:
        raise ValueError(
            f"detection metrics need both classes; got n_real={n_real}, n_fake={n_fake} "
            "(label 1 = generated, 0 = real)"
        )
    pred = (s >= threshold).astype(np.int64)
    return {
        "auc": float(roc_auc_score(y, s)),
        "acc": float(np.mean(pred == y)),
        "f1": float(f1_score(y, pred, zero_division=0)),
        "eer": _equal_error_rate(y, s),
        "n_real": n_real,
        "n_fake": n_fake,
    }


def calibration_bins(scores: Any, labels: Any, n_bins: int = 10) -> list[dict]:
    """Reliability-diagram bins over ``[0, 1]`` split into ``n_bins`` equal-width bins.

    Bin ``b`` holds scores in ``[b/n, (b+1)/n)`` (the last bin also holds 1.0). Returns one dict per bin:
    ``lo``, ``hi`` (bin edges), ``mean_predicted`` (mean ``p_fake`` in the bin), ``observed_fraction``
    (fraction of label-1 samples in the bin) and ``count``; for an empty bin the two means are ``None``.
    A perfectly calibrated detector has ``mean_predicted == observed_fraction`` in every bin.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    s, y = _check_inputs(scores, labels)
    idx = np.clip((np.clip(s, 0.0, 1.0) * n_bins).astype(np.int64), 0, n_bins - 1)  # (N,) bin index
    bins = []
    for b in range(n_bins):
        m = idx == b
        count = int(m.sum())
        bins.append({
            "lo": b / n_bins,
            "hi": (b + 1) / n_bins,
            "mean_predicted": float(s[m].mean()) if count else None,
            "observed_fraction": float(y[m].mean()) if count else None,
            "count": count,
        })
    return bins


def save_calibration_plot(bins: list[dict], path: str | Path, size: int = 320) -> Path:
    """Write a reliability diagram of ``bins`` (from :func:`calibration_bins`) as a ``size`` x ``size`` PNG.

    Drawn with PIL only: axes over [0, 1] x [0, 1], the dashed-grey diagonal (perfect calibration), one blue
    bar per non-empty bin with height = observed fake fraction, and a red dot at
    ``(mean_predicted, observed_fraction)``. Returns the path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    left, top, right, bottom = 36, 24, size - 12, size - 30  # plot area in pixels
    w, h = right - left, bottom - top

    def px(x: float, y: float) -> tuple[float, float]:
        """Data coordinates in [0, 1]^2 -> pixel coordinates (y axis upward)."""
        return left + x * w, bottom - y * h

    for b in bins:  # bars
        if b["count"] and b["observed_fraction"] is not None:
            x0, y0 = px(b["lo"], b["observed_fraction"])
            x1, _ = px(b["hi"], 0.0)
            draw.rectangle([x0 + 1, y0, x1 - 1, bottom], fill=(150, 180, 230), outline=(60, 90, 160))
    n_dash = 40  # diagonal, dashed
    for k in range(0, n_dash, 2):
        draw.line([px(k / n_dash, k / n_dash), px((k + 1) / n_dash, (k + 1) / n_dash)], fill=(120, 120, 120), width=1)
    for b in bins:  # points
        if b["count"] and b["mean_predicted"] is not None:
            cx, cy = px(b["mean_predicted"], b["observed_fraction"])
            draw.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=(210, 40, 40))
    draw.line([(left, top), (left, bottom), (right, bottom)], fill="black", width=1)  # axes
    for t in (0.0, 0.5, 1.0):  # ticks and labels
        x, y = px(t, t)
        draw.line([(x, bottom), (x, bottom + 4)], fill="black")
        draw.line([(left - 4, y), (left, y)], fill="black")
        draw.text((x - 6, bottom + 6), f"{t:g}", fill="black")
        draw.text((left - 24, y - 6), f"{t:g}", fill="black")
    draw.text((left + w // 2 - 40, size - 14), "predicted p_fake", fill="black")
    draw.text((left, 6), "reliability: observed fake fraction", fill="black")
    img.save(path, format="PNG")
    return path
