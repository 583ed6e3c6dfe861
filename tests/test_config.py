"""Typed YAML configs: loading, overrides, errors that name key/file/line, round trips."""
from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

import pytest

from semloss_jax.errors import ConfigError
from semloss_jax.train import config as C

REPO = Path(__file__).resolve().parent.parent
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def _write(tmp_path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(textwrap.dedent(text).lstrip("\n"))
    return p


BASE = """
model:
  init: random
  arch:
    vocab_size: 256
    hidden_size: 32
    intermediate_size: 64
    num_hidden_layers: 2
    num_attention_heads: 4
    num_key_value_heads: 2
    head_dim: 8
objective:
  kind: tasft
  lam: 1
run:
  steps: 7
  output_dir: runs/x
"""


def test_base_loads_typed(tmp_path):
    cfg = C.load_config(_write(tmp_path, BASE))
    assert isinstance(cfg.objective.lam, float) and cfg.objective.lam == 1.0  # int accepted for float
    assert cfg.model.arch.hidden_size == 32
    assert cfg.run.steps == 7
    assert cfg.optim.total_steps == 7  # the LR schedule spans the run when not given
    assert cfg.data.benign == ("benign",) and isinstance(cfg.data.benign, tuple)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load_and_round_trip(path, tmp_path):
    cfg = C.load_config(path)
    out = tmp_path / "config.yaml"
    C.write_config(cfg, out)
    assert C.load_config(out) == cfg


def test_overrides_dotted_bare_and_typed(tmp_path):
    cfg = C.load_config(_write(tmp_path, BASE), [
        "objective.lam=0.25", "steps=3", "output_dir=123", "optim.lr=1e-4",
        "data.benign=[benign, /tmp/x.jsonl]", "objective.nll_clip=null", "run.resume=true"])
    assert cfg.objective.lam == 0.25
    assert cfg.run.steps == 3 and cfg.optim.total_steps == 3
    assert cfg.run.output_dir == "123"          # a string field keeps the raw text
    assert cfg.optim.lr == pytest.approx(1e-4)  # YAML 1.1 reads 1e-4 as a string; accepted for float
    assert cfg.data.benign == ("benign", "/tmp/x.jsonl")
    assert cfg.run.resume is True


def _err(fn) -> ConfigError:
    with pytest.raises(ConfigError) as ei:
        fn()
    return ei.value


def _line_of(path: Path, needle: str) -> int:
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if needle in line:
            return i
    raise AssertionError(needle)


def test_unknown_key_names_key_file_line(tmp_path):
    p = _write(tmp_path, BASE.replace("  lam: 1\n", "  lam: 1\n  lamda: 2\n"))
    e = _err(lambda: C.load_config(p))
    assert e.key == "objective.lamda" and e.file == str(p) and e.line == _line_of(p, "lamda")
    assert str(p) in str(e) and f":{e.line}:" in str(e) and "lamda" in str(e)


def test_unknown_nested_key_in_arch(tmp_path):
    p = _write(tmp_path, BASE.replace("    head_dim: 8\n", "    head_dim: 8\n    num_layers: 3\n"))
    e = _err(lambda: C.load_config(p))
    assert e.key == "model.arch.num_layers" and e.line == _line_of(p, "num_layers")


def test_unknown_section(tmp_path):
    p = _write(tmp_path, BASE + "trainer:\n  x: 1\n")
    e = _err(lambda: C.load_config(p))
    assert e.key == "trainer" and e.line == _line_of(p, "trainer:")


@pytest.mark.parametrize("bad, key, needle", [
    ("  steps: seven\n", "run.steps", "steps:"),
    ("  steps: 7.5\n", "run.steps", "steps:"),
    ("  steps: true\n", "run.steps", "steps:"),
])
def test_wrong_type_names_key_and_line(tmp_path, bad, key, needle):
    p = _write(tmp_path, BASE.replace("  steps: 7\n", bad))
    e = _err(lambda: C.load_config(p))
    assert e.key == key and e.line == _line_of(p, needle) and "int" in str(e)


def test_wrong_type_bool_and_list(tmp_path):
    p = _write(tmp_path, BASE + "data:\n  shuffle: 1\n")
    e = _err(lambda: C.load_config(p))
    assert e.key == "data.shuffle" and e.line == _line_of(p, "shuffle") and "bool" in str(e)
    p = _write(tmp_path, BASE + "data:\n  benign: benign\n")
    e = _err(lambda: C.load_config(p))
    assert e.key == "data.benign" and "list" in str(e)


def test_missing_required_arch_field(tmp_path):
    p = _write(tmp_path, BASE.replace("    head_dim: 8\n", ""))
    e = _err(lambda: C.load_config(p))
    assert e.key == "model.arch.head_dim" and "missing" in str(e) and e.line == _line_of(p, "arch:")


def test_validation_errors_point_at_the_field(tmp_path):
    p = _write(tmp_path, BASE.replace("  kind: tasft\n", "  kind: tasfd\n"))
    e = _err(lambda: C.load_config(p))
    assert e.key == "objective.kind" and e.line == _line_of(p, "kind:") and "tasfd" in str(e)
    p = _write(tmp_path, BASE + "mesh:\n  data: -1\n  fsdp: -1\n")
    e = _err(lambda: C.load_config(p))
    assert e.key.startswith("mesh.") and "-1" in str(e)
    p = _write(tmp_path, BASE + "optim:\n  grad_accum: 0\n")
    e = _err(lambda: C.load_config(p))
    assert e.key == "optim.grad_accum" and e.line == _line_of(p, "grad_accum")


def test_cross_section_checks(tmp_path):
    p = _write(tmp_path, BASE.replace("  kind: tasft\n", "  kind: safeinstr\n"))
    e = _err(lambda: C.load_config(p))
    assert e.key == "data.safeinstr_n"
    e = _err(lambda: C.load_config(_write(tmp_path, BASE), ["data.harmful_batch=0"]))
    assert e.key == "data.harmful_batch" and e.file == C.CLI


def test_override_errors_name_the_argument(tmp_path):
    p = _write(tmp_path, BASE)
    e = _err(lambda: C.load_config(p, ["run.steps=3", "objective.lamb=2"]))
    assert e.key == "objective.lamb" and e.file == C.CLI and e.line == "argument 2"
    e = _err(lambda: C.load_config(p, ["run.steps=many"]))
    assert e.key == "run.steps" and e.file == C.CLI and e.line == "argument 1"
    e = _err(lambda: C.load_config(p, ["nosuchkey=1"]))
    assert e.key == "nosuchkey" and e.file == C.CLI
    e = _err(lambda: C.load_config(p, ["steps"]))
    assert e.file == C.CLI and "key=value" in str(e)


def test_bare_key_ambiguity_is_an_error(tmp_path):
    # "seed" is only in run; "data" is a section; "tensor" only in mesh
    cfg = C.load_config(_write(tmp_path, BASE), ["seed=5", "tensor=1"])
    assert cfg.run.seed == 5 and cfg.mesh.tensor == 1


def test_invalid_yaml_names_line(tmp_path):
    p = _write(tmp_path, "run:\n  steps: [1, 2\n  seed: 3\n")
    e = _err(lambda: C.load_config(p))
    assert e.file == str(p) and isinstance(e.line, int)


def test_defaults_only_and_replace():
    cfg = C.load_config(None, ["model.init=pretrained"])
    cfg2 = C.replace(cfg, run__steps=3, objective__lam=0.0)
    assert cfg2.run.steps == 3 and cfg2.objective.lam == 0.0 and cfg.run.steps != 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.run.steps = 1  # type: ignore[misc]
