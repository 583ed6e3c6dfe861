"""`python eval.py chat --prompt "..."`: one reply from a model (default: SmolLM2-135M-Instruct)."""
from __future__ import annotations

import argparse
import sys
import time

from semloss_jax.errors import EvalError
from semloss_jax.models import loading
from semloss_jax.models.generation import generate


def add_args(p: argparse.ArgumentParser) -> None:
    """The options of `eval.py chat`."""
    p.add_argument("--prompt", required=True, action="append",
                   help="user message (repeat for a batch of independent prompts)")
    p.add_argument("--model", default=None,
                   help="GGUF file, HF directory or train.py run dir (default: the embedded SmolLM2)")
    p.add_argument("--system", default=None, help="system prompt (default: the template's own)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--truncate-prompt", action="store_true",
                   help="keep the last tokens of a prompt too long for the model's context "
                        "(default: an error)")


def run(args) -> int:
    """Load the model, print one reply per --prompt (and the load/generate times on stderr); return 0."""
    if args.max_new_tokens < 1:
        raise EvalError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise EvalError(f"--temperature must be >= 0 and --top-p in (0, 1], got "
                        f"{args.temperature} and {args.top_p}")
    t0 = time.perf_counter()
    m = loading.load_model(args.model)
    t1 = time.perf_counter()
    replies = generate(m.params, m.cfg, m.tok, args.prompt, max_new_tokens=args.max_new_tokens,
                       temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                       system=args.system, batch_size=len(args.prompt),
                       truncate_prompt=args.truncate_prompt)
    t2 = time.perf_counter()
    for prompt, reply in zip(args.prompt, replies):
        if len(args.prompt) > 1:
            print(f"> {prompt}")
        print(reply)
    print(f"[chat] {m.path}: load {t1 - t0:.1f}s, generate {t2 - t1:.1f}s", file=sys.stderr)
    return 0
