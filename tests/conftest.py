"""Shared fixtures. The real SmolLM2 model is fetched by `make test` (semloss_jax.data.fetch)."""
from __future__ import annotations

import os

import pytest

from semloss_jax.models.tokenizer import load_tokenizer
from semloss_jax.models.weights import load_model
from semloss_jax.paths import default_model_path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def real_model_path():
    path = default_model_path()
    if not path.exists():
        msg = f"real model not fetched ({path}); run `make fetch`"
        if os.environ.get("CI"):
            pytest.fail(msg)  # CI runs `make test`, which fetches it: absence is a defect there
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def real_model(real_model_path):
    return load_model(real_model_path)


@pytest.fixture(scope="session")
def real_tokenizer(real_model_path):
    return load_tokenizer(real_model_path)


# Property tests draw fresh examples locally; under CI they are derandomized (a fixed,
# reproducible set of examples per test), so a CI result can be rerun exactly.
from hypothesis import settings as _hsettings  # noqa: E402

_hsettings.register_profile("ci", derandomize=True, deadline=None)
if os.environ.get("CI"):
    _hsettings.load_profile("ci")
