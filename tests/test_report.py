"""eval.py report on synthetic eval dirs: table, report.json, plots, training-config lookup."""
from __future__ import annotations

import json

import numpy as np
import pytest

from semloss_jax.eval import report as rp
from semloss_jax.eval.helpfulness import helpfulness_summary
from semloss_jax.eval.metrics import ce_summary, rate_summary

SETTINGS = {"max_new_tokens": 128, "decoding": "greedy", "limit": None, "system": None}


def _helpfulness(median_tokens, seed):
    """A benign set's helpfulness block around a given median reply length (tokens)."""
    rng = np.random.default_rng(seed)
    n_tok = np.clip(rng.normal(median_tokens, 10, 40).round(), 0, 128).astype(int)
    stops = ["length" if k == 128 else "eot" for k in n_tok]
    return helpfulness_summary(n_tok, stops, np.ones(40, bool), max_new_tokens=128,
                               rouge=rng.uniform(0, 0.5, 40), cosine=rng.uniform(0.5, 1, 40),
                               embed_model="base", n_boot=200)


def _eval_json(harm_k, over_k, ce, *, n=40, train_config=None, run_dir=None, seed=0,
               median_tokens=None):
    rng = np.random.default_rng(seed)

    def flags(k):
        return [True] * k + [False] * (n - k)

    ntok = rng.integers(5, 50, size=n)
    model = {"path": "x", "hash": f"{seed:064x}"}
    if train_config is not None:
        model["train_config"] = train_config
    if run_dir is not None:
        model["run_dir"] = str(run_dir)
    benign_extra = ({} if median_tokens is None
                    else {"helpfulness": _helpfulness(median_tokens, seed)})
    return {"model": model, "settings": SETTINGS, "judge": {"name": "harm-tfidf-lr-v1"},
            "sets": {"harmful": {"harmful_rate": rate_summary(flags(harm_k), n_boot=200),
                                 "refusal_rate": rate_summary(flags(n - harm_k), n_boot=200)},
                     "overrefusal": {"overrefusal_rate": rate_summary(flags(over_k), n_boot=200)},
                     "benign": {"refusal_rate": rate_summary(flags(1), n_boot=200),
                                "reference_ce": ce_summary(ce * ntok, ntok, n_boot=200),
                                **benign_extra}}}


@pytest.fixture
def dirs(tmp_path):
    out = []
    # base model: an eval dir with no training config anywhere
    d = tmp_path / "base_eval"
    d.mkdir()
    (d / "eval.json").write_text(json.dumps(_eval_json(30, 2, 2.0, median_tokens=110)))
    out.append(d)
    # two TA-SFT runs: run dir with config.yaml and eval/eval.json inside
    for n_h, k in ((50, 20), (200, 8)):
        r = tmp_path / f"tasft_{n_h}"
        (r / "eval").mkdir(parents=True)
        (r / "config.yaml").write_text(f"data:\n  harmful_n: {n_h}\nobjective:\n  kind: tasft\n"
                                       f"  lam: 1.0\nrun:\n  steps: 10\n")
        (r / "eval" / "eval.json").write_text(json.dumps(_eval_json(k, 5, 2.2, seed=n_h,
                                                                    median_tokens=30)))
        out.append(r)
    # SafeInstr: the training config recorded inside eval.json (eval.py run --model RUN_DIR)
    s = tmp_path / "si_eval"
    s.mkdir()
    tc = {"data": {"harmful_n": 100, "safeinstr_n": 300}, "objective": {"kind": "safeinstr"}}
    (s / "eval.json").write_text(json.dumps(_eval_json(5, 25, 2.1, train_config=tc,
                                                       run_dir=tmp_path / "runs" / "si", seed=7)))
    out.append(s)
    return out


def test_report_end_to_end(dirs, tmp_path):
    out = tmp_path / "rep"
    rep = rp.make_report([str(d) for d in dirs], out)
    ms = {m["name"]: m for m in rep["models"]}
    assert set(ms) == {"base_eval", "tasft_50", "tasft_200", "si"}
    assert ms["base_eval"]["objective"] == "base" and ms["base_eval"]["n_harmful"] == 0
    assert ms["tasft_50"]["n_harmful"] == 50 and ms["tasft_200"]["n_harmful"] == 200
    assert ms["si"]["objective"] == "safeinstr" and ms["si"]["n_harmful"] == 0
    assert ms["si"]["n_safety"] == 300
    assert ms["tasft_50"]["harmful_rate"]["k"] == 20 and ms["tasft_200"]["harmful_rate"]["k"] == 8
    assert all(m["comparable"] for m in ms.values())
    saved = json.loads((out / "report.json").read_text())
    assert saved["models"] == json.loads(json.dumps(rep["models"]))
    # 2 TA-SFT points + 2 reference lines; 4 models x 2 panels; 3 models with the helpfulness
    # proxies (the SafeInstr eval.json predates them) x 3 panels
    assert saved["plots"] == {"harmful_vs_n.png": 4, "safety_vs_helpfulness.png": 8,
                              "harmful_vs_reply_quality.png": 9}
    assert ms["si"]["reply_tokens_benign"] is None
    assert ms["tasft_50"]["reply_tokens_benign"]["median"] < ms["base_eval"]["reply_tokens_benign"][
        "median"]
    for png in ("harmful_vs_n.png", "safety_vs_helpfulness.png", "harmful_vs_reply_quality.png"):
        b = (out / png).read_bytes()
        assert b[:8] == b"\x89PNG\r\n\x1a\n" and len(b) > 5000
    md = (out / "report.md").read_text()
    rows = [ln for ln in md.splitlines() if ln.startswith("| ") and not ln.startswith("| model")]
    assert len(rows) == 4
    assert "| tasft_50 | tasft | 50 | 50.0% (20/40)" in md
    si_row = next(r for r in rows if r.startswith("| si |"))
    assert si_row.endswith("| n/a | n/a | n/a | n/a |")      # no helpfulness block: n/a
    base_row = next(r for r in rows if r.startswith("| base_eval |"))
    assert "(q1 " in base_row and "n/a" not in "|".join(base_row.split("|")[-5:])
    assert "300 safety" in md
    assert "Warning" not in md


def test_report_cli_and_errors(dirs, tmp_path, capsys):
    ns = type("A", (), {"inputs": [str(dirs[1]), str(dirs[1])], "out": str(tmp_path / "o")})
    assert rp.run(ns) == 0
    names = [m["name"] for m in json.loads((tmp_path / "o" / "report.json").read_text())["models"]]
    assert names == ["tasft_50", "tasft_50#2"]
    ns.inputs = [str(tmp_path / "missing")]
    assert rp.run(ns) == 2
    assert "no eval.json" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "eval.json").write_text('{"model": {}, \n "sets": ')
    with pytest.raises(rp.EvalError, match=r"eval.json:2: not valid JSON"):
        rp.collect([bad])
    (bad / "eval.json").write_text('{"x": 1}')
    with pytest.raises(rp.EvalError, match="missing field"):
        rp.collect([bad])


def test_incomparable_settings_warned(dirs, tmp_path):
    ej = dirs[0] / "eval.json"
    d = json.loads(ej.read_text())
    d["settings"] = {**SETTINGS, "max_new_tokens": 32}
    ej.write_text(json.dumps(d))
    rep = rp.make_report([dirs[0], dirs[1]], tmp_path / "o")
    assert not rep["models"][0]["comparable"]
    assert "Warning" in (tmp_path / "o" / "report.md").read_text()


def test_training_summary_rules():
    assert rp.training_summary(None)["objective"] == "base"
    t = rp.training_summary({"data": {"harmful_n": 0}, "objective": {"kind": "tasft"}})
    assert t["n_harmful"] is None  # 0 = "all available"
    t = rp.training_summary({"data": {"harmful_n": 64}, "objective": {"kind": "tasft", "lam": 0}})
    assert t["n_harmful"] == 0     # lam = 0: no harmful term
    t = rp.training_summary({"data": {"harmful_n": 64}, "objective": {"kind": "sft"}})
    assert t["n_harmful"] == 0
    t = rp.training_summary({"data": {"harmful_n": 64}, "objective": {"kind": "unlikelihood"}})
    assert t["n_harmful"] == 64
