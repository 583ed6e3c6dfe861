"""How many warm-started Sinkhorn stages the exact EMD reference needs: accuracy against the LP
and time, side by side for 2, 3 and 4 stages (epsilon 1e-2 -> 2e-3 [-> 4e-4 [-> 1e-4]]).

Two inputs:
- near-duplicate tokens (synthetic): 100 supports of 3 pairs of near-duplicate unit vectors
  (cost ~1e-3 within a pair; the generator of tests/test_ot_exact.py), a random p and the same
  p with each pair's mass swapped (the exact EMD is then a few 1e-4), plus EMD(p, p) = 0;
- real SmolLM2 next-token distributions: N positions of real harmful pairs, p under the default
  system prompt, q under the safety one (eval/bounds.py's data), top-k union supports.
The timed contenders (the real positions, jitted, warmed up) run interleaved.

    python bench/sinkhorn_stages.py --positions 64 --out bench/results/sinkhorn_stages.json
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from common import block, finish, interleaved, machine, write_json

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_ot_exact import _near_duplicate_problems  # noqa: E402 - the tests' generator

from semloss_jax.eval import bounds  # noqa: E402
from semloss_jax.loss import cost, ot_exact  # noqa: E402
from semloss_jax.models import loading  # noqa: E402
from semloss_jax.models.llama import embedding_matrix  # noqa: E402

STAGES = {"2 stages": (), "3 stages": (4e-4,), "4 stages": (4e-4, 1e-4)}
PLANS_ONLY = "2 stages, Sinkhorn plans only"  # without the diagonal candidate (near-duplicates only)


def near_duplicates(cfgs: dict) -> dict:
    """Per contender: EMD(p, p) and (OTT - LP) on the swapped-pairs problems."""
    probs = list(_near_duplicate_problems())
    lps = [ot_exact.emd_lp(a, b, np.asarray(C, np.float64)) for a, b, C in probs]
    out = {}
    for name, cfg in cfgs.items():
        f = jax.jit(lambda a, b, C, cfg=cfg: ot_exact.sinkhorn_emd(a, b, C, cfg).cost)
        pp = [float(f(jnp.asarray(a), jnp.asarray(a), C)) for a, _, C in probs]
        err = [float(f(jnp.asarray(a), jnp.asarray(b), C)) - lp for (a, b, C), lp in zip(probs, lps)]
        out[name] = {"emd_p_p_max": max(pp), "swap_err_mean": float(np.mean(err)),
                     "swap_err_max": max(err), "swap_rel_err_mean": float(np.mean(np.array(err) / lps))}
    return out


def real_positions(cfgs: dict, n: int, k: int, reps: int) -> dict:
    """Per contender on n real positions: |OTT - LP| and seconds per position."""
    m = loading.load_model(None)
    E = cost.unit_embeddings(embedding_matrix(m.params))
    P, Q, _, _ = bounds.collect((m.params, m.cfg), (m.params, m.cfg), m.tok, bounds.load_pairs(0), n, 32,
                                bounds.DEFAULT_SAFETY_SYSTEM, False)
    P, Q = jnp.asarray(P), jnp.asarray(Q)
    lp = np.array([ot_exact.lp_on_support(P[i], Q[i], E, k) for i in range(n)])
    fns = {name: (lambda cfg=cfg: block(ot_exact.batched_topk_emd(P, Q, E, k=k, cfg=cfg)))
           for name, cfg in cfgs.items()}
    outs = {name: fn() for name, fn in fns.items()}  # compile + warm up
    times = interleaved(fns, reps)
    base = statistics.median(times["2 stages"])
    res = {}
    for name, o in outs.items():
        err = np.abs(np.asarray(o.exact) - lp)
        t = statistics.median(times[name])
        res[name] = {"abs_err_mean": float(err.mean()), "abs_err_max": float(err.max()),
                     "converged": float(np.mean(o.converged)), "s_per_position": t / n,
                     "time_vs_2_stages": t / base}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--positions", type=int, default=64)
    ap.add_argument("--topk", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default="bench/results/sinkhorn_stages.json")
    args = ap.parse_args()
    info = machine({"positions": args.positions, "topk": args.topk, "reps": args.reps})
    cfgs = {name: ot_exact.SinkhornConfig(polish_epsilons=pol) for name, pol in STAGES.items()}
    res = {"near_duplicates": near_duplicates(
               {**cfgs, PLANS_ONLY: ot_exact.SinkhornConfig(polish_epsilons=(), diagonal=False)}),
           "real": real_positions(cfgs, args.positions, args.topk, args.reps)}
    nd = res["near_duplicates"][PLANS_ONLY]
    print(f"{PLANS_ONLY}: near-duplicates EMD(p,p) max {nd['emd_p_p_max']:.1e}")
    for name in cfgs:
        nd, r = res["near_duplicates"][name], res["real"][name]
        print(f"{name}: near-duplicates EMD(p,p) max {nd['emd_p_p_max']:.1e}, swapped pairs OTT-LP "
              f"mean {nd['swap_err_mean']:.1e} (max {nd['swap_err_max']:.1e}, "
              f"{100 * nd['swap_rel_err_mean']:.0f}% of the value) | real: |OTT-LP| mean "
              f"{r['abs_err_mean']:.1e} max {r['abs_err_max']:.1e}, "
              f"{r['s_per_position']:.3f} s/position = {r['time_vs_2_stages']:.2f}x two stages")
    write_json(args.out, {"machine": finish(info), "results": res})


if __name__ == "__main__":
    main()
