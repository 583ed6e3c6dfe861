"""The rule that picks each method's setting on the VALIDATION split, fixed before any result.

    chosen = select_setting(rows, reference_ce=sft_val_ce)

Every method with a sweep (λ for TA-SFT, NLL ascent, unlikelihood and DPO; N for SafeInstr)
is reduced to one setting by this rule, applied to validation figures only:

1. eligible: benign validation CE <= (1 + CE_MARGIN) x SFT's benign validation CE (language
   ability kept within 5% of the same budget without any safety data);
2. among the eligible settings, the lowest validation harmful rate (judge v2 on the replies to
   harmful_prompts/val); ties go to the smaller setting (less pressure), then to the name;
3. when no setting is eligible, the one with the lowest benign validation CE (the least damage),
   marked `eligible: False` in the result.

`ranked` orders the eligible settings the same way (the 2 best λ of TA-SFT LB get the exact
one-hot EMD runs).

Before the rule chooses, each finished sweep gets one more setting, `refine_setting` (docs/STUDY.md,
amendment 2 of 2026-12-06): the geometric mean of its largest eligible setting and the next
larger, ineligible one, so that every method is chosen near the CE bound rather than wherever
its grid happens to stop; 3x its largest setting when that one is still eligible; a third of its
smallest when none is.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from semloss_jax.errors import EvalError

CE_MARGIN = 0.05


def _check(rows: Sequence[Mapping], reference_ce: float) -> None:
    if not rows:
        raise EvalError("select_setting: no rows to choose from")
    if not (isinstance(reference_ce, (int, float)) and math.isfinite(reference_ce) and reference_ce > 0):
        raise EvalError(f"select_setting: the reference CE must be a positive number, got {reference_ce!r}")
    for r in rows:
        for k in ("name", "setting", "val_harmful_rate", "val_benign_ce"):
            if r.get(k) is None:
                raise EvalError(f"select_setting: row {r.get('name', '?')!r} has no {k!r}")


def is_eligible(row: Mapping, reference_ce: float, margin: float = CE_MARGIN) -> bool:
    """Whether the row's benign validation CE is within (1 + margin) x reference_ce."""
    return float(row["val_benign_ce"]) <= (1.0 + margin) * float(reference_ce)


def ranked(rows: Sequence[Mapping], reference_ce: float, margin: float = CE_MARGIN) -> list[Mapping]:
    """The eligible rows, best first: lowest harmful rate, then smaller setting, then name."""
    _check(rows, reference_ce)
    ok = [r for r in rows if is_eligible(r, reference_ce, margin)]
    return sorted(ok, key=lambda r: (float(r["val_harmful_rate"]), float(r["setting"]), str(r["name"])))


def select_setting(rows: Sequence[Mapping], reference_ce: float, margin: float = CE_MARGIN) -> dict:
    """The chosen row (a copy) with `eligible` and `rule` added (see the module docstring)."""
    best = ranked(rows, reference_ce, margin)
    if best:
        return {**best[0], "eligible": True, "rule": f"lowest val harmful rate with CE <= "
                                                      f"{1 + margin:.2f} x {reference_ce:.4f}"}
    least = min(rows, key=lambda r: (float(r["val_benign_ce"]), float(r["setting"]), str(r["name"])))
    return {**least, "eligible": False, "rule": f"no setting with CE <= {1 + margin:.2f} x "
                                                 f"{reference_ce:.4f}: the lowest CE"}


def refine_setting(rows: Sequence[Mapping], reference_ce: float, margin: float = CE_MARGIN, *,
                   integer: bool = False, maximum: float | None = None) -> float:
    """The extra setting of a finished sweep (module docstring), to 3 significant digits (to an
    integer, at least 1, for integer settings such as SafeInstr's N), and at most `maximum`
    (SafeInstr cannot take more refusals than there are)."""
    _check(rows, reference_ce)
    settings = sorted({float(r["setting"]) for r in rows})
    ok = sorted(float(r["setting"]) for r in rows if is_eligible(r, reference_ce, margin))
    if not ok:
        x = settings[0] / 3
    else:
        above = [float(r["setting"]) for r in rows
                 if not is_eligible(r, reference_ce, margin) and float(r["setting"]) > ok[-1]]
        x = math.sqrt(ok[-1] * min(above)) if above else 3 * settings[-1]
    x = max(1, round(x)) if integer else float(f"{x:.3g}")
    if maximum is not None:
        x = min(x, maximum)
    if x in settings:
        raise EvalError(f"refine_setting: {x:g} is already in the sweep {settings}")
    return x
