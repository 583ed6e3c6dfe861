"""Semantic token geometry (METHOD.md, "Notation"): frozen unit embeddings and the cost.

    ê_v = e_v / ||e_v||                 (rows of a FROZEN copy of the embedding matrix, fp32)
    c(u, v) = 1 - ê_u · ê_v  in [0, 2]  (= ½ ||ê_u - ê_v||² for unit rows)

Cost matrices are built only on SMALL supports (tests, the exact OT of ot_exact.py);
the training path never needs one: the bounds of emd.py only use mean embeddings.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

# Rows with norm below this are left as (near-)zero vectors instead of dividing by ~0.
NORM_EPS = 1e-12


def unit_embeddings(E: jax.Array, eps: float = NORM_EPS) -> jax.Array:
    """Ê: the rows of an embedding matrix E [V, d] scaled to unit norm, in float32.

    ê_v = e_v / max(||e_v||, eps). A zero row stays zero (its cost to every token is 1)
    rather than becoming NaN. The result is wrapped in stop_gradient: Ê is a frozen
    copy of the embeddings taken before training, never a trained parameter.
    """
    E = jnp.asarray(E)
    if E.ndim != 2:
        raise ValueError(f"unit_embeddings: expected an embedding matrix [V, d], got shape {E.shape}")
    E = E.astype(jnp.promote_types(E.dtype, jnp.float32))  # fp32 (float64 only under x64)
    norm = jnp.linalg.norm(E, axis=-1, keepdims=True)
    return jax.lax.stop_gradient(E / jnp.maximum(norm, eps))


def pairwise_cost(x_hat: jax.Array, y_hat: jax.Array) -> jax.Array:
    """The cost c between two sets of unit vectors: C[..., i, j] = 1 - x̂_i · ŷ_j, clipped to [0, 2].

    x_hat [..., n, d], y_hat [..., m, d] -> [..., n, m]. The clip only removes fp32
    round-off (1 - ê·ê can come out as -1e-7).
    """
    dots = jnp.einsum("...id,...jd->...ij", x_hat, y_hat, precision=jax.lax.Precision.HIGHEST)
    return jnp.clip(1.0 - dots, 0.0, 2.0)


def cost_matrix(E_hat: jax.Array, support_ids: jax.Array,
                support_ids_b: jax.Array | None = None) -> jax.Array:
    """Cost matrix on a small token support: C[..., i, j] = c(s_i, t_j) = 1 - ê_{s_i} · ê_{t_j}.

    support_ids [..., n] (and optionally support_ids_b [..., m]; defaults to the same
    support) index rows of E_hat [V, d]. Returns [..., n, m] float32. Only for small
    supports (n, m of the order of top-k): never call it with the full vocabulary.
    """
    support_ids = jnp.asarray(support_ids)
    ids_b = support_ids if support_ids_b is None else jnp.asarray(support_ids_b)
    return pairwise_cost(E_hat[support_ids], E_hat[ids_b])
