"""The model's own tokenizer and chat template (GGUF metadata and HF directories)."""
from __future__ import annotations

import pytest

from semloss_jax.errors import ModelError
from semloss_jax.models.tokenizer import load_tokenizer


@pytest.mark.real_model
def test_smollm2_end_of_turn_and_template(real_tokenizer):
    tok = real_tokenizer
    assert tok.eos_id == 2 and tok.hf.convert_ids_to_tokens(2) == "<|im_end|>"
    ids = tok.prompt_ids("Hi")
    text = tok.decode(ids, skip_special_tokens=False)
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert "You are a helpful AI assistant named SmolLM" in text  # the template's default system prompt
    assert tok.response_ids("Hello!")[-1] == 2
    custom = tok.decode(tok.prompt_ids("Hi", system="Be safe."), skip_special_tokens=False)
    assert custom.startswith("<|im_start|>system\nBe safe.<|im_end|>") and "SmolLM" not in custom


@pytest.mark.real_model
def test_hf_directory_round_trip(tmp_path, real_tokenizer):
    real_tokenizer.save(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert tok.prompt_ids("x y z") == real_tokenizer.prompt_ids("x y z")
    assert tok.eos_ids[0] == 2


def test_a_malformed_generation_config_is_one_model_error(tmp_path, real_tokenizer):
    real_tokenizer.save(tmp_path)
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [2,\n')
    with pytest.raises(ModelError, match=r"generation_config\.json:2: invalid JSON"):
        load_tokenizer(tmp_path)


def test_bad_paths(tmp_path):
    with pytest.raises(ModelError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(ModelError, match="missing.gguf"):
        load_tokenizer(tmp_path / "missing.gguf")


@pytest.mark.real_model
def test_unknown_role_is_an_error(real_tokenizer):
    with pytest.raises(ModelError, match="unknown role 'tool'"):
        real_tokenizer.render([{"role": "tool", "content": "x"}], add_generation_prompt=True)
