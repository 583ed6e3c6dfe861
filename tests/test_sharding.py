"""Mesh, rule table, shardings of the train state; multi-device equivalence on 8 fake CPU devices.

The multi-device checks run in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8
(the flag must be set before jax is imported, and this pytest process has imported jax already).
"""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace as NS

import jax
import numpy as np
import optax
import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from semloss_jax.errors import ShardingError
from semloss_jax.models import llama as M
from semloss_jax.train import config as C
from semloss_jax.train import loop as train_loop
from semloss_jax.train import sharding as S

REPO = Path(__file__).resolve().parent.parent


def _mesh(d, f, t):
    return AbstractMesh((d, f, t), S.MESH_AXES)


def test_resolve_mesh_shape():
    assert S.resolve_mesh_shape((-1, 1, 1), 8) == (8, 1, 1)
    assert S.resolve_mesh_shape((2, -1, 2), 8) == (2, 2, 2)
    assert S.resolve_mesh_shape((2, 4, 1), 8) == (2, 4, 1)
    with pytest.raises(ShardingError, match="not a multiple"):
        S.resolve_mesh_shape((3, -1, 1), 8)
    with pytest.raises(ShardingError, match="needs 4 devices"):
        S.resolve_mesh_shape((2, 2, 1), 8)
    with pytest.raises(ShardingError, match="at most one"):
        S.resolve_mesh_shape((-1, -1, 1), 8)


def test_make_mesh_single_device():
    mesh = S.make_mesh(NS(data=-1, fsdp=1, tensor=1), jax.devices()[:1])
    assert mesh.axis_names == S.MESH_AXES and mesh.devices.shape == (1, 1, 1)


def test_rule_table_and_divisibility_fallback():
    mesh = _mesh(2, 2, 2)
    fb: list[str] = []
    # q_proj kernel [layers, embed, q_heads, head_dim]
    assert S.spec_for(("layers", "embed", "q_heads", "head_dim"), (4, 64, 4, 16), mesh, fallbacks=fb) \
        == P(None, "fsdp", "tensor")
    assert S.spec_for(("vocab", "embed"), (49152, 64), mesh, fallbacks=fb) == P("tensor", "fsdp")
    assert fb == []
    # 3 kv heads do not divide by tensor=2 -> replicated along that dim, logged
    assert S.spec_for(("layers", "embed", "kv_heads", "head_dim"), (4, 64, 3, 16), mesh, name="k",
                      fallbacks=fb) == P(None, "fsdp")
    assert len(fb) == 1 and "kv_heads=3" in fb[0] and "not divisible" in fb[0]
    # a mesh axis used twice in one array: the second use is replicated
    fb.clear()
    assert S.spec_for(("mlp", "vocab"), (128, 256), mesh, fallbacks=fb) == P("tensor")
    assert len(fb) == 1 and "already used" in fb[0]
    # size-1 mesh axes shard nothing
    assert S.spec_for(("vocab", "embed"), (49152, 64), _mesh(8, 1, 1)) == P()
    with pytest.raises(ShardingError, match="no rule"):
        S.spec_for(("bogus",), (4,), mesh)
    with pytest.raises(ShardingError, match="do not match"):
        S.spec_for(("vocab", "embed"), (4,), mesh)


def test_tree_specs_cover_the_model_and_optimizer_mirrors_params():
    cfg = M.tiny_config(vocab_size=512)
    mesh = _mesh(1, 4, 2)
    abstract = M.abstract_params(cfg)
    specs = S.tree_specs(abstract, M.param_logical_axes(cfg), mesh)
    assert jax.tree_util.tree_structure(specs, is_leaf=lambda x: isinstance(x, P)) == \
        jax.tree_util.tree_structure(abstract)
    assert specs["embed"]["embedding"] == P("tensor", "fsdp")
    assert specs["lm_head"]["kernel"] == P("fsdp", "tensor")
    assert specs["layers"]["mlp"]["down_proj"]["kernel"] == P(None, "tensor", "fsdp")
    assert specs["final_norm"]["scale"] == P()
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    o_abs = jax.eval_shape(opt.init, abstract)
    o_specs = S.opt_state_specs(opt, o_abs, specs)
    adam = o_specs[1][0]
    assert adam.mu == specs and adam.nu == specs
    assert adam.count == P()


def test_batch_shardings_and_divisibility():
    mesh = _mesh(2, 2, 2)
    b = {"input_ids": np.zeros((1, 8, 16), np.int32)}
    sh = S.batch_shardings(jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), S.MESH_AXES), b)
    assert sh["input_ids"].spec == P(None, ("data", "fsdp"), None)
    assert S.batch_spec(3, leading=1) == P(None, ("data", "fsdp"), None)
    with pytest.raises(ShardingError, match="not divisible"):
        S.batch_shardings(mesh, {"input_ids": np.zeros((1, 6, 16), np.int32)})


def test_activation_resolver_rules_and_fallbacks():
    """Activation names map through ACTIVATION_RULES with the param rules' divisibility fallback;
    mesh.strict turns a fallback into a ShardingError while the step is traced."""
    mesh = _mesh(2, 2, 2)
    fb: list[str] = []
    r = S.activation_resolver(mesh, fallbacks=fb)
    rows = ("data", "fsdp")
    assert r(("batch", "seq", "heads", "head_dim"), (8, 16, 4, 16)).spec == P(rows, None, "tensor")
    assert r(("batch", "res_seq", "embed"), (8, 16, 64)).spec == P(("data", "fsdp"), "tensor")
    assert r(("batch", "vocab"), (128, 64)).spec == P(("data", "fsdp"), "tensor")
    assert fb == []
    assert r(("batch", "seq", "kv_heads", "head_dim"), (8, 16, 3, 16)).spec == P(("data", "fsdp"))
    assert len(fb) == 1 and "kv_heads=3" in fb[0]
    with pytest.raises(ShardingError, match="mesh.strict"):
        S.activation_resolver(mesh, strict=True)(("batch", "seq", "kv_heads", "head_dim"), (8, 16, 3, 16))


def test_fallbacks_are_warnings_or_stop_the_run(caplog):
    with caplog.at_level(logging.WARNING, logger="semloss_jax.train.sharding"):
        S.report_fallbacks(["k: dim 2 replicated", "k: dim 2 replicated"], strict=False)
    assert [r.levelno for r in caplog.records] == [logging.WARNING] and "k: dim 2" in caplog.text
    with pytest.raises(ShardingError, match="mesh.strict=true stops"):
        S.report_fallbacks(["k: dim 2 replicated"], strict=True)
    S.report_fallbacks([], strict=True)


def test_tensor_16_reports_replicated_kv_projections_and_large_params():
    """mesh.tensor=16 with 8 kv heads: the k/v projections' head dim cannot be split; the plan
    says so (and a large param that no model axis shards is reported too)."""
    cfg = C.load_config(REPO / "configs" / "llama3_8b_tpu.yaml")
    from semloss_jax.train import state as state_lib
    plan = state_lib.plan_state(state_lib.model_config_of(cfg.model), cfg.optim, _mesh(1, 1, 16))
    kv = [f for f in plan.fallbacks if "k_proj" in f and "kv_heads=8" in f]
    assert kv and "not divisible by mesh tensor=16" in kv[0]
    f32 = np.float32
    abstract = {"big": jax.ShapeDtypeStruct((2048, 1024), f32), "small": jax.ShapeDtypeStruct((64,), f32),
                "sharded": jax.ShapeDtypeStruct((2048, 1024), f32)}
    specs = {"big": P(), "small": P(), "sharded": P("fsdp")}
    msgs = S.replicated_large_params(abstract, specs, _mesh(1, 2, 2))
    assert len(msgs) == 1 and msgs[0].startswith("big: 8 MiB replicated")
    assert S.replicated_large_params(abstract, specs, _mesh(8, 1, 1)) == []   # data parallel by design


def test_make_mesh_error_names_the_devices():
    with pytest.raises(ShardingError, match=r"needs 8 devices.*JAX sees 1 cpu device\(s\).*\[cuda12\]"):
        S.make_mesh(NS(data=1, fsdp=8, tensor=1), jax.devices()[:1])


def test_distributed_not_initialized_without_request():
    assert S.maybe_initialize_distributed(NS(enabled=False, coordinator_address="", num_processes=0,
                                             process_id=-1), environ={}) is False


def test_process_rows_single_process():
    assert S.process_rows(8) == slice(0, 8)


# ---------------------------------------------------------------------------------------------
# 8 fake devices, in a subprocess


def _run8(script: str, timeout: int = 900) -> dict:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"subprocess failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


EVAL_SHAPE_SCRIPT = r"""
import json, math
import jax, numpy as np
from jax.sharding import PartitionSpec as P
from semloss_jax.train import config, sharding, state
assert jax.device_count() == 8
out = {}
for name in ["llama2_7b_tpu", "llama2_7b_8gpu", "llama3_8b_tpu", "llama3_8b_8gpu",
             "mistral_7b_tpu", "mistral_7b_8gpu"]:
    cfg = config.load_config(f"configs/{name}.yaml")
    mcfg = state.model_config_of(cfg.model)
    mesh = sharding.make_mesh(cfg.mesh)
    plan = state.plan_state(mcfg, cfg.optim, mesh)
    st, specs = plan.abstract_state, plan.state_specs
    is_p = lambda x: isinstance(x, P)
    leaves = jax.tree_util.tree_leaves(st["params"])
    n_params = sum(math.prod(x.shape) for x in leaves)
    adam = [s for s in jax.tree_util.tree_leaves(st["opt_state"], is_leaf=lambda x: hasattr(x, "mu"))
            if hasattr(s, "mu")][0]
    adam_specs = [s for s in jax.tree_util.tree_leaves(specs["opt_state"], is_leaf=lambda x: hasattr(x, "mu"))
                  if hasattr(s, "mu")][0]
    def shapes(t):
        return jax.tree_util.tree_map(lambda a: a.shape, t)
    same_shapes = shapes(adam.mu) == shapes(st["params"]) and shapes(adam.nu) == shapes(st["params"])
    same_specs = adam_specs.mu == specs["params"] and adam_specs.nu == specs["params"]
    # bytes per device of the whole state
    def per_dev(tree, stree):
        tot = 0
        for a, s in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(stree, is_leaf=is_p)):
            shards = 1
            for ax in s:
                for n in (ax if isinstance(ax, tuple) else (ax,)):
                    if n is not None:
                        shards *= mesh.shape[n]
            tot += math.prod(a.shape) * np.dtype(a.dtype).itemsize / shards
        return tot
    state_bytes = per_dev({k: st[k] for k in ("params", "opt_state")},
                          {k: specs[k] for k in ("params", "opt_state")})
    total_bytes = sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize
                      for a in jax.tree_util.tree_leaves({k: st[k] for k in ("params", "opt_state")}))
    # every weight matrix is sharded over fsdp
    unsharded = [jax.tree_util.keystr(p)
                 for p, s in jax.tree_util.tree_flatten_with_path(specs["params"], is_leaf=is_p)[0]
                 if "scale" not in jax.tree_util.keystr(p) and "fsdp" not in [a for a in s]]
    out[name] = dict(n_params=n_params, num_params=mcfg.num_params, same_shapes=same_shapes,
                     same_specs=same_specs, state_gib_per_device=state_bytes / 2**30,
                     total_gib=total_bytes / 2**30, mesh=dict(mesh.shape), fallbacks=plan.fallbacks,
                     unsharded=unsharded, embed=str(specs["params"]["embed"]["embedding"]),
                     q=str(specs["params"]["layers"]["attn"]["q_proj"]["kernel"]),
                     dtype=str(leaves[0].dtype),
                     batch_ok=(cfg.data.benign_batch % (mesh.shape["data"] * mesh.shape["fsdp"]) == 0
                               and cfg.data.harmful_batch % (mesh.shape["data"] * mesh.shape["fsdp"]) == 0))
print(json.dumps(out))
"""

EXPECTED_PARAMS = {"llama2_7b": 6.74e9, "llama3_8b": 8.03e9, "mistral_7b": 7.24e9}


def test_real_configs_eval_shape_on_fake_mesh():
    res = _run8(EVAL_SHAPE_SCRIPT)
    assert len(res) == 6
    for name, r in res.items():
        exp = EXPECTED_PARAMS[name.rsplit("_", 1)[0]]
        assert r["n_params"] == r["num_params"]
        assert abs(r["n_params"] - exp) / exp < 0.01, (name, r["n_params"])
        assert r["same_shapes"] and r["same_specs"], name
        assert r["dtype"] == "float32"               # fp32 master weights
        assert r["fallbacks"] == [], (name, r["fallbacks"])
        assert r["unsharded"] == [], (name, r["unsharded"])
        assert r["batch_ok"], name
        # params + AdamW moments (3 x 4 bytes x N) spread over 8 devices
        assert r["total_gib"] == pytest.approx(3 * 4 * r["n_params"] / 2**30, rel=1e-3)
        assert r["state_gib_per_device"] == pytest.approx(r["total_gib"] / 8, rel=0.02), (name, r)
    assert res["llama3_8b_tpu"]["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}   # pure FSDP
    assert res["llama3_8b_tpu"]["embed"] == "P(None, 'fsdp')"
    assert res["llama2_7b_8gpu"]["q"] == "P(None, 'fsdp')"


MESH_SCRIPT = r"""
import json, shutil, tempfile
import jax
from semloss_jax.train import config, loop as train_loop
assert jax.device_count() == 8
tmp = tempfile.mkdtemp()
base = config.load_config("configs/smoke.yaml", ["run.steps=3", "run.progress=false",
                                                   "run.tensorboard=false", "run.export_hf=false",
                                                   "run.checkpoint_every=0"])
tok = train_loop.run_tokenizer(base.model)
out = {}
for mesh in [(1, 1, 1), (8, 1, 1), (2, 4, 1), (2, 2, 2)]:
    cfg = config.replace(base, mesh=config.MeshSection(*mesh),
                         run=config.dataclasses.replace(base.run,
                                                        output_dir=f"{tmp}/{'x'.join(map(str, mesh))}"))
    r = train_loop.train(cfg, tokenizer=tok, echo=lambda s: None)
    out["x".join(map(str, mesh))] = {"loss": [m["loss"] for m in r.metrics],
                                     "ce": [m["ce"] for m in r.metrics],
                                     "emd_lower": [m["emd_lower"] for m in r.metrics],
                                     "compiles": r.compiles, "cache_size": r.cache_size}
shutil.rmtree(tmp)
print(json.dumps(out))
"""


@pytest.mark.slow
def test_meshes_match_single_device_losses():
    res = _run8(MESH_SCRIPT)
    ref = res.pop("1x1x1")
    assert len(ref["loss"]) == 3 and ref["compiles"] == 1 and ref["cache_size"] == 1
    assert ref["loss"][0] != ref["loss"][2]  # training moved: the comparison is not trivial
    for name, r in res.items():
        assert r["compiles"] == 1 and r["cache_size"] == 1, name
        for key in ("loss", "ce", "emd_lower"):
            np.testing.assert_allclose(r[key], ref[key], rtol=1e-5, atol=0, err_msg=f"{name} {key}")


MULTIHOST_SCRIPT = r"""
import json, sys
from semloss_jax.train import config, loop as train_loop
out = sys.argv[1]
cfg = config.load_config("configs/smoke.yaml", ["run.steps=3", "run.progress=false",
                                                 "run.tensorboard=false", "run.checkpoint_every=2",
                                                 f"run.output_dir={out}", "mesh.data=-1"])
r = train_loop.train(cfg, echo=lambda s: None)
import jax
print(json.dumps({"process": jax.process_index(), "devices": jax.device_count(),
                  "local": jax.local_device_count(), "compiles": r.compiles,
                  "loss": [m["loss"] for m in r.metrics]}))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_single_device(tmp_path):
    """jax.distributed (2 CPU processes x 4 devices, from SEMLOSS_* env) with per-process data
    loading gives the single-device losses; checkpoints and the export are written once."""
    port = _free_port()
    procs = []
    for pid in range(2):
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
                   SEMLOSS_COORDINATOR=f"localhost:{port}", SEMLOSS_NUM_PROCESSES="2",
                   SEMLOSS_PROCESS_ID=str(pid))
        procs.append(subprocess.Popen([sys.executable, "-c", MULTIHOST_SCRIPT, str(tmp_path / "mh")],
                                      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    outs = []
    for p in procs:
        so, se = p.communicate(timeout=900)
        assert p.returncode == 0, se[-5000:]
        outs.append(json.loads(so.strip().splitlines()[-1]))
    assert sorted(o["process"] for o in outs) == [0, 1]
    assert all(o["devices"] == 8 and o["local"] == 4 and o["compiles"] == 1 for o in outs)
    cfg = C.load_config(REPO / "configs" / "smoke.yaml", [
        "run.steps=3", "run.progress=false", "run.tensorboard=false", "run.checkpoint_every=0",
        "run.export_hf=false", f"run.output_dir={tmp_path / 'one'}", "mesh.data=1"])
    ref = [m["loss"] for m in train_loop.train(cfg, echo=lambda s: None).metrics]
    for o in outs:
        np.testing.assert_allclose(o["loss"], ref, rtol=1e-5, atol=0)
    mh = tmp_path / "mh"
    assert sorted(p.name for p in (mh / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "3"]
    assert (mh / "hf" / "model.safetensors").exists()
    assert len((mh / "metrics.jsonl").read_text().splitlines()) == 3


COMPILED_SCRIPT = r"""
import json
import jax, numpy as np
from types import SimpleNamespace as NS
from jax.sharding import NamedSharding, PartitionSpec as P
from semloss_jax.loss import cost, objective as ob
from semloss_jax.models import llama as M
from semloss_jax.train import config, hlo, jitstep, sharding, state, step as step_lib
out = {}
# 1. benign + harmful rows in one forward: shard-aligned (8 blocks) vs split at row nb (1 block)
mesh = sharding.make_mesh(NS(data=8, fsdp=1, tensor=1))
cfg = M.tiny_config(vocab_size=512)
params = M.init_params(cfg, jax.random.PRNGKey(0))
E_hat = cost.unit_embeddings(M.embedding_matrix(params))
rng = np.random.default_rng(0)
def batch(rows, T=32):
    return dict(input_ids=rng.integers(0, 512, (rows, T)).astype(np.int32),
                targets=rng.integers(0, 512, (rows, T)).astype(np.int32),
                loss_mask=(rng.random((rows, T)) < 0.7).astype(np.float32),
                positions=np.broadcast_to(np.arange(T, dtype=np.int32), (rows, T)).copy(),
                segment_ids=np.ones((rows, T), np.int32))
b, h = batch(16), batch(8)
rows = NamedSharding(mesh, P(("data", "fsdp")))
for tile in (0, 128):
    obj = ob.ObjectiveConfig(kind="tasft", lam=1.0, vocab_tile=tile)
    for blocks in (8, 1):
        def loss(p, b, h, blocks=blocks, obj=obj):
            return ob.combine(ob.loss_sums(p, cfg, b, h, E_hat, obj, batch_shards=blocks),
                              ob.global_counts(b, h), obj)
        fn = sharding.traced_with_activation_rules(jax.value_and_grad(loss),
                                                   sharding.activation_resolver(mesh))
        c = jax.jit(fn, in_shardings=(NamedSharding(mesh, P()), {k: rows for k in b}, {k: rows for k in h})
                    ).lower(params, b, h).compile()
        coll = hlo.collectives(c.as_text(), cfg.num_hidden_layers)
        out[f"layout {tile} {blocks}"] = {"loss": float(c(params, b, h)[0]),
                                          **{k: v["count"] for k, v in coll.items()}}
# 2. the real step under FSDP (fsdp=8): with and without the activation rules
cfg = config.load_config("configs/smoke.yaml", ["mesh.data=1", "mesh.fsdp=8", "data.seq_len=64",
                                                 "model.arch.vocab_size=4096", "model.arch.hidden_size=256",
                                                 "model.arch.intermediate_size=512"])
mcfg = state.model_config_of(cfg.model)
mesh = sharding.make_mesh(cfg.mesh)
plan = state.plan_state(mcfg, cfg.optim, mesh)
shapes = jitstep.batch_shapes(cfg, mcfg, jitstep.batch_parts(cfg, True))
js = jitstep.jit_train_step(cfg, mcfg, plan, mesh, shapes)
raw = step_lib.make_train_step(mcfg, cfg.objective, cfg.optim, plan.optimizer, batch_shards=8)
bare = jax.jit(raw, in_shardings=(plan.state_shardings, js.batch_shardings["benign"],
                                  js.batch_shardings["harmful"], js.E_sharding),
               out_shardings=(plan.state_shardings, sharding.replicated(mesh)), donate_argnums=(0,))
rows_dev = (cfg.data.benign_batch + cfg.data.harmful_batch) // 8
for name, fn in (("rules", js.fn), ("bare", bare)):
    c = fn.lower(*jitstep.abstract_inputs(js, plan, mcfg)).compile()
    coll = hlo.collectives(c.as_text(), mcfg.num_hidden_layers)
    scan = lambda kind: [s for s in coll[kind]["by_size"] if s.endswith("[layer scan]")]
    out[name] = {"weight_gathers": [s for s in scan("all_gather") if not hlo.activation_shaped(s, 16, 64)],
                 "activation_gathers": [s for s in scan("all_gather") if hlo.activation_shaped(s, 16, 64)],
                 "activation_reduces": [s for s in scan("all_reduce") if hlo.activation_shaped(s, 16, 64)],
                 "temp": c.memory_analysis().temp_size_in_bytes}
print(json.dumps(out))
"""


@pytest.mark.slow
def test_compiled_layout_and_fsdp_communication():
    """Compiled HLO on 8 devices. (1) Benign and harmful rows concatenated shard-aligned move no
    row between devices (no collective-permute / all-to-all), while the concatenation split at
    row nb does; same loss either way, logits materialized or tiled. (2) Under FSDP the activation
    rules make the layer scan all-gather weights only, with no activation-shaped all-reduce;
    without them XLA gathers activations of the global batch instead."""
    res = _run8(COMPILED_SCRIPT)
    for tile in (0, 128):
        aligned, split = res[f"layout {tile} 8"], res[f"layout {tile} 1"]
        assert aligned["collective_permute"] == aligned["all_to_all"] == aligned["all_gather"] == 0
        assert split["collective_permute"] + split["all_to_all"] > 0
        assert aligned["loss"] == pytest.approx(split["loss"], rel=1e-6)
    rules, bare = res["rules"], res["bare"]
    assert rules["weight_gathers"] and not rules["activation_gathers"] and not rules["activation_reduces"]
    assert bare["activation_gathers"] or bare["activation_reduces"]
    assert rules["temp"] < bare["temp"]


STRICT_ENV = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")


def test_strict_mesh_stops_train_py(tmp_path):
    """mesh.tensor=8 cannot split the smoke model's 2 kv heads: a warning by default, a one-line
    error (exit 2) with mesh.strict=true, before anything is compiled."""
    args = [sys.executable, str(REPO / "train.py"), "--config", str(REPO / "configs" / "smoke.yaml"),
            "mesh.data=1", "mesh.tensor=8", "mesh.strict=true", f"run.output_dir={tmp_path / 'x'}"]
    p = subprocess.run(args, cwd=REPO, env=STRICT_ENV, capture_output=True, text=True, timeout=600)
    assert p.returncode == 2, p.stderr[-3000:]
    assert "kv_heads=2" in p.stderr and "mesh.strict=true stops here" in p.stderr


def test_distributed_settings_from_the_environment():
    """paths.distributed_env reads the three variables; a non-integer names its variable."""
    from semloss_jax.errors import ConfigError
    from semloss_jax.paths import distributed_env
    assert distributed_env({}) == {"coordinator_address": "", "num_processes": 0, "process_id": -1}
    got = distributed_env({"SEMLOSS_COORDINATOR": "10.0.0.1:1234", "SEMLOSS_NUM_PROCESSES": "4",
                           "SEMLOSS_PROCESS_ID": "2"})
    assert got == {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 2}
    with pytest.raises(ConfigError, match=r"\$SEMLOSS_NUM_PROCESSES: key 'distributed.num_processes'"):
        S.maybe_initialize_distributed(NS(enabled=True, coordinator_address="", num_processes=0,
                                          process_id=-1), environ={"SEMLOSS_NUM_PROCESSES": "two"})
