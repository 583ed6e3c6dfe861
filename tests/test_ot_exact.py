"""Exact EMD with OTT-JAX on top-k supports (ot_exact.py) against the LP and the closed forms."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from semloss_jax.errors import LossError
from semloss_jax.loss import cost, emd, ot_exact

CFG = ot_exact.SinkhornConfig()  # the defaults the report uses
N_SUP = 6  # fixed tiny support size: one compilation for all hypothesis examples


@pytest.fixture(scope="module")
def sinkhorn_jit():
    return jax.jit(lambda a, b, C: ot_exact.sinkhorn_emd(a, b, C, CFG))


def _tiny(seed: int, temp: float, zeros: int):
    rng = np.random.default_rng(seed)
    X = cost.unit_embeddings(rng.normal(size=(N_SUP, 4)))
    C = cost.cost_matrix(X, jnp.arange(N_SUP))

    def dist():
        w = np.exp(rng.normal(size=N_SUP) * temp)
        w[rng.permutation(N_SUP)[:zeros]] = 0.0
        return w / w.sum()
    return dist(), dist(), C


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), temp=st.sampled_from([0.3, 1.0, 3.0]), zeros=st.integers(0, 2))
def test_ott_matches_lp_on_tiny_supports(sinkhorn_jit, seed, temp, zeros):
    a, b, C = _tiny(seed, temp, zeros)
    lp = ot_exact.emd_lp(a, b, np.asarray(C, np.float64))
    out = sinkhorn_jit(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), C)
    assert abs(float(out.cost) - lp) < 2e-4, (float(out.cost), lp)  # annealed: ~1e-5 typical
    # the rounded plan is feasible, so its cost cannot be below the LP optimum (fp32 slack)
    assert float(out.cost) >= lp - 1e-5
    assert float(out.marginal_error) < 1e-2


def test_emd_lp_known_values():
    X = cost.unit_embeddings(np.array([[1.0, 0], [0, 1.0], [-1.0, 0]]))
    C = np.asarray(cost.cost_matrix(X, jnp.arange(3)), np.float64)
    assert ot_exact.emd_lp(np.array([1.0, 0, 0]), np.array([0, 0, 1.0]), C) == pytest.approx(2.0)
    assert ot_exact.emd_lp(np.array([1.0, 0, 0]), np.array([0, 1.0, 0]), C) == pytest.approx(1.0)
    a = np.array([0.2, 0.5, 0.3])
    assert ot_exact.emd_lp(a, a, C) == pytest.approx(0.0, abs=1e-12)
    # either 0.5 moves 0 -> 2 (cost 2) or 0.5 moves 0 -> 1 and 0.5 moves 1 -> 2 (cost 1 each): 1.0
    assert ot_exact.emd_lp(np.array([0.5, 0.5, 0]), np.array([0, 0.5, 0.5]), C) == pytest.approx(1.0)
    # the orthogonal point is cheaper than the antipode: 0.5 (0 -> 1) + 0 = 0.5
    assert ot_exact.emd_lp(np.array([0.5, 0.5, 0]), np.array([0, 1.0, 0]), C) == pytest.approx(0.5)
    with pytest.raises(LossError, match="do not match"):
        ot_exact.emd_lp(a, a[:2], C)


def test_round_to_coupling_is_feasible():
    rng = np.random.default_rng(0)
    a = rng.dirichlet(np.ones(7))
    b = rng.dirichlet(np.ones(5))
    P = jnp.asarray(np.outer(a, b) * rng.uniform(0.5, 1.5, size=(7, 5)), jnp.float32)
    R = ot_exact.round_to_coupling(P, jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
    assert float(R.min()) >= 0
    np.testing.assert_allclose(R.sum(1), a, atol=1e-6)
    np.testing.assert_allclose(R.sum(0), b, atol=1e-6)
    # a feasible plan is left unchanged
    Q = jnp.asarray(np.outer(a, b), jnp.float32)
    np.testing.assert_allclose(ot_exact.round_to_coupling(Q, jnp.asarray(a), jnp.asarray(b)), Q, atol=1e-6)


def test_union_support_and_restrict():
    ids, valid = ot_exact.union_support(jnp.array([5, 1, 9]), jnp.array([9, 2, 5]))
    ids, valid = np.asarray(ids), np.asarray(valid)
    assert ids.shape == (6,)
    assert sorted(ids[valid].tolist()) == [1, 2, 5, 9]
    p = jax.nn.softmax(jnp.arange(12.0) / 3)
    w, mass = ot_exact.restrict(p, jnp.asarray(ids), jnp.asarray(valid))
    assert float(jnp.sum(w)) == pytest.approx(1.0, abs=1e-6)
    assert float(mass) == pytest.approx(float(p[jnp.array([1, 2, 5, 9])].sum()), rel=1e-6)
    assert np.all(np.asarray(w)[~valid] == 0)


def _real_like(seed, V=200, d=12, N=5):
    rng = np.random.default_rng(seed)
    E_hat = cost.unit_embeddings(rng.normal(size=(V, d)))
    zp = jnp.asarray(rng.normal(size=(N, V)) * 3, jnp.float32)
    zq = zp + jnp.asarray(rng.normal(size=(N, V)) * 1.5, jnp.float32)
    return E_hat, zp, zq


def test_topk_emd_between_bounds_and_equal_to_lp():
    E_hat, zp, zq = _real_like(1)
    k = 6
    r = ot_exact.batched_topk_emd(zp, zq, E_hat, k=k)
    assert r.exact.shape == (5,)
    assert np.all(np.asarray(r.marginal_error) < 1e-3)  # Sinkhorn's plan before rounding
    assert np.all(np.asarray(r.lower) <= np.asarray(r.exact) + 1e-5)
    assert np.all(np.asarray(r.exact) <= np.asarray(r.upper) + 1e-5)
    assert np.all((np.asarray(r.mass_p) > 0) & (np.asarray(r.mass_p) <= 1 + 1e-6))
    for i in range(5):
        lp = ot_exact.lp_on_support(zp[i], zq[i], E_hat, k)
        assert abs(float(r.exact[i]) - lp) < 2e-4
    # the per-position function agrees with the batched one
    one = ot_exact.topk_emd(zp[2], zq[2], E_hat, k)
    assert float(one.exact) == pytest.approx(float(r.exact[2]), abs=1e-5)


def test_full_support_reproduces_full_vocab_bounds():
    """With k = V nothing is truncated: the support bounds equal emd.py's full-vocab bounds."""
    E_hat, zp, zq = _real_like(2, V=10, d=4, N=3)
    r = ot_exact.batched_topk_emd(zp, zq, E_hat, k=10)
    np.testing.assert_allclose(r.mass_p, 1.0, atol=1e-6)
    np.testing.assert_allclose(r.lower, emd.lower_bound(zp, zq, E_hat, kind="logits"), atol=1e-5)
    np.testing.assert_allclose(r.upper, emd.upper_bound(zp, zq, E_hat, kind="logits"), atol=1e-5)
    C = np.clip(1 - np.asarray(E_hat, np.float64) @ np.asarray(E_hat, np.float64).T, 0, 2)
    for i in range(3):
        lp = ot_exact.emd_lp(np.asarray(jax.nn.softmax(zp[i]), np.float64),
                             np.asarray(jax.nn.softmax(zq[i]), np.float64), C)
        assert abs(float(r.exact[i]) - lp) < 2e-4


def test_onehot_mode_reproduces_closed_form():
    E_hat, zp, zq = _real_like(3, N=7)
    y = jnp.argmax(zq, -1).at[0].set(int(jnp.argmin(zp[0])))  # position 0: y outside top-k(p)
    r = ot_exact.batched_topk_onehot_emd(zp, y, E_hat, k=8, cfg=ot_exact.SinkhornConfig(batch_size=3))
    np.testing.assert_allclose(r.exact, r.closed, atol=1e-4)
    assert np.all(np.asarray(r.converged))
    np.testing.assert_allclose(r.closed_full, emd.onehot_emd(zp, y, E_hat), atol=1e-6)
    # no truncation (k = V): OTT equals the full-vocabulary closed form
    E_small, zs, _ = _real_like(5, V=40, N=3)
    ys = jnp.array([0, 17, 39])
    r_full = ot_exact.batched_topk_onehot_emd(zs, ys, E_small, k=40)
    np.testing.assert_allclose(r_full.exact, emd.onehot_emd(zs, ys, E_small), atol=1e-4)
    np.testing.assert_allclose(r_full.mass_p, 1.0, atol=1e-5)


def test_batch_size_not_dividing_positions():
    E_hat, zp, zq = _real_like(4, N=5)
    a = ot_exact.batched_topk_emd(zp, zq, E_hat, k=4, cfg=ot_exact.SinkhornConfig(batch_size=2))
    b = ot_exact.batched_topk_emd(zp, zq, E_hat, k=4, cfg=ot_exact.SinkhornConfig(batch_size=8))
    for key in ("exact", "lower", "upper"):
        np.testing.assert_allclose(getattr(a, key), getattr(b, key), atol=1e-5)


def test_emd_lp_feasible_with_weights_below_the_solver_tolerance():
    """HiGHS's presolve called these infeasible (weights < 1e-7): the LP now solves them all."""
    b = np.array([8.56e-08, 0.4551076665, 0.0, 6.29e-08])
    b[2] = 1.0 - b.sum()
    C = np.random.default_rng(0).uniform(0, 1, (1, 4))
    assert ot_exact.emd_lp(np.array([1.0]), b, C) == pytest.approx(float(C[0] @ b), abs=1e-12)
    rng = np.random.default_rng(1)

    def weights(k):
        x = rng.uniform(0, 1, k)
        tiny = rng.random(k) < 0.4
        x[tiny] = rng.uniform(0, 1e-7, tiny.sum())
        x[rng.integers(k)] += 0.1
        return x / x.sum()

    for _ in range(576):
        n, m = rng.integers(1, 5, size=2)
        a, b, C = weights(n), weights(m), rng.uniform(0, 2, (n, m))
        value = ot_exact.emd_lp(a, b, C)
        assert C.min() - 1e-9 <= value <= C.max() + 1e-9


def _near_duplicate_problems(n_problems: int = 100, n: int = 6, seed: int = 0):
    """Supports of n/2 pairs of near-duplicate tokens (cost ~1e-3 within a pair); a random p, the
    same p with the mass of each pair swapped, the cost matrix."""
    rng = np.random.default_rng(seed)
    for _ in range(n_problems):
        base = rng.normal(size=(n // 2, 8))
        X = np.concatenate([base, base + rng.normal(size=base.shape) * 0.045])
        C = cost.cost_matrix(cost.unit_embeddings(jnp.asarray(X, jnp.float32)), jnp.arange(n))
        a = rng.dirichlet(np.ones(n)).astype(np.float32)
        b = np.concatenate([a[n // 2:], a[:n // 2]])
        rng.dirichlet(np.ones(n))  # the generator of ot_exact.SinkhornConfig's figures draws a third
        yield a, b, C


def test_near_duplicate_tokens_no_entropic_blur_at_p_equals_q():
    """EMD(p, p) = 0 (two stages of Sinkhorn alone left up to 4.8e-4 on near-duplicates), and
    moving mass between near-duplicates is within 1e-4 of the LP (the polish stage)."""
    f = jax.jit(lambda a, b, C: ot_exact.sinkhorn_emd(a, b, C, CFG).cost)
    worst_pp, worst_swap, pair_costs = 0.0, 0.0, []
    for a, b, C in _near_duplicate_problems():
        pair_costs += [float(C[i, i + 3]) for i in range(3)]
        worst_pp = max(worst_pp, float(f(jnp.asarray(a), jnp.asarray(a), C)))
        lp = ot_exact.emd_lp(a, b, np.asarray(C, np.float64))
        got = float(f(jnp.asarray(a), jnp.asarray(b), C))
        assert got >= lp - 1e-6  # feasible: never below the optimum
        worst_swap = max(worst_swap, got - lp)
    assert np.median(pair_costs) < 2e-3  # the pairs really are near-duplicates
    assert worst_pp < 1e-6 and worst_swap < 1e-4, (worst_pp, worst_swap)


def test_diagonal_plan_is_a_coupling():
    rng = np.random.default_rng(3)
    a, b = rng.dirichlet(np.ones(7)), rng.dirichlet(np.ones(7))
    P = np.asarray(ot_exact.diagonal_plan(jnp.asarray(a), jnp.asarray(b)))
    assert P.min() >= 0
    np.testing.assert_allclose(P.sum(1), a, atol=1e-6)
    np.testing.assert_allclose(P.sum(0), b, atol=1e-6)
    np.testing.assert_allclose(np.diag(P)[:3] >= np.minimum(a, b)[:3] - 1e-7, True)
    np.testing.assert_allclose(ot_exact.diagonal_plan(jnp.asarray(a), jnp.asarray(a)), np.diag(a), atol=1e-7)


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), r=st.sampled_from([1, 3, 6, 20]))
def test_support_basis_is_the_top_principal_subspace_and_gelbrich_stays_below_the_lp(seed, r):
    """support_basis: orthonormal (or zero) rows spanning the top-r principal directions of the
    pooled weighted covariance (its captured variance = the sum of the top-r eigenvalues); the
    Gelbrich bound in it, and in a fixed global basis, stays at or below the exact LP."""
    E_hat, zp, zq = _real_like(seed % 1000, V=60, d=8, N=2)
    k = 10
    prob = ot_exact.topk_problem(zp[0], zq[0], E_hat, k)
    E_s = E_hat[prob.ids]
    B = np.asarray(ot_exact.support_basis(E_s, prob.a, prob.b, r), np.float64)
    assert B.shape == (r, 8)
    gram = B @ B.T
    nonzero = np.linalg.norm(B, axis=1) > 0.5
    np.testing.assert_allclose(gram, np.diag(nonzero.astype(float)), atol=1e-4)
    w = 0.5 * (np.asarray(prob.a, np.float64) + np.asarray(prob.b, np.float64))
    X = np.asarray(E_s, np.float64)
    S = ((X - w @ X) * w[:, None]).T @ (X - w @ X)                  # Σ_i w_i (x_i - m)(x_i - m)ᵀ
    top = np.sort(np.linalg.eigvalsh(S))[::-1][:r]
    assert np.trace(B @ S @ B.T) == pytest.approx(top.sum(), rel=1e-3, abs=1e-6)
    lp = ot_exact.lp_on_support(zp[0], zq[0], E_hat, k)
    adaptive = float(ot_exact.topk_gelbrich(zp[0], zq[0], E_hat, jnp.zeros((1, 8)), k, adaptive_r=r))
    fixed = float(ot_exact.topk_gelbrich(zp[0], zq[0], E_hat, emd.principal_basis(E_hat, min(r, 8)), k))
    assert -1e-6 <= adaptive <= lp + 1e-5 and -1e-6 <= fixed <= lp + 1e-5
