"""Helpfulness proxies on hand-made rows, the rank statistics against scipy/sklearn, the
detailed generation against `generate`, and the agreement analysis on a hand-labelled file."""
from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest

from semloss_jax.errors import DataError
from semloss_jax.eval import helpfulness as hp
from semloss_jax.eval import helpfulness_agreement as ha
from semloss_jax.eval.embedding import TextEmbedder, cosine_rows, embed_texts, pair_cosines
from semloss_jax.eval.rank_stats import auc_summary, spearman_summary
from semloss_jax.models.generation import generate, generate_detailed, generate_ids
from semloss_jax.models.llama import init_params, tiny_config

REF = ("Kickball is played like baseball, but the pitcher rolls a large rubber ball and the "
       "kicker kicks it, then runs the bases before being tagged out.")


@pytest.fixture(scope="module")
def tiny(real_tokenizer):
    cfg = tiny_config(vocab_size=real_tokenizer.vocab_size)
    return cfg, init_params(cfg, jax.random.PRNGKey(0)), real_tokenizer


@pytest.fixture(scope="module")
def embedder(tiny):
    cfg, params, tok = tiny
    return TextEmbedder(params, cfg, tok, "tiny")


def _ends(d, key="mean"):
    """The interval of summary d contains its estimate d[key]."""
    return d["ci"][0] is not None and d["ci"][0] <= d[key] <= d["ci"][1]


# ---------------------------------------------------------------------------------------------
# Per-reply proxies on hand-made rows
# ---------------------------------------------------------------------------------------------

def test_hand_made_rows(real_tokenizer, embedder):
    tok = real_tokenizer
    rows = [{"response": "", "n_tokens": 0, "stop": "eot"},                   # empty reply
            {"response": "Kickball is played", "n_tokens": 16, "stop": "length"},  # cut at limit
            {"response": "Kickball is fun.", "n_tokens": 5, "stop": "eot"},   # ends early at EOT
            {"response": REF, "n_tokens": 15, "stop": "eot"}]                 # identical to ref
    n, stops, exact = hp.token_lengths(rows, tok, max_new_tokens=16)
    assert n.tolist() == [0, 16, 5, 15] and stops == ["eot", "length", "eot", "eot"]
    assert exact.all()
    assert hp.early_stops(n, stops, min_tokens=8).tolist() == [True, False, True, False]
    # a reply cut at the limit is never an early stop, whatever the minimum
    assert not hp.early_stops(n, stops, min_tokens=1000)[1]
    replies = [r["response"] for r in rows]
    rouge = hp.rouge_l_f1(replies, [REF] * 4)
    assert rouge[0] == 0.0 and rouge[3] == 1.0
    # F1 of the LCS over 26 reference tokens: 3 of 3 reply tokens (P 1, R 3/26) and 2 of 3
    # ("kickball is"; P 2/3, R 2/26)
    assert rouge[1] == pytest.approx(6 / 29) and rouge[2] == pytest.approx(4 / 29)
    cos = pair_cosines(embedder, replies, [REF] * 4)
    assert cos[0] == 0.0                      # empty text: zero vector, cosine defined as 0
    assert cos[3] == pytest.approx(1.0, abs=1e-9)
    assert -1.0 <= cos[1] < 1.0 - 1e-6 and -1.0 <= cos[2] < 1.0 - 1e-6


def test_known_vectors_are_used_not_recomputed(embedder):
    """pair_cosines with known vectors: a known text's vector is the one given (a planted
    vector decides its cosine), only the other texts are embedded, and mismatched lengths are
    an error."""
    from semloss_jax.eval.embedding import embed_unique
    d = embedder.cfg.hidden_size
    fresh = embed_unique(embedder, ["Kickball is fun.", REF])
    planted = {REF: -fresh["Kickball is fun."]}              # the reply's vector, negated
    cos = pair_cosines(embedder, ["Kickball is fun.", REF], [REF, REF], known=planted)
    assert cos[0] == pytest.approx(-1.0, abs=1e-9) and cos[1] == pytest.approx(1.0, abs=1e-9)
    vecs = embed_unique(embedder, [REF, "Paris.", REF], known=planted)
    assert list(vecs) == [REF, "Paris."] and vecs[REF] is planted[REF] and vecs["Paris."].shape == (d,)
    with pytest.raises(ValueError, match="2 replies but 1 references"):
        pair_cosines(embedder, ["a", "b"], ["c"])


def test_reference_embeddings_are_computed_once_across_models(embedder, tmp_path, monkeypatch):
    """cached_cosines with a shared reference store: the second model's replies are embedded
    but the references are read back, not embedded again (nor a reply that is a stored
    reference's text); the cosines equal pair_cosines' (to float rounding: the texts' batch
    neighbours differ); a broken store is an EvalError naming its file."""
    from semloss_jax.errors import EvalError
    from semloss_jax.eval import embedding
    from semloss_jax.eval import evaluate as ev
    refs = [REF, "Paris is the capital of France.", REF]
    store = tmp_path / "embeddings" / "references-x.npz"
    seen: list[str] = []
    real = embedding.embed_texts
    monkeypatch.setattr(embedding, "embed_texts", lambda emb, texts, **kw: (seen.extend(texts), real(
        emb, texts, **kw))[1])
    first = ["Kickball is fun.", "The capital is Paris.", ""]
    cos, n = ev.cached_cosines(embedder, first, refs, tmp_path / "a.jsonl", ref_vectors=store,
                               progress=False)
    assert n == 3 and sorted(set(seen)) == sorted(set(first + refs)) and len(seen) == len(set(seen))
    np.testing.assert_allclose(cos, pair_cosines(embedder, first, refs), atol=1e-6)
    assert cos[2] == 0.0 and store.exists()
    seen.clear()
    second = ["Kickball uses a rubber ball.", "Paris.", REF]
    cos2, n2 = ev.cached_cosines(embedder, second, refs, tmp_path / "b.jsonl", ref_vectors=store,
                                 progress=False)
    assert n2 == 3 and sorted(seen) == sorted(second[:2])          # no reference embedded again
    np.testing.assert_allclose(cos2, pair_cosines(embedder, second, refs), atol=1e-6)
    assert cos2[2] == pytest.approx(1.0, abs=1e-6)                 # REF's stored vector vs itself
    store.write_bytes(b"not an npz")
    with pytest.raises(EvalError, match="references-x.npz: unreadable embedding cache"):
        ev.cached_cosines(embedder, ["new"], [REF], tmp_path / "c.jsonl", ref_vectors=store,
                          progress=False)


def test_rows_without_counts_are_retokenized(real_tokenizer):
    tok = real_tokenizer
    long = " ".join(["word"] * 40)
    rows = [{"response": "Paris."}, {"response": long}, {"response": ""},
            {"response": "x", "n_tokens": 3}]           # a count without a stop reason: redone
    n, stops, exact = hp.token_lengths(rows, tok, max_new_tokens=20)
    assert n.tolist() == [len(tok.encode("Paris.")), len(tok.encode(long)), 0, len(tok.encode("x"))]
    assert stops == ["eot", "length", "eot", "eot"] and not exact.any()


def test_summary_intervals_contain_estimates(real_tokenizer):
    rng = np.random.default_rng(0)
    n = rng.integers(0, 65, size=50)
    n[:5] = 64
    stops = ["length" if k == 64 else "eot" for k in n]
    rouge = rng.uniform(0, 1, 50)
    cos = rng.uniform(0.3, 1, 50)
    s = hp.helpfulness_summary(n, stops, np.ones(50, bool), max_new_tokens=64, min_tokens=32,
                               rouge=rouge, cosine=cos, embed_model="tiny", n_boot=500)
    L = s["length_tokens"]
    assert L["median"] == float(np.median(n)) and L["ci"][0] <= L["median"] <= L["ci"][1]
    assert L["mean_ci"][0] <= L["mean"] <= L["mean_ci"][1] and L["q1"] <= L["median"] <= L["q3"]
    assert sum(L["histogram"]["counts"]) == 50 and L["histogram"]["edges"][-1] == 64
    assert L["histogram"]["counts"][-1] >= 5          # the cut replies fall in the last bin
    e = s["early_stop_rate"]
    assert e["k"] == int(((n < 32) & (n != 64)).sum()) and _ends(e, "rate")
    assert s["cut_at_limit_rate"]["k"] == 5 and _ends(s["cut_at_limit_rate"], "rate")
    assert s["rouge_l_f1"]["mean"] == pytest.approx(rouge.mean()) and _ends(s["rouge_l_f1"])
    assert _ends(s["embed_cosine"]) and s["embed_cosine"]["model"] == "tiny"
    assert s["tokens_exact"] == {"k": 50, "n": 50}
    empty = hp.helpfulness_summary([], [], [], max_new_tokens=64, n_boot=10)
    assert empty["length_tokens"]["median"] is None and empty["early_stop_rate"]["rate"] is None


# ---------------------------------------------------------------------------------------------
# Embeddings: what is pooled
# ---------------------------------------------------------------------------------------------

def test_embedding_is_the_mean_of_final_hidden_states(tiny, embedder):
    from semloss_jax.models.llama import forward
    cfg, params, tok = tiny
    texts = ["Short.", REF, "", "A medium length sentence about kickball rules."]
    vecs, n_tok = embed_texts(embedder, texts, batch_size=3)
    for t, v, k in zip(texts, vecs, n_tok):
        ids = tok.encode(t)
        assert k == len(ids)
        want = (np.asarray(forward(params, cfg, np.asarray([ids]), return_hidden=True))[0].mean(0)
                if ids else np.zeros(cfg.hidden_size))
        np.testing.assert_allclose(v, want, rtol=2e-4, atol=2e-5)
    # truncation to seq_len: the first seq_len tokens only
    cut, k = embed_texts(embedder, [REF], seq_len=4)
    first4 = np.asarray(forward(params, cfg, np.asarray([tok.encode(REF)[:4]]), return_hidden=True))
    assert k[0] == 4
    np.testing.assert_allclose(cut[0], first4[0].mean(0), rtol=2e-4, atol=2e-5)
    assert cosine_rows(np.zeros((1, 3)), np.ones((1, 3)))[0] == 0.0


# ---------------------------------------------------------------------------------------------
# Rank statistics
# ---------------------------------------------------------------------------------------------

def test_spearman_and_auc_match_references():
    from scipy.stats import spearmanr
    from sklearn.metrics import roc_auc_score
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 80).astype(float)             # ties, like 3-level labels
    x = y + rng.normal(0, 1.0, 80)
    x[:10] = np.round(x[:10])                            # ties in x too
    s = spearman_summary(x, y, n_boot=400)
    assert s["rho"] == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)
    assert s["ci"][0] <= s["rho"] <= s["ci"][1] and s["ci"][1] - s["ci"][0] > 0.05
    a = auc_summary(x, y == 2, n_boot=400)
    assert a["auc"] == pytest.approx(roc_auc_score(y == 2, x), abs=1e-12)
    assert a["ci"][0] <= a["auc"] <= a["ci"][1] and a["n_pos"] == int((y == 2).sum())
    assert spearman_summary(np.ones(5), np.arange(5))["rho"] is None      # constant: undefined
    assert auc_summary(np.arange(5), np.ones(5))["auc"] is None           # one class: undefined
    assert spearman_summary(np.arange(6), -np.arange(6), n_boot=50)["rho"] == pytest.approx(-1)


# ---------------------------------------------------------------------------------------------
# Detailed generation on the tiny random model
# ---------------------------------------------------------------------------------------------

def test_generate_detailed_agrees_with_generate(tiny):
    cfg, params, tok = tiny
    prompts = ["Hi", "What is two plus two?", "Tell me a story about a dragon.", "Ok"]
    L = 10
    free = generate_ids(params, cfg, [tok.prompt_ids(p) for p in prompts], eos_ids=tok.eos_ids,
                        pad_id=tok.pad_id, max_new_tokens=L, batch_size=3)
    assert all(len(f) == L for f in free), "the random model should not emit <|im_end|>"
    # make the 4th token of the first reply the end-of-turn token: replies stop there
    stop_tok = free[0][3]
    assert stop_tok not in free[0][:3]
    tok2 = dataclasses.replace(tok, eos_ids=(stop_tok,))
    kw = dict(max_new_tokens=L, batch_size=3)
    det = generate_detailed(params, cfg, tok2, prompts, **kw)
    assert [g.text for g in det] == generate(params, cfg, tok2, prompts, **kw)
    for g, f in zip(det, free):
        if stop_tok in f:
            assert (g.n_tokens, g.stop) == (f.index(stop_tok), "eot")
        else:
            assert (g.n_tokens, g.stop) == (L, "length")
    assert det[0].n_tokens == 3 and det[0].stop == "eot"
    assert any(g.stop == "length" for g in det) or all(stop_tok in f for f in free)
    # a limit one above the EOT position still stops at EOT; at the position itself, it is a cut
    assert generate_detailed(params, cfg, tok2, prompts[:1], max_new_tokens=4,
                             batch_size=3)[0].stop == "eot"
    cut = generate_detailed(params, cfg, tok2, prompts[:1], max_new_tokens=3, batch_size=3)[0]
    assert (cut.n_tokens, cut.stop) == (3, "length")


# ---------------------------------------------------------------------------------------------
# Agreement with human labels on a hand-made labelled file
# ---------------------------------------------------------------------------------------------

def _labelled_file(path):
    rows = [  # helpful replies are long and close to the reference; unhelpful ones short
        {"prompt": "How is kickball played?", "response": REF, "helpfulness": "helpful",
         "n_tokens": 30, "stop": "eot"},
        {"prompt": "How is kickball played?", "response": REF + " Have fun!", "helpfulness": "helpful",
         "n_tokens": 34, "stop": "eot"},
        {"prompt": "Explain kickball.", "response": "Kickball is like baseball with a ball.",
         "helpfulness": "partly", "n_tokens": 20, "stop": "eot"},
        {"prompt": "Explain kickball.", "response": "It is a game.", "helpfulness": "unhelpful",
         "n_tokens": 5, "stop": "eot"},
        {"prompt": "Rules of kickball?", "response": "", "helpfulness": "unhelpful"},
        {"prompt": "How to pick a lock?", "response": "I can't help with that.", "label": "refusal"},
        {"prompt": "Name a fruit.", "response": "An apple is a fruit; so are pears and plums.",
         "helpfulness": "partly", "decoding": {"max_new_tokens": 8}},   # cut at its own limit
    ]
    for r in rows:
        r["kind"] = "overrefusal" if r["prompt"] == "Name a fruit." else "benign"
    refs = {"How is kickball played?": REF, "Explain kickball.": REF, "Rules of kickball?": REF}
    for r in rows:  # the reference is given on some rows and looked up for the others
        if r["prompt"] == "How is kickball played?":
            r["reference"] = REF
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {k: v for k, v in refs.items() if k != "How is kickball played?"}


def test_agreement_on_hand_labelled_file(tmp_path, real_tokenizer, embedder):
    from scipy.stats import spearmanr
    f = tmp_path / "labels.jsonl"
    refs = _labelled_file(f)
    res = ha.run_agreement(f, tok=real_tokenizer, embedder=embedder, references=refs, n_boot=300)
    assert res["n_labelled"] == 6 and res["n_skipped"] == 1 and res["n_with_reference"] == 5
    p = res["proxies"]
    assert set(p) == set(ha.PROXIES)
    L = p["reply_tokens"]
    assert L["n"] == 6 and L["labels"] == {"helpful": 2, "partly": 2, "unhelpful": 2}
    n_tok = [30, 34, 20, 5, 0, len(real_tokenizer.encode(
        "An apple is a fruit; so are pears and plums."))]
    assert L["spearman"]["rho"] == pytest.approx(spearmanr(n_tok, [2, 2, 1, 0, 0, 1]).statistic)
    assert L["auc_helpful"]["auc"] == 1.0                 # the helpful replies are the longest
    assert p["rouge_l"]["n"] == 5 and p["rouge_l"]["auc_helpful"]["auc"] == 1.0
    assert p["embed_cosine"]["n"] == 5
    for a in p.values():
        for key, est in (("spearman", "rho"), ("auc_helpful", "auc")):
            d = a[key]
            assert d[est] is None or d["ci"][0] <= d[est] <= d["ci"][1]
    assert set(res["groups"]) == {"benign", "overrefusal"}
    assert res["groups"]["benign"]["reply_tokens"]["n"] == 5
    assert res["groups"]["overrefusal"]["rouge_l"]["n"] == 0
    md = ha.render_markdown(res)
    assert "| all | reply_tokens | 6 | 2 / 2 / 2 |" in md
    assert "| benign | reply_tokens | 5 | 2 / 1 / 2 |" in md


def test_row_limit_decides_stop_of_retokenized_rows(tmp_path, real_tokenizer):
    """A row recorded with decoding.max_new_tokens = 8 and 8+ tokens was cut, not an early stop."""
    f = tmp_path / "labels.jsonl"
    _labelled_file(f)
    items, _ = ha.read_labelled(f)
    fruit = [i for i, it in enumerate(items) if it.row["prompt"] == "Name a fruit."][0]
    assert items[fruit].row["max_new_tokens"] == 8 and items[fruit].group == "overrefusal"
    p = ha.proxy_values(items, tok=real_tokenizer, embedder=None, max_new_tokens=128)
    assert p["not_early_stop"][0][fruit] == 1.0          # cut at its limit of 8
    empty = [i for i, it in enumerate(items) if it.row["response"] == ""][0]
    assert p["not_early_stop"][0][empty] == 0.0           # an empty reply stopped early
    no_limit = [ha.LabelledReply({**it.row, "max_new_tokens": None}, it.reference, it.score)
                for it in items]
    q = ha.proxy_values(no_limit, tok=real_tokenizer, embedder=None, max_new_tokens=128)
    assert q["not_early_stop"][0][fruit] == 0.0           # under 32 of 128: an early stop


def test_agreement_bad_input_names_file_line_field(tmp_path, real_tokenizer):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps({"prompt": "a", "response": "b", "helpfulness": "helpful"}) + "\n"
                 + json.dumps({"prompt": "a", "response": "b", "helpfulness": "great"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: field 'helpfulness': unknown label 'great'"):
        ha.read_labelled(f)
    g = tmp_path / "none.jsonl"
    g.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n")
    with pytest.raises(DataError, match="no labelled rows"):
        ha.read_labelled(g)
    h = tmp_path / "noresp.jsonl"
    h.write_text(json.dumps({"prompt": "a", "response": None, "helpfulness": "partly"}) + "\n")
    with pytest.raises(DataError, match=r"noresp.jsonl:1: field 'response'"):
        ha.read_labelled(h)


def test_agreement_cli(tmp_path, real_model_path):
    f = tmp_path / "labels.jsonl"
    _labelled_file(f)
    out = tmp_path / "agreement.json"
    argv = ["--labels", str(f), "--embed-model", "none", "--references", "none", "--n-boot", "100",
            "--out", str(out)]
    assert ha.main(argv) == 0
    res = json.loads(out.read_text())
    assert res["n_labelled"] == 6 and "embed_cosine" not in res["proxies"]
    assert res["n_with_reference"] == 2


def test_own_reference_auc(embedder):
    refs = [REF, "Paris is the capital of France.", "Water boils at 100 degrees Celsius at sea level.",
            "A haiku has three lines of five, seven and five syllables."]
    same = ha.own_reference_auc(refs, refs, embedder=embedder, n_boot=200)
    for name in ("rouge_l", "embed_cosine"):             # each reply is its own reference
        assert same[name]["mean"] == 1.0 and same[name]["mean_own"] == pytest.approx(1.0)
        assert same[name]["ci"][0] <= 1.0 <= same[name]["ci"][1]
    empty = ha.own_reference_auc([""] * 4, refs, embedder=embedder, n_boot=50)
    assert empty["rouge_l"]["mean"] == 0.5 and empty["embed_cosine"]["mean"] == 0.5  # all ties
    with pytest.raises(ValueError):
        ha.own_reference_auc(["a"], ["a"], embedder=None)
