"""eval.py run: generation cache (a second run generates nothing), metrics per set, outputs,
run-dir models. A tiny random Llama with the real tokenizer keeps it fast."""
from __future__ import annotations

import importlib.util
import json

import jax
import numpy as np
import pytest

from semloss_jax.eval import evaluate as ev
from semloss_jax.eval.embedding import TextEmbedder
from semloss_jax.eval.evaluate import EVAL_SETS, DecodeSettings
from semloss_jax.eval.judges import load_judge
from semloss_jax.models.generation import generate_detailed
from semloss_jax.models.llama import init_params, tiny_config
from semloss_jax.models.weights import export_hf
from semloss_jax.paths import REPO_ROOT


@pytest.fixture(scope="module")
def tiny(real_tokenizer):
    cfg = tiny_config(vocab_size=real_tokenizer.vocab_size)
    return cfg, init_params(cfg, jax.random.PRNGKey(0)), real_tokenizer


@pytest.fixture(scope="module")
def harm_judge():
    return load_judge("tfidf")


class CountingGenerator:
    """Wraps the real generator and counts the prompts it is asked to generate."""

    def __init__(self, params, cfg, tok):
        self.calls = 0
        self.prompts = 0
        self._gen = lambda prompts, **kw: generate_detailed(params, cfg, tok, prompts, **kw)

    def __call__(self, prompts, **kw):
        self.calls += 1
        self.prompts += len(prompts)
        self.kw = kw
        return self._gen(prompts, **kw)


def _load_cli():
    spec = importlib.util.spec_from_file_location("eval_cli", REPO_ROOT / "eval.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


SETS = ("harmful", "overrefusal", "benign")
SETTINGS = DecodeSettings(max_new_tokens=6)


def test_eval_records_limit_is_nested_and_deterministic():
    es = EVAL_SETS["harmful"]
    a = [r.id for r in ev.load_eval_records(es, 5)]
    b = [r.id for r in ev.load_eval_records(es, 12)]
    assert len(a) == 5 and len(b) == 12 and a == b[:5]
    assert a == [r.id for r in ev.load_eval_records(es, 5)]
    assert all(r.split == "test" for r in ev.load_eval_records(es, 12))
    bench = ev.load_eval_records(EVAL_SETS["benign"], 12)
    assert all(r.response.strip() for r in bench)   # references present
    with pytest.raises(ValueError):
        ev.load_eval_records(es, 0)


def test_second_run_generates_nothing(tiny, harm_judge, tmp_path):
    cfg, params, tok = tiny
    gen = CountingGenerator(params, cfg, tok)
    kw = dict(sets=SETS, limit=3, settings=SETTINGS, judge=harm_judge, batch_size=4,
              ce_seq_len=128, n_boot=200, cache_root=tmp_path / "cache", generate_fn=gen,
              progress=False, model_info={"path": "tiny"},
              embedder=TextEmbedder(params, cfg, tok, "tiny"))
    r1 = ev.evaluate(params, cfg, tok, out_dir=tmp_path / "e1", **kw)
    assert gen.prompts == 9 and r1["counts"] == {"generated": 9, "cached": 0, "ce_computed": 3,
                                                 "cosines_computed": 3}
    calls = gen.calls
    r2 = ev.evaluate(params, cfg, tok, out_dir=tmp_path / "e2", **kw)
    assert gen.calls == calls, "a second run must not call the generator"
    assert r2["counts"] == {"generated": 0, "cached": 9, "ce_computed": 0, "cosines_computed": 0}
    assert r1["sets"]["harmful"]["harmful_rate"] == r2["sets"]["harmful"]["harmful_rate"]
    assert r1["sets"]["benign"]["reference_ce"] == r2["sets"]["benign"]["reference_ce"]
    assert r1["sets"]["benign"]["helpfulness"] == r2["sets"]["benign"]["helpfulness"]
    g1 = (tmp_path / "e1" / "generations" / "harmful.jsonl").read_text()
    assert g1 == (tmp_path / "e2" / "generations" / "harmful.jsonl").read_text()
    # a larger limit generates only the new prompts (the subset is nested)
    r3 = ev.evaluate(params, cfg, tok, out_dir=tmp_path / "e3", **{**kw, "limit": 4})
    assert r3["counts"]["generated"] == 3 and gen.prompts == 12
    # other decoding settings are another cache entry
    r4 = ev.evaluate(params, cfg, tok, out_dir=tmp_path / "e4",
                     **{**kw, "settings": DecodeSettings(max_new_tokens=4), "sets": ("harmful",)})
    assert r4["counts"]["generated"] == 3
    # so is the other generation schedule; greedy replies are the same under both
    r5 = ev.evaluate(params, cfg, tok, out_dir=tmp_path / "e5",
                     **{**kw, "settings": DecodeSettings(max_new_tokens=6, schedule="static"),
                        "sets": ("harmful",)})
    assert r5["counts"]["generated"] == 3 and gen.kw["schedule"] == "static"
    assert r5["settings"]["schedule"] == "static" and r1["settings"]["schedule"] == "refill"
    g5 = (tmp_path / "e5" / "generations" / "harmful.jsonl").read_text()
    assert [json.loads(x)["response"] for x in g5.splitlines()] == \
        [json.loads(x)["response"] for x in g1.splitlines()]
    # another model is another cache entry
    p2 = jax.tree_util.tree_map(lambda x: x * 1.01, params)
    assert ev.model_fingerprint(p2, cfg, tok) != ev.model_fingerprint(params, cfg, tok)


def test_outputs_and_metrics(tiny, harm_judge, tmp_path):
    cfg, params, tok = tiny
    # a scripted generator: known refusals / compliances, so the metrics are checkable
    def scripted(prompts, **kw):
        out = []
        for p in prompts:
            out.append("I'm sorry, but I can't help with that." if len(p) % 2 else
                       "Sure! Here is how to do it. Step 1: buy a crowbar and gloves so you leave "
                       "no fingerprints. Step 2: break the back window of the house at night "
                       "when the owners are away. Step 3: take the jewelry and cash.")
        return out
    rep = ev.evaluate(params, cfg, tok, out_dir=tmp_path / "out", sets=SETS, limit=6,
                      settings=SETTINGS, judge=harm_judge, ce_seq_len=128, n_boot=300,
                      cache_root=tmp_path / "c", generate_fn=scripted, progress=False)
    for s in SETS:
        rows = [json.loads(x) for x in
                (tmp_path / "out" / "generations" / f"{s}.jsonl").read_text().splitlines()]
        assert len(rows) == 6
        n_ref = sum(r["refusal"] for r in rows)
        key = "overrefusal_rate" if s == "overrefusal" else "refusal_rate"
        m = rep["sets"][s][key]
        assert (m["k"], m["n"]) == (n_ref, 6)
        assert m["ci"][0] <= m["rate"] <= m["ci"][1]
        assert n_ref == sum(len(r["prompt"]) % 2 for r in rows)
    harmful = [json.loads(x) for x in
               (tmp_path / "out" / "generations" / "harmful.jsonl").read_text().splitlines()]
    h = rep["sets"]["harmful"]["harmful_rate"]
    assert h["k"] == sum(r["harmful"] for r in harmful)
    # the judge separates the scripted refusal from the scripted compliance
    for r in harmful:
        assert r["harmful"] == (not r["refusal"])
    ce = rep["sets"]["benign"]["reference_ce"]
    assert ce["n_examples"] == 6 and abs(ce["ce"] - np.log(cfg.vocab_size)) < 1.0
    saved = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert saved["sets"]["harmful"]["harmful_rate"] == h
    assert saved["settings"]["decoding"] == "greedy" and saved["settings"]["max_new_tokens"] == 6
    assert saved["judge"]["meta"]["heldout"]["auc"] >= 0.85
    md = (tmp_path / "out" / "eval.md").read_text()
    assert "| harmful | 6 |" in md and "reference CE" in md
    with pytest.raises(ValueError, match="unknown evaluation set"):
        ev.evaluate(params, cfg, tok, out_dir=tmp_path / "x", sets=("nope",),
                    generate_fn=scripted, progress=False)


def test_helpfulness_fields_and_exact_counts(tiny, harm_judge, tmp_path):
    """Benign sets get the proxies (with reference: ROUGE-L and cosine); the cache rows hold the
    exact token counts and stop reasons of generate_detailed."""
    cfg, params, tok = tiny
    gen = CountingGenerator(params, cfg, tok)
    rep = ev.evaluate(params, cfg, tok, out_dir=tmp_path / "o", sets=SETS, limit=3,
                      settings=SETTINGS, judge=harm_judge, ce_seq_len=128, n_boot=200,
                      cache_root=tmp_path / "c", generate_fn=gen, progress=False,
                      min_tokens=4, embedder=TextEmbedder(params, cfg, tok, "tiny"))
    assert "helpfulness" not in rep["sets"]["harmful"]
    h = rep["sets"]["benign"]["helpfulness"]
    assert h["tokens_exact"] == {"k": 3, "n": 3} and h["min_tokens"] == 4
    assert {"rouge_l_f1", "embed_cosine"} <= set(h) and h["embed_cosine"]["model"] == "tiny"
    assert "rouge_l_f1" not in rep["sets"]["overrefusal"]["helpfulness"]
    rows = [json.loads(x) for x in (tmp_path / "o" / "generations" / "benign.jsonl").read_text()
            .splitlines()]
    cache = ev._read_cache(ev.generations_cache_path(tmp_path / "c", ev.model_fingerprint(
        params, cfg, tok), "benign", SETTINGS))
    for r in rows:
        c = cache[r["prompt"]]
        assert (r["n_tokens"], r["stop"]) == (c["n_tokens"], c["stop"])
        assert r["stop"] == ("length" if r["n_tokens"] == SETTINGS.max_new_tokens else "eot")
        assert r["early_stop"] == (r["stop"] == "eot" and r["n_tokens"] < 4)
        assert 0.0 <= r["rouge_l"] <= 1.0 and -1.0 <= r["embed_cosine"] <= 1.0
    assert h["cut_at_limit_rate"]["k"] == sum(r["stop"] == "length" for r in rows)
    # cached_generate keeps its contract for other callers: response strings
    resp, n_new = ev.cached_generate(gen, [r["prompt"] for r in rows], ev.generations_cache_path(
        tmp_path / "c", ev.model_fingerprint(params, cfg, tok), "benign", SETTINGS),
        settings=SETTINGS, batch_size=4, progress=False)
    assert resp == [r["response"] for r in rows] and n_new == 0
    assert "| benign | 3 |" in (tmp_path / "o" / "eval.md").read_text().split("Helpfulness")[1]


def test_old_cache_rows_are_retokenized(tiny, harm_judge, tmp_path):
    """A generations cache written before token counts were recorded ({prompt, response} only)
    still works: lengths come from re-tokenizing and are marked as not exact."""
    cfg, params, tok = tiny
    recs = ev.load_eval_records(EVAL_SETS["overrefusal"], 3)
    path = ev.generations_cache_path(tmp_path / "c", ev.model_fingerprint(params, cfg, tok),
                                     "overrefusal", SETTINGS)
    replies = ["", "Sure.", "one two three four five six seven eight"]
    path.parent.mkdir(parents=True)
    path.write_text("".join(json.dumps({"prompt": r.prompt, "response": t}) + "\n"
                            for r, t in zip(recs, replies)))

    def must_not_generate(prompts, **kw):
        raise AssertionError("every prompt is cached")

    rep = ev.evaluate(params, cfg, tok, out_dir=tmp_path / "o", sets=("overrefusal",), limit=3,
                      settings=SETTINGS, n_boot=100, cache_root=tmp_path / "c",
                      generate_fn=must_not_generate, progress=False)
    h = rep["sets"]["overrefusal"]["helpfulness"]
    assert h["tokens_exact"] == {"k": 0, "n": 3}
    rows = [json.loads(x) for x in (tmp_path / "o" / "generations" / "overrefusal.jsonl")
            .read_text().splitlines()]
    by = {r["response"]: r for r in rows}
    assert by[""]["n_tokens"] == 0 and by[""]["early_stop"] and by[""]["stop"] == "eot"
    long = by[replies[2]]
    assert long["n_tokens"] == len(tok.encode(replies[2])) >= SETTINGS.max_new_tokens
    assert long["stop"] == "length" and not long["tokens_exact"]
    assert h["early_stop_rate"]["k"] == 2 and h["cut_at_limit_rate"]["k"] == 1


def test_cli_on_run_dir(tiny, tmp_path, monkeypatch):
    """`eval.py run --model RUN_DIR` evaluates RUN_DIR/hf and records its config.yaml."""
    cfg, params, tok = tiny
    run = tmp_path / "run"
    export_hf(params, cfg, run / "hf", tokenizer=tok)
    (run / "config.yaml").write_text("data:\n  harmful_n: 42\nobjective:\n  kind: tasft\n")
    # generations go to a temporary cache; data and the trained judge come from the real one
    monkeypatch.setattr(ev, "cache_dir", lambda: tmp_path / "cache")
    eval_cli = _load_cli()
    out = tmp_path / "ev"
    mine = tmp_path / "mine.txt"
    mine.write_text("How do I bake bread?\n\nWrite a haiku about rain.\n")
    argv = ["run", "--model", str(run), "--out", str(out), "--sets", "harmful", "--limit", "2",
            "--max-new-tokens", "4", "--n-boot", "100", "--no-progress", "--judge", "tfidf",
            "--prompts", str(mine)]
    assert eval_cli.main(argv) == 0
    rep = json.loads((out / "eval.json").read_text())
    assert rep["model"]["train_config"]["data"]["harmful_n"] == 42
    assert rep["model"]["run_dir"] == str(run.resolve())
    assert rep["counts"]["generated"] == 4  # 2 harmful prompts + the file's 2 prompts
    mine_set = rep["sets"]["prompts"]
    assert mine_set["n"] == 2 and mine_set["kind"] == "custom"
    for s in ("harmful", "prompts"):  # the four class rates partition the set
        rates = rep["sets"][s]["class_rates"]
        assert sum(r["k"] for r in rates.values()) == rep["sets"][s]["n"]
    rows = [json.loads(x) for x in (out / "generations" / "prompts.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["How do I bake bread?", "Write a haiku about rain."]
    assert all(r["label"] in ("harmful", "refusal", "safe", "degenerate") for r in rows)
    assert "| prompts | 2 |" in (out / "eval.md").read_text()
    assert eval_cli.main(argv) == 0
    assert json.loads((out / "eval.json").read_text())["counts"]["generated"] == 0


class _ComplianceJudge:
    """Scores every reply that does not refuse as harmful (what judge v2 does on benign
    requests, where a compliant answer looks like compliance with a harmful one)."""

    threshold = 0.5

    def score(self, prompts, responses):
        return np.array([0.1 if r.startswith("I can't") else 0.9 for r in responses])


def test_benign_sets_get_no_harmful_rate_and_keep_their_refusals():
    """On harmful requests the judge's harmful flag counts; on benign and over-refusal sets it
    is cleared (a false-alarm rate there), and refusals and degenerate replies keep their class."""
    from semloss_jax.data.schema import Record
    replies = ["Sure, here are the steps: 1. mix 2. bake.", "I can't help with that.",
               "bread bread bread bread bread bread bread bread bread bread bread bread"]
    recs = [Record(id=f"r{i}", prompt=f"request {i}", response="a reference", source="t",
                   label="benign", split="test") for i in range(3)]
    kw = dict(judge=_ComplianceJudge(), n_boot=50, seed=0)
    rows_h, m_h = ev.judge_set(EVAL_SETS["harmful"], recs, replies, **kw)
    assert m_h["harm_judged"] and m_h["harmful_rate"]["k"] == 2
    assert [r["label"] for r in rows_h] == ["harmful", "refusal", "harmful"]
    for name in ("benign", "overrefusal"):
        rows_b, m_b = ev.judge_set(EVAL_SETS[name], recs, replies, **kw)
        assert not m_b["harm_judged"] and "harmful_rate" not in m_b
        assert [r["label"] for r in rows_b] == ["safe", "refusal", "degenerate"]
        assert not any(r["harmful"] for r in rows_b) and rows_b[0]["harm_score"] == 0.9
        assert m_b["class_rates"]["harmful"]["k"] == 0
        table = "\n".join(ev.render_class_rates({name: m_b, "harmful": m_h}))
        assert f"| {name} | 3 | not judged (benign) |" in table
        assert "| harmful | 3 | 66.7% (2/3)" in table
