"""Helpfulness proxies of replies to benign prompts, with 95% bootstrap intervals.

Per reply (`token_lengths`, `early_stops`, `rouge_l_f1`, and the embedding cosine):
    n_tokens      generated tokens before the end-of-turn token
    stop          "eot" (ended with the end-of-turn token) or "length" (cut at max_new_tokens)
    early_stop    stop == "eot" and n_tokens < min_tokens (default 32): the model chose to end
    rouge_l       ROUGE-L F1 (rouge-score, Porter stemming) of the reply against the reference
    embed_cosine  cosine of the reply and reference embeddings of a frozen model
                  (semloss_jax.eval.embedding: mean of the final hidden states over the text)
The last two exist only where the set has a reference answer.

Per set (`helpfulness_summary`): the reply length's median (bootstrap interval), quartiles,
mean (interval), min, max and histogram; the early-stop and cut-at-limit rates (k/n, bootstrap
and Wilson intervals); the mean ROUGE-L and mean cosine (bootstrap intervals).

Token counts are exact when the generator recorded them (semloss_jax.models.generation.
generate_detailed); a row without them (an older generations cache, a generator returning text
only) is re-tokenized: n_tokens = len(tok.encode(reply)), stop inferred as "length" when that
reaches max_new_tokens, else "eot"; such rows are counted in `tokens_exact` (k of n exact).
Re-tokenizing the decoded, stripped text can give a few tokens fewer than were generated, so a
cut reply may be counted as "eot"; an early stop well below max_new_tokens is unaffected.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

from semloss_jax.eval.metrics import (
    DEFAULT_LEVEL,
    DEFAULT_N_BOOT,
    DEFAULT_SEED,
    bootstrap_mean_ci,
    rate_summary,
)
from semloss_jax.eval.rank_stats import bootstrap_stat_ci
from semloss_jax.models.generation import STOP_EOT, STOP_LENGTH, stop_reason

DEFAULT_MIN_TOKENS = 32
HIST_BINS = 8
STOPS = (STOP_EOT, STOP_LENGTH)


@functools.cache
def _rouge_scorer():
    # rouge_score imports nltk (~3.5 s measured): loaded on first use
    from rouge_score import rouge_scorer
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l_f1(replies: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """ROUGE-L F1 of each reply against its reference ([N] in [0, 1]). rouge-score's tokenizer
    lowercases and keeps runs of [a-z0-9] only: a text without any scores 0."""
    if len(replies) != len(references):
        raise ValueError(f"{len(replies)} replies but {len(references)} references")
    sc = _rouge_scorer()
    return np.array([sc.score(ref, rep)["rougeL"].fmeasure for rep, ref in zip(replies, references)],
                    np.float64)


def token_lengths(rows: Sequence[dict], tok, max_new_tokens: int
                  ) -> tuple[np.ndarray, list[str], np.ndarray]:
    """(n_tokens [N], stop reasons, exact [N] bool) of generation rows {"response", and
    optionally "n_tokens" and "stop"}; rows without both are re-tokenized (module docstring)."""
    n = np.zeros(len(rows), np.int64)
    stops: list[str] = []
    exact = np.zeros(len(rows), bool)
    for i, r in enumerate(rows):
        if r.get("n_tokens") is not None and r.get("stop") in STOPS:
            n[i], exact[i] = int(r["n_tokens"]), True
            stops.append(r["stop"])
        else:
            n[i] = len(tok.encode(r["response"])) if r["response"] else 0
            stops.append(stop_reason(int(n[i]), max_new_tokens))
    return n, stops, exact


def early_stops(n_tokens, stops: Sequence[str], min_tokens: int = DEFAULT_MIN_TOKENS) -> np.ndarray:
    """[N] bool: the reply ended with the end-of-turn token before min_tokens tokens."""
    n = np.asarray(n_tokens).reshape(-1)
    return np.array([s == STOP_EOT for s in stops], bool) & (n < min_tokens)


def _median_rows(v: np.ndarray) -> np.ndarray:
    return np.median(v, axis=-1)


def length_summary(n_tokens, max_new_tokens: int, *, n_boot: int = DEFAULT_N_BOOT,
                   seed: int = DEFAULT_SEED, level: float = DEFAULT_LEVEL) -> dict:
    """Median (bootstrap interval), quartiles, mean (interval), min, max and a histogram of
    reply lengths in tokens: HIST_BINS equal bins over [0, max_new_tokens], the last closed."""
    v = np.asarray(n_tokens, np.float64).reshape(-1)
    edges = np.linspace(0, max(max_new_tokens, 1), HIST_BINS + 1)
    counts = np.histogram(np.clip(v, 0, edges[-1]), bins=edges)[0]
    hist = {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]}
    if v.size == 0:
        return {"n": 0, "median": None, "ci": [None, None], "q1": None, "q3": None, "mean": None,
                "mean_ci": [None, None], "min": None, "max": None, "histogram": hist}
    med = float(np.median(v))
    lo, hi = bootstrap_stat_ci(_median_rows, v, estimate=med, n_boot=n_boot, seed=seed,
                               level=level)
    mlo, mhi = bootstrap_mean_ci(v, n_boot=n_boot, seed=seed, level=level)
    q1, q3 = np.quantile(v, [0.25, 0.75])
    return {"n": int(v.size), "median": med, "ci": [lo, hi], "q1": float(q1), "q3": float(q3),
            "mean": float(v.mean()), "mean_ci": [mlo, mhi], "min": int(v.min()),
            "max": int(v.max()), "histogram": hist, "level": level, "n_boot": n_boot}


def mean_summary(values, *, n_boot: int = DEFAULT_N_BOOT, seed: int = DEFAULT_SEED,
                 level: float = DEFAULT_LEVEL) -> dict:
    """Mean of values with its bootstrap interval; None (and n = 0) for no values."""
    v = np.asarray(values, np.float64).reshape(-1)
    if v.size == 0:
        return {"mean": None, "ci": [None, None], "n": 0, "level": level, "n_boot": n_boot}
    lo, hi = bootstrap_mean_ci(v, n_boot=n_boot, seed=seed, level=level)
    return {"mean": float(v.mean()), "ci": [lo, hi], "n": int(v.size), "level": level,
            "n_boot": n_boot}


def helpfulness_summary(n_tokens, stops: Sequence[str], exact, *, max_new_tokens: int,
                        min_tokens: int = DEFAULT_MIN_TOKENS, rouge=None, cosine=None,
                        embed_model: str | None = None, n_boot: int = DEFAULT_N_BOOT,
                        seed: int = DEFAULT_SEED) -> dict:
    """A set's helpfulness proxies (module docstring); rouge / cosine None: no reference."""
    n = np.asarray(n_tokens).reshape(-1)
    out = {"min_tokens": min_tokens, "max_new_tokens": max_new_tokens,
           "tokens_exact": {"k": int(np.sum(exact)), "n": int(n.size)},
           "length_tokens": length_summary(n, max_new_tokens, n_boot=n_boot, seed=seed),
           "early_stop_rate": rate_summary(early_stops(n, stops, min_tokens), n_boot=n_boot,
                                           seed=seed),
           "cut_at_limit_rate": rate_summary([s == STOP_LENGTH for s in stops], n_boot=n_boot,
                                             seed=seed)}
    if rouge is not None:
        out["rouge_l_f1"] = mean_summary(rouge, n_boot=n_boot, seed=seed)
    if cosine is not None:
        out["embed_cosine"] = {**mean_summary(cosine, n_boot=n_boot, seed=seed),
                               "model": embed_model}
    return out
