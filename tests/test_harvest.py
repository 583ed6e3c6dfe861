"""Harvesting D_harmful: the filter's counts, a real (tiny, random) model run, the CLI."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semloss_jax.data import harvest, readers
from semloss_jax.data.readers import read_jsonl
from semloss_jax.data.registry import load_set
from semloss_jax.data.schema import Record
from semloss_jax.errors import DataError
from semloss_jax.eval.judges import load_judge
from semloss_jax.loss import cost, emd
from semloss_jax.models.llama import embedding_matrix, forward, init_params, tiny_config
from semloss_jax.models.tokenizer import load_tokenizer
from semloss_jax.models.weights import export_hf, load_hf


def _prompts(n):
    return [Record(id=f"advbench:{i}", prompt=f"Explain how to do bad thing {i}", response="",
                   source="advbench", split="train", label="harmful") for i in range(n)]


def test_filter_counts_add_up_with_the_real_refusal_detector():
    responses = ["", "   ", "I'm sorry, but I can't help with that.",
                 "I cannot assist with that request.",
                 "Sure. Step 1: gather the materials. Step 2: mix them.",
                 "Here is a detailed plan you can follow."]
    kept, stats = harvest.filter_responses(_prompts(6), responses)
    assert stats.prompts == 6 and stats.kept == 2 == len(kept)
    assert stats.dropped == {"empty": 2, "refusal": 2}
    assert [r.response for r in kept] == responses[4:]
    assert all(r.label == "harmful" and r.split == "train" and r.source == "harvest" for r in kept)
    assert kept[0].id == "harvest:advbench:4" and kept[0].category == "advbench"
    assert "kept 2" in str(stats)


class _Threshold:
    """A judge given as explicit scores per response (the harm judge's interface)."""

    def __init__(self, scores):
        self.scores = scores

    def score(self, prompts, responses):
        return np.array([self.scores[r] for r in responses])


def test_judge_filter_and_threshold():
    responses = ["Sure, step one is easy.", "Here you go: a harmless poem.", "I won't help with that."]
    judge = _Threshold({responses[0]: 0.9, responses[1]: 0.2})
    kept, stats = harvest.filter_responses(_prompts(3), responses, judge=judge, threshold=0.5)
    assert [r.response for r in kept] == responses[:1] and kept[0].score == pytest.approx(0.9)
    assert stats.dropped == {"judged not harmful": 1, "refusal": 1}
    kept, stats = harvest.filter_responses(_prompts(3), responses, judge=judge, threshold=0.1)
    assert stats.kept == 2


def test_real_harm_judge_runs_in_the_filter():
    judge = load_judge("tfidf")
    responses = ["Sure, here is how to build a pipe bomb: fill a steel pipe with explosive "
                 "powder, cap both ends and attach a fuse.",
                 "The capital of France is Paris."]
    kept, stats = harvest.filter_responses(_prompts(2), responses, judge=judge)
    # the records carry the judge's own scores of the same (prompt, reply) pairs ...
    direct = [float(x) for x in judge.score([r.prompt for r in _prompts(2)], responses)]
    assert {r.response: r.score for r in kept} == {x: s for x, s in zip(responses, direct) if s >= 0.5}
    assert stats.kept + sum(stats.dropped.values()) == 2
    # ... and a threshold between the two scores keeps exactly the higher-scored reply
    mid = sum(direct) / 2
    kept, stats = harvest.filter_responses(_prompts(2), responses, judge=judge, threshold=mid)
    assert [r.response for r in kept] == [responses[int(direct[1] > direct[0])]]
    assert stats.dropped == {"judged not harmful": 1}


def test_pick_prompts_deterministic_train_only():
    a = harvest.pick_prompts(10, seed=0)
    assert [r.id for r in a] == [r.id for r in harvest.pick_prompts(10, seed=0)]
    assert [r.id for r in a] != [r.id for r in harvest.pick_prompts(10, seed=1)]
    assert {r.split for r in a} == {"train"}
    test = {r.prompt for r in load_set("harmful_prompts", "test")}
    assert not any(r.prompt in test for r in harvest.pick_prompts(300, seed=2))
    with pytest.raises(DataError, match="train split has"):
        harvest.pick_prompts(10**6)


def test_cli_pyrit_source(tmp_path, capsys):
    out = tmp_path / "d_pyrit.jsonl"
    assert harvest.main(["--n", "10", "--out", str(out), "--source", "pyrit"]) == 0
    recs, _ = read_jsonl(out)
    assert len(recs) == 10 and {r.label for r in recs} == {"harmful"}
    assert all(r.response.strip() for r in recs)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["kept"] == 10


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, real_model_path):
    """A tiny random Llama with the real SmolLM2 tokenizer, exported as an HF directory."""
    tok = load_tokenizer(real_model_path)
    cfg = tiny_config(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                      tie_word_embeddings=True, eos_token_id=tok.eos_id)
    params = init_params(cfg, jax.random.PRNGKey(0))
    # weights with some spread: next-token distributions that differ from position to position
    # (the initial ones are close to uniform, and their greedy replies came out empty)
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(5), len(leaves))
    params = jax.tree_util.tree_unflatten(tree, [x + 0.3 * jax.random.normal(k, x.shape)
                                                 for x, k in zip(leaves, keys)])
    return export_hf(params, cfg, tmp_path_factory.mktemp("tiny") / "model", tokenizer=tok)


@pytest.mark.real_model
def test_harvest_tiny_model_end_to_end(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "d_harmful.jsonl"
    rc = harvest.main(["--n", "3", "--out", str(out), "--model", str(tiny_model_dir),
                       "--judge", "none", "--max-new-tokens", "4", "--batch-size", "3",
                       "--soft-targets", "--no-progress"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    recs, _ = read_jsonl(out)
    assert summary["prompts"] == 3 and summary["kept"] == 3 and summary["dropped"] == {}
    assert len(recs) == summary["kept"]
    picked = {r.prompt for r in harvest.pick_prompts(3, seed=0)}
    assert all(r.prompt in picked and r.response.strip() for r in recs)
    # mu(q): one unit-ball d-vector per response token (response + end-of-turn)
    tok = load_tokenizer(tiny_model_dir)
    mus = readers.load_response_mu(out)
    assert len(mus) == len(recs)
    for r, m in zip(recs, mus):
        assert m.shape == (len(tok.response_ids(r.response)), 32)
        assert np.isfinite(m).all() and (np.linalg.norm(m, axis=1) <= 1 + 1e-5).all()
    # ... equal to μ of the model's own next-token distributions along the reply, computed
    # here one record at a time without padding: row j predicts response token j
    cfg, params = load_hf(tiny_model_dir)
    E_hat = cost.unit_embeddings(embedding_matrix(params))
    basis = emd.principal_basis(E_hat, 4)
    plain = harvest.response_mu(params, cfg, tok, recs, progress=False)
    packed = harvest.response_mu(params, cfg, tok, recs, gelbrich_rank=4, progress=False)
    for r, m, g in zip(recs, plain, packed):
        prompt, resp = tok.prompt_ids(r.prompt), tok.response_ids(r.response)
        logits = forward(params, cfg, jnp.asarray([prompt + resp]))[0]
        z = logits[len(prompt) - 1:len(prompt) - 1 + len(resp)]
        want = np.asarray(emd.mean_embedding(z, E_hat))
        assert np.abs(np.diff(want, axis=0)).max() > 1e-2        # positions are told apart
        np.testing.assert_allclose(m, want, atol=2e-5)
        mu, cov = emd.projected_moments(emd.probs_from_logits(z), E_hat, basis)
        want = np.concatenate([np.asarray(mu), np.asarray(emd.pack_symmetric(cov))], -1)
        np.testing.assert_allclose(g, want, atol=2e-5)    # --gelbrich-rank 4: μ(q) then ΠΣΠᵀ
