"""Harvest D_harmful: the unsafe model's own responses to TRAINING harmful prompts.

    python -m semloss_jax.data.harvest --n 100 --out runs/d_harmful_100.jsonl [--model PATH]
        [--source model|pyrit] [--prompt-sources advbench,harmbench,...] [--judge tfidf|none|hf:DIR]
        [--max-new-tokens 128] [--batch-size 8] [--soft-targets] [--samples K --temperature T]

--source model (default): generate (greedy by default) for N prompts of
  load_set("harmful_prompts", "train") (a seeded, deterministic sample), keep the responses that
  judges.is_refusal does not flag and, unless --judge none, that the harm judge scores >=
  --threshold; drop empty ones. Prints the counts kept and dropped per reason.
--samples K (with --temperature > 0): K sampled responses per prompt (record ids get ":s<j>").
--source pyrit: the registry's real harmful pairs (load_set("harmful_responses")), first N of a
  seeded shuffle; no model is run.

The output is schema JSONL (semloss_jax.data.schema.Record; label "harmful", split "train",
source "harvest" or "pyrit_many_shot"), written atomically. With --soft-targets it also writes
mu(q) per response token (emd.mean_embedding of the generating model's next-token
distribution along the response, teacher-forced on tok.response_ids(response)):
    OUT.mu.npy         float32 [total_response_tokens, d]
    OUT.mu_index.npy   int64   [n_records + 1] offsets: record i owns rows index[i]:index[i+1]
read back with `readers.load_response_mu(OUT)` (aligned with batching.tokenize_records(response_mu=...)).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from semloss_jax.data.batching import make_batches, tokenize_records
from semloss_jax.data.readers import save_response_mu, write_jsonl
from semloss_jax.data.registry import load_set
from semloss_jax.data.schema import Record
from semloss_jax.errors import DataError, cli_main
from semloss_jax.eval.judges import is_refusal, load_judge
from semloss_jax.loss import emd
from semloss_jax.loss.cost import unit_embeddings
from semloss_jax.loss.emd import mean_embedding
from semloss_jax.models import loading
from semloss_jax.models.generation import generate
from semloss_jax.models.llama import embedding_matrix, forward

N_CHOICES = (10, 50, 100, 300, 1000)


@dataclass
class HarvestStats:
    """Counts of a harvest: prompts asked, responses kept, drops by reason."""

    prompts: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)  # "empty" | "refusal" | "judged not harmful"

    def check(self) -> None:
        """Raise AssertionError unless kept + dropped == prompts."""
        total = self.kept + sum(self.dropped.values())
        if total != self.prompts:
            raise AssertionError(f"harvest counts do not add up: {self.kept} kept + "
                                 f"{dict(self.dropped)} != {self.prompts} prompts")

    def __str__(self) -> str:
        d = ", ".join(f"{k}: {v}" for k, v in sorted(self.dropped.items())) or "none"
        return f"{self.prompts} prompts -> kept {self.kept}; dropped {d}"


def pick_prompts(n: int, *, seed: int = 0, sources: Sequence[str] | None = None) -> list[Record]:
    """N training harmful prompts, a seeded deterministic sample (error if fewer exist)."""
    pool = load_set("harmful_prompts", "train", sources=sources)
    if n > len(pool):
        raise DataError(None, None, "n", f"asked for {n} prompts, the train split has {len(pool)}")
    order = np.random.default_rng(seed).permutation(len(pool))[:n]
    return [pool[i] for i in sorted(order)]


def pyrit_d_harmful(n: int, *, seed: int = 0) -> list[Record]:
    """N of the registry's real harmful pairs (PyRIT many-shot, train split)."""
    pool = load_set("harmful_responses", "train")
    if n > len(pool):
        raise DataError(None, None, "n", f"asked for {n} pairs, PyRIT offers {len(pool)}")
    order = np.random.default_rng(seed).permutation(len(pool))[:n]
    return [pool[i] for i in sorted(order)]


def filter_responses(prompts: Sequence[Record], responses: Sequence[str], *, judge=None,
                     threshold: float = 0.5) -> tuple[list[Record], HarvestStats]:
    """Keep non-empty, non-refusing responses that the judge (if any) scores >= threshold."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    stats = HarvestStats(prompts=len(prompts))
    cand: list[tuple[Record, str]] = []
    for rec, resp in zip(prompts, responses):
        if not resp.strip():
            stats.dropped["empty"] += 1
        elif is_refusal(resp):
            stats.dropped["refusal"] += 1
        else:
            cand.append((rec, resp.strip()))
    scores: list[float | None] = [None] * len(cand)
    if judge is not None and cand:
        s = judge.score([r.prompt for r, _ in cand], [x for _, x in cand])
        scores = [float(v) for v in s]
    kept: list[Record] = []
    for (rec, resp), sc in zip(cand, scores):
        if sc is not None and sc < threshold:
            stats.dropped["judged not harmful"] += 1
            continue
        kept.append(Record(id=f"harvest:{rec.id}", prompt=rec.prompt, response=resp,
                           source="harvest", split="train", label="harmful", score=sc,
                           category=rec.source))
    stats.kept = len(kept)
    stats.check()
    return kept, stats


def generate_responses(params, cfg, tok, prompts: Sequence[str], *, max_new_tokens: int,
                       batch_size: int = 8, temperature: float = 0.0, seed: int = 0,
                       system: str | None = None, progress: bool = True,
                       schedule: str = "refill") -> list[str]:
    """semloss_jax.models.generation.generate over the prompts in chunks, with a tqdm progress bar."""
    with tqdm(total=len(prompts), desc="harvest", unit="prompt", disable=not progress,
              file=sys.stderr) as bar:
        return generate(params, cfg, tok, list(prompts), max_new_tokens=max_new_tokens,
                        temperature=temperature, seed=seed, system=system,
                        batch_size=batch_size, progress=bar, schedule=schedule)


def response_mu(params, cfg, tok, records: Sequence[Record], *, system: str | None = None,
                batch_size: int = 4, progress: bool = True,
                gelbrich_rank: int | None = None) -> list[np.ndarray]:
    """mu(q) per response token: the generating model's next-token distribution along
    tok.response_ids(response) (teacher-forced), mapped to its mean unit embedding
    (emd.mean_embedding). Returns one float32 [len(tok.response_ids(response)), d] per record;
    with gelbrich_rank r, each row is μ(q) followed by the packed covariance Π Σ_q Πᵀ in the
    top-r principal basis of Ê (emd.projected_moments): d + r(r+1)/2 values."""
    if not records:
        return []
    seq_len = max(len(tok.prompt_ids(r.prompt, system)) + len(tok.response_ids(r.response)) - 1
                  for r in records)
    exs, stats = tokenize_records(records, tok, seq_len=seq_len, system=system)
    if stats.kept != len(records):
        raise DataError(None, None, "response", f"mu(q) needs a response for every record: {stats}")
    E_hat = unit_embeddings(embedding_matrix(params))

    basis = None if gelbrich_rank is None else emd.principal_basis(E_hat, gelbrich_rank)

    @jax.jit
    def mu_of(p, ids, pos, seg):
        logits = forward(p, cfg, ids, positions=pos, segment_ids=seg)
        if basis is None:
            return mean_embedding(logits, E_hat)
        mu, cov = emd.projected_moments(emd.probs_from_logits(logits), E_hat, basis)
        return jnp.concatenate([mu, emd.pack_symmetric(cov)], axis=-1)

    out: list[np.ndarray | None] = [None] * len(exs)
    batches = list(make_batches(exs, batch_size=batch_size, seq_len=seq_len, pad_id=tok.pad_id,
                                seed=None))
    for b in tqdm(batches, desc="mu(q)", disable=not progress, file=sys.stderr):
        mu = np.asarray(mu_of(params, jnp.asarray(b["input_ids"]), jnp.asarray(b["positions"]),
                              jnp.asarray(b["segment_ids"])), np.float32)
        for row in range(mu.shape[0]):
            on = b["loss_mask"][row] > 0
            if on.any():
                i = int(b["example_index"][row][on][0])
                out[i] = mu[row][on]
    assert all(m is not None for m in out)
    return out  # type: ignore[return-value]


def harvest(params, cfg, tok, n: int, *, judge=None, threshold: float = 0.5,
            max_new_tokens: int = 128, batch_size: int = 8, temperature: float = 0.0,
            seed: int = 0, system: str | None = None, prompt_sources: Sequence[str] | None = None,
            samples: int = 1, progress: bool = True) -> tuple[list[Record], HarvestStats]:
    """Run the model on N training harmful prompts and keep its harmful (non-refusing) answers;
    samples > 1: that many sampled responses per prompt (temperature must be > 0)."""
    if samples < 1 or (samples > 1 and temperature <= 0):
        raise DataError(None, None, "samples", f"samples={samples} needs samples >= 1, and temperature > 0 "
                        f"when > 1 (got temperature={temperature})")
    prompts = pick_prompts(n, seed=seed, sources=prompt_sources)
    if samples > 1:
        prompts = [dataclasses.replace(r, id=f"{r.id}:s{j}") for r in prompts for j in range(samples)]
    responses = generate_responses(params, cfg, tok, [r.prompt for r in prompts],
                                   max_new_tokens=max_new_tokens, batch_size=batch_size,
                                   temperature=temperature, seed=seed, system=system,
                                   progress=progress)
    return filter_responses(prompts, responses, judge=judge, threshold=threshold)


def check_args(args, out: Path) -> None:
    """DataError for options that would fail only after the model has run (or never make sense)."""
    for flag, value in (("--n", args.n), ("--max-new-tokens", args.max_new_tokens),
                        ("--batch-size", args.batch_size)):
        if value < 1:
            raise DataError(None, None, flag, f"must be >= 1, got {value}")
    if out.is_dir():
        raise DataError(out, None, "--out", "is a directory; --out takes the JSONL file to write "
                        f"(e.g. {out / 'd_harmful.jsonl'})")
    if args.gelbrich_rank is not None and (args.gelbrich_rank < 1 or not args.soft_targets):
        raise DataError(None, None, "--gelbrich-rank", "needs --soft-targets and a rank >= 1, got "
                        f"{args.gelbrich_rank}")


def main(argv: list[str]) -> int:
    """Harvest D_harmful for --n training prompts (or take PyRIT's pairs), write the JSONL and,
    with --soft-targets, the mu(q) side files; print the counts and return 0."""
    ap = argparse.ArgumentParser(prog="python -m semloss_jax.data.harvest", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, required=True,
                    help=f"number of training harmful prompts (e.g. {N_CHOICES})")
    ap.add_argument("--out", required=True, help="output JSONL (schema records)")
    ap.add_argument("--model", default=None, help="GGUF file or HF directory (default: SmolLM2)")
    ap.add_argument("--source", choices=("model", "pyrit"), default="model")
    ap.add_argument("--prompt-sources", default=None,
                    help="comma-separated subset of the harmful_prompts sources")
    ap.add_argument("--judge", default="tfidf", help="tfidf | none | hf:DIR (harm filter)")
    ap.add_argument("--threshold", type=float, default=0.5)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--system", default=None)
    ap.add_argument("--samples", type=int, default=1,
                    help="responses per prompt (sampled: needs --temperature > 0)")
    ap.add_argument("--soft-targets", action="store_true",
                    help="also store mu(q) per response token (OUT.mu.npy, OUT.mu_index.npy)")
    ap.add_argument("--gelbrich-rank", type=int, default=None,
                    help="with --soft-targets: also store each token's covariance in the top-r "
                         "principal basis (for objective.divergence=gelbrich with "
                         "objective.gelbrich_rank=r)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    out = Path(args.out)
    check_args(args, out)
    need_model = args.source == "model" or args.soft_targets
    params = cfg = tok = None
    if need_model:
        cfg, params, tok = loading.load_model(args.model)[:3]
    if args.source == "pyrit":
        kept = pyrit_d_harmful(args.n, seed=args.seed)
        stats = HarvestStats(prompts=len(kept), kept=len(kept))
    else:
        judge = None
        if args.judge.lower() != "none":
            judge = load_judge(args.judge)
        srcs = args.prompt_sources.split(",") if args.prompt_sources else None
        kept, stats = harvest(params, cfg, tok, args.n, judge=judge, threshold=args.threshold,
                              max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                              temperature=args.temperature, seed=args.seed, system=args.system,
                              prompt_sources=srcs, samples=args.samples, progress=not args.no_progress)
    write_jsonl(out, kept)
    if args.soft_targets:
        save_response_mu(out, response_mu(params, cfg, tok, kept, system=args.system,
                                          progress=not args.no_progress,
                                          gelbrich_rank=args.gelbrich_rank))
    print(f"[harvest] {stats}")
    print(json.dumps({"out": str(out), "prompts": stats.prompts, "kept": stats.kept,
                      "dropped": dict(stats.dropped)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(cli_main("python -m semloss_jax.data.harvest", main))
