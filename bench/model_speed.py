#!/usr/bin/env python
"""Load time, forward time and generation tokens/s of a model (default: the embedded SmolLM2-135M).

    python bench/model_speed.py [--model PATH] [--seq 256] [--batch 4] [--new-tokens 64]

Prints one line per figure; the first call of each jitted function is reported separately as
compile (+ first run) time. Figures are medians over --reps runs.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from semloss_jax.models.generation import generate_ids
from semloss_jax.models.llama import forward
from semloss_jax.models.loading import resolve_model_path
from semloss_jax.models.tokenizer import load_tokenizer
from semloss_jax.models.weights import load_model
from semloss_jax.paths import atomic_write_text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args()


    path = resolve_model_path(args.model)
    fig = {"model": str(path), "cpu_count": os.cpu_count(), "loadavg_start": os.getloadavg()[0]}
    t = time.perf_counter()
    cfg, params = load_model(path)
    fig["load_weights_s"] = time.perf_counter() - t
    t = time.perf_counter()
    tok = load_tokenizer(path)
    fig["load_tokenizer_s"] = time.perf_counter() - t
    params = jax.device_put(params)

    fwd = jax.jit(lambda p, x: forward(p, cfg, x))
    ids = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (args.batch, args.seq)))
    t = time.perf_counter()
    fwd(params, ids).block_until_ready()
    fig["forward_compile_s"] = time.perf_counter() - t
    times = []
    for _ in range(args.reps):
        t = time.perf_counter()
        fwd(params, ids).block_until_ready()
        times.append(time.perf_counter() - t)
    fig[f"forward_{args.batch}x{args.seq}_s"] = statistics.median(times)
    fig["forward_tokens_per_s"] = args.batch * args.seq / statistics.median(times)

    prompts = [tok.prompt_ids(p) for p in ["Write a short poem about the sea.", "Explain photosynthesis.",
                                           "List three prime numbers.", "What is a GPU?",
                                           "Describe Paris in one paragraph.", "How do vaccines work?",
                                           "Give me a pasta recipe.", "What is entropy?"]]
    for bs in (1, 8):
        kw = dict(eos_ids=(-1,), pad_id=tok.pad_id, max_new_tokens=args.new_tokens, batch_size=bs,
                  schedule="static")  # fixed-length replies: nothing to refill
        t = time.perf_counter()
        generate_ids(params, cfg, prompts[:bs], **kw)
        fig[f"generate_b{bs}_first_call_s"] = time.perf_counter() - t
        times = []
        for _ in range(args.reps):
            t = time.perf_counter()
            generate_ids(params, cfg, prompts[:bs], **kw)
            times.append(time.perf_counter() - t)
        fig[f"generate_b{bs}_tokens_per_s"] = bs * args.new_tokens / statistics.median(times)
    fig["loadavg_end"] = os.getloadavg()[0]
    for k, v in fig.items():
        print(f"{k:32s} {v:.3f}" if isinstance(v, float) else f"{k:32s} {v}")
    if args.out:

        atomic_write_text(args.out, json.dumps(fig, indent=2))


if __name__ == "__main__":
    main()
