"""The LM head's per-token statistics in vocabulary tiles: no [tokens, V] array, forward or backward.

For final hidden states h [N, d], the head W [d, V] (logits z = h W, float32 accumulation) and
the frozen unit embeddings Ê [V, e] (cost.unit_embeddings):

    lse_n = log Σ_v exp(z_nv)           log p_n(y) = z_ny - lse_n   (CE, NLL, unlikelihood)
    zy_n  = z_n,y_n                     the target's logit
    μ_n   = Σ_v softmax(z_n)_v ê_v      μ(p) of METHOD.md (emd.mean_embedding of the logits)

μ(p) is one-query attention with keys W and values Ê, so one online softmax over the tiles
gives lse and μ together: per tile, the running max m, sum s and the unnormalized mean
(emd.mean_embedding_from_probs of the tile's exp(z - m)) are rescaled and accumulated. The
backward (custom VJP) recomputes each tile's logits from h and W:

    dz_nv = p_nv (g_lse_n + g_μ_n·ê_v - g_μ_n·μ_n) + g_zy_n [v = y_n],    dh = dz Wᵀ,  dW = hᵀ dz

Tiles are strided (tile k holds the columns v = i·n + k), so a vocabulary axis sharded in
contiguous blocks keeps every tile spread over the same devices; V is padded with masked
columns when no tile count near V / tile divides it. Optionally the tokens are processed in
chunks of `token_tile` as well, bounding the live [tokens, tile] buffers.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from semloss_jax.loss import emd
from semloss_jax.models.axes import constrain

_PREC = jax.lax.Precision.HIGHEST


class Tiling(NamedTuple):
    """Static layout of a tiled head: n tiles of t columns over a vocabulary of V (n t >= V)."""

    V: int
    n: int
    t: int
    token_tile: int     # tokens per chunk (0 = all tokens at once)
    want_mu: bool


def vocab_tiling(V: int, tile: int) -> tuple[int, int]:
    """(number of tiles n, columns per tile t): the first n from ceil(V / tile) up to twice that
    which divides V exactly (no padding); otherwise ceil(V / tile) tiles, the last columns padded."""
    n0 = max(1, -(-V // max(1, tile)))
    for n in range(n0, 2 * n0 + 1):
        if V % n == 0:
            return n, V // n
    return n0, -(-V // n0)


def _tiles(W: jax.Array, E_hat: jax.Array | None, tl: Tiling):
    """W [d, V] -> [n, d, t]; Ê [V, e] -> [n, t, e] (tile k = columns i·n + k), zero-padded."""
    pad = tl.n * tl.t - tl.V
    if pad:
        W = jnp.pad(W, ((0, 0), (0, pad)))
        E_hat = None if E_hat is None else jnp.pad(E_hat, ((0, pad), (0, 0)))
    d = W.shape[0]
    W3 = jnp.transpose(W.reshape(d, tl.t, tl.n), (2, 0, 1))
    E3 = None if E_hat is None else jnp.transpose(E_hat.reshape(tl.t, tl.n, -1), (1, 0, 2))
    return W3, E3


def _columns(tl: Tiling, k: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    """The vocabulary ids of tile k [t] and whether each is a real column (None: no padding)."""
    ids = jnp.arange(tl.t, dtype=jnp.int32) * tl.n + k
    return ids, (ids < tl.V) if tl.n * tl.t > tl.V else None


def _n_chunks(tl: Tiling, N: int) -> int:
    """How many token chunks of tl.token_tile rows (1 = no chunking: off, or not a divisor of N)."""
    c = tl.token_tile
    return 1 if c <= 0 or c >= N or N % c else N // c


def _split(a: jax.Array, chunks: int) -> jax.Array:
    return a.reshape(chunks, a.shape[0] // chunks, *a.shape[1:])


def _chunked(fn, tl: Tiling, *arrays):
    """Apply fn to token chunks of every array (leading axis N); the results concatenated back."""
    N = arrays[0].shape[0]
    C = _n_chunks(tl, N)
    if C == 1:
        return fn(*arrays)
    out = jax.lax.map(lambda xs: fn(*xs), tuple(_split(a, C) for a in arrays))
    return jax.tree_util.tree_map(lambda a: a.reshape(N, *a.shape[2:]), out)


def _acc(x) -> jnp.dtype:
    """The accumulation dtype: float32 (float64 for float64 inputs, under x64 in tests)."""
    return jnp.promote_types(x.dtype, jnp.float32)


def _tile_logits(h, w, tl, k):
    z = constrain(jnp.einsum("nd,dt->nt", h, w, preferred_element_type=_acc(h)), ("batch", "vocab"))
    ids, valid = _columns(tl, k)
    if valid is not None:
        z = jnp.where(valid, z, -jnp.inf)
    return z, ids


def _forward(h, W3, E3, y, tl: Tiling):
    """The online softmax over the tiles: (lse [N], zy [N], μ [N, e] or None)."""
    N = h.shape[0]
    e = 0 if E3 is None else E3.shape[-1]

    def tile(carry, xs):
        k, w, ek = xs

        def chunk(hc, yc, m, s, zy, acc):
            z, ids = _tile_logits(hc, w, tl, k)
            m_new = jnp.maximum(m, jnp.max(z, axis=-1))
            scale = jnp.exp(m - m_new)
            p = jnp.exp(z - m_new[:, None])
            zy = zy + jnp.sum(jnp.where(ids == yc[:, None], z, 0.0), axis=-1)
            if tl.want_mu:
                acc = acc * scale[:, None] + emd.mean_embedding_from_probs(p, ek)
            return m_new, s * scale + jnp.sum(p, axis=-1), zy, acc

        return _chunked(chunk, tl, h, y, *carry), None

    f = _acc(h)
    init = (jnp.full((N,), -jnp.inf, f), jnp.zeros((N,), f), jnp.zeros((N,), f), jnp.zeros((N, e), f))
    xs = (jnp.arange(tl.n, dtype=jnp.int32), W3, E3 if tl.want_mu else jnp.zeros((tl.n, 0, 0), W3.dtype))
    (m, s, zy, acc), _ = jax.lax.scan(tile, init, xs)
    lse = m + jnp.log(s)
    return lse, zy, (acc / s[:, None] if tl.want_mu else None)


def _backward(h, W3, E3, y, lse, mu, g_lse, g_zy, g_mu, tl: Tiling):
    """(dh, dW3) of the tiled statistics for the cotangents g_lse, g_zy, g_μ (see the module doc)."""
    c = g_lse if mu is None else g_lse - jnp.sum(g_mu * mu, axis=-1)
    g_mu = jnp.zeros((h.shape[0], 0), _acc(h)) if mu is None else g_mu

    def tile(dh, xs):
        k, w, ek = xs

        def chunk(hc, yc, lsec, cc, gzc, gmc):
            z, ids = _tile_logits(hc, w, tl, k)
            p = jnp.exp(z - lsec[:, None])
            coef = cc[:, None]
            if tl.want_mu:
                coef = coef + jnp.einsum("ne,te->nt", gmc, ek, precision=_PREC)
            dz = p * coef + jnp.where(ids == yc[:, None], gzc[:, None], 0.0)
            dz = constrain(dz, ("batch", "vocab")).astype(hc.dtype)
            dhc = jnp.einsum("nt,dt->nd", dz, w, preferred_element_type=_acc(hc))
            dwc = jnp.einsum("nd,nt->dt", hc, dz, preferred_element_type=_acc(hc))
            return dhc, dwc

        C = _n_chunks(tl, h.shape[0])
        if C == 1:
            dht, dw = chunk(h, y, lse, c, g_zy, g_mu)
        else:  # token chunks: the tile's dW summed over the chunks, dh chunk by chunk
            def step(dw_acc, xs):
                dhc, dwc = chunk(*xs)
                return dw_acc + dwc, dhc

            dw0 = jnp.zeros((h.shape[1], tl.t), _acc(h))
            dw, dht = jax.lax.scan(step, dw0, tuple(_split(a, C) for a in (h, y, lse, c, g_zy, g_mu)))
            dht = dht.reshape(h.shape)
        return dh + dht, dw

    xs = (jnp.arange(tl.n, dtype=jnp.int32), W3, E3 if tl.want_mu else jnp.zeros((tl.n, 0, 0), W3.dtype))
    dh, dW3 = jax.lax.scan(tile, jnp.zeros(h.shape, _acc(h)), xs)
    return dh.astype(h.dtype), dW3.astype(W3.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _stats(h, W3, E3, y, tl: Tiling):
    return _forward(h, W3, E3, y, tl)


def _stats_fwd(h, W3, E3, y, tl: Tiling):
    lse, zy, mu = _forward(h, W3, E3, y, tl)
    return (lse, zy, mu), (h, W3, E3, y, lse, mu)


def _stats_bwd(tl: Tiling, res, g):
    h, W3, E3, y, lse, mu = res
    g_lse, g_zy, g_mu = g
    dh, dW3 = _backward(h, W3, E3, y, lse, mu, g_lse, g_zy, g_mu, tl)
    return dh, dW3, None if E3 is None else jnp.zeros_like(E3), None


_stats.defvjp(_stats_fwd, _stats_bwd)


def head_stats(h: jax.Array, W: jax.Array, targets: jax.Array, E_hat: jax.Array | None, *,
               vocab_tile: int, token_tile: int = 0) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """(lse [...], zy [...], μ [..., e] or None without Ê) for hidden states h [..., d].

    W [d, V] is the head in the compute dtype; targets [...] are valid token ids (replace masked
    ones by 0 first); Ê [V, e] gets no gradient. vocab_tile: columns per tile (about);
    token_tile: tokens per chunk (0 = all).
    """
    lead, d = h.shape[:-1], h.shape[-1]
    V = W.shape[1]
    n, t = vocab_tiling(V, vocab_tile)
    tl = Tiling(V, n, t, int(token_tile), E_hat is not None)
    hf = constrain(h.reshape(-1, d), ("batch", "embed"))
    y = targets.reshape(-1).astype(jnp.int32)
    E = None if E_hat is None else jax.lax.stop_gradient(
        E_hat.astype(jnp.promote_types(E_hat.dtype, jnp.float32)))
    W3, E3 = _tiles(W, E, tl)
    lse, zy, mu = _stats(hf, W3, E3, y, tl)
    mu = None if mu is None else mu.reshape(*lead, mu.shape[-1])
    return lse.reshape(lead), zy.reshape(lead), mu


def untiled_stats(h: jax.Array, W: jax.Array, targets: jax.Array, E_hat: jax.Array | None):
    """The same statistics from materialized logits [..., V] (the reference for tests)."""
    z = jnp.einsum("...d,dv->...v", h, W, preferred_element_type=_acc(h))
    lse = jax.nn.logsumexp(z, axis=-1)
    zy = jnp.take_along_axis(z, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return lse, zy, None if E_hat is None else emd.mean_embedding(z, E_hat)

