"""Central finite differences, shared by the gradient tests."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def central_differences(fn, x, eps: float) -> np.ndarray:
    """(fn(x + eps e_i) - fn(x - eps e_i)) / 2 eps for every element i of x, flattened."""
    flat = np.asarray(x).ravel()
    num = np.zeros_like(flat)
    for i in range(flat.size):
        dx = np.zeros_like(flat)
        dx[i] = eps
        fp = fn(jnp.asarray((flat + dx).reshape(x.shape)))
        fm = fn(jnp.asarray((flat - dx).reshape(x.shape)))
        num[i] = (float(fp) - float(fm)) / (2 * eps)
    return num
