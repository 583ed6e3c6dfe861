"""Grouped-query attention kernels behind one function, `attend`, which both the training forward
and the KV-cache forward of models/llama.py call.

The masking rule is the model's (llama.attention_mask_from): key s is visible from query t iff
slot(s) <= slot(t), segment(s) == segment(t) and segment(s) != 0. Every kernel gives the same
output at every non-padding query; a padding query (segment 0) carries no loss and its output
differs between kernels (the reference averages every key, the flash kernels attend within
segment 0).

Kernels (`impl`):
    reference  the einsum with float32 scores [B, KV, G, T, S] and a boolean mask: the CPU
               reference and the KV-cache path
    chunked    the reference on blocks of CHUNK_Q queries, each rematerialized in the backward:
               the same math with O(CHUNK_Q x S) scores (CPU and memory plans)
    xla        jax.nn.dot_product_attention(implementation="xla"), the mask as an argument: the
               CPU-testable twin of the cudnn call
    cudnn      jax.nn.dot_product_attention(implementation="cudnn"): cuDNN flash attention on
               GPU (bf16/fp16), causal with the segment mask
    splash     the Pallas splash-attention kernel (TPU) with segment ids, per device under
               shard_map when activation rules are in force; interpreted off TPU (tests)
    auto       cudnn on GPU (bf16/fp16 compute), splash on TPU, reference elsewhere
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from semloss_jax.models import axes

IMPLS = ("auto", "reference", "chunked", "xla", "cudnn", "splash")
CHUNK_Q = 128
SPLASH_BLOCK = 512


def resolve_impl(impl: str, dtype, seq_len: int) -> str:
    """The kernel `auto` stands for on this backend (explicit choices are returned as given)."""
    if impl != "auto":
        return impl
    backend = jax.default_backend()
    if backend == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    if backend == "tpu" and seq_len % 128 == 0:
        return "splash"
    return "reference"


def attend(q: jax.Array, k: jax.Array, v: jax.Array, ctx: dict, impl: str) -> jax.Array:
    """softmax(q k^T / sqrt(hd)) v under the masking rule of ctx.

    q [B, T, H, hd], k and v [B, S, KV, hd] (H a multiple of KV) -> [B, T, H, hd] in q's dtype.
    ctx: "mask" [B, T, S] (every kernel but splash) and "segment_ids" [B, T] (splash; T == S).
    """
    impl = resolve_impl(impl, q.dtype, q.shape[1])
    if impl == "reference":
        return reference_attention(q, k, v, ctx["mask"])
    if impl == "chunked":
        return chunked_attention(q, k, v, ctx["mask"])
    if impl in ("xla", "cudnn"):
        return jax.nn.dot_product_attention(q, k, v, mask=ctx["mask"][:, None], is_causal=impl == "cudnn",
                                            implementation=impl)
    if impl == "splash":
        return splash_attention(q, k, v, ctx["segment_ids"])
    raise ValueError(f"unknown attention implementation {impl!r}; expected one of {IMPLS}")


def reference_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """The einsum kernel: float32 scores, masked with -1e30, float32 softmax, probs in q's dtype."""
    B, T, H, hd = q.shape
    KV = k.shape[2]
    qg = q.reshape(B, T, KV, H // KV, hd)
    scores = jnp.einsum("btkgh,bskh->bkgts", qg, k, preferred_element_type=jnp.float32)
    scores = scores * (1.0 / math.sqrt(hd))
    scores = jnp.where(mask[:, None, None, :, :], scores, jnp.float32(-1e30))
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    return jnp.einsum("bkgts,bskh->btkgh", probs, v).reshape(B, T, H, hd)


def chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                      block: int = CHUNK_Q) -> jax.Array:
    """reference_attention on query blocks of `block` rows (lax.map, each block rematerialized in
    the backward): only one block's [B, KV, G, block, S] scores are alive at a time."""
    B, T, H, hd = q.shape
    if T <= block or T % block:
        return reference_attention(q, k, v, mask)
    n = T // block
    qb = jnp.moveaxis(q.reshape(B, n, block, H, hd), 1, 0)
    mb = jnp.moveaxis(mask.reshape(B, n, block, mask.shape[-1]), 1, 0)
    one = jax.checkpoint(lambda qm: reference_attention(qm[0], k, v, qm[1]))
    out = jax.lax.map(one, (qb, mb))
    return jnp.moveaxis(out, 0, 1).reshape(B, T, H, hd)


# ---------------------------------------------------------------------------------------------
# splash (Pallas, TPU)


def _splash_sharding(names, shape):
    """The activation sharding of a splash operand under the rules in force (None = no rules)."""
    resolve = axes.current_resolver()
    return None if resolve is None else resolve(tuple(names), shape)


@functools.lru_cache(maxsize=16)
def _splash_kernel(groups: int, seq: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as sa  # TPU kernels: only when used

    b = min(SPLASH_BLOCK, seq)
    sizes = sa.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                          block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
    mask = sa.MultiHeadMask([sa.CausalMask((seq, seq)) for _ in range(groups)])
    kernel = sa.make_splash_mqa(mask, head_shards=1, q_seq_shards=1, block_sizes=sizes, interpret=interpret)
    return kernel, sa.SegmentIds


def _splash_local(q, k, v, seg):
    """Per device: q [B, T, H, hd], k/v [B, S, KV, hd], seg [B, T]; the MQA kernel per kv head."""
    B, T, H, hd = q.shape
    KV = k.shape[2]
    G = H // KV
    kernel, segment_ids = _splash_kernel(G, T, jax.default_backend() != "tpu")
    scale = jnp.asarray(1.0 / math.sqrt(hd), q.dtype)
    qg = jnp.transpose(q.reshape(B, T, KV, G, hd), (0, 2, 3, 1, 4)) * scale
    kt, vt = jnp.transpose(k, (0, 2, 1, 3)), jnp.transpose(v, (0, 2, 1, 3))

    def one(qh, kh, vh, s):
        return kernel(qh, kh, vh, segment_ids=segment_ids(q=s, kv=s))

    out = jax.vmap(jax.vmap(one, in_axes=(0, 0, 0, None)))(qg, kt, vt, seg)   # [B, KV, G, T, hd]
    return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(B, T, H, hd).astype(q.dtype)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """The splash kernel with segment ids (causal within a segment). Under activation rules it
    runs per device (shard_map): rows over the batch axes, heads over the head axis when both the
    query and the key/value heads are sharded alike."""
    seg = segment_ids.astype(jnp.int32)
    q_sh = _splash_sharding(("batch", "seq", "heads", "head_dim"), q.shape)
    if q_sh is None:
        return _splash_local(q, k, v, seg)
    qs = tuple(q_sh.spec) + (None,) * (4 - len(q_sh.spec))
    ks = tuple(_splash_sharding(("batch", "seq", "kv_heads", "head_dim"), k.shape).spec) + (None,) * 4
    head = qs[2] if qs[2] == ks[2] else None
    spec4, spec2 = P(qs[0], None, head, None), P(qs[0], None)
    fn = jax.shard_map(_splash_local, mesh=q_sh.mesh, in_specs=(spec4, spec4, spec4, spec2),
                       out_specs=spec4, check_vma=False)
    return fn(q, k, v, seg)

