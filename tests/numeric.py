"""Shared numeric test helpers: central finite differences (the gradient tests) and the shapes
of every value in a jaxpr (the no-V x V checks)."""
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


def jaxpr_shapes(closed_jaxpr) -> list[tuple[int, ...]]:
    """The shape of every value in a (closed) jaxpr, recursing into sub-jaxprs (pjit,
    custom_jvp/vjp, scan, cond branches, ...): what the no-V x V checks look through."""
    out: list[tuple[int, ...]] = []

    def sub(p):
        if hasattr(p, "eqns"):
            walk(p)
        elif hasattr(p, "jaxpr") and hasattr(p.jaxpr, "eqns"):
            walk(p.jaxpr)
        elif isinstance(p, (tuple, list)):
            for x in p:
                sub(x)

    def walk(j):
        for v in list(j.invars) + list(j.outvars) + list(getattr(j, "constvars", [])):
            if hasattr(v, "aval") and hasattr(v.aval, "shape"):
                out.append(tuple(v.aval.shape))
        for eqn in j.eqns:
            for v in list(eqn.invars) + list(eqn.outvars):
                if hasattr(v, "aval") and hasattr(v.aval, "shape"):
                    out.append(tuple(v.aval.shape))
            for p in eqn.params.values():
                sub(p)

    walk(closed_jaxpr.jaxpr)
    return out
