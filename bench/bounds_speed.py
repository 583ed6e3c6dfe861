"""Per-position cost of the EMD quantities: the lower bound of emd.py vs
OTT's exact EMD on a top-k support (ot_exact.py) vs the one-hot closed form (emd.py), and how
each scales with the vocabulary size V and the support size k.

Inputs are REAL next-token distributions: SmolLM2-135M logits at N positions of a chat
(prompt + answer); the soft target q is the same logits plus N(0, sigma^2) noise (a nearby
model, as for a reference-model target). For V < 49,152 the logits and the unit embedding rows
are truncated to the first V tokens. Each contender is jitted and warmed up, then all
contenders of one V are timed interleaved; per-position seconds are medians / positions.

    lb_onehot      emd.lower_bound(z, y, Ê)                 [N, V] @ [V, d] + gather
    closed_onehot  emd.onehot_emd(z, y, Ê)                  exact EMD to δ_y, same cost
    lb_soft        emd.lower_bound(z, q, Ê, kind="logits")  two [N, V] @ [V, d] products
    ott_soft_k     ot_exact.batched_topk_emd(z, q, Ê, k)    Sinkhorn on top-k(p) ∪ top-k(q)
    ott_onehot_k   ot_exact.batched_topk_onehot_emd(z, y)   Sinkhorn on top-k(p) ∪ {y}

    python bench/bounds_speed.py --out bench/results/bounds_speed.json
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from common import block, finish, interleaved, loadavg, machine, write_json

from semloss_jax import paths
from semloss_jax.loss import cost, emd, ot_exact
from semloss_jax.models import llama as model_lib
from semloss_jax.models import weights
from semloss_jax.models.tokenizer import load_tokenizer

PROMPT = "Give three tips for staying healthy."
ANSWER = ("1. Eat a balanced diet with plenty of fruit and vegetables. 2. Exercise regularly, at least "
          "thirty minutes a day. 3. Sleep seven to eight hours every night and keep a regular schedule.")


def real_logits(n_positions: int, model_path):
    cfg, params = weights.load_model(model_path)
    tok = load_tokenizer(model_path)
    ids = tok.prompt_ids(PROMPT) + tok.response_ids(ANSWER)
    while len(ids) < n_positions + 1:
        ids = ids + ids
    ids = np.asarray(ids[: n_positions + 1], np.int32)[None]
    logits = model_lib.forward(jax.tree_util.tree_map(jnp.asarray, params), cfg, jnp.asarray(ids[:, :-1]))[0]
    E_hat = cost.unit_embeddings(model_lib.embedding_matrix(params))
    return np.asarray(logits), np.asarray(ids[0, 1:]), np.asarray(E_hat)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", default="4096,16384,49152")
    ap.add_argument("--k", default="16,64,256")
    ap.add_argument("--positions", type=int, default=128, help="positions for the closed forms")
    ap.add_argument("--ott-positions", type=int, default=16, help="positions for the OTT solves")
    ap.add_argument("--sigma", type=float, default=1.0, help="noise on the soft target's logits")
    ap.add_argument("--reps", type=int, default=9, help="repetitions of the closed forms")
    ap.add_argument("--ott-reps", type=int, default=3, help="repetitions of the OTT solves")
    ap.add_argument("--big-k-vocab", default="49152",
                    help="k >= 256 (seconds per position) is only timed at these V, on --big-k-positions")
    ap.add_argument("--big-k-positions", type=int, default=2)
    ap.add_argument("--onehot-ott-vocab", default="49152", help="V values where OTT one-hot is timed")
    ap.add_argument("--model", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    Vs = [int(v) for v in args.vocab.split(",")]
    ks = [int(k) for k in args.k.split(",") if k]
    big_Vs = {int(v) for v in args.big_k_vocab.split(",") if v}
    onehot_Vs = {int(v) for v in args.onehot_ott_vocab.split(",") if v}

    info = machine({"bench": "bounds_speed", "positions": args.positions, "ott_positions": args.ott_positions,
                    "sigma": args.sigma, "reps": args.reps, "sinkhorn": vars(ot_exact.SinkhornConfig())})
    print(f"machine: {info['cpu']}, {info['cores']} cores, load {info['loadavg_start']}")
    z_all, y_all, E_all = real_logits(args.positions, args.model or paths.default_model_path())
    rng = np.random.default_rng(0)
    q_all = z_all + args.sigma * rng.standard_normal(z_all.shape).astype(np.float32)
    N, No = args.positions, args.ott_positions

    rows = []
    for V in Vs:
        E = jnp.asarray(E_all[:V])
        z, q = jnp.asarray(z_all[:, :V]), jnp.asarray(q_all[:, :V])
        y = jnp.asarray(np.where(y_all < V, y_all, y_all % V).astype(np.int32))
        fns = {
            "lb_onehot": (jax.jit(lambda z, y, E: emd.lower_bound(z, y, E, kind="onehot")), (z, y, E), N),
            "closed_onehot": (jax.jit(emd.onehot_emd), (z, y, E), N),
            "lb_soft": (jax.jit(lambda z, q, E: emd.lower_bound(z, q, E, kind="logits")), (z, q, E), N),
        }
        for k in ks:
            if k >= 256 and V not in big_Vs:
                continue
            n = args.big_k_positions if k >= 256 else No
            fns[f"ott_soft_k{k}"] = (lambda z, q, E, k=k: ot_exact.batched_topk_emd(z, q, E, k=k),
                                     (z[:n], q[:n], E), n)
            if V in onehot_Vs:
                fns[f"ott_onehot_k{k}"] = (
                    lambda z, y, E, k=k: ot_exact.batched_topk_onehot_emd(z, y, E, k=k), (z[:n], y[:n], E), n)
        first_s, outs, calls = {}, {}, {}
        for name, (f, a, _) in fns.items():
            t = time.perf_counter()
            outs[name] = block(f(*a))
            first_s[name] = time.perf_counter() - t
            calls[name] = (lambda f=f, a=a: block(f(*a)))
        # closed forms: many fast repetitions; OTT: few slow ones, interleaved with the bounds again
        # so that each OTT ratio compares timings taken under the same load
        closed = [n for n in fns if not n.startswith("ott")]
        times = interleaved({n: calls[n] for n in closed}, args.reps)
        ott_names = [n for n in fns if n.startswith("ott")]
        times_ott = (interleaved({n: calls[n] for n in closed + ott_names}, args.ott_reps)
                     if ott_names else {})
        row = {"V": V, "per_position_s": {}, "first_call_s": first_s,
               "positions": {n: f[2] for n, f in fns.items()}}
        for name, (_, _, n) in fns.items():
            row["per_position_s"][name] = (statistics.median((times if name in closed else times_ott)[name])
                                           / n)
        pp = row["per_position_s"]
        pp_o = {n: statistics.median(v) / fns[n][2] for n, v in times_ott.items()}
        row["ratios"] = {}
        for n in ott_names:
            ref = "lb_soft" if n.startswith("ott_soft") else "closed_onehot"
            row["ratios"][f"{n}/{ref}"] = pp_o[n] / pp_o[ref]
        row["ratios"]["closed_onehot/lb_onehot"] = pp["closed_onehot"] / pp["lb_onehot"]
        row["ratios"]["lb_soft/lb_onehot"] = pp["lb_soft"] / pp["lb_onehot"]
        # what the OTT solves did (iterations, convergence) and the values, for context
        row["ott"] = {}
        for name in fns:
            if name.startswith("ott"):
                o = outs[name]
                row["ott"][name] = {"median_iters": float(np.median(np.asarray(o.n_iters))),
                                    "converged_frac": float(np.mean(np.asarray(o.converged))),
                                    "mean_exact": float(np.mean(np.asarray(o.exact)))}
                if name.startswith("ott_soft"):
                    row["ott"][name]["mean_lower"] = float(np.mean(np.asarray(o.lower)))
                    row["ott"][name]["mean_upper"] = float(np.mean(np.asarray(o.upper)))
        rows.append(row)
        print(f"\nV = {V}  (closed forms on {N} positions, OTT on {No} (k >= 256: {args.big_k_positions}); "
              f"load {loadavg()})")
        for name in fns:
            extra = ""
            if name in row["ott"]:
                extra = (f"  iters {row['ott'][name]['median_iters']:.0f}, "
                         f"conv {row['ott'][name]['converged_frac']:.2f}")
            print(f"  {name:16s} {pp[name] * 1e6:12.1f} us/position  "
                  f"(first call {first_s[name]:.2f} s){extra}")
        for r, v in row["ratios"].items():
            print(f"  {r:28s} {v:10.1f}x")
    finish(info)
    print(f"\nload average start {info['loadavg_start']} end {info['loadavg_end']}")
    write_json(args.out, {"machine": info, "rows": rows})


if __name__ == "__main__":
    main()
