"""Properties of the semantic cost (cost.py) and the per-position EMD math (emd.py).

The exact EMD in these tests comes from the LP (ot_exact.emd_lp, float64 HiGHS) on small V.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads
from numeric import jaxpr_shapes

from semloss_jax.loss import cost, emd
from semloss_jax.loss.ot_exact import emd_lp

TOL = 2e-5  # fp32 bounds vs float64 LP


def _problem(seed: int, V: int, d: int, temp: float, zeros: int = 0):
    """Random unit embeddings Ê [V, d], logits for p, and a distribution q (with `zeros` exact zeros)."""
    rng = np.random.default_rng(seed)
    E_hat = cost.unit_embeddings(rng.normal(size=(V, d)))
    zp = rng.normal(size=V) * temp
    zq = rng.normal(size=V) * temp
    q = np.exp(zq - zq.max())
    q[rng.permutation(V)[:zeros]] = 0.0
    q /= q.sum()
    return E_hat, jnp.asarray(zp, jnp.float32), jnp.asarray(q, jnp.float32)


def _lp(p, q, E_hat):
    C = np.clip(1.0 - np.asarray(E_hat, np.float64) @ np.asarray(E_hat, np.float64).T, 0, 2)
    return emd_lp(np.asarray(p, np.float64), np.asarray(q, np.float64), C)


# ----------------------------------------------------------------------------- cost

def test_unit_embeddings_and_cost_matrix():
    rng = np.random.default_rng(0)
    E = rng.normal(size=(10, 6)) * rng.uniform(0.1, 10, size=(10, 1))
    E[4] = 0.0  # a zero row must not produce NaN
    E_hat = cost.unit_embeddings(E)
    assert E_hat.dtype == jnp.float32
    norms = np.linalg.norm(np.asarray(E_hat), axis=1)
    np.testing.assert_allclose(np.delete(norms, 4), 1.0, atol=1e-6)
    assert norms[4] == 0.0 and np.all(np.isfinite(np.asarray(E_hat)))

    ids = jnp.array([0, 3, 4, 7])
    C = np.asarray(cost.cost_matrix(E_hat, ids))
    Eh = np.asarray(E_hat)[np.asarray(ids)]
    np.testing.assert_allclose(C, 1 - Eh @ Eh.T, atol=1e-6)
    np.testing.assert_allclose(C, C.T, atol=1e-7)
    assert C.min() >= 0 and C.max() <= 2
    # c(u, v) = ½ ||ê_u - ê_v||² for unit rows (the zero row is excluded: it is not unit)
    unit = [0, 1, 3]
    half_sq = 0.5 * ((Eh[unit][:, None] - Eh[unit][None]) ** 2).sum(-1)
    np.testing.assert_allclose(C[np.ix_(unit, unit)], half_sq, atol=1e-6)
    np.testing.assert_allclose(np.diag(C)[unit], 0.0, atol=1e-6)
    # rectangular supports
    assert cost.cost_matrix(E_hat, ids, jnp.array([1, 2])).shape == (4, 2)
    with pytest.raises(ValueError, match=r"\[V, d\]"):
        cost.unit_embeddings(np.ones(5))


# ----------------------------------------------------------------------------- bounds vs exact LP

@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), V=st.integers(2, 7), d=st.integers(2, 5),
       temp=st.sampled_from([0.1, 1.0, 3.0, 10.0]), zeros=st.integers(0, 1))
def test_lb_le_emd_le_ub(seed, V, d, temp, zeros):
    E_hat, zp, q = _problem(seed, V, d, temp, zeros)
    exact = _lp(emd.probs_from_logits(zp), q, E_hat)
    lb = float(emd.lower_bound(zp, q, E_hat, kind="probs"))
    ub = float(emd.upper_bound(zp, q, E_hat, kind="probs"))
    assert lb <= exact + TOL, (lb, exact)
    assert exact <= ub + TOL, (exact, ub)
    assert -TOL <= lb and ub <= 2 + TOL


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), V=st.integers(2, 8), d=st.integers(2, 5),
       temp=st.sampled_from([0.1, 1.0, 5.0]))
def test_onehot_closed_form(seed, V, d, temp):
    E_hat, zp, _ = _problem(seed, V, d, temp)
    y = seed % V
    p = emd.probs_from_logits(zp)
    exact = _lp(p, np.eye(V)[y], E_hat)
    closed = float(emd.onehot_emd(zp, jnp.int32(y), E_hat))
    ub = float(emd.upper_bound(zp, jnp.int32(y), E_hat))
    lb = float(emd.lower_bound(zp, jnp.int32(y), E_hat))
    mu = np.asarray(emd.mean_embedding(zp, E_hat), np.float64)
    assert abs(closed - exact) < TOL          # EMD = 1 - μ(p)·ê_y
    assert abs(ub - exact) < TOL              # UB = EMD for one-hot targets
    assert abs(lb - (exact - 0.5 * (1 - mu @ mu))) < TOL   # LB = EMD - ½(1 - ||μ(p)||²)
    # the direct definition Σ_u p_u c(u, y)
    C = 1 - np.asarray(E_hat, np.float64) @ np.asarray(E_hat, np.float64)[y]
    assert abs(closed - float(np.asarray(p, np.float64) @ C)) < TOL


def test_target_kinds_agree():
    E_hat, zp, _ = _problem(1, 50, 8, 2.0)
    zq = jnp.asarray(np.random.default_rng(2).normal(size=(3, 4, 50)) * 2, jnp.float32)
    zp = jnp.broadcast_to(zp, zq.shape) + zq[::-1] * 0.3
    q = emd.probs_from_logits(zq)
    mu_q = emd.mean_embedding(zq, E_hat)
    for fn in (emd.lower_bound, emd.upper_bound):
        ref = fn(zp, zq, E_hat, kind="logits")
        assert ref.shape == (3, 4)
        np.testing.assert_allclose(fn(zp, q, E_hat, kind="probs"), ref, atol=1e-6)
        np.testing.assert_allclose(fn(zp, mu_q, E_hat, kind="mean"), ref, atol=1e-6)
    # LB < UB strictly for non-degenerate soft targets, and the explicit formulas
    mu_p = emd.mean_embedding(zp, E_hat)
    np.testing.assert_allclose(emd.lower_bound(zp, zq, E_hat, kind="logits"),
                               0.5 * jnp.sum((mu_p - mu_q) ** 2, -1), atol=1e-6)
    np.testing.assert_allclose(emd.upper_bound(zp, zq, E_hat, kind="logits"),
                               1 - jnp.sum(mu_p * mu_q, -1), atol=1e-6)
    # bf16 logits are upcast: softmax in fp32
    assert emd.mean_embedding(zp.astype(jnp.bfloat16), E_hat).dtype == jnp.float32


def test_divergence_dispatch_and_errors():
    E_hat, _, _ = _problem(3, 20, 4, 1.0)
    z = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 20)), jnp.float32)
    y = jnp.asarray(np.random.default_rng(1).integers(0, 20, size=(2, 5)), jnp.int32)
    np.testing.assert_allclose(emd.divergence("lower_bound", z, y, E_hat), emd.lower_bound(z, y, E_hat))
    np.testing.assert_allclose(emd.divergence("upper_bound", z, y, E_hat), emd.upper_bound(z, y, E_hat))
    np.testing.assert_allclose(emd.divergence("exact_onehot", z, y, E_hat), emd.onehot_emd(z, y, E_hat))
    np.testing.assert_allclose(emd.divergence("exact_onehot", z, y, E_hat), emd.upper_bound(z, y, E_hat),
                               atol=1e-6)
    with pytest.raises(ValueError, match="unknown divergence"):
        emd.divergence("kl", z, y, E_hat)
    with pytest.raises(ValueError, match="needs one-hot"):
        emd.divergence("exact_onehot", z, z, E_hat, kind="logits")
    with pytest.raises(ValueError, match="unknown target kind"):
        emd.lower_bound(z, y, E_hat, kind="soft")
    with pytest.raises(ValueError, match="integer token ids"):
        emd.lower_bound(z, z[..., 0], E_hat)
    with pytest.raises(ValueError, match="V = 20"):
        emd.mean_embedding(z[..., :10], E_hat)
    with pytest.raises(ValueError, match="differ"):
        emd.lower_bound(z, y[:, :3], E_hat)
    with pytest.raises(ValueError, match="mask shape"):
        emd.lower_bound(z, y, E_hat, mask=jnp.ones((2, 4), bool))


# ----------------------------------------------------------------------------- gradients (float64)

@pytest.mark.parametrize("name", ["lower_bound", "exact_onehot", "upper_bound"])
def test_gradients_match_finite_differences(name):
    rng = np.random.default_rng(7)
    with jax.enable_x64(True):
        E_hat = cost.unit_embeddings(jnp.asarray(rng.normal(size=(12, 5)), jnp.float64))
        z = jnp.asarray(rng.normal(size=(2, 3, 12)) * 2, jnp.float64)
        y = jnp.asarray(rng.integers(0, 12, size=(2, 3)), jnp.int32)
        mask = jnp.asarray([[1, 1, 0], [1, 0, 1]], bool)
        assert E_hat.dtype == jnp.float64

        def f(logits):
            s, c = emd.masked_sum(emd.divergence(name, logits, y, E_hat, mask=mask), mask)
            return s / c
        assert f(z).dtype == jnp.float64
        check_grads(f, (z,), order=1, modes=["rev"], eps=1e-6, atol=1e-7, rtol=1e-6)
        # soft target: gradient of LB w.r.t. both logits
        zq = jnp.asarray(rng.normal(size=(2, 3, 12)), jnp.float64)
        check_grads(lambda a, b: jnp.sum(emd.lower_bound(a, b, E_hat, kind="logits")), (z, zq),
                    order=1, modes=["rev"], eps=1e-6, atol=1e-7, rtol=1e-6)
        # analytic check of the one-hot EMD gradient: ∂/∂z_v = p_v (c(v, y) - EMD)
        g = jax.grad(lambda lz: emd.onehot_emd(lz, y[0, 0], E_hat))(z[0, 0])
        p = jax.nn.softmax(z[0, 0])
        c = 1 - E_hat @ E_hat[y[0, 0]]
        np.testing.assert_allclose(g, p * (c - p @ c), atol=1e-12)


# ----------------------------------------------------------------------------- jit / vmap / masks

def test_jit_vmap_unbatched_agree():
    E_hat, _, _ = _problem(5, 64, 8, 1.0)
    rng = np.random.default_rng(5)
    z = jnp.asarray(rng.normal(size=(3, 6, 64)) * 3, jnp.float32)
    zq = jnp.asarray(rng.normal(size=(3, 6, 64)) * 3, jnp.float32)
    y = jnp.asarray(rng.integers(0, 64, size=(3, 6)), jnp.int32)
    for name in emd.DIVERGENCES:
        batched = emd.divergence(name, z, y, E_hat)
        jitted = jax.jit(emd.divergence, static_argnames=("name", "kind"))(name, z, y, E_hat)
        vmapped = jax.vmap(jax.vmap(lambda a, b, name=name: emd.divergence(name, a, b, E_hat)))(z, y)
        single = np.array([[float(emd.divergence(name, z[b, t], y[b, t], E_hat)) for t in range(6)]
                           for b in range(3)])
        for other in (jitted, vmapped):
            np.testing.assert_allclose(other, batched, atol=1e-6)
        np.testing.assert_allclose(single, batched, atol=1e-6)
    soft = emd.lower_bound(z, zq, E_hat, kind="logits")
    soft_v = jax.vmap(lambda a, b: emd.lower_bound(a, b, E_hat, kind="logits"))(z, zq)
    np.testing.assert_allclose(soft_v, soft, atol=1e-6)


def test_masks_respected():
    E_hat, _, _ = _problem(6, 30, 6, 1.0)
    rng = np.random.default_rng(6)
    z = jnp.asarray(rng.normal(size=(2, 5, 30)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 30, size=(2, 5)), jnp.int32)
    mask = jnp.asarray([[1, 1, 1, 0, 0], [0, 1, 0, 1, 0]], bool)
    y_pad = jnp.where(mask, y, -100)   # padding ids at masked positions are allowed
    for name in emd.DIVERGENCES:
        full = emd.divergence(name, z, y, E_hat)
        v = emd.divergence(name, z, y_pad, E_hat, mask=mask)
        np.testing.assert_allclose(v, jnp.where(mask, full, 0.0), atol=1e-7)
        assert np.all(np.asarray(v)[~np.asarray(mask)] == 0.0)
        s, c = emd.masked_sum(v, mask)
        assert float(c) == 5.0
        np.testing.assert_allclose(float(s), float(jnp.sum(full * mask)), rtol=1e-6)
        # gradient w.r.t. masked positions is exactly 0
        def masked_total(lz, name=name):
            return emd.masked_sum(emd.divergence(name, lz, y_pad, E_hat, mask=mask), mask)[0]

        g = jax.grad(masked_total)(z)
        assert np.all(np.asarray(g)[~np.asarray(mask)] == 0.0)
        assert np.any(np.asarray(g)[np.asarray(mask)] != 0.0)
    # NaN values at masked positions contribute nothing to the sum
    vals = jnp.asarray([[1.0, jnp.nan], [2.0, 3.0]])
    s, c = emd.masked_sum(vals, jnp.asarray([[1, 0], [1, 1]], bool))
    assert float(s) == 6.0 and float(c) == 3.0
    s, c = emd.masked_sum(jnp.ones((2, 3)))
    assert float(s) == 6.0 and float(c) == 6.0


# ----------------------------------------------------------------------------- no V x V at full size

def _loss_fn(name, kind):
    def loss(logits, target, E_hat, mask):
        s, c = emd.masked_sum(emd.divergence(name, logits, target, E_hat, kind=kind, mask=mask), mask)
        return s / c
    return jax.jit(jax.value_and_grad(loss))


def test_avals_walker_sees_a_v_by_v_matrix():
    """Control: the shape walker must catch a V x V intermediate (so the test below can fail)."""
    V = 300

    def bad(logits, E_hat):
        C = 1.0 - E_hat @ E_hat.T
        return jnp.sum(jax.nn.softmax(logits) @ C)
    jaxpr = jax.make_jaxpr(jax.jit(jax.grad(bad)))(jax.ShapeDtypeStruct((4, V), jnp.float32),
                                                  jax.ShapeDtypeStruct((V, 8), jnp.float32))
    assert any(s.count(V) >= 2 for s in jaxpr_shapes(jaxpr))


@pytest.mark.parametrize("name,kind", [("lower_bound", "onehot"), ("exact_onehot", "onehot"),
                                       ("upper_bound", "onehot"), ("lower_bound", "logits"),
                                       ("upper_bound", "mean")])
def test_no_v_by_v_at_full_size(name, kind):
    V, B, T, d = 49_152, 4, 128, 576  # 512 positions, SmolLM2 vocabulary and width
    S = jax.ShapeDtypeStruct
    target = {"onehot": S((B, T), jnp.int32), "logits": S((B, T, V), jnp.float32),
              "mean": S((B, T, d), jnp.float32)}[kind]
    args = (S((B, T, V), jnp.float32), target, S((V, d), jnp.float32), S((B, T), jnp.bool_))
    f = _loss_fn(name, kind)
    shapes = jaxpr_shapes(jax.make_jaxpr(f)(*args))
    assert shapes, "walker found nothing"
    sizes = [int(np.prod(s)) for s in shapes]
    assert (B, T, V) in shapes  # the walker does see the logits-sized arrays (and their cotangents)
    assert max(sizes) == max(B * T * V, V * d)  # nothing bigger than the logits or Ê
    assert not [s for s in shapes if s.count(V) >= 2], "a V x V array appears in the jaxpr"
    assert max(sizes) < V * V
    # compiled temporaries: a few logits-sized buffers, far from V*V*4 bytes (9.7 GB)
    mem = f.lower(*args).compile().memory_analysis()
    if mem is not None:
        assert mem.temp_size_in_bytes <= 6 * B * T * V * 4, mem.temp_size_in_bytes
