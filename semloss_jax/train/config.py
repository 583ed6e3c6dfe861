"""Typed, validated training configs: nested frozen dataclasses loaded from YAML.

    cfg = load_config("configs/smoke.yaml", ["objective.lam=0.5", "steps=3"])

- A YAML file maps onto `TrainConfig`'s sections (model, data, objective, optim, mesh, run,
  distributed). Every key is checked against the dataclass fields and every value against the
  field's type (int, float, str, bool, tuples, optionals, nested dataclasses). An unknown key,
  a missing required field or a wrong type raises `ConfigError` naming the key, the file and
  the YAML line (taken from the composed YAML node marks).
- `key=value` overrides use dotted keys (`objective.lam=0.5`); a bare key that names exactly
  one field of one section is accepted too (`steps=10`, `output_dir=runs/x`). Values are typed
  by `yaml.safe_load`, so `true`, `3`, `0.5`, `[a, b]` and `null` work; an error in an
  override names the key and the argument ("<command line>", argument number).
- `to_yaml(cfg)` writes the resolved config back (what the run directory keeps as config.yaml);
  loading that file gives the same config.

Coercions (and only these): an int is accepted for a float field; a string that parses as a
float is accepted for a float field (YAML 1.1 reads `1e-4` as a string); a YAML list is
accepted for a tuple field. Nothing else is converted silently.
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence, Union

import yaml

from semloss_jax.data.streams import DataSection
from semloss_jax.errors import ConfigError
from semloss_jax.loss.objective import ObjectiveConfig
from semloss_jax.models.attention import IMPLS as ATTENTION_IMPLS
from semloss_jax.models.llama import LlamaConfig
from semloss_jax.paths import atomic_write_text
from semloss_jax.train.optim import OptimConfig

CLI = "<command line>"


# ---------------------------------------------------------------------------------------------
# Sections


@dataclass(frozen=True)
class ModelSection:
    """Which model to train.

    init: "pretrained" loads weights from `path` (semloss_jax.models.loading.load_weights: a GGUF file, a
          Hugging Face safetensors directory or a train.py run directory; "default" = the
          embedded SmolLM2-135M-Instruct);
          "random" initializes a random model from `arch` (tests, smoke runs, shape checks).
    arch: the model's config fields inline (LlamaConfig fields). Required for init=random. With
          init=pretrained it is optional; when given it must agree with the loaded weights (and
          lets shape/sharding checks run without the weights).
    tokenizer: where the tokenizer lives ("default" = the embedded SmolLM2 GGUF; "" = `path`).
    dtype / param_dtype / remat override the model config's numerics; attention picks the
    training attention kernel (semloss_jax.models.attention: auto, reference, chunked, xla, cudnn,
    splash).
    """

    init: str = "pretrained"
    path: str = "default"
    tokenizer: str = ""
    arch: LlamaConfig | None = None
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"
    attention: str = "auto"

    def validate(self, where) -> None:
        """Check the fields; errors are made by where(field, message), which places them in the config."""
        if self.attention not in ATTENTION_IMPLS:
            raise where("attention", f"expected one of {', '.join(ATTENTION_IMPLS)}, got {self.attention!r}")
        if self.init not in ("pretrained", "random"):
            raise where("init", f"must be 'pretrained' or 'random', got {self.init!r}")
        if self.init == "random" and self.arch is None:
            raise where("arch", "init=random needs the model's config fields under model.arch")
        if self.init == "pretrained" and not self.path:
            raise where("path", "init=pretrained needs a weights path ('default' for SmolLM2-135M)")
        for f in ("dtype", "param_dtype"):
            if getattr(self, f) not in ("float32", "bfloat16", "float16"):
                raise where(f, f"expected float32, bfloat16 or float16, got {getattr(self, f)!r}")
        if self.remat not in ("none", "full", "dots"):
            raise where("remat", f"expected none, full or dots, got {self.remat!r}")


@dataclass(frozen=True)
class MeshSection:
    """Device mesh sizes along ("data", "fsdp", "tensor"); one of them may be -1 (fill).

    strict: a rule fallback (a dimension left replicated because the mesh axis does not divide
    it) or a large param replicated on every model axis stops the run instead of a warning."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    strict: bool = False

    def validate(self, where) -> None:
        """Check the fields; errors are made by where(field, message), which places them in the config."""
        sizes = (self.data, self.fsdp, self.tensor)
        if sum(s == -1 for s in sizes) > 1:
            raise where("data", "at most one mesh axis may be -1 (fill)")
        for name, s in zip(("data", "fsdp", "tensor"), sizes):
            if s == 0 or s < -1:
                raise where(name, f"must be a positive size or -1, got {s}")


@dataclass(frozen=True)
class RunSection:
    """The run: where (output_dir), how long (steps), checkpoints every N steps keeping the last
    K (0 = only at the end), seed (init, LoRA, data order), log_every (TensorBoard; metrics.jsonl
    gets every step), resume (continue from the latest checkpoint in output_dir), export_hf
    (write output_dir/hf at the end), async_checkpoint (Orbax saves in the background)."""

    output_dir: str = "runs/default"
    steps: int = 20
    checkpoint_every: int = 10
    keep_last: int = 2
    seed: int = 0
    log_every: int = 1
    resume: bool = False
    export_hf: bool = True
    tensorboard: bool = True
    progress: bool = True
    async_checkpoint: bool = True

    def validate(self, where) -> None:
        """Check the fields; errors are made by where(field, message), which places them in the config."""
        if self.steps < 1:
            raise where("steps", f"must be >= 1, got {self.steps}")
        if self.checkpoint_every < 0:
            raise where("checkpoint_every",
                        f"must be >= 0 (0 = only at the end), got {self.checkpoint_every}")
        if self.keep_last < 1:
            raise where("keep_last", f"must be >= 1, got {self.keep_last}")
        if self.log_every < 1:
            raise where("log_every", f"must be >= 1, got {self.log_every}")
        if not self.output_dir:
            raise where("output_dir", "must not be empty")


@dataclass(frozen=True)
class DistributedSection:
    """Multi-host: jax.distributed.initialize is called when enabled (or when the launcher's
    environment asks: SEMLOSS_COORDINATOR / SEMLOSS_NUM_PROCESSES / SEMLOSS_PROCESS_ID, or a
    cluster JAX auto-detects with enabled=true and empty fields)."""

    enabled: bool = False
    coordinator_address: str = ""
    num_processes: int = 0
    process_id: int = -1

    def validate(self, where) -> None:
        """Check the fields; errors are made by where(field, message), which places them in the config."""
        if self.num_processes < 0:
            raise where("num_processes", f"must be >= 0, got {self.num_processes}")


@dataclass(frozen=True)
class TrainConfig:
    """The whole training config: one section per YAML top-level key."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    mesh: MeshSection = field(default_factory=MeshSection)
    run: RunSection = field(default_factory=RunSection)
    distributed: DistributedSection = field(default_factory=DistributedSection)


SECTIONS = tuple(f.name for f in dataclasses.fields(TrainConfig))


# ---------------------------------------------------------------------------------------------
# Locations of keys (file, line)


class Marks:
    """dotted key -> (file, line). Filled from YAML node marks and from CLI overrides."""

    def __init__(self, file: str | None = None):
        self.file = file
        self._m: dict[str, tuple[str, int | str | None]] = {}

    def add(self, key: str, file: str, line: int | str | None) -> None:
        """Record where key was set: a file and a line (or an override's argument number)."""
        self._m[key] = (file, line)

    def of(self, key: str) -> tuple[str | None, int | str | None]:
        """(file, line) of key or of its nearest dotted parent that has one; else (the config file, None)."""
        k = key
        while k:
            if k in self._m:
                return self._m[k]
            k = k.rpartition(".")[0]
        return (self.file, None)

    def error(self, key: str, message: str) -> ConfigError:
        """A ConfigError for key, placed at the file and line where key was set."""
        file, line = self.of(key)
        return ConfigError(message, key=key, file=file, line=line)


def _collect_marks(node: yaml.Node, prefix: str, file: str, marks: Marks) -> None:
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = f"{prefix}.{k.value}" if prefix else str(k.value)
            marks.add(key, file, k.start_mark.line + 1)
            _collect_marks(v, key, file, marks)


def read_config_text(path: Path) -> str:
    """The text of a config file; ConfigError when it is missing, a directory or not UTF-8."""
    if path.is_dir():
        raise ConfigError("is a directory; --config takes a YAML file (e.g. configs/smoke.yaml)",
                          file=str(path))
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError("no such config file", file=str(path)) from None
    except OSError as e:
        raise ConfigError(f"cannot read the config: {e.strerror}", file=str(path)) from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"not valid UTF-8 (byte 0x{raw[e.start]:02x}); save the file as UTF-8",
                          file=str(path), line=raw[:e.start].count(b"\n") + 1) from None


def _load_yaml(path: Path, marks: Marks) -> dict:
    text = read_config_text(path)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise ConfigError(f"invalid YAML: {getattr(e, 'problem', e)}", file=str(path),
                          line=(mark.line + 1) if mark else None) from None
    if data is None:  # an empty file would silently train every default (a full 135M fine-tune)
        raise ConfigError("the config file is empty; write the sections to change (see "
                          "configs/smoke.yaml), or leave out --config for configs/default.yaml",
                          file=str(path))
    if not isinstance(data, dict):
        raise ConfigError("the top level must be a mapping of sections", file=str(path), line=1)
    _collect_marks(node, "", str(path), marks)
    return data


# ---------------------------------------------------------------------------------------------
# Typed construction


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _is_union(tp) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _coerce(value: Any, tp: Any, key: str, marks: Marks) -> Any:
    """Check `value` against the annotation `tp`; return it (converted where documented)."""
    if tp is Any:
        return value
    if _is_union(tp):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise marks.error(key, f"must not be null (expected {_type_name(tp)})")
        options = [a for a in args if a is not type(None)]
        dcs = [a for a in options if dataclasses.is_dataclass(a)]
        if len(options) == 1 or (isinstance(value, dict) and len(dcs) == 1):
            # one candidate: its own (precise) error
            return _coerce(value, dcs[0] if isinstance(value, dict) and dcs else options[0], key, marks)
        for a in options:
            try:
                return _coerce(value, a, key, marks)
            except ConfigError:
                pass
        raise marks.error(key, f"expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if value is None:
        raise marks.error(key, f"must not be null (expected {_type_name(tp)})")
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, key, marks)
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise marks.error(key, f"expected one of {list(typing.get_args(tp))}, got {value!r}")
        return value
    if origin is tuple or tp is tuple:
        if not isinstance(value, (list, tuple)):
            raise marks.error(key, f"expected a list, got {type(value).__name__} {value!r}")
        args = typing.get_args(tp)
        if not args:
            return tuple(value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]", marks) for i, v in enumerate(value))
        if len(args) != len(value):
            raise marks.error(key, f"expected a list of {len(args)} items, got {len(value)}")
        return tuple(_coerce(v, a, f"{key}[{i}]", marks) for i, (v, a) in enumerate(zip(args, value)))
    if origin in (list, Sequence):
        if not isinstance(value, (list, tuple)):
            raise marks.error(key, f"expected a list, got {type(value).__name__} {value!r}")
        (a,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, a, f"{key}[{i}]", marks) for i, v in enumerate(value)]
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, dict):
            raise marks.error(key, f"expected a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise marks.error(key, f"expected a bool (true/false), got {type(value).__name__} {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise marks.error(key, f"expected an int, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool):
            raise marks.error(key, f"expected a float, got bool {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise marks.error(key, f"expected a float, got {type(value).__name__} {value!r}")
    if tp is str:
        if not isinstance(value, str):
            raise marks.error(key, f"expected a string, got {type(value).__name__} {value!r}")
        return value
    if isinstance(tp, type):
        if not isinstance(value, tp):
            raise marks.error(key, f"expected {tp.__name__}, got {type(value).__name__} {value!r}")
        return value
    raise marks.error(key, f"unsupported field type {tp!r}")


def build_dataclass(cls, data: Any, prefix: str, marks: Marks):
    """Build `cls` from a mapping, checking every key and value; errors name key/file/line."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise marks.error(prefix, f"expected a mapping of {cls.__name__} fields, got "
                                  f"{type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kw = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in fields:
            raise marks.error(key, f"unknown key (known keys of {prefix or 'the top level'}: "
                                   f"{', '.join(sorted(fields))})")
        kw[k] = _coerce(v, hints[k], key, marks)
    for name, f in fields.items():
        if name not in kw and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise marks.error(f"{prefix}.{name}" if prefix else name,
                              f"missing required field of {cls.__name__}")
    try:
        return cls(**kw)
    except (TypeError, ValueError) as e:
        raise marks.error(prefix, str(e)) from None


# ---------------------------------------------------------------------------------------------
# Overrides


def _section_of_bare_key(key: str) -> str | None:
    hits = [s for s in SECTIONS if key in {f.name for f in dataclasses.fields(
        typing.get_type_hints(TrainConfig)[s])}]
    return hits[0] if len(hits) == 1 else None


def apply_overrides(data: dict, overrides: Sequence[str], marks: Marks) -> dict:
    """Set dotted keys in the raw mapping; values typed by yaml.safe_load."""
    data = _deepcopy(data)
    hints = typing.get_type_hints(TrainConfig)
    for i, ov in enumerate(overrides, 1):
        loc = f"argument {i}"
        if "=" not in ov:
            raise ConfigError(f"override {ov!r} is not key=value", file=CLI, line=loc)
        key, _, raw = ov.partition("=")
        key = key.strip()
        if not key:
            raise ConfigError(f"override {ov!r} has an empty key", file=CLI, line=loc)
        parts = key.split(".")
        if len(parts) == 1 and parts[0] not in SECTIONS:
            sec = _section_of_bare_key(parts[0])
            if sec is None:
                raise ConfigError("unknown key (use section.key, e.g. run.steps=10)", key=key,
                                  file=CLI, line=loc)
            parts = [sec, parts[0]]
            key = ".".join(parts)
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"cannot parse value {raw!r}: {e}", key=key, file=CLI, line=loc) from None
        # a string field keeps the raw text (output_dir=123 is the folder "123")
        ftype = _field_type(hints, parts)
        if ftype is str and not isinstance(value, str):
            value = raw
        d = data
        for p in parts[:-1]:
            nxt = d.get(p)
            if nxt is None:
                nxt = d[p] = {}
            elif not isinstance(nxt, dict):
                raise ConfigError(f"cannot set a sub-key of {p!r}, which is not a mapping", key=key,
                                  file=CLI, line=loc)
            d = nxt
        d[parts[-1]] = value
        marks.add(key, CLI, loc)
    return data


def _field_type(hints: dict, parts: list[str]):
    tp: Any = TrainConfig
    for p in parts:
        if _is_union(tp):
            dcs = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
            if not dcs:
                return None
            tp = dcs[0]
        if not dataclasses.is_dataclass(tp):
            return None
        h = typing.get_type_hints(tp)
        if p not in h:
            return None
        tp = h[p]
    return tp


def _deepcopy(x):
    if isinstance(x, dict):
        return {k: _deepcopy(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_deepcopy(v) for v in x]
    return x


# ---------------------------------------------------------------------------------------------
# Validation, loading, writing


def _validate_section(obj, prefix: str, marks: Marks) -> None:
    """Run a section's validator; its ConfigError is placed at the key's file and line."""
    validate = getattr(obj, "validate", None)
    if validate is None:
        return
    if isinstance(obj, _OWN_SECTIONS):  # validate(where): where(key, message) makes the error
        validate(lambda k, msg: marks.error(f"{prefix}.{k}", msg))
        return
    try:  # the model/objective/optim validators name their field in ConfigError.key
        validate() if isinstance(obj, LlamaConfig) else validate(prefix)
    except ConfigError as e:
        key = e.key or prefix
        key = key if key == prefix or key.startswith(prefix + ".") else f"{prefix}.{key}"
        raise marks.error(key, e.message) from None


_OWN_SECTIONS = (ModelSection, DataSection, MeshSection, RunSection, DistributedSection)
# run before optim: optim.total_steps defaults to run.steps, whose own message is the clear one
VALIDATION_ORDER = ("model", "data", "objective", "run", "optim", "mesh", "distributed")


def validate_config(cfg: TrainConfig, marks: Marks | None = None) -> None:
    """Validate every section (model.arch too), then the rules across sections; ConfigError names
    the key and where it was set."""
    marks = marks or Marks()
    for s in VALIDATION_ORDER:
        _validate_section(getattr(cfg, s), s, marks)
    if cfg.model.arch is not None:
        _validate_section(cfg.model.arch, "model.arch", marks)
    kind = cfg.objective.kind
    if kind == "safeinstr" and cfg.data.safeinstr_n <= 0:
        raise marks.error("data.safeinstr_n", "objective.kind=safeinstr needs data.safeinstr_n > 0 "
                                              "refusal examples")
    if kind == "safeinstr" and cfg.data.harmful_batch > 0 and cfg.objective.lam <= 0:
        raise marks.error("objective.lam", "objective.kind=safeinstr with a refusal stream "
                                           "(data.harmful_batch > 0) needs objective.lam > 0, its "
                                           "weight (or data.harmful_batch=0 to mix the refusals "
                                           "into the benign data)")
    if kind == "dpo" and cfg.data.pack:
        raise marks.error("data.pack", "objective.kind=dpo pairs row i of the harmful and chosen batches: "
                                       "set data.pack=false")
    if kind == "dpo" and not cfg.data.chosen:
        raise marks.error("data.chosen", "objective.kind=dpo needs data.chosen (a JSONL of safe replies)")
    if kind in ("tasft", "nll_ascent", "unlikelihood", "dpo") and cfg.data.harmful_batch < 1:
        raise marks.error("data.harmful_batch", f"objective.kind={kind} needs a harmful batch (>= 1)")
    if cfg.run.resume and not cfg.run.output_dir:
        raise marks.error("run.resume", "resume needs run.output_dir")


def config_from_dict(data: dict, marks: Marks | None = None) -> TrainConfig:
    """Build and validate. optim.total_steps, when not given, is run.steps (the LR schedule
    then spans the run)."""
    marks = marks or Marks()
    run, optim = data.get("run") or {}, data.get("optim")
    if isinstance(run, dict) and (optim is None or isinstance(optim, dict)) \
            and "total_steps" not in (optim or {}):
        data = dict(data, optim=dict(optim or {}, total_steps=run.get("steps", RunSection.steps)))
    cfg = build_dataclass(TrainConfig, data, "", marks)
    validate_config(cfg, marks)
    return cfg


def load_config(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Load a YAML config (None = all defaults) and apply `key=value` overrides."""
    marks = Marks(str(path) if path else None)
    data = _load_yaml(Path(path), marks) if path else {}
    data = apply_overrides(data, overrides, marks)
    return config_from_dict(data, marks)


def to_dict(cfg) -> Any:
    """Plain YAML-able data (tuples become lists)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.init}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def to_yaml(cfg: TrainConfig) -> str:
    """The config as YAML, sections in field order (the run directory's config.yaml)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)


def write_config(cfg: TrainConfig, path: str | os.PathLike) -> None:
    """Write to_yaml(cfg) to path atomically."""
    atomic_write_text(path, to_yaml(cfg))


def replace(cfg: TrainConfig, **sections) -> TrainConfig:
    """A copy of cfg with whole sections or `section__field` values replaced (for programmatic use)."""
    kw = {}
    for k, v in sections.items():
        if "__" in k:
            sec, f = k.split("__", 1)
            base = kw.get(sec, getattr(cfg, sec))
            kw[sec] = dataclasses.replace(base, **{f: v})
        else:
            kw[k] = v
    return dataclasses.replace(cfg, **kw)
