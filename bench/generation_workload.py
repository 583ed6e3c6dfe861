"""Answering a set of real prompts: the refill schedule vs static batches vs transformers.

The evaluation workload of eval.py and the study: K harmful VALIDATION prompts (the
`harmful_prompts` set, val split, in registry order), chat-templated, greedy, at most N new
tokens, each reply ending at its end-of-turn token, batch B. Replies end at very different
lengths (a refusal after 10 tokens, a list cut at N), so static batches leave rows idle until
the longest reply of the batch ends; the refill schedule admits the next prompt into a row as
soon as its reply ends. Contenders, timed interleaved over --reps in one process:
  refill  generation.generate_ids(..., schedule="refill") (eval.py's default)
  static  generation.generate_ids(..., schedule="static") (fixed batches of B)
  hf      transformers' generate on the same batches of B (left-padded, greedy, stops a batch
          when every row has produced an end-of-turn token), unless --no-hf
  refill_stacked  with --stacked: the refill schedule as it was before 2026-12-07 (the layer
          scan over the stacked params and cache, every prompt in one pass whose cache the
          longest prompt sizes), against today's split layers and cache groups
          (`generation.split_layers_for`, `generation.slot_groups`)
Reported: seconds per set, prompts/s, reply tokens/s (tokens before the end-of-turn token),
the speedups, and how many replies are identical between contenders (greedy parity).

    python bench/generation_workload.py --prompts 64 --omp-passive \
        --out bench/results/generation_workload.json
    python bench/generation_workload.py --set benign --prompts 122 --no-hf --no-static --stacked \
        --out bench/results/generation_layout_benign.json
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
from common import finish, interleaved, loadavg, machine, summary, write_json

from semloss_jax import paths
from semloss_jax.data import registry
from semloss_jax.models import generation, weights
from semloss_jax.models.tokenizer import load_tokenizer


def hf_generate(hf, tok, prompts: list[list[int]], *, batch: int, new_tokens: int) -> list[list[int]]:
    """Greedy replies of transformers' generate over static batches; each reply cut before its first
    end-of-turn token (HF pads finished rows with the pad id)."""
    import torch

    out: list[list[int]] = []
    for s in range(0, len(prompts), batch):
        chunk = prompts[s:s + batch]
        L = max(len(p) for p in chunk)
        ids, att = generation.left_pad(chunk, L, tok.pad_id)  # att: 1 on tokens, 0 on padding
        with torch.inference_mode():
            gen = hf.generate(input_ids=torch.as_tensor(ids, dtype=torch.int64),
                              attention_mask=torch.as_tensor(att, dtype=torch.int64),
                              do_sample=False, max_new_tokens=new_tokens, pad_token_id=tok.pad_id,
                              eos_token_id=list(tok.eos_ids))
        for row in gen[:, L:].tolist():
            cut = next((i for i, t in enumerate(row) if t in tok.eos_ids), len(row))
            out.append(row[:cut])
    return out


@contextlib.contextmanager
def stacked_one_pass():
    """Generation as it was before 2026-12-07: the layer scan over the stacked params and
    cache, and one refill pass for every prompt (its cache sized by the longest prompt)."""
    saved = generation.split_layers_for, generation.slot_groups
    generation.split_layers_for = lambda backend: False
    generation.slot_groups = lambda lengths, batch_size: [list(range(len(lengths)))]
    try:
        yield
    finally:
        generation.split_layers_for, generation.slot_groups = saved


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=64, help="K validation prompts")
    ap.add_argument("--set", default="harmful_prompts", help="the prompt set (its val split)")
    ap.add_argument("--no-static", action="store_true", help="leave the static schedule out")
    ap.add_argument("--stacked", action="store_true",
                    help="add refill_stacked: the stacked layers in one pass (before 2026-12-07)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--model", default=None, help="weights (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--no-hf", action="store_true", help="leave transformers out")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--omp-passive", action="store_true",
                    help="OMP_WAIT_POLICY=PASSIVE for torch (see train_vs_torch.py)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.omp_passive:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    info = machine({"bench": "generation_workload", "set": args.set, "prompts": args.prompts,
                    "batch": args.batch, "new_tokens": args.new_tokens, "reps": args.reps})
    print(f"machine: {info['cpu']}, {info['cores']} cores, load {info['loadavg_start']}")
    model_path = args.model or paths.default_model_path()
    cfg, params = weights.load_model(model_path)
    params = jax.tree_util.tree_map(jnp.asarray, params)
    tok = load_tokenizer(model_path)
    prompts = [tok.prompt_ids(r.prompt) for r in registry.load_set(args.set, "val")[:args.prompts]]
    B, N = args.batch, args.new_tokens

    def ours(schedule):
        return lambda: generation.generate_ids(params, cfg, prompts, eos_ids=tok.eos_ids, pad_id=tok.pad_id,
                                               max_new_tokens=N, batch_size=B, schedule=schedule)

    def stacked():
        with stacked_one_pass():
            return ours("refill")()

    fns = {"refill": ours("refill")}
    if not args.no_static:
        fns["static"] = ours("static")
    if args.stacked:
        fns["refill_stacked"] = stacked
    tmp = None
    if not args.no_hf:
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(args.threads)
        tmp = tempfile.TemporaryDirectory(prefix="bench_hf_")
        hf_dir = os.path.join(tmp.name, "hf")
        weights.export_hf(params, cfg, hf_dir)
        hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        fns["hf"] = lambda: hf_generate(hf, tok, prompts, batch=B, new_tokens=N)
    outs, first = {}, {}
    for name, fn in fns.items():  # warm up (our compiles), keep the replies for the parity check
        t = time.perf_counter()
        outs[name] = fn()
        first[name] = time.perf_counter() - t
    times = interleaved(fns, args.reps)
    n_tok = sum(len(r) for r in outs["refill"])
    res = {"first_call_s": first, "reply_tokens": n_tok,
           "replies_identical": {f"refill=={k}": sum(a == b for a, b in zip(outs["refill"], outs[k]))
                                 for k in outs if k != "refill"},
           }
    if "static" in fns:
        res["refill_vs_static"] = summary(times, "static", "refill")
    if "refill_stacked" in fns:
        res["refill_vs_refill_stacked"] = summary(times, "refill_stacked", "refill")
    if "hf" in fns:
        res["refill_vs_hf"] = summary(times, "hf", "refill")
        if "static" in fns:
            res["static_vs_hf"] = summary(times, "hf", "static")
    med = {k: statistics.median(v) for k, v in times.items()}
    res["prompts_per_s"] = {k: len(prompts) / v for k, v in med.items()}
    res["reply_tokens_per_s"] = {k: n_tok / v for k, v in med.items()}
    ratios = [f"{key.replace('_vs_', ' over ').replace('_', ' ')} {r['ratio']:.2f}x "
              f"(per-rep {r['ratio_median_per_rep']:.2f}x)" for key, r in res.items() if "_vs_" in key]
    print(f"[{args.set} val, {len(prompts)} prompts, batch {B}, <= {N} new tokens, {n_tok} reply "
          f"tokens] " + ", ".join(f"{k} {v:.1f} s" for k, v in med.items()) + "; " + ", ".join(ratios) +
          f"; identical replies {res['replies_identical']} of {len(prompts)}; load {loadavg()}")
    finish(info)
    write_json(args.out, {"machine": info, "results": res})
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
