"""Logical axis names of activations, and the hook that turns them into sharding constraints.

The model and the loss head name the axes of their activations (the residual stream, attention
and MLP activations, the loss head's hidden states and vocabulary tiles) with `constrain(x, names)`.
What a name means on a device mesh is not decided here: the training code enters
`activation_sharding(resolve)` while the step is traced, where `resolve(names, shape)` returns a
`jax.sharding.NamedSharding` (or None) from its rule table (`semloss_jax.train.sharding`).
Outside that context `constrain` returns its input unchanged, so on one device, in tests and in
generation nothing changes.

Names:
    batch      rows (or flattened tokens) of a batch          seq       query / key positions
    res_seq    positions of the residual stream between blocks (sequence parallelism)
    embed      the model width of an activation               heads, kv_heads, head_dim
    mlp        the MLP's hidden width                         vocab     a vocabulary tile
"""
from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Sequence

import jax

Resolver = Callable[[Sequence[str | None], Sequence[int]], "jax.sharding.Sharding | None"]

_RESOLVER: contextvars.ContextVar[Resolver | None] = contextvars.ContextVar("activation_resolver",
                                                                            default=None)


@contextlib.contextmanager
def activation_sharding(resolve: Resolver | None) -> Iterator[None]:
    """While active, `constrain` asks `resolve(names, shape)` for the sharding of an activation."""
    token = _RESOLVER.set(resolve)
    try:
        yield
    finally:
        _RESOLVER.reset(token)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Constrain x to the sharding its logical axis names map to (x itself when no rules are in force)."""
    resolve = _RESOLVER.get()
    if resolve is None:
        return x
    if len(names) != x.ndim:
        raise ValueError(f"activation axes {tuple(names)} do not match shape {x.shape}")
    sharding = resolve(tuple(names), x.shape)
    return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


def current_resolver() -> Resolver | None:
    """The resolver in force (None outside `activation_sharding`): kernels that run per device
    (shard_map) read their mesh and specs from it."""
    return _RESOLVER.get()
