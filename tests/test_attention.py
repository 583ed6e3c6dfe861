"""semloss_jax.models.attention: every kernel against the einsum reference on packed rows with
padding (values at the non-padding queries and gradients), and the model forward per kernel."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semloss_jax.errors import ConfigError
from semloss_jax.models import attention as A
from semloss_jax.models import llama as M


def _packed_segments(B, T, rng):
    """Rows of 1-3 packed segments followed by padding (segment 0)."""
    seg = np.zeros((B, T), np.int32)
    for b in range(B):
        cuts = sorted(rng.choice(np.arange(8, T - 8), size=rng.integers(0, 3), replace=False).tolist())
        end = T - int(rng.integers(0, T // 4))
        bounds = [0, *[c for c in cuts if c < end], end]
        for s, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:]), start=1):
            seg[b, lo:hi] = s
    return seg


def _case(B=2, T=256, H=4, KV=2, hd=32, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(B, T, H, hd)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(B, T, KV, hd)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(B, T, KV, hd)), jnp.float32)
    seg = _packed_segments(B, T, rng)
    slot = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    ctx = {"mask": M.attention_mask_from(slot, jnp.asarray(seg), slot, jnp.asarray(seg)),
           "segment_ids": jnp.asarray(seg)}
    cot = jnp.asarray(rng.normal(size=(B, T, H, hd)), jnp.float32) * (seg != 0)[:, :, None, None]
    return q, k, v, ctx, seg, cot


@pytest.mark.parametrize("impl", ["chunked", "xla", "splash"])
def test_kernels_match_reference_on_packed_rows(impl):
    """Outputs at every non-padding query and the gradients of a loss on those outputs equal the
    reference within 1e-5 (the splash kernel runs interpreted on CPU)."""
    q, k, v, ctx, seg, cot = _case()
    valid = seg != 0
    assert len(np.unique(seg[0])) > 1 or len(np.unique(seg[1])) > 1

    def loss(impl_):
        return lambda q, k, v: jnp.sum(A.attend(q, k, v, ctx, impl_) * cot)

    ref = A.attend(q, k, v, ctx, "reference")
    got = A.attend(q, k, v, ctx, impl)
    np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(ref)[valid], atol=1e-5, rtol=1e-5)
    g_ref = jax.grad(loss("reference"), (0, 1, 2))(q, k, v)
    g_got = jax.jit(jax.grad(loss(impl), (0, 1, 2)))(q, k, v)
    for name, a, b in zip("qkv", g_ref, g_got):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, rtol=1e-4, err_msg=name)


def test_chunked_needs_whole_blocks():
    q, k, v, ctx, seg, _ = _case(T=200)   # 200 % 128 != 0: falls back to the reference itself
    np.testing.assert_array_equal(np.asarray(A.chunked_attention(q, k, v, ctx["mask"])),
                                  np.asarray(A.reference_attention(q, k, v, ctx["mask"])))


def test_auto_is_the_reference_on_cpu_and_unknown_impl_fails():
    assert A.resolve_impl("auto", jnp.float32, 256) == "reference"
    assert A.resolve_impl("xla", jnp.bfloat16, 256) == "xla"
    q, k, v, ctx, _, _ = _case(T=64)
    with pytest.raises(ValueError, match="unknown attention"):
        A.attend(q, k, v, ctx, "flash")
    with pytest.raises(ConfigError, match="attention"):
        M.tiny_config(attention="flash")


@pytest.mark.parametrize("impl", ["chunked", "xla"])
def test_model_forward_per_kernel(impl):
    """The whole model (packed rows, GQA) gives the reference logits at non-padding positions."""
    cfg = M.tiny_config(max_position_embeddings=512)
    params = M.init_params(cfg, jax.random.PRNGKey(0))
    rng = np.random.default_rng(3)
    seg = _packed_segments(2, 256, rng)
    pos = np.zeros_like(seg)
    for b in range(2):
        for s in np.unique(seg[b][seg[b] > 0]):
            idx = np.flatnonzero(seg[b] == s)
            pos[b, idx] = np.arange(len(idx))
    ids = jnp.asarray(rng.integers(0, cfg.vocab_size, seg.shape), jnp.int32)
    ref = M.forward(params, cfg, ids, positions=jnp.asarray(pos), segment_ids=jnp.asarray(seg))
    other = dataclasses.replace(cfg, attention=impl)
    got = jax.jit(lambda p: M.forward(p, other, ids, positions=jnp.asarray(pos),
                                      segment_ids=jnp.asarray(seg)))(params)
    valid = seg != 0
    np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(ref)[valid], atol=1e-4, rtol=1e-4)
