"""A Llama-family causal language model in Flax (linen); `hf_config` builds its config from a
Hugging Face config.json.

Covers Llama 2/3, Mistral (full attention; see `sliding_window` below), Qwen2 (q/k/v biases) and
SmolLM: RMSNorm, rotary position embeddings (configurable theta; linear and llama3 scaling),
grouped-query attention, SwiGLU MLP, tied or untied LM head.

Design:
- Params are a plain pytree (`init_params` returns unboxed arrays) and `forward` is pure.
- The decoder layers are stacked along a leading "layers" axis (`nn.scan` at init) and run with
  `lax.scan` (one compiled layer body, whatever the depth), optionally rematerialized
  (`cfg.remat`); a frozen prefix of layers (`frozen_layers`) skips its backward pass.
- Every parameter carries logical axis names (`param_logical_axes`), and so do the activations
  (the residual stream, q/k/v, the MLP's hidden layer, the logits: models/axes.constrain), so
  sharding is data: the training code maps logical names to mesh axes with rule tables.
- The projections and the MLP multiply flat tokens [B*T, d] (one contracting axis, so the
  weight gradients need no transposed copies on XLA:CPU), and SwiGLU has its own backward
  (`swiglu`); docs/PERFORMANCE.md section 3 has the profile behind both.
- Attention runs through models/attention.attend (one function for training and the KV cache);
  `cfg.attention` picks the training kernel (einsum reference, chunked, cuDNN, Pallas splash).
- Attention masking is one rule for training, packing and cached decoding:
  key s is visible from query t iff slot(s) <= slot(t), segment(s) == segment(t) and
  segment(s) != 0 (segment 0 is padding). `positions` only drive RoPE.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from semloss_jax.errors import ConfigError, ModelError
from semloss_jax.models import attention as attn_lib
from semloss_jax.models.axes import constrain

Params = Any

DTYPES = ("float32", "bfloat16", "float16")
REMAT = ("none", "full", "dots")
_POSITIVE_INTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "head_dim",
                  "max_position_embeddings")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """The model's architecture (from an HF config.json or GGUF metadata) and its numerics:
    compute/param dtypes and rematerialization."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    # ("linear", factor) or ("llama3", factor, low_freq_factor, high_freq_factor, original_max_pos)
    rope_scaling: tuple | None = None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    max_position_embeddings: int = 4096
    model_type: str = "llama"
    sliding_window: int | None = None  # informational: attention here is full (exact when T <= window)
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    # numerics / memory, not part of the checkpoint
    dtype: str = "float32"        # activation/compute dtype
    param_dtype: str = "float32"
    remat: str = "none"           # "none" | "full" | "dots" (save matmul outputs)
    attention: str = "auto"       # the training kernel (models/attention.py IMPLS)
    source: str = ""              # where the config came from (for error messages)

    @property
    def num_params(self) -> int:
        """Parameter count of the architecture (embedding, layers, final norm, untied LM head)."""
        d, f, L, V = self.hidden_size, self.intermediate_size, self.num_hidden_layers, self.vocab_size
        hq, hkv, hd = self.num_attention_heads, self.num_key_value_heads, self.head_dim
        per_layer = d * hd * (hq + 2 * hkv) + hq * hd * d + 3 * d * f + 2 * d
        if self.qkv_bias:
            per_layer += hd * (hq + 2 * hkv)
        head = 0 if self.tie_word_embeddings else d * V
        return V * d + L * per_layer + d + head

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward), PaLM-style: 6 N_matmul + 12 L T H hd.

        N_matmul counts every weight used in a matmul once per token (the LM head included, the
        embedding lookup not); attention scores are counted for the full (non-causal) square.
        """
        d, f, L, V = self.hidden_size, self.intermediate_size, self.num_hidden_layers, self.vocab_size
        hq, hkv, hd = self.num_attention_heads, self.num_key_value_heads, self.head_dim
        n_matmul = L * (d * hd * (hq + 2 * hkv) + hq * hd * d + 3 * d * f) + V * d
        return 6.0 * n_matmul + 12.0 * L * seq_len * hq * hd

    def validate(self) -> None:
        """Check every field; a ConfigError names the field and where the config came from."""
        def bad(key: str, msg: str) -> ConfigError:
            return ConfigError(msg, key=key, file=self.source or None)

        for f in _POSITIVE_INTS:
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise bad(f, f"{f}={v!r}; expected a positive integer")
        if self.num_attention_heads % self.num_key_value_heads:
            raise bad("num_key_value_heads", f"num_attention_heads={self.num_attention_heads} is not a "
                      f"multiple of num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim % 2:
            raise bad("head_dim", f"head_dim={self.head_dim} must be even for RoPE")
        for f in ("rope_theta", "rms_norm_eps"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < math.inf:
                raise bad(f, f"{f}={v!r}; expected a positive number")
        if self.remat not in REMAT:
            raise bad("remat", f"remat={self.remat!r}; expected one of {', '.join(REMAT)}")
        if self.attention not in attn_lib.IMPLS:
            raise bad("attention", f"attention={self.attention!r}; expected one of "
                      f"{', '.join(attn_lib.IMPLS)}")
        for f in ("dtype", "param_dtype"):
            if getattr(self, f) not in DTYPES:
                raise bad(f, f"{f}={getattr(self, f)!r}; expected one of {', '.join(DTYPES)}")


def tiny_config(**kw) -> LlamaConfig:
    """A tiny random Llama for fast tests (GQA, untied head unless asked)."""
    base = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=10000.0,
                rms_norm_eps=1e-5, tie_word_embeddings=False, max_position_embeddings=512)
    base.update(kw)
    cfg = LlamaConfig(**base)
    cfg.validate()
    return cfg


# --------------------------------------------------------------------------------------------
# Rotary position embeddings


def rope_inv_freq(cfg: LlamaConfig) -> np.ndarray:
    """RoPE inverse frequencies [head_dim // 2] (float32), with linear or llama3 scaling applied."""
    hd = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    if cfg.rope_scaling is None:
        return inv.astype(np.float32)
    if cfg.rope_scaling[0] == "linear":
        return (inv / cfg.rope_scaling[1]).astype(np.float32)
    _, factor, lo, hi, orig = cfg.rope_scaling
    low_wl, high_wl = orig / lo, orig / hi
    wl = 2 * math.pi / inv
    scaled = np.where(wl > low_wl, inv / factor, inv)
    smooth = (orig / wl - lo) / (hi - lo)
    mid = (1 - smooth) * scaled / factor + smooth * scaled
    is_mid = (wl >= high_wl) & (wl <= low_wl)
    return np.where(is_mid, mid, scaled).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """x: [B, T, heads, hd]; positions: [B, T]. Half-split (rotate_half) convention of HF."""
    ang = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B,T,hd/2]
    cos = jnp.cos(ang)[:, :, None, :]
    sin = jnp.sin(ang)[:, :, None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


# --------------------------------------------------------------------------------------------
# Modules


def _dt(name: str):
    return jnp.dtype(name)


def _init(std: float, names: tuple[str, ...]):
    return nn.with_logical_partitioning(nn.initializers.normal(std), names)


class RMSNorm(nn.Module):
    """Root-mean-square layer norm with a learned scale, computed in float32."""

    eps: float
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x):
        """Normalize x over its last axis; the result is cast to the module's dtype."""
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                           (x.shape[-1],), self.param_dtype)
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (scale.astype(jnp.float32) * xf).astype(self.dtype)


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE and an optional KV cache."""

    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x, ctx, layer_cache):
        """Attend over x under the masking rule of ctx; returns (output, updated layer cache or None)."""
        cfg = self.cfg
        dt, pdt = _dt(cfg.dtype), _dt(cfg.param_dtype)
        H, KV, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        B, T = x.shape[:2]
        xf = constrain(x, ("batch", "seq", "embed")).reshape(B * T, x.shape[-1])  # see MLP

        def proj(name, heads, kv: bool):
            axes = ("embed", "kv_heads" if kv else "q_heads", "head_dim")
            return nn.DenseGeneral(
                (heads, hd), axis=-1, use_bias=cfg.qkv_bias, dtype=dt, param_dtype=pdt, name=name,
                kernel_init=_init(0.02, axes),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[1:]))(xf).reshape(
                    B, T, heads, hd)

        q = constrain(apply_rope(proj("q_proj", H, False), ctx["positions"], ctx["inv_freq"]),
                      ("batch", "seq", "heads", "head_dim"))
        k = constrain(apply_rope(proj("k_proj", KV, True), ctx["positions"], ctx["inv_freq"]),
                      ("batch", "seq", "kv_heads", "head_dim"))
        v = constrain(proj("v_proj", KV, True), ("batch", "seq", "kv_heads", "head_dim"))

        if layer_cache is not None:  # write this step's keys/values at the cache index
            idx = ctx["cache_index"]
            k_all = write_slots(layer_cache["k"], k.astype(layer_cache["k"].dtype), idx)
            v_all = write_slots(layer_cache["v"], v.astype(layer_cache["v"].dtype), idx)
            new_cache = {"k": k_all, "v": v_all}
            k, v = k_all.astype(dt), v_all.astype(dt)
        else:
            new_cache = None

        impl = "reference" if layer_cache is not None else cfg.attention
        out = constrain(attn_lib.attend(q, k, v, ctx, impl), ("batch", "seq", "heads", "head_dim"))
        out = nn.DenseGeneral(
            cfg.hidden_size, axis=(-2, -1), use_bias=cfg.o_bias, dtype=dt, param_dtype=pdt, name="o_proj",
            kernel_init=_init(0.02, ("q_heads", "head_dim", "embed")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))(
                out.reshape(B * T, H, hd))
        return out.reshape(B, T, cfg.hidden_size), new_cache


@jax.custom_vjp
def swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
    """silu(gate) * up, whose backward keeps only gate and up (sigmoid recomputed).

    Autodiff of the plain expression saves four [tokens, intermediate] residuals per layer
    (sigmoid, its complement, silu and up); under the layer scan XLA's CPU backend then fuses
    their strided reads into the transposing copy feeding the weight gradients.
    """
    return nn.silu(gate) * up


def _swiglu_fwd(gate, up):
    return swiglu(gate, up), (gate, up)


def _swiglu_bwd(res, g):
    gate, up = res
    sig = jax.nn.sigmoid(gate)
    silu = gate * sig
    return g * up * (sig * (1 + gate * (1 - sig))), g * silu


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


class MLP(nn.Module):
    """SwiGLU feed-forward block: down(silu(gate(x)) * up(x))."""

    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x):
        """Apply the SwiGLU block to x [..., hidden_size]."""
        cfg = self.cfg
        dt, pdt = _dt(cfg.dtype), _dt(cfg.param_dtype)

        def dense(name, feat, axes):
            return nn.DenseGeneral(feat, use_bias=cfg.mlp_bias, dtype=dt, param_dtype=pdt, name=name,
                                   kernel_init=_init(0.02, axes),
                                   bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[1:]))

        # The matmuls run on tokens [B*T, d]: with one contracting axis the weight gradients are
        # plain transposed-operand dots (over [B, T] XLA's CPU backend first transposes the
        # [B, T, mlp] gradients, about a quarter of the layer's backward time). Positions are
        # gathered first (sequence parallelism shards them between blocks), so the merged
        # token axis is sharded like the rows.
        x = constrain(x, ("batch", "seq", "embed"))
        xf = x.reshape(-1, x.shape[-1])
        gate = dense("gate_proj", cfg.intermediate_size, ("embed", "mlp"))(xf)
        up = dense("up_proj", cfg.intermediate_size, ("embed", "mlp"))(xf)
        act = constrain(swiglu(gate, up), ("batch", "mlp"))
        out = dense("down_proj", cfg.hidden_size, ("mlp", "embed"))(act)
        return out.reshape(*x.shape[:-1], cfg.hidden_size)


# the residual stream between blocks: rows, positions (sequence-parallel), width
RESIDUAL = ("batch", "res_seq", "embed")


class DecoderLayer(nn.Module):
    """One pre-norm decoder layer: x + attention(norm(x)), then x + MLP(norm(x))."""

    cfg: LlamaConfig

    @nn.compact
    def __call__(self, x, layer_cache, ctx):
        """Apply the layer; returns (new hidden states, updated layer cache or None)."""
        cfg = self.cfg
        dt, pdt = _dt(cfg.dtype), _dt(cfg.param_dtype)
        h, new_cache = Attention(cfg, name="attn")(
            RMSNorm(cfg.rms_norm_eps, dt, pdt, name="attn_norm")(x), ctx, layer_cache)
        x = constrain(x + h, RESIDUAL)
        x = x + MLP(cfg, name="mlp")(RMSNorm(cfg.rms_norm_eps, dt, pdt, name="mlp_norm")(x))
        return constrain(x, RESIDUAL), new_cache


class LlamaForCausalLM(nn.Module):
    """Defines the params and their logical axes (used by `init_params` only).

    It runs each submodule once so that linen creates its parameters; the model itself is
    applied functionally by `forward` / `forward_with_cache` (`_apply`), which is the one
    place the forward computation is written.
    """

    cfg: LlamaConfig

    @nn.compact
    def __call__(self, input_ids, ctx):
        """Create every submodule's params once (embedding, scanned layers, final norm, LM head);
        returns nothing: the forward pass is `_apply`."""
        cfg = self.cfg
        dt, pdt = _dt(cfg.dtype), _dt(cfg.param_dtype)
        x = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dt, param_dtype=pdt, name="embed",
                     embedding_init=_init(0.02, ("vocab", "embed")))(input_ids)
        stack = nn.scan(DecoderLayer, variable_axes={"params": 0}, split_rngs={"params": True},
                        in_axes=(0, nn.broadcast), length=cfg.num_hidden_layers,
                        metadata_params={nn.PARTITION_NAME: "layers"})
        x, _ = stack(cfg, name="layers")(x, None, ctx)
        x = RMSNorm(cfg.rms_norm_eps, dt, pdt, name="final_norm")(x)
        if not cfg.tie_word_embeddings:
            nn.DenseGeneral(cfg.vocab_size, use_bias=False, dtype=dt, param_dtype=pdt, name="lm_head",
                            kernel_init=_init(0.02, ("embed", "vocab")))(x)


# --------------------------------------------------------------------------------------------
# Pure functional API


def default_positions(segment_ids: jax.Array) -> jax.Array:
    """Positions that skip padding (left padding included): cumsum(valid) - 1, clipped at 0."""
    valid = (segment_ids != 0).astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(valid, axis=-1) - 1, 0)


def attention_mask_from(q_slot, q_seg, k_slot, k_seg) -> jax.Array:
    """[B, T, S] boolean: causal by slot, same segment, key not padding."""
    causal = k_slot[:, None, :] <= q_slot[:, :, None]
    same = q_seg[:, :, None] == k_seg[:, None, :]
    return causal & same & (k_seg[:, None, :] != 0)


def _context(cfg, input_ids, positions, segment_ids, attention_mask):
    B, T = input_ids.shape
    if segment_ids is None:
        segment_ids = (jnp.ones((B, T), jnp.int32) if attention_mask is None
                       else attention_mask.astype(jnp.int32))
    if positions is None:
        positions = default_positions(segment_ids)
    slot = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    return {"positions": positions, "mask": attention_mask_from(slot, segment_ids, slot, segment_ids),
            "segment_ids": segment_ids, "inv_freq": rope_inv_freq(cfg), "cache_index": jnp.int32(0)}


def _run_layers(layer_params, cfg: LlamaConfig, x, ctx, frozen_layers: int = 0):
    """The decoder stack as a lax.scan over the stacked layer params (one compiled body).

    The embedding output and the first `frozen_layers` layers pass through stop_gradient (those
    layers run in a separate scan), so their backward pass is never computed (cheap
    last-K-layers training).
    """
    block = DecoderLayer(cfg)

    def body(h, lp):
        h, _ = block.apply({"params": lp}, h, None, ctx)
        return h, None

    if cfg.remat != "none":
        policy = (jax.checkpoint_policies.dots_with_no_batch_dims_saveable if cfg.remat == "dots" else None)
        body = jax.checkpoint(body, prevent_cse=False, policy=policy)
    L = cfg.num_hidden_layers
    if not 0 <= frozen_layers <= L:
        raise ValueError(f"frozen_layers={frozen_layers} must be in [0, num_hidden_layers={L}]")
    if frozen_layers == 0:
        return jax.lax.scan(body, x, layer_params)[0]
    x = jax.lax.stop_gradient(x)
    x, _ = jax.lax.scan(body, x, jax.tree_util.tree_map(lambda a: a[:frozen_layers], layer_params))
    x = jax.lax.stop_gradient(x)  # nothing below this point gets a gradient or a backward pass
    if frozen_layers == L:
        return x
    return jax.lax.scan(body, x, jax.tree_util.tree_map(lambda a: a[frozen_layers:], layer_params))[0]


def _apply(params, cfg: LlamaConfig, input_ids, run_layers, return_hidden: bool, last_only: bool = False,
           vocab_chunk: int | None = None):
    """Embedding, run_layers(layer params, x) -> (x, extra), final norm, LM head; returns (out, extra)."""
    dt = _dt(cfg.dtype)
    x = constrain(jnp.take(params["embed"]["embedding"], input_ids, axis=0).astype(dt), RESIDUAL)
    x, extra = run_layers(params["layers"], x)
    x = RMSNorm(cfg.rms_norm_eps, dt, _dt(cfg.param_dtype)).apply({"params": params["final_norm"]}, x)
    if last_only:  # decoding needs the next-token logits of the last slot only
        x = x[:, -1:]
    if return_hidden:
        return x, extra
    return head_logits(params, cfg, x, vocab_chunk), extra


def lm_logits(x: jax.Array, w: jax.Array) -> jax.Array:
    """Float32 logits [B, T, V] of final hidden states x [B, T, d] and the head w [d, V]."""
    logits = jnp.einsum("btd,dv->btv", x, w, preferred_element_type=jnp.float32)
    return constrain(logits, ("batch", "seq", "vocab"))


def forward(params: Params, cfg: LlamaConfig, input_ids: jax.Array, *, positions=None,
            segment_ids=None, attention_mask=None, return_hidden: bool = False,
            frozen_layers: int = 0) -> jax.Array:
    """Logits [B, T, V] in float32 (or final hidden states [B, T, d] with return_hidden=True).

    segment_ids: [B, T] ints, 0 = padding; equal ids attend to each other (packing).
    attention_mask: [B, T] 1/0, shorthand for segment_ids when not packing.
    positions: [B, T] RoPE positions; default counts valid tokens (left padding safe).
    frozen_layers: the embedding and the first n decoder layers get no gradient and their
      backward pass is skipped (the values are unchanged).
    """
    ctx = _context(cfg, input_ids, positions, segment_ids, attention_mask)

    def run_layers(layer_params, x):
        return _run_layers(layer_params, cfg, x, ctx, frozen_layers), None

    return _apply(params, cfg, input_ids, run_layers, return_hidden)[0]


def _layer_slice(layer_params, start: int, end: int):
    return jax.tree_util.tree_map(lambda a: a[start:end], layer_params)


def hidden_at_layers(params: Params, cfg: LlamaConfig, input_ids: jax.Array, layers: tuple[int, ...],
                     *, segment_ids=None) -> jax.Array:
    """[len(layers), B, T, d]: the hidden states after each listed decoder layer (1-based,
    strictly increasing), each passed through the final RMSNorm, from ONE pass through the stack.

    hidden_at_layers(..., (num_hidden_layers,))[0] equals forward(..., return_hidden=True).
    """
    L = cfg.num_hidden_layers
    if not layers or list(layers) != sorted(set(layers)) or not 1 <= layers[0] <= layers[-1] <= L:
        raise ValueError(f"layers={layers} must be strictly increasing in [1, {cfg.num_hidden_layers}]")
    ctx = _context(cfg, input_ids, None, segment_ids, None)
    dt = _dt(cfg.dtype)
    norm = RMSNorm(cfg.rms_norm_eps, dt, _dt(cfg.param_dtype))
    x = jnp.take(params["embed"]["embedding"], input_ids, axis=0).astype(dt)
    outs, start = [], 0
    for end in layers:
        part_cfg = dataclasses.replace(cfg, num_hidden_layers=end - start)
        x = _run_layers(_layer_slice(params["layers"], start, end), part_cfg, x, ctx)
        outs.append(norm.apply({"params": params["final_norm"]}, x))
        start = end
    return jnp.stack(outs)


def lm_head_matrix(params: Params, cfg: LlamaConfig) -> jax.Array:
    """[d, V] output projection (the transposed embedding for tied models)."""
    if cfg.tie_word_embeddings:
        return params["embed"]["embedding"].T
    return params["lm_head"]["kernel"]


def embedding_matrix(params: Params) -> jax.Array:
    """[V, d] input token embeddings."""
    return params["embed"]["embedding"]


# KV cache for decoding --------------------------------------------------------------------


def init_cache(cfg: LlamaConfig, batch: int, max_len: int, dtype: str | None = None,
               per_layer: bool = False) -> dict:
    """An empty KV cache for batch rows of up to max_len slots: k/v [L, batch, max_len, KV heads,
    head_dim] (per_layer: tuples of L arrays [batch, max_len, KV heads, head_dim], the layout
    that params with split layers decode against, see `split_layers`), per-slot segment ids and
    the write index 0."""
    dt = _dt(dtype or cfg.dtype)
    shape = (batch, max_len, cfg.num_key_value_heads, cfg.head_dim)
    if per_layer:
        k = tuple(jnp.zeros(shape, dt) for _ in range(cfg.num_hidden_layers))
        v = tuple(jnp.zeros(shape, dt) for _ in range(cfg.num_hidden_layers))
    else:
        k, v = jnp.zeros((cfg.num_hidden_layers, *shape), dt), jnp.zeros((cfg.num_hidden_layers, *shape), dt)
    return {"k": k, "v": v, "segment": jnp.zeros((batch, max_len), jnp.int32), "index": jnp.int32(0)}


def split_layers(params: Params) -> Params:
    """The params with "layers" as a tuple of per-layer param trees instead of stacked arrays (one
    copy of the layer weights). `forward_with_cache` then runs the decoder stack unrolled
    against a per-layer cache (`init_cache(per_layer=True)`): the same operations on the same
    values, so the same logits bit for bit, without the scan body's per-step copies of each
    layer's weights and cache slice out of the stacked arrays (on CPU a decode step at batch
    16 x 256 slots took 84 vs 105 ms; docs/PERFORMANCE.md)."""
    if layers_are_split(params):
        return params
    n = jax.tree_util.tree_leaves(params["layers"])[0].shape[0]
    return {**params, "layers": tuple(jax.tree_util.tree_map(lambda a, i=i: a[i], params["layers"])
                                      for i in range(n))}


def layers_are_split(params: Params) -> bool:
    """Whether params hold per-layer trees (`split_layers`) rather than stacked layer arrays."""
    return isinstance(params["layers"], tuple)


def write_slots(buf: jax.Array, new: jax.Array, index: jax.Array) -> jax.Array:
    """Write new [B, T, ...] into buf [B, S, ...] at slots [index, index + T) of axis 1.

    index: one slot for every row (a scalar: the batch decodes in lockstep) or one per row
    ([B]: rows admitted at different times, `generation.generate_ids(schedule="refill")`)."""
    if jnp.ndim(index) == 0:
        return jax.lax.dynamic_update_slice_in_dim(buf, new, index, 1)
    return jax.vmap(lambda b, n, i: jax.lax.dynamic_update_slice_in_dim(b, n, i, 0))(buf, new, index)


def _run_layers_cached(layer_params, cfg: LlamaConfig, x, ctx, k_cache, v_cache):
    """The decoder stack against a stacked KV cache, updated in place.

    A lax.scan over the stacked layer params whose carry holds the whole cache [L, B, S, KV, hd]:
    layer l reads its slice, attends, and writes back only the T new slots [index, index + T),
    so a decode step moves O(T) cache entries per layer instead of rebuilding the cache (the
    weights stay stacked: nothing is copied up front). With one index per row, layer l's whole
    updated slice is written back instead. With split layers (a tuple of per-layer params and
    per-layer caches) the layers run unrolled and each layer's cache is updated where it is.
    """
    block = DecoderLayer(cfg)
    if isinstance(layer_params, tuple):  # split layers (`split_layers`): unrolled, per-layer cache
        ks, vs = [], []
        for lp, kc, vc in zip(layer_params, k_cache, v_cache, strict=True):
            x, new = block.apply({"params": lp}, x, {"k": kc, "v": vc}, ctx)
            ks.append(new["k"])
            vs.append(new["v"])
        return x, tuple(ks), tuple(vs)
    idx = ctx["cache_index"]
    T = x.shape[1]
    zero = jnp.int32(0)

    def body(carry, lp):
        h, kc, vc, layer = carry
        lc = {"k": jax.lax.dynamic_index_in_dim(kc, layer, 0, keepdims=False),
              "v": jax.lax.dynamic_index_in_dim(vc, layer, 0, keepdims=False)}
        h, new = block.apply({"params": lp}, h, lc, ctx)
        if jnp.ndim(idx) == 0:
            at = (layer, zero, idx, zero, zero)
            kc = jax.lax.dynamic_update_slice(kc, jax.lax.dynamic_slice_in_dim(new["k"], idx, T, 1)[None], at)
            vc = jax.lax.dynamic_update_slice(vc, jax.lax.dynamic_slice_in_dim(new["v"], idx, T, 1)[None], at)
        else:
            at = (layer, zero, zero, zero, zero)
            kc = jax.lax.dynamic_update_slice(kc, new["k"][None], at)
            vc = jax.lax.dynamic_update_slice(vc, new["v"][None], at)
        return (h, kc, vc, layer + 1), None

    (x, k_cache, v_cache, _), _ = jax.lax.scan(body, (x, k_cache, v_cache, jnp.int32(0)), layer_params)
    return x, k_cache, v_cache


def head_logits(params: Params, cfg: LlamaConfig, x: jax.Array, vocab_chunk: int | None = None) -> jax.Array:
    """Logits [B, T, V] (float32) of final hidden states x [B, T, d] under the params' LM head.

    vocab_chunk: compute them in blocks of that many vocabulary rows (a loop over blocks; the
    last block is shifted back to end at V, so any V works). Each output is the same dot
    product as in one matmul; on CPU, a [few rows, d] x [d, V] product runs faster in blocks
    whose weights stay in cache (bench/generation_speed.py, docs/PERFORMANCE.md). A tied head
    is sliced by rows of the [V, d] embedding, never transposed as a whole.
    """
    dt = _dt(cfg.dtype)
    V = cfg.vocab_size
    if vocab_chunk is None or vocab_chunk >= V:
        return lm_logits(x, lm_head_matrix(params, cfg).astype(dt))
    tied = cfg.tie_word_embeddings
    w = params["embed"]["embedding"] if tied else params["lm_head"]["kernel"]  # [V, d] or [d, V]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    spec = "nd,vd->nv" if tied else "nd,dv->nv"

    def block(i, out):
        start = jnp.minimum(i * vocab_chunk, V - vocab_chunk)
        wi = jax.lax.dynamic_slice_in_dim(w, start, vocab_chunk, 0 if tied else 1).astype(dt)
        part = jnp.einsum(spec, x2, wi, preferred_element_type=jnp.float32)
        return jax.lax.dynamic_update_slice_in_dim(out, part, start, 1)

    out = jax.lax.fori_loop(0, -(-V // vocab_chunk), block, jnp.zeros((x2.shape[0], V), jnp.float32))
    return out.reshape(*lead, V)


def forward_with_cache(params: Params, cfg: LlamaConfig, input_ids: jax.Array, positions: jax.Array,
                       segment_ids: jax.Array, cache: dict, last_only: bool = False,
                       vocab_chunk: int | None = None):
    """Run T new tokens against the cache; returns (logits [B,T,V], updated cache).

    The new tokens occupy cache slots [index, index + T); cache["index"] is one slot for the
    whole batch (a scalar) or one per row ([B]). segment_ids: [B, T] (0 = padding). Params
    with split layers (`split_layers`) take a per-layer cache (`init_cache(per_layer=True)`).
    last_only: return the logits of the last slot only ([B, 1, V]): a prefill then skips the
    LM head on every prompt position. vocab_chunk: see `head_logits`.
    """
    B, T = input_ids.shape
    S = cache["segment"].shape[1]
    if layers_are_split(params) != isinstance(cache["k"], tuple):
        raise ModelError("forward_with_cache: params with split layers (`split_layers`) need a "
                          "per-layer cache (`init_cache(per_layer=True)`) and stacked params a "
                          "stacked cache")
    idx = cache["index"]
    k_seg = write_slots(cache["segment"], segment_ids.astype(jnp.int32), idx)
    first = idx[:, None] if jnp.ndim(idx) else idx
    q_slot = jnp.broadcast_to(first + jnp.arange(T, dtype=jnp.int32), (B, T))
    k_slot = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
    ctx = {"positions": positions, "inv_freq": rope_inv_freq(cfg), "cache_index": idx,
           "mask": attention_mask_from(q_slot, segment_ids, k_slot, k_seg)}

    def run_layers(layer_params, x):
        x, k_all, v_all = _run_layers_cached(layer_params, cfg, x, ctx, cache["k"], cache["v"])
        return x, (k_all, v_all)

    logits, (k_all, v_all) = _apply(params, cfg, input_ids, run_layers, False, last_only, vocab_chunk)
    return logits, {"k": k_all, "v": v_all, "segment": k_seg, "index": idx + T}


# Params and their logical axes ------------------------------------------------------------


def _boxed_init(cfg: LlamaConfig, key):
    ids = jnp.zeros((1, 1), jnp.int32)
    ctx = _context(cfg, ids, None, None, None)
    return LlamaForCausalLM(cfg).init(key, ids, ctx)["params"]


def init_params(cfg: LlamaConfig, key: jax.Array) -> Params:
    """Random params (normal std 0.02, norms at 1), unboxed plain arrays."""
    return nn.meta.unbox(_boxed_init(cfg, key))


def abstract_params(cfg: LlamaConfig) -> Params:
    """ShapeDtypeStructs of the params, without allocating anything."""
    return nn.meta.unbox(jax.eval_shape(lambda k: _boxed_init(cfg, k), jax.random.PRNGKey(0)))


def param_logical_axes(cfg: LlamaConfig) -> Params:
    """A pytree (same structure as params) of PartitionSpecs holding logical axis names."""
    boxed = jax.eval_shape(lambda k: _boxed_init(cfg, k), jax.random.PRNGKey(0))
    return nn.get_partition_spec(boxed)
