"""Batched autoregressive decoding with a KV cache, jitted once per shape bucket.

Two schedules (`generate_ids(schedule=...)`), the same greedy tokens up to float rounding:
- "refill" (the default): each row of the batch has its own cache write index, and the next
  prompt enters a row (`admit`: a batch-1 prefill) as soon as the row's reply ends (`advance`),
  so no row idles while the longest reply of a batch finishes. Prompts of similar length share
  a pass whose cache fits them (`slot_groups`).
- "static": fixed batches, as follows.

Static schedule: prompts are rendered with the chat template, left-padded to a bucketed length
(32, 48, 64, 96, 128, ...: `bucket_length`) and batched to a fixed batch size, so a new prompt
length or a new batch reuses the compiled program. Decoding runs inside one `lax.while_loop`
(prefill, then one token per iteration), stops a row at any end-of-turn token and stops the
loop when every row is done or `max_new_tokens` is reached.

Both: greedy when temperature == 0, else temperature + top-p (nucleus, among the top
NUCLEUS_CANDIDATES tokens) sampling from a seeded PRNG key. temperature and top_p are traced
values: changing them does not recompile. On CPU, `generate_ids` splits the stacked layer params
once per call (`split_layers_for`, `llama.split_layers`): the layers then run unrolled against a
per-layer cache, the same tokens with faster decode steps.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from semloss_jax.errors import ModelError
from semloss_jax.models.context import decode_whole_chars, fit_prompts
from semloss_jax.models.llama import (
    LlamaConfig,
    default_positions,
    forward_with_cache,
    init_cache,
    layers_are_split,
    split_layers,
)


def bucket_length(n: int, minimum: int = 32) -> int:
    """The prompt bucket for n tokens: the smallest of minimum * 2^k and 1.5 * minimum * 2^k
    (32, 48, 64, 96, 128, 192, ...) that is >= n.

    Two buckets per octave: a prompt pads by at most 50% (powers of two alone: up to 100%),
    for at most twice the compiled shapes.
    """
    b = minimum
    while True:
        if b >= n:
            return b
        if b + b // 2 >= n:
            return b + b // 2
        b *= 2


def left_pad(seqs: Sequence[Sequence[int]], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad token sequences to [len(seqs), length]: (ids, segment ids: 1 on tokens, 0 on padding)."""
    ids = np.full((len(seqs), length), pad_id, np.int32)
    seg = np.zeros((len(seqs), length), np.int32)
    for i, s in enumerate(seqs):
        if len(s) > length:
            raise ValueError(f"prompt {i} has {len(s)} tokens, more than the bucket length {length}")
        if len(s):
            ids[i, length - len(s):] = s
            seg[i, length - len(s):] = 1
    return ids, seg


def split_layers_for(backend: str) -> bool:
    """Whether decoding splits the stacked layer params (`llama.split_layers`, one copy of the
    layer weights per generate call) to run the layers unrolled against a per-layer cache: on
    CPU, where the scan over the stacked arrays copies each layer's weights and cache slice
    every step (docs/PERFORMANCE.md); not on accelerators, where a second copy of a large
    model's weights may not fit."""
    return backend == "cpu"


def vocab_chunk_for(backend: str, batch_size: int) -> int | None:
    """The LM-head block size of a decode step (`llama.head_logits`): blocks of VOCAB_CHUNK rows
    on CPU for batches of at least BLOCK_MIN_BATCH rows, where a [batch, d] x [d, V] product
    measured faster in blocks (docs/PERFORMANCE.md); one matmul otherwise (a single row is a
    matrix-vector product, already streamed once; accelerators run one large matmul best)."""
    return VOCAB_CHUNK if backend == "cpu" and batch_size >= BLOCK_MIN_BATCH else None


# Rows of the LM head per block in a CPU decode step: 1024 rows x d = 576 floats (2.3 MiB) fit in
# the L2 cache of the CPUs measured in docs/PERFORMANCE.md.
VOCAB_CHUNK = 1024
BLOCK_MIN_BATCH = 4

# Nucleus sampling looks at the top NUCLEUS_CANDIDATES tokens only: a full sort of the
# vocabulary costs ~50x a decode step on CPU (XLA's sort), and the nucleus of a chat model at
# top_p <= 0.95 is far smaller than this.
NUCLEUS_CANDIDATES = 512

SCHEDULES = ("refill", "static")


def _sample(logits, key, temperature, top_p):
    """Logits [B, V] -> tokens [B]. Greedy where temperature <= 0 (no sampling work at all)."""

    def greedy(_):
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def nucleus(_):
        k = min(NUCLEUS_CANDIDATES, logits.shape[-1])
        top_logits, top_ids = jax.lax.top_k(logits / jnp.maximum(temperature, 1e-6), k)  # sorted
        probs = jax.nn.softmax(top_logits, axis=-1)
        cum = jnp.cumsum(probs, axis=-1)
        keep = (cum - probs) < top_p  # always keeps the top token
        choice = jax.random.categorical(key, jnp.where(keep, top_logits, -jnp.inf), axis=-1)
        return jnp.take_along_axis(top_ids, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)

    return jax.lax.cond(temperature > 0, nucleus, greedy, None)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "eos_ids", "vocab_chunk"))
def decode(params, cfg: LlamaConfig, prompt_ids, prompt_seg, key, temperature, top_p, *,
           max_new_tokens: int, eos_ids: tuple[int, ...], vocab_chunk: int | None = None):
    """prompt_ids/prompt_seg [B, P] left-padded -> (tokens [B, max_new_tokens], lengths [B]).

    Tokens after a row's end-of-turn token are set to the first eos id; lengths count the
    generated tokens before the end-of-turn token. vocab_chunk: the LM-head block size of the
    decode steps (`llama.head_logits`; the values are the same, only the speed differs).
    """
    B, P = prompt_ids.shape
    cache = init_cache(cfg, B, P + max_new_tokens, per_layer=layers_are_split(params))
    positions = default_positions(prompt_seg)
    logits, cache = forward_with_cache(params, cfg, prompt_ids, positions, prompt_seg, cache, last_only=True,
                                       vocab_chunk=vocab_chunk)
    last_logits = logits[:, -1]
    next_pos = positions[:, -1] + 1
    eos = jnp.asarray(eos_ids, jnp.int32)
    out = jnp.full((B, max_new_tokens), eos_ids[0], jnp.int32)
    done = jnp.zeros((B,), bool)
    lengths = jnp.zeros((B,), jnp.int32)

    def cond(state):
        i, _, _, _, done, _, _, _ = state
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(state):
        i, cache, last_logits, pos, done, out, lengths, key = state
        key, sub = jax.random.split(key)
        tok = _sample(last_logits, sub, temperature, top_p)
        is_eos = jnp.any(tok[:, None] == eos[None, :], axis=-1)
        tok = jnp.where(done, eos_ids[0], tok)
        out = out.at[:, i].set(tok)
        lengths = lengths + (~done & ~is_eos).astype(jnp.int32)
        done = done | is_eos
        logits, cache = forward_with_cache(params, cfg, tok[:, None], pos[:, None],
                                           jnp.ones((B, 1), jnp.int32), cache, vocab_chunk=vocab_chunk)
        return i + 1, cache, logits[:, -1], pos + 1, done, out, lengths, key

    state = (jnp.int32(0), cache, last_logits, next_pos, done, out, lengths, key)
    _, _, _, _, _, out, lengths, _ = jax.lax.while_loop(cond, body, state)
    return out, lengths


# The refill schedule ----------------------------------------------------------------------
# Static batches decode until their longest reply ends: when one reply in a batch of 16 runs to
# max_new_tokens, the other rows' finished slots idle until it does (on the study's validation
# replies 2-3.4x more row-steps than tokens). The refill schedule gives each row of the batch
# its own cache write index and admits the next prompt into a row as soon as its reply ends.


class Slots(NamedTuple):
    """The device state of the refill decoder: B rows, each holding one prompt's reply.

    cache: k/v [L, B, S, KV, hd], segment [B, S] and index [B] (each row's next free slot);
    pos [B]: the RoPE position of each row's next token; logits [B, V]: each row's next-token
    logits; active [B]: the row holds a reply still being generated; out [B, max_new_tokens]:
    the reply tokens; n [B]: tokens generated so far (an end-of-turn token is not counted).
    """

    cache: dict
    pos: jax.Array
    logits: jax.Array
    active: jax.Array
    out: jax.Array
    n: jax.Array


def empty_slots(cfg: LlamaConfig, batch: int, slots: int, max_new_tokens: int, fill: int,
                per_layer: bool = False) -> Slots:
    """B idle rows of `slots` cache slots each; replies are filled with `fill` past their end.
    per_layer: the cache layout of params with split layers (`llama.init_cache`)."""
    cache = init_cache(cfg, batch, slots, per_layer=per_layer)
    cache["index"] = jnp.zeros((batch,), jnp.int32)
    return Slots(cache, jnp.zeros((batch,), jnp.int32), jnp.zeros((batch, cfg.vocab_size), jnp.float32),
                 jnp.zeros((batch,), bool), jnp.full((batch, max_new_tokens), fill, jnp.int32),
                 jnp.zeros((batch,), jnp.int32))


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnums=(2,))
def admit(params, cfg: LlamaConfig, st: Slots, row, prompt_ids, prompt_seg, fill) -> Slots:
    """Prefill one prompt (prompt_ids/prompt_seg [1, P], left-padded) into row `row`: its
    keys/values fill slots [0, P) of the row, and the row starts a new reply."""
    P = prompt_ids.shape[1]
    positions = default_positions(prompt_seg)
    logits, c = forward_with_cache(params, cfg, prompt_ids, positions, prompt_seg,
                                   init_cache(cfg, 1, P, per_layer=layers_are_split(params)), last_only=True)
    zero = jnp.int32(0)

    def put(buf, new):  # the prompt's [.., 1, P, KV, hd] into row `row`, slots [0, P)
        lead = (zero,) * (buf.ndim - 4)
        return jax.lax.dynamic_update_slice(buf, new.astype(buf.dtype), (*lead, row, zero, zero, zero))

    seg_row = jnp.zeros((1, st.cache["segment"].shape[1]), jnp.int32).at[:, :P].set(prompt_seg)
    cache = {"k": jax.tree_util.tree_map(put, st.cache["k"], c["k"]),
             "v": jax.tree_util.tree_map(put, st.cache["v"], c["v"]),
             "segment": jax.lax.dynamic_update_slice(st.cache["segment"], seg_row, (row, zero)),
             "index": st.cache["index"].at[row].set(P)}
    return Slots(cache, st.pos.at[row].set(positions[0, -1] + 1), st.logits.at[row].set(logits[0, -1]),
                 st.active.at[row].set(True), st.out.at[row].set(fill), st.n.at[row].set(0))


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "eos_ids", "vocab_chunk"),
                   donate_argnums=(2,))
def advance(params, cfg: LlamaConfig, st: Slots, key, temperature, top_p, until_free, *,
            max_new_tokens: int, eos_ids: tuple[int, ...], vocab_chunk: int | None = None) -> Slots:
    """Decode every active row, one token per iteration, until a row's reply ends (when
    until_free: the caller has a prompt to admit) or until every row's reply has ended.

    A reply ends at an end-of-turn token (not stored, not counted) or at max_new_tokens tokens.
    Idle rows ride along (fixed shapes) without changing their state."""
    eos = jnp.asarray(eos_ids, jnp.int32)
    rows = jnp.arange(st.n.shape[0])
    one = jnp.ones((st.n.shape[0], 1), jnp.int32)

    def cond(c):
        st, _, freed = c
        return jnp.any(st.active) & ~(until_free & freed)

    def body(c):
        st, key, freed = c
        key, sub = jax.random.split(key)
        tok = _sample(st.logits, sub, temperature, top_p)
        keep = st.active & ~jnp.any(tok[:, None] == eos[None, :], axis=-1)
        at = jnp.minimum(st.n, max_new_tokens - 1)
        out = st.out.at[rows, at].set(jnp.where(keep, tok, st.out[rows, at]))
        n = st.n + keep.astype(jnp.int32)
        active = keep & (n < max_new_tokens)
        logits, cache = forward_with_cache(params, cfg, tok[:, None], st.pos[:, None], one, st.cache,
                                           vocab_chunk=vocab_chunk)
        cache["index"] = jnp.where(active, cache["index"], st.cache["index"])
        st = Slots(cache, jnp.where(active, st.pos + 1, st.pos), logits[:, -1], active, out, n)
        return st, key, freed | jnp.any(c[0].active & ~active)

    st, _, _ = jax.lax.while_loop(cond, body, (st, key, jnp.bool_(False)))
    return st


def slot_groups(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Prompt indices (in order) grouped by the cache each needs: prompts whose bucket
    (`bucket_length`) falls in the same octave (<= 64, <= 128, <= 256, ... tokens) share one
    refill pass, whose cache holds the group's longest bucket plus the reply, so one long prompt
    no longer sizes every row's cache (attention and cache traffic grow with the slots). A group
    too small to fill a batch joins its neighbour (the larger cache serves both)."""
    octaves: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        octaves.setdefault(max(64, 1 << (bucket_length(n) - 1).bit_length()), []).append(i)
    groups = [octaves[k] for k in sorted(octaves)]
    while len(groups) > 1 and any(len(g) < batch_size for g in groups):
        i = next(i for i, g in enumerate(groups) if len(g) < batch_size)
        j = i + 1 if i + 1 < len(groups) else i - 1
        lo, hi = min(i, j), max(i, j)
        groups[lo:hi + 1] = [sorted(groups[lo] + groups[hi])]
    return groups


def _generate_refill(params, cfg: LlamaConfig, prompts: list[list[int]], *, eos_ids, pad_id: int,
                     max_new_tokens: int, temperature: float, top_p: float, seed: int,
                     batch_size: int, progress) -> list[list[int]]:
    """generate_ids under the refill schedule: one pass per `slot_groups` group, in which
    prompts enter rows in order as rows free up."""
    eos_ids = tuple(int(e) for e in eos_ids)
    B = min(batch_size, len(prompts))
    results: list[list[int]] = [[] for _ in prompts]
    key = jax.random.PRNGKey(seed)
    for group in slot_groups([len(p) for p in prompts], B):
        key, sub = jax.random.split(key)
        got = _refill_pass(params, cfg, [prompts[i] for i in group], B, sub, eos_ids=eos_ids,
                           pad_id=pad_id, max_new_tokens=max_new_tokens, temperature=temperature,
                           top_p=top_p, progress=progress)
        for i, ids in zip(group, got):
            results[i] = ids
    return results


def _refill_pass(params, cfg: LlamaConfig, prompts: list[list[int]], B: int, key, *, eos_ids,
                 pad_id: int, max_new_tokens: int, temperature: float, top_p: float,
                 progress) -> list[list[int]]:
    """The replies to `prompts` through B rows whose caches hold the longest prompt's bucket
    plus max_new_tokens slots."""
    st = empty_slots(cfg, B, max(bucket_length(len(p)) for p in prompts) + max_new_tokens,
                     max_new_tokens, eos_ids[0], per_layer=layers_are_split(params))
    fill = jnp.int32(eos_ids[0])
    owner: list[int | None] = [None] * B   # the prompt each row is answering
    results: list[list[int]] = [[] for _ in prompts]
    nxt = 0                                 # the next prompt to admit
    chunk_v = vocab_chunk_for(jax.default_backend(), B)

    def fill_row(st, row):
        nonlocal nxt
        if nxt == len(prompts):
            owner[row] = None
            return st
        owner[row], nxt = nxt, nxt + 1
        ids, seg = left_pad([prompts[owner[row]]], bucket_length(len(prompts[owner[row]])), pad_id)
        return admit(params, cfg, st, jnp.int32(row), jnp.asarray(ids), jnp.asarray(seg), fill)

    for row in range(B):
        st = fill_row(st, row)
    while any(o is not None for o in owner):
        key, sub = jax.random.split(key)
        more = nxt < len(prompts)
        st = advance(params, cfg, st, sub, jnp.float32(temperature), jnp.float32(top_p), jnp.bool_(more),
                     max_new_tokens=int(max_new_tokens), eos_ids=eos_ids, vocab_chunk=chunk_v)
        active, out, n = np.asarray(st.active), np.asarray(st.out), np.asarray(st.n)
        for row, i in enumerate(owner):
            if i is not None and not active[row]:
                results[i] = out[row, :n[row]].tolist()
                if progress is not None:
                    progress.update(1)
                st = fill_row(st, row)
    return results


def generate_ids(params, cfg: LlamaConfig, prompt_token_ids: Sequence[Sequence[int]], *, eos_ids,
                 pad_id: int, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int = 0, batch_size: int = 8, progress=None,
                 truncate_prompt: bool = False, schedule: str = "refill") -> list[list[int]]:
    """Generated token ids (without the end-of-turn token) for each prompt, in order.

    schedule: "refill" (a row takes the next prompt as soon as its reply ends; see `advance`)
    or "static" (fixed batches of batch_size prompts, each decoded until its longest reply
    ends; `decode`). Greedy replies are the same under both up to float rounding (the prefill
    runs at batch 1 instead of batch_size); sampled replies draw from other random streams.
    Every prompt plus max_new_tokens must fit the model's context (ModelError otherwise);
    truncate_prompt=True keeps the last tokens of a prompt that does not (with a warning)."""
    if batch_size < 1:
        raise ModelError(f"batch_size must be >= 1, got {batch_size}")
    if schedule not in SCHEDULES:
        raise ModelError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    prompt_token_ids, _ = fit_prompts(prompt_token_ids, max_new_tokens=max_new_tokens,
                                      context=cfg.max_position_embeddings, truncate=truncate_prompt)
    if split_layers_for(jax.default_backend()) and prompt_token_ids:
        params = split_layers(params)  # same tokens, faster decode steps on CPU
    if schedule == "refill":
        if not prompt_token_ids:
            return []
        return _generate_refill(params, cfg, [list(p) for p in prompt_token_ids], eos_ids=eos_ids,
                                pad_id=pad_id, max_new_tokens=max_new_tokens, temperature=temperature,
                                top_p=top_p, seed=seed, batch_size=batch_size, progress=progress)
    results: list[list[int]] = []
    key = jax.random.PRNGKey(seed)
    chunk_v = vocab_chunk_for(jax.default_backend(), batch_size)
    n = len(prompt_token_ids)
    for start in range(0, n, batch_size):
        chunk = list(prompt_token_ids[start:start + batch_size])
        real = len(chunk)
        chunk += [[]] * (batch_size - real)  # fill the batch: an all-padding row is ignored
        P = bucket_length(max(len(s) for s in chunk))
        ids, seg = left_pad(chunk, P, pad_id)
        key, sub = jax.random.split(key)
        toks, lens = decode(params, cfg, jnp.asarray(ids), jnp.asarray(seg), sub,
                            jnp.float32(temperature), jnp.float32(top_p),
                            max_new_tokens=int(max_new_tokens), eos_ids=tuple(int(e) for e in eos_ids),
                            vocab_chunk=chunk_v)
        toks, lens = np.asarray(toks), np.asarray(lens)
        results += [toks[i, :lens[i]].tolist() for i in range(real)]
        if progress is not None:
            progress.update(real)
    return results


def generate(params, cfg: LlamaConfig, tok, prompts: Sequence[str], *, max_new_tokens: int = 128,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, system: str | None = None,
             batch_size: int = 8, progress=None, truncate_prompt: bool = False,
             schedule: str = "refill") -> list[str]:
    """Chat-templated prompts -> decoded replies (special tokens removed; a reply cut inside a
    multi-byte character ends before it). truncate_prompt, schedule: as generate_ids."""
    prompt_ids = [tok.prompt_ids(p, system) for p in prompts]
    out = generate_ids(params, cfg, prompt_ids, eos_ids=tok.eos_ids, pad_id=tok.pad_id,
                       max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                       batch_size=batch_size, progress=progress, truncate_prompt=truncate_prompt,
                       schedule=schedule)
    return [decode_whole_chars(tok.decode, ids).strip() for ids in out]


STOP_EOT = "eot"        # the reply ended with an end-of-turn token
STOP_LENGTH = "length"  # the reply was cut at max_new_tokens


class Generation(NamedTuple):
    """One decoded reply with its exact length and why it stopped.

    n_tokens: generated tokens before the end-of-turn token (the end-of-turn token itself is
      not counted); stop: STOP_EOT or STOP_LENGTH.
    """

    text: str
    n_tokens: int
    stop: str


def stop_reason(n_tokens: int, max_new_tokens: int) -> str:
    """Why a reply of n_tokens generated tokens stopped: decoding ends a row at its end-of-turn
    token or after max_new_tokens tokens, so fewer than max_new_tokens tokens means end-of-turn."""
    return STOP_EOT if n_tokens < max_new_tokens else STOP_LENGTH


def generate_detailed(params, cfg: LlamaConfig, tok, prompts: Sequence[str], *,
                      max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
                      seed: int = 0, system: str | None = None, batch_size: int = 8,
                      progress=None, schedule: str = "refill") -> list[Generation]:
    """Like `generate` (the same texts), with each reply's token count and stop reason."""
    prompt_ids = [tok.prompt_ids(p, system) for p in prompts]
    out = generate_ids(params, cfg, prompt_ids, eos_ids=tok.eos_ids, pad_id=tok.pad_id,
                       max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                       batch_size=batch_size, progress=progress, schedule=schedule)
    return [Generation(decode_whole_chars(tok.decode, ids).strip(), len(ids),
                       stop_reason(len(ids), max_new_tokens))
            for ids in out]
