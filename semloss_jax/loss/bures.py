r"""The Bures distance between covariance matrices, with a gradient that stays finite.

    B²(A, B) = tr A + tr B - 2 F(A, B),     F(A, B) = tr (A^½ B A^½)^½   (the fidelity)

B(A, B) is the 2-Wasserstein distance between the Gaussians N(0, A) and N(0, B) (Gelbrich:
the smallest W2 between any two measures with covariances A and B). Everything here works on
batches [..., r, r] of symmetric positive semidefinite matrices and is jittable.

Square roots go through `eigh` with the eigenvalues clipped at 0 (round-off makes tiny
negative ones). F is not differentiable where A^½ B A^½ is singular (like sqrt at 0), and
`eigh`'s own derivative divides by eigenvalue gaps, which are 0 for the repeated zero
eigenvalues of low-rank covariances. So F has a custom JVP built from

    ∂F/∂B = ½ A^½ (A^½ B A^½)^{+½} A^½,        ∂F/∂A = ½ B^½ (B^½ A B^½)^{+½} B^½

(the derivative of tr M^½ is ½ M^{-½}; for diagonal A, B it reduces to ½ √(a/b)), with the
pseudo-inverse square root: eigenvalues below a relative floor count as zero. That is the exact
gradient wherever F is differentiable, and zero along the directions where it is not.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

# eigenvalues below RTOL x (largest eigenvalue of the same matrix) count as zero
RTOL = 1e-6


def symmetrize(M: jax.Array) -> jax.Array:
    """(M + Mᵀ) / 2 over the last two axes (removes round-off asymmetry before eigh)."""
    return 0.5 * (M + jnp.swapaxes(M, -1, -2))


def _eig(M: jax.Array) -> tuple[jax.Array, jax.Array]:
    w, Q = jnp.linalg.eigh(symmetrize(M))
    return jnp.maximum(w, 0.0), Q


def _from_eig(f_w: jax.Array, Q: jax.Array) -> jax.Array:
    """Q diag(f_w) Qᵀ, batched."""
    return jnp.einsum("...ij,...j,...kj->...ik", Q, f_w, Q)


def psd_sqrt(M: jax.Array) -> jax.Array:
    """The PSD square root of a symmetric PSD matrix (eigenvalues clipped at 0)."""
    w, Q = _eig(M)
    return _from_eig(jnp.sqrt(w), Q)


def _pinv_sqrt(M: jax.Array) -> jax.Array:
    """M^{+½}: eigenvalues above RTOL x the largest get w^{-½}, the others 0."""
    w, Q = _eig(M)
    floor = RTOL * jnp.max(w, axis=-1, keepdims=True)
    inv = jnp.where(w > jnp.maximum(floor, jnp.finfo(w.dtype).tiny), 1.0 / jnp.sqrt(
        jnp.where(w > 0, w, 1.0)), 0.0)
    return _from_eig(inv, Q)


def _fidelity_primal(A: jax.Array, B: jax.Array) -> jax.Array:
    sA = psd_sqrt(A)
    w, _ = _eig(sA @ B @ sA)
    return jnp.sum(jnp.sqrt(w), axis=-1)


@jax.custom_jvp
def fidelity(A: jax.Array, B: jax.Array) -> jax.Array:
    """F(A, B) = tr (A^½ B A^½)^½ for symmetric PSD A, B [..., r, r] -> [...]."""
    return _fidelity_primal(A, B)


@fidelity.defjvp
def _fidelity_jvp(primals, tangents):
    A, B = primals
    dA, dB = tangents
    sA, sB = psd_sqrt(A), psd_sqrt(B)
    grad_B = 0.5 * sA @ _pinv_sqrt(sA @ B @ sA) @ sA
    grad_A = 0.5 * sB @ _pinv_sqrt(sB @ A @ sB) @ sB
    out = _fidelity_primal(A, B)
    dF = jnp.sum(grad_A * symmetrize(dA), axis=(-2, -1)) + jnp.sum(grad_B * symmetrize(dB),
                                                                   axis=(-2, -1))
    return out, dF


def bures_squared(A: jax.Array, B: jax.Array) -> jax.Array:
    """B²(A, B) = tr A + tr B - 2 tr (A^½ B A^½)^½ >= 0, batched over [...]."""
    tr = jnp.trace(A, axis1=-2, axis2=-1) + jnp.trace(B, axis1=-2, axis2=-1)
    return jnp.maximum(tr - 2.0 * fidelity(A, B), 0.0)
