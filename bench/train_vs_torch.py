"""A training step of our Flax model vs transformers' PyTorch LlamaForCausalLM on this CPU:
step-time ratio (target <= 1.0) and peak-memory ratio.

Same weights (SmolLM2-135M, loaded by semloss_jax.models.weights.load_model, exported with
semloss_jax.models.weights.export_hf and loaded by transformers), fp32, all parameters trainable,
same batch and sequence length, same work per step:
  forward + next-token cross-entropy over all B x (T-1) predicted tokens + backward
  + global-norm clipping at 1.0 + AdamW (lr 1e-5, betas 0.9/0.999, eps 1e-8, no weight decay).
  ours   step_lib.make_train_step(kind="sft", trainable="all"), jitted with the state donated
  torch  model(input_ids, labels=input_ids).loss.backward(); clip_grad_norm_; AdamW.step()
         (transformers' default attention implementation; torch.optim.AdamW defaults)

Time: both contenders live in ONE process and are timed interleaved (JAX step, torch step,
...), medians over --reps after warm-up; compile time of the JAX step is reported apart.
Threads: XLA's CPU backend runs its intra-op pool with one thread per core; torch gets
torch.set_num_threads(--threads, default = cores) so both use the same number.

Memory: each contender runs in its OWN subprocess (`--mem jax|torch`), which loads the model,
builds the optimizer state, compiles / warms up, then resets the kernel's peak-RSS counter
(writing 5 to /proc/self/clear_refs) and runs --mem-steps steps; the figure is the peak
resident set during those steps (VmHWM), i.e. weights + grads + optimizer state + activations
+ allocator slack + the framework's own code, without XLA's compiler. The whole-process peak
(VmHWM before the reset: load + compile + warm-up, max'd with the steps) is reported too; not
getrusage's ru_maxrss, which Linux seeds in an exec'd child with the parent's high-water mark.
For JAX also XLA's own memory_analysis() of the compiled step (arguments, outputs, temporaries).

    python bench/train_vs_torch.py --shapes 2x128,4x256 --out bench/results/train_vs_torch.json
"""
from __future__ import annotations

import argparse
import json
import json as _json
import os
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from common import (
    block,
    finish,
    interleaved,
    loadavg,
    machine,
    reset_peak_rss,
    rss_now_kb,
    rss_peak_kb,
    summary,
    write_json,
)

from semloss_jax import paths
from semloss_jax.loss import objective as obj_lib
from semloss_jax.models import weights
from semloss_jax.train import optim
from semloss_jax.train import step as step_lib

LR, CLIP = 1e-5, 1.0


def batch_np(V: int, B: int, T: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, V, size=(B, T), dtype=np.int32)
    return ids


# ------------------------------------------------------------------------------------ JAX side

def jax_contender(cfg, params, ids, vocab_tile: int = -1):
    """(step_fn() -> loss, compile_s, memory_analysis dict). The state is carried and donated."""
    B, T = ids.shape
    mask = np.ones((1, B, T), np.int32)
    mask[..., -1] = 0  # the last position predicts nothing (as HF's shifted labels)
    batch = {"input_ids": jnp.asarray(ids[None]), "targets": jnp.asarray(np.roll(ids, -1, axis=-1)[None]),
             "loss_mask": jnp.asarray(mask)}
    ocfg = optim.OptimConfig(lr=LR, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, clip_norm=CLIP,
                             warmup_steps=0, total_steps=10_000, final_lr_ratio=1.0, trainable="all")
    opt = optim.make_optimizer(ocfg)
    state = step_lib.init_train_state(jax.tree_util.tree_map(jnp.asarray, params), cfg, ocfg, opt,
                                   jax.random.PRNGKey(0))
    obj = obj_lib.ObjectiveConfig(kind="sft", vocab_tile=vocab_tile)
    step = jax.jit(step_lib.make_train_step(cfg, obj, ocfg, opt),
                   donate_argnums=(0,))
    t = time.perf_counter()
    compiled = step.lower(state, batch, None, None).compile()
    compile_s = time.perf_counter() - t
    mem = {}
    try:
        ma = compiled.memory_analysis()
        for k in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
                  "alias_size_in_bytes", "generated_code_size_in_bytes"):
            mem[k] = int(getattr(ma, k))
    except Exception as e:  # noqa: BLE001 - informational
        mem["error"] = repr(e)
    holder = {"state": state}

    def run():
        holder["state"], m = compiled(holder["state"], batch, None, None)
        return float(block(m["loss"]))

    return run, compile_s, mem


# ---------------------------------------------------------------------------------- torch side

def torch_contender(hf_dir, ids, threads: int):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    x = torch.as_tensor(ids, dtype=torch.long)

    def run():
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        return float(loss.detach())

    attn = getattr(model.config, "_attn_implementation", None)
    return run, {"attn_implementation": attn, "torch_threads": torch.get_num_threads(),
                 "torch_interop_threads": torch.get_num_interop_threads(), "torch": torch.__version__}


def load(model_path, hf_dir=None):
    cfg, params = weights.load_model(model_path or paths.default_model_path())
    if hf_dir is not None and not os.path.exists(os.path.join(hf_dir, "model.safetensors")):
        weights.export_hf(params, cfg, hf_dir)
    return cfg, params


# ------------------------------------------------------------------------------- memory (child)

def mem_child(which: str, shape: str, hf_dir: str, model_path, steps: int, threads: int,
              vocab_tile: int = -1) -> dict:
    B, T = (int(v) for v in shape.split("x"))
    out = {"which": which, "shape": shape}
    if which == "jax":
        cfg, params = load(model_path)
        ids = batch_np(cfg.vocab_size, B, T)
        out["rss_after_load_kb"] = rss_now_kb()
        run, out["compile_s"], out["xla_memory_analysis"] = jax_contender(cfg, params, ids, vocab_tile)
        del params
    else:
        with open(os.path.join(hf_dir, "config.json")) as f:
            V = _json.load(f)["vocab_size"]
        ids = batch_np(V, B, T)
        run, extra = torch_contender(hf_dir, ids, threads)
        out.update(extra)
        out["rss_after_load_kb"] = rss_now_kb()
    run()  # warm-up (torch allocates the AdamW state here)
    out["rss_before_steps_kb"] = rss_now_kb()
    # VmHWM of this process so far (load + compile + warm-up). Not ru_maxrss: Linux carries the
    # parent's high-water mark into a forked+exec'd child's ru_maxrss, so it is polluted here.
    out["peak_rss_load_compile_kb"] = rss_peak_kb()
    out["peak_reset"] = reset_peak_rss()
    for _ in range(steps):
        run()
    out["peak_rss_steps_kb"] = rss_peak_kb()
    out["peak_rss_process_kb"] = max(out["peak_rss_steps_kb"], out["peak_rss_load_compile_kb"])
    return out


def measure_memory(shape, hf_dir, model_path, steps, threads, omp_passive, vocab_tile=-1) -> dict:
    res = {}
    for which in ("jax", "torch"):
        cmd = [sys.executable, os.path.abspath(__file__), "--mem", which, "--shapes", shape,
               "--vocab-tile", str(vocab_tile),
               "--hf-dir", hf_dir, "--mem-steps", str(steps), "--threads", str(threads)]
        if model_path:
            cmd += ["--model", model_path]
        if omp_passive:
            cmd += ["--omp-passive"]
        p = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in p.stdout.splitlines() if ln.startswith("MEMJSON ")]
        if p.returncode != 0 or not lines:
            raise RuntimeError(f"memory subprocess {which} failed (rc {p.returncode}):\n{p.stderr[-3000:]}")
        res[which] = json.loads(lines[-1][len("MEMJSON "):])
    res["peak_ratio_steps"] = res["jax"]["peak_rss_steps_kb"] / res["torch"]["peak_rss_steps_kb"]
    res["process_peak_ratio"] = res["jax"]["peak_rss_process_kb"] / res["torch"]["peak_rss_process_kb"]
    return res


# ------------------------------------------------------------------------------------------ main

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="2x128", help="comma-separated BxT")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--mem-steps", type=int, default=2)
    ap.add_argument("--no-mem", action="store_true")
    ap.add_argument("--no-time", action="store_true")
    ap.add_argument("--hf-dir", default=None, help="where to export the HF copy (default: a temp dir)")
    ap.add_argument("--omp-passive", action="store_true",
                    help="set OMP_WAIT_POLICY=PASSIVE before torch loads (its OpenMP threads then sleep "
                         "instead of spinning at barriers; matters a lot on an oversubscribed machine)")
    ap.add_argument("--mem", choices=("jax", "torch"), default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model", default=None)
    ap.add_argument("--vocab-tile", type=int, default=-1,
                    help="objective.vocab_tile of our step: -1 automatic (the default), 0 materialized "
                         "logits, N tiles of about N columns")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.omp_passive:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # before torch (libgomp) is imported

    if args.mem:
        print("MEMJSON " + json.dumps(mem_child(args.mem, args.shapes, args.hf_dir, args.model,
                                                args.mem_steps, args.threads, args.vocab_tile)))
        return

    info = machine({"bench": "train_vs_torch", "reps": args.reps, "threads": args.threads,
                    "vocab_tile": args.vocab_tile,
                    "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "")})
    print(f"machine: {info['cpu']}, {info['cores']} cores, load {info['loadavg_start']}")
    tmp = None
    hf_dir = args.hf_dir
    if hf_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_hf_")
        hf_dir = os.path.join(tmp.name, "smollm2_hf")
    cfg, params = load(args.model, hf_dir)
    results = {}
    for shape in args.shapes.split(","):
        B, T = (int(v) for v in shape.split("x"))
        ids = batch_np(cfg.vocab_size, B, T)
        r = {"B": B, "T": T}
        if not args.no_time:
            run_jax, compile_s, mem_an = jax_contender(cfg, params, ids, args.vocab_tile)
            r["xla_memory_analysis"] = mem_an
            run_torch, extra = torch_contender(hf_dir, ids, args.threads)
            r.update(extra)
            r["jax_compile_s"] = compile_s
            losses = {"jax": [], "torch": []}
            for _ in range(args.warmup):
                losses["jax"].append(run_jax())
                losses["torch"].append(run_torch())
            calls = {"jax": lambda losses=losses, run_jax=run_jax: losses["jax"].append(run_jax()),
                     "torch": lambda losses=losses, run_torch=run_torch: losses["torch"].append(run_torch())}
            times = interleaved(calls, args.reps)
            r["time"] = summary(times, "jax", "torch")
            r["losses"] = losses
            r["tokens_per_s"] = {k: B * T / v for k, v in r["time"]["median_s"].items()}
            print(f"[{shape}] step: ours {r['time']['median_s']['jax']:.2f} s, torch "
                  f"{r['time']['median_s']['torch']:.2f} s (medians of {args.reps}); ratio ours/torch "
                  f"{r['time']['ratio']:.3f} (median per-rep {r['time']['ratio_median_per_rep']:.3f}); "
                  f"JAX compile {compile_s:.1f} s; first losses {losses['jax'][0]:.4f} vs "
                  f"{losses['torch'][0]:.4f}; torch threads {extra['torch_threads']}, attention "
                  f"{extra['attn_implementation']}; load {loadavg()}")
            del run_jax, run_torch, calls
        if not args.no_mem:
            m = measure_memory(shape, hf_dir, args.model, args.mem_steps, args.threads, args.omp_passive,
                               args.vocab_tile)
            r["memory"] = m
            temp_bytes = m["jax"]["xla_memory_analysis"].get("temp_size_in_bytes", 0)
            print(f"[{shape}] peak RSS during steps: ours {m['jax']['peak_rss_steps_kb'] / 2**20:.2f} GiB, "
                  f"torch {m['torch']['peak_rss_steps_kb'] / 2**20:.2f} GiB, "
                  f"ratio {m['peak_ratio_steps']:.3f}; "
                  f"whole-process peak (load + compile + steps) "
                  f"ours {m['jax']['peak_rss_process_kb'] / 2**20:.2f} "
                  f"GiB, torch {m['torch']['peak_rss_process_kb'] / 2**20:.2f} GiB, "
                  f"ratio {m['process_peak_ratio']:.3f}; "
                  f"XLA temp buffers {temp_bytes / 2**30:.2f} GiB")
        results[shape] = r
    finish(info)
    print(f"load average start {info['loadavg_start']} end {info['loadavg_end']}")
    write_json(args.out, {"machine": info, "results": results})
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
