"""Evaluation metrics: rates and means with counts and seeded bootstrap 95% intervals, and the
response-token cross-entropy of reference answers (a language-ability proxy).

    rate_summary(flags)                  -> {"k", "n", "rate", "ci": [lo, hi], "wilson": [lo, hi]}
    ce_summary(nll_sums, n_tokens)       -> {"ce", "ppl", "n_examples", "n_tokens", "ci": [lo, hi]}
    reference_nll(params, cfg, tok, prompts, references) -> (nll_sum [N], n_tokens [N])

Intervals are percentile bootstraps over examples (resampled with replacement, `n_boot` draws,
a seeded numpy Generator, vectorized in chunks), widened if needed to contain the estimate.
A rate also carries the Wilson score interval, which stays informative at 0/n and n/n where
every bootstrap resample is identical. Empty inputs give None (JSON null) for undefined
numbers, never NaN.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from semloss_jax.data.batching import Example, make_batches, truncate
from semloss_jax.errors import EvalError
from semloss_jax.models.llama import forward

DEFAULT_N_BOOT = 2000
DEFAULT_SEED = 0
DEFAULT_LEVEL = 0.95
_CHUNK_ELEMS = 4_000_000  # resample-index elements per vectorized chunk (~32 MB of int64)


def _check(n_boot: int, level: float) -> None:
    if n_boot < 1:
        raise EvalError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < level < 1.0:
        raise EvalError(f"level must be in (0, 1), got {level}")


def bootstrap_stats(stat: Callable[..., np.ndarray], *arrays: np.ndarray,
                    n_boot: int = DEFAULT_N_BOOT, seed: int = DEFAULT_SEED) -> np.ndarray:
    """[n_boot] values of stat(*[a[idx] for a in arrays]) over resampled index rows idx [m, n]
    (rows of examples drawn with replacement, in vectorized chunks); stat maps arrays of shape
    [m, n] to [m]."""
    if n_boot < 1:
        raise EvalError(f"n_boot must be >= 1, got {n_boot}")
    arrays = tuple(np.asarray(a, np.float64) for a in arrays)
    n = arrays[0].shape[0] if arrays[0].ndim else 0
    if n == 0 or any(a.shape != (n,) for a in arrays):
        raise EvalError(f"bootstrap needs non-empty equal-length 1-D arrays, got "
                         f"{[a.shape for a in arrays]}")
    rng = np.random.default_rng(seed)
    rows = max(1, _CHUNK_ELEMS // n)
    out = np.empty(n_boot, np.float64)
    for s in range(0, n_boot, rows):
        m = min(rows, n_boot - s)
        idx = rng.integers(0, n, size=(m, n))
        with np.errstate(invalid="ignore", divide="ignore"):
            out[s:s + m] = stat(*(a[idx] for a in arrays))
    return out


def bootstrap_ratio_stats(num: np.ndarray, den: np.ndarray, *, n_boot: int = DEFAULT_N_BOOT,
                          seed: int = DEFAULT_SEED) -> np.ndarray:
    """[n_boot] statistics sum(num[idx]) / sum(den[idx]) over resampled example indices idx."""
    return bootstrap_stats(lambda a, b: a.sum(1) / b.sum(1), num, den, n_boot=n_boot, seed=seed)


def percentile_interval(stats: np.ndarray, estimate: float, level: float = DEFAULT_LEVEL
                        ) -> tuple[float, float]:
    """Percentile interval of the bootstrap statistics, widened to contain the estimate."""
    stats = stats[np.isfinite(stats)]
    if stats.size == 0:
        return (estimate, estimate)
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(stats, [a, 1.0 - a])
    return (float(min(lo, estimate)), float(max(hi, estimate)))


def bootstrap_mean_ci(values, *, n_boot: int = DEFAULT_N_BOOT, seed: int = DEFAULT_SEED,
                      level: float = DEFAULT_LEVEL) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (1-D)."""
    _check(n_boot, level)
    v = np.asarray(values, np.float64)
    stats = bootstrap_ratio_stats(v, np.ones_like(v), n_boot=n_boot, seed=seed)
    return percentile_interval(stats, float(v.mean()), level)


def bootstrap_ratio_ci(num, den, *, n_boot: int = DEFAULT_N_BOOT, seed: int = DEFAULT_SEED,
                       level: float = DEFAULT_LEVEL) -> tuple[float, float]:
    """Percentile bootstrap interval of sum(num) / sum(den), resampling examples."""
    _check(n_boot, level)
    num = np.asarray(num, np.float64)
    den = np.asarray(den, np.float64)
    stats = bootstrap_ratio_stats(num, den, n_boot=n_boot, seed=seed)
    return percentile_interval(stats, float(num.sum() / den.sum()), level)


def paired_ce_difference(nll_a, tok_a, nll_b, tok_b, *, n_boot: int = DEFAULT_N_BOOT,
                         seed: int = DEFAULT_SEED, level: float = DEFAULT_LEVEL) -> dict:
    """CE_a - CE_b (token-weighted, nats/token) of two models on the SAME examples, with a
    paired bootstrap interval: each resample draws examples once and scores both models on
    them, so the example-to-example spread that both share cancels (far narrower than two
    unpaired intervals)."""
    _check(n_boot, level)
    arrs = [np.asarray(x, np.float64).reshape(-1) for x in (nll_a, tok_a, nll_b, tok_b)]
    if len({a.size for a in arrs}) != 1:
        raise EvalError(f"paired CE needs four equal-length arrays, got {[a.size for a in arrs]}")
    diff = float(arrs[0].sum() / arrs[1].sum() - arrs[2].sum() / arrs[3].sum())
    stats = bootstrap_stats(lambda na, ta, nb, tb: na.sum(1) / ta.sum(1) - nb.sum(1) / tb.sum(1),
                            *arrs, n_boot=n_boot, seed=seed)
    lo, hi = percentile_interval(stats, diff, level)
    return {"diff": diff, "ci": [lo, hi], "n_examples": int(arrs[0].size), "level": level,
            "n_boot": n_boot}


def paired_rate_difference(a, b, *, n_boot: int = DEFAULT_N_BOOT, seed: int = DEFAULT_SEED,
                           level: float = DEFAULT_LEVEL) -> dict:
    """mean(a) - mean(b) of two 0/1 outcomes on the SAME examples (e.g. two models' harmful
    labels on one prompt set), with a paired bootstrap interval: prompts that both models
    answer the same way add nothing to the spread, so the interval is narrower than two
    unpaired ones whenever the models agree on most prompts."""
    _check(n_boot, level)
    a, b = (np.asarray(x, np.float64).reshape(-1) for x in (a, b))
    if a.size != b.size or a.size == 0:
        raise EvalError(f"a paired rate needs two non-empty equal-length arrays, got {a.size} and {b.size}")
    if not np.all(np.isin(a, (0.0, 1.0))) or not np.all(np.isin(b, (0.0, 1.0))):
        raise EvalError("a paired rate needs 0/1 outcomes")
    diff = float(a.mean() - b.mean())
    stats = bootstrap_stats(lambda x, y: x.mean(1) - y.mean(1), a, b, n_boot=n_boot, seed=seed)
    lo, hi = percentile_interval(stats, diff, level)
    return {"diff": diff, "ci": [lo, hi], "n_examples": int(a.size), "level": level,
            "n_boot": n_boot}


def wilson_interval(k: int, n: int, level: float = DEFAULT_LEVEL) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion k/n (n >= 1)."""
    from scipy.stats import norm
    if n < 1 or not 0 <= k <= n:
        raise EvalError(f"wilson_interval needs 0 <= k <= n and n >= 1, got k={k}, n={n}")
    z = float(norm.ppf(0.5 + level / 2.0))
    p = k / n
    den = 1.0 + z * z / n
    c = (p + z * z / (2 * n)) / den
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    lo = 0.0 if k == 0 else min(p, max(0.0, c - h))   # exact ends; rounding never excludes p
    hi = 1.0 if k == n else max(p, min(1.0, c + h))
    return (lo, hi)


def rate_summary(flags: Sequence[bool], *, n_boot: int = DEFAULT_N_BOOT,
                 seed: int = DEFAULT_SEED, level: float = DEFAULT_LEVEL) -> dict:
    """Summary of boolean flags: k of n set, the rate, its bootstrap interval and its Wilson interval."""
    _check(n_boot, level)
    f = np.asarray(flags, dtype=bool).reshape(-1)
    n, k = int(f.size), int(f.sum())
    if n == 0:
        return {"k": 0, "n": 0, "rate": None, "ci": [None, None], "wilson": [None, None],
                "level": level, "n_boot": n_boot}
    lo, hi = bootstrap_mean_ci(f.astype(np.float64), n_boot=n_boot, seed=seed, level=level)
    wl, wh = wilson_interval(k, n, level)
    return {"k": k, "n": n, "rate": k / n, "ci": [lo, hi], "wilson": [wl, wh], "level": level,
            "n_boot": n_boot}


def ce_summary(nll_sums: Sequence[float], n_tokens: Sequence[int], *,
               n_boot: int = DEFAULT_N_BOOT, seed: int = DEFAULT_SEED,
               level: float = DEFAULT_LEVEL) -> dict:
    """Token-weighted mean cross-entropy (nats/token) over examples, with a bootstrap interval
    over examples (each resample re-weights by its own token count). Examples with 0 tokens
    are ignored."""
    _check(n_boot, level)
    s = np.asarray(nll_sums, np.float64).reshape(-1)
    t = np.asarray(n_tokens, np.float64).reshape(-1)
    if s.shape != t.shape:
        raise EvalError(f"{s.size} nll sums but {t.size} token counts")
    if np.any(t < 0) or np.any(~np.isfinite(s)):
        raise EvalError("token counts must be >= 0 and nll sums finite")
    keep = t > 0
    s, t = s[keep], t[keep]
    if s.size == 0:
        return {"ce": None, "ppl": None, "n_examples": 0, "n_tokens": 0, "ci": [None, None],
                "level": level, "n_boot": n_boot}
    ce = float(s.sum() / t.sum())
    lo, hi = bootstrap_ratio_ci(s, t, n_boot=n_boot, seed=seed, level=level)
    return {"ce": ce, "ppl": float(math.exp(min(ce, 700.0))), "n_examples": int(s.size),
            "n_tokens": int(t.sum()), "ci": [lo, hi], "level": level, "n_boot": n_boot}


# ---------------------------------------------------------------------------------------------
# Cross-entropy of reference answers under the model
# ---------------------------------------------------------------------------------------------

@functools.cache
def _token_nll_fn():
    """The jitted per-token NLL (built on first use so that importing metrics stays light)."""
    @functools.partial(jax.jit, static_argnames=("cfg",))
    def token_nll(params, cfg, input_ids, targets, positions, segment_ids):
        logits = forward(params, cfg, input_ids, positions=positions, segment_ids=segment_ids)
        lse = jax.nn.logsumexp(logits, axis=-1)
        tgt = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        return lse - tgt

    return token_nll


def reference_nll(params, cfg, tok, prompts: Sequence[str], references: Sequence[str], *,
                  seq_len: int = 512, batch_size: int = 4, system: str | None = None,
                  progress=None) -> tuple[np.ndarray, np.ndarray]:
    """Per example: the summed negative log-likelihood (nats) of the reference response tokens
    (the response text and the template's end-of-turn token(s)) given the chat-templated prompt,
    and the number of those tokens. Truncation follows semloss_jax.data.batching (prompt cut from
    the left first, then the response from the right); an example with no response token left
    gets (0, 0)."""
    if len(prompts) != len(references):
        raise EvalError(f"{len(prompts)} prompts but {len(references)} references")
    exs = []
    for i, (p, r) in enumerate(zip(prompts, references)):
        pi, ri = truncate(tok.prompt_ids(p, system), tok.response_ids(r), seq_len)
        if pi and ri:
            exs.append((i, Example(id=str(i), prompt_ids=tuple(pi), response_ids=tuple(ri))))
    nll = np.zeros(len(prompts), np.float64)
    ntok = np.zeros(len(prompts), np.int64)
    if not exs:
        return nll, ntok
    token_nll = _token_nll_fn()
    orig = np.array([i for i, _ in exs])
    for b in make_batches([e for _, e in exs], batch_size=batch_size, seq_len=seq_len,
                          pad_id=tok.pad_id, seed=None):
        per_tok = np.asarray(token_nll(params, cfg, b["input_ids"], b["targets"],
                                        b["positions"], b["segment_ids"]), np.float64)
        m = b["loss_mask"] > 0
        ex = orig[b["example_index"][m]]
        np.add.at(nll, ex, per_tok[m])
        np.add.at(ntok, ex, 1)
        if progress is not None:
            progress.update(int(len(np.unique(b["example_index"][b["example_index"] >= 0]))))
    return nll, ntok
