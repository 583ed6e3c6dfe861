"""Load and save model weights: Hugging Face safetensors directories and GGUF files.

    cfg, params = load_model(path)        # a GGUF file or an HF directory (config.json + *.safetensors)
    export_hf(params, cfg, out_dir)       # an HF directory that transformers loads

HF -> Flax layout (per layer i, stacked along a leading layers axis):
    q_proj.weight [H*hd, d]  -> layers/attn/q_proj/kernel [L, d, H, hd]
    k_proj/v_proj [KV*hd, d] -> [L, d, KV, hd]
    o_proj.weight [d, H*hd]  -> layers/attn/o_proj/kernel [L, H, hd, d]
    gate/up_proj [F, d]      -> [L, d, F];  down_proj [d, F] -> [L, F, d]
    input_layernorm / post_attention_layernorm -> attn_norm / mlp_norm scale [L, d]
GGUF stores the same matrices (llama.cpp names) but permutes the rows of Q and K for its
interleaved RoPE; `_unpermute` undoes it so that the half-split (HF) RoPE applies.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from typing import Any, Callable

import numpy as np
from huggingface_hub import snapshot_download
from safetensors import safe_open
from safetensors.numpy import save_file

from semloss_jax.errors import ConfigError, ModelError
from semloss_jax.models import hf_config
from semloss_jax.models.llama import LlamaConfig, abstract_params

Params = Any


# ------------------------------------------------------------------------------------------
# Layout conversion shared by both formats: a flat {hf_name: [out, in] array} <-> params


def _layer_map(cfg: LlamaConfig) -> dict[str, tuple[str, Callable, Callable]]:
    """HF suffix -> (flax path, hf->flax fn, flax->hf fn) for one layer."""
    d, H, KV, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim

    def heads_in(n):
        return (lambda w: w.T.reshape(d, n, hd), lambda k: k.reshape(d, n * hd).T)

    m = {
        "self_attn.q_proj.weight": ("attn/q_proj/kernel", *heads_in(H)),
        "self_attn.k_proj.weight": ("attn/k_proj/kernel", *heads_in(KV)),
        "self_attn.v_proj.weight": ("attn/v_proj/kernel", *heads_in(KV)),
        "self_attn.o_proj.weight": ("attn/o_proj/kernel", lambda w: w.T.reshape(H, hd, d),
                                    lambda k: k.reshape(H * hd, d).T),
        "mlp.gate_proj.weight": ("mlp/gate_proj/kernel", lambda w: w.T, lambda k: k.T),
        "mlp.up_proj.weight": ("mlp/up_proj/kernel", lambda w: w.T, lambda k: k.T),
        "mlp.down_proj.weight": ("mlp/down_proj/kernel", lambda w: w.T, lambda k: k.T),
        "input_layernorm.weight": ("attn_norm/scale", lambda w: w, lambda k: k),
        "post_attention_layernorm.weight": ("mlp_norm/scale", lambda w: w, lambda k: k),
    }
    if cfg.qkv_bias:
        for name, n in (("q_proj", H), ("k_proj", KV), ("v_proj", KV)):
            m[f"self_attn.{name}.bias"] = (f"attn/{name}/bias", lambda b, n=n: b.reshape(n, hd),
                                           lambda b: b.reshape(-1))
    if cfg.o_bias:
        m["self_attn.o_proj.bias"] = ("attn/o_proj/bias", lambda b: b, lambda b: b)
    if cfg.mlp_bias:
        for name in ("gate_proj", "up_proj", "down_proj"):
            m[f"mlp.{name}.bias"] = (f"mlp/{name}/bias", lambda b: b, lambda b: b)
    return m


def _set(tree: dict, path: str, value) -> None:
    keys = path.split("/")
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
    tree[keys[-1]] = value


def _get(tree: dict, path: str):
    for k in path.split("/"):
        tree = tree[k]
    return tree


def params_from_hf_tensors(cfg: LlamaConfig, get: Callable[[str], np.ndarray], has: Callable[[str], bool],
                           source: str, dtype=np.float32) -> Params:
    """Assemble the Flax params from HF-named tensors; checks every shape against the config."""
    expected = abstract_params(cfg)
    params: dict = {}

    def fetch(name):
        if not has(name):
            raise ModelError(f"{source}: missing tensor {name!r}")
        return np.asarray(get(name), dtype=dtype)

    def check(path, value, hf_name, layer=None):
        want = _get(expected, path).shape
        want = want[1:] if layer is not None else want
        if tuple(value.shape) != tuple(want):
            raise ModelError(f"{source}: tensor {hf_name!r} has shape {tuple(value.shape)} after "
                               f"conversion, but the config ({cfg.source or 'config'}) implies {tuple(want)}")
        return value

    def convert(path, hf_name, fn, layer=None):
        w = fetch(hf_name)
        try:
            v = fn(w)
        except ValueError as e:
            raise ModelError(f"{source}: tensor {hf_name!r} of shape {w.shape} does not match the config "
                               f"({cfg.source or 'config'}): {e}") from None
        return check(path, v, hf_name, layer)

    _set(params, "embed/embedding", convert("embed/embedding", "model.embed_tokens.weight", lambda w: w))
    _set(params, "final_norm/scale", convert("final_norm/scale", "model.norm.weight", lambda w: w))
    if not cfg.tie_word_embeddings:
        name = "lm_head.weight"
        _set(params, "lm_head/kernel", convert("lm_head/kernel", name, lambda w: w.T))
    for suffix, (path, to_flax, _) in _layer_map(cfg).items():
        per_layer = [convert(f"layers/{path}", f"model.layers.{i}.{suffix}", to_flax, layer=i)
                     for i in range(cfg.num_hidden_layers)]
        _set(params, f"layers/{path}", np.stack(per_layer))
    return params


def params_to_hf_tensors(params: Params, cfg: LlamaConfig) -> dict[str, np.ndarray]:
    """Flax params -> HF Llama tensors (per-layer names, HF [out, in] layout), contiguous numpy."""
    out = {"model.embed_tokens.weight": np.asarray(params["embed"]["embedding"]),
           "model.norm.weight": np.asarray(params["final_norm"]["scale"])}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = np.asarray(params["lm_head"]["kernel"]).T
    for suffix, (path, _, to_hf) in _layer_map(cfg).items():
        stacked = np.asarray(_get(params["layers"], path))
        for i in range(cfg.num_hidden_layers):
            out[f"model.layers.{i}.{suffix}"] = to_hf(stacked[i])
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


# ------------------------------------------------------------------------------------------
# Hugging Face directories


def read_hf_config(model_dir: Path, **overrides) -> LlamaConfig:
    """The LlamaConfig of an HF model directory's config.json; ModelError if missing or invalid."""
    path = Path(model_dir) / "config.json"
    if not path.exists():
        raise ModelError(f"{path}: not found (an HF model directory needs config.json)")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    try:
        return hf_config.from_hf_dict(d, source=str(path), **overrides)
    except ConfigError as e:
        raise ModelError(str(e)) from None


def _safetensors_files(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> file, from model.safetensors.index.json or the single file."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        try:
            wm = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ModelError(f"{index}: malformed index ({e})") from None
        return {k: model_dir / v for k, v in wm.items()}
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelError(f"{model_dir}: no *.safetensors file and no model.safetensors.index.json")
    out = {}
    for f in files:
        for name in _safetensors_header(f):
            out[name] = f
    return out


def _safetensors_header(path: Path) -> dict:
    """Parse and validate a safetensors header; catches truncated files before reading data."""
    if not path.exists():
        raise ModelError(f"{path}: file listed in the index is missing")
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ModelError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise ModelError(f"{path}: truncated safetensors file (header of {n} bytes, file of {size})")
        try:
            header = json.loads(f.read(n))
        except json.JSONDecodeError:
            raise ModelError(f"{path}: corrupt safetensors header") from None
    header.pop("__metadata__", None)
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    if 8 + n + end > size:
        raise ModelError(f"{path}: truncated safetensors file: tensors end at byte {8 + n + end}, "
                           f"file has {size} bytes")
    return header


def load_hf(model_dir: str | Path, dtype=np.float32, **cfg_overrides) -> tuple[LlamaConfig, Params]:
    """An HF safetensors directory -> (config, params); a file's header is checked for truncation
    before its tensors are read."""
    model_dir = Path(model_dir)
    cfg = read_hf_config(model_dir, **cfg_overrides)
    where = _safetensors_files(model_dir)
    checked: set[Path] = set()
    handles: dict[Path, Any] = {}

    def get(name):
        f = where[name]
        if f not in checked:
            _safetensors_header(f)
            checked.add(f)
        if f not in handles:
            handles[f] = safe_open(str(f), framework="numpy")
        t = handles[f].get_tensor(name)
        return t.astype(np.float32) if t.dtype != np.float32 else t

    def has(name):
        return name in where

    # untied checkpoints that omit lm_head (some tied configs) are handled by the config flag
    return cfg, params_from_hf_tensors(cfg, get, has, str(model_dir), dtype)


def _torch_free_bf16_safe(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float32) if a.dtype.kind == "V" else a


def export_hf(params: Params, cfg: LlamaConfig, out_dir: str | Path, tokenizer=None,
              dtype=np.float32) -> Path:
    """Write config.json + model.safetensors (+ tokenizer files) atomically into out_dir."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {k: _torch_free_bf16_safe(np.asarray(v)).astype(dtype) for k, v in
               params_to_hf_tensors(params, cfg).items()}
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    hf_cfg = hf_config.to_hf_dict(cfg)
    hf_cfg["torch_dtype"] = np.dtype(dtype).name
    (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2))
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": (list(cfg.eos_token_id) if
           isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id)}
    (tmp / "generation_config.json").write_text(json.dumps({k: v for k, v in gen.items() if v is not None}))
    if tokenizer is not None:
        tokenizer.save(tmp)
    if out_dir.exists():
        old = out_dir.with_name(out_dir.name + f".old-{os.getpid()}")
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)
    return out_dir


# ------------------------------------------------------------------------------------------
# GGUF (llama.cpp) files

GGUF_TO_HF = {
    "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight", "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's convert permutation of Q/K rows (interleaved -> half-split RoPE)."""
    rows = w.shape[0]
    return (w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:])
             .swapaxes(1, 2).reshape(w.shape))


def _gguf_field(reader, key: str, path: Path, default=None, required=True):
    f = reader.fields.get(key)
    if f is None:
        if required and default is None:
            raise ModelError(f"{path}: GGUF metadata field {key!r} is missing")
        return default
    return f.contents()


def gguf_hf_config(reader, path: Path) -> dict:
    """HF-style config dict from a GGUF file's metadata (llama, mistral, qwen2 architectures)."""
    arch = _gguf_field(reader, "general.architecture", path)
    if arch not in ("llama", "qwen2", "mistral"):
        raise ModelError(f"{path}: GGUF general.architecture={arch!r} is not supported "
                           "(supported: llama, mistral, qwen2)")

    def g(k, default=None, required=True):
        return _gguf_field(reader, f"{arch}.{k}", path, default, required)

    n_vocab = g("vocab_size", None, required=False)
    if n_vocab is None:
        n_vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    names = {t.name for t in reader.tensors}
    heads = int(g("attention.head_count"))
    d = int(g("embedding_length"))
    cfg = {
        "model_type": arch, "vocab_size": int(n_vocab), "hidden_size": d,
        "intermediate_size": int(g("feed_forward_length")),
        "num_hidden_layers": int(g("block_count")), "num_attention_heads": heads,
        "num_key_value_heads": int(g("attention.head_count_kv", heads)),
        "head_dim": int(g("attention.key_length", g("rope.dimension_count", d // heads))),
        "rope_theta": float(g("rope.freq_base", 10000.0)),
        "rms_norm_eps": float(g("attention.layer_norm_rms_epsilon")),
        "max_position_embeddings": int(g("context_length", 4096)),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": _gguf_field(reader, "tokenizer.ggml.bos_token_id", path, required=False),
        "eos_token_id": _gguf_field(reader, "tokenizer.ggml.eos_token_id", path, required=False),
    }
    scale_type = g("rope.scaling.type", None, required=False)
    if scale_type == "linear":
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": float(g("rope.scaling.factor"))}
    elif scale_type not in (None, "none"):
        raise ModelError(f"{path}: GGUF rope scaling {scale_type!r} is not supported")
    return cfg


def load_gguf(path: str | Path, dtype=np.float32, **cfg_overrides) -> tuple[LlamaConfig, Params]:
    """A GGUF file -> (config, params): tensors dequantized to float32, q/k rows un-permuted to HF order."""
    import gguf
    from gguf.quants import dequantize

    path = Path(path)
    if not path.exists():
        raise ModelError(f"{path}: GGUF file not found")
    try:
        reader = gguf.GGUFReader(str(path))
    except (OSError, ValueError, KeyError, IndexError) as e:  # what GGUFReader raises on bad files
        raise ModelError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    hf = gguf_hf_config(reader, path)
    try:
        cfg = hf_config.from_hf_dict(hf, source=f"{path} (GGUF metadata)", **cfg_overrides)
    except ConfigError as e:
        raise ModelError(str(e)) from None
    tensors = {t.name: t for t in reader.tensors}
    supported = {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K",
                 "Q5_K", "Q6_K", "Q8_K"}
    hf_names: dict[str, str] = {"model.embed_tokens.weight": "token_embd.weight",
                                "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
    for i in range(cfg.num_hidden_layers):
        for g_suffix, h_suffix in GGUF_TO_HF.items():
            hf_names[f"model.layers.{i}.{h_suffix}"] = f"blk.{i}.{g_suffix}"

    def get(name):
        t = tensors[hf_names[name]]
        qt = t.tensor_type.name
        if qt not in supported:
            raise ModelError(f"{path}: tensor {t.name!r} uses GGUF quantization type {qt}, which is "
                               f"not supported (supported: {sorted(supported)})")
        try:
            w = dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise ModelError(f"{path}: tensor {t.name!r}: gguf cannot dequantize type {qt}") from None
        w = np.asarray(w, dtype=np.float32)
        if t.name.endswith("attn_q.weight") or t.name.endswith("attn_q.bias"):
            w = _unpermute(w, cfg.num_attention_heads)
        elif t.name.endswith("attn_k.weight") or t.name.endswith("attn_k.bias"):
            w = _unpermute(w, cfg.num_key_value_heads)
        return w

    def has(name):
        return name in hf_names and hf_names[name] in tensors

    return cfg, params_from_hf_tensors(cfg, get, has, str(path), dtype)


# ------------------------------------------------------------------------------------------


def load_model(path: str | Path, dtype=np.float32, **cfg_overrides) -> tuple[LlamaConfig, Params]:
    """A GGUF file or a Hugging Face directory -> (config, params as numpy arrays).

    Hub names are supported for real users via `huggingface_hub.snapshot_download` (not used in
    tests; this machine is offline): pass "hub:ORG/NAME".
    """
    s = str(path)
    if s.startswith("hub:"):

        path = snapshot_download(s[4:], allow_patterns=["*.json", "*.safetensors", "tokenizer*"])
    path = Path(path)
    if path.is_dir():
        return load_hf(path, dtype, **cfg_overrides)
    if path.suffix == ".gguf":
        return load_gguf(path, dtype, **cfg_overrides)
    if not path.exists():
        raise ModelError(f"{path}: no such file or directory")
    raise ModelError(f"{path}: not a GGUF file or an HF model directory")
