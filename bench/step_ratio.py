"""TA-SFT step time / SFT step time on the same number of tokens.

Both steps are `semloss_jax.train.step.make_train_step` on the real SmolLM2-135M:
  TA-SFT  kind="tasft", divergence="lower_bound": benign batch B x T + harmful batch B x T
          (one forward of 2B x T rows, objective.loss_sums concatenates them)
  SFT     kind="sft": the SAME 2B x T token rows given as one benign batch (harmful=None),
          so both forward/backward the same tokens; the difference is the loss head:
          TA-SFT adds μ(p) = softmax(z) @ Ê on the harmful rows (one positions x V x d product
          forward, one backward) and its logged extras (harmful NLL, unlikelihood, bounds).
Each (objective, trainable setting) step is jitted once, warmed up, then the objectives are
timed interleaved; medians and ratios are printed (and written to --out as JSON).

--compare gelbrich times the Gelbrich divergence (objective.divergence=gelbrich, rank
--gelbrich-rank) against the lower bound on the same batches, for one-hot targets and for soft
targets (target_mu = μ(q) of random next-token distributions, followed by their packed
covariances for the Gelbrich step).

    python bench/step_ratio.py --out bench/results/step_ratio.json
    python bench/step_ratio.py --compare gelbrich --settings last_k2 \
        --out bench/results/step_ratio_gelbrich.json
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from common import block, finish, interleaved, loadavg, machine, summary, write_json

from semloss_jax import paths
from semloss_jax.loss import cost, emd
from semloss_jax.loss import objective as obj_lib
from semloss_jax.models import llama as model_lib
from semloss_jax.models import weights
from semloss_jax.train import optim
from semloss_jax.train import step as step_lib

COMPARISONS = {  # name -> pairs (numerator, denominator) of contenders timed together
    "sft": [("tasft", "sft")],
    "gelbrich": [("gelbrich_onehot", "tasft"), ("gelbrich_soft", "tasft_soft")],
}

SETTINGS = {
    "all": dict(trainable="all"),
    "last_k2": dict(trainable="last_k", last_k=2),
    "lora_r8_qv": dict(trainable="lora", lora_rank=8, lora_targets=("q_proj", "v_proj")),
}


def make_batches(V: int, B: int, T: int, seed: int = 0):
    """Benign [1, B, T], harmful [1, B, T] and their concatenation [1, 2B, T] (the SFT batch).
    Random token ids; loss on the second half of each row (the 'response')."""
    rng = np.random.default_rng(seed)

    def one():
        ids = rng.integers(0, V, size=(1, B, T), dtype=np.int32)
        mask = np.zeros((1, B, T), np.int32)
        mask[..., T // 2:] = 1
        return {"input_ids": ids, "targets": np.roll(ids, -1, axis=-1), "loss_mask": mask,
                "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (1, B, T)).copy(),
                "segment_ids": np.ones((1, B, T), np.int32)}

    benign, harmful = one(), one()
    both = {k: np.concatenate([benign[k], harmful[k]], axis=1) for k in benign}
    return benign, harmful, both


def contenders(rank: int) -> dict:
    """Contender name -> (objective, which harmful batch: None (SFT), "onehot", "soft_mu", "soft_cov")."""
    obj = obj_lib.ObjectiveConfig
    return {"tasft": (obj(kind="tasft", divergence="lower_bound"), "onehot"),
            "sft": (obj(kind="sft"), None),
            "gelbrich_onehot": (obj(kind="tasft", divergence="gelbrich", gelbrich_rank=rank), "onehot"),
            "tasft_soft": (obj(kind="tasft", target="soft"), "soft_mu"),
            "gelbrich_soft": (obj(kind="tasft", divergence="gelbrich", target="soft", gelbrich_rank=rank),
                              "soft_cov")}


def soft_targets(harmful: dict, E_hat, rank: int, seed: int = 1) -> dict:
    """The harmful batch with target_mu = μ(q) of random next-token distributions ("soft_mu"),
    and with their packed covariances after it ("soft_cov")."""
    shape = harmful["input_ids"].shape + (E_hat.shape[0],)
    q = jax.nn.softmax(jax.random.normal(jax.random.PRNGKey(seed), shape) * 3.0, axis=-1)
    mu, cov = emd.projected_moments(q, E_hat, emd.principal_basis(E_hat, rank))
    return {"soft_mu": dict(harmful, target_mu=mu),
            "soft_cov": dict(harmful, target_mu=jnp.concatenate([mu, emd.pack_symmetric(cov)], -1))}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=2, help="rows per stream (benign and harmful)")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--settings", default="all,last_k2,lora_r8_qv")
    ap.add_argument("--model", default=None, help="model path (default: the SmolLM2-135M GGUF)")
    ap.add_argument("--compare", choices=sorted(COMPARISONS), default="sft",
                    help="sft: TA-SFT (LB) vs SFT; gelbrich: the Gelbrich divergence vs LB")
    ap.add_argument("--gelbrich-rank", type=int, default=16)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    info = machine({"bench": "step_ratio", "batch_per_stream": args.batch, "seq": args.seq,
                    "reps": args.reps})
    print(f"machine: {info['cpu']}, {info['cores']} cores, load {info['loadavg_start']}")
    cfg, params = weights.load_model(args.model or paths.default_model_path())
    params = jax.tree_util.tree_map(jnp.asarray, params)
    E_hat = cost.unit_embeddings(model_lib.embedding_matrix(params))
    benign, harmful, both = make_batches(cfg.vocab_size, args.batch, args.seq)
    benign, harmful, both = (jax.tree_util.tree_map(jnp.asarray, x) for x in (benign, harmful, both))
    tokens = int(np.prod(both["input_ids"].shape))
    print(f"model: {cfg.num_hidden_layers} layers, d={cfg.hidden_size}, V={cfg.vocab_size}; "
          f"tokens per step {tokens} (TA-SFT {args.batch}x{args.seq} benign + {args.batch}x{args.seq} "
          f"harmful; SFT the same {2 * args.batch}x{args.seq} rows as benign)")

    pairs = COMPARISONS[args.compare]
    names = list(dict.fromkeys(n for pair in pairs for n in pair))
    table = contenders(args.gelbrich_rank)
    harm = {"onehot": harmful, **(soft_targets(harmful, E_hat, args.gelbrich_rank)
                                  if args.compare == "gelbrich" else {})}
    results = {}
    for name in args.settings.split(","):
        ocfg = optim.OptimConfig(lr=1e-5, clip_norm=1.0, **SETTINGS[name])
        opt = optim.make_optimizer(ocfg)
        state = step_lib.init_train_state(params, cfg, ocfg, opt, jax.random.PRNGKey(0))
        calls, compile_s = {}, {}
        for kind in names:
            obj, which = table[kind]
            basis = emd.principal_basis(E_hat, obj.gelbrich_rank) if obj.divergence == "gelbrich" else None
            step = jax.jit(step_lib.make_train_step(cfg, obj, ocfg, opt, basis))
            b, h = (benign, harm[which]) if which else (both, None)
            t = time.perf_counter()
            compiled = step.lower(state, b, h, E_hat).compile()
            compile_s[kind] = time.perf_counter() - t
            calls[kind] = (lambda c=compiled, s=state, b=b, h=h: block(c(s, b, h, E_hat)))
            for _ in range(args.warmup):
                calls[kind]()
        times = interleaved(calls, args.reps)
        results[name] = {"compile_s": compile_s, "tokens_per_step": tokens}
        for a, b in pairs:
            s = summary({k: times[k] for k in (a, b)}, a, b)
            results[name][f"{a}/{b}"] = s
            print(f"[{name}] {a} {s['median_s'][a]:.3f} s, {b} {s['median_s'][b]:.3f} s "
                  f"(medians of {args.reps}); ratio {s['ratio']:.3f} "
                  f"(median per-rep {s['ratio_median_per_rep']:.3f}); "
                  f"compile {a} {compile_s[a]:.1f} s, {b} {compile_s[b]:.1f} s; load {loadavg()}")
        del state, calls
    finish(info)
    print(f"load average start {info['loadavg_start']} end {info['loadavg_end']}")
    write_json(args.out, {"machine": info, "results": results})


if __name__ == "__main__":
    main()
