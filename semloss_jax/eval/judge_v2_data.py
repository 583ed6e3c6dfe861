"""The rows judge v2 is fitted and validated on: PyRIT's human-labelled harm rows and the
labelled own model outputs, with their features.

    rows = pyrit_rows("train") + own_rows(read_labelled(PATH), part="train")
    X_lm, X_hand = row_features(rows, featurizer)

Own-output parts: "train" is every labelled row except those on harmful TEST-split prompts
(part "harmful_test"), which form "test" and are only used to report the final figures.
A row is harmful when its label is "harmful" (own outputs) or its mean human harm score is
>= judges.HARM_LABEL_THRESHOLD (PyRIT).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from semloss_jax.data.splits import normalize
from semloss_jax.errors import DataError
from semloss_jax.eval import judges
from semloss_jax.eval.judge_v2 import CLASSES, hand_features
from semloss_jax.paths import read_jsonl_rows

TEST_PART = "harmful_test"
LABELLED_FIELDS = ("uid", "prompt", "response", "kind", "part", "model", "label")


@dataclass(frozen=True)
class Row:
    """One labelled (prompt, response): source "pyrit" or "own"; label is one of CLASSES for own
    rows and "" for PyRIT rows; group is the normalized prompt (the CV groups)."""

    prompt: str
    response: str
    harmful: bool
    source: str
    label: str = ""
    model: str = ""
    part: str = ""
    uid: str = ""

    @property
    def group(self) -> str:
        """The cross-validation group: the normalized prompt."""
        return normalize(self.prompt)


def read_labelled(path: str | Path) -> list[dict]:
    """The labelled own-output rows (label.merge's output), checked field by field."""
    out = []
    for i, row in read_jsonl_rows(Path(path)):
        for f in LABELLED_FIELDS:
            if not isinstance(row.get(f), str):
                raise DataError(path, i, f, "missing or not a string")
        if row["label"] not in CLASSES:
            raise DataError(path, i, "label", f"{row['label']!r} is not one of {CLASSES}")
        out.append(row)
    if not out:
        raise DataError(path, None, None, "no labelled rows")
    return out


def own_rows(labelled: Sequence[dict], part: str = "all") -> list[Row]:
    """Own-output rows of a part: "train" (not on TEST prompts), "test" (TEST prompts) or "all"."""
    if part not in ("train", "test", "all"):
        raise ValueError(f"part must be train, test or all, got {part!r}")
    keep = [r for r in labelled if part == "all" or (r["part"] == TEST_PART) == (part == "test")]
    return [Row(r["prompt"], r["response"], r["label"] == "harmful", "own", r["label"],
                r["model"], r["part"], r["uid"]) for r in keep]


def pyrit_rows(split: str) -> list[Row]:
    """PyRIT's human-labelled harm rows of a split ("train" = train + val, or "test")."""
    return [Row(r.prompt, r.response, r.harmful, "pyrit", uid=r.where)
            for r in judges.harm_rows(split)]


def row_features(rows: Sequence[Row], featurizer, progress: bool = True
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(LM features [N, 2d], hand features [N, len(HAND_FEATURES)]) of the rows."""
    prompts = [r.prompt for r in rows]
    responses = [r.response for r in rows]
    return featurizer.features(prompts, responses, progress), hand_features(responses)


def check_disjoint(train: Sequence[Row], test: Sequence[Row], what: str) -> None:
    """No prompt (normalized) of `test` is among the prompts of `train`."""
    leak = {r.group for r in train} & {r.group for r in test}
    if leak:
        raise DataError(None, None, "prompt", f"{what}: {len(leak)} prompts are in both the training "
                        f"and test rows (e.g. {sorted(leak)[0][:60]!r})")
