"""Every score with n, its standard error and a 95% interval: Wilson intervals for accuracies,
the delta method for bits per byte."""

from __future__ import annotations

import math

import numpy as np

Z95 = 1.959963984540054


def proportion(hits: np.ndarray, chance: float) -> dict:
    """Accuracy (%) of 0/1 outcomes with its standard error and a 95% Wilson interval, which stays
    inside [0, 100] and is honest at small n and near 0 (where the normal interval is not)."""
    n = len(hits)
    p = float(np.mean(hits)) if n else 0.0
    se = math.sqrt(p * (1 - p) / n) if n else float("nan")
    denom = 1 + Z95**2 / n
    centre = (p + Z95**2 / (2 * n)) / denom
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / denom
    lo, hi = max(0.0, centre - half), min(1.0, centre + half)
    return {
        "score": 100 * p,
        "stderr": 100 * se,
        "ci95": [100 * lo, 100 * hi],
        "n": n,
        "chance": 100 * chance,
        "at_chance": bool(lo <= chance <= hi),
    }


def ratio_bpb(nats: np.ndarray, n_bytes: np.ndarray) -> dict:
    """Bits per byte (sum of bits over sum of bytes) with a delta-method standard error."""
    n = len(nats)
    bits = nats / math.log(2)
    r = float(bits.sum() / n_bytes.sum())
    se = (
        float(np.sqrt(np.sum((bits - r * n_bytes) ** 2) / (n * (n - 1))) / n_bytes.mean())
        if n > 1
        else float("nan")
    )
    return {"score": r, "stderr": se, "ci95": [r - Z95 * se, r + Z95 * se], "n": n}
