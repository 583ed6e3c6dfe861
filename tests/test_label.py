"""The blind labelling tool (semloss_jax.eval.label) and Cohen's kappa (semloss_jax.eval.agreement)."""
from __future__ import annotations

import io
import json
import math
from collections import Counter
from pathlib import Path

import pytest

from semloss_jax import paths
from semloss_jax.data.splits import hash_split
from semloss_jax.errors import DataError, EvalError, cli_main
from semloss_jax.eval import label as lab
from semloss_jax.eval.agreement import cohen_kappa, confusion, kappa_from_confusion

MODELS = ("MODELNAME_QX7A", "MODELNAME_ZK2B", "MODELNAME_PW9C")
# every provenance value is a unique string that must never reach a labeller's screen or batch
SECRETS = (*MODELS, "HASHVAL_", "SRCNAME_", "PROMPTID_", "DECODEMODE_", "SPLITNAME_", "PARTNAME_")


@pytest.fixture(autouse=True)
def _no_labeller_env(monkeypatch):
    monkeypatch.delenv("SEMLOSS_LABELLER", raising=False)


def make_pool(tmp_path: Path, per_model: int = 20) -> Path:
    rows = []
    kinds = ("harmful", "harmful", "benign", "overrefusal")
    for m, model in enumerate(MODELS):
        for i in range(per_model):
            rows.append({"uid": f"u{m}{i:03d}x", "prompt": f"prompt {m}-{i}?", "response": f"reply {m}-{i}.",
                         "kind": kinds[i % 4], "split": f"SPLITNAME_{m}", "prompt_source": f"SRCNAME_{m}",
                         "prompt_id": f"PROMPTID_{m}_{i}", "model": model, "model_hash": f"HASHVAL_{m}",
                         "decoding": {"mode": f"DECODEMODE_{i % 2}"}, "part": f"PARTNAME_{m}"})
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return pool


def run_cli(argv, capsys) -> tuple[int, str, str]:
    rc = cli_main("label", lab.main, argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.fixture
def batches(tmp_path, capsys):
    pool = make_pool(tmp_path)
    rc, _, _ = run_cli(["batches", "--pool", str(pool), "--out", str(tmp_path / "b"), "--size", "25",
                        "--seed", "3"], capsys)
    assert rc == 0
    return pool, tmp_path / "b"


def batch_files(d: Path) -> list[Path]:
    return sorted(p for p in d.glob("batch_*.jsonl") if not p.name.endswith(lab.LABELS_SUFFIX))


def assert_blind(text: str) -> None:
    for s in SECRETS:
        assert s not in text, f"{s!r} leaked"


# --- batches ---------------------------------------------------------------------------------

def test_batches_cover_the_pool_once_plus_a_relabel_subset(batches):
    pool, d = batches
    pool_uids = [r["uid"] for r in lab.read_pool(pool)]
    seen = [r["uid"] for f in batch_files(d) for r in lab.read_batch(f)]
    assert sorted(seen) == sorted(pool_uids) and len(seen) == len(set(seen))
    sizes = [len(lab.read_batch(f)) for f in batch_files(d)]
    assert len(sizes) == 3 and max(sizes) <= 25 and max(sizes) - min(sizes) <= 1  # 60 rows -> 20/20/20
    relabel = [r["uid"] for r in lab.read_batch(d / "relabel.jsonl")]
    assert len(relabel) == round(0.15 * 60) == len(set(relabel)) and set(relabel) <= set(pool_uids)
    first_order = [u for u in seen if u in set(relabel)]
    assert relabel != first_order  # another order than the first labelling
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["pool_sha256"] == lab.file_sha256(pool)
    assert manifest["batches"] == {"batch_01": 20, "batch_02": 20, "batch_03": 20, "relabel": 9}


def test_batches_interleave_models_and_are_seeded(tmp_path):
    pool = lab.read_pool(make_pool(tmp_path, per_model=40))
    by_uid = {r["uid"]: r["model"] for r in pool}
    batches, relabel = lab.make_batches(pool, size=30, seed=0)
    for b in batches:  # 4 batches of 30 from 3 x 40 rows: about 10 of each model in each
        counts = Counter(by_uid[r["uid"]] for r in b)
        assert all(abs(counts[m] - 10) <= 2 for m in MODELS), counts
    again, relabel2 = lab.make_batches(pool, size=30, seed=0)
    other, _ = lab.make_batches(pool, size=30, seed=1)
    assert again == batches and relabel2 == relabel and other != batches


def test_batch_rows_and_files_carry_nothing_but_the_visible_fields(batches):
    _, d = batches
    for f in [*batch_files(d), d / "relabel.jsonl", d / "manifest.json"]:
        assert_blind(f.read_text())
    for f in batch_files(d):
        for r in lab.read_batch(f):
            assert tuple(r) == lab.BATCH_FIELDS
            assert r["request"] in ("harmful-looking", "benign")
            assert r["rate_helpfulness"] == (r["request"] == "benign")


def test_batches_never_overwrite_labels(batches, capsys):
    pool, d = batches
    f = batch_files(d)[0]
    row = lab.read_batch(f)[0]
    lab.set_labels(f, [f"{row['uid']}=safe" + (":helpful" if row["rate_helpfulness"] else "")], "t")
    rc, _, err = run_cli(["batches", "--pool", str(pool), "--out", str(d), "--force"], capsys)
    assert rc == 2 and "holds labels" in err and err.count("\n") == 1
    rc, _, err = run_cli(["batches", "--pool", str(pool), "--out", str(d.parent / "c")], capsys)
    rc2, _, err2 = run_cli(["batches", "--pool", str(pool), "--out", str(d.parent / "c")], capsys)
    assert rc == 0 and rc2 == 2 and "--force" in err2


def test_a_batch_with_provenance_fields_is_refused(tmp_path):
    f = tmp_path / "batch_01.jsonl"
    f.write_text(json.dumps({"uid": "a", "prompt": "p", "response": "r", "request": "benign",
                             "rate_helpfulness": True, "model": "MODELNAME_QX7A"}) + "\n")
    with pytest.raises(DataError, match=r"batch_01.jsonl:1: field 'model'"):
        lab.read_batch(f)


@pytest.mark.parametrize("line, match", [
    ("not json", r"pool.jsonl:2: not valid JSON"),
    ('{"uid": "b", "prompt": "p", "response": "r"}', r"pool.jsonl:2: field 'kind': missing"),
    ('{"uid": "b", "prompt": "p", "response": "r", "kind": "evil"}', r"pool.jsonl:2: field 'kind'"),
    ('{"uid": "a", "prompt": "p", "response": "r", "kind": "benign"}', r"pool.jsonl:2: field 'uid'.*repeats"),
])
def test_bad_pool_lines_name_file_line_and_field(tmp_path, line, match):
    f = tmp_path / "pool.jsonl"
    f.write_text('{"uid": "a", "prompt": "p", "response": "r", "kind": "harmful"}\n' + line + "\n")
    with pytest.raises(DataError, match=match):
        lab.read_pool(f)


# --- show / set / status / interactive: blind, validated, atomic, resumable -----------------

def test_show_set_status_interactive_never_print_provenance(batches, capsys):
    _, d = batches
    f = batch_files(d)[0]
    rows = lab.read_batch(f)
    rc, out, _ = run_cli(["show", "--batch", str(f), "--n", "100", "--rubric"], capsys)
    assert rc == 0 and all(r["uid"] in out and r["response"] in out for r in rows)
    assert "harmful-looking request" in out and "benign request" in out and "LABELLING RUBRIC" in out
    outs = [out]
    a = [f"{r['uid']}=h" if not r["rate_helpfulness"] else f"{r['uid']}=s:2" for r in rows[:3]]
    outs.append(run_cli(["set", "--batch", str(f), "--labeller", "tester", *a], capsys)[1])
    outs.append(run_cli(["status", "--batch", str(f), str(d / "relabel.jsonl")], capsys)[1])
    buf = io.StringIO()
    lab.interactive(f, "tester", lab.line_keys(io.StringIO("?\ns\n1\nd\n3\nq\n")), buf)
    outs.append(buf.getvalue())
    for o in outs:
        assert_blind(o)
    assert "3/20 labelled" in outs[1]


def test_show_hides_labels_from_other_batches(batches, capsys):
    _, d = batches
    relabel = lab.read_batch(d / "relabel.jsonl")
    uid = relabel[0]["uid"]
    f = next(f for f in batch_files(d) if any(r["uid"] == uid for r in lab.read_batch(f)))
    row = next(r for r in lab.read_batch(f) if r["uid"] == uid)
    lab.set_labels(f, [f"{uid}=degenerate" + (":unhelpful" if row["rate_helpfulness"] else "")], "t")
    _, out, _ = run_cli(["show", "--batch", str(d / "relabel.jsonl"), "--n", "100"], capsys)
    assert uid in out and "degenerate" not in out  # the row is shown, its other label is not
    assert f"0/{len(relabel)} labelled" in run_cli(["status", "--batch", str(d / "relabel.jsonl")], capsys)[1]


def test_set_validates_and_writes_nothing_when_one_assignment_is_wrong(batches, capsys):
    _, d = batches
    f = batch_files(d)[0]
    rows = lab.read_batch(f)
    harm = next(r for r in rows if not r["rate_helpfulness"])
    ben = next(r for r in rows if r["rate_helpfulness"])
    cases = [([f"{harm['uid']}=refusal", "nosuchuid=safe"], "unknown uid 'nosuchuid'"),
             ([f"{harm['uid']}=maybe"], "unknown label 'maybe'"),
             ([f"{ben['uid']}=safe"], "add its helpfulness"),
             ([f"{harm['uid']}=safe:helpful"], "give no helpfulness"),
             ([f"{ben['uid']}=safe:great"], "unknown helpfulness 'great'"),
             ([f"{harm['uid']}"], "expected UID=LABEL"),
             ([f"{harm['uid']}=h", f"{harm['uid']}=r"], "given twice")]
    for argv, msg in cases:
        rc, _, err = run_cli(["set", "--batch", str(f), "--labeller", "t", *argv], capsys)
        assert rc == 2 and msg in err and err.count("\n") == 1, (argv, err)
        assert not lab.labels_path(f).exists()
    rc, _, err = run_cli(["set", "--batch", str(f), f"{harm['uid']}=h"], capsys)
    assert rc == 2 and "--labeller" in err  # SEMLOSS_LABELLER is unset (fixture)
    assert lab.set_labels(f, [f"{harm['uid']}=h", f"{ben['uid']}=S:3"], "t") == (2, 0)
    got = lab.read_labels(lab.labels_path(f))
    assert got[harm["uid"]]["label"] == "harmful" and "helpfulness" not in got[harm["uid"]]
    assert (got[ben["uid"]]["label"], got[ben["uid"]]["helpfulness"]) == ("safe", "unhelpful")
    assert {r["batch"] for r in got.values()} == {f.name[:-6]}
    assert {r["labeller"] for r in got.values()} == {"t"}
    assert lab.set_labels(f, [f"{harm['uid']}=refusal"], "t") == (1, 1)  # a correction replaces
    assert lab.read_labels(lab.labels_path(f))[harm["uid"]]["label"] == "refusal"


def test_labels_file_is_rewritten_atomically(batches, monkeypatch):
    _, d = batches
    f = batch_files(d)[0]
    rows = [r for r in lab.read_batch(f) if not r["rate_helpfulness"]]
    lab.set_labels(f, [f"{rows[0]['uid']}=safe"], "t")
    before = lab.labels_path(f).read_bytes()

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(paths.os, "replace", boom)
    with pytest.raises(OSError):
        lab.set_labels(f, [f"{rows[1]['uid']}=harmful"], "t")
    assert lab.labels_path(f).read_bytes() == before  # the old file is whole, never half-written


def test_interactive_saves_every_answer_at_once_and_resumes(batches):
    _, d = batches
    f = batch_files(d)[0]
    rows = lab.read_batch(f)
    lp = lab.labels_path(f)

    def keys_checking_file():
        # before each answer, the file holds exactly the rows answered so far
        answered = 0
        for r in rows[:4]:
            assert len(lab.read_labels(lp)) == answered
            yield "x"  # an unknown key is asked again
            yield "s"
            if r["rate_helpfulness"]:
                yield "2"
            answered += 1
        assert len(lab.read_labels(lp)) == 4
        yield "q"

    out = io.StringIO()
    assert lab.interactive(f, "t", keys_checking_file(), out) == 4
    assert "unknown key 'x'" in out.getvalue()
    # resuming shows the fifth row first, and a quit in the helpfulness question records nothing
    out2 = io.StringIO()
    keys = ["d", "3"] if rows[4]["rate_helpfulness"] else ["d"]
    n = lab.interactive(f, "t", lab.line_keys(io.StringIO("\n".join([*keys, "h", "q"]) + "\n")), out2)
    text = out2.getvalue()
    assert text.index(rows[4]["uid"]) < text.index(rows[5]["uid"])
    assert rows[0]["uid"] not in text
    got = lab.read_labels(lp)
    assert got[rows[4]["uid"]]["label"] == "degenerate"
    assert n == (2 if not rows[5]["rate_helpfulness"] else 1) and len(got) == 4 + n
    show_out = lab.show_text(f, 100, False)
    assert all(r["uid"] not in show_out for r in rows[:5])
    assert f"{len(rows) - len(got)} of {len(rows)} rows unlabelled" in show_out


# --- merge and agreement -----------------------------------------------------------------------

def label_all(f: Path, choose) -> None:
    rows = lab.read_batch(f)
    lab.set_labels(f, [f"{r['uid']}={choose(r)}" + (":helpful" if r["rate_helpfulness"] else "")
                       for r in rows], "t")


def test_merge_and_perfect_self_agreement(batches, tmp_path, capsys):
    pool, d = batches
    def choose(r):
        return "safe" if r["rate_helpfulness"] else ("harmful" if int(r["uid"][2:5]) % 3 else "refusal")

    for f in [*batch_files(d), d / "relabel.jsonl"]:
        label_all(f, choose)
    out = tmp_path / "labelled.jsonl"
    rc, text, _ = run_cli(["merge", "--pool", str(pool), "--labels", str(d), "--out", str(out)], capsys)
    assert rc == 0
    merged = [json.loads(x) for x in out.read_text().splitlines()]
    relab = [json.loads(x) for x in (tmp_path / "labelled.relabel.jsonl").read_text().splitlines()]
    assert len(merged) == 60 and len(relab) == 9
    assert all(r["model"] in MODELS and r["label"] in lab.CLASSES and r["batch"] != "relabel" for r in merged)
    assert all((r["helpfulness"] is not None) == (r["kind"] != "harmful") for r in merged)
    rc, text, _ = run_cli(["agreement", "--labels", str(d), "--out", str(tmp_path / "agr.json")], capsys)
    rep = json.loads((tmp_path / "agr.json").read_text())
    assert rep["pairs"] == 9 and rep["four_class"]["kappa"] == pytest.approx(1.0)
    assert "Cohen's kappa 1.000" in text


def test_merge_rejects_a_uid_labelled_in_two_batches_or_missing_from_the_pool(tmp_path):
    d = tmp_path / "labels"
    d.mkdir()
    row = {"uid": "a", "label": "safe", "labeller": "t", "time": "x"}
    (d / "batch_01.labels.jsonl").write_text(json.dumps({**row, "batch": "batch_01"}) + "\n")
    (d / "batch_02.labels.jsonl").write_text(json.dumps({**row, "batch": "batch_02"}) + "\n")
    with pytest.raises(DataError, match="also labelled in batch 'batch_01'"):
        lab.read_label_dir(d)
    (d / "batch_02.labels.jsonl").unlink()
    first, relabel = lab.read_label_dir(d)
    with pytest.raises(EvalError, match="uid 'a' is not in the pool"):
        lab.merge([{"uid": "b", "prompt": "p", "response": "r", "kind": "harmful"}], first, relabel)


def test_agreement_on_a_hand_made_case():
    # first: h h r r s s d d ; relabel: h r r r s d d d (uids u0..u7)
    a = ["harmful", "harmful", "refusal", "refusal", "safe", "safe", "degenerate", "degenerate"]
    b = ["harmful", "refusal", "refusal", "refusal", "safe", "degenerate", "degenerate", "degenerate"]
    first = {f"u{i}": {"uid": f"u{i}", "label": x, "batch": "batch_01"} for i, x in enumerate(a)}
    relabel = {f"u{i}": {"uid": f"u{i}", "label": x, "batch": "relabel"} for i, x in enumerate(b)}
    rep = lab.agreement(first, relabel)
    # 4 classes: p_o = 6/8; p_e = sum(2/8 * col/8) = (1+3+1+3)/32 = 1/4; kappa = (3/4-1/4)/(3/4) = 2/3
    assert rep["four_class"]["kappa"] == pytest.approx(2 / 3)
    assert rep["four_class"]["confusion"] == [[1, 1, 0, 0], [0, 2, 0, 0], [0, 0, 1, 1], [0, 0, 0, 2]]
    # harmful yes/no: [[1, 1], [0, 6]]; p_o = 7/8; p_e = 2/8*1/8 + 6/8*7/8 = 44/64;
    # kappa = (56-44)/(64-44) = 0.6
    assert rep["harmful_yes_no"]["kappa"] == pytest.approx(0.6)
    assert rep["helpfulness"]["n"] == 0 and math.isnan(rep["helpfulness"]["kappa"])
    assert "4 classes: n=8, agree 6 (75.0%), Cohen's kappa 0.667" in lab.agreement_text(rep)


# --- Cohen's kappa ---------------------------------------------------------------------------------

def test_kappa_perfect_chance_and_hand_computed():
    cls = ("yes", "no")
    assert cohen_kappa(["yes", "no", "no", "yes"], ["yes", "no", "no", "yes"], cls) == 1.0
    # [[4, 1], [2, 3]]: p_o = 0.7, p_e = 0.5*0.6 + 0.5*0.4 = 0.5, kappa = 0.2 / 0.5 = 0.4
    a = ["yes"] * 5 + ["no"] * 5
    b = ["yes"] * 4 + ["no"] + ["yes"] * 2 + ["no"] * 3
    assert confusion(a, b, cls).tolist() == [[4, 1], [2, 3]]
    assert cohen_kappa(a, b, cls) == pytest.approx(0.4)
    assert kappa_from_confusion([[5, 5], [5, 5]]) == pytest.approx(0.0)  # chance level
    assert kappa_from_confusion([[0, 5], [5, 0]]) == pytest.approx(-1.0)  # total disagreement
    assert math.isnan(kappa_from_confusion([[7, 0], [0, 0]]))  # one class only: undefined
    with pytest.raises(EvalError, match="'maybe' is not one of"):
        confusion(["maybe"], ["yes"], cls)


def test_kappa_matches_sklearn_on_random_labels():
    import numpy as np
    from sklearn.metrics import cohen_kappa_score  # reference implementation

    rng = np.random.default_rng(0)
    for _ in range(20):
        a = list(rng.choice(lab.CLASSES, size=50))
        b = [x if rng.uniform() < 0.6 else str(rng.choice(lab.CLASSES)) for x in a]
        assert cohen_kappa(a, b, lab.CLASSES) == pytest.approx(cohen_kappa_score(a, b))


# --- the shipped pool and its batches ------------------------------------------------------------

def test_shipped_pool_and_batches_are_consistent_and_blind():
    pool_path = lab.JUDGE_DATA / "own_outputs_pool.jsonl"
    d = lab.JUDGE_DATA / "batches"
    pool = lab.read_pool(pool_path)
    assert len(pool) >= 800
    models = Counter(r["model"] for r in pool)
    assert len(models) >= 7 and min(models.values()) >= 100
    assert len({(r["prompt"], r["response"]) for r in pool}) == len(pool)  # no exact duplicates
    for r in pool:
        assert r["model_hash"] and r["prompt_source"] and r["prompt_id"] and r["decoding"]["mode"]
        assert r["split"] in ("train", "test", "eval")
        assert (r["split"] == "eval") == (r["kind"] == "overrefusal")
        if r["split"] != "eval":
            assert hash_split(r["prompt"]) == r["split"]  # never a val prompt
    by_prompt = {}
    for r in pool:  # every prompt is answered by one model only
        assert by_prompt.setdefault(r["prompt"], r["model"]) == r["model"]
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["pool_sha256"] == lab.file_sha256(pool_path)
    seen = [r["uid"] for f in batch_files(d) for r in lab.read_batch(f)]
    assert sorted(seen) == sorted(r["uid"] for r in pool)
    relabel = [r["uid"] for r in lab.read_batch(d / "relabel.jsonl")]
    assert len(relabel) == round(0.15 * len(pool)) and set(relabel) <= set(seen)
    secrets = {r["model_hash"][:16] for r in pool} | {m for m in models if "_" in m}
    for f in [*batch_files(d), d / "relabel.jsonl", d / "manifest.json"]:
        text = f.read_text()
        assert not any(s in text for s in secrets), f
    first, relabels = lab.read_label_dir(d) if any(d.glob("*" + lab.LABELS_SUFFIX)) else ({}, {})
    lab.merge(pool, first, relabels)  # labels so far are valid and name pool uids
