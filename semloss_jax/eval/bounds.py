"""`python eval.py bounds --out DIR`: the exact EMD (OTT) against the bounds on real model outputs.

On real harmful (prompt, response) pairs (registry.load_set("harmful_responses"): PyRIT's
many-shot pairs labelled harmful), two real, different next-token distributions are taken
at each response position t (teacher forcing along the harmful response):

    p_t : the model (--model-p, default --model) under its DEFAULT system prompt
    q_t : the base model (--model) under a SAFETY-focused system prompt (--system-q)

Per position:
    exact        EMD(p̃, q̃) with OTT Sinkhorn on S = top-k(p) ∪ top-k(q), p̃ / q̃ renormalized on S
    lower/upper  LB / UB (emd.py) of the SAME truncated p̃, q̃
    lower_full / upper_full   LB / UB on the full vocabulary (emd.py, no truncation)
    onehot_*     q = δ_y (y the actual response token): OTT on top-k(p) ∪ {y} versus the closed
                 form 1 - μ(p̃)·ê_y on the same truncated p̃; and the full-vocabulary closed form
    lp           the exact LP (HiGHS) on the first --lp-check positions (validates OTT)
    gelbrich_rR  the Gelbrich bound LB_G (means plus covariances in the top-R principal basis of
                 Ê) of the same truncated p̃, q̃, for each R of --gelbrich-ranks; its cost on the
                 full vocabulary is timed beside LB's for R <= 64

Writes DIR/bounds.json (per-position arrays + summary), DIR/bounds.md and DIR/bounds.png.
Ê comes from the base model (--model), the frozen geometry of METHOD.md.
"""
from __future__ import annotations

import argparse
import io
import json
import shlex
import sys
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from semloss_jax.data.registry import load_set
from semloss_jax.errors import EvalError
from semloss_jax.loss import emd, ot_exact
from semloss_jax.loss.cost import unit_embeddings
from semloss_jax.loss.ot_exact import SinkhornConfig
from semloss_jax.models import loading
from semloss_jax.models.llama import embedding_matrix, forward
from semloss_jax.paths import atomic_write_bytes, atomic_write_text

DEFAULT_SAFETY_SYSTEM = (
    "You are a safe and responsible assistant. You never help with anything harmful, dangerous, "
    "illegal or unethical: you refuse such requests politely and explain why, and you offer a "
    "safe alternative when there is one.")
GAP_FLOOR = 1e-4  # positions with exact EMD below this are left out of the relative gaps


def add_args(p: argparse.ArgumentParser) -> None:
    """The options of `eval.py bounds`."""
    p.add_argument("--out", required=True, help="output folder (bounds.json, bounds.md, bounds.png)")
    p.add_argument("--positions", type=int, default=256, help="response positions to compare (default 256)")
    p.add_argument("--topk", type=int, default=32, help="k of the top-k union support (default 32)")
    p.add_argument("--model", default=None,
                   help="base model: q and Ê (GGUF, HF dir or run dir; default: SmolLM2-135M-Instruct)")
    p.add_argument("--model-p", default=None,
                   help="model for p (e.g. a trained checkpoint; default: --model)")
    p.add_argument("--system-q", default=DEFAULT_SAFETY_SYSTEM, help="safety system prompt for q")
    p.add_argument("--max-response-tokens", type=int, default=32,
                   help="response positions taken per pair (spreads --positions over pairs)")
    p.add_argument("--lp-check", type=int, default=32, help="positions also solved by the exact LP")
    p.add_argument("--epsilon", type=float, default=None, help="Sinkhorn epsilon (absolute; default 1e-2)")
    p.add_argument("--seed", type=int, default=0, help="order in which pairs are drawn")
    p.add_argument("--gelbrich-ranks", default="16,64,full",
                   help="basis sizes r of the Gelbrich bound LB_G ('full' = all d directions)")
    p.add_argument("--no-progress", action="store_true")


# ----------------------------------------------------------------------------- model outputs

def _pad_len(n: int, multiple: int = 64) -> int:
    return -(-n // multiple) * multiple


def response_logits(params, cfg, tok, prompt: str, response: str, system: str | None, n_tokens: int):
    """Next-token logits [n, V] at the first n response positions (teacher forcing) and the
    response tokens y [n]: row j is the prediction of response token j."""
    pids = tok.prompt_ids(prompt, system=system)
    rids = tok.response_ids(response)[:n_tokens]
    ids = pids + rids
    T = _pad_len(len(ids))  # right padding: causal, earlier positions are unaffected
    x = np.full((1, T), tok.pad_id, np.int32)
    x[0, :len(ids)] = ids
    logits = forward(params, cfg, jnp.asarray(x))
    start = len(pids) - 1
    return np.asarray(logits[0, start:start + len(rids)], np.float32), np.asarray(rids, np.int32)


def collect(p_model, q_model, tok, pairs, n_positions: int, max_tokens: int, system_q: str,
            progress: bool):
    """Walk pairs until n_positions are gathered: (p_logits [N, V], q_logits [N, V], y [N], rows)."""
    P, Q, Y, rows = [], [], [], []
    got = 0
    bar = tqdm(total=n_positions, desc="bounds: model forwards", unit="pos", disable=not progress,
               file=sys.stderr)
    for rec in pairs:
        if got >= n_positions:
            break
        n = min(max_tokens, n_positions - got)
        lp, y = response_logits(*p_model, tok, rec.prompt, rec.response, None, n)
        lq, y2 = response_logits(*q_model, tok, rec.prompt, rec.response, system_q, n)
        if not np.array_equal(y, y2):
            raise EvalError(f"{rec.id}: response tokens differ between the two prompts")
        P.append(lp)
        Q.append(lq)
        Y.append(y)
        rows += [{"pair": rec.id, "t": j} for j in range(len(y))]
        got += len(y)
        bar.update(len(y))
    bar.close()
    if got == 0:
        raise EvalError("no response positions gathered: the pair set is empty")
    return np.concatenate(P), np.concatenate(Q), np.concatenate(Y), rows


def load_pairs(seed: int):
    """Real harmful (prompt, response) pairs, shuffled deterministically."""
    recs = load_set("harmful_responses", "train")
    order = np.random.default_rng(seed).permutation(len(recs))
    return [recs[i] for i in order]


# ----------------------------------------------------------------------------- computation

def _timed(fn, *args, **kw):
    """(result, compile seconds, run seconds): AOT-compile, then time one execution."""
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args, **kw).compile()
    t1 = time.perf_counter()
    out = jax.block_until_ready(compiled(*args))
    return out, t1 - t0, time.perf_counter() - t1


def compute(P, Q, Y, E_hat, *, k: int, cfg, lp_check: int, progress: bool) -> tuple[dict, dict]:
    """All per-position quantities and the timings (seconds per position, compile excluded)."""
    N = P.shape[0]
    Pj, Qj, Yj = jnp.asarray(P), jnp.asarray(Q), jnp.asarray(Y)
    steps = ["OTT exact (soft)", "bounds (top-k support)", "bounds (full vocab)", "one-hot OTT",
             "one-hot closed form (full vocab)", "exact LP (HiGHS)"]
    bar = tqdm(steps, desc="bounds: methods", disable=not progress, file=sys.stderr)
    timing, compile_s, arrays = {}, {}, {}

    def step(name):
        bar.set_postfix_str(name)

    step(steps[0])
    ott = partial(ot_exact.batched_topk_emd, k=k, cfg=cfg)
    r, compile_s["exact_ott"], t = _timed(ott, Pj, Qj, E_hat)
    timing["exact_ott"] = t / N
    arrays.update(exact=r.exact, converged=r.converged, n_iters=r.n_iters, marginal_error=r.marginal_error)
    bar.update()

    step(steps[1])
    b, compile_s["bounds_topk"], t = _timed(partial(ot_exact.batched_topk_bounds, k=k), Pj, Qj, E_hat)
    timing["bounds_topk"] = t / N
    arrays.update(b._asdict())
    # the OTT call computed the same truncated bounds: they must agree
    np.testing.assert_allclose(np.asarray(r.lower), np.asarray(b.lower), atol=1e-5)
    bar.update()

    step(steps[2])
    def full(pl, ql, E):
        return (emd.lower_bound(pl, ql, E, kind="logits"), emd.upper_bound(pl, ql, E, kind="logits"))
    (lf, uf), compile_s["bounds_full"], t = _timed(full, Pj, Qj, E_hat)
    timing["bounds_full"] = t / N
    arrays.update(lower_full=lf, upper_full=uf)
    bar.update()

    step(steps[3])
    oh = partial(ot_exact.batched_topk_onehot_emd, k=k, cfg=cfg)
    o, compile_s["onehot_ott"], t = _timed(oh, Pj, Yj, E_hat)
    timing["onehot_ott"] = t / N
    arrays.update(onehot_exact=o.exact, onehot_closed=o.closed, onehot_converged=o.converged,
                  onehot_mass_p=o.mass_p)
    bar.update()

    step(steps[4])
    def closed(pl, y, E):
        return emd.onehot_emd(pl, y, E), emd.lower_bound(pl, y, E)
    (cf, lbf), compile_s["onehot_closed_full"], t = _timed(closed, Pj, Yj, E_hat)
    timing["onehot_closed_full"] = t / N
    arrays.update(onehot_closed_full=cf, onehot_lower_full=lbf)
    bar.update()

    step(steps[5])
    n_lp = min(lp_check, N)
    probs = jax.jit(jax.vmap(partial(ot_exact.topk_problem, E_hat=E_hat, k=k)))(Pj[:n_lp], Qj[:n_lp])
    probs = jax.tree.map(np.asarray, probs)
    t0 = time.perf_counter()
    lp = [ot_exact.lp_from_problem(jax.tree.map(lambda v, i=i: v[i], probs), E_hat) for i in range(n_lp)]
    timing["exact_lp"] = (time.perf_counter() - t0) / n_lp if n_lp else float("nan")
    arrays["lp"] = np.asarray(lp, np.float64)
    bar.update()
    bar.close()
    return {key: np.asarray(v) for key, v in arrays.items()}, {"seconds_per_position": timing,
                                                              "compile_seconds": compile_s}


def parse_ranks(spec: str, d: int) -> list[int]:
    """--gelbrich-ranks "16,64,full" -> [16, 64, d] (capped at d, sorted, unique)."""
    out = set()
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        if part != "full" and not part.isdigit():
            raise EvalError(f"--gelbrich-ranks: {part!r} is not a positive integer or 'full'")
        r = d if part == "full" else int(part)
        if r < 1:
            raise EvalError("--gelbrich-ranks: ranks must be >= 1")
        out.add(min(r, d))
    return sorted(out)


def compute_gelbrich(P, Q, E_hat, *, k: int, ranks: list[int], full_vocab_ranks: list[int],
                     progress: bool) -> tuple[dict, dict]:
    """LB_G per position on the top-k support (comparable to the exact EMD) for every r, in the
    fixed principal basis of Ê ("gelbrich_rR") and in each position's own support basis
    ("gelbrich_adaptive_rR", r below d), computed in float64: at large r most eigenvalues of a
    low-rank covariance are round-off, and fp32 noise under the square roots would blur the
    bound. Also the seconds per position of LB_G (fp32) on the full vocabulary."""
    N, d = P.shape[0], int(E_hat.shape[1])
    arrays, timing, compile_s = {}, {}, {}
    jobs = [(r, 0) for r in ranks] + [(r, r) for r in ranks if r < d]
    bar = tqdm(total=len(jobs) + len(full_vocab_ranks), desc="bounds: Gelbrich",
               disable=not progress, file=sys.stderr)
    with jax.enable_x64(True):
        P64, Q64, E64 = (jnp.asarray(np.asarray(x), jnp.float64) for x in (P, Q, E_hat))
        for r, adaptive in jobs:
            name = f"gelbrich_adaptive_r{r}" if adaptive else f"gelbrich_r{r}"
            fn = partial(ot_exact.batched_topk_gelbrich, k=k, adaptive_r=adaptive)
            arrays[name], compile_s[f"{name}_topk"], t = _timed(fn, P64, Q64, E64,
                                                                emd.principal_basis(E64, r))
            timing[f"{name}_topk"] = t / N
            bar.update()
    Pj, Qj = jnp.asarray(P), jnp.asarray(Q)
    for r in full_vocab_ranks:
        def full(pl, ql, E, B):
            return jax.lax.map(lambda x: emd.gelbrich_bound(x[0], x[1], E, B, kind="logits"),
                               (pl, ql), batch_size=16)
        _, compile_s[f"gelbrich_full_r{r}"], t = _timed(full, Pj, Qj, E_hat, emd.principal_basis(E_hat, r))
        timing[f"gelbrich_full_r{r}"] = t / N
        bar.update()
    bar.close()
    return {key: np.asarray(v) for key, v in arrays.items()}, {"seconds_per_position": timing,
                                                              "compile_seconds": compile_s}


def summarize_gelbrich(a: dict, timings: dict) -> dict:
    """Per LB_G variant (fixed basis r, adaptive basis r): relative gap to the exact EMD (mean,
    median), Spearman with exact, violations, how often it improves on LB, and its cost per
    position (top-k; full vocabulary and relative to LB for the fixed basis)."""
    ex, lo = a["exact"].astype(np.float64), a["lower"].astype(np.float64)
    keep = ex >= GAP_FLOOR
    t = timings["seconds_per_position"]
    out = {}
    for name in sorted((key for key in a if key.startswith("gelbrich_")),
                       key=lambda key: ("adaptive" in key, int(key.rsplit("_r", 1)[1]))):
        g = a[name].astype(np.float64)
        gap = (ex[keep] - g[keep]) / ex[keep]
        r = int(name.rsplit("_r", 1)[1])
        full_t = None if "adaptive" in name else t.get(f"gelbrich_full_r{r}")
        out[name] = {
            "basis": "adaptive (support)" if "adaptive" in name else "fixed (principal, Ê)", "r": r,
            "relative_gap": {"mean": float(np.mean(gap)), "median": float(np.median(gap))},
            "spearman_vs_exact": _spearman(g, ex),
            "violations": int(np.sum(g > ex + 1e-4)), "below_lb": int(np.sum(g < lo - 1e-4)),
            "improves_on_lb": float(np.mean(g > lo + 1e-6)), "mean": float(np.mean(g)),
            "seconds_per_position_topk": t[f"{name}_topk"],
            "seconds_per_position_full_vocab": full_t,
            "cost_vs_lb_full_vocab": (full_t / t["bounds_full"]) if full_t else None,
        }
    return out


def render_gelbrich(gs: dict, exact_mean: float) -> list[str]:
    """The markdown section of LB_G: one row per basis size r."""
    lines = ["## Means plus covariances: the Gelbrich bound LB_G", "",
             "LB <= LB_G = ½[||μ(p) - μ(q)||² + B²(ΠΣ_pΠᵀ, ΠΣ_qΠᵀ)] <= EMD, Π the top-r principal "
             "directions of Ê (semloss_jax/loss/emd.py); on the same truncated p, q as the exact EMD "
             f"(mean exact {exact_mean:.4f}).", "",
             "| r (basis) | mean rel. gap | median rel. gap | Spearman | violations (> exact) | below LB | "
             "improves on LB | s/position (top-k) | s/position (full vocab) | cost vs LB (full vocab) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for v in gs.values():
        full = v["seconds_per_position_full_vocab"]
        ratio = v["cost_vs_lb_full_vocab"]
        lines.append(f"| {v['r']} ({v['basis'].split()[0]}) | {v['relative_gap']['mean']:.3f} | "
                     f"{v['relative_gap']['median']:.3f} | "
                     f"{v['spearman_vs_exact']:.3f} | {v['violations']} | {v['below_lb']} | "
                     f"{100 * v['improves_on_lb']:.0f}% | {v['seconds_per_position_topk']:.2e} | "
                     + (f"{full:.2e} | {ratio:.1f}x |" if full else "- | - |"))
    return lines + [""]


def _spearman(x, y) -> float:
    from scipy.stats import spearmanr
    if len(x) < 3:
        return float("nan")
    return float(spearmanr(x, y).statistic)


def summarize(a: dict, timings: dict, *, k: int, cfg, n_pairs: int) -> dict:
    """The summary of bounds.json: relative gaps of LB/UB to the exact EMD, Spearman correlations,
    means, bound violations, OTT vs LP and one-hot checks, Sinkhorn convergence and timings."""
    ex, lo, up = a["exact"].astype(np.float64), a["lower"].astype(np.float64), a["upper"].astype(np.float64)
    keep = ex >= GAP_FLOOR
    gap_lo = (ex[keep] - lo[keep]) / ex[keep]
    gap_up = (up[keep] - ex[keep]) / ex[keep]
    n_lp = len(a["lp"])
    oh_err = np.abs(a["onehot_exact"].astype(np.float64) - a["onehot_closed"])

    def stat(x):
        return {"mean": float(np.mean(x)), "median": float(np.median(x))} if len(x) else \
            {"mean": float("nan"), "median": float("nan")}
    return {
        "positions": int(len(ex)), "pairs": int(n_pairs), "topk": int(k),
        "sinkhorn": {"epsilon": cfg.epsilon, "final_epsilon": cfg.final_epsilon,
                     "polish_epsilons": list(cfg.polish_epsilons), "threshold": cfg.threshold,
                     "max_iterations": cfg.max_iterations,
                     "converged_fraction": float(np.mean(a["converged"])),
                     "n_iters_median": float(np.median(a["n_iters"])),
                     "n_iters_max": int(np.max(a["n_iters"])),
                     "marginal_error_max": float(np.max(a["marginal_error"]))},
        "relative_gap": {"lower": stat(gap_lo), "upper": stat(gap_up),
                         "positions_used": int(keep.sum()), "exact_floor": GAP_FLOOR,
                         "definition": "lower: (exact - lower) / exact; upper: (upper - exact) / exact"},
        "spearman": {"lower_vs_exact": _spearman(lo, ex), "upper_vs_exact": _spearman(up, ex),
                     "lower_full_vs_exact": _spearman(a["lower_full"], ex),
                     "upper_full_vs_exact": _spearman(a["upper_full"], ex)},
        "means": {key: float(np.mean(a[key])) for key in
                  ("exact", "lower", "upper", "lower_full", "upper_full", "mass_p", "mass_q",
                   "onehot_exact", "onehot_closed", "onehot_closed_full", "onehot_lower_full")},
        "bound_violations": {"lower_gt_exact": int(np.sum(lo > ex + 1e-4)),
                             "exact_gt_upper": int(np.sum(ex > up + 1e-4)), "tolerance": 1e-4},
        "ott_vs_lp": {"positions": n_lp,
                      "max_abs_diff": float(np.max(np.abs(ex[:n_lp] - a["lp"]))) if n_lp else None,
                      "mean_abs_diff": float(np.mean(np.abs(ex[:n_lp] - a["lp"]))) if n_lp else None},
        "onehot": {"max_abs_ott_minus_closed": float(np.max(oh_err)),
                   "mean_abs_ott_minus_closed": float(np.mean(oh_err)),
                   "within_1e-3": float(np.mean(oh_err <= 1e-3)),
                   "converged_fraction": float(np.mean(a["onehot_converged"])),
                   "mean_abs_truncated_minus_full_closed": float(np.mean(np.abs(
                       a["onehot_closed"].astype(np.float64) - a["onehot_closed_full"])))},
        **timings,
    }


# ----------------------------------------------------------------------------- outputs

def _later_epsilons(sk: dict) -> str:
    later = [e for e in [sk.get("final_epsilon"), *sk.get("polish_epsilons", [])] if e]
    return ", ".join(str(e) for e in later) or "no further stage"


def render_markdown(s: dict, command: str) -> str:
    """bounds.md: the summary as markdown tables (gaps, correlations, timings) and notes."""
    t = s["seconds_per_position"]
    g = s["relative_gap"]
    lines = [
        "# Exact EMD vs bounds on real next-token distributions", "",
        f"Command: `{command}`", "",
        f"{s['positions']} response positions from {s['pairs']} harmful pairs; support = top-{s['topk']}(p) "
        f"∪ top-{s['topk']}(q), mass renormalized (mean mass kept: p {s['means']['mass_p']:.3f}, "
        f"q {s['means']['mass_q']:.3f}).", "",
        "| quantity | lower bound (LB) | upper bound (UB) |", "|---|---|---|",
        f"| mean relative gap to exact | {g['lower']['mean']:.3f} | {g['upper']['mean']:.3f} |",
        f"| median relative gap to exact | {g['lower']['median']:.3f} | {g['upper']['median']:.3f} |",
        f"| Spearman with exact (same truncated p, q) | {s['spearman']['lower_vs_exact']:.3f} | "
        f"{s['spearman']['upper_vs_exact']:.3f} |",
        f"| Spearman with exact (bound on full vocab) | {s['spearman']['lower_full_vs_exact']:.3f} | "
        f"{s['spearman']['upper_full_vs_exact']:.3f} |",
        f"| mean value (exact: {s['means']['exact']:.4f}) | {s['means']['lower']:.4f} | "
        f"{s['means']['upper']:.4f} |",
        f"| violations (LB > exact, exact > UB; tol 1e-4) | {s['bound_violations']['lower_gt_exact']} | "
        f"{s['bound_violations']['exact_gt_upper']} |", "",
        f"Relative gaps use the {g['positions_used']} positions with exact >= {g['exact_floor']}.", "",
        "| method | seconds per position |", "|---|---|",
        f"| exact EMD, OTT Sinkhorn (top-k support) | {t['exact_ott']:.2e} |",
        f"| exact EMD, LP HiGHS (top-k support) | {t['exact_lp']:.2e} |",
        f"| LB + UB on the top-k support | {t['bounds_topk']:.2e} |",
        f"| LB + UB on the full vocabulary | {t['bounds_full']:.2e} |",
        f"| one-hot EMD, OTT (top-k(p) ∪ {{y}}) | {t['onehot_ott']:.2e} |",
        f"| one-hot EMD + LB, closed form (full vocabulary) | {t['onehot_closed_full']:.2e} |", "",
        "Compile time is excluded (each method is compiled ahead of time, then timed once).", "",
        f"Sinkhorn: epsilon {s['sinkhorn']['epsilon']}, then {_later_epsilons(s['sinkhorn'])} "
        f"(warm-started), threshold {s['sinkhorn']['threshold']}, "
        f"converged {100 * s['sinkhorn']['converged_fraction']:.1f}% of positions "
        f"(median {s['sinkhorn']['n_iters_median']:.0f} iterations, max {s['sinkhorn']['n_iters_max']}); "
        f"OTT vs LP on {s['ott_vs_lp']['positions']} positions: max |diff| "
        f"{s['ott_vs_lp']['max_abs_diff']:.2e}, mean {s['ott_vs_lp']['mean_abs_diff']:.2e}.", "",
        f"One-hot target (q = δ_y): OTT vs closed form on the same truncated p: max |diff| "
        f"{s['onehot']['max_abs_ott_minus_closed']:.2e} "
        f"({100 * s['onehot']['within_1e-3']:.1f}% within 1e-3); "
        f"mean one-hot EMD {s['means']['onehot_closed_full']:.4f} on the full vocabulary "
        f"(truncation changes it by {s['onehot']['mean_abs_truncated_minus_full_closed']:.2e} "
        f"on average).", "",
    ]
    return "\n".join(lines)


def plot(a: dict, path: Path) -> None:
    """bounds.png: LB and UB against the exact EMD (soft targets), and OTT against the closed form
    (one-hot targets)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4.8))
    ex = a["exact"]
    hi = float(max(ex.max(), a["upper"].max(), 1e-3)) * 1.05
    ax[0].scatter(ex, a["upper"], s=8, alpha=0.6, label="UB = 1 - μ(p)·μ(q)", color="tab:red")
    ax[0].scatter(ex, a["lower"], s=8, alpha=0.6, label="LB = ½||μ(p) - μ(q)||²", color="tab:blue")
    gel = sorted((int(key[len("gelbrich_r"):]), key) for key in a if key.startswith("gelbrich_r"))
    if gel:
        r, key = gel[-1]
        ax[0].scatter(ex, a[key], s=8, alpha=0.6, label=f"LB_G (Gelbrich, r = {r})", color="tab:purple")
    ax[0].plot([0, hi], [0, hi], "k--", lw=1, label="y = exact")
    ax[0].set_xlabel("exact EMD (OTT, top-k union support)")
    ax[0].set_ylabel("bound (same truncated p, q)")
    ax[0].set_title("soft targets: p (default system) vs q (safety system)")
    ax[0].legend(fontsize=8)
    oh = a["onehot_closed"]
    lo2, hi2 = float(oh.min()), float(oh.max())
    ax[1].scatter(oh, a["onehot_exact"], s=8, alpha=0.6, color="tab:green")
    ax[1].plot([lo2, hi2], [lo2, hi2], "k--", lw=1)
    ax[1].set_xlabel("closed form 1 - μ(p)·ê_y (truncated p)")
    ax[1].set_ylabel("OTT EMD")
    ax[1].set_title("one-hot targets q = δ_y")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _jsonable(x):
    if isinstance(x, float) and not np.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def command_of(args) -> str:
    """The command line that reproduces this run (options that differ from their defaults)."""
    ref = argparse.ArgumentParser()
    add_args(ref)
    defaults = vars(ref.parse_args(["--out", str(args.out)]))
    parts = ["python", "eval.py", "bounds", "--out", str(args.out), "--positions", str(args.positions),
             "--topk", str(args.topk)]
    for key, val in vars(args).items():
        if key in ("out", "positions", "topk") or key.startswith("_") or key not in defaults:
            continue
        if val != defaults[key]:
            flag = "--" + key.replace("_", "-")
            parts += [flag] if val is True else [flag, str(val)]
    return " ".join(shlex.quote(p) for p in parts)


def run(args) -> int:
    """Run `eval.py bounds`: collect p and q on harmful pairs, compute every quantity, write
    bounds.json, bounds.md and bounds.png; return 0."""
    if args.positions < 1 or args.topk < 1 or args.max_response_tokens < 1:
        raise EvalError("--positions, --topk and --max-response-tokens must be >= 1")
    progress = not args.no_progress
    out = Path(args.out)
    command = command_of(args)

    t0 = time.perf_counter()
    q = loading.load_model(args.model)
    q_cfg, q_params, tok, q_path = q.cfg, q.params, q.tok, q.path
    if args.model_p is not None:
        p_cfg, p_params, p_path = loading.load_weights(args.model_p)
        if p_cfg.vocab_size != q_cfg.vocab_size:
            raise EvalError(f"--model-p vocab {p_cfg.vocab_size} != --model vocab {q_cfg.vocab_size}")
    else:
        p_cfg, p_params, p_path = q_cfg, q_params, q_path
    E_hat = unit_embeddings(jnp.asarray(embedding_matrix(q_params)))
    if args.topk > q_cfg.vocab_size:
        raise EvalError(f"--topk {args.topk} exceeds the vocabulary ({q_cfg.vocab_size})")
    pairs = load_pairs(args.seed)
    t_load = time.perf_counter() - t0

    t0 = time.perf_counter()
    P, Q, Y, rows = collect((p_params, p_cfg), (q_params, q_cfg), tok, pairs, args.positions,
                            args.max_response_tokens, args.system_q, progress)
    t_fwd = time.perf_counter() - t0
    n_pairs = len({r["pair"] for r in rows})

    cfg = SinkhornConfig() if args.epsilon is None else SinkhornConfig(epsilon=args.epsilon)
    arrays, timings = compute(P, Q, Y, E_hat, k=args.topk, cfg=cfg, lp_check=args.lp_check, progress=progress)
    ranks = parse_ranks(args.gelbrich_ranks, int(E_hat.shape[1]))
    g_arrays, g_timings = compute_gelbrich(P, Q, E_hat, k=args.topk, ranks=ranks,
                                           full_vocab_ranks=[r for r in ranks if r <= 64],
                                           progress=progress)
    arrays.update(g_arrays)
    for key in ("seconds_per_position", "compile_seconds"):
        timings[key].update(g_timings[key])
    summary = summarize(arrays, timings, k=args.topk, cfg=cfg, n_pairs=n_pairs)
    summary["gelbrich"] = summarize_gelbrich(arrays, timings)
    summary["model_forward_seconds_per_position"] = t_fwd / len(Y)
    summary["load_seconds"] = t_load

    report = {
        "command": command,
        "model_q": str(q_path), "model_p": str(p_path), "system_p": None, "system_q": args.system_q,
        "summary": summary,
        "positions": rows,
        "y": Y.tolist(),
        **{key: np.asarray(v, np.float64).round(7).tolist() if v.dtype.kind == "f" else v.tolist()
           for key, v in arrays.items()},
    }
    atomic_write_text(out / "bounds.json", json.dumps(_jsonable(report), indent=1) + "\n")
    atomic_write_text(out / "bounds.md", render_markdown(summary, command) + "\n" + "\n".join(
        render_gelbrich(summary["gelbrich"], summary["means"]["exact"])))
    plot(arrays, out / "bounds.png")
    print(json.dumps(_jsonable({"out": str(out), **{k: summary[k] for k in
                                                     ("positions", "relative_gap", "spearman",
                                                      "gelbrich", "seconds_per_position")}})))
    return 0
