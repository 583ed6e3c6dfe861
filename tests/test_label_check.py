"""eval.label_check: blind samples of judged replies and the hand-vs-judge report."""
from __future__ import annotations

import json

import pytest

from semloss_jax.errors import DataError, EvalError
from semloss_jax.eval import label, label_check


def _judged(path, n, harmful_every, prefix):
    """An `eval.py judge`-like file: every harmful_every-th reply gives steps and is judged
    harmful; the judge also calls row 1 harmful (a false alarm)."""
    rows = []
    for i in range(n):
        steps = i % harmful_every == 0
        rows.append({"prompt": f"{prefix} request {i}", "response": ("Step 1: do it." if steps
                                                                     else "I can't help."),
                     "harm_prob": 0.9 if steps or i == 1 else 0.1,
                     "harmful": int(steps or i == 1), "refusal": 0, "degenerate": 0,
                     "label": "harmful" if steps or i == 1 else "refusal"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def _label_all(out):
    """Label every batch by the text: steps are harmful, the rest refusals."""
    for b in sorted((out / "batches").glob("*.jsonl")):
        if b.name.endswith(label.LABELS_SUFFIX):
            continue
        rows = label.read_batch(b)
        label.set_labels(b, [f"{r['uid']}={'harmful' if 'Step' in r['response'] else 'refusal'}"
                             for r in rows], "tester")


def test_pool_samples_each_model_and_hides_the_judge_and_the_model(tmp_path):
    _judged(tmp_path / "a.jsonl", 50, 2, "a")
    _judged(tmp_path / "b.jsonl", 10, 5, "b")
    judged = label_check.parse_judged([f"A={tmp_path / 'a.jsonl'}", f"B={tmp_path / 'b.jsonl'}"])
    pool = label_check.sample_pool(judged, per_model=20, seed=0)
    assert [r["model"] for r in pool].count("A") == 20 and [r["model"] for r in pool].count("B") == 10
    assert len({r["uid"] for r in pool}) == 30
    assert pool == label_check.sample_pool(judged, per_model=20, seed=0)  # seeded
    assert pool != label_check.sample_pool(judged, per_model=20, seed=1)
    paths = label_check.write_pool(tmp_path / "out", pool, size=12, seed=0)
    rows = [r for p in paths for r in label.read_batch(p)]  # read_batch rejects extra fields
    assert not any("model" in r or "judge_harmful" in r for r in rows)
    first = [r for p in paths if p.name != "relabel.jsonl" for r in label.read_batch(p)]
    assert sorted(r["uid"] for r in first) == sorted(r["uid"] for r in pool)
    with pytest.raises(EvalError, match="pool.jsonl exists"):
        label_check.write_pool(tmp_path / "out", pool, size=12, seed=0)


def test_report_compares_hand_labels_with_the_judge_on_the_same_rows(tmp_path, capsys):
    _judged(tmp_path / "a.jsonl", 40, 2, "a")
    _judged(tmp_path / "b.jsonl", 40, 4, "b")
    out = tmp_path / "out"
    assert label_check.main(["pool", "--judged", f"A={tmp_path / 'a.jsonl'}",
                             f"B={tmp_path / 'b.jsonl'}", "--out", str(out), "--per-model", "40",
                             "--size", "30"]) == 0
    with pytest.raises(EvalError, match="rows are not labelled yet"):
        label_check.report(out)
    _label_all(out)
    assert label_check.main(["report", "--dir", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    a, b = rep["per_model"]["A"], rep["per_model"]["B"]
    assert a["hand_harmful"]["k"] == 20 and a["judge_harmful"]["k"] == 21  # row 1: a false alarm
    assert b["hand_harmful"]["k"] == 10 and b["judge_harmful"]["k"] == 11
    assert a["recall"] == 1.0 and a["precision"] == pytest.approx(20 / 21)
    assert a["accuracy"] == pytest.approx(39 / 40)
    assert a["auc"] == pytest.approx(1 - 10 / 400)  # 20 ties with the false alarm count one half
    assert rep["all"]["n"] == 80 and rep["all"]["judge_minus_hand"] == pytest.approx(2 / 80)
    lo, hi = a["hand_harmful"]["wilson"]
    assert lo < 0.5 < hi
    assert rep["relabel_agreement"]["pairs"] == 12  # 15% of 80
    assert rep["relabel_agreement"]["four_class"]["observed_agreement"] == 1.0
    assert "A " in capsys.readouterr().out
    pool = (out / "pool.jsonl").read_text().splitlines()   # a pool without the judge's side
    row = json.loads(pool[3])
    del row["judge_harmful"]
    (out / "pool.jsonl").write_text("\n".join(pool[:3] + [json.dumps(row)] + pool[4:]) + "\n")
    with pytest.raises(DataError, match=r"pool\.jsonl:row 4: field 'judge_harmful'"):
        label_check.report(out)


def test_bad_judged_input_names_file_line_and_field(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "response": "r", "harm_prob": 0.2, "harmful": 0,
                               "label": "safe"}) + "\n" + json.dumps({"prompt": "p"}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: field 'response'"):
        label_check.read_judged(bad)
    with pytest.raises(EvalError, match="NAME=FILE"):
        label_check.parse_judged(["no_equals_sign"])
    with pytest.raises(EvalError, match="given twice"):
        label_check.parse_judged(["A=x", "A=y"])


def _as_generations(path, rows, ids):
    """`eval.py run` generations: an id per row and harm_score for the judge's probability."""
    out = [{"id": i, **{k: v for k, v in r.items() if k != "harm_prob"}, "harm_score": r["harm_prob"]}
           for i, r in zip(ids, rows)]
    path.write_text("".join(json.dumps(r) + "\n" for r in out))


def test_paired_pool_takes_the_same_prompts_from_every_model(tmp_path):
    a = _judged(tmp_path / "a.jsonl", 40, 2, "x")
    b = _judged(tmp_path / "b.jsonl", 40, 4, "x")
    _as_generations(tmp_path / "b.jsonl", b[::-1], [f"id{i}" for i in range(39, -1, -1)])  # other order
    _as_generations(tmp_path / "a.jsonl", a[:30], [f"id{i}" for i in range(30)])  # answers 30 only
    judged = label_check.parse_judged([f"A={tmp_path / 'a.jsonl'}", f"B={tmp_path / 'b.jsonl'}"])
    pool = label_check.sample_pool(judged, per_model=20, seed=0, paired=True)
    by = {m: {r["pair"]: r for r in pool if r["model"] == m} for m in ("A", "B")}
    assert sorted(by["A"]) == sorted(by["B"]) == list(range(20))
    assert all(by["A"][p]["prompt"] == by["B"][p]["prompt"] for p in range(20))
    assert {by["A"][p]["prompt"] for p in range(20)} <= {f"x request {i}" for i in range(30)}
    assert all(r["judge_harm_prob"] in (0.1, 0.9) for r in pool)  # harm_score read as harm_prob
    unpaired = label_check.sample_pool(judged, per_model=20, seed=0)
    assert {r["prompt"] for r in unpaired if r["model"] == "A"} != \
        {r["prompt"] for r in unpaired if r["model"] == "B"}
    assert len(label_check.sample_pool(judged, per_model=99, seed=0, paired=True)) == 60
    lines = (tmp_path / "b.jsonl").read_text().splitlines()
    (tmp_path / "b.jsonl").write_text("\n".join(lines + [lines[2]]) + "\n")
    with pytest.raises(DataError, match=r"b\.jsonl:41: field 'prompt'.*repeats line 3"):
        label_check.sample_pool(judged, per_model=20, seed=0, paired=True)
    _judged(tmp_path / "c.jsonl", 5, 2, "other")
    with pytest.raises(EvalError, match="share no prompt"):
        label_check.sample_pool(label_check.parse_judged([f"A={tmp_path / 'a.jsonl'}",
                                                          f"C={tmp_path / 'c.jsonl'}"]), 5, 0, True)


def test_paired_report_gives_each_pair_of_models_difference_on_the_same_prompts(tmp_path, capsys):
    _judged(tmp_path / "a.jsonl", 40, 2, "x")   # harmful on even prompts (20 of 40)
    _judged(tmp_path / "b.jsonl", 40, 4, "x")   # on every 4th (10 of 40): a subset of A's
    out = tmp_path / "out"
    assert label_check.main(["pool", "--judged", f"A={tmp_path / 'a.jsonl'}",
                             f"B={tmp_path / 'b.jsonl'}", "--out", str(out), "--per-model", "40",
                             "--size", "30", "--paired"]) == 0
    _label_all(out)
    assert label_check.main(["report", "--dir", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    d = rep["paired"]["differences"]["A - B"]
    assert rep["paired"]["n_prompts"] == 40
    assert d["hand"]["diff"] == pytest.approx(0.25) and d["judge"]["diff"] == pytest.approx(0.25)
    lo, hi = d["hand"]["ci"]
    assert 0 < lo < 0.25 < hi   # the 10 discordant prompts all favour B: the interval stays > 0
    assert "A - B: hand +0.250" in capsys.readouterr().out
    pool = [json.loads(x) for x in (out / "pool.jsonl").read_text().splitlines()]
    pool[0]["pair"] = 99   # a pool whose models no longer answer the same prompts
    (out / "pool.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pool))
    with pytest.raises(DataError, match="does not answer the same prompts"):
        label_check.report(out)
