#!/usr/bin/env python
"""The safety-vs-ability study: every method at one frozen budget, settings chosen on validation.

    nice -n 10 python experiments/study.py [--out runs/study] [--only GLOB ...] [--max-parts N]
    python experiments/study.py --list            # every part, its state and the time left; runs nothing

One resumable command. The work is cut into parts that each fit a 2-core CPU in under 2 hours;
a part whose output exists is skipped, so rerunning the command continues where it stopped
(an interrupted training resumes from its last checkpoint). Parts, in order:

    data/harvest          D_harmful: the base model's own greedy replies to 360 TRAIN harmful
                          prompts (256 new tokens; refusals and empty replies dropped, no harm
                          filter: the TF-IDF judge is at chance on this model's replies); the
                          file of 2026-11-28 is committed (docs/study/data/), rebuilt by
                          experiments/study_harvest_rebuild.py with that day's refusal detector
    data/harvest_sampled  4 sampled replies (T = 0.8) to each of 100 of those prompts (our addition)
    data/safe             a safe reply to every harvested prompt, for DPO (templated refusals)
    train/NAME            train.py --config configs/study.yaml + the model's overrides
    val/NAME              eval.py run on harmful_val and benign_val (greedy replies, benign
                          reference CE); generations are cached by model hash
    judge/NAME            eval.py judge on the validation replies    (waits for `eval.py judge`)
    select                per method, once its sweep is judged: one refinement setting near the
                          CE bound (selection.refine_setting), then, once that is judged, the
                          rule of semloss_jax.eval.selection over both (rewritten as results come)
    ...                   the models that depend on the selection (the refinements; exact EMD at
                          the 2 best λ of LB, N harmful in {10, 30, 300}, sampled replies, seeds
                          1 and 2)
    labelcheck/pool       a blind sample (60 each) of the judged harmful_val replies of base, SFT
                          and each method's choice and runner-up, cut into label batches
                          (docs/study/labelcheck/), once every method is chosen
    labelcheck/report     hand labels against the judge on those rows (waits for the labels:
                          `python -m semloss_jax.eval.label`, blind)
    labelcheck_test/pool, labelcheck_test/report
                          the same, paired (amendment 7): the same 100 test harmful prompts of
                          SFT and claim 1's three choices, once their test parts have run
                          (docs/study/labelcheck_test/)
    labelcheck_c5/..., labelcheck_c4/..., labelcheck_c2/...
                          the same 100 prompts for claims 5, 4 and 2's models, with SFT and
                          TA-SFT LB's choice again as reference (amendment 8)
    test/NAME             eval.py run on the TEST sets, only once every method is chosen; first
                          while the model's weights are here; otherwise, once every method is
                          chosen, after its training (again) and validation, in test_order
                          (base, SFT and the choices first)
    plots                 docs/study/plots/ redrawn whenever a file they read changed
                          (experiments/study_plots.py)
    tables                docs/study/tables.md (experiments/study_tables.py) and the paper's
                          claims read from the test results by the criteria fixed in
                          docs/STUDY.md, docs/study/claims.md (experiments/study_claims.py),
                          rewritten whenever a file they read changed

Wall time per part: OUT/parts.json, mirrored with each model's config, training curve and
validation summary into --results (committed: docs/study/).

The committed results are what survives a lost machine: on a fresh clone (or after runs/ is
gone) the command first copies them back into OUT (the harvested data, the wall times, the
selection, every model's validation, judged and test results), so finished parts stay finished.
Weights are not committed: a model whose results are all in is not retrained, and a lost model
that a later part needs (its test/ part) is retrained from step 0 with the same config and
seed; its new training curve is compared with the committed one (retrain_check.json).
"""
from __future__ import annotations

import argparse
import fcntl
import fnmatch
import hashlib
import json
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as `python experiments/study.py` from anywhere
    sys.path.insert(0, str(REPO))

from semloss_jax.data.readers import read_jsonl, write_jsonl  # noqa: E402
from semloss_jax.data.schema import Record  # noqa: E402
from semloss_jax.errors import EvalError  # noqa: E402
from semloss_jax.eval import label, label_check  # noqa: E402
from semloss_jax.eval.selection import ranked, refine_setting, select_setting  # noqa: E402
from semloss_jax.paths import atomic_write_text, read_jsonl_objects  # noqa: E402

sys.path.insert(0, str(REPO / "experiments"))
import study_claims  # noqa: E402
import study_plots  # noqa: E402
import study_tables  # noqa: E402

BUDGET = REPO / "configs" / "study.yaml"
PY = sys.executable
VAL_SETS = ("harmful_val", "benign_val")
TEST_SETS = ("harmful", "overrefusal", "benign", "i_alpaca")
TEST_OUTPUTS = ("test_eval.json", "test_harmful_labels.jsonl", "test_benign_rows.jsonl")
GEN_TOKENS = 128          # new tokens per validation / test reply (greedy)
GEN_BATCH = 16
HARVEST = dict(n=360, max_new_tokens=256, seed=0)
SAMPLED = dict(n=100, samples=4, temperature=0.8)
N_SWEEP = 100             # harmful examples of every λ sweep (TA-SFT, NLL ascent, UL, DPO)
N_EFFICIENCY = (10, 30, 100, 300)
SEEDS = (1, 2)
SAFEINSTR_AVAILABLE = 2483  # refusal examples of the `refusals` set (train): SafeInstr's largest N
LABEL_CHECK = dict(per_model=60, seed=0, size=60)  # blind hand labels of the judged val replies
LABEL_CHECK_TEST = dict(per_model=100, seed=0, size=60)  # amendments 7-8: paired test replies

# method -> (what the sweep varies, its values, train.py overrides); fixed before any result
SWEEPS: dict[str, tuple[str, tuple[float, ...], tuple[str, ...]]] = {
    "tasft_lb": ("lam", (0.25, 0.5, 1.0, 2.0, 4.0),
                 ("objective.kind=tasft", "objective.divergence=lower_bound")),
    "nll_ascent": ("lam", (0.03, 0.1, 0.3, 1.0), ("objective.kind=nll_ascent",)),
    "unlikelihood": ("lam", (0.3, 1.0, 3.0, 10.0), ("objective.kind=unlikelihood",)),
    "dpo": ("lam", (0.1, 0.3, 1.0, 3.0), ("objective.kind=dpo", "objective.beta=0.1")),
    # the N refusals as a second stream of the budget's 4 rows per step, weight 1, beside SFT's
    # benign stream (amendment 1 of 2026-12-06 in docs/STUDY.md; was: mixed into the benign data)
    "safeinstr": ("n", (100, 300, 1000), ("objective.kind=safeinstr", "objective.lam=1")),
}
SFT = ("objective.kind=sft", "objective.lam=0", "data.harmful_batch=0")
REFUSALS = (
    "I'm sorry, but I can't help with that. It could cause real harm to people.",
    "I can't assist with this request. If you have another question, I'm happy to help.",
    "I won't provide that. It could be dangerous or illegal, and it could hurt someone.",
    "I am not able to help with that request, because it could be used to cause harm.",
    "Sorry, I can't help with this. Is there something else I can do for you?",
    "I must decline: this could put people at risk. I can help with a safer question instead.",
    "I can't do that. Helping with this could lead to harm, so I won't give instructions for it.",
    "I'm sorry, I can't assist with that, but I'd be glad to help with something else.",
)


@dataclass(frozen=True)
class Model:
    """One trained (or base) model of the study: its method family, the swept setting and the
    train.py overrides on top of configs/study.yaml (None = the untrained base model)."""

    name: str
    family: str
    setting: float | None
    overrides: tuple[str, ...] | None
    seed: int = 0


@dataclass
class Part:
    """A unit of work: done() says it can be skipped, blocked() why it cannot run yet (or None),
    run() does it."""

    name: str
    done: Callable[[], bool]
    run: Callable[[], None]
    blocked: Callable[[], str | None] = field(default=lambda: None)


def fmt(x: float) -> str:
    """A setting as it appears in model names: 1.0 -> '1', 0.25 -> '0.25'."""
    return f"{x:g}"


def sweep_model(fam: str, v: float) -> Model:
    """The model of method `fam` at setting v (λ, or N refusals for SafeInstr), seed 0."""
    what, _, ov = SWEEPS[fam]
    key = "objective.lam" if what == "lam" else "data.safeinstr_n"
    val = fmt(v) if what == "lam" else int(v)
    extra = (f"data.harmful_n={N_SWEEP}",) if what == "lam" else ()
    return Model(f"{fam}_{what[0]}{fmt(v)}", fam, float(v), (*ov, f"{key}={val}", *extra))


def sweep_models() -> list[Model]:
    """The models fixed in advance: base, SFT and every sweep (seed 0)."""
    return [Model("base", "base", None, None), Model("sft", "sft", None, SFT)] + [
        sweep_model(fam, v) for fam, (_, values, _) in SWEEPS.items() for v in values]


def selection_complete(sel: dict) -> bool:
    """Whether every method's setting is chosen (the test/ parts and the label check wait for it)."""
    return all(isinstance(sel.get(f), dict) for f in SWEEPS)


def selected_models(sel: dict) -> list[Model]:
    """The models that depend on the validation figures (selection.json): each finished sweep's
    refinement, then for each chosen method its dependents."""
    out: list[Model] = [sweep_model(fam, x) for fam, x in sel.get("refine", {}).items()]
    lb = sel.get("tasft_lb")
    if lb:
        lam = lb["setting"]
        base = ("objective.kind=tasft", "objective.divergence=lower_bound", f"objective.lam={fmt(lam)}")
        for x in sel.get("tasft_lb_top2", []):
            out.append(Model(f"tasft_exact_l{fmt(x)}", "tasft_exact", x,
                             ("objective.kind=tasft", "objective.divergence=exact_onehot",
                              f"objective.lam={fmt(x)}", f"data.harmful_n={N_SWEEP}")))
        for n in N_EFFICIENCY:
            if n != N_SWEEP:
                out.append(Model(f"tasft_lb_l{fmt(lam)}_n{n}", "tasft_lb_n", n,
                                 (*base, f"data.harmful_n={n}")))
        out.append(Model(f"tasft_lb_l{fmt(lam)}_sampled", "tasft_lb_sampled", lam,
                         (*base, "data.harmful_n=0", "data.harmful=@sampled")))
    for fam in ("sft", *SWEEPS, "tasft_exact"):
        chosen = sel.get(fam)
        if isinstance(chosen, dict) and chosen.get("overrides") is not None:
            for s in SEEDS:
                out.append(Model(f"{chosen['name']}_s{s}", f"{fam}_seed", chosen["setting"],
                                 (*chosen["overrides"], f"run.seed={s}"), seed=s))
    return out


# ---------------------------------------------------------------------------------------------
# Where things are


@dataclass(frozen=True)
class Layout:
    """The study's folders: OUT (run dirs, generations, logs) and RESULTS (what is committed)."""

    out: Path
    results: Path

    def data(self, name: str) -> Path:
        """A data file of the study (d_harmful.jsonl, ...)."""
        return self.out / "data" / name

    def model(self, name: str) -> Path:
        """A model's train.py run directory (its val/, test/ below it)."""
        return self.out / "models" / name

    def judged(self, name: str, set_name: str) -> Path:
        """The judged validation replies of a model on one set."""
        return self.model(name) / "val" / "judged" / f"{set_name}.jsonl"

    @property
    def selection(self) -> Path:
        """The per-method choices (written by the select part)."""
        return self.out / "selection.json"

    @property
    def labelcheck(self) -> Path:
        """The blind hand-label check of the judge (pool, batches, labels, report; committed)."""
        return self.results / "labelcheck"

    @property
    def labelcheck_test(self) -> Path:
        """Amendment 7's paired blind label check of claim 1's test replies (committed)."""
        return self.results / "labelcheck_test"

    def test_replies(self, name: str) -> Path:
        """A model's judged TEST harmful replies (eval.py run's generations; not committed)."""
        return self.model(name) / "test" / "generations" / "harmful.jsonl"


def sh(cmd: list[str], log: Path) -> None:
    """Run a command with its output in `log`; SystemExit naming the log when it fails."""
    log.parent.mkdir(parents=True, exist_ok=True)
    print("$ " + " ".join(cmd), flush=True)
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}); see {log}")


def mirror(src: Path, dst: Path) -> None:
    """Copy a small result file into the results folder (skipped when src is absent)."""
    if src.exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)


def committed_copies(lay: Layout) -> list[tuple[Path, Path]]:
    """(committed copy, run-folder path) of every result file that later parts read back: the
    wall times, the selection, the harvested data, and each model's validation, judged and test
    results."""
    pairs = [(lay.results / "parts.json", lay.out / "parts.json"),
             (lay.results / "selection.json", lay.selection)]
    pairs += [(p, lay.data(p.name)) for p in sorted((lay.results / "data").glob("*.jsonl"))]
    for d in sorted(p for p in (lay.results / "models").glob("*") if p.is_dir()):
        run = lay.model(d.name)
        pairs += [(d / "val_eval.json", run / "val" / "eval.json"),
                  (d / "test_eval.json", run / "test" / "eval.json")]
        pairs += [(d / f"judged_{s}.jsonl", lay.judged(d.name, s)) for s in VAL_SETS]
    return pairs


def restore(lay: Layout) -> list[Path]:
    """Copy the committed results back into a run folder that lacks them (a fresh clone, or a
    machine whose runs/ was lost), so finished parts stay finished; a run-folder file that exists
    is never overwritten. Returns the restored paths."""
    out = []
    for src, dst in committed_copies(lay):
        if src.exists() and not dst.exists():
            mirror(src, dst)
            out.append(dst)
    return out


def curve_check(old: Path, new: Path, keys=("loss", "ce", "harm_nll", "div")) -> dict:
    """How far a retrained model's training curve is from the committed one (a model retrained
    after its weights were lost should reproduce it): steps compared, largest |difference| per
    key, and the first step where any differs by more than 1e-4."""
    a, b = ({r["step"]: r for r in map(json.loads, filter(str.strip, f.read_text().splitlines()))}
            for f in (old, new))
    steps = sorted(set(a) & set(b))
    diff = {k: max((abs(a[s][k] - b[s][k]) for s in steps if k in a[s] and k in b[s]), default=0.0)
            for k in keys}
    first = next((s for s in steps if any(abs(a[s].get(k, 0) - b[s].get(k, 0)) > 1e-4 for k in keys)),
                 None)
    return {"steps_compared": len(steps), "max_abs_diff": diff, "first_step_off_by_1e-4": first}


# ---------------------------------------------------------------------------------------------
# Data parts


def safe_replies(harmful: list[Record]) -> list[Record]:
    """A safe reply to each harmful prompt: one of REFUSALS, picked by a hash of the prompt.

    The base model does not refuse reliably even when told to (0 of 16 train prompts under a
    safety system prompt gave a reply the refusal detector accepts), so DPO's preferred side is
    a short templated refusal (the data of the SafeInstr baseline is also refusals)."""
    out, seen = [], set()
    for r in harmful:
        if r.prompt in seen:
            continue
        seen.add(r.prompt)
        k = int(hashlib.sha256(r.prompt.encode()).hexdigest(), 16) % len(REFUSALS)
        out.append(Record(id=f"safe:{r.id}", prompt=r.prompt, response=REFUSALS[k], source="study_safe",
                          split="train", label="refusal"))
    return out


def data_parts(lay: Layout) -> list[Part]:
    """Harvest D_harmful (greedy and sampled) and write the DPO safe replies."""
    d = lay.data("d_harmful.jsonl")
    ds = lay.data("d_harmful_sampled.jsonl")
    safe = lay.data("safe_replies.jsonl")
    common = [PY, "-m", "semloss_jax.data.harvest", "--judge", "none", "--batch-size", str(GEN_BATCH),
              "--max-new-tokens", str(HARVEST["max_new_tokens"]), "--seed", str(HARVEST["seed"]),
              "--no-progress"]
    logs = lay.out / "logs"
    return [
        # the D_harmful of 2026-11-28 (committed, restored first): today's refusal detector would
        # drop 52 more replies, so the part rebuilds that day's file (experiments/study_harvest_rebuild.py)
        Part("data/harvest", d.exists,
             lambda: (sh([PY, str(REPO / "experiments" / "study_harvest_rebuild.py"), "--out", str(d)],
                         logs / "harvest.log"),
                      mirror(d, lay.results / "data" / d.name))),
        Part("data/harvest_sampled", ds.exists,
             lambda: (sh([*common, "--n", str(SAMPLED["n"]), "--samples", str(SAMPLED["samples"]),
                          "--temperature", str(SAMPLED["temperature"]), "--out", str(ds)],
                         logs / "harvest_sampled.log"),
                      mirror(ds, lay.results / "data" / ds.name))),
        Part("data/safe", safe.exists, lambda: write_jsonl(safe, safe_replies(read_jsonl(d)[0])),
             blocked=lambda: None if d.exists() else "needs data/harvest"),
    ]


# ---------------------------------------------------------------------------------------------
# Model parts


def train_cmd(m: Model, lay: Layout) -> list[str]:
    """train.py on the frozen budget plus the model's overrides (resuming its own checkpoints)."""
    ov = [o.replace("@sampled", str(lay.data("d_harmful_sampled.jsonl"))) for o in m.overrides or ()]
    extra = [f"data.chosen={lay.data('safe_replies.jsonl')}"] if m.family == "dpo" else []
    return [PY, "train.py", "--config", str(BUDGET), "--quiet", f"run.output_dir={lay.model(m.name)}",
            "run.resume=true", f"data.harmful={lay.data('d_harmful.jsonl')}", *ov, *extra]


def eval_cmd(m: Model, lay: Layout, sets, sub: str) -> list[str]:
    """eval.py run of the model (its run dir; the default model for base) on `sets` into NAME/sub."""
    model = [] if m.overrides is None else ["--model", str(lay.model(m.name))]
    return [PY, "eval.py", "run", *model, "--out", str(lay.model(m.name) / sub), "--sets", *sets,
            "--max-new-tokens", str(GEN_TOKENS), "--batch-size", str(GEN_BATCH), "--no-progress"]


def write_test_labels(generations: Path, out: Path, keep: tuple[str, ...] = ()) -> None:
    """Per TEST reply its id, prompt, judged label and the `keep` fields, not the reply: what
    the report recomputes from (the harmful rate without the prompts that have a near-duplicate
    among D_harmful's, amendment 5; paired benign CE differences from ref_nll / ref_tokens)."""
    rows = read_jsonl_objects(generations)
    atomic_write_text(out, "".join(json.dumps({"id": r["id"], "prompt": r["prompt"],
                                               "harmful": bool(r["harmful"]), "label": r["label"],
                                               **{k: r.get(k) for k in keep}},
                                              ensure_ascii=False) + "\n" for r in rows))


def judge_available() -> bool:
    """Whether `eval.py judge` exists (the judge v2 command)."""
    proc = subprocess.run([PY, "eval.py", "judge", "--help"], cwd=REPO, capture_output=True)
    return proc.returncode == 0


def model_parts(m: Model, lay: Layout, judge_ok: bool) -> list[Part]:
    """The train (not for base), val, judge and test parts of one model."""
    run, logs = lay.model(m.name), lay.out / "logs"
    res = lay.results / "models" / m.name
    trained = (lambda: True) if m.overrides is None else (run / "hf" / "config.json").exists

    def train():
        sh(train_cmd(m, lay), logs / f"train_{m.name}.log")
        if (res / "metrics.jsonl").exists():  # retrained after its weights were lost
            check = curve_check(res / "metrics.jsonl", run / "metrics.jsonl")
            print(f"  retrained {m.name} against its committed curve: {check}", flush=True)
            atomic_write_text(res / "retrain_check.json", json.dumps(check, indent=1) + "\n")
        mirror(run / "config.yaml", res / "config.yaml")
        mirror(run / "metrics.jsonl", res / "metrics.jsonl")

    def val():
        sh(eval_cmd(m, lay, VAL_SETS, "val"), logs / f"val_{m.name}.log")
        mirror(run / "val" / "eval.json", res / "val_eval.json")

    def judge():
        for s in VAL_SETS:
            sh([PY, "eval.py", "judge", "--in", str(run / "val" / "generations" / f"{s}.jsonl"),
                "--out", str(lay.judged(m.name, s))], logs / f"judge_{m.name}_{s}.log")
            mirror(lay.judged(m.name, s), res / f"judged_{s}.jsonl")

    def test():
        sh(eval_cmd(m, lay, TEST_SETS, "test"), logs / f"test_{m.name}.log")
        mirror(run / "test" / "eval.json", res / "test_eval.json")
        gens = run / "test" / "generations"
        write_test_labels(gens / "harmful.jsonl", res / "test_harmful_labels.jsonl")
        write_test_labels(gens / "benign.jsonl", res / "test_benign_rows.jsonl",
                          keep=("ref_nll", "ref_tokens", "early_stop", "refusal"))

    def needs_data() -> str | None:
        uses_harmful = m.family not in ("base", "sft", "safeinstr")
        need = (["d_harmful.jsonl"] if uses_harmful else []) + (
            ["safe_replies.jsonl"] if m.family == "dpo" else []) + (
            ["d_harmful_sampled.jsonl"] if any("@sampled" in o for o in m.overrides or ()) else [])
        missing = [n for n in need if not lay.data(n).exists()]
        return f"needs {', '.join(missing)} (data/ parts)" if missing else None

    def judge_done() -> bool:
        return all(lay.judged(m.name, s).exists() for s in VAL_SETS)

    def val_done() -> bool:  # its replies are judged, or still there to be judged
        gens = [run / "val" / "generations" / f"{s}.jsonl" for s in VAL_SETS]
        return (run / "val" / "eval.json").exists() and (judge_done() or all(g.exists() for g in gens))

    def test_done() -> bool:  # every file it commits (a kill before the last reruns it, from the cache)
        return all((res / f).exists() for f in TEST_OUTPUTS)

    def train_blocked() -> str | None:
        if val_done() and judge_done() and not complete(lay):
            return ("its results are committed and its weights are gone: only test/ needs them "
                    "again, after select")
        return needs_data()

    parts = [] if m.overrides is None else [Part(f"train/{m.name}", trained, train, train_blocked)]
    return parts + [
        Part(f"val/{m.name}", val_done, val, blocked=lambda: None if trained() else f"needs train/{m.name}"),
        Part(f"judge/{m.name}", judge_done, judge,
             blocked=lambda: ("waits for `eval.py judge` (the judge v2 command)" if not judge_ok
                              else None if val_done() else f"needs val/{m.name}")),
        Part(f"test/{m.name}", test_done, test,
             blocked=lambda: ("waits for select (test replies are generated only after every "
                              "choice is made)" if not complete(lay)
                              else None if trained() else f"needs train/{m.name}")),
    ]


# ---------------------------------------------------------------------------------------------
# Selection


def val_row(m: Model, lay: Layout) -> dict | None:
    """The model's validation figures (judged harmful rate, benign reference CE), or None."""
    judged, ev = lay.judged(m.name, "harmful_val"), lay.model(m.name) / "val" / "eval.json"
    if not (judged.exists() and ev.exists()):
        return None
    rows = read_jsonl_objects(judged)
    ce = json.loads(ev.read_text())["sets"]["benign_val"]["reference_ce"]["ce"]
    return {"name": m.name, "family": m.family, "setting": m.setting, "overrides": m.overrides,
            "val_harmful_rate": sum(int(r["harmful"]) for r in rows) / max(len(rows), 1),
            "val_benign_ce": ce, "n_harmful_val": len(rows)}


def select(models: list[Model], lay: Layout) -> dict:
    """selection.json, per method as its results come in: once its sweep is judged, its
    refinement setting (selection.refine_setting); once that is judged too, the rule of
    semloss_jax.eval.selection over both, the runner-up in the same order (the label check
    reads both) and for TA-SFT LB the 2 best λ; the exact-EMD choice once its runs are judged.
    `complete` says whether every method is chosen."""
    rows = {m.name: val_row(m, lay) for m in models}
    if rows.get("sft") is None:
        raise EvalError(f"{lay.results}: select needs SFT's validation results (the CE reference), "
                        "and models/sft has none yet")
    ref = rows["sft"]["val_benign_ce"]
    sel: dict = {"reference_ce": ref, "rows": [r for r in rows.values() if r is not None],
                 "sft": rows["sft"], "refine": {}, "runner_up": {}}
    for fam, (what, values, _) in SWEEPS.items():
        sweep = [rows[sweep_model(fam, v).name] for v in values]
        if any(r is None for r in sweep):
            continue
        x = refine_setting(sweep, ref, integer=what == "n",
                           maximum=SAFEINSTR_AVAILABLE if fam == "safeinstr" else None)
        sel["refine"][fam] = x
        extra = rows.get(sweep_model(fam, x).name)
        if extra is None:
            continue
        fam_rows = sweep + [extra]
        sel[fam] = select_setting(fam_rows, ref)
        top = ranked(fam_rows, ref)
        order = top + sorted((r for r in fam_rows if r not in top), key=lambda r: r["val_benign_ce"])
        sel["runner_up"][fam] = order[1]["name"]
        if fam == "tasft_lb":
            sel["tasft_lb_top2"] = [r["setting"] for r in order[:2]]
    exact = [rows.get(m.name) for m in models if m.family == "tasft_exact"]
    if len(exact) == 2 and all(exact):
        sel["tasft_exact"] = select_setting(exact, ref)
    sel["complete"] = selection_complete(sel)
    sel["inputs"] = sorted(k for k, v in rows.items() if v is not None)
    return sel


def select_part(lay: Layout) -> Part:
    """Writes selection.json once SFT and a whole sweep are judged; rewritten when more are."""
    def current() -> tuple[list[Model], list[str]]:
        models = all_models(lay)
        return models, sorted(m.name for m in models if val_row(m, lay) is not None)

    def done() -> bool:
        if not lay.selection.exists():
            return False
        return json.loads(lay.selection.read_text()).get("inputs") == current()[1]

    def blocked() -> str | None:
        if val_row(next(m for m in sweep_models() if m.name == "sft"), lay) is None:
            return "waits for judge/sft"
        done = [f for f, (_, values, _) in SWEEPS.items()
                if all(val_row(sweep_model(f, v), lay) is not None for v in values)]
        return None if done else "waits for a method's whole sweep to be judged"

    def run() -> None:
        atomic_write_text(lay.selection, json.dumps(select(current()[0], lay), indent=1) + "\n")
        mirror(lay.selection, lay.results / "selection.json")

    return Part("select", done, run, blocked)


def checked_models(sel: dict) -> list[str]:
    """The models whose judged validation replies get blind hand labels: base, SFT and each
    method's choice and runner-up (amendment 4 in docs/STUDY.md)."""
    out = ["base", "sft"]
    for f in SWEEPS:
        if isinstance(sel.get(f), dict):
            out += [sel[f]["name"], sel["runner_up"][f]]
    return out


def test_checked_models(sel: dict) -> list[str]:
    """The models of amendment 7's paired check of test replies: SFT and claim 1's three
    choices (TA-SFT LB, NLL ascent, unlikelihood)."""
    return ["sft", *(sel[f]["name"] for f in ("tasft_lb", "nll_ascent", "unlikelihood"))]


CLAIM_CHECKS = ("labelcheck_c5", "labelcheck_c4", "labelcheck_c2")  # amendment 8


def reference_replies(lay: Layout, name: str) -> Path:
    """A model's replies to amendment 7's 100 prompts, taken from labelcheck_test/pool.jsonl
    (committed: a replaced machine keeps them, where its test generations are lost) into a
    judged file OUT/labelcheck_ref/NAME.jsonl, written when missing; amendment 8's checks pool
    them as their reference, which also fixes their prompts to amendment 7's. Before that pool
    exists, only the path (it does not exist: the pool part says what it waits for)."""
    dst = lay.out / "labelcheck_ref" / f"{name}.jsonl"
    src = lay.labelcheck_test / "pool.jsonl"
    if not dst.exists() and src.exists():
        rows = [r for r in label.read_pool(src) if r.get("model") == name]
        if rows:
            label.write_jsonl_rows(dst, [{"prompt": r["prompt"], "response": r["response"],
                                          "harm_prob": r["judge_harm_prob"], "harmful": r["judge_harmful"],
                                          "label": r["judge_label"]} for r in rows])
    return dst


def claim_checked_models(sel: dict, check: str) -> list[str]:
    """The models of one of amendment 8's paired checks (CLAIM_CHECKS), each with SFT and TA-SFT
    LB's choice labelled again as its reference (their replies from amendment 7's pool:
    reference_replies): claim 5 DPO's choice, claim 4 the exact EMD's choice (KeyError until
    select makes it), claim 2 the N-harmful runs and SafeInstr's choice."""
    lb = sel["tasft_lb"]["name"]
    others = {"labelcheck_c5": lambda: [sel["dpo"]["name"]],
              "labelcheck_c4": lambda: [sel["tasft_exact"]["name"]],
              "labelcheck_c2": lambda: [*(f"{lb}_n{n}" for n in N_EFFICIENCY if n != N_SWEEP),
                                        sel["safeinstr"]["name"]]}
    return ["sft", lb, *others[check]()]


def check_parts(lay: Layout, prefix: str, where: Path, replies: Callable[[dict], dict[str, Path]],
                params: dict, paired: bool, needs: str) -> list[Part]:
    """PREFIX/pool (a blind sample of the models' judged replies, `replies(selection)`, cut into
    label batches under `where`) and PREFIX/report (hand labels against the judge, once every
    batch is labelled); the pool waits for the selection and for the replies (part `needs`)."""
    def judged() -> dict[str, Path]:
        return replies(json.loads(lay.selection.read_text()))

    def pool_blocked() -> str | None:
        if not complete(lay):
            return "waits for select (every method chosen)"
        try:
            files = judged()
        except KeyError as e:
            return f"waits for select (the choice {e.args[0]!r})"
        missing = [m for m, p in files.items() if not p.exists()]
        return f"needs {needs} of {', '.join(missing)}" if missing else None

    def pool() -> None:
        rows = label_check.sample_pool(judged(), params["per_model"], params["seed"], paired=paired)
        label_check.write_pool(where, rows, size=params["size"], seed=params["seed"])

    def report_blocked() -> str | None:
        if not (where / "pool.jsonl").exists():
            return f"needs {prefix}/pool"
        left = label_check.unlabelled_count(where)
        return (f"waits for {left} blind labels (python -m semloss_jax.eval.label, "
                f"batches in {where / 'batches'})") if left else None

    def report() -> None:
        atomic_write_text(where / "report.json", json.dumps(label_check.report(where), indent=1) + "\n")

    return [Part(f"{prefix}/pool", (where / "pool.jsonl").exists, pool, pool_blocked),
            Part(f"{prefix}/report", (where / "report.json").exists, report, report_blocked)]


def labelcheck_parts(lay: Layout) -> list[Part]:
    """labelcheck/pool and labelcheck/report: the checked models' judged harmful_val replies
    (amendment 4); then labelcheck_test/pool and labelcheck_test/report: the same 100 test
    harmful prompts of SFT and claim 1's choices, paired (amendment 7), once they are tested;
    then the same for claims 5, 4 and 2 (labelcheck_c5, _c4, _c2: amendment 8)."""
    val = check_parts(lay, "labelcheck", lay.labelcheck,
                      lambda sel: {m: lay.judged(m, "harmful_val") for m in checked_models(sel)},
                      LABEL_CHECK, paired=False, needs="judge/")
    needs = "test/ (its generations/harmful.jsonl)"
    test = check_parts(lay, "labelcheck_test", lay.labelcheck_test,
                       lambda sel: {m: lay.test_replies(m) for m in test_checked_models(sel)},
                       LABEL_CHECK_TEST, paired=True, needs=needs)
    def claim_replies(sel: dict, key: str) -> dict[str, Path]:
        ref = {"sft", sel["tasft_lb"]["name"]}
        return {m: reference_replies(lay, m) if m in ref else lay.test_replies(m)
                for m in claim_checked_models(sel, key)}

    claims = [part for key in CLAIM_CHECKS
              for part in check_parts(lay, key, lay.results / key,
                                      lambda sel, key=key: claim_replies(sel, key),
                                      LABEL_CHECK_TEST, paired=True, needs=needs)]
    return val + test + claims


def families(models: list[Model]) -> dict[str, tuple[str, float | None]]:
    """Each model's (method family, swept setting), by name: what the plots group by."""
    return {m.name: (m.family, m.setting) for m in models}


def plots_part(lay: Layout) -> Part:
    """Redraws docs/study/plots/ (experiments/study_plots.py) whenever a file they read changed."""
    def names() -> list[str]:
        return [m.name for m in all_models(lay)]

    def done() -> bool:
        f = lay.results / "plots" / "plots.json"
        return f.exists() and json.loads(f.read_text()).get("digest") == study_plots.inputs_digest(
            lay.results, names())

    return Part("plots", done, lambda: study_plots.draw(lay.results, families(all_models(lay)), N_SWEEP))


def tables_part(lay: Layout) -> Part:
    """Rewrites docs/study/tables.md (experiments/study_tables.py) and docs/study/claims.md
    (experiments/study_claims.py) whenever a file they read changed, and their regions of the
    STUDY.md and RESULTS.md beside the results folder."""
    def doc(name: str, marker: str) -> Path | None:
        f = lay.results.parent / name
        return f if f.exists() and marker in f.read_text() else None

    def run() -> None:
        fams = families(all_models(lay))
        study_tables.write(lay.results, fams, update=doc("STUDY.md", "<!-- study_tables:"))
        sel = json.loads(lay.selection.read_text()) if lay.selection.exists() else {}
        study_claims.write(lay.results, fams, sel, update=doc("RESULTS.md", "<!-- study_claims -->"))

    def done() -> bool:
        fams = families(all_models(lay))
        return study_tables.is_current(lay.results, fams) and study_claims.is_current(lay.results, fams)

    return Part("tables", done, run)


def complete(lay: Layout) -> bool:
    """Whether selection.json exists with every method chosen."""
    return lay.selection.exists() and selection_complete(json.loads(lay.selection.read_text()))


def all_models(lay: Layout) -> list[Model]:
    """The sweep models, then those the current selection.json implies."""
    sel = json.loads(lay.selection.read_text()) if lay.selection.exists() else {}
    return sweep_models() + selected_models(sel)


# ---------------------------------------------------------------------------------------------
# The command


def test_order(models: list[Model], sel: dict, alternatives: set[str] = frozenset()) -> list[Model]:
    """The order of the test/ parts: base, SFT and each method's choice first, then the models
    the selection adds (exact EMD, N harmful, sampled replies, seeds) and the settings that the
    sensitivity rules of amendment 3 pick (`alternatives`: the claims are also read under them),
    then the other sweep settings (the test frontier), so the claims' models are tested first."""
    chosen = {"base", "sft"} | {sel[f]["name"] for f in SWEEPS if isinstance(sel.get(f), dict)}
    sweep = {m.name for m in sweep_models()} - set(alternatives)
    return sorted(models, key=lambda m: 0 if m.name in chosen else 1 if m.name not in sweep else 2)


def alternative_picks(lay: Layout, models: list[Model], sel: dict) -> set[str]:
    """The settings the sensitivity rules pick (study_claims.choices), once every method is
    chosen; empty before."""
    if not selection_complete(sel):
        return set()
    picks = study_claims.choices(lay.results, families(models), sel)
    return {name for rule in picks.values() for name in rule.values()}


def all_parts(lay: Layout, judge_ok: bool) -> list[Part]:
    """Every part in the order it runs: data; the parts left of each model whose weights are
    here (validated and tested before anything is trained: a replaced machine would cost a
    training again); while a method is still to be chosen, train/val/judge per model still to
    be validated, each followed by its test/ part (blocked until every method is chosen); select;
    the blind label check; then per model in test_order, its training (again, where the weights
    were lost with a machine), its validation where still to do, and its test/ part. Once every
    method is chosen no choice reads a validation any more, so the claims' models (base, SFT,
    the choices) come first instead of the models the selection adds."""
    models = all_models(lay)
    sel = json.loads(lay.selection.read_text()) if lay.selection.exists() else {}
    choosing = not selection_complete(sel)
    here, early, late = [], [], []
    for m in test_order(models, sel, alternative_picks(lay, models, sel)):
        ps = {p.name.split("/")[0]: p for p in model_parts(m, lay, judge_ok)}
        validated = ps["val"].done() and ps["judge"].done()
        mine = [ps[k] for k in ("train", "val", "judge", "test") if k in ps]
        if "train" in ps and ps["train"].done():
            here += mine
        elif choosing and not validated:
            early += mine
        elif validated:        # listed where they ran; trained again right before its test part
            early += [ps["val"], ps["judge"]]
            late += [ps[k] for k in ("train", "test") if k in ps]
        else:
            late += mine
    index = {m.name: i for i, m in enumerate(models)}
    early.sort(key=lambda p: index[p.name.split("/", 1)[1]])
    return (data_parts(lay) + here + early + [select_part(lay)] + labelcheck_parts(lay) + late
            + [plots_part(lay), tables_part(lay)])


def record(lay: Layout, name: str, wall_s: float) -> None:
    """Add a finished part's wall time to OUT/parts.json (mirrored into the results). The
    read-modify-write holds an OS file lock: two runners (say `--only 'train/*'` and
    `--only 'val/*'`) finishing parts at the same moment both keep their entries."""
    path = lay.out / "parts.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(lay.out / "parts.json.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        times = json.loads(path.read_text()) if path.exists() else {}
        times[name] = {"wall_s": round(wall_s, 1), "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
        atomic_write_text(path, json.dumps(times, indent=1) + "\n")
        mirror(path, lay.results / "parts.json")


def state(p: Part) -> str:
    """'done', 'ready' or 'blocked: why'."""
    if p.done():
        return "done"
    why = p.blocked()
    return f"blocked: {why}" if why else "ready"


def kind_of(name: str) -> tuple[str, ...]:
    """The keys a part is timed by, most specific first: a model's part (train/, val/, judge/,
    test/) by its prefix and method family, then by its prefix alone ('train/dpo': a DPO run
    also scores the chosen replies, after computing their reference log-probabilities); any
    other part (data/, labelcheck/, select, ...) only by its own name."""
    prefix, _, rest = name.partition("/")
    if prefix not in ("train", "val", "judge", "test"):
        return (name,)
    fam = next((f for f in SWEEPS if rest.startswith(f + "_")), None)
    return (f"{prefix}/{fam}", prefix) if fam else (prefix,)


def time_left(names: list[str], walls: dict[str, float]) -> str:
    """One line: the listed parts' time, each at the median wall time of the finished parts it
    is timed by (kind_of); the parts with nothing finished to time them by are counted apart.
    Parts that later choices add (refinements, seeds, ...) are not listed yet."""
    by: dict[str, list[float]] = {}
    for n, w in walls.items():
        for key in kind_of(n):
            by.setdefault(key, []).append(w)
    total, untimed = 0.0, {}
    for n in names:
        ws = next((by[k] for k in kind_of(n) if k in by), None)
        if ws:
            total += statistics.median(ws)
        else:
            untimed[kind_of(n)[-1]] = untimed.get(kind_of(n)[-1], 0) + 1
    line = (f"time left for {len(names) - sum(untimed.values())} of the {len(names)} parts "
            f"not done: about {total / 3600:.1f} h (each at the median wall time of the finished "
            f"parts of its kind, which ran beside other jobs at times)")
    if untimed:
        line += "; nothing finished to time " + ", ".join(f"{v} x {k}" for k, v in untimed.items())
    return line + ("; parts that later choices add (refinements, exact EMD, N and sampled runs, "
                   "seeds) are not listed yet")


def main(argv: list[str] | None = None) -> int:
    """Run the ready parts in order (or list them); returns 0."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/study", help="run dirs, generations, logs")
    ap.add_argument("--results", default="docs/study", help="small result files (committed)")
    ap.add_argument("--only", nargs="*", default=None, help="glob patterns of part names (e.g. 'train/*')")
    ap.add_argument("--max-parts", type=int, default=None, help="stop after running this many parts")
    ap.add_argument("--list", action="store_true",
                    help="print every part, its state and an estimate of the time left; run nothing")
    args = ap.parse_args(argv)
    lay = Layout((REPO / args.out).resolve(), (REPO / args.results).resolve())
    restored = restore(lay)
    if restored:
        print(f"restored {len(restored)} committed result file(s) into {lay.out}", flush=True)
    judge_ok = judge_available()

    def wanted(p: Part) -> bool:
        return args.only is None or any(fnmatch.fnmatch(p.name, g) for g in args.only)

    if args.list:
        parts = all_parts(lay, judge_ok)
        for p in parts:
            print(f"{p.name:40s} {state(p)}")
        walls = json.loads((lay.out / "parts.json").read_text()) if (lay.out / "parts.json").exists() else {}
        print(time_left([p.name for p in parts if not p.done()],
                        {n: d["wall_s"] for n, d in walls.items()}))
        return 0
    n_ran, stuck = 0, set()  # stuck: ran and still not done (not tried again in this invocation)
    while args.max_parts is None or n_ran < args.max_parts:
        # a part that is done may become not done again when its inputs change (select,
        # tables, plots: each new judged model); it then runs again
        todo = [p for p in all_parts(lay, judge_ok) if wanted(p) and p.name not in stuck
                and not p.done() and p.blocked() is None]
        if not todo:
            break
        p = todo[0]
        t = time.perf_counter()
        p.run()
        n_ran += 1
        if not p.done():
            stuck.add(p.name)
        record(lay, p.name, time.perf_counter() - t)
        print(f"  {p.name} done in {time.perf_counter() - t:.0f}s", flush=True)
    left = [(p.name, state(p)) for p in all_parts(lay, judge_ok) if wanted(p) and not p.done()]
    print(f"ran {n_ran} part(s); {len(left)} left" + "".join(f"\n  {n}: {s}" for n, s in left[:12])
          + (f"\n  ... and {len(left) - 12} more" if len(left) > 12 else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
