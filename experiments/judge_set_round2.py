#!/usr/bin/env python
"""Round 2 (and later rounds) of the labelled own outputs: replies of the study's models, which
judge v2 was not fitted on. Rounds 2 and 3: MODELS (SFT and TA-SFT LB), 30 prompts each; round
4: the study's NLL ascent models (`--models nll_ascent_l0.03 nll_ascent_l0.1 nll_ascent_l0.3
--per-model 60`), a method the judge's study-model rows never had.

    python experiments/judge_set_round2.py --study-models runs/study/models [--round 2] \
        [--models sft tasft_lb_l0.25 ...] [--per-model 30] \
        [--out runs/judge_set_round2] [--pool semloss_jax/eval/judge_data/round2/own_outputs_pool.jsonl]

Round N (default 2) uses plan seed N and excludes the prompts of every earlier round's pool, so
each round is a fresh set of prompts (round 3: an independent check of a judge refitted with
round 2).

The study (docs/STUDY.md) judges its models with judge v2, fitted on the seven models of round 1
(experiments/judge_set.py). These rows check it on the models the study reports: each model of
--models answers --per-model harmful prompts of the harmful_prompts TRAIN split (two thirds
greedy, the rest sampled at T 0.7 / top-p 0.9, 96 new tokens, seed 0, as round 1), every prompt to one
model, no prompt of round 1's pool, of either D_harmful (round 1's and the study's), of the
SafeInstr refusals or of a validation or test split. The rows are labelled blind with
`python -m semloss_jax.eval.label` like round 1 (batches of 60 and a 15% relabel batch).

Parts (each skipped when its output exists): plan (OUT/plan.json), generate
(OUT/gen/<model>.jsonl), pool (--pool, with pool_stats.json beside it), batches.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "experiments"))

import judge_set as r1  # noqa: E402

from semloss_jax.data.registry import load_set  # noqa: E402
from semloss_jax.data.splits import hash_split, normalize  # noqa: E402
from semloss_jax.paths import atomic_write_text  # noqa: E402

MODELS = ("sft", "tasft_lb_l0.25", "tasft_lb_l0.5", "tasft_lb_l1", "tasft_lb_l2", "tasft_lb_l4")
PER_MODEL = 30  # two thirds greedy, the rest sampled
POOL1 = REPO / "semloss_jax" / "eval" / "judge_data" / "own_outputs_pool.jsonl"


def greedy_count(per_model: int) -> int:
    """Greedy replies per model: two thirds (20 of 30, as round 1's mix)."""
    return round(per_model * 2 / 3)


def round_pool(n: int) -> Path:
    """The pool file of round n (round 1: judge_data/own_outputs_pool.jsonl)."""
    return POOL1 if n == 1 else POOL1.parent / f"round{n}" / "own_outputs_pool.jsonl"


def excluded(d_harmful_files: list[Path], rnd: int) -> set[str]:
    """Normalized prompts of every earlier round's pool, of the D_harmful files and of the
    refusal set."""
    out = set()
    for k in range(1, rnd):
        out |= {normalize(json.loads(line)["prompt"]) for line in
                round_pool(k).read_text(encoding="utf-8").splitlines() if line.strip()}
    for f in d_harmful_files:  # round 1's exclusion: a D_harmful file's and the refusals' prompts
        out |= r1.excluded_prompts(f)
    return out


def plan(exclude: set[str], seed: int, models: tuple[str, ...] = MODELS,
         per_model: int = PER_MODEL) -> dict[str, list[dict]]:
    """Each model's prompts: a seeded shuffle of the unused TRAIN prompts dealt out in chunks."""
    recs = sorted(load_set("harmful_prompts", "train"), key=lambda r: r.id)
    recs = [r for r in recs if normalize(r.prompt) not in exclude]
    assert all(hash_split(r.prompt) == "train" for r in recs)
    if per_model * len(models) > len(recs):
        sys.exit(f"{len(recs)} unused TRAIN prompts, {per_model * len(models)} needed")
    order = np.random.default_rng([seed, 0]).permutation(len(recs))
    greedy = greedy_count(per_model)
    out = {}
    for mi, m in enumerate(models):
        chunk = order[mi * per_model:(mi + 1) * per_model]
        out[m] = [{"part": "harmful_train", "kind": "harmful", "split": r.split,
                   "prompt_source": r.source, "prompt_id": r.id, "prompt": r.prompt,
                   "category": r.category, "mode": "greedy" if j < greedy else "sample"}
                  for j, r in enumerate(recs[int(i)] for i in chunk)]
    return out


def main() -> int:
    """plan, generate, pool, batches (each skipped when done)."""
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--study-models", required=True, help="the study's model run dirs")
    ap.add_argument("--study-d-harmful", default=None,
                    help="the study's D_harmful (default: STUDY_MODELS/../data/d_harmful.jsonl)")
    ap.add_argument("--round1-d-harmful", default="runs/judge_set/d_harmful.jsonl")
    ap.add_argument("--round", type=int, default=2, help="round number (>= 2): plan seed, exclusions")
    ap.add_argument("--models", nargs="+", default=list(MODELS),
                    help="run dir names under --study-models (default: SFT and TA-SFT LB)")
    ap.add_argument("--per-model", type=int, default=PER_MODEL)
    ap.add_argument("--out", default=None, help="default: runs/judge_set_round<N>")
    ap.add_argument("--pool", default=None, help="default: judge_data/round<N>/own_outputs_pool.jsonl")
    args = ap.parse_args()
    if args.round < 2:
        sys.exit("--round must be >= 2 (round 1 is experiments/judge_set.py)")
    args.out = args.out or f"runs/judge_set_round{args.round}"
    args.pool = args.pool or str(round_pool(args.round))
    models_dir = Path(args.study_models).resolve()
    out, pool = (REPO / args.out).resolve(), Path(args.pool).resolve()
    d_files = [Path(args.study_d_harmful or models_dir.parent / "data" / "d_harmful.jsonl"),
               REPO / args.round1_d_harmful]
    for f in d_files:
        if not f.exists():
            sys.exit(f"{f}: missing (a D_harmful file whose prompts must be excluded)")
    plan_path = out / "plan.json"
    if not plan_path.exists():
        atomic_write_text(plan_path, json.dumps(
            plan(excluded(d_files, args.round), args.round, tuple(args.models), args.per_model),
            indent=1, ensure_ascii=False))
    p = json.loads(plan_path.read_text())
    models = list(p)
    if models != list(args.models):
        sys.exit(f"{plan_path} plans {models}, not --models {args.models}: another --out")
    for name in models:
        gen_path = out / "gen" / f"{name}.jsonl"
        if not gen_path.exists():
            run_dir = models_dir / name
            if not (run_dir / "hf" / "config.json").exists():
                sys.exit(f"{run_dir}: no trained model (hf/config.json)")
            r1.write_rows(gen_path, r1.generate_model(f"study_{name}", run_dir, p[name],
                                                      out / "gen_cache", r1.SEED))
    rows, dropped = r1.build_pool([out / "gen" / f"{n}.jsonl" for n in models])
    if not pool.exists():
        r1.write_rows(pool, rows)
        stats = {"rows": len(rows), "exact_duplicates_dropped": dropped,
                 "models": {f"study_{m}": {"run_dir": str(models_dir / m),
                                           "config": "configs/study.yaml (docs/study/models/)",
                                           "model_hash": next(r["model_hash"] for r in rows
                                                              if r["model"] == f"study_{m}")}
                            for m in models},
                 "round": args.round, "per_model": args.per_model,
                 "greedy": greedy_count(args.per_model),
                 "plan_seed": args.round,
                 "decoding_seed": r1.SEED, "max_new_tokens": r1.MAX_NEW_TOKENS,
                 "sampling": r1.SAMPLING}
        atomic_write_text(pool.with_name("pool_stats.json"), json.dumps(stats, indent=1) + "\n")
    batches = pool.parent / "batches"
    if not (batches / "manifest.json").exists():
        subprocess.run([sys.executable, "-m", "semloss_jax.eval.label", "batches", "--pool",
                        str(pool), "--out", str(batches), "--size", "60", "--seed", str(args.round)],
                       cwd=REPO, check=True)
    print(f"[round{args.round}] pool {pool} ({len(rows)} rows, {dropped} duplicates dropped); "
          f"batches {batches}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
