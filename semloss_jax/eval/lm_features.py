"""A frozen causal LM's view of a reply: mean-pooled hidden states of the reply given the prompt.

    fx = LMFeaturizer.from_model(loaded_model)          # e.g. the default SmolLM2-135M-Instruct
    X = fx.features(prompts, replies)                   # [N, len(LAYERS) * hidden_size] float32

What is pooled, exactly: the chat-templated prompt (its last `prompt_tokens` tokens) followed by
the reply (its first `reply_tokens` tokens, then the template's end-of-turn text) is run through
the model in one causal pass; each layer's feature is the unweighted mean, over the reply tokens
only, of that layer's hidden state passed through the model's final RMSNorm (one pass through
the stack, models.llama.hidden_at_layers). Layers: "mid" is the output of decoder layer
num_hidden_layers // 2, "last" that of the last decoder layer. The 128-token window (40 + 88)
covers every own-output reply (at most 96 new tokens) almost whole; longer replies are judged
on their opening.
An empty reply still has its end-of-turn tokens, so every row has at least one pooled token.

Features are cached on disk, one .npy per row, under
cache_dir()/judge_features/<key>/<sha256 of prompt and reply>.npy, where key covers the model
fingerprint (parameters, architecture, chat template), the token limits, the layers and
FEATURE_VERSION: a second call computes nothing.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from semloss_jax.models.generation import bucket_length
from semloss_jax.models.llama import LlamaConfig, hidden_at_layers
from semloss_jax.paths import atomic_write_bytes, cache_dir

FEATURE_VERSION = "reply-mean-pool-v1"
LAYERS = ("mid", "last")


@dataclass(frozen=True)
class FeatureSpec:
    """Token limits of the featurized text: the prompt's last tokens, the reply's first."""

    prompt_tokens: int = 40
    reply_tokens: int = 88
    batch_size: int = 8


def feature_layers(cfg: LlamaConfig) -> tuple[int, ...]:
    """The 1-based decoder layers pooled, in LAYERS order: the middle one and the last one."""
    return (max(1, cfg.num_hidden_layers // 2), cfg.num_hidden_layers)


@functools.cache
def _pooled_fn():
    """The jitted reply-token means of the listed layers' hidden states (built on first use)."""
    @functools.partial(jax.jit, static_argnames=("cfg", "layers"))
    def pooled(params, cfg, layers, input_ids, segment_ids, pool_mask):
        h = hidden_at_layers(params, cfg, input_ids, layers, segment_ids=segment_ids)
        m = pool_mask[None, ..., None].astype(jnp.float32)
        mean = (h.astype(jnp.float32) * m).sum(axis=2) / jnp.maximum(m.sum(axis=2), 1.0)
        return jnp.concatenate(list(mean), axis=-1)  # [B, len(layers) * d]

    return pooled


def encode_pair(tok, prompt: str, reply: str, spec: FeatureSpec) -> tuple[list[int], int]:
    """(token ids of prompt then reply, number of prompt tokens) within the spec's limits."""
    p = tok.prompt_ids(prompt)[-spec.prompt_tokens:]
    r = tok.response_ids(reply)[:spec.reply_tokens]
    return p + r, len(p)


def _batch_arrays(encoded, rows, T: int, batch_size: int, pad_id: int):
    x = np.full((batch_size, T), pad_id, np.int32)
    seg = np.zeros((batch_size, T), np.int32)
    pool = np.zeros((batch_size, T), np.int32)
    for j, i in enumerate(rows):
        ids, n_p = encoded[i]
        x[j, :len(ids)] = ids
        seg[j, :len(ids)] = 1
        pool[j, n_p:len(ids)] = 1
    return jnp.asarray(x), jnp.asarray(seg), jnp.asarray(pool)


def pooled_features(params, cfg: LlamaConfig, tok, prompts: Sequence[str],
                    replies: Sequence[str], spec: FeatureSpec, progress=None) -> np.ndarray:
    """[N, len(LAYERS) * d] float32: the reply-token means of the feature layers' hidden
    states; rows batched by length (power-of-two buckets: few compiles)."""
    encoded = [encode_pair(tok, p, r, spec) for p, r in zip(prompts, replies)]
    layers = feature_layers(cfg)
    out = np.zeros((len(encoded), len(layers) * cfg.hidden_size), np.float32)
    order = np.argsort([len(e[0]) for e in encoded], kind="stable")
    pooled = _pooled_fn()
    for s in range(0, len(order), spec.batch_size):
        rows = [int(i) for i in order[s:s + spec.batch_size]]
        T = bucket_length(max(len(encoded[i][0]) for i in rows))
        x, seg, pool = _batch_arrays(encoded, rows, T, spec.batch_size, tok.pad_id)
        out[rows] = np.asarray(pooled(params, cfg, layers, x, seg, pool))[:len(rows)]
        if progress is not None:
            progress.update(len(rows))
    return out


def row_key(prompt: str, reply: str) -> str:
    """The cache file name of one (prompt, reply) pair."""
    return hashlib.sha256(json.dumps([prompt, reply], ensure_ascii=False).encode()).hexdigest()


class LMFeaturizer:
    """Cached reply features from one frozen model (see the module docstring)."""

    def __init__(self, params, cfg: LlamaConfig, tok, model_hash: str,
                 spec: FeatureSpec = FeatureSpec(), root: Path | None = None):
        self.params = params
        self.tok, self.spec, self.cfg = tok, spec, cfg
        key = json.dumps([FEATURE_VERSION, model_hash, dataclasses.asdict(spec), LAYERS])
        self.key = hashlib.sha256(key.encode()).hexdigest()[:16]
        self.dir = Path(root or cache_dir() / "judge_features") / self.key

    @classmethod
    def from_model(cls, loaded, spec: FeatureSpec = FeatureSpec(), root: Path | None = None):
        """From a models.loading.LoadedModel; its fingerprint keys the cache."""
        from semloss_jax.eval.evaluate import model_fingerprint  # lazy: evaluate imports this module
        mh = model_fingerprint(loaded.params, loaded.cfg, loaded.tok)
        return cls(loaded.params, loaded.cfg, loaded.tok, mh, spec, root)

    @property
    def dim(self) -> int:
        """Feature width: len(LAYERS) * hidden_size."""
        return len(LAYERS) * self.cfg.hidden_size

    def features(self, prompts: Sequence[str], replies: Sequence[str],
                 progress: bool = True) -> np.ndarray:
        """[N, dim] float32 features; only rows missing from the cache are computed."""
        if len(prompts) != len(replies):
            raise ValueError(f"{len(prompts)} prompts but {len(replies)} replies")
        keys = [row_key(p, r) for p, r in zip(prompts, replies)]
        out = np.zeros((len(keys), self.dim), np.float32)
        missing = []
        for i, k in enumerate(keys):
            f = self.dir / f"{k}.npy"
            if f.exists():
                out[i] = np.load(f)
            else:
                missing.append(i)
        todo = list({keys[i]: i for i in missing}.values())  # each distinct row once
        step = 64  # rows computed between cache writes: an interrupted run resumes
        with tqdm(total=len(todo), desc="LM features", unit="row", disable=not (progress and todo),
                  file=sys.stderr) as bar:
            for s in range(0, len(todo), step):
                chunk = todo[s:s + step]
                X = pooled_features(self.params, self.cfg, self.tok, [prompts[i] for i in chunk],
                                    [replies[i] for i in chunk], self.spec, progress=bar)
                for i, v in zip(chunk, X):
                    buf = io.BytesIO()
                    np.save(buf, v)
                    atomic_write_bytes(self.dir / f"{keys[i]}.npy", buf.getvalue())
        for i in missing:  # the rows computed now, and their duplicates
            out[i] = np.load(self.dir / f"{keys[i]}.npy")
        return out
