"""One-accelerator check: SFT vs TA-SFT train steps of a random-init Llama-3.2-1B-shaped model.

    pip install -e '.[cuda12]'          # jax with CUDA 12 (an H100: about 5 minutes in all)
    python bench/gpu_check.py                          # 1B shape, bf16 compute, 8 x 2048 slots
    python bench/gpu_check.py --tiny --steps 2         # the CPU path, tiny shapes (tests)

Both steps are the real train step (semloss_jax.train.jitstep: AdamW, full fine-tuning, the
tiled loss head, the attention kernel `auto` picks: cuDNN flash attention on a GPU) on the same
token slots: SFT gets `rows` benign rows; TA-SFT (lower bound, lam 1) gets rows/2 benign + rows/2
harmful rows. Each contender runs in its own process (so the device's peak-memory counter is its
own): it compiles, runs `--warmup` steps, then times `--steps` steps (median). Printed per
contender: compile time, step time, tokens/s, model FLOPs per step (6N + attention, per token
slot), MFU against the device's peak bf16 FLOP/s (telemetry.device_peak_flops), the device's peak
memory in use (or, where the backend has no memory counter, compiled.memory_analysis()), and
the TA-SFT / SFT ratios. The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# Llama-3.2-1B (config.json of meta-llama/Llama-3.2-1B): tied embeddings, llama3 RoPE scaling
LLAMA_32_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                   num_attention_heads=32, num_key_value_heads=8, head_dim=64, rope_theta=500000.0,
                   rope_scaling=["llama3", 32.0, 1.0, 4.0, 8192], rms_norm_eps=1e-5,
                   tie_word_embeddings=True, max_position_embeddings=131072)
TINY = dict(vocab_size=16384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=10000.0,
            rms_norm_eps=1e-5, tie_word_embeddings=True, max_position_embeddings=512)


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=8, help="token rows per step (TA-SFT: half harmful)")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--remat", default="none", choices=("none", "full", "dots"))
    ap.add_argument("--attention", default="auto")
    ap.add_argument("--tiny", action="store_true", help="tiny model and shapes (the CPU path)")
    ap.add_argument("--only", choices=("sft", "tasft"), default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help="also write the JSON object here")
    args = ap.parse_args(argv)
    if args.tiny and args.seq == 2048:
        args.seq = 64
    if args.rows % 2:
        ap.error("--rows must be even (TA-SFT splits them into benign and harmful halves)")
    return args


def train_config(args, kind: str):
    """The TrainConfig of one contender (random init, the arch inline, a one-device mesh)."""
    from semloss_jax.train import config

    arch = TINY if args.tiny else LLAMA_32_1B
    half = args.rows // 2
    data = {"seq_len": args.seq, "benign_batch": args.rows if kind == "sft" else half,
            "harmful_batch": 0 if kind == "sft" else half}
    return config.config_from_dict({
        "model": {"init": "random", "arch": arch, "dtype": args.dtype, "param_dtype": "float32",
                  "remat": args.remat, "attention": args.attention},
        "data": data,
        "objective": {"kind": kind, "lam": 0.0 if kind == "sft" else 1.0, "divergence": "lower_bound"},
        "optim": {"lr": 1e-5, "warmup_steps": 0, "grad_accum": 1, "trainable": "all"},
        "mesh": {"data": 1, "fsdp": 1, "tensor": 1},
        "run": {"steps": 1000, "output_dir": "unused"},
    })


def random_batch(rng, rows: int, seq: int, vocab: int):
    import numpy as np

    ids = rng.integers(0, vocab, (1, rows, seq), dtype=np.int32)
    loss = np.zeros((1, rows, seq), np.float32)
    loss[..., seq // 4: -1] = 1.0   # a prompt quarter without loss, then the response
    return {"input_ids": ids, "targets": np.roll(ids, -1, axis=-1), "loss_mask": loss,
            "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), ids.shape).copy(),
            "segment_ids": np.ones_like(ids)}


def run_one(args, kind: str) -> dict:
    """Compile, warm up and time one contender in this process."""
    import jax
    import numpy as np

    from semloss_jax.models.attention import resolve_impl
    from semloss_jax.train import jitstep, sharding, state
    from semloss_jax.train.telemetry import device_peak_flops

    cfg = train_config(args, kind)
    mcfg = state.model_config_of(cfg.model)
    mesh = sharding.make_mesh(cfg.mesh)
    plan = state.plan_state(mcfg, cfg.optim, mesh)
    k_init, k_state = jax.random.split(jax.random.PRNGKey(0))
    st, E_hat = state.initial_state(plan, mcfg, None, k_init, k_state)
    parts = jitstep.batch_parts(cfg, kind == "tasft")
    js = jitstep.jit_train_step(cfg, mcfg, plan, mesh, jitstep.batch_shapes(cfg, mcfg, parts))
    rng = np.random.default_rng(0)
    batches = {name: sharding.put_global_batch(random_batch(rng, rows, args.seq, mcfg.vocab_size),
                                               js.batch_shardings[name]) for name, rows in parts.items()}
    t = time.perf_counter()
    compiled = js.fn.lower(st, batches["benign"], batches.get("harmful"), E_hat).compile()
    compile_s = time.perf_counter() - t
    times = []
    for i in range(args.warmup + args.steps):
        t = time.perf_counter()
        st, m = compiled(st, batches["benign"], batches.get("harmful"), E_hat)
        loss = float(jax.block_until_ready(m["loss"]))
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    dev = jax.devices()[0]
    stats = dev.memory_stats() or {}
    ma = compiled.memory_analysis()
    step_s = statistics.median(times)
    slots = args.rows * args.seq
    flops = mcfg.flops_per_token(args.seq) * slots
    peak = device_peak_flops(dev)
    return {"kind": kind, "device": f"{dev.platform}:{getattr(dev, 'device_kind', '')}",
            "attention": resolve_impl(mcfg.attention, mcfg.dtype, args.seq),
            "head_tile": cfg.objective.head_tile(mcfg.vocab_size),
            "params": mcfg.num_params, "slots": slots, "compile_s": compile_s, "step_s": step_s,
            "tokens_per_s": slots / step_s, "flops_per_step": flops,
            "mfu": flops / step_s / peak if peak else None, "last_loss": loss,
            "peak_bytes_in_use": stats.get("peak_bytes_in_use"),
            "compiled_bytes": ma.argument_size_in_bytes + ma.output_size_in_bytes
            - ma.alias_size_in_bytes + ma.temp_size_in_bytes}


def child(args, kind: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--only", kind, "--rows", str(args.rows),
           "--seq", str(args.seq), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--dtype", args.dtype, "--remat", args.remat, "--attention", args.attention]
    cmd += ["--tiny"] if args.tiny else []
    p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        raise SystemExit(f"gpu_check: the {kind} run failed (rc {p.returncode}):\n{p.stderr[-4000:]}")
    return json.loads(lines[-1])


def gib(b) -> str:
    return "n/a" if b is None else f"{b / 2**30:.2f} GiB"


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.only:
        print(json.dumps(run_one(args, args.only)))
        return 0
    res = {kind: child(args, kind) for kind in ("sft", "tasft")}
    for kind, r in res.items():
        mfu = "n/a (device peak unknown)" if r["mfu"] is None else f"{r['mfu']:.1%}"
        print(f"{kind:6s} {r['device']}: {r['params'] / 1e6:.0f}M params, {r['slots']} token slots, "
              f"attention {r['attention']}, head tile {r['head_tile']}; compile {r['compile_s']:.1f} s, "
              f"step {r['step_s'] * 1e3:.1f} ms (median of {args.steps}), {r['tokens_per_s']:.0f} tokens/s, "
              f"MFU {mfu}, peak memory {gib(r['peak_bytes_in_use'])} (compiled plan "
              f"{gib(r['compiled_bytes'])}), last loss {r['last_loss']:.4f}")
    s, t = res["sft"], res["tasft"]
    mem = "peak_bytes_in_use" if s["peak_bytes_in_use"] else "compiled_bytes"
    ratios = {"step_time": t["step_s"] / s["step_s"], "peak_memory": t[mem] / s[mem], "memory_source": mem}
    print(f"TA-SFT / SFT: step time {ratios['step_time']:.3f}, peak memory {ratios['peak_memory']:.3f} "
          f"({mem})")
    out = json.dumps({"args": vars(args), "sft": s, "tasft": t, "ratios": ratios})
    if args.out:
        Path(args.out).write_text(out + "\n")
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
