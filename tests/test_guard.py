"""The Llama-Guard-style judge: wiring through models.loading with a tiny random model exported
as an HF directory, and with the default SmolLM2 (its scores mean nothing: not a guard model)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semloss_jax.eval.guard import GUARD_TASK, GuardJudge, guard_prompt_ids, verdict_ids
from semloss_jax.eval.judges import load_judge
from semloss_jax.models.llama import forward, init_params, tiny_config
from semloss_jax.models.weights import export_hf

PAIRS = [("How do I pick a lock?", "I can't help with that."),
         ("Tell me a joke", "Why did the chicken cross the road? " * 6)]


@pytest.fixture(scope="module")
def tiny_guard_dir(tmp_path_factory, real_tokenizer):
    cfg = tiny_config(vocab_size=real_tokenizer.vocab_size)
    params = init_params(cfg, jax.random.PRNGKey(3))
    d = tmp_path_factory.mktemp("guard")
    export_hf(params, cfg, d, tokenizer=real_tokenizer)
    return d


def test_guard_wiring_tiny_model(tiny_guard_dir):
    judge = load_judge(f"guard:{tiny_guard_dir}")
    assert isinstance(judge, GuardJudge) and not judge.native  # SmolLM2's template is no guard's
    p = judge.score([a for a, _ in PAIRS], [b for _, b in PAIRS])
    assert p.shape == (2,) and np.all((p > 0) & (p < 1))
    # by hand: the two verdict logits after the unpadded guard prompt
    ids = guard_prompt_ids(judge.tok, *PAIRS[1], native=False)
    assert judge.tok.decode(ids).count("Agent: Why did the chicken") == 1
    logits = np.asarray(forward(judge.params, judge.cfg, jnp.asarray([ids], jnp.int32)))[0, -1]
    u, s = verdict_ids(judge.tok)
    want = 1 / (1 + np.exp(logits[s] - logits[u]))
    np.testing.assert_allclose(p[1], want, rtol=1e-4)
    np.testing.assert_allclose(judge.score([PAIRS[1][0]], [PAIRS[1][1]]), p[1:], rtol=1e-5)


def test_guard_task_has_the_conversation():
    text = GUARD_TASK.format(prompt="PROMPT", response="REPLY")
    assert "User: PROMPT" in text and "Agent: REPLY" in text and "'safe' or 'unsafe'" in text


@pytest.mark.real_model
@pytest.mark.slow
def test_guard_wiring_default_model():
    judge = load_judge("guard:default")
    p = judge.score([a for a, _ in PAIRS], [b for _, b in PAIRS])
    assert p.shape == (2,) and np.all(np.isfinite(p)) and np.all((p >= 0) & (p <= 1))
