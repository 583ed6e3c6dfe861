"""Hugging Face config.json <-> LlamaConfig: the supported architectures and the field names.

cfg = from_hf_dict(json.load(open("config.json")), source="config.json")
d = to_hf_dict(cfg)          # what `weights.export_hf` writes; from_hf_dict(d) == cfg
"""
from __future__ import annotations

from typing import Any, Mapping

from semloss_jax.errors import ModelError
from semloss_jax.models.llama import LlamaConfig

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
SUPPORTED_MODEL_TYPES = {"llama", "mistral", "qwen2"}


def from_hf_dict(d: Mapping[str, Any], source: str = "config.json", **overrides) -> LlamaConfig:
    """Build from the fields of a Hugging Face config.json; errors name the file and field."""
    archs = d.get("architectures") or []
    model_type = d.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES and not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise ModelError(
            f"{source}: unsupported architecture (model_type={model_type!r}, architectures={archs}); "
            f"supported model types: {sorted(SUPPORTED_MODEL_TYPES)}")
    if model_type not in SUPPORTED_MODEL_TYPES:
        model_type = next(SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES)

    def req(key):
        if key not in d:
            raise ModelError(f"{source}: missing required field {key!r}")
        return d[key]

    hidden = int(req("hidden_size"))
    heads = int(req("num_attention_heads"))
    if d.get("hidden_act", "silu") not in ("silu", "swish"):
        raise ModelError(f"{source}: field 'hidden_act'={d['hidden_act']!r}; only silu is supported")
    head_dim = d.get("head_dim") or hidden // heads
    rs = d.get("rope_scaling") or d.get("rope_parameters")
    rope_theta = float(d.get("rope_theta") or (rs or {}).get("rope_theta") or 10000.0)
    scaling = None
    if rs:
        kind = rs.get("rope_type", rs.get("type", "default"))
        if kind == "linear":
            scaling = ("linear", float(rs["factor"]))
        elif kind == "llama3":
            scaling = ("llama3", float(rs["factor"]), float(rs["low_freq_factor"]),
                       float(rs["high_freq_factor"]), int(rs["original_max_position_embeddings"]))
        elif kind != "default":
            raise ModelError(f"{source}: field 'rope_scaling' type {kind!r} is not supported "
                              "(supported: default, linear, llama3)")
    eos = d.get("eos_token_id")
    if isinstance(eos, list):
        eos = tuple(int(e) for e in eos)
    attn_bias = bool(d.get("attention_bias", False))
    kw = dict(
        vocab_size=int(req("vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(req("intermediate_size")),
        num_hidden_layers=int(req("num_hidden_layers")),
        num_attention_heads=heads,
        num_key_value_heads=int(d.get("num_key_value_heads") or heads),
        head_dim=int(head_dim),
        rope_theta=rope_theta,
        rope_scaling=scaling,
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        qkv_bias=attn_bias or model_type == "qwen2",
        o_bias=attn_bias,
        mlp_bias=bool(d.get("mlp_bias", False)),
        max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
        model_type=model_type,
        sliding_window=d.get("sliding_window") if d.get("use_sliding_window", True) else None,
        bos_token_id=d.get("bos_token_id"),
        eos_token_id=eos,
        source=source,
    )
    kw.update(overrides)
    cfg = LlamaConfig(**kw)
    cfg.validate()
    return cfg


def to_hf_dict(cfg: LlamaConfig) -> dict:
    """The Hugging Face config.json fields of a LlamaConfig (what export_hf writes)."""
    arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
            "qwen2": "Qwen2ForCausalLM"}[cfg.model_type]
    out = {
        "architectures": [arch], "model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim,
        "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_word_embeddings, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "torch_dtype": "float32",
    }
    if cfg.model_type == "llama":
        out["attention_bias"] = cfg.qkv_bias
        out["mlp_bias"] = cfg.mlp_bias
    if cfg.rope_scaling is not None:
        if cfg.rope_scaling[0] == "linear":
            out["rope_scaling"] = {"rope_type": "linear", "factor": cfg.rope_scaling[1]}
        else:
            _, f, lo, hi, orig = cfg.rope_scaling
            out["rope_scaling"] = {"rope_type": "llama3", "factor": f, "low_freq_factor": lo,
                                   "high_freq_factor": hi, "original_max_position_embeddings": orig}
    if cfg.bos_token_id is not None:
        out["bos_token_id"] = cfg.bos_token_id
    if cfg.eos_token_id is not None:
        eos = cfg.eos_token_id
        out["eos_token_id"] = list(eos) if isinstance(eos, tuple) else eos
    if cfg.model_type == "mistral":
        out["sliding_window"] = cfg.sliding_window
    return out
