"""Tokenization for training: loss mask on the real tokenizer, truncation, buckets, packing."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semloss_jax.data import batching
from semloss_jax.data.batching import (
    attention_mask,
    make_batches,
    pack_batches,
    tokenize_records,
    truncate,
)
from semloss_jax.data.registry import load_set
from semloss_jax.data.schema import Record
from semloss_jax.models.llama import forward, init_params, tiny_config
from semloss_jax.models.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok(real_model_path):
    return load_tokenizer(real_model_path)


@pytest.fixture(scope="module")
def benign():
    return load_set("benign", "train")[:40]


def _check_batch(b, exs, T):
    for k in ("input_ids", "targets", "loss_mask", "positions", "segment_ids", "example_index"):
        assert b[k].shape == b["input_ids"].shape
        assert b[k].shape[1] == T
    assert b["input_ids"].dtype == np.int32 and b["loss_mask"].dtype == np.float32
    pad = b["segment_ids"] == 0
    assert (b["loss_mask"][pad] == 0).all()
    assert (b["example_index"][pad] == -1).all()


def _example_tokens(b, row, seg):
    sel = b["segment_ids"][row] == seg
    return (b["input_ids"][row][sel], b["targets"][row][sel], b["loss_mask"][row][sel],
            b["positions"][row][sel], int(b["example_index"][row][sel][0]))


@pytest.mark.real_model
def test_loss_mask_covers_exactly_the_response_on_the_real_tokenizer(tok, benign):
    exs, stats = tokenize_records(benign, tok, seq_len=4096)
    assert stats.kept == len(benign) and not stats.dropped
    by_id = {r.id: r for r in benign}
    seen = 0
    for b in make_batches(exs, batch_size=4, seq_len=4096, pad_id=tok.pad_id, seed=0):
        for row in range(b["input_ids"].shape[0]):
            if b["segment_ids"][row].max() == 0:
                continue
            inp, tgt, mask, pos, i = _example_tokens(b, row, 1)
            rec = by_id[exs[i].id]
            masked = tgt[mask > 0]
            # the masked targets decode to the response followed by the end-of-turn token
            assert tok.decode(masked, skip_special_tokens=False) == rec.response + tok.eot_text
            assert masked[-1] == tok.eos_id
            # nothing of the prompt: the unmasked targets plus the first input are the prompt
            full = list(inp) + [int(tgt[-1])]
            assert full == tok.prompt_ids(rec.prompt) + tok.response_ids(rec.response)
            unmasked = [int(inp[0])] + list(tgt[mask == 0])
            assert unmasked == tok.prompt_ids(rec.prompt)
            assert rec.prompt in tok.decode(unmasked, skip_special_tokens=False)
            assert (pos == np.arange(len(pos))).all()
            assert (tgt[:-1] == inp[1:]).all()  # targets are the next tokens
            seen += 1
    assert seen == len(exs)


@pytest.mark.real_model
def test_truncation_on_real_records(tok, benign):
    seq_len = 48
    exs, stats = tokenize_records(benign, tok, seq_len=seq_len, max_prompt_len=24)
    by_id = {r.id: r for r in benign}
    assert stats.kept + sum(stats.dropped.values()) == stats.records == len(benign)
    assert stats.response_truncated > 0
    for e in exs:
        rec = by_id[e.id]
        p0, r0 = tok.prompt_ids(rec.prompt), tok.response_ids(rec.response)
        assert e.n_slots <= seq_len
        assert list(e.prompt_ids) == p0[len(p0) - len(e.prompt_ids):]   # cut from the left
        assert list(e.response_ids) == r0[:len(e.response_ids)]        # cut from the right
        assert len(e.response_ids) >= 1
    # the assistant header survives left truncation
    header = tok.prompt_ids("x")[-3:]
    assert all(list(e.prompt_ids[-3:]) == header for e in exs)


def test_truncate_rules():
    p, r = list(range(100, 110)), list(range(200, 206))
    assert truncate(p, r, 15) == (p, r)                      # 16 tokens fit 15 slots
    tp, tr = truncate(p, r, 11, max_prompt_len=4)
    assert tp == p[-6:] and tr == r                           # short response: prompt keeps more
    tp, tr = truncate(p, list(range(200, 230)), 11, max_prompt_len=4)
    assert tp == p[-4:] and tr == list(range(200, 208))       # prompt capped, response cut right
    assert len(tp) + len(tr) == 12
    tp, tr = truncate(p, r, 9, max_prompt_len=10)
    assert tp == p and tr == []                               # no response token left


class _CharTok:
    """A transparent character-level chat tokenizer for shape/property tests (ids = bytes)."""
    pad_id, eos_id = 0, 1

    def prompt_ids(self, prompt, system=None):
        return [2] + [ord(c) for c in prompt] + [3]

    def response_ids(self, response):
        return [ord(c) for c in response] + [1]


def _recs(lengths, resp=3):
    return [Record(id=f"r{i}", prompt="p" * n, response="r" * resp, source="t")
            for i, n in enumerate(lengths)]


def test_records_without_response_tokens_are_dropped_and_counted():
    recs = _recs([5, 40, 6]) + [Record(id="e", prompt="q", response=" ", source="t")]
    exs, stats = tokenize_records(recs, _CharTok(), seq_len=20, max_prompt_len=30)
    assert [e.id for e in exs] == ["r0", "r2"]
    assert stats.dropped == {"no response token left after truncation": 1, "empty response": 1}
    assert stats.dropped_ids == ["r1", "e"]
    assert "dropped" in str(stats)


def test_length_buckets_fixed_shapes_and_every_example_once():
    rng = np.random.default_rng(0)
    recs = _recs(rng.integers(1, 200, size=37).tolist())
    exs, _ = tokenize_records(recs, _CharTok(), seq_len=256)
    batches = list(make_batches(exs, batch_size=4, seq_len=256, pad_id=0, buckets=(32, 64, 128),
                                seed=3))
    seen = []
    for b in batches:
        T = b["input_ids"].shape[1]
        assert b["input_ids"].shape[0] == 4 and T in (32, 64, 128, 256)
        _check_batch(b, exs, T)
        for row in range(4):
            if b["segment_ids"][row].max():
                i = int(b["example_index"][row][0])
                n = exs[i].n_slots
                assert batching.bucket_of(n, 256, (32, 64, 128)) == T
                assert b["loss_mask"][row].sum() == len(exs[i].response_ids)
                assert (b["input_ids"][row][n:] == 0).all()
                seen.append(i)
    assert sorted(seen) == list(range(len(exs)))
    again = list(make_batches(exs, batch_size=4, seq_len=256, pad_id=0, buckets=(32, 64, 128),
                              seed=3))
    assert all((x["input_ids"] == y["input_ids"]).all() for x, y in zip(batches, again))
    dl = list(make_batches(exs, batch_size=4, seq_len=256, pad_id=0, drop_last=True))
    assert all((b["segment_ids"].max(axis=1) > 0).all() for b in dl)


def test_packing_segments_positions_and_mask():
    rng = np.random.default_rng(1)
    recs = _recs(rng.integers(1, 60, size=30).tolist(), resp=5)
    exs, _ = tokenize_records(recs, _CharTok(), seq_len=128)
    batches = list(pack_batches(exs, batch_size=3, seq_len=128, pad_id=0, seed=0))
    seen = []
    for b in batches:
        _check_batch(b, exs, 128)
        m = attention_mask(b["segment_ids"])
        for row in range(3):
            seg = b["segment_ids"][row]
            for s in range(1, seg.max() + 1):
                inp, tgt, mask, pos, i = _example_tokens(b, row, s)
                e = exs[i]
                assert (pos == np.arange(e.n_slots)).all()        # positions restart at 0
                assert list(inp) + [tgt[-1]] == list(e.prompt_ids) + list(e.response_ids)
                assert mask.sum() == len(e.response_ids)
                seen.append(i)
            # implied attention: never across examples, never to pads, causal
            idx = np.arange(128)
            other = seg[:, None] != seg[None, :]
            assert not (m[row] & other).any()
            assert not m[row][:, seg == 0].any()
            assert not (m[row] & (idx[None, :] > idx[:, None])).any()
    assert sorted(seen) == list(range(len(exs)))
    assert len(batches) * 3 < len(exs)  # packing does put several examples in a row


def test_packing_isolation_matches_separate_forward():
    """A packed row through the model gives each example the logits it gets alone."""
    cfg = tiny_config(vocab_size=256)
    params = init_params(cfg, jax.random.PRNGKey(0))
    recs = _recs([7, 12, 4], resp=5)
    exs, _ = tokenize_records(recs, _CharTok(), seq_len=64)
    (b,) = list(pack_batches(exs, batch_size=1, seq_len=64, pad_id=0, seed=None))
    assert b["segment_ids"].max() == 3
    # one forward call: row 0 the packed row, rows 1-3 each example alone (right-padded)
    rows = [{k: b[k] for k in ("input_ids", "positions", "segment_ids")}]
    for s in (1, 2, 3):
        sel = b["segment_ids"][0] == s
        n = int(sel.sum())
        ids = np.zeros((1, 64), np.int32)
        ids[0, :n] = b["input_ids"][0, sel]
        seg = np.zeros((1, 64), np.int32)
        seg[0, :n] = 1
        pos = np.zeros((1, 64), np.int32)
        pos[0, :n] = np.arange(n)
        rows.append({"input_ids": ids, "positions": pos, "segment_ids": seg})
    cat = {k: jnp.asarray(np.concatenate([r[k] for r in rows])) for k in rows[0]}
    logits = np.asarray(forward(params, cfg, cat["input_ids"], positions=cat["positions"],
                                segment_ids=cat["segment_ids"]))
    for s in (1, 2, 3):
        sel = b["segment_ids"][0] == s
        np.testing.assert_allclose(logits[0, sel], logits[s, :int(sel.sum())],
                                   rtol=1e-4, atol=1e-4)


def test_soft_target_mu_is_aligned_with_response_targets():
    recs = _recs([3, 9], resp=4)
    tok = _CharTok()
    mus = [np.arange(len(tok.response_ids(r.response)) * 2, dtype=np.float32).reshape(-1, 2) + 10 * i
           for i, r in enumerate(recs)]
    exs, _ = tokenize_records(recs, tok, seq_len=32, response_mu=mus)
    for b in list(make_batches(exs, batch_size=2, seq_len=32, pad_id=0, seed=None)) + \
            list(pack_batches(exs, batch_size=1, seq_len=32, pad_id=0, seed=None)):
        assert b["target_mu"].shape == b["input_ids"].shape + (2,)
        on = b["loss_mask"] > 0
        assert (b["target_mu"][~on] == 0).all()
        for row, col in zip(*np.nonzero(on)):
            i = b["example_index"][row, col]
            e = exs[i]
            j = list(np.nonzero(b["example_index"][row] == i)[0]).index(col) - (len(e.prompt_ids) - 1)
            np.testing.assert_array_equal(b["target_mu"][row, col], mus[i][j])
    with pytest.raises(ValueError, match="response_mu"):
        tokenize_records(recs, tok, seq_len=32, response_mu=[mus[0][:1], mus[1]])
