"""`python eval.py chat --prompt "..."`: one reply from a model (default: SmolLM2-135M-Instruct)."""
from __future__ import annotations

import argparse
import sys
import time

from .paths import default_model_path


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", required=True, action="append",
                   help="user message (repeat for a batch of independent prompts)")
    p.add_argument("--model", default=None,
                   help="GGUF file, HF directory or train.py run dir (default: the embedded SmolLM2)")
    p.add_argument("--system", default=None, help="system prompt (default: the template's own)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)


def resolve_model_path(model: str | None):
    """None -> the default model (fetched if needed); a train.py run dir -> its hf/ export."""
    from pathlib import Path

    if model is None:
        path = default_model_path()
        if not path.exists():
            from .fetch import fetch_model

            path = fetch_model()
        return path
    p = Path(model)
    if p.is_dir() and (p / "hf" / "config.json").exists():
        return p / "hf"
    return p


def run(args) -> int:
    from .generation import generate
    from .tokenizer import load_tokenizer
    from .weights import load_model

    path = resolve_model_path(args.model)
    t0 = time.perf_counter()
    cfg, params = load_model(path)
    tok = load_tokenizer(path)
    t1 = time.perf_counter()
    replies = generate(params, cfg, tok, args.prompt, max_new_tokens=args.max_new_tokens,
                       temperature=args.temperature, top_p=args.top_p, seed=args.seed, system=args.system,
                       batch_size=len(args.prompt))
    t2 = time.perf_counter()
    for prompt, reply in zip(args.prompt, replies):
        if len(args.prompt) > 1:
            print(f"> {prompt}")
        print(reply)
    print(f"[chat] {path}: load {t1 - t0:.1f}s, generate {t2 - t1:.1f}s", file=sys.stderr)
    return 0
