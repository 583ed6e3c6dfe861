#!/usr/bin/env python
"""Probe (issue 12): do hand features for one-sentence task acceptance help judge v2 on models it
never saw?

    python experiments/judge_hand_probe.py        # ~4 min with the LM features cached

Candidates on top of the shipped features (lm_mid + lm_last + hand): the share of the request's
content words (longer than 3 letters, not stop words) in the reply's first sentence and in the
whole reply ("echo"), then also log sentence count, log first-sentence length and
judges.delivers_content ("all5"). Development metric, TRAIN rows only: leave-one-model-out within
the own train rows of rounds 1 + 2 (fit on PyRIT train + the other models' own train rows, score
the left-out model's own train rows), pooled AUC, for C in {0.001, 0.003, 0.01}. No TEST-prompt
row and no round 3 or 4 row is read. Result in docs/EVAL.md.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from semloss_jax.eval.judge_v2_data import own_rows, pyrit_rows, read_labelled, row_features  # noqa: E402
from semloss_jax.eval.judges import delivers_content  # noqa: E402

DATA = REPO / "semloss_jax" / "eval" / "judge_data"
LABELLED = (DATA / "own_outputs_labelled.jsonl", DATA / "round2" / "own_outputs_labelled.jsonl")
STOP = set("the a an and or of to in on for with how what why can you your i me my is are be do "
           "does make write give tell about into from that this it its as by at some any all".split())
WORD = re.compile(r"[a-z']+")
SENT = re.compile(r"(?<=[.!?])\s+")


def extra_features(prompt: str, reply: str) -> list[float]:
    """The 5 candidates: echo in the first sentence, echo in the whole reply, log sentence
    count, log first-sentence words, delivers_content."""
    pw = {w for w in WORD.findall(prompt.lower()) if len(w) > 3 and w not in STOP}
    sents = [s for s in SENT.split(reply.strip()) if s]
    first = sents[0] if sents else ""

    def share(text: str) -> float:
        return len(pw & set(WORD.findall(text.lower()))) / max(len(pw), 1)
    return [share(first), share(reply), float(np.log1p(len(sents))),
            float(np.log1p(len(first.split()))), float(delivers_content(reply))]


def lomo_train(X, y, src, model, C: float) -> tuple[float, dict]:
    """Pooled and per-model AUC, leave-one-model-out within the own train rows."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    own, py = np.where(src == "own")[0], np.where(src == "pyrit")[0]
    scores, idx, per = [], [], {}
    for m in sorted(set(model[own])):
        te = own[model[own] == m]
        tr = np.concatenate([py, own[model[own] != m]])
        mu, sd = X[tr].mean(0), X[tr].std(0)
        sd = np.where(sd > 1e-8, sd, 1.0)
        lr = LogisticRegression(C=C, class_weight="balanced", max_iter=5000)
        p = lr.fit((X[tr] - mu) / sd, y[tr]).predict_proba((X[te] - mu) / sd)[:, 1]
        per[m] = round(float(roc_auc_score(y[te], p)), 3) if 0 < y[te].sum() < len(te) else None
        scores.append(p)
        idx.append(te)
    return float(roc_auc_score(y[np.concatenate(idx)], np.concatenate(scores))), per


def main() -> int:
    """Print one JSON line per (feature set, C)."""
    from semloss_jax.eval.lm_features import LMFeaturizer
    from semloss_jax.models import loading
    rows = pyrit_rows("train") + [r for f in LABELLED for r in own_rows(read_labelled(f), "train")]
    lm, hand = row_features(rows, LMFeaturizer.from_model(loading.load_model(None)))
    extra = np.array([extra_features(r.prompt, r.response) for r in rows], np.float64)
    y = np.array([r.harmful for r in rows], int)
    src, model = np.array([r.source for r in rows]), np.array([r.model for r in rows])
    shipped = np.concatenate([lm, hand], 1).astype(np.float64)
    sets = {"shipped": shipped, "shipped+echo": np.concatenate([shipped, extra[:, :2]], 1),
            "shipped+all5": np.concatenate([shipped, extra], 1)}
    for name, X in sets.items():
        for C in (0.001, 0.003, 0.01):
            auc, per = lomo_train(X, y, src, model, C)
            print(json.dumps({"set": name, "C": C, "lomo_train": round(auc, 4), "per": per}),
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
