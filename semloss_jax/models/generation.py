"""Batched autoregressive decoding with a KV cache, jitted once per shape bucket.

Prompts are rendered with the chat template, left-padded to a bucketed length (32, 48, 64, 96,
128, ...: `bucket_length`) and batched to a fixed batch size, so a new prompt length or a new batch reuses the
compiled program. Decoding runs inside one `lax.while_loop` (prefill, then one token per
iteration), stops a row at any end-of-turn token and stops the loop when every row is done or
`max_new_tokens` is reached. Greedy when temperature == 0, else temperature + top-p (nucleus,
among the top NUCLEUS_CANDIDATES tokens) sampling from a seeded PRNG key. temperature and top_p
are traced values: changing them does not recompile.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from semloss_jax.errors import ModelError
from semloss_jax.models.context import decode_whole_chars, fit_prompts
from semloss_jax.models.llama import LlamaConfig, default_positions, forward_with_cache, init_cache


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
    cache = init_cache(cfg, B, P + max_new_tokens)
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


def generate_ids(params, cfg: LlamaConfig, prompt_token_ids: Sequence[Sequence[int]], *, eos_ids,
                 pad_id: int, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int = 0, batch_size: int = 8, progress=None,
                 truncate_prompt: bool = False) -> list[list[int]]:
    """Generated token ids (without the end-of-turn token) for each prompt, in order.

    Every prompt plus max_new_tokens must fit the model's context (ModelError otherwise);
    truncate_prompt=True keeps the last tokens of a prompt that does not (with a warning)."""
    if batch_size < 1:
        raise ModelError(f"batch_size must be >= 1, got {batch_size}")
    prompt_token_ids, _ = fit_prompts(prompt_token_ids, max_new_tokens=max_new_tokens,
                                      context=cfg.max_position_embeddings, truncate=truncate_prompt)
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
             batch_size: int = 8, progress=None, truncate_prompt: bool = False) -> list[str]:
    """Chat-templated prompts -> decoded replies (special tokens removed; a reply cut inside a
    multi-byte character ends before it). truncate_prompt: as generate_ids."""
    prompt_ids = [tok.prompt_ids(p, system) for p in prompts]
    out = generate_ids(params, cfg, prompt_ids, eos_ids=tok.eos_ids, pad_id=tok.pad_id,
                       max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                       batch_size=batch_size, progress=progress, truncate_prompt=truncate_prompt)
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
                      progress=None) -> list[Generation]:
    """Like `generate` (the same texts), with each reply's token count and stop reason."""
    prompt_ids = [tok.prompt_ids(p, system) for p in prompts]
    out = generate_ids(params, cfg, prompt_ids, eos_ids=tok.eos_ids, pad_id=tok.pad_id,
                       max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                       batch_size=batch_size, progress=progress)
    return [Generation(decode_whole_chars(tok.decode, ids).strip(), len(ids),
                       stop_reason(len(ids), max_new_tokens))
            for ids in out]
