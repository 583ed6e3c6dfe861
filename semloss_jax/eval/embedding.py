"""Text embeddings from a frozen causal LM's hidden states, and the cosine of reply/reference pairs.

    emb = TextEmbedder(params, cfg, tok, name)          # e.g. the base SmolLM2-135M-Instruct
    vecs, n_tok = embed_texts(emb, ["a text", ...])     # [N, d] float64, [N] tokens pooled
    cos = pair_cosines(emb, replies, references)        # [N]
    vec = embed_unique(emb, texts, known=store)         # text -> vector; store's are reused

What is pooled, exactly: the text is tokenized on its own (`tok.encode`: no chat template, no
special tokens, no BOS), cut to its first `seq_len` tokens, and run through the model in one
causal pass; the embedding is the unweighted mean, over those tokens, of the final hidden state
(the output of the last decoder layer after the final RMSNorm, the vector the LM head reads).
Padding never enters the mean. A text with no tokens (the empty string) has the zero vector,
and its cosine with anything is defined as 0.

The model is used frozen and is meant to be the same for every evaluated model (the default
base model), so that the scores of two evaluated models are comparable.
"""
from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from semloss_jax.models.generation import bucket_length
from semloss_jax.models.llama import LlamaConfig, forward

DEFAULT_SEQ_LEN = 512
DEFAULT_BATCH = 8


class TextEmbedder(NamedTuple):
    """A frozen model that embeds texts: params, config, tokenizer and a name for reports."""

    params: Any
    cfg: LlamaConfig
    tok: Any
    name: str


@functools.cache
def _pooled_fn():
    """The jitted masked mean of the final hidden states (built on first use)."""
    @functools.partial(jax.jit, static_argnames=("cfg",))
    def pooled(params, cfg, input_ids, segment_ids):
        h = forward(params, cfg, input_ids, segment_ids=segment_ids, return_hidden=True)
        m = (segment_ids > 0)[..., None]
        s = jnp.where(m, h.astype(jnp.float32), 0.0).sum(axis=1)
        return s / jnp.maximum(m.sum(axis=1), 1)

    return pooled


def embed_texts(emb: TextEmbedder, texts: Sequence[str], *, seq_len: int = DEFAULT_SEQ_LEN,
                batch_size: int = DEFAULT_BATCH, progress=None) -> tuple[np.ndarray, np.ndarray]:
    """Mean-pooled final hidden states of each text (see the module docstring) and the number
    of tokens pooled; texts are batched by length (right padding to a power-of-two bucket, so a
    few shapes compile)."""
    ids = [emb.tok.encode(t)[:seq_len] if t else [] for t in texts]
    out = np.zeros((len(texts), emb.cfg.hidden_size), np.float64)
    n_tok = np.array([len(x) for x in ids], np.int64)
    order = [i for i in np.argsort(n_tok, kind="stable") if n_tok[i] > 0]
    pooled = _pooled_fn()
    for s in range(0, len(order), batch_size):
        rows = order[s:s + batch_size]
        T = min(bucket_length(int(max(n_tok[i] for i in rows))), max(seq_len, 1))
        x = np.full((batch_size, T), emb.tok.pad_id, np.int32)
        seg = np.zeros((batch_size, T), np.int32)
        for j, i in enumerate(rows):
            x[j, :n_tok[i]] = ids[i]
            seg[j, :n_tok[i]] = 1
        vec = np.asarray(pooled(emb.params, emb.cfg, jnp.asarray(x), jnp.asarray(seg)), np.float64)
        out[rows] = vec[:len(rows)]
        if progress is not None:
            progress.update(len(rows))
    return out, n_tok


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of a, b [N, d]; 0 where either row is the zero vector."""
    na = np.linalg.norm(a, axis=-1)
    nb = np.linalg.norm(b, axis=-1)
    den = na * nb
    dots = (a * b).sum(-1)
    return np.where(den > 0, dots / np.where(den > 0, den, 1.0), 0.0)


def embed_unique(emb: TextEmbedder, texts: Sequence[str], *,
                 known: Mapping[str, np.ndarray] | None = None, seq_len: int = DEFAULT_SEQ_LEN,
                 batch_size: int = DEFAULT_BATCH, progress=None) -> dict[str, np.ndarray]:
    """The vector of each distinct text of texts, keyed by text: known's vector where known
    has the text (a store of texts embedded before by the same embedder), the others embedded
    now, each once. progress: a tqdm bar, reset to the number of texts embedded now."""
    known = known or {}
    distinct = list(dict.fromkeys(texts))
    new = [t for t in distinct if t not in known]
    if progress is not None:
        progress.reset(total=len(new))
    vecs, _ = embed_texts(emb, new, seq_len=seq_len, batch_size=batch_size, progress=progress)
    now = dict(zip(new, vecs))
    return {t: now[t] if t in now else known[t] for t in distinct}


def cosines_of(vectors: Mapping[str, np.ndarray], a: Sequence[str], b: Sequence[str]
               ) -> np.ndarray:
    """Cosine of each pair (a[i], b[i]) of texts, from their vectors ([N])."""
    if len(a) != len(b):
        raise ValueError(f"{len(a)} replies but {len(b)} references")
    if not a:
        return np.zeros(0, np.float64)
    return cosine_rows(np.stack([vectors[t] for t in a]), np.stack([vectors[t] for t in b]))


def pair_cosines(emb: TextEmbedder, replies: Sequence[str], references: Sequence[str], *,
                 known: Mapping[str, np.ndarray] | None = None, seq_len: int = DEFAULT_SEQ_LEN,
                 batch_size: int = DEFAULT_BATCH, progress=None) -> np.ndarray:
    """Cosine between the embeddings of each reply and its reference ([N]); the texts are
    embedded together, each distinct text once (none that known has: see embed_unique)."""
    if len(replies) != len(references):
        raise ValueError(f"{len(replies)} replies but {len(references)} references")
    vectors = embed_unique(emb, [*replies, *references], known=known, seq_len=seq_len,
                           batch_size=batch_size, progress=progress)
    return cosines_of(vectors, replies, references)
