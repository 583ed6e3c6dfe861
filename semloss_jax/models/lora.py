"""LoRA adapters on the stacked projection kernels of semloss_jax/models/llama.py (pure functions).

For a target projection with stacked kernel W [L, *in_dims, *out_dims] (q/k/v: in (d,),
out (heads, head_dim); o_proj: in (heads, head_dim), out (d,); gate/up: in (d,), out (f,);
down: in (f,), out (d,)), the adapter is

    A [L, *in_dims, r]  ~ normal(0, 1/fan_in)      B [L, r, *out_dims] = 0
    W' = W + (alpha / r) · A B    (contracting the rank axis, per layer)

so a fresh adapter leaves the model exactly unchanged. `merge_lora` is pure and is called
inside the loss: gradients reach only A and B, the base params stay frozen (they are not
an argument of the differentiated function). LoRA params mirror the params tree:
{"layers": {"attn": {"q_proj": {"lora_a": A, "lora_b": B}, ...}, "mlp": {...}}}, and carry
logical axis names (`lora_logical_axes`): the kernel's own names plus "lora" for the rank
axis (the sharding rule table should map "lora" to no mesh axis).
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from semloss_jax.errors import ConfigError, ModelError
from semloss_jax.models import llama as model_lib

# where each target lives in params["layers"] and how many leading (input) dims it has after "layers"
TARGETS = {
    "q_proj": ("attn", 1), "k_proj": ("attn", 1), "v_proj": ("attn", 1), "o_proj": ("attn", 2),
    "gate_proj": ("mlp", 1), "up_proj": ("mlp", 1), "down_proj": ("mlp", 1),
}
RANK_AXIS = "lora"


def lora_targets(ocfg) -> tuple[str, ...]:
    """The projections that get adapters (optim.lora_targets), checked; ConfigError otherwise."""
    targets = tuple(ocfg.lora_targets)
    if not targets:
        raise ConfigError("empty; name at least one of " + ", ".join(TARGETS), key="optim.lora_targets")
    bad = [t for t in targets if t not in TARGETS]
    if bad:
        raise ConfigError(f"unknown projection(s) {bad}; expected names from {tuple(TARGETS)}",
                          key="optim.lora_targets")
    if len(set(targets)) != len(targets):
        raise ConfigError(f"duplicate names in {targets}", key="optim.lora_targets")
    if int(ocfg.lora_rank) < 1:
        raise ConfigError(f"must be >= 1, got {ocfg.lora_rank}", key="optim.lora_rank")
    return targets


def lora_scale(ocfg) -> float:
    """The adapter scale alpha / r applied to A B."""
    return float(ocfg.lora_alpha) / float(ocfg.lora_rank)


def lora_shapes(model_cfg, ocfg) -> dict:
    """{"layers": {group: {name: {"lora_a": shape, "lora_b": shape}}}} from the abstract params."""
    abstract = model_lib.abstract_params(model_cfg)
    r = int(ocfg.lora_rank)
    out: dict = {"layers": {}}
    for name in lora_targets(ocfg):
        group, n_in = TARGETS[name]
        shape = tuple(abstract["layers"][group][name]["kernel"].shape)
        L, ins, outs = shape[0], shape[1:1 + n_in], shape[1 + n_in:]
        out["layers"].setdefault(group, {})[name] = {"lora_a": (L, *ins, r), "lora_b": (L, r, *outs)}
    return out


def init_lora(params, model_cfg, ocfg, key: jax.Array) -> dict:
    """Fresh adapters: A ~ normal(0, std = 1/sqrt(fan_in)), B = 0 (so merge_lora(params, ·) == params).

    Dtype follows the base kernels. `params` is only used for the dtype (may be abstract).
    """
    shapes = lora_shapes(model_cfg, ocfg)
    out: dict = {"layers": {}}
    names = [(g, n) for g in sorted(shapes["layers"]) for n in sorted(shapes["layers"][g])]
    keys = jax.random.split(key, max(len(names), 1))
    for k, (group, name) in zip(keys, names):
        sa, sb = shapes["layers"][group][name]["lora_a"], shapes["layers"][group][name]["lora_b"]
        dtype = params["layers"][group][name]["kernel"].dtype
        fan_in = math.prod(sa[1:-1])
        a = (jax.random.normal(k, sa, jnp.float32) / math.sqrt(fan_in)).astype(dtype)
        out["layers"].setdefault(group, {})[name] = {"lora_a": a, "lora_b": jnp.zeros(sb, dtype)}
    return out


def lora_logical_axes(model_cfg, ocfg) -> dict:
    """PartitionSpecs of logical names for the LoRA params (same tree as init_lora)."""
    axes = model_lib.param_logical_axes(model_cfg)
    out: dict = {"layers": {}}
    for name in lora_targets(ocfg):
        group, n_in = TARGETS[name]
        spec = tuple(axes["layers"][group][name]["kernel"])
        out["layers"].setdefault(group, {})[name] = {
            "lora_a": PartitionSpec(*spec[:1 + n_in], RANK_AXIS),
            "lora_b": PartitionSpec(spec[0], RANK_AXIS, *spec[1 + n_in:]),
        }
    return out


def lora_delta(a: jax.Array, b: jax.Array, n_in: int) -> jax.Array:
    """A B contracted over the rank axis, per layer: [L, *in, r] x [L, r, *out] -> [L, *in, *out]."""
    L, r = a.shape[0], a.shape[-1]
    ins, outs = a.shape[1:-1], b.shape[2:]
    if len(ins) != n_in or b.shape[:2] != (L, r):
        raise ModelError(f"LoRA shapes do not match: A {a.shape}, B {b.shape}, expected {n_in} input dims")
    a2 = a.reshape(L, math.prod(ins), r).astype(jnp.float32)
    b2 = b.reshape(L, r, math.prod(outs)).astype(jnp.float32)
    d = jnp.einsum("lir,lro->lio", a2, b2, precision=jax.lax.Precision.HIGHEST)
    return d.reshape(L, *ins, *outs)


def merge_lora(params, lora_params, ocfg) -> Any:
    """Base params with W + (alpha/r) A B on every adapted kernel (pure; new dicts, base untouched)."""
    scale = lora_scale(ocfg)
    layers = dict(params["layers"])
    for group, projs in lora_params["layers"].items():
        g = dict(layers[group])
        for name, ab in projs.items():
            if name not in TARGETS:
                raise ModelError(f"LoRA params name an unknown projection {name!r}")
            w = g[name]["kernel"]
            delta = lora_delta(ab["lora_a"], ab["lora_b"], TARGETS[name][1])
            if delta.shape != w.shape:
                raise ModelError(f"LoRA delta for {group}.{name} has shape {delta.shape}, "
                                 f"kernel has {w.shape}")
            g[name] = dict(g[name], kernel=(w.astype(jnp.float32) + scale * delta).astype(w.dtype))
        layers[group] = g
    return dict(params, layers=layers)
