r"""`python -m semloss_jax.eval.judge_v2_build --labelled FILE [FILE ...]`: fit judge v2 on the
train rows, validate it two ways, write the artifact and the figures.

    python -m semloss_jax.eval.judge_v2_build \\
        --labelled semloss_jax/eval/judge_data/own_outputs_labelled.jsonl \\
                   semloss_jax/eval/judge_data/round2/own_outputs_labelled.jsonl \\
        [--artifact semloss_jax/eval/judge_data/judge_v2.json] [--figures docs/results/judge_v2.json]

Several labelled files are pooled (their uids must not repeat); the artifact lists each file with
its sha256.

1. Choose features, C and the own-row weight by grouped CV on the train rows (PyRIT train split +
   own outputs not on TEST prompts), the threshold on the winner's out-of-fold scores, and the
   degenerate rule on the own train rows (eval.judge_v2_fit).
2. Fit the winner on all train rows: the artifact.
3. Validate: (a) held-out prompts: the own rows on harmful TEST prompts and PyRIT's test split;
   (b) leave-one-model-out: for each model, refit on the train rows of the other models (plus
   PyRIT), score every row of the left-out model. Per-class precision / recall and confusion
   matrices of the four-class rule, the refusal and degenerate detectors on the own labels, and
   the previous TF-IDF judge on the same rows for comparison.
The LM features are cached (eval.lm_features): a rerun costs seconds.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from semloss_jax.errors import DataError, cli_main
from semloss_jax.eval import judge_v2_fit as fit
from semloss_jax.eval.agreement import confusion
from semloss_jax.eval.degenerate import DegenerateRule
from semloss_jax.eval.judge_v2 import (
    ARTIFACT,
    CLASSES,
    HAND_FEATURES_VERSION,
    JUDGE_V2_VERSION,
    assemble,
    combine,
    refusal_flag,
)
from semloss_jax.eval.judge_v2_data import (
    Row,
    check_disjoint,
    own_rows,
    pyrit_rows,
    read_labelled,
    row_features,
)
from semloss_jax.eval.judges import HarmJudge, binary_auc
from semloss_jax.eval.lm_features import LMFeaturizer
from semloss_jax.models import loading
from semloss_jax.paths import REPO_ROOT, atomic_write_text, cache_dir

FIGURES = REPO_ROOT / "docs" / "results" / "judge_v2.json"


def binary_figures(rows: Sequence[Row], p: np.ndarray, threshold: float) -> dict:
    """n, harmful count, AUC (None with a single class), accuracy, precision, recall."""
    y = np.array([r.harmful for r in rows], bool)
    pred = np.asarray(p) >= threshold
    tp, fp, fn = int((pred & y).sum()), int((pred & ~y).sum()), int((~pred & y).sum())
    return {"n": len(rows), "n_harmful": int(y.sum()),
            "auc": binary_auc(y, p) if 0 < y.sum() < len(y) else None,
            "accuracy": float((pred == y).mean()) if len(y) else None,
            "precision": tp / (tp + fp) if tp + fp else None,
            "recall": tp / (tp + fn) if tp + fn else None}


def class_figures(truth: Sequence[str], pred: Sequence[str]) -> dict:
    """Confusion matrix (rows: hand label, columns: judge) and per-class precision / recall."""
    m = confusion(list(truth), list(pred), CLASSES)
    per = {}
    for k, c in enumerate(CLASSES):
        tp, n_true, n_pred = int(m[k, k]), int(m[k].sum()), int(m[:, k].sum())
        per[c] = {"n_true": n_true, "n_pred": n_pred,
                  "precision": tp / n_pred if n_pred else None,
                  "recall": tp / n_true if n_true else None}
    return {"classes": list(CLASSES), "confusion": m.tolist(), "per_class": per,
            "accuracy": float(np.trace(m) / m.sum()) if m.sum() else None}


def detector_figures(rows: Sequence[Row], flags: Sequence[bool], cls: str) -> dict:
    """Precision / recall of a detector's flags against the rows' `cls` labels."""
    y = np.array([r.label == cls for r in rows], bool)
    f = np.asarray(flags, bool)
    tp, fp, fn = int((f & y).sum()), int((f & ~y).sum()), int((~f & y).sum())
    return {"n": len(rows), "n_true": int(y.sum()), "tp": tp, "fp": fp, "fn": fn,
            "precision": tp / (tp + fp) if tp + fp else None,
            "recall": tp / (tp + fn) if tp + fn else None}


def four_class_labels(rows: Sequence[Row], p: np.ndarray, threshold: float,
                      rule: DegenerateRule) -> list[str]:
    """The four-class rule's label of each row."""
    return combine(p, threshold, [refusal_flag(r.response) for r in rows],
                   [rule(r.response) for r in rows])


def four_class(rows: Sequence[Row], p: np.ndarray, threshold: float, rule: DegenerateRule) -> dict:
    """class_figures of the four-class rule on own rows."""
    return class_figures([r.label for r in rows], four_class_labels(rows, p, threshold, rule))


def disagreements(rows: Sequence[Row], p: np.ndarray, threshold: float,
                  rule: DegenerateRule) -> list[dict]:
    """The rows whose four-class label differs from the hand label (uid, both labels, score)."""
    pred = four_class_labels(rows, p, threshold, rule)
    return [{"uid": r.uid, "label": r.label, "judge": j, "harm_prob": round(float(q), 4)}
            for r, j, q in zip(rows, pred, p) if j != r.label]


class Features:
    """LM and hand features of every row, looked up by the row's position in `rows`."""

    def __init__(self, rows: Sequence[Row], featurizer):
        self.index = {id(r): i for i, r in enumerate(rows)}
        self.lm, self.hand = row_features(rows, featurizer)

    def of(self, rows: Sequence[Row]) -> tuple[np.ndarray, np.ndarray]:
        """(LM, hand) features of a subset of the rows."""
        idx = [self.index[id(r)] for r in rows]
        return self.lm[idx], self.hand[idx]


def lomo(cfg: fit.FitConfig, threshold: float, rule: DegenerateRule, train: Sequence[Row],
         own_all: Sequence[Row], feats: Features) -> dict:
    """Leave-one-model-out: per model, fit without its rows, score all its rows."""
    per, scores, rows_out = {}, [], []
    for m in sorted({r.model for r in own_all}):
        te = [r for r in own_all if r.model == m]
        held = {r.group for r in te}  # a PyRIT row may share a prompt with the left-out model
        tr = [r for r in train if r.model != m and r.group not in held]
        check_disjoint(tr, te, f"leave-out {m}")
        model = fit.fit_model(cfg, tr, *feats.of(tr), threshold)
        p = model.prob(assemble(cfg.blocks, *feats.of(te)))
        per[m] = {**binary_figures(te, p, threshold),
                  "train_rows_dropped_for_shared_prompts": sum(
                      r.model != m and r.group in held for r in train)}
        scores.append(p)
        rows_out += te
    p_all = np.concatenate(scores)
    return {"per_model": per, "pooled": binary_figures(rows_out, p_all, threshold),
            "four_class": four_class(rows_out, p_all, threshold, rule)}


def heldout(model, rule: DegenerateRule, own_test: Sequence[Row], pyrit_test: Sequence[Row],
            feats: Features) -> dict:
    """The final model on the own rows on TEST prompts and on PyRIT's test split."""
    p_own = model.prob(assemble(model.blocks, *feats.of(own_test)))
    p_py = model.prob(assemble(model.blocks, *feats.of(pyrit_test)))
    return {"own_test": binary_figures(own_test, p_own, model.threshold),
            "own_test_four_class": four_class(own_test, p_own, model.threshold, rule),
            "pyrit_test": binary_figures(pyrit_test, p_py, model.threshold)}


def detectors(rule: DegenerateRule, parts: dict[str, Sequence[Row]]) -> dict:
    """The refusal and degenerate detectors against the own labels, per part."""
    return {name: {"refusal": detector_figures(rows, [refusal_flag(r.response) for r in rows],
                                               "refusal"),
                   "degenerate": detector_figures(rows, [rule(r.response) for r in rows],
                                                  "degenerate")}
            for name, rows in parts.items()}


def tfidf_baseline(parts: dict[str, Sequence[Row]]) -> dict:
    """The previous TF-IDF judge (judges.HarmJudge, PyRIT only) on the same own rows."""
    j = HarmJudge.load_or_train()
    return {name: binary_figures(rows, j.score([r.prompt for r in rows],
                                               [r.response for r in rows]), 0.5)
            for name, rows in parts.items()}


def cached_select(train: Sequence[Row], feats: Features, candidates: Sequence[fit.FitConfig],
                  lm_key: str) -> tuple:
    """fit.select, cached on disk by the candidates, the rows (text and label) and the LM
    features key: rebuilding the artifact or the figures does not redo the grouped CV."""
    h = hashlib.sha256(json.dumps([lm_key, HAND_FEATURES_VERSION, [c.name() for c in candidates],
                                   fit.N_FOLDS, fit.CV_SEED]).encode())
    for r in train:
        h.update(json.dumps([r.prompt, r.response, r.harmful, r.source]).encode())
    path = cache_dir() / "judge_v2_cv" / f"{h.hexdigest()[:20]}.json"
    if path.exists():
        d = json.loads(path.read_text(encoding="utf-8"))
        cfg = next(c for c in candidates if c.name() == d["chosen"])
        return cfg, np.asarray(d["oof"], np.float64), d["table"]
    with tqdm(total=len(candidates), desc="grouped CV", unit="candidate", file=sys.stderr) as bar:
        cfg, oof, table = fit.select(train, *feats.of(train), candidates, progress=bar)
    atomic_write_text(path, json.dumps({"chosen": cfg.name(), "oof": oof.tolist(),
                                        "table": table}))
    return cfg, oof, table


def fit_and_validate(pyrit_train: Sequence[Row], pyrit_test: Sequence[Row],
                     own_all: Sequence[Row], featurizer,
                     candidates: Sequence[fit.FitConfig] = fit.CANDIDATES) -> tuple:
    """(final LinearHarmModel, its degenerate rule, the figures dict)."""
    own_train = [r for r in own_all if r.part != "harmful_test"]
    own_test = [r for r in own_all if r.part == "harmful_test"]
    train = [*pyrit_train, *own_train]
    check_disjoint(train, own_test, "held-out own rows")
    check_disjoint(pyrit_train, pyrit_test, "PyRIT test split")
    feats = Features([*train, *pyrit_test, *own_test], featurizer)
    cfg, oof, table = cached_select(train, feats, candidates, featurizer.key)
    own_idx = [i for i, r in enumerate(train) if r.source == "own"]
    threshold = fit.youden_threshold([train[i].harmful for i in own_idx], oof[own_idx])
    rule, rule_f1 = fit.choose_degenerate_rule([r.response for r in own_train],
                                               [r.label == "degenerate" for r in own_train])
    model = fit.fit_model(cfg, train, *feats.of(train), threshold)
    figures = {
        "counts": {"pyrit_train": len(pyrit_train), "pyrit_test": len(pyrit_test),
                   "own_train": len(own_train), "own_test": len(own_test)},
        "cv": {"chosen": cfg.name(), "threshold": threshold, "table": table,
               "own_train_oof": binary_figures(own_train, oof[own_idx], threshold),
               "own_train_oof_four_class": four_class(own_train, oof[own_idx], threshold, rule),
               "own_train_oof_disagreements": disagreements(own_train, oof[own_idx], threshold,
                                                            rule),
               "degenerate_rule": rule.__dict__, "degenerate_rule_train_f1": rule_f1},
        "heldout": heldout(model, rule, own_test, pyrit_test, feats),
        "lomo": lomo(cfg, threshold, rule, train, own_all, feats),
        "detectors": detectors(rule, {"own_train": own_train, "own_test": own_test,
                                      "own_all": own_all}),
        "tfidf_v1": tfidf_baseline({"own_train": own_train, "own_test": own_test}),
    }
    return model, rule, figures


def labelled_files(paths: Sequence[Path]) -> list[dict]:
    """[{path (relative to the repo when inside it), sha256}] of the labelled files."""
    out = []
    for p in paths:
        rp = p.resolve()
        name = str(rp.relative_to(REPO_ROOT)) if rp.is_relative_to(REPO_ROOT) else str(p)
        out.append({"path": name, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()})
    return out


def read_own(paths: Sequence[Path]) -> list[Row]:
    """The own-output rows of several labelled files; a uid seen twice is a DataError."""
    rows, seen = [], {}
    for p in paths:
        for r in own_rows(read_labelled(p), "all"):
            if r.uid in seen:
                raise DataError(p, None, "uid", f"{r.uid!r} is also in {seen[r.uid]}")
            seen[r.uid] = p
            rows.append(r)
    return rows


def artifact_json(model, rule: DegenerateRule, figures: dict, featurizer,
                  labelled: Sequence[Path]) -> dict:
    """The artifact: the model, and what it was fitted on and with."""
    import sklearn
    meta = {"version": JUDGE_V2_VERSION, "lm_key": featurizer.key,
            "hand_features_version": HAND_FEATURES_VERSION,
            "lm_spec": featurizer.spec.__dict__, "degenerate_rule": rule.__dict__,
            "chosen": figures["cv"]["chosen"], "counts": figures["counts"],
            "labelled": labelled_files(labelled),
            "sklearn": sklearn.__version__,
            "built_by": "python -m semloss_jax.eval.judge_v2_build"}
    return {"model": model.to_json(), "meta": meta}


def main(argv: Sequence[str] | None = None) -> int:
    """Fit, validate, write the artifact and the figures; print the headline figures."""
    ap = argparse.ArgumentParser(prog="python -m semloss_jax.eval.judge_v2_build",
                                 description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--labelled", required=True, nargs="+", type=Path,
                    help="labelled own outputs (label merge output); several files are pooled")
    ap.add_argument("--artifact", default=str(ARTIFACT))
    ap.add_argument("--figures", default=str(FIGURES))
    args = ap.parse_args(argv)
    labelled = args.labelled
    own_all = read_own(labelled)
    fx = LMFeaturizer.from_model(loading.load_model(None))
    model, rule, figures = fit_and_validate(pyrit_rows("train"), pyrit_rows("test"), own_all, fx)
    atomic_write_text(Path(args.artifact), json.dumps(
        artifact_json(model, rule, figures, fx, labelled), indent=1) + "\n")
    atomic_write_text(Path(args.figures), json.dumps(figures, indent=1) + "\n")
    h, lo = figures["heldout"], figures["lomo"]["pooled"]
    print(json.dumps({"chosen": figures["cv"]["chosen"], "threshold": model.threshold,
                      "own_test_auc": h["own_test"]["auc"], "lomo_pooled_auc": lo["auc"],
                      "pyrit_test_auc": h["pyrit_test"]["auc"]}, indent=1))
    print(f"[judge_v2] wrote {args.artifact} and {args.figures}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(cli_main("python -m semloss_jax.eval.judge_v2_build", main))
