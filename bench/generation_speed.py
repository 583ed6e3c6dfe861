"""Greedy generation throughput: our batched KV-cache decoding vs transformers' generate
(targets: >= 2x at batch 8, >= 1.5x at batch 1).

Same model weights (SmolLM2-135M GGUF -> semloss_jax.models.weights.export_hf -> transformers), same
chat-templated prompts, greedy, exactly N new tokens on both sides:
  ours   semloss_jax.models.generation.generate_ids(..., eos_ids=(V,), batch_size=B,
         schedule="static"): the end id V can never be produced, so every row decodes N tokens
         (prompts left-padded to a length bucket, `generation.bucket_length`). With every reply
         N tokens long there is nothing for the refill schedule to refill:
         bench/generation_workload.py compares the schedules on replies that end on their own.
  HF     model.generate(input_ids, attention_mask, do_sample=False, max_new_tokens=N,
         min_new_tokens=N) on left-padded prompts (padded to the longest prompt of the batch)
Each contender is warmed up first (our first call includes the XLA compile, reported apart),
then both are timed interleaved over --reps; tokens/s = B * N / median seconds (prefill
included on both sides). Also reported: how many leading tokens agree (greedy parity; HF's
min_new_tokens suppresses the end-of-turn token, so rows can diverge after it).

    python bench/generation_speed.py --out bench/results/generation_speed.json
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import jax.numpy as jnp
from common import finish, interleaved, loadavg, machine, summary, write_json

from semloss_jax import paths
from semloss_jax.models import generation, weights
from semloss_jax.models.tokenizer import load_tokenizer

PROMPTS = [
    "Give three tips for staying healthy.",
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a neural network is in two sentences.",
    "List five fruits that are red.",
    "How do I boil an egg?",
    "Translate 'good morning' into Spanish.",
    "Why is the sky blue?",
]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--omp-passive", action="store_true",
                    help="OMP_WAIT_POLICY=PASSIVE for torch (see train_vs_torch.py)")
    ap.add_argument("--hf-dir", default=None)
    ap.add_argument("--model", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.omp_passive:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

    import torch
    from transformers import AutoModelForCausalLM


    torch.set_num_threads(args.threads)
    info = machine({"bench": "generation_speed", "new_tokens": args.new_tokens, "reps": args.reps,
                    "torch_threads": torch.get_num_threads(),
                    "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "")})
    print(f"machine: {info['cpu']}, {info['cores']} cores, load {info['loadavg_start']}")
    model_path = args.model or paths.default_model_path()
    cfg, params = weights.load_model(model_path)
    params = jax.tree_util.tree_map(jnp.asarray, params)
    tok = load_tokenizer(model_path)
    tmp = None
    hf_dir = args.hf_dir
    if hf_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_hf_")
        hf_dir = os.path.join(tmp.name, "smollm2_hf")
    if not os.path.exists(os.path.join(hf_dir, "model.safetensors")):
        weights.export_hf(params, cfg, hf_dir)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    N = args.new_tokens
    never = (cfg.vocab_size,)  # an id argmax over [0, V) cannot return

    results = {}
    for B in (int(b) for b in args.batches.split(",")):
        prompts = [tok.prompt_ids(p) for p in (PROMPTS * ((B + len(PROMPTS) - 1) // len(PROMPTS)))[:B]]
        L = max(len(p) for p in prompts)
        ids, att = generation.left_pad(prompts, L, tok.pad_id)  # att: 1 on tokens, 0 on padding
        t_ids, t_att = torch.as_tensor(ids, dtype=torch.int64), torch.as_tensor(att, dtype=torch.int64)

        def ours(prompts=prompts, B=B):
            return generation.generate_ids(params, cfg, prompts, eos_ids=never, pad_id=tok.pad_id,
                                           max_new_tokens=N, batch_size=B, schedule="static")

        def theirs(t_ids=t_ids, t_att=t_att, L=L):
            with torch.inference_mode():
                out = hf.generate(input_ids=t_ids, attention_mask=t_att, do_sample=False, max_new_tokens=N,
                                  min_new_tokens=N, pad_token_id=tok.pad_id)
            return out[:, L:].tolist()

        t = time.perf_counter()
        ours_out = ours()
        first_ours = time.perf_counter() - t
        t = time.perf_counter()
        hf_out = theirs()
        first_hf = time.perf_counter() - t
        assert all(len(r) == N for r in ours_out), [len(r) for r in ours_out]
        assert all(len(r) == N for r in hf_out), [len(r) for r in hf_out]
        agree = []
        for a, b in zip(ours_out, hf_out):
            n = 0
            while n < N and a[n] == b[n]:
                n += 1
            agree.append(n)
        times = interleaved({"ours": ours, "hf": theirs}, args.reps)
        s = summary(times, "hf", "ours")  # ratio = hf seconds / our seconds = our tokens/s / hf tokens/s
        s["speedup_ours_over_hf"] = s.pop("ratio")
        s["tokens_per_s"] = {k: B * N / v for k, v in s["median_s"].items()}
        s["first_call_s"] = {"ours": first_ours, "hf": first_hf}
        s["compile_s_ours"] = first_ours - s["median_s"]["ours"]
        s["prompt_len"] = {"max": L, "ours_bucket": generation.bucket_length(L)}
        s["leading_tokens_agree"] = agree
        results[f"batch{B}"] = s
        print(f"[batch {B}, {N} new tokens, prompts <= {L} tokens] "
              f"ours {s['tokens_per_s']['ours']:.1f} tok/s, "
              f"HF {s['tokens_per_s']['hf']:.1f} tok/s (medians of {args.reps}); speedup "
              f"{s['speedup_ours_over_hf']:.2f}x (median per-rep {s['ratio_median_per_rep']:.2f}x); "
              f"our compile ~{s['compile_s_ours']:.1f} s; leading tokens equal {agree}; load {loadavg()}")
    finish(info)
    print(f"load average start {info['loadavg_start']} end {info['loadavg_end']}")
    write_json(args.out, {"machine": info, "results": results})
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
