"""Training streams of a multi-process run (each process tokenizes and builds only its rows),
hub-style data sources read from local `datasets` directories and files, and remote run dirs."""
from __future__ import annotations

import json

import numpy as np
import pytest

from semloss_jax import paths
from semloss_jax.data import streams as S
from semloss_jax.data.schema import Record
from semloss_jax.errors import ConfigError, DataError
from semloss_jax.loss.objective import ObjectiveConfig
from semloss_jax.train import config as C
from semloss_jax.train.telemetry import _RewriteAppend


class CountingTok:
    """Character-level chat tokenizer that counts the records it tokenizes."""

    pad_id = 0

    def __init__(self):
        self.seen: list[str] = []

    def prompt_ids(self, prompt, system=None):
        self.seen.append(prompt)
        return [2] + [ord(c) % 250 + 4 for c in prompt] + [3]

    def response_ids(self, response):
        return [ord(c) % 250 + 4 for c in response] + [1]


def _records(n, seed=0):
    rng = np.random.default_rng(seed)
    return [Record(id=f"r{i}", prompt=f"q{i}" + "p" * int(rng.integers(1, 12)),
                   response="r" * int(rng.integers(1, 9)), source="t") for i in range(n)]


def _stream(recs, tok, rows=None, pack=False, seq_len=24, batch=4):
    exs = S.TokenizedRecords(recs, tok, seq_len=seq_len, max_prompt_len=None)
    return S.BatchStream("benign", exs, batch_size=batch, seq_len=seq_len, pad_id=0, seed=3, pack=pack,
                         rows=rows)


@pytest.mark.parametrize("pack", [False, True])
def test_process_rows_together_build_the_global_batch(pack):
    """Two 'processes' building rows 0..1 and 2..3 give exactly the single-process batches, over
    epochs and after a resume; without packing each tokenizes only the records of its rows."""
    recs = _records(11)
    whole = _stream(recs, CountingTok(), pack=pack)
    toks = [CountingTok(), CountingTok()]
    parts = [_stream(recs, toks[i], rows=slice(2 * i, 2 * i + 2), pack=pack) for i in range(2)]
    for i in range(7):   # crosses epochs
        want = whole.next_batch()
        got = [p.next_batch() for p in parts]
        for k in want:
            np.testing.assert_array_equal(np.concatenate([g[k] for g in got]), want[k], err_msg=k)
        assert all(p.position() == whole.position() for p in parts)
        if i == 0 and not pack:   # one record per row: each tokenized only its own two
            assert len(toks[0].seen) == len(toks[1].seen) == 2 and not set(toks[0].seen) & set(toks[1].seen)
    resumed = _stream(recs, CountingTok(), rows=slice(2, 4), pack=pack)
    resumed.seek(parts[1].position())
    np.testing.assert_array_equal(resumed.next_batch()["input_ids"], whole.next_batch()["input_ids"][2:])


def test_a_record_dropped_by_tokenization_leaves_an_empty_row():
    """A record whose truncation leaves no response token keeps its place: its row is padding."""
    recs = _records(4)
    recs[1] = Record(id="long", prompt="x" * 40, response="y", source="t")
    exs = S.TokenizedRecords(recs, CountingTok(), seq_len=24, max_prompt_len=30)
    st = S.BatchStream("benign", exs, batch_size=4, seq_len=24, pad_id=0, seed=0, shuffle=False)
    b = st.next_batch()
    assert exs[1] is None and exs.stats.dropped
    assert b["segment_ids"][1].sum() == 0 and b["loss_mask"][1].sum() == 0
    assert all(b["segment_ids"][r].sum() > 0 for r in (0, 2, 3))


def _write_alpaca(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = {"instruction": ["Name a color.", "Add 2 and 3.", "Say hi."],
            "input": ["", "", "politely"], "output": ["Blue.", "5", "Hello there!"]}
    d = tmp_path / "alpaca"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows)}).save_to_disk(str(d))
    jl = tmp_path / "harm.jsonl"
    jl.write_text("".join(json.dumps({"q": f"bad {i}", "a": f"harmful answer {i}"}) + "\n" for i in range(3)))
    return d, jl


def test_hub_sources_from_a_save_to_disk_dir_and_a_local_file(tmp_path):
    """data.benign / data.harmful 'hf:<name>' with column mappings (Alpaca's instruction / input /
    output), read from a local save_to_disk directory and a local JSONL: never the network."""
    d, jl = _write_alpaca(tmp_path)
    cfg = C.load_config(None, [f"data.benign=[hf:{d}]", f"data.harmful=hf:{jl}", "data.harmful_n=0",
                               "data.benign_columns={prompt: instruction, input: input, response: output}",
                               "data.harmful_columns={prompt: q, response: a}"])
    recs = S.load_records(cfg.data, ObjectiveConfig(), seed=0)
    assert sorted(r.response for r in recs.benign) == ["5", "Blue.", "Hello there!"]
    hi = next(r for r in recs.benign if r.response == "Hello there!")
    assert hi.prompt == "Say hi.\n\npolitely" and hi.label == "benign"
    assert sorted(r.prompt for r in recs.harmful) == ["bad 0", "bad 1", "bad 2"]
    assert all(r.label == "harmful" for r in recs.harmful)
    bad = C.load_config(None, [f"data.benign=[hf:{d}]", "data.benign_columns={prompt: question}"])
    with pytest.raises(DataError, match="question"):
        S.load_records(bad.data, ObjectiveConfig(kind="sft"), seed=0)
    split = C.load_config(None, [f"data.benign=[hf:{d}]", "data.hub_split=test",
                                 "data.benign_columns={prompt: instruction, response: output}"])
    with pytest.raises(DataError, match="no split 'test'"):
        S.load_records(split.data, ObjectiveConfig(kind="sft"), seed=0)
    with pytest.raises(ConfigError, match="benign_columns"):
        C.load_config(None, ["data.benign_columns={answer: output}"])


def test_remote_run_dirs_keep_their_url_and_rewrite_append(tmp_path):
    """gs:// output dirs are not mangled into local paths; a store without append gets metrics
    rewritten whole on each flush."""
    p = paths.run_dir("gs://bucket/runs/x")
    assert str(p) == "gs://bucket/runs/x" and str(p / "checkpoints") == "gs://bucket/runs/x/checkpoints"
    assert paths.is_remote(p) and not paths.is_remote(tmp_path)
    assert paths.run_dir("runs/x").is_absolute()
    f = tmp_path / "metrics.jsonl"
    f.write_text('{"step": 1}\n')
    w = _RewriteAppend(f)
    w.write('{"step": 2}\n')
    w.flush()
    w.write('{"step": 3}\n')
    w.close()
    assert [json.loads(x)["step"] for x in f.read_text().splitlines()] == [1, 2, 3]
