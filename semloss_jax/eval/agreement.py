"""Agreement between two labellings of the same items: confusion matrix and Cohen's kappa.

    kappa = (p_o - p_e) / (1 - p_e)

p_o is the observed share of items given the same class by both labellings; p_e the share
expected by chance from the two labellings' class frequencies, sum_k (row_k / n)(col_k / n).
Kappa is 1 for perfect agreement, 0 for chance-level agreement, negative below chance; it is
undefined (NaN) when p_e = 1 (both labellings put every item in the same single class).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from semloss_jax.errors import EvalError


def confusion(first: Sequence[str], second: Sequence[str], classes: Sequence[str]) -> np.ndarray:
    """[len(classes), len(classes)] counts: rows = the first labelling, columns = the second."""
    if len(first) != len(second):
        raise EvalError(f"agreement needs the same items twice: {len(first)} vs {len(second)} labels")
    index = {c: i for i, c in enumerate(classes)}
    m = np.zeros((len(classes), len(classes)), np.int64)
    for a, b in zip(first, second):
        if a not in index or b not in index:
            bad = a if a not in index else b
            raise EvalError(f"label {bad!r} is not one of {tuple(classes)}")
        m[index[a], index[b]] += 1
    return m


def kappa_from_confusion(m: np.ndarray) -> float:
    """Cohen's kappa of a square confusion matrix (NaN when undefined: no items, or p_e = 1)."""
    m = np.asarray(m, np.float64)
    n = m.sum()
    if n == 0:
        return math.nan
    p_o = np.trace(m) / n
    p_e = float((m.sum(axis=1) / n) @ (m.sum(axis=0) / n))
    if math.isclose(p_e, 1.0):
        return math.nan
    return float((p_o - p_e) / (1.0 - p_e))


def cohen_kappa(first: Sequence[str], second: Sequence[str], classes: Sequence[str]) -> float:
    """Cohen's kappa between two labellings of the same items over the given classes."""
    return kappa_from_confusion(confusion(first, second, classes))


def agreement_report(first: Sequence[str], second: Sequence[str], classes: Sequence[str]) -> dict:
    """n, observed agreement, kappa and the confusion matrix (as nested lists) of two labellings."""
    m = confusion(first, second, classes)
    n = int(m.sum())
    return {"n": n, "agree": int(np.trace(m)),
            "observed_agreement": float(np.trace(m) / n) if n else math.nan,
            "kappa": kappa_from_confusion(m), "classes": list(classes),
            "confusion": m.tolist()}


def format_confusion(m: Sequence[Sequence[int]], classes: Sequence[str],
                     row_title: str = "first", col_title: str = "relabel") -> str:
    """A plain-text table of a confusion matrix (rows: row_title, columns: col_title)."""
    w = max(len(row_title) + len(col_title) + 4, *(len(c) for c in classes)) + 1
    head = f"{row_title} \\ {col_title}".ljust(w) + "".join(c.rjust(w) for c in classes)
    lines = [head]
    for c, row in zip(classes, m):
        lines.append(c.ljust(w) + "".join(str(int(v)).rjust(w) for v in row))
    return "\n".join(lines)
