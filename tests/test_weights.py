"""Weight loading: GGUF (with llama.cpp's Q/K permutation) vs safetensors, export, and bad input."""
from __future__ import annotations

import json

import gguf
import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from semloss_jax.errors import ModelError
from semloss_jax.models.llama import init_params, tiny_config
from semloss_jax.models.weights import (
    _unpermute,
    export_hf,
    load_gguf,
    load_hf,
    load_model,
    params_to_hf_tensors,
)


def _llamacpp_permute(w, n_head):
    """llama.cpp convert_hf_to_gguf's permutation of Q/K rows (what GGUF files hold)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


HF_TO_GGUF = {
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight", "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}


def write_gguf(path, cfg, params, bad_type=None):
    """A GGUF file laid out as llama.cpp writes it (F32 tensors, permuted Q/K)."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_rope_dimension_count(cfg.head_dim)
    hf = params_to_hf_tensors(params, cfg)
    w.add_tensor("token_embd.weight", hf["model.embed_tokens.weight"].astype(np.float32))
    w.add_tensor("output_norm.weight", hf["model.norm.weight"].astype(np.float32))
    if not cfg.tie_word_embeddings:
        w.add_tensor("output.weight", hf["lm_head.weight"].astype(np.float32))
    for i in range(cfg.num_hidden_layers):
        for h, g in HF_TO_GGUF.items():
            t = hf[f"model.layers.{i}.{h}"].astype(np.float32)
            if g == "attn_q.weight":
                t = _llamacpp_permute(t, cfg.num_attention_heads)
            elif g == "attn_k.weight":
                t = _llamacpp_permute(t, cfg.num_key_value_heads)
            if bad_type is not None and i == 0 and g == "ffn_up.weight":
                rows, cols = t.shape
                blocks = np.zeros((rows, cols // 32 * 18), np.uint8)
                w.add_tensor(f"blk.{i}.{g}", blocks, raw_dtype=bad_type)
                continue
            w.add_tensor(f"blk.{i}.{g}", t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_config(tie_word_embeddings=True)
    return cfg, jax.tree_util.tree_map(np.asarray, init_params(cfg, jax.random.PRNGKey(3)))


def test_unpermute_inverts_llamacpp_permutation():
    w = np.random.RandomState(0).randn(48, 7)
    for n in (1, 3, 6):
        np.testing.assert_array_equal(_unpermute(_llamacpp_permute(w, n), n), w)
    assert not np.array_equal(_llamacpp_permute(w, 3), w)


def test_gguf_and_safetensors_give_identical_params(tmp_path, tiny):
    cfg, params = tiny
    write_gguf(tmp_path / "m.gguf", cfg, params)
    export_hf(params, cfg, tmp_path / "hf")
    cfg_g, p_g = load_gguf(tmp_path / "m.gguf")
    cfg_h, p_h = load_hf(tmp_path / "hf")
    assert cfg_g.tie_word_embeddings and cfg_g.num_key_value_heads == cfg.num_key_value_heads
    jax.tree_util.tree_map(np.testing.assert_array_equal, p_g, p_h)
    jax.tree_util.tree_map(np.testing.assert_array_equal, p_g, params)


@pytest.mark.real_model
def test_real_gguf_matches_transformers_gguf_loader(real_model_path, real_model):
    """Transformers dequantizes and un-permutes the same GGUF independently: same tensors."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg, params = real_model
    m = AutoModelForCausalLM.from_pretrained(str(real_model_path.parent), gguf_file=real_model_path.name,
                                             dtype=torch.float32)
    ref = {k: v.numpy() for k, v in m.state_dict().items()}
    ours = params_to_hf_tensors(params, cfg)
    for name in ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                 "model.layers.0.self_attn.k_proj.weight", "model.layers.29.self_attn.k_proj.weight",
                 "model.layers.7.mlp.down_proj.weight", "model.norm.weight"]:
        np.testing.assert_allclose(ours[name], ref[name], atol=1e-6, err_msg=name)


def test_sharded_safetensors_with_index(tmp_path, tiny):

    cfg, params = tiny
    export_hf(params, cfg, tmp_path / "one")
    tensors = params_to_hf_tensors(params, cfg)
    names = sorted(tensors)
    d = tmp_path / "sharded"
    d.mkdir()
    (d / "config.json").write_text((tmp_path / "one" / "config.json").read_text())
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for fname, ns in halves.items():
        save_file({n: tensors[n] for n in ns}, str(d / fname))
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {n: f for f, ns in halves.items() for n in ns}}))
    _, p = load_model(d)
    jax.tree_util.tree_map(np.testing.assert_array_equal, p, params)


def test_missing_file(tmp_path):
    with pytest.raises(ModelError, match="nothere.gguf"):
        load_model(tmp_path / "nothere.gguf")
    with pytest.raises(ModelError, match="config.json"):
        (tmp_path / "empty").mkdir()
        load_model(tmp_path / "empty")


def test_unknown_architecture(tmp_path, tiny):
    cfg, params = tiny
    export_hf(params, cfg, tmp_path / "hf")
    c = json.loads((tmp_path / "hf" / "config.json").read_text())
    c["model_type"], c["architectures"] = "gpt2", ["GPT2LMHeadModel"]
    (tmp_path / "hf" / "config.json").write_text(json.dumps(c))
    with pytest.raises(ModelError, match=r"config\.json.*unsupported architecture.*gpt2"):
        load_model(tmp_path / "hf")


def test_unsupported_gguf_quant_type(tmp_path, tiny):
    cfg, params = tiny
    write_gguf(tmp_path / "bad.gguf", cfg, params, bad_type=gguf.GGMLQuantizationType.IQ4_NL)
    with pytest.raises(ModelError, match=r"bad\.gguf.*blk\.0\.ffn_up\.weight.*IQ4_NL.*not supported"):
        load_model(tmp_path / "bad.gguf")


def test_truncated_safetensors(tmp_path, tiny):
    cfg, params = tiny
    export_hf(params, cfg, tmp_path / "hf")
    f = tmp_path / "hf" / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match=r"model\.safetensors.*truncated"):
        load_model(tmp_path / "hf")


def test_config_weights_shape_mismatch(tmp_path, tiny):
    cfg, params = tiny
    export_hf(params, cfg, tmp_path / "hf")
    c = json.loads((tmp_path / "hf" / "config.json").read_text())
    c["intermediate_size"] = 96
    (tmp_path / "hf" / "config.json").write_text(json.dumps(c))
    with pytest.raises(ModelError, match=r"gate_proj\.weight.*shape.*config"):
        load_model(tmp_path / "hf")


def test_missing_tensor(tmp_path, tiny):

    cfg, params = tiny
    export_hf(params, cfg, tmp_path / "hf")
    t = params_to_hf_tensors(params, cfg)
    del t["model.layers.1.mlp.up_proj.weight"]
    save_file(t, str(tmp_path / "hf" / "model.safetensors"))
    with pytest.raises(ModelError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        load_model(tmp_path / "hf")
