"""The record schema, the file readers (through `datasets`) and the registry sources."""
from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from semloss_jax.data import registry, sources
from semloss_jax.data.readers import read_jsonl, read_records, write_jsonl
from semloss_jax.data.schema import LABELS, FieldMap, Record
from semloss_jax.data.splits import normalize
from semloss_jax.errors import ConfigError, DataError

# Sizes stated in ../shared/data/README.md (what each registry file holds).
README_COUNTS = {"advbench": 520, "harmbench": 200, "strongreject": 313, "donotanswer": 939,
                 "rho_overrefusal": 150, "rho_refusal_pairs": 300, "pyrit_many_shot": 400,
                 "alpaca_eval": 805, "ifbench": 294, "safeinstr": 2483, "i_alpaca": 50}
PAIRED = {"rho_refusal_pairs", "pyrit_many_shot", "pyrit_harm", "pyrit_objective",
          "pyrit_refusal", "alpaca_eval", "ifbench", "safeinstr"}


@pytest.fixture(scope="module", autouse=True)
def built():
    registry.build_all(verbose=False)


@pytest.mark.parametrize("name", list(sources.SOURCES))
def test_each_source_loads_real_records(name):
    recs = registry.load_source(name)
    assert len(recs) > 0
    if name in README_COUNTS:
        assert len(recs) == README_COUNTS[name]
    assert len({r.id for r in recs}) == len(recs), "ids must be unique within a source"
    for r in recs:
        assert r.source == name and r.label in LABELS and r.prompt.strip()
        assert r.split in ("train", "val", "test", "eval")
        if name in PAIRED:
            assert r.response.strip(), r.id
    if sources.SOURCES[name].role == "eval":
        assert {r.split for r in recs} == {"eval"}


def test_source_labels_follow_the_files():
    many = registry.load_source("pyrit_many_shot")
    n_harm = sum(r.label == "harmful" for r in many)
    assert 250 < n_harm < 320  # README: "about 283 labelled harmful"
    assert {r.label for r in many} == {"harmful", "not_harmful"}
    harm = registry.load_source("pyrit_harm")
    assert all(0.0 <= r.score <= 1.0 for r in harm)
    assert all((r.label == "harmful") == (r.score >= 0.5) for r in harm)
    assert {r.label for r in registry.load_source("pyrit_refusal")} == {"refusal", "not_refusal"}
    pairs = registry.load_source("rho_refusal_pairs")
    assert sum(r.label == "harmful" for r in pairs) == sum(r.label == "benign" for r in pairs) == 150
    assert all("\n\n" not in r.prompt for r in pairs)


@pytest.mark.parametrize("name", list(registry.SETS))
def test_each_named_set(name):
    spec = registry.SETS[name]
    for split in spec.splits:
        recs = registry.load_set(name, split)
        assert len(recs) > 0, (name, split)
        assert {r.split for r in recs} == {split}
        assert {r.label for r in recs} <= set(spec.labels)
        keys = [normalize(r.prompt) if spec.dedup == "prompt"
                else (normalize(r.prompt), normalize(r.response)) for r in recs]
        assert len(set(keys)) == len(keys), "sets are deduplicated"


def test_sets_that_need_responses_have_them():
    for name in ("harmful_responses", "benign", "refusals", "judge_harm", "judge_refusal"):
        for split in registry.SETS[name].splits:
            assert all(r.response.strip() for r in registry.load_set(name, split))


def test_load_set_source_filter_and_unknown_names():
    adv = registry.load_set("harmful_prompts", "test", sources=["advbench"])
    assert adv and {r.source for r in adv} == {"advbench"}
    with pytest.raises(DataError, match="unknown set 'nope'"):
        registry.load_set("nope")
    with pytest.raises(DataError, match="unknown source 'nope'"):
        registry.load_source("nope")
    with pytest.raises(DataError, match="has no source 'safeinstr'"):
        registry.load_set("harmful_prompts", "train", sources=["safeinstr"])
    with pytest.raises(DataError, match="splits"):
        registry.load_set("overrefusal", "train")


def test_safeinstr_clear_error_when_shared_path_absent(tmp_path, monkeypatch):
    monkeypatch.setenv("SEMLOSS_SHARED", str(tmp_path))
    with pytest.raises(DataError, match="safety_only_data_Instructions.json.*SEMLOSS_SHARED"):
        registry.load_source("safeinstr")
    with pytest.raises(DataError, match="I-Alpaca.json"):
        registry.load_source("i_alpaca")


def test_build_rerun_is_a_noop():
    d = registry.data_dir()
    before = {p.name: p.stat().st_mtime_ns for p in d.iterdir()}
    t0 = time.perf_counter()
    registry.build_all(verbose=False)
    assert time.perf_counter() - t0 < 5
    after = {p.name: p.stat().st_mtime_ns for p in d.iterdir()}
    assert before == after
    manifest = json.loads((d / "manifest.json").read_text())
    for name, entry in manifest["sources"].items():
        assert entry["count"] == len(registry.load_source(name))


# ---------------------------------------------------------------------------------------------
# Readers on local files
# ---------------------------------------------------------------------------------------------

ROWS = [{"q": "What is 2+2?", "a": "4", "cat": "math"},
        {"q": "Name a colour.", "a": "Blue", "cat": "misc"},
        {"q": "Say hi.", "a": "Hi!", "cat": "misc"}]


def _write(path: Path, fmt: str, rows: list[dict]) -> Path:
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "csv":
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    elif fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet"])
def test_read_records_each_format(tmp_path, fmt):
    path = _write(tmp_path / f"d.{fmt}", fmt, ROWS)
    recs, summary = read_records(path, source="mine",
                                 fields=FieldMap(prompt="q", response="a", category="cat"),
                                 require_response=True)
    assert [(r.prompt, r.response, r.category) for r in recs] == [
        (r["q"], r["a"], r["cat"]) for r in ROWS]
    assert [r.id for r in recs] == ["mine:0", "mine:1", "mine:2"]
    assert summary.kept == 3 and summary.total_skipped == 0


def test_csv_numbers_stay_text_and_comment_header_skipped(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text("# version=1, comment line\nprompt,response\n1234,NA\n\"multi\nline\",ok\n")
    import datasets
    datasets.enable_progress_bars()
    recs, _ = read_records(p, source="x")
    assert [(r.prompt, r.response) for r in recs] == [("1234", "NA"), ("multi\nline", "ok")]
    assert not datasets.are_progress_bars_disabled()      # the caller's setting is left alone


def test_messages_format(tmp_path):
    rows = [{"messages": [{"role": "system", "content": "be nice"},
                          {"role": "user", "content": "hello"},
                          {"role": "assistant", "content": "hi"}]}]
    p = _write(tmp_path / "m.jsonl", "jsonl", rows)
    (r,), _ = read_records(p, source="chat", fields=FieldMap(messages="messages"))
    assert (r.prompt, r.response) == ("hello", "hi")


# --- bad input: errors name the file, the line and the field -------------------------------

def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"prompt": "a", "response": "b"}\n\n{"prompt": "c", "response": \n'
                 '{"prompt": "d", "response": "e"}\n')
    with pytest.raises(DataError) as e:
        read_records(p, source="s")
    assert e.value.file == str(p) and e.value.line == "3"
    assert f"{p}:3:" in str(e.value) and "malformed" in str(e.value)


def test_missing_field_names_line_and_field(tmp_path):
    p = tmp_path / "miss.jsonl"
    p.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": "d"}\n'
                 '{"response": "e", "prompt": null}\n')
    with pytest.raises(DataError) as e:
        read_records(p, source="s")
    assert (e.value.line, e.value.field) == ("3", "prompt")
    q = tmp_path / "nocol.jsonl"
    q.write_text('{"question": "a", "response": "b"}\n')
    with pytest.raises(DataError, match=r"field 'prompt': missing field") as e:
        read_records(q, source="s")
    assert str(q) in str(e.value)


def test_empty_response_error_names_line_and_field(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text('prompt,response\n"ok","fine"\n"two\nlines","fine"\n"q","   "\n')
    recs, _ = read_records(p, source="s")
    assert len(recs) == 3  # an empty response is allowed unless required
    with pytest.raises(DataError) as e:
        read_records(p, source="s", require_response=True)
    # the third data row starts on physical line 5 (row 2 spans lines 3-4)
    assert (e.value.line, e.value.field) == ("5", "response")
    assert "empty response" in str(e.value)


def test_unknown_role_and_unknown_label(tmp_path):
    p = _write(tmp_path / "r.jsonl", "jsonl", [
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
        {"messages": [{"role": "human", "content": "a"}, {"role": "assistant", "content": "b"}]},
    ])
    with pytest.raises(DataError, match=r":2: field 'messages\[0\]\.role': unknown role 'human'"):
        read_records(p, source="s", fields=FieldMap(messages="messages"))
    q = _write(tmp_path / "l.jsonl", "jsonl", [{"prompt": "a", "response": "b", "y": "evil"}])
    with pytest.raises(DataError, match=r":1: field 'y': unknown label 'evil'"):
        read_records(q, source="s", fields=FieldMap(label="y"))
    with pytest.raises(ConfigError, match="key 'prompt': a FieldMap needs a prompt column"):
        FieldMap(prompt=None)                             # neither prompt= nor messages=
    with pytest.raises(ConfigError, match="key 'on_error'"):
        read_records(q, source="s", on_error="ignore")


def test_a_corrupt_mu_file_is_one_data_error(tmp_path):
    from semloss_jax.data import readers
    out = tmp_path / "h.jsonl"
    write_jsonl(out, [Record(id="a", prompt="p", response="r", source="harvest", label="harmful",
                             split="train")])
    readers.save_response_mu(out, [np.zeros((2, 3), np.float32)])
    assert readers.load_response_mu(out)[0].shape == (2, 3)
    (tmp_path / "h.jsonl.mu.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(DataError, match=r"h\.jsonl\.mu\.npy: unreadable"):
        readers.load_response_mu(out)


def test_skip_mode_counts_every_bad_row(tmp_path):
    p = tmp_path / "mixed.jsonl"
    p.write_text("\n".join([
        '{"prompt": "a", "response": "b"}',
        'not json',
        '{"prompt": "", "response": "b"}',
        '{"prompt": "c", "response": ""}',
        '{"prompt": "d", "response": "e"}',
        '[1, 2]',
        '{"prompt": "f"}',
    ]) + "\n")
    recs, s = read_records(p, source="s", require_response=True, on_error="skip")
    assert [r.prompt for r in recs] == ["a", "d"]
    assert s.kept == 2 and s.total_skipped == 5
    assert s.skipped["malformed line"] == 2
    assert s.skipped["empty response"] == 1  # "c"
    assert s.skipped["missing field"] == 1   # "f" has no response key
    assert s.skipped["empty value"] == 1     # "" prompt
    assert s.kept + s.total_skipped == 7
    assert any(":2:" in x for x in s.examples) and any(":3:" in x for x in s.examples)
    assert "kept 2, skipped 5" in str(s)


def test_schema_jsonl_roundtrip_and_validation(tmp_path):
    recs = [Record(id="a:1", prompt="p", response="r", source="a", split="train",
                   label="harmful", score=0.75, category="c")]
    p = tmp_path / "s.jsonl"
    assert write_jsonl(p, recs) == 1
    assert read_jsonl(p)[0] == recs
    assert not any(f.name.startswith(".") for f in tmp_path.iterdir())  # atomic: no temp left
    p.write_text(p.read_text() + '{"id": "x", "prompt": "p", "response": "", "source": "a", '
                 '"split": "train"}\n')
    with pytest.raises(DataError, match=r"s\.jsonl:2: field 'label': missing field"):
        read_jsonl(p)
    ok, s = read_jsonl(p, on_error="skip")
    assert len(ok) == 1 and s.skipped["missing field"] == 1


def test_record_validates_itself():
    with pytest.raises(DataError, match="unknown label"):
        Record(id="x", prompt="p", response="", source="s", label="toxic")
    with pytest.raises(DataError, match="empty prompt"):
        Record(id="x", prompt="  ", response="", source="s")
    with pytest.raises(DataError, match="unknown split"):
        Record(id="x", prompt="p", response="", source="s", split="dev")


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        read_records(tmp_path / "none.jsonl", source="s")
    assert not os.path.exists(tmp_path / "none.jsonl")


def test_jsonl_key_absent_on_one_line_is_a_missing_field(tmp_path):
    p = tmp_path / "k.jsonl"
    p.write_text('{"prompt": "a", "response": "b"}\n{"response": "c"}\n')
    with pytest.raises(DataError, match=r"k\.jsonl:2: field 'prompt': missing field"):
        read_records(p, source="s")


def test_jsonl_type_conflict_names_line_and_field(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": "d"}\n'
                 '{"prompt": {"nested": 1}, "response": "e"}\n')
    with pytest.raises(DataError) as e:
        read_records(p, source="s")
    assert (e.value.line, e.value.field) == ("3", "prompt")


def test_csv_row_with_wrong_field_count(tmp_path):
    p = tmp_path / "w.csv"
    p.write_text('prompt,response\na,b\n"c\nd",e,extra\nf,g\n')
    with pytest.raises(DataError, match=r"w\.csv:3: malformed CSV row: 3 fields"):
        read_records(p, source="s")
    recs, s = read_records(p, source="s", on_error="skip")
    assert [r.prompt for r in recs] == ["a", "f"]
    assert s.skipped == {"malformed line": 1} and s.kept == 2
    p.write_text('prompt,response\na,b\n"c\nd",e,extra\nf,\n')
    recs, s = read_records(p, source="s", require_response=True, on_error="skip")
    assert [r.prompt for r in recs] == ["a"]
    assert s.skipped == {"malformed line": 1, "empty response": 1}
    # physical line numbers survive the skipped multi-line row: "f," is on line 5
    assert any(x.startswith(f"{p}:5: field 'response'") for x in s.examples)


def test_plain_jsonl_rows_name_file_and_line(tmp_path):
    """paths.read_jsonl_rows (any JSON objects, the study's and labelling files): blank lines are
    skipped but counted, and a bad line, a non-object or a missing file is a DataError naming
    the file and the physical line."""
    from semloss_jax.paths import read_jsonl_objects, read_jsonl_rows
    p = tmp_path / "rows.jsonl"
    p.write_text('{"a": 1}\n\n  \n{"a": 2}\n')
    assert read_jsonl_rows(p) == [(1, {"a": 1}), (4, {"a": 2})]
    assert read_jsonl_objects(p) == [{"a": 1}, {"a": 2}]
    p.write_text('{"a": 1}\n\n{"a": \n')
    with pytest.raises(DataError, match=rf"^{p}:3: not valid JSON"):
        read_jsonl_objects(p)
    p.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(DataError, match=rf"^{p}:2: expected a JSON object"):
        read_jsonl_rows(p)
    with pytest.raises(DataError, match="missing.jsonl: no such file"):
        read_jsonl_rows(tmp_path / "missing.jsonl")
