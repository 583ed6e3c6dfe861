"""The shipped judge v2, unchanged, scored against a file of blind labels it was not fitted on.

    python -m semloss_jax.eval.judge_v2_check --labelled FILE [--artifact JSON] [--out JSON]

For labelled own outputs of models the judge never saw (e.g. the study's models,
experiments/judge_set_round2.py): AUC / accuracy / precision / recall of harmful vs not (all rows
and per model; the pooled AUC with a 95% bootstrap interval over rows), the four-class
confusion matrix, the judged and labelled harmful rate per model, and the refusal and degenerate detectors'
precision / recall. Nothing is refitted; the figures go to --out and a summary to stdout.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from semloss_jax.errors import cli_main
from semloss_jax.eval.judge_v2 import JudgeV2, refusal_flag
from semloss_jax.eval.judge_v2_build import (
    binary_figures,
    detector_figures,
    disagreements,
    four_class,
)
from semloss_jax.eval.judge_v2_data import own_rows, read_labelled
from semloss_jax.eval.rank_stats import auc_summary
from semloss_jax.paths import atomic_write_text


def check(judge: JudgeV2, labelled: Path) -> dict:
    """Every figure of the module docstring for the rows of one labelled file."""
    rows = own_rows(read_labelled(labelled), "all")
    p = judge.score([r.prompt for r in rows], [r.response for r in rows])
    t = judge.threshold
    per_model = {}
    for m in sorted({r.model for r in rows}):
        idx = [i for i, r in enumerate(rows) if r.model == m]
        per_model[m] = {**binary_figures([rows[i] for i in idx], p[idx], t),
                        "labelled_harmful_rate": sum(rows[i].harmful for i in idx) / len(idx),
                        "judged_harmful_rate": float((p[idx] >= t).mean())}
    return {"labelled": str(labelled), "threshold": t, "artifact": judge.meta.get("chosen"),
            "all": binary_figures(rows, p, t),
            "auc_bootstrap": auc_summary(p, [r.harmful for r in rows]), "per_model": per_model,
            "four_class": four_class(rows, p, t, judge.rule),
            "refusal_flag": detector_figures(rows, [refusal_flag(r.response) for r in rows],
                                             "refusal"),
            "degenerate": detector_figures(rows, [judge.rule(r.response) for r in rows],
                                           "degenerate"),
            "label_counts": {c: sum(r.label == c for r in rows)
                             for c in ("harmful", "refusal", "safe", "degenerate")},
            "disagreements": disagreements(rows, p, t, judge.rule)}


def summary(fig: dict) -> dict:
    """The headline numbers (rounded) of check()'s figures."""
    def r(x):
        return None if x is None else round(float(x), 3)
    out = {"n": fig["all"]["n"], "harmful": fig["all"]["n_harmful"], "auc": r(fig["all"]["auc"]),
           "auc_95": [r(x) for x in fig["auc_bootstrap"]["ci"]],
           "accuracy": r(fig["all"]["accuracy"]), "four_class_accuracy":
           r(fig["four_class"]["accuracy"]),
           "per_model_auc": {m: r(v["auc"]) for m, v in fig["per_model"].items()},
           "per_model_harmful_rate_labelled_judged": {
               m: [r(v["labelled_harmful_rate"]), r(v["judged_harmful_rate"])]
               for m, v in fig["per_model"].items()}}
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Score, write the figures, print the summary."""
    ap = argparse.ArgumentParser(prog="python -m semloss_jax.eval.judge_v2_check",
                                 description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--labelled", required=True)
    ap.add_argument("--artifact", default=None, help="judge v2 artifact (default: the shipped one)")
    ap.add_argument("--out", default=None, help="write every figure here (JSON)")
    args = ap.parse_args(argv)
    fig = check(JudgeV2.load(args.artifact), Path(args.labelled))
    if args.out:
        atomic_write_text(Path(args.out), json.dumps(fig, indent=1) + "\n")
        print(f"[judge_v2_check] wrote {args.out}", file=sys.stderr)
    print(json.dumps(summary(fig), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(cli_main("python -m semloss_jax.eval.judge_v2_check", main))

