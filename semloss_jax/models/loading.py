"""The one way every entry point finds and loads a model: weights, config and tokenizer.

    m = load_model("default")          # the embedded SmolLM2-135M-Instruct (fetched if needed)
    m = load_model("runs/x")           # a train.py run directory: its hf/ export
    m = load_model("path/model.gguf")  # a GGUF file, or an HF safetensors directory
    m.cfg, m.params, m.tok, m.path

train.py, eval.py (chat, run, bounds) and the harvest command all go through
`resolve_model_path` and `load_model`, so a model argument means the same thing everywhere.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from semloss_jax.data.fetch import fetch_model
from semloss_jax.errors import ModelError
from semloss_jax.models import weights
from semloss_jax.models.llama import LlamaConfig
from semloss_jax.models.tokenizer import ChatTokenizer, load_tokenizer

DEFAULT = "default"


class LoadedModel(NamedTuple):
    """A model ready to run: its config, params (host numpy arrays), tokenizer and origin."""

    cfg: LlamaConfig
    params: Any
    tok: ChatTokenizer
    path: Path              # the weights: a GGUF file or an HF directory
    run_dir: Path | None    # the train.py run directory the model came from, if any


def run_dir_of(spec: str | Path | None) -> Path | None:
    """The train.py run directory `spec` names (a folder holding config.yaml), else None."""
    if spec is None or str(spec) == DEFAULT:
        return None
    p = Path(spec).expanduser()
    return p if p.is_dir() and (p / "config.yaml").is_file() else None


def resolve_model_path(spec: str | Path | None) -> Path:
    """None or "default" -> the embedded model (fetched when missing, verified always); a run
    directory -> its hf/ export; anything else -> that path, which must exist."""
    if spec is None or str(spec) == DEFAULT:
        return fetch_model()  # checks the recorded size and sha256; repairs a damaged file
    p = Path(spec).expanduser()
    run = run_dir_of(p)
    if run is not None:
        if not (run / "hf" / "config.json").is_file():
            raise ModelError(f"{run}: a train.py run directory without an hf/ export (the run has "
                             f"not finished, or ran with run.export_hf=false)")
        return run / "hf"
    if not p.exists():
        raise ModelError(f"{p}: no such file or directory (expected a GGUF file, an HF model "
                         f"directory or a train.py run directory)")
    return p


def load_weights(spec: str | Path | None, dtype=np.float32) -> tuple[LlamaConfig, Any, Path]:
    """(config, params as host arrays, resolved path) of the model `spec` names."""
    path = resolve_model_path(spec)
    cfg, params = weights.load_model(path, dtype=dtype)
    return cfg, params, path


def load_model(spec: str | Path | None = None, *, tokenizer: str | Path | None = None,
               dtype=np.float32) -> LoadedModel:
    """Weights and tokenizer of the model `spec` names (see the module docstring).

    tokenizer: where the tokenizer lives when it is not beside the weights. When it is None and
    the weights carry no tokenizer (a bare HF export), the default model's is used, with a note
    on stderr: the exports of this project keep the base model's vocabulary.
    """
    cfg, params, path = load_weights(spec, dtype)
    if tokenizer is not None:
        tok = load_tokenizer(resolve_model_path(tokenizer))
    else:
        try:
            tok = load_tokenizer(path)
        except ModelError as e:
            print(f"[model] no tokenizer in {path} ({e}); using the default model's",
                  file=sys.stderr)
            tok = load_tokenizer(resolve_model_path(DEFAULT))
    if tok.vocab_size > cfg.vocab_size:
        raise ModelError(f"{path}: the tokenizer has {tok.vocab_size} tokens but the model's "
                         f"vocab_size is {cfg.vocab_size}")
    return LoadedModel(cfg, params, tok, path, run_dir_of(spec))
