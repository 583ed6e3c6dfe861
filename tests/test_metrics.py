"""Metrics: bootstrap intervals (coverage, containment, degenerate cases) and the reference CE."""
from __future__ import annotations

import math

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from semloss_jax.errors import EvalError
from semloss_jax.eval import metrics
from semloss_jax.eval.metrics import (
    bootstrap_mean_ci,
    ce_summary,
    rate_summary,
    reference_nll,
    wilson_interval,
)
from semloss_jax.models.llama import forward, init_params, tiny_config


def test_bootstrap_coverage_on_bernoulli():
    """The 95% interval covers the true p in about 95% of simulated samples."""
    rng = np.random.default_rng(123)
    for p, n in ((0.3, 200), (0.1, 400)):
        trials = 300
        hits_boot = hits_wilson = 0
        for t in range(trials):
            x = rng.random(n) < p
            s = rate_summary(x, n_boot=1000, seed=t)
            hits_boot += s["ci"][0] <= p <= s["ci"][1]
            hits_wilson += s["wilson"][0] <= p <= s["wilson"][1]
        # binomial sd of the coverage over 300 trials is ~0.013: these bounds are ~3.5 sd wide
        assert 0.90 <= hits_boot / trials <= 0.99, (p, n, hits_boot / trials)
        assert 0.90 <= hits_wilson / trials <= 0.99, (p, n, hits_wilson / trials)


def test_interval_width_shrinks_with_n():
    rng = np.random.default_rng(0)
    w = []
    for n in (50, 200, 800):
        s = rate_summary(rng.random(n) < 0.4, seed=0)
        w.append(s["ci"][1] - s["ci"][0])
    assert w[0] > w[1] > w[2]
    assert w[1] / w[2] == pytest.approx(2.0, rel=0.25)  # ~ 1/sqrt(n)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=80), st.integers(0, 2**31 - 1))
def test_rate_interval_contains_estimate(flags, seed):
    s = rate_summary(flags, n_boot=200, seed=seed)
    assert s["n"] == len(flags) and s["k"] == sum(flags)
    assert s["rate"] == pytest.approx(sum(flags) / len(flags))
    assert 0.0 <= s["ci"][0] <= s["rate"] <= s["ci"][1] <= 1.0
    assert 0.0 <= s["wilson"][0] <= s["rate"] <= s["wilson"][1] <= 1.0


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(0, 50, allow_nan=False), min_size=1, max_size=40),
       st.integers(0, 1000))
def test_ce_interval_contains_estimate(vals, seed):
    ntok = np.arange(1, len(vals) + 1)
    s = ce_summary(np.asarray(vals) * ntok, ntok, n_boot=200, seed=seed)
    assert s["ce"] == pytest.approx(float(np.sum(np.asarray(vals) * ntok) / ntok.sum()))
    assert s["ci"][0] <= s["ce"] <= s["ci"][1]
    assert s["n_tokens"] == int(ntok.sum()) and s["n_examples"] == len(vals)


def test_ce_interval_is_the_bootstrap_of_the_ratio_of_sums():
    """Short replies with high CE and long ones with low CE: the token-weighted CE (ratio of
    sums, 1.089) and its interval match a direct numpy bootstrap of sum(nll) / sum(tokens)
    with another generator; the mean of per-example CEs (5.5) is nowhere near."""
    ntok = np.array([1] * 50 + [100] * 50, np.float64)
    nll = np.array([10.0] * 50 + [100.0] * 50)
    s = ce_summary(nll, ntok, n_boot=4000, seed=3)
    assert s["ce"] == pytest.approx(5500 / 5050)
    rng = np.random.default_rng(12345)
    idx = rng.integers(0, 100, size=(4000, 100))
    ref = np.quantile(nll[idx].sum(1) / ntok[idx].sum(1), [0.025, 0.975])
    np.testing.assert_allclose(s["ci"], ref, atol=0.01)
    assert 0.03 < s["ci"][1] - s["ci"][0] < 0.2


def test_paired_ce_difference_cancels_what_both_models_share():
    """A model that is worse by exactly 0.05 nats on every token: the difference is 0.05 with a
    zero-width paired interval, while the two unpaired intervals overlap widely; a model
    against itself gives 0; the interval is the bootstrap of the difference of ratios."""
    from semloss_jax.eval.metrics import paired_ce_difference
    rng = np.random.default_rng(0)
    tok = rng.integers(5, 200, size=120).astype(float)
    per_tok = rng.gamma(2.0, 1.0, size=120)                  # examples differ a lot in difficulty
    a, b = (per_tok + 0.05) * tok, per_tok * tok
    d = paired_ce_difference(a, tok, b, tok, n_boot=1000)
    assert d["diff"] == pytest.approx(0.05) and d["ci"] == pytest.approx([0.05, 0.05], abs=1e-12)
    ua, ub = ce_summary(a, tok, n_boot=1000)["ci"], ce_summary(b, tok, n_boot=1000)["ci"]
    assert ua[0] < ub[1]                                      # unpaired: no difference visible
    assert paired_ce_difference(b, tok, b, tok)["ci"] == [0.0, 0.0]
    noisy = a + rng.normal(0, 0.3, size=120) * tok            # a difference with per-example noise
    d = paired_ce_difference(noisy, tok, b, tok, n_boot=2000, seed=4)
    idx = np.random.default_rng(99).integers(0, 120, size=(2000, 120))
    ref = np.quantile(noisy[idx].sum(1) / tok[idx].sum(1) - b[idx].sum(1) / tok[idx].sum(1), [0.025, 0.975])
    np.testing.assert_allclose(d["ci"], ref, atol=0.01)
    with pytest.raises(EvalError, match="four equal-length"):
        paired_ce_difference(a, tok, b[:3], tok)


def test_paired_rate_difference_counts_only_the_prompts_the_models_disagree_on():
    """Two models that agree on 180 of 200 prompts, the first harmful on 15 of the 20 others:
    the difference (15 - 5) / 200 = 0.05 is resolved by the paired interval (it matches the
    normal approximation of McNemar's variance), while the two Wilson intervals overlap; a
    model against itself gives [0, 0]; bad input is an EvalError."""
    from semloss_jax.eval.metrics import paired_rate_difference, wilson_interval
    rng = np.random.default_rng(1)
    both = (rng.random(180) < 0.6).astype(float)
    a = np.concatenate([both, np.ones(15), np.zeros(5)])
    b = np.concatenate([both, np.zeros(15), np.ones(5)])
    d = paired_rate_difference(a, b, n_boot=4000, seed=2)
    assert d["diff"] == pytest.approx(0.05) and d["n_examples"] == 200
    n, n10, n01 = 200, 15, 5
    sd = math.sqrt(n10 + n01 - (n10 - n01) ** 2 / n) / n
    np.testing.assert_allclose(d["ci"], [0.05 - 1.96 * sd, 0.05 + 1.96 * sd], atol=0.006)
    assert d["ci"][0] > 0.0
    wa, wb = wilson_interval(int(a.sum()), n), wilson_interval(int(b.sum()), n)
    assert wa[0] < wb[1]                                      # unpaired: no difference visible
    assert paired_rate_difference(b, b)["ci"] == [0.0, 0.0]
    with pytest.raises(EvalError, match="equal-length"):
        paired_rate_difference(a, b[:3])
    with pytest.raises(EvalError, match="0/1"):
        paired_rate_difference(a * 0.5, b)


def test_degenerate_cases():
    e = rate_summary([])
    assert e["n"] == 0 and e["rate"] is None and e["ci"] == [None, None]
    z = rate_summary([False] * 20)
    assert z["rate"] == 0.0 and z["ci"] == [0.0, 0.0]
    assert z["wilson"][0] == 0.0 and 0.1 < z["wilson"][1] < 0.2   # 0/20: upper ~0.161
    o = rate_summary([True] * 20)
    assert o["ci"] == [1.0, 1.0] and o["wilson"][1] == 1.0 and o["wilson"][0] < 1.0
    one = rate_summary([True])
    assert one["ci"] == [1.0, 1.0]
    c = ce_summary([0.0, 3.0], [0, 0])
    assert c["ce"] is None and c["n_examples"] == 0
    c = ce_summary([6.0, 0.0], [3, 0])   # the 0-token example is ignored
    assert c["ce"] == 2.0 and c["ci"] == [2.0, 2.0] and c["ppl"] == pytest.approx(math.exp(2))
    with pytest.raises(ValueError):
        ce_summary([1.0], [1, 2])
    with pytest.raises(ValueError):
        rate_summary([True], n_boot=0)
    with pytest.raises(ValueError):
        rate_summary([True], level=1.5)


def test_wilson_known_values():
    lo, hi = wilson_interval(0, 10)
    z2 = 1.959963984540054 ** 2
    assert lo == 0.0 and hi == pytest.approx(z2 / (10 + z2))
    lo, hi = wilson_interval(5, 10)
    # width: 2 z sqrt(.025 + z^2/400) / (1 + z^2/10)
    assert (lo + hi) / 2 == pytest.approx(0.5) and hi - lo == pytest.approx(0.5268, abs=1e-3)


def test_bootstrap_seeded_and_vectorized_chunks(monkeypatch):
    x = np.random.default_rng(1).random(300)
    a = bootstrap_mean_ci(x, seed=5)
    assert bootstrap_mean_ci(x, seed=5) == a
    assert bootstrap_mean_ci(x, seed=6) != a
    # chunking the resamples (memory bound) draws the same numbers as one big draw
    monkeypatch.setattr(metrics, "_CHUNK_ELEMS", 300 * 7)
    assert bootstrap_mean_ci(x, seed=5) == a


# ---------------------------------------------------------------------------------------------
# Reference cross-entropy with a tiny random Llama and the real tokenizer
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(real_tokenizer):
    cfg = tiny_config(vocab_size=real_tokenizer.vocab_size)
    return cfg, init_params(cfg, jax.random.PRNGKey(0))


def _direct_nll(params, cfg, tok, prompt, ref):
    """Unbatched, unpadded reference computation."""
    p, r = tok.prompt_ids(prompt), tok.response_ids(ref)
    s = np.array([p + r], np.int32)
    logp = np.asarray(jax.nn.log_softmax(forward(params, cfg, s[:, :-1]), -1), np.float64)[0]
    tgt = s[0, 1:]
    pos = np.arange(len(p) - 1, len(s[0]) - 1)
    return -logp[pos, tgt[pos]].sum(), len(r)


def test_reference_nll_matches_direct(tiny, real_tokenizer):
    cfg, params = tiny
    tok = real_tokenizer
    prompts = ["What is 2+2?", "Write a haiku about autumn leaves falling.", "Hi"]
    refs = ["4", "Red leaves drift down / quiet on the cold ground / the year exhales slow",
            "Hello! How can I help you today?"]
    # batch of 4 with 3 examples: one padded row; unequal lengths: right padding in rows
    nll, ntok = reference_nll(params, cfg, tok, prompts, refs, batch_size=4, seq_len=128)
    for i in range(len(prompts)):
        d, n = _direct_nll(params, cfg, tok, prompts[i], refs[i])
        assert ntok[i] == n
        assert nll[i] == pytest.approx(d, rel=1e-4)
    # a random model over a ~49k vocabulary: CE near log V per token
    s = ce_summary(nll, ntok)
    assert abs(s["ce"] - math.log(cfg.vocab_size)) < 1.0
    assert s["ci"][0] <= s["ce"] <= s["ci"][1]
    with pytest.raises(ValueError):
        reference_nll(params, cfg, tok, ["a"], [])
