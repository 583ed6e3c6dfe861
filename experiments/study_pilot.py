#!/usr/bin/env python
"""The pilot behind configs/study.yaml, on the VALIDATION split only (docs/STUDY.md).

    python experiments/study_pilot.py lengths            # token lengths of D_harmful and benign data
    python experiments/study_pilot.py steptime           # seconds per step of candidate budgets
    python experiments/study_pilot.py train NAME [--train-steps N]  # one pilot run (PILOT_RUNS)
    python experiments/study_pilot.py curves [--runs DIR ...]  # training curves of the pilot runs (PNG)

Reads the harvested D_harmful of experiments/study.py (runs/study/data/d_harmful.jsonl) and
writes under runs/study_pilot/ (run dirs) and docs/study/pilot/ (the figures it reports).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from semloss_jax.data import registry  # noqa: E402
from semloss_jax.data.readers import read_jsonl  # noqa: E402
from semloss_jax.models.tokenizer import load_tokenizer  # noqa: E402
from semloss_jax.paths import atomic_write_text, default_model_path, read_jsonl_objects  # noqa: E402

BUDGET = REPO / "configs" / "study.yaml"
OUT = REPO / "runs" / "study_pilot"
RESULTS = REPO / "docs" / "study" / "pilot"
D_HARMFUL = REPO / "runs" / "study" / "data" / "d_harmful.jsonl"
PY = sys.executable

# candidate trainable sets for the step-time comparison (same rows and seq_len)
CANDIDATES = {
    "last_k8": ["optim.trainable=last_k", "optim.last_k=8", "optim.lr=1e-4"],
    "lora_all_r16_accum2": ["optim.trainable=lora", "optim.lora_rank=16", "optim.grad_accum=2",
                            "data.benign_batch=2", "data.harmful_batch=2"],
}
# the pilot's training runs on the candidate budget (harmful rows are logged for SFT too)
PILOT_RUNS = {
    "sft": ["objective.kind=sft", "objective.lam=0"],
    "tasft_lb_l1": ["objective.kind=tasft", "objective.lam=1"],
    "tasft_lb_l4": ["objective.kind=tasft", "objective.lam=4"],
    # the LoRA candidate (all 30 layers, q/v, rank 16; the project's LoRA learning rate)
    "lora_tasft_lb_l4": ["objective.kind=tasft", "objective.lam=4", *CANDIDATES["lora_all_r16_accum2"],
                         "optim.lr=5e-4"],
}
CURVES = ("ce", "emd_lower", "emd_onehot", "harm_nll")


def pct(xs, qs=(50, 90, 95, 99, 100)) -> dict:
    """Percentiles of xs as {"p50": ..., ...}."""
    return {f"p{q}": float(np.percentile(xs, q)) for q in qs}


def lengths(args) -> dict:
    """Prompt and response token lengths (chat template) of D_harmful and of the benign train set."""
    tok = load_tokenizer(default_model_path())
    harmful, _ = read_jsonl(D_HARMFUL)
    benign = registry.load_set("benign", "train")
    out = {}
    for name, recs in (("d_harmful", harmful), ("benign_train", benign)):
        p = [len(tok.prompt_ids(r.prompt)) for r in recs]
        r = [len(tok.response_ids(r.response)) for r in recs]
        out[name] = {"n": len(recs), "prompt_tokens": pct(p), "response_tokens": pct(r),
                     "slots": pct([a + b - 1 for a, b in zip(p, r)])}
    cap = 256  # the harvest's max_new_tokens: a reply this long was cut by the limit
    out["d_harmful"]["replies_at_the_harvest_limit"] = sum(
        1 for r in harmful if len(tok.response_ids(r.response)) >= cap)
    return out


def train(name: str, overrides: list[str], steps: int | None = None) -> Path:
    """train.py on the budget + overrides into OUT/name (resumes its own checkpoints)."""
    run = OUT / name
    cmd = [PY, "train.py", "--config", str(BUDGET), "--quiet", f"run.output_dir={run}", "run.resume=true",
           f"data.harmful={D_HARMFUL}", *overrides] + ([f"run.steps={steps}", "run.export_hf=false",
                                                         "run.checkpoint_every=0"] if steps else [])
    run.parent.mkdir(parents=True, exist_ok=True)
    print("$ " + " ".join(cmd), flush=True)
    with open(OUT / f"{name}.log", "w") as f:
        rc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc:
        sys.exit(f"train {name} failed; see {OUT / f'{name}.log'}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(run / "metrics.jsonl", RESULTS / f"metrics_{name}.jsonl")  # the curve, committed
    return run


def steptime(args) -> dict:
    """Median seconds per step (after the first) of each candidate, args.steps steps, TA-SFT LB."""
    out = {}
    for name, ov in CANDIDATES.items():
        if args.only and name not in args.only:
            continue
        shutil.rmtree(OUT / f"steptime_{name}", ignore_errors=True)  # a fresh run: no resume
        load0 = [round(x, 2) for x in os.getloadavg()]
        # timing only: PyRIT's harmful replies stand in for D_harmful (same shapes)
        run = train(f"steptime_{name}", [*ov, "objective.kind=tasft", "data.harmful=pyrit"], steps=args.steps)
        rows = read_jsonl_objects(run / "metrics.jsonl")
        t = [r["step_time_s"] for r in rows[1:]]
        out[name] = {"median_step_s": statistics.median(t), "steps": len(t),
                     "first_step_s": rows[0]["step_time_s"], "loadavg_start": load0,
                     "loadavg_end": [round(x, 2) for x in os.getloadavg()]}
        print(name, out[name], flush=True)
    return out


def curves(args) -> dict:
    """Plot benign CE, LB / one-hot EMD to the harmful tokens and harmful NLL of the pilot runs;
    returns their first / last-20-step means."""
    import matplotlib  # lazy: plotting only (~0.5 s import)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    summary = {}
    for folder in [Path(r) for r in args.runs] if args.runs else [OUT]:
        for name in PILOT_RUNS:
            path = folder / name / "metrics.jsonl"
            if not path.exists():
                continue
            label = f"{folder.name}/{name}"
            rows = read_jsonl_objects(path)
            steps = [r["step"] for r in rows]
            for ax, key in zip(axes, CURVES):
                v = np.array([r[key] for r in rows])
                if not v.any():  # not logged by this run (SFT has no harmful batch)
                    continue
                k = min(5, len(v))
                ax.plot(steps[k - 1:], np.convolve(v, np.ones(k) / k, mode="valid"), label=label)
                ax.set_title(f"{key} (5-step mean)")
            summary[label] = {k: {"first5": float(np.mean([r[k] for r in rows[:5]])),
                                  "last5": float(np.mean([r[k] for r in rows[-5:]]))} for k in CURVES}
            summary[label]["steps"] = len(rows)
            summary[label]["step_time_s_median"] = float(np.median([r["step_time_s"] for r in rows[1:]]))
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig.savefig(RESULTS / "curves.png", dpi=100)
    return summary


def main() -> int:
    """Run one pilot subcommand and write its figures to docs/study/pilot/NAME.json."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cmd", choices=("lengths", "steptime", "train", "curves"))
    ap.add_argument("name", nargs="?", help="train: one of " + ", ".join(PILOT_RUNS))
    ap.add_argument("--steps", type=int, default=6, help="steptime: steps per candidate")
    ap.add_argument("--only", nargs="*", default=None, help="steptime: these candidates")
    ap.add_argument("--runs", nargs="*", default=None, help=f"curves: folders of run dirs (default {OUT})")
    ap.add_argument("--train-steps", type=int, default=None,
                    help="train: stop after this many steps (no checkpoints, no HF export)")
    args = ap.parse_args()
    t = time.perf_counter()
    if args.cmd == "train":
        train(args.name, PILOT_RUNS[args.name], steps=args.train_steps)
        return 0
    res = {"lengths": lengths, "steptime": steptime, "curves": curves}[args.cmd](args)
    res = {"command": "python experiments/study_pilot.py " + " ".join(sys.argv[1:]),
           "date": time.strftime("%Y-%m-%d %H:%M"), "wall_s": round(time.perf_counter() - t, 1),
           "result": res}
    atomic_write_text(RESULTS / f"{args.cmd}.json", json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
