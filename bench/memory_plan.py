"""Ahead-of-time memory and communication plan of a config's real train step on N fake CPU devices.

    python bench/memory_plan.py configs/llama3_8b_tpu.yaml --devices 16 data.seq_len=2048
    python bench/memory_plan.py llama3_8b_8gpu --devices 8 objective.kind=sft data.benign_batch=24 \
        data.harmful_batch=0          # SFT on the same token slots as TA-SFT's 16 + 8 rows

The step is the one train.py runs (semloss_jax.train.jitstep: the plan's state shardings, batch
shardings, activation rules, donation), lowered with abstract arrays (nothing is allocated) and
compiled by XLA's CPU backend for a mesh of N host devices
(XLA_FLAGS=--xla_force_host_platform_device_count=N, set before jax is imported). Printed per
device: argument / output / alias / temporary bytes of `compiled.memory_analysis()` and the peak
(argument + output - alias + temporary), and the all-gather / reduce-scatter / all-reduce ops of
the compiled HLO grouped by result size, with how many sit inside the layer scan (while loops
whose trip count is the number of layers; semloss_jax.train.hlo), which all-reduces inside it
carry activations (a part shaped [rows, seq_len, ...] or [rows x seq_len, ...]) and how many
all-gathers inside it carry weights. The last line is one JSON object.

Caveats: XLA's CPU backend computes bf16 matmuls in f32, so some temporaries are f32 where a TPU
or GPU keeps bf16 (gathered weights, MLP activations, and an f32 copy of the bf16 stack of saved
layer inputs); the CPU's concurrency-optimized scheduler, which trades memory for overlap, is
turned off (--xla_cpu_enable_concurrency_optimized_scheduler=false; --cpu-concurrency-scheduler
keeps it) since accelerator XLA schedules for memory; the flash kernels (cudnn, splash) do not
compile for CPU, so the plan uses model.attention=chunked (the reference math on blocks of
attention.CHUNK_Q queries) unless the command line says otherwise. XLA's CPU backend has no
reduce-scatter creation pass: a sharded gradient shows as an all-reduce (and a slice) where
TPU/GPU XLA emits a reduce-scatter. The figures are estimates of the real accelerator's, not
measurements.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as `python bench/memory_plan.py` from anywhere
    sys.path.insert(0, str(REPO))

def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", help="a config file, or the name of one in configs/ (llama3_8b_tpu)")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    ap.add_argument("--devices", type=int, default=8, help="fake CPU devices (default 8)")
    ap.add_argument("--out", default=None, help="also write the JSON object to this file")
    ap.add_argument("--no-activation-rules", action="store_true",
                    help="ablation: no activation sharding constraints, benign and harmful rows concatenated "
                         "without regard to the shards (with objective.vocab_tile=0 and "
                         "model.attention=reference: the step before these were added)")
    ap.add_argument("--cpu-concurrency-scheduler", action="store_true",
                    help="keep XLA CPU's concurrency-optimized scheduler (more memory for more overlap "
                         "of independent ops; off by default: TPU/GPU XLA schedule for memory)")
    return ap.parse_intermixed_args(argv)


def config_path(name: str) -> Path:
    p = Path(name)
    if p.exists():
        return p
    q = REPO / "configs" / (name if name.endswith(".yaml") else f"{name}.yaml")
    if not q.exists():
        raise SystemExit(f"memory_plan: no config {name!r} (neither a file nor configs/{q.name})")
    return q


def plan(cfg_file: Path, overrides: list[str], activation_rules: bool = True) -> dict:
    import jax

    from semloss_jax.train import config, hlo, jitstep, sharding, state

    if not any(o.startswith("model.attention=") for o in overrides):
        overrides = [*overrides, "model.attention=chunked"]
    cfg = config.load_config(cfg_file, overrides)
    mcfg = state.model_config_of(cfg.model)
    mesh = sharding.make_mesh(cfg.mesh)
    p = state.plan_state(mcfg, cfg.optim, mesh)
    parts = jitstep.batch_parts(cfg, cfg.data.harmful_batch > 0)
    js = jitstep.jit_train_step(cfg, mcfg, p, mesh, jitstep.batch_shapes(cfg, mcfg, parts),
                                activation_rules=activation_rules)
    t = time.perf_counter()
    compiled = js.fn.lower(*jitstep.abstract_inputs(js, p, mcfg)).compile()
    compile_s = time.perf_counter() - t
    ma = compiled.memory_analysis()
    gib = {k: getattr(ma, f"{k}_size_in_bytes") / 2**30 for k in ("argument", "output", "alias", "temp")}
    rows = sum(parts.values()) // (mesh.shape["data"] * mesh.shape["fsdp"])
    coll = hlo.collectives(compiled.as_text(), mcfg.num_hidden_layers)
    T, total = cfg.data.seq_len, sum(parts.values())
    weights = hlo.param_shapes(p.abstract_params)
    act = [shape for shape in coll["all_reduce"]["by_size"]
           if shape.endswith("[layer scan]") and hlo.activation_shaped(shape, rows, T, total, weights)]
    return {
        "config": str(cfg_file), "overrides": overrides, "devices": jax.device_count(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""), "activation_rules": activation_rules,
        "mesh": dict(mesh.shape), "kind": cfg.objective.kind, "seq_len": cfg.data.seq_len,
        "rows_per_micro_batch": parts, "grad_accum": cfg.optim.grad_accum,
        "attention": mcfg.attention, "head_tile": cfg.objective.head_tile(mcfg.vocab_size),
        "argument_gib": gib["argument"], "output_gib": gib["output"], "alias_gib": gib["alias"],
        "temp_gib": gib["temp"], "peak_gib": gib["argument"] + gib["output"] - gib["alias"] + gib["temp"],
        "activation_all_reduces_in_layer_scan": act,
        "weight_all_gathers_in_layer_scan": sum(
            n for shape, n in coll["all_gather"]["by_size"].items()
            if shape.endswith("[layer scan]") and not hlo.activation_shaped(shape, rows, T, total, weights)),
        "fallbacks": sorted(set(p.fallbacks) | set(js.fallbacks)), "compile_s": compile_s,
        **coll,
    }


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    flags = f" --xla_force_host_platform_device_count={args.devices}"
    if not args.cpu_concurrency_scheduler:
        flags += " --xla_cpu_enable_concurrency_optimized_scheduler=false"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + flags).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    res = plan(config_path(args.config), list(args.overrides), not args.no_activation_rules)
    print(f"{res['config']} on {res['devices']} fake devices, mesh {res['mesh']}, {res['kind']}, seq "
          f"{res['seq_len']}, rows {res['rows_per_micro_batch']} x {res['grad_accum']} micro-batches, "
          f"attention {res['attention']}, head tile {res['head_tile']}; compile {res['compile_s']:.0f} s")
    print(f"per device: arguments {res['argument_gib']:.2f} GiB, outputs {res['output_gib']:.2f} "
          f"(aliased {res['alias_gib']:.2f}), temporaries {res['temp_gib']:.2f}, "
          f"peak {res['peak_gib']:.2f} GiB")
    for kind in ("all_gather", "reduce_scatter", "all_reduce", "collective_permute", "all_to_all"):
        rec = res[kind]
        print(f"{kind}: {rec['count']} ops ({rec['in_layer_scan']} in the layer scan)")
        for shape, n in list(rec["by_size"].items())[:8]:
            print(f"    {n:3d} x {shape}")
    print(f"layer scan: {res['weight_all_gathers_in_layer_scan']} weight all-gathers; activation-shaped "
          f"all-reduces: {res['activation_all_reduces_in_layer_scan'] or 'none'}")
    for f in res["fallbacks"]:
        print(f"fallback: {f}")
    line = json.dumps(res)
    if args.out:
        Path(args.out).write_text(line + "\n")
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
