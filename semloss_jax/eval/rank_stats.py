"""Statistics of one sample with paired bootstrap 95% intervals: any statistic (median, ...),
Spearman rank correlation and ROC AUC.

    bootstrap_stat_ci(stat, x, y)          -> (lo, hi) of stat over paired resamples
    spearman_summary(x, y)                 -> {"rho", "ci": [lo, hi], "n", ...}
    auc_summary(scores, positive)          -> {"auc", "ci": [lo, hi], "n", "n_pos", ...}

The bootstrap resamples whole examples (the pairs (x_i, y_i) stay together), with a seeded
numpy Generator, vectorized over resamples in chunks; a resample on which the statistic is
undefined (a constant sample, one class only) is dropped, and the interval is widened if
needed to contain the estimate (semloss_jax.eval.metrics.percentile_interval). Undefined
estimates are None (JSON null), never NaN.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from semloss_jax.errors import EvalError
from semloss_jax.eval.metrics import (
    DEFAULT_LEVEL,
    DEFAULT_N_BOOT,
    DEFAULT_SEED,
    bootstrap_stats,
    percentile_interval,
)


def _rankdata(a: np.ndarray) -> np.ndarray:
    """Average ranks along the last axis (ties share their mean rank)."""
    from scipy.stats import rankdata  # scipy.stats takes ~1.2 s to import: loaded on first use
    return rankdata(a, axis=-1)


def bootstrap_stat_ci(stat: Callable[..., np.ndarray], *arrays, estimate: float,
                      n_boot: int = DEFAULT_N_BOOT, seed: int = DEFAULT_SEED,
                      level: float = DEFAULT_LEVEL) -> tuple[float, float]:
    """Percentile bootstrap interval of a statistic (see bootstrap_stats), containing estimate."""
    return percentile_interval(bootstrap_stats(stat, *arrays, n_boot=n_boot, seed=seed),
                               estimate, level)


def _spearman_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman's rho per row of x, y [m, n]: Pearson correlation of average ranks (ties get
    their mean rank, as scipy.stats.spearmanr); NaN where a row is constant."""
    rx = _rankdata(x)
    ry = _rankdata(y)
    rx = rx - rx.mean(-1, keepdims=True)
    ry = ry - ry.mean(-1, keepdims=True)
    den = np.sqrt((rx * rx).sum(-1) * (ry * ry).sum(-1))
    return np.where(den > 0, (rx * ry).sum(-1) / np.where(den > 0, den, 1.0), np.nan)


def _auc_rows(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """ROC AUC per row (Mann-Whitney U / (n_pos * n_neg), ties count one half); NaN where a
    row has one class only."""
    r = _rankdata(scores)
    pos = positive > 0.5
    n1 = pos.sum(-1)
    n0 = pos.shape[-1] - n1
    u = (r * pos).sum(-1) - n1 * (n1 + 1) / 2.0
    den = n1 * n0
    return np.where(den > 0, u / np.where(den > 0, den, 1), np.nan)


def spearman_summary(x, y, *, n_boot: int = DEFAULT_N_BOOT, seed: int = DEFAULT_SEED,
                     level: float = DEFAULT_LEVEL) -> dict:
    """Spearman's rank correlation of x and y with a paired bootstrap interval."""
    x = np.asarray(x, np.float64).reshape(-1)
    y = np.asarray(y, np.float64).reshape(-1)
    if x.shape != y.shape:
        raise EvalError(f"{x.size} x values but {y.size} y values")
    rho = float(_spearman_rows(x[None], y[None])[0]) if x.size else float("nan")
    if not np.isfinite(rho):
        return {"rho": None, "ci": [None, None], "n": int(x.size), "level": level,
                "n_boot": n_boot}
    lo, hi = bootstrap_stat_ci(_spearman_rows, x, y, estimate=rho, n_boot=n_boot, seed=seed,
                               level=level)
    return {"rho": rho, "ci": [lo, hi], "n": int(x.size), "level": level, "n_boot": n_boot}


def auc_summary(scores, positive, *, n_boot: int = DEFAULT_N_BOOT, seed: int = DEFAULT_SEED,
                level: float = DEFAULT_LEVEL) -> dict:
    """ROC AUC of scores for the positive flags, with a paired bootstrap interval."""
    s = np.asarray(scores, np.float64).reshape(-1)
    p = np.asarray(positive, np.float64).reshape(-1)
    if s.shape != p.shape:
        raise EvalError(f"{s.size} scores but {p.size} flags")
    n_pos = int((p > 0.5).sum())
    auc = float(_auc_rows(s[None], p[None])[0]) if s.size else float("nan")
    base = {"n": int(s.size), "n_pos": n_pos, "level": level, "n_boot": n_boot}
    if not np.isfinite(auc):
        return {"auc": None, "ci": [None, None], **base}
    lo, hi = bootstrap_stat_ci(_auc_rows, s, p, estimate=auc, n_boot=n_boot, seed=seed,
                               level=level)
    return {"auc": auc, "ci": [lo, hi], **base}
