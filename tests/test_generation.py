"""Cached batched decoding equals uncached greedy decoding under both schedules (static
batches and refill); one compile per shape bucket."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semloss_jax.errors import ModelError
from semloss_jax.models import generation
from semloss_jax.models.generation import (
    _sample,
    admit,
    advance,
    bucket_length,
    decode,
    generate,
    generate_ids,
    left_pad,
    slot_groups,
)
from semloss_jax.models.llama import (
    forward,
    forward_with_cache,
    head_logits,
    init_cache,
    init_params,
    split_layers,
    tiny_config,
)

jforward = jax.jit(forward, static_argnums=1)


def greedy_without_cache(params, cfg, prompt, n, eos_ids):
    """Reference: recompute the whole sequence every step (no cache, no padding)."""
    seq = list(prompt)
    out = []
    for _ in range(n):
        logits = jforward(params, cfg, jnp.asarray([seq]))
        t = int(np.argmax(np.asarray(logits[0, -1])))
        if t in eos_ids:
            break
        out.append(t)
        seq.append(t)
    return out


def greedy_fixed_width(params, cfg, prompt, n, eos_ids, width, pad_id=0):
    """The same reference at one compiled shape: the sequence right-padded to `width` slots
    (padding masked out), the next token read at its last real slot."""
    seq, out = list(prompt), []
    for _ in range(n):
        ids = np.full((1, width), pad_id, np.int32)
        ids[0, :len(seq)] = seq
        seg = (np.arange(width) < len(seq)).astype(np.int32)[None]
        t = int(np.argmax(np.asarray(jforward(params, cfg, jnp.asarray(ids), segment_ids=jnp.asarray(seg))
                                     [0, len(seq) - 1])))
        if t in eos_ids:
            break
        out.append(t)
        seq.append(t)
    return out


@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_config(vocab_size=128)
    params = init_params(cfg, jax.random.PRNGKey(7))
    # sharpen the random model so that greedy choices are well separated
    params["lm_head"]["kernel"] = params["lm_head"]["kernel"] * 20
    return cfg, params


@pytest.mark.parametrize("schedule", ["static", "refill"])
def test_cached_batched_greedy_equals_uncached(tiny, schedule):
    cfg, params = tiny
    rng = np.random.RandomState(0)
    prompts = [rng.randint(3, cfg.vocab_size, n).tolist() for n in (5, 11, 2, 8)]
    eos = (0,)
    got = generate_ids(params, cfg, prompts, eos_ids=eos, pad_id=1, max_new_tokens=12, batch_size=3,
                       schedule=schedule)
    for p, g in zip(prompts, got):
        assert g == greedy_without_cache(params, cfg, p, 12, eos)


def test_refill_admits_prompts_into_freed_rows_and_equals_uncached(tiny):
    """Many end-of-turn tokens, so replies end at different steps (0 to max_new_tokens tokens)
    and rows are refilled mid-way; prompts in two buckets (32 and 48 slots); 13 prompts in 3
    rows. Every reply equals the uncached greedy reply and the static schedule's."""
    cfg, params = tiny
    rng = np.random.RandomState(5)
    prompts = [rng.randint(3, cfg.vocab_size, n).tolist() for n in rng.randint(1, 45, 13)]
    eos = tuple(range(3, cfg.vocab_size, 11))
    kw = dict(eos_ids=eos, pad_id=1, max_new_tokens=10, batch_size=3)
    got = generate_ids(params, cfg, prompts, schedule="refill", **kw)
    lengths = sorted(len(g) for g in got)
    assert lengths[0] < 3 and lengths[-1] == 10 and len(set(lengths)) >= 4  # rows really free up early
    assert max(len(p) for p in prompts) > 32  # two prompt buckets
    for p, g in zip(prompts, got):
        assert g == greedy_fixed_width(params, cfg, p, 10, eos, width=64)
    assert got == generate_ids(params, cfg, prompts, schedule="static", **kw)


def test_refill_compiles_once_and_sampling_is_seeded(tiny):
    cfg, params = tiny
    kw = dict(eos_ids=tuple(range(3, cfg.vocab_size, 7)), pad_id=1, max_new_tokens=6, batch_size=2,
              schedule="refill")
    generate_ids(params, cfg, [[3, 4, 5], [6] * 9, [7, 8]], **kw)
    a0, d0 = advance._cache_size(), admit._cache_size()
    generate_ids(params, cfg, [[9, 9], [3] * 20, [5] * 7, [4]], **kw)    # same bucket, new lengths
    generate_ids(params, cfg, [[3] * 20, [4] * 3], temperature=0.7, top_p=0.9, **kw)  # traced settings
    assert (advance._cache_size(), admit._cache_size()) == (a0, d0)
    a = generate_ids(params, cfg, [[3, 4, 5]] * 3, temperature=1.0, top_p=0.95, seed=11, **kw)
    b = generate_ids(params, cfg, [[3, 4, 5]] * 3, temperature=1.0, top_p=0.95, seed=11, **kw)
    c = generate_ids(params, cfg, [[3, 4, 5]] * 3, temperature=1.0, top_p=0.95, seed=12, **kw)
    assert a == b and a != c
    greedy = generate_ids(params, cfg, [[3, 4, 5], [6, 7]], **kw)
    assert greedy == generate_ids(params, cfg, [[3, 4, 5], [6, 7]], temperature=1.0, top_p=1e-6, seed=3, **kw)
    assert generate_ids(params, cfg, [], **kw) == []
    with pytest.raises(ModelError, match="schedule must be one of"):
        generate_ids(params, cfg, [[3]], eos_ids=(0,), pad_id=1, schedule="dynamic")


def test_stops_at_end_of_turn(tiny):
    cfg, params = tiny
    prompt = [5, 6, 7]
    free = greedy_without_cache(params, cfg, prompt, 10, ())
    stop_tok = free[3]
    got = generate_ids(params, cfg, [prompt], eos_ids=(stop_tok,), pad_id=1, max_new_tokens=10, batch_size=1)
    assert got[0] == free[: free.index(stop_tok)]


def test_compiles_once_per_bucket_and_sampling_is_seeded(tiny):
    cfg, params = tiny
    before = decode._cache_size()
    kw = dict(eos_ids=(0,), pad_id=1, max_new_tokens=6, batch_size=2, schedule="static")
    generate_ids(params, cfg, [[3, 4, 5]], **kw)
    generate_ids(params, cfg, [[3, 4, 5, 6, 7, 8, 9], [9, 9]], **kw)   # same bucket (32), new lengths
    generate_ids(params, cfg, [[3] * 20], temperature=0.7, top_p=0.9, **kw)  # traced settings
    assert decode._cache_size() - before == 1
    a = generate_ids(params, cfg, [[3, 4, 5]] * 2, temperature=1.0, top_p=0.95, seed=11, **kw)
    b = generate_ids(params, cfg, [[3, 4, 5]] * 2, temperature=1.0, top_p=0.95, seed=11, **kw)
    c = generate_ids(params, cfg, [[3, 4, 5]] * 2, temperature=1.0, top_p=0.95, seed=12, **kw)
    assert a == b and a != c


def test_top_p_tiny_keeps_only_the_argmax(tiny):
    cfg, params = tiny
    kw = dict(eos_ids=(0,), pad_id=1, max_new_tokens=6, batch_size=2)
    greedy = generate_ids(params, cfg, [[3, 4, 5]], **kw)
    nucleus = generate_ids(params, cfg, [[3, 4, 5]], temperature=1.0, top_p=1e-6, seed=3, **kw)
    assert greedy == nucleus


@pytest.mark.real_model
def test_real_model_says_paris_and_cache_matches(real_model, real_tokenizer):
    cfg, params = real_model
    reply = generate(params, cfg, real_tokenizer, ["What is the capital of France?"], max_new_tokens=16,
                     batch_size=1)[0]
    assert "Paris" in reply
    prompt = real_tokenizer.prompt_ids("Name a color.")
    got = generate_ids(params, cfg, [prompt], eos_ids=real_tokenizer.eos_ids, pad_id=real_tokenizer.pad_id,
                       max_new_tokens=6, batch_size=1)[0]
    assert got == greedy_without_cache(params, cfg, prompt, 6, real_tokenizer.eos_ids)


@pytest.mark.parametrize("tied", [False, True])
def test_head_logits_in_vocabulary_blocks_equal_one_matmul(tied):
    cfg = tiny_config(vocab_size=128, tie_word_embeddings=tied)
    params = init_params(cfg, jax.random.PRNGKey(1))
    x = jax.random.normal(jax.random.PRNGKey(2), (3, 2, cfg.hidden_size))
    want = np.asarray(head_logits(params, cfg, x))
    for chunk in (48, 64, 127, 128, 500):  # 48 and 127 do not divide V: the last block is shifted back
        np.testing.assert_allclose(np.asarray(head_logits(params, cfg, x, chunk)), want, rtol=1e-6, atol=1e-6)


def test_decode_with_vocabulary_blocks_gives_the_same_tokens(tiny):
    cfg, params = tiny
    rng = np.random.RandomState(3)
    prompts = [rng.randint(3, cfg.vocab_size, n).tolist() for n in (4, 9, 1)]
    ids, seg = left_pad(prompts, bucket_length(9), 1)
    args = (params, cfg, jnp.asarray(ids), jnp.asarray(seg), jax.random.PRNGKey(0), jnp.float32(0.0),
            jnp.float32(1.0))
    plain = decode(*args, max_new_tokens=10, eos_ids=(0,))
    blocks = decode(*args, max_new_tokens=10, eos_ids=(0,), vocab_chunk=40)
    assert np.array_equal(np.asarray(plain[0]), np.asarray(blocks[0]))
    assert np.array_equal(np.asarray(plain[1]), np.asarray(blocks[1]))


@pytest.mark.parametrize("per_row", [False, True])
def test_split_layers_give_the_same_logits_and_cache_bit_for_bit(tiny, per_row):
    """The unrolled stack over split layers and a per-layer cache computes what the scan over
    the stacked params and cache computes, bit for bit: a prefill of 2 left-padded rows, then 3
    decode steps (one cache index for the batch, or one per row as under the refill schedule)."""
    cfg, params = tiny
    split = split_layers(params)
    assert len(split["layers"]) == cfg.num_hidden_layers and split_layers(split) is split
    rng = np.random.RandomState(4)
    ids, seg = left_pad([rng.randint(3, cfg.vocab_size, n).tolist() for n in (7, 3)], 8, 1)
    ids, seg = jnp.asarray(ids), jnp.asarray(seg)
    pos = generation.default_positions(seg)
    fwd = jax.jit(forward_with_cache, static_argnums=1)
    caches = {}
    for name, p, layered in (("stacked", params, False), ("split", split, True)):
        cache = init_cache(cfg, 2, 16, per_layer=layered)
        logits, cache = fwd(p, cfg, ids, pos, seg, cache)
        out = [logits]
        if per_row:
            cache["index"] = jnp.full((2,), cache["index"], jnp.int32)
        tok, at = jnp.argmax(logits[:, -1], -1)[:, None], pos[:, -1:] + 1
        for _ in range(3):
            logits, cache = fwd(p, cfg, tok, at, jnp.ones((2, 1), jnp.int32), cache)
            out.append(logits)
            tok, at = jnp.argmax(logits[:, -1], -1)[:, None], at + 1
        caches[name] = (out, cache)
    (a, ca), (b, cb) = caches["stacked"], caches["split"]
    for x, y in zip(a, b):
        assert np.array_equal(np.asarray(x), np.asarray(y))
    for kv in ("k", "v"):
        assert np.array_equal(np.asarray(ca[kv]), np.stack([np.asarray(c) for c in cb[kv]]))
    assert np.array_equal(np.asarray(ca["index"]), np.asarray(cb["index"]))
    with pytest.raises(ModelError, match="per-layer cache"):
        forward_with_cache(split, cfg, ids, pos, seg, init_cache(cfg, 2, 16))


def test_slot_groups_part_prompts_by_cache_size():
    lengths = [10, 200, 40, 70, 5, 300, 60, 90, 100, 20, 110, 30]
    groups = slot_groups(lengths, 3)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))  # a partition
    assert all(g == sorted(g) for g in groups)                                # prompt order kept
    # octaves of the bucket: <= 64 (6 prompts), <= 128 (4), <= 256 (1), <= 512 (1); the last two
    # cannot fill a batch of 3: they join each other, then the <= 128 group
    assert groups == [[0, 2, 4, 6, 9, 11], [1, 3, 5, 7, 8, 10]]
    assert slot_groups(lengths, 100) == [list(range(len(lengths)))]  # nothing fills a batch: one pass
    assert slot_groups([5, 6], 16) == [[0, 1]]


def test_refill_in_several_cache_groups_equals_uncached(tiny, monkeypatch):
    """Prompts in two cache groups (<= 64 and 65-128 tokens): each reply equals the uncached
    greedy reply and the static schedule's, with split layers (the CPU default) and without."""
    cfg, params = tiny
    rng = np.random.RandomState(6)
    prompts = [rng.randint(3, cfg.vocab_size, n).tolist() for n in (5, 80, 12, 100, 30, 70, 9)]
    assert len(slot_groups([len(p) for p in prompts], 2)) == 2
    kw = dict(eos_ids=tuple(range(3, cfg.vocab_size, 13)), pad_id=1, max_new_tokens=8, batch_size=2)
    got = generate_ids(params, cfg, prompts, schedule="refill", **kw)
    for p, g in zip(prompts, got):
        assert g == greedy_fixed_width(params, cfg, p, 8, kw["eos_ids"], width=128)
    assert got == generate_ids(params, cfg, prompts, schedule="static", **kw)
    monkeypatch.setattr(generation, "split_layers_for", lambda backend: False)
    assert got == generate_ids(params, cfg, prompts, schedule="refill", **kw)


def test_bucket_lengths_pad_by_at_most_half():
    assert [bucket_length(n) for n in (1, 32, 33, 48, 49, 64, 65, 96, 97, 200)] == \
        [32, 32, 48, 48, 64, 64, 96, 96, 128, 256]
    for n in range(1, 2000):
        b = bucket_length(n)
        assert n <= b and (b <= 32 or b < 1.5 * n + 1)


@pytest.mark.slow
@pytest.mark.real_model
def test_real_model_batched_left_padded_decoding_equals_uncached(real_model, real_tokenizer):
    """The cached path (in-place cache, vocabulary blocks on CPU, bucketed prefill) against a
    full uncached forward per token, on prompts of different lengths in one batch; the refill
    schedule (2 rows for 3 prompts) gives the same tokens."""
    cfg, params = real_model
    tok = real_tokenizer
    prompts = [tok.prompt_ids(p) for p in ("Name a color.", "Write one sentence about the moon and the sea.",
                                           "2+2?")]
    n = 8
    got = generate_ids(params, cfg, prompts, eos_ids=tok.eos_ids, pad_id=tok.pad_id, max_new_tokens=n,
                       batch_size=3, schedule="static")
    assert got == generate_ids(params, cfg, prompts, eos_ids=tok.eos_ids, pad_id=tok.pad_id,
                               max_new_tokens=n, batch_size=2, schedule="refill")
    width = max(len(p) for p in prompts) + n  # one compiled shape: right-padded, padding masked out
    for p, g in zip(prompts, got):
        assert g == greedy_fixed_width(params, cfg, p, n, tok.eos_ids, width, pad_id=tok.pad_id)


@pytest.mark.parametrize("temperature,top_p", [(0.8, 0.9), (1.5, 1.0), (0.5, 0.6)])
def test_sampling_follows_the_tempered_nucleus(temperature, top_p):
    """20,000 draws from fixed logits match softmax(logits / T) cut to the smallest set of top
    tokens whose mass reaches top_p, renormalized (chi-square, p > 1e-4); tokens outside the
    nucleus never appear."""
    from scipy.stats import chisquare
    logits = np.array([2.0, 1.5, 1.2, 0.7, 0.3, 0.0, -0.5, -1.0], np.float32)
    n = 20_000
    toks = np.asarray(_sample(jnp.asarray(np.tile(logits, (n, 1))), jax.random.PRNGKey(7),
                              jnp.float32(temperature), jnp.float32(top_p)))
    p = np.exp(logits / temperature - np.max(logits / temperature))
    p /= p.sum()                                   # logits are sorted: so are the probabilities
    before = np.cumsum(p) - p
    nucleus = before < top_p
    expected = np.where(nucleus, p, 0.0) / p[nucleus].sum()
    counts = np.bincount(toks, minlength=len(logits))
    assert counts[~nucleus].sum() == 0 and (nucleus.sum() < len(logits) or top_p >= 1.0)
    k = int(nucleus.sum())
    exp = expected[:k].astype(np.float64)
    assert chisquare(counts[:k], exp / exp.sum() * counts[:k].sum()).pvalue > 1e-4
