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
