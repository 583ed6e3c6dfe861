#!/usr/bin/env python
"""This project's own model outputs, to be labelled blind for the judge (docs/EVAL.md).

    python experiments/judge_set.py [--out runs/judge_set]
        [--pool semloss_jax/eval/judge_data/own_outputs_pool.jsonl]

Parts (each skipped when its output exists, so the command resumes after a stop; the wall time
of every part is printed and saved in OUT/summary.json):
1. harvest: D_harmful = the base model's own replies to 128 harmful TRAIN prompts, unfiltered
   (python -m semloss_jax.data.harvest --judge none), OUT/d_harmful.jsonl.
2. train: six variants with configs/paper_small.yaml plus the overrides in MODELS (train.py),
   OUT/<model>/.
3. plan: which prompts each model answers (OUT/plan.json). Every prompt goes to exactly ONE model
   (a seeded shuffle dealt out in chunks), see PARTS; harmful TRAIN prompts exclude D_harmful's
   prompts and the SafeInstr refusal prompts, and no prompt of a "val" split is used.
4. generate: each model answers its prompts (greedy, and temperature sampling for a fixed share),
   OUT/gen/<model>.jsonl.
5. pool: every row with its provenance, exact (prompt, response) duplicates dropped, written to
   --pool; counts, training settings and wall times to pool_stats.json beside it.
6. batches: python -m semloss_jax.eval.label batches --pool POOL --out <pool dir>/batches
   --size 120 --seed 0 (blind labelling batches + the 15% relabel batch).

SafeInstr reads the Safety-Tuned LLaMAs files from the shared folder (../shared from the
repository root, or SEMLOSS_SHARED=/path/to/shared).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout: import this checkout's package

from semloss_jax.data.readers import read_jsonl  # noqa: E402
from semloss_jax.data.registry import load_set  # noqa: E402
from semloss_jax.data.splits import hash_split, normalize  # noqa: E402
from semloss_jax.eval.evaluate import (  # noqa: E402
    DecodeSettings,
    cached_generate,
    generations_cache_path,
    model_fingerprint,
)
from semloss_jax.models import loading  # noqa: E402
from semloss_jax.models.generation import generate  # noqa: E402
from semloss_jax.paths import atomic_write_text  # noqa: E402

CONFIG = REPO / "configs" / "paper_small.yaml"
DEFAULT_POOL = REPO / "semloss_jax" / "eval" / "judge_data" / "own_outputs_pool.jsonl"
HARVEST_N = 128
SEED = 0
MAX_NEW_TOKENS = 96
SAMPLING = {"temperature": 0.7, "top_p": 0.9}
GEN_BATCH = 16

# name -> train.py overrides on top of configs/paper_small.yaml (30 steps, lr 2e-4, last 4 of 30
# layers, 4 benign + 4 harmful rows of 128 slots per step); None = the untrained base model.
HARM = ["data.harmful_n=100"]
MODELS: dict[str, list[str] | None] = {
    "base": None,
    "sft": ["objective.kind=sft", "objective.lam=0"],
    "safeinstr_1000": ["objective.kind=safeinstr", "objective.lam=0", "data.safeinstr_n=1000",
                       "data.harmful_batch=0"],  # the refusals mixed into the benign data, as it ran
    "nll_ascent_lam1": ["objective.kind=nll_ascent", "objective.lam=1", *HARM],
    "unlikelihood_lam1": ["objective.kind=unlikelihood", "objective.lam=1", *HARM],
    "tasft_lb_lam1": ["objective.kind=tasft", "objective.divergence=lower_bound", "objective.lam=1", *HARM],
    "tasft_lb_lam5": ["objective.kind=tasft", "objective.divergence=lower_bound", "objective.lam=5", *HARM],
}


@dataclass(frozen=True)
class Part:
    """Prompts of one kind: the named set and split they come from, and how many each model
    answers greedily and with sampling."""

    name: str
    kind: str       # harmful | benign | overrefusal
    set_name: str
    split: str
    greedy: int
    sampled: int


PARTS = (
    Part("harmful_train", "harmful", "harmful_prompts", "train", 56, 24),
    Part("harmful_test", "harmful", "harmful_prompts", "test", 14, 6),  # only ever to TEST the judge
    Part("benign", "benign", "benign", "train", 8, 4),
    Part("overrefusal", "overrefusal", "overrefusal", "eval", 8, 4),
)


def sh(cmd: list[str], log: Path) -> None:
    """Run a command with its output in a log file; stop on failure."""
    print("$ " + " ".join(cmd), flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}); see {log}")


def timed(summary: dict, summary_path: Path, key: str, fn) -> None:
    """Run fn(), print and save its wall time under summary['seconds'][key]."""
    t = time.perf_counter()
    fn()
    dt = time.perf_counter() - t
    summary.setdefault("seconds", {})[key] = round(dt, 1)
    atomic_write_text(summary_path, json.dumps(summary, indent=2) + "\n")
    print(f"[judge_set] {key}: {dt:.0f} s", flush=True)


def excluded_prompts(d_harmful: Path) -> set[str]:
    """Normalized prompts some variant trained on as harmful or refusal data."""
    recs, _ = read_jsonl(d_harmful)
    out = {normalize(r.prompt) for r in recs}
    out |= {normalize(r.prompt) for r in load_set("refusals", "train")}
    return out


def plan_prompts(models: list[str], exclude: set[str], seed: int) -> dict[str, list[dict]]:
    """Each model's prompts: per part a seeded shuffle dealt out in disjoint chunks (model order),
    the first `greedy` of a chunk decoded greedily, the rest sampled."""
    plan: dict[str, list[dict]] = {m: [] for m in models}
    for pi, part in enumerate(PARTS):
        recs = sorted(load_set(part.set_name, part.split), key=lambda r: r.id)
        recs = [r for r in recs if normalize(r.prompt) not in exclude]
        if part.split != "eval":  # the registry keeps val out of train/test; check it anyway
            assert all(hash_split(r.prompt) == part.split for r in recs), part
        per = part.greedy + part.sampled
        if per * len(models) > len(recs):
            sys.exit(f"part {part.name}: {len(recs)} prompts, {per * len(models)} needed")
        order = np.random.default_rng([seed, pi]).permutation(len(recs))
        for mi, m in enumerate(models):
            for j, idx in enumerate(order[mi * per:(mi + 1) * per]):
                r = recs[int(idx)]
                plan[m].append({"part": part.name, "kind": part.kind, "split": r.split,
                                "prompt_source": r.source, "prompt_id": r.id, "prompt": r.prompt,
                                "category": r.category,
                                "mode": "greedy" if j < part.greedy else "sample"})
    return plan


def decoding_of(mode: str, seed: int) -> dict:
    """The decoding settings recorded with every row (and used to generate it)."""
    d = {"mode": mode, "temperature": 0.0, "top_p": 1.0, "seed": seed,
         "max_new_tokens": MAX_NEW_TOKENS, "system": None, "batch_size": GEN_BATCH}
    if mode == "sample":
        d.update(SAMPLING)
    return d


def generate_model(name: str, run_dir: Path | None, items: list[dict], cache_root: Path,
                   seed: int) -> list[dict]:
    """Load one model, answer its planned prompts (cached per chunk), return provenance rows."""
    m = loading.load_model(None if run_dir is None else run_dir)
    mhash = model_fingerprint(m.params, m.cfg, m.tok)
    rows = []
    for mode in ("greedy", "sample"):
        its = [it for it in items if it["mode"] == mode]
        dec = decoding_of(mode, seed)
        st = DecodeSettings(max_new_tokens=MAX_NEW_TOKENS, temperature=dec["temperature"],
                            top_p=dec["top_p"], seed=seed)

        def gen_fn(prompts, **kw):
            return generate(m.params, m.cfg, m.tok, prompts, **kw)

        responses, _ = cached_generate(gen_fn, [it["prompt"] for it in its],
                                       generations_cache_path(cache_root, mhash, f"judge_{mode}", st),
                                       settings=st, batch_size=GEN_BATCH, desc=f"{name} {mode}")
        for it, resp in zip(its, responses):
            rows.append({**{k: v for k, v in it.items() if k != "mode"}, "response": resp,
                         "model": name, "model_hash": mhash, "decoding": dec})
    return rows


def write_rows(path: Path, rows: list[dict]) -> None:
    """JSONL, written atomically."""
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def uid_of(row: dict) -> str:
    """An opaque id: a hash of the model hash, decoding, prompt and response (reveals nothing)."""
    key = json.dumps([row["model_hash"], row["decoding"], row["prompt"], row["response"]],
                     sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:12]


def build_pool(gen_files: list[Path]) -> tuple[list[dict], int]:
    """All generated rows with a uid, exact (prompt, response) duplicates dropped (first kept),
    sorted by uid. Returns (rows, number dropped)."""
    seen: set[tuple[str, str]] = set()
    rows, dropped = [], 0
    for f in gen_files:
        for line in f.read_text(encoding="utf-8").splitlines():
            r = json.loads(line)
            if (r["prompt"], r["response"]) in seen:
                dropped += 1
                continue
            seen.add((r["prompt"], r["response"]))
            rows.append({"uid": uid_of(r), **r})
    uids = Counter(r["uid"] for r in rows)
    assert max(uids.values()) == 1, "uid collision"
    return sorted(rows, key=lambda r: r["uid"]), dropped


def pool_stats(rows: list[dict], dropped: int, summary: dict) -> dict:
    """Counts per model / kind / split / decoding, the models' settings and the wall times."""
    def count(*keys):
        c = Counter("/".join(str(r[k] if k != "decoding" else r[k]["mode"]) for k in keys) for r in rows)
        return dict(sorted(c.items()))

    return {"rows": len(rows), "exact_duplicates_dropped": dropped,
            "per_model": count("model"), "per_kind": count("kind"), "per_split": count("split"),
            "per_model_kind_split": count("model", "kind", "split"),
            "per_decoding": count("decoding"),
            "models": {m: {"train_overrides": MODELS[m], "config": "configs/paper_small.yaml"
                           if MODELS[m] else None,
                           "model_hash": next(r["model_hash"] for r in rows if r["model"] == m)}
                       for m in MODELS if any(r["model"] == m for r in rows)},
            "parts": [p.__dict__ for p in PARTS], "max_new_tokens": MAX_NEW_TOKENS,
            "sampling": SAMPLING, "harvest_n": HARVEST_N, "seed": SEED,
            "wall_seconds": summary.get("seconds", {})}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/judge_set")
    ap.add_argument("--pool", default=str(DEFAULT_POOL))
    args = ap.parse_args()
    out, pool = (REPO / args.out).resolve(), Path(args.pool).resolve()
    py = sys.executable
    summary_path = out / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    d_harmful = out / "d_harmful.jsonl"
    if not d_harmful.exists():
        timed(summary, summary_path, "harvest", lambda: sh(
            [py, "-m", "semloss_jax.data.harvest", "--n", str(HARVEST_N), "--out", str(d_harmful),
             "--judge", "none", "--max-new-tokens", "64", "--batch-size", "16", "--seed", str(SEED),
             "--no-progress"], out / "logs" / "harvest.log"))
    for name, overrides in MODELS.items():
        run_dir = out / name
        if overrides is not None and not (run_dir / "hf" / "config.json").exists():
            timed(summary, summary_path, f"train_{name}", lambda n=name, o=overrides, d=run_dir: sh(
                [py, "train.py", "--config", str(CONFIG), "--quiet", f"run.output_dir={d}",
                 f"data.harmful={d_harmful}", f"run.seed={SEED}", *o], out / "logs" / f"train_{n}.log"))
    plan_path = out / "plan.json"
    if not plan_path.exists():
        timed(summary, summary_path, "plan", lambda: atomic_write_text(plan_path, json.dumps(
            plan_prompts(list(MODELS), excluded_prompts(d_harmful), SEED), indent=1, ensure_ascii=False)))
    plan = json.loads(plan_path.read_text())
    for name, overrides in MODELS.items():
        gen_path = out / "gen" / f"{name}.jsonl"
        if not gen_path.exists():
            run_dir = None if overrides is None else out / name
            timed(summary, summary_path, f"generate_{name}", lambda n=name, d=run_dir, p=gen_path: write_rows(
                p, generate_model(n, d, plan[n], out / "gen_cache", SEED)))
    rows, dropped = build_pool([out / "gen" / f"{n}.jsonl" for n in MODELS])
    if not pool.exists():
        write_rows(pool, rows)
        atomic_write_text(pool.with_name("pool_stats.json"),
                          json.dumps(pool_stats(rows, dropped, summary), indent=1) + "\n")
    print(f"[judge_set] pool: {pool} ({len(rows)} rows, {dropped} exact duplicates dropped)")
    batches = pool.parent / "batches"
    if not (batches / "manifest.json").exists():
        timed(summary, summary_path, "batches", lambda: sh(
            [py, "-m", "semloss_jax.eval.label", "batches", "--pool", str(pool), "--out", str(batches),
             "--size", "120", "--seed", str(SEED)], out / "logs" / "batches.log"))
    print(f"[judge_set] batches: {batches}; wall times: {summary.get('seconds')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
