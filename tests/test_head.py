"""semloss_jax.loss.head (the tiled loss head): statistics and gradients equal to materialized logits,
finite differences, the objective's sums tiled vs untiled, and no [tokens, V] array in the step."""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numeric import central_differences

from semloss_jax.errors import ConfigError, LossError
from semloss_jax.loss import cost, head
from semloss_jax.loss import objective as ob
from semloss_jax.models import llama as model_lib
from semloss_jax.train import optim
from semloss_jax.train import step as step_lib


def _case(seed, N=24, d=16, V=203, e=8, scale=1.0):
    rng = np.random.default_rng(seed)
    h = jnp.asarray(rng.normal(size=(N, d)) * scale, jnp.float32)
    W = jnp.asarray(rng.normal(size=(d, V)), jnp.float32)
    E = rng.normal(size=(V, e))
    E_hat = jnp.asarray(E / np.linalg.norm(E, axis=-1, keepdims=True), jnp.float32)
    y = jnp.asarray(rng.integers(0, V, N), jnp.int32)
    cot = tuple(jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((N,), (N,), (N, e)))
    return h, W, E_hat, y, cot


def _scalar(stats_fn, cot):
    def f(h, W):
        lse, zy, mu = stats_fn(h, W)
        out = jnp.sum(lse * cot[0]) + jnp.sum(zy * cot[1])
        return out if mu is None else out + jnp.sum(mu * cot[2])
    return f


def _untiled(h, W, y, E_hat):
    return head.untiled_stats(h, W, y, E_hat)


def _tiled(h, W, y, E_hat, vocab_tile, token_tile=0):
    return head.head_stats(h, W, y, E_hat, vocab_tile=vocab_tile, token_tile=token_tile)


def test_vocab_tiling_divides_or_pads():
    assert head.vocab_tiling(49152, 8192) == (6, 8192)
    assert head.vocab_tiling(128256, 8192) == (16, 8016)      # 16 divides 128256: no padding
    assert head.vocab_tiling(32000, 8192) == (4, 8000)
    n, t = head.vocab_tiling(211, 64)                           # 211 is prime: padded tiles
    assert n * t >= 211 and n * t - 211 < n and (n, t) == (4, 53)
    assert head.vocab_tiling(100, 1000) == (1, 100)


@pytest.mark.parametrize("tile,token_tile,V", [(64, 8, 203), (64, 0, 211), (7, 6, 211), (1000, 0, 203)])
def test_stats_and_gradients_equal_materialized_logits(tile, token_tile, V):
    """lse, the target logit and μ(p), and their VJPs, equal the untiled head within 1e-5 (fp32),
    with and without padding (V = 211 prime) and token chunks."""
    for seed, scale in ((0, 1.0), (1, 20.0)):   # peaked rows (large logits) included
        h, W, E_hat, y, cot = _case(seed, V=V, scale=scale)
        ref = head.untiled_stats(h, W, y, E_hat)
        got = head.head_stats(h, W, y, E_hat, vocab_tile=tile, token_tile=token_tile)
        for a, b in zip(ref, got):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, rtol=1e-5)
        untiled = functools.partial(_untiled, y=y, E_hat=E_hat)
        tiled = functools.partial(_tiled, y=y, E_hat=E_hat, vocab_tile=tile, token_tile=token_tile)
        g_ref = jax.grad(_scalar(untiled, cot), (0, 1))(h, W)
        g_got = jax.jit(jax.grad(_scalar(tiled, cot), (0, 1)))(h, W)
        for a, b in zip(g_ref, g_got):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5 * scale, rtol=1e-5)
    # without Ê: no μ, same lse / zy and gradients
    got = head.head_stats(h, W, y, None, vocab_tile=tile, token_tile=token_tile)
    assert got[2] is None
    np.testing.assert_allclose(got[0], ref[0], atol=1e-4, rtol=1e-5)


def test_gradients_match_finite_differences():
    """The custom VJP against central differences of the tiled forward itself (float64)."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(5)
        N, d, V, e = 3, 4, 11, 3
        h = jnp.asarray(rng.normal(size=(N, d)))
        W = jnp.asarray(rng.normal(size=(d, V)))
        E = rng.normal(size=(V, e))
        E_hat = jnp.asarray(E / np.linalg.norm(E, axis=-1, keepdims=True))
        y = jnp.asarray(rng.integers(0, V, N), jnp.int32)
        cot = tuple(jnp.asarray(rng.normal(size=s)) for s in ((N,), (N,), (N, e)))
        f = jax.jit(_scalar(lambda h, W: head.head_stats(h, W, y, E_hat, vocab_tile=4), cot))
        gh, gW = jax.grad(f, (0, 1))(h, W)
        assert float(jnp.abs(gW).max()) > 1e-3
        eps = 1e-6
        for which, x, g in (("h", h, gh), ("W", W, gW)):
            num = central_differences((lambda v: f(v, W)) if which == "h" else (lambda v: f(h, v)), x, eps)
            np.testing.assert_allclose(np.asarray(g).ravel(), num, atol=1e-7, rtol=1e-6, err_msg=which)


V, D = 300, 32


def _tiny():
    cfg = model_lib.tiny_config(vocab_size=V, hidden_size=D, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    params = model_lib.init_params(cfg, jax.random.PRNGKey(0))
    params = dict(params, lm_head={"kernel": params["lm_head"]["kernel"] * 30.0})  # peaked
    return cfg, params, cost.unit_embeddings(model_lib.embedding_matrix(params))


def _batch(rng, B, T, pad_tail=0):
    seg = np.ones((B, T), np.int32)
    seg[:, T - pad_tail:] = 0 if pad_tail else 1
    return dict(input_ids=rng.integers(0, V, (B, T)).astype(np.int32),
                targets=np.where(seg != 0, rng.integers(0, V, (B, T)), -100).astype(np.int32),
                loss_mask=((rng.random((B, T)) < 0.7) & (seg != 0)).astype(np.float32),
                positions=np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy(), segment_ids=seg)


OBJECTIVES = [
    ob.ObjectiveConfig(kind="sft", lam=0.0),
    ob.ObjectiveConfig(kind="tasft", lam=0.7, divergence="lower_bound"),
    ob.ObjectiveConfig(kind="tasft", lam=0.7, divergence="exact_onehot"),
    ob.ObjectiveConfig(kind="tasft", lam=0.7, divergence="upper_bound", target="soft"),
    ob.ObjectiveConfig(kind="nll_ascent", lam=0.3, nll_clip=4.0),
    ob.ObjectiveConfig(kind="unlikelihood", lam=0.5),
]


@pytest.mark.parametrize("obj", OBJECTIVES, ids=lambda o: f"{o.kind}-{o.divergence}-{o.target}")
def test_objective_sums_tiled_equal_logits(obj):
    """Every sum, the loss and its gradient w.r.t. the hidden states and the head: tiled (with
    padded tiles and token chunks) == the materialized logits of sums_from_logits."""
    rng = np.random.default_rng(2)
    d = 16
    benign, harmful = _batch(rng, 3, 10, pad_tail=2), _batch(rng, 2, 10, pad_tail=3)
    E = rng.normal(size=(V, d))
    E_hat = jnp.asarray(E / np.linalg.norm(E, axis=-1, keepdims=True), jnp.float32)
    q = rng.dirichlet(np.full(V, 0.3), size=(2, 10))
    harmful["target_mu"] = (q @ np.asarray(E_hat)).astype(np.float32)
    hb, hh = (jnp.asarray(rng.normal(size=(n, 10, d)), jnp.float32) for n in (3, 2))
    W = jnp.asarray(rng.normal(size=(d, V)) * 2.0, jnp.float32)
    counts = ob.global_counts(benign, harmful)

    def loss(fn):
        def f(hb, hh, W):
            sums = fn(hb, hh, W)
            return ob.combine(sums, counts, obj), sums
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))

    (l0, s0), g0 = loss(lambda hb, hh, W: ob.sums_from_logits(
        model_lib.lm_logits(hb, W), benign, model_lib.lm_logits(hh, W), harmful, E_hat, obj))(hb, hh, W)
    (l1, s1), g1 = loss(lambda hb, hh, W: ob.sums_from_hidden(
        hb, benign, hh, harmful, W, E_hat, dataclasses.replace(obj, token_tile=5), 64))(hb, hh, W)
    assert set(s0) == set(s1)
    for k in s0:
        np.testing.assert_allclose(float(s1[k]), float(s0[k]), rtol=1e-5, atol=1e-5, err_msg=k)
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-5, atol=1e-5)
    assert max(float(jnp.abs(g).max()) for g in g0) > 1e-3
    for a, b in zip(g0, g1):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, rtol=1e-4)


def test_loss_sums_tiled_equal_untiled_through_the_model():
    """loss_sums end to end (one forward of benign + harmful rows): the TA-SFT loss and the
    gradient w.r.t. every param are the same with the head tiled or not."""
    cfg, params, E_hat = _tiny()
    rng = np.random.default_rng(4)
    benign, harmful = _batch(rng, 2, 8, pad_tail=2), _batch(rng, 2, 8, pad_tail=1)
    counts = ob.global_counts(benign, harmful)

    def run(o):
        def loss(p):
            return ob.combine(ob.loss_sums(p, cfg, benign, harmful, E_hat, o), counts, o)
        return jax.jit(jax.value_and_grad(loss))(params)

    obj = ob.ObjectiveConfig(kind="tasft", lam=0.7)
    l0, g0 = run(dataclasses.replace(obj, vocab_tile=0))
    l1, g1 = run(dataclasses.replace(obj, vocab_tile=64))
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g1)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, rtol=1e-4)


def test_head_tile_config():
    assert ob.ObjectiveConfig().head_tile(49152) == ob.AUTO_TILE
    assert ob.ObjectiveConfig().head_tile(256) == 0
    assert ob.ObjectiveConfig(vocab_tile=0).head_tile(128256) == 0
    assert ob.ObjectiveConfig(vocab_tile=4096).head_tile(256) == 4096
    for kw, key in ((dict(vocab_tile=-2), "vocab_tile"), (dict(token_tile=-1), "token_tile"),
                    (dict(vocab_tile=1.5), "vocab_tile")):
        with pytest.raises(ConfigError, match=rf"objective\.{key}"):
            ob.ObjectiveConfig(**kw).validate()
    # the Gelbrich divergence's covariance term needs the full distributions: never tiled
    assert ob.ObjectiveConfig(divergence="gelbrich").head_tile(128256) == 0
    with pytest.raises(ConfigError, match=r"objective\.vocab_tile.*gelbrich"):
        ob.ObjectiveConfig(divergence="gelbrich", vocab_tile=4096).validate()


def test_gelbrich_from_tiled_statistics_is_an_error():
    """harmful_from_stats without the distributions (what the tiled head gives) cannot compute the
    Gelbrich divergence: a LossError, never a silent lower bound."""
    E_hat = cost.unit_embeddings(jax.random.normal(jax.random.PRNGKey(0), (32, 8)))
    batch = {"input_ids": jnp.zeros((1, 4), jnp.int32), "targets": jnp.ones((1, 4), jnp.int32),
             "loss_mask": jnp.ones((1, 4), jnp.int32)}
    mu_p = jnp.tile(E_hat[:1], (1, 4, 1))
    with pytest.raises(LossError, match="vocab_tile=0"):
        ob.harmful_from_stats(jnp.zeros((1, 4)), mu_p, batch, E_hat,
                              ob.ObjectiveConfig(divergence="gelbrich"))


@pytest.mark.slow
@pytest.mark.real_model
def test_real_model_tiled_equals_untiled(real_model, real_tokenizer):
    """The real SmolLM2 (V = 49,152) on a real chat: the tiled head's CE, bounds and gradient
    w.r.t. the final hidden states and the head equal the materialized logits'."""
    cfg, params = real_model
    ids = real_tokenizer.prompt_ids("What is the capital of France?", None)
    ids = jnp.asarray(list(ids)[:24], jnp.int32)[None]
    h = model_lib.forward(params, cfg, ids, return_hidden=True)[0]
    W = model_lib.lm_head_matrix(params, cfg)
    E_hat = cost.unit_embeddings(model_lib.embedding_matrix(params))
    y = jnp.roll(ids[0], -1)
    rng = np.random.default_rng(0)
    cot = tuple(jnp.asarray(rng.normal(size=s), jnp.float32)
                for s in ((h.shape[0],), (h.shape[0],), (h.shape[0], cfg.hidden_size)))
    ref = head.untiled_stats(h, W, y, E_hat)
    got = head.head_stats(h, W, y, E_hat, vocab_tile=8192)
    for a, b in zip(ref, got):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, rtol=1e-5)
    g_ref = jax.jit(jax.grad(_scalar(lambda h, W: head.untiled_stats(h, W, y, E_hat), cot), (0, 1)))(h, W)
    g_got = jax.jit(jax.grad(_scalar(lambda h, W: head.head_stats(h, W, y, E_hat, vocab_tile=8192), cot),
                             (0, 1)))(h, W)
    for a, b in zip(g_ref, g_got):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5, rtol=1e-4)


def _max_size(jaxpr) -> int:
    sizes = []

    def walk(jp):
        for eqn in jp.eqns:
            for v in list(eqn.invars) + list(eqn.outvars):
                if hasattr(getattr(v, "aval", None), "shape"):
                    sizes.append(int(np.prod(v.aval.shape)))
            for p in eqn.params.values():
                for sub in (p if isinstance(p, (list, tuple)) else [p]):
                    if hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
                        walk(sub.jaxpr)
                    elif hasattr(sub, "eqns"):
                        walk(sub)
                    elif hasattr(sub, "fun_jaxpr"):
                        walk(sub.fun_jaxpr.jaxpr)
    walk(jaxpr.jaxpr)
    return max(sizes)


@pytest.mark.parametrize("vocab_tile,expect_logits", [(0, True), (4096, False)])
def test_train_step_has_no_token_by_vocab_array(vocab_tile, expect_logits):
    """With the tiled head nothing in the train step (forward, backward, custom VJP included) is
    as large as [tokens, V]; with materialized logits the same check finds them."""
    v, d = 32768, 8
    cfg = model_lib.tiny_config(vocab_size=v, hidden_size=d, intermediate_size=16, num_hidden_layers=1,
                                num_attention_heads=1, num_key_value_heads=1, head_dim=8,
                                tie_word_embeddings=True)
    ocfg = optim.OptimConfig(trainable="all", grad_accum=1)
    opt = optim.make_optimizer(ocfg)
    params = model_lib.abstract_params(cfg)
    state = jax.eval_shape(lambda k: step_lib.init_train_state(
        jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), params), cfg, ocfg, opt, k),
        jax.random.PRNGKey(0))
    B, T = 2, 16
    i32 = jax.ShapeDtypeStruct((1, B, T), jnp.int32)
    batch = dict(input_ids=i32, targets=i32, loss_mask=jax.ShapeDtypeStruct((1, B, T), jnp.float32),
                 positions=i32, segment_ids=i32)
    obj = ob.ObjectiveConfig(kind="tasft", lam=1.0, vocab_tile=vocab_tile)
    step = step_lib.make_train_step(cfg, obj, ocfg, opt)
    jp = jax.make_jaxpr(step)(state, batch, batch, jax.ShapeDtypeStruct((v, d), jnp.float32))
    biggest = _max_size(jp)
    assert (biggest >= B * T * v) == expect_logits, biggest
