"""The initial train state of a run: the model from the config, the optimizer, and where every
array of the state lives on the mesh.

    model_cfg, host_params = build_model(cfg.model)
    plan = plan_state(model_cfg, cfg.optim, mesh)             # nothing allocated (eval_shape)
    state, E_hat = initial_state(plan, model_cfg, host_params, k_init, k_state)

Shardings are data: the params take the rule table of `sharding` applied to the model's
logical axis names (LoRA params their own), and the optimizer state follows the params it
mirrors through `sharding.state_specs` (optax.tree_map_params), so Adam's moments are
sharded exactly like the weights they belong to and scalars are replicated.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from semloss_jax.errors import ConfigError
from semloss_jax.loss import cost
from semloss_jax.models import llama, loading
from semloss_jax.models import lora as lora_lib
from semloss_jax.models.llama import LlamaConfig
from semloss_jax.train import optim, sharding, step
from semloss_jax.train.config import ModelSection

# the fields that a given model.arch must share with the loaded weights
_ARCH_CHECK = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings")


def model_config_of(m: ModelSection) -> LlamaConfig:
    """The model config from model.arch (no weights needed), with the numerics overrides."""
    if m.arch is None:
        raise ConfigError("not set; the model config comes from the weights", key="model.arch")
    out = dataclasses.replace(m.arch, dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat,
                              attention=m.attention, source=m.arch.source or "model.arch")
    out.validate()
    return out


def build_model(m: ModelSection) -> tuple[LlamaConfig, Any]:
    """(model config, params as host numpy arrays in model.param_dtype), or (config, None) for
    init=random: random params are then created directly in their shards (`initial_state`)."""
    if m.init == "random":
        return model_config_of(m), None
    mcfg, params, path = loading.load_weights(m.path)
    mcfg = dataclasses.replace(mcfg, dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat,
                               attention=m.attention)
    if m.arch is not None:
        bad = [f for f in _ARCH_CHECK if getattr(m.arch, f) != getattr(mcfg, f)]
        if bad:
            raise ConfigError(f"disagrees with the weights at {path} on " + ", ".join(
                f"{f} ({getattr(m.arch, f)} vs {getattr(mcfg, f)})" for f in bad), key="model.arch")
    pdt = np.dtype(jnp.dtype(m.param_dtype))
    params = jax.tree_util.tree_map(lambda a: np.asarray(a).astype(pdt), params)
    return mcfg, params


class StatePlan(NamedTuple):
    """The optimizer, the abstract train state and its shardings (no array allocated)."""

    optimizer: Any
    init_state: Callable            # (params, key) -> train state
    abstract_params: Any
    param_specs: Any
    param_shardings: Any
    abstract_state: Any
    state_specs: Any
    state_shardings: Any
    fallbacks: list                 # rule fallbacks and large replicated params, as text


def plan_state(model_cfg: LlamaConfig, ocfg: optim.OptimConfig, mesh,
               key: jax.Array | None = None) -> StatePlan:
    """Optimizer, abstract train state and shardings of every leaf, via jax.eval_shape."""
    optimizer = optim.make_optimizer(ocfg)
    key = jax.random.PRNGKey(0) if key is None else key
    fallbacks: list[str] = []
    abstract_params = llama.abstract_params(model_cfg)
    param_logical = llama.param_logical_axes(model_cfg)
    param_specs = sharding.tree_specs(abstract_params, param_logical, mesh, fallbacks=fallbacks)

    def init_state(p, k):
        return step.init_train_state(p, model_cfg, ocfg, optimizer, k)

    abstract_state = jax.eval_shape(init_state, abstract_params, key)
    lora = ocfg.trainable == "lora"
    specs = sharding.state_specs(
        abstract_state, optimizer=optimizer,
        trainable_logical=lora_lib.lora_logical_axes(model_cfg, ocfg) if lora else param_logical,
        frozen_logical=param_logical if lora else None, mesh=mesh, fallbacks=fallbacks)
    fallbacks += sharding.replicated_large_params(abstract_state["params"], specs["params"], mesh)
    if abstract_state.get("frozen") is not None:
        fallbacks += sharding.replicated_large_params(abstract_state["frozen"], specs["frozen"], mesh,
                                                      prefix="frozen/")
    return StatePlan(optimizer, init_state, abstract_params, param_specs,
                     sharding.named(mesh, param_specs), abstract_state, specs,
                     sharding.named(mesh, specs), fallbacks)


def initial_state(plan: StatePlan, model_cfg: LlamaConfig, host_params, k_init: jax.Array,
                  k_state: jax.Array) -> tuple[dict, jax.Array]:
    """(train state, Ê) placed in their shardings by one compiled program.

    Ê (cost.unit_embeddings) is taken from the INITIAL embeddings, once: the semantic geometry
    of the loss is frozen and never recomputed from the trained params. host_params None:
    random params from k_init, created directly in their shards.
    """
    E_sharding = plan.param_shardings["embed"]["embedding"]
    out_sh = (plan.state_shardings, E_sharding)

    def init_all(p, k):
        return plan.init_state(p, k), cost.unit_embeddings(llama.embedding_matrix(p))

    if host_params is None:
        return jax.jit(lambda ki, ks: init_all(llama.init_params(model_cfg, ki), ks),
                       out_shardings=out_sh)(k_init, k_state)
    params = jax.tree_util.tree_map(jax.device_put, host_params, plan.param_shardings)
    return jax.jit(init_all, out_shardings=out_sh, donate_argnums=(0,))(params, k_state)


@jax.jit
def params_finite(params) -> jax.Array:
    """True when every entry of every leaf is finite."""
    leaves = jax.tree_util.tree_leaves(params)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))
