#!/usr/bin/env python
"""Rebuild the study's D_harmful of 2026-11-28 (docs/study/data/d_harmful.jsonl) on any machine.

    python experiments/study_harvest_rebuild.py --out runs/study/data/d_harmful.jsonl

The study's `data/harvest` part ran on 2026-11-28 (04:07-05:26) and kept 359 of the base model's
360 greedy replies: the refusal detector of that day dropped one. The detector was fixed later
that morning (contractions such as "I'm unable to", commit 1f9a402), so the same part run today
drops 52 replies as refusals and gives a different D_harmful, on which the sweep's models
already trained would not be reproduced. This script generates the 360 replies with the
harvest's settings (pick_prompts(360, seed 0), greedy, 256 new tokens, batches of 16), applies
the detector as it was at commit cf7840b (read with `git show`, so run it in a clone with its
history), and writes the 359 kept replies in the harvest's format.

Checked on 2026-12-06 on a fresh machine: 360 replies in 1,124 s; the old detector drops exactly
one (donotanswer:138); the 308 replies today's detector keeps are identical, text for text; and
3 training steps of TA-SFT LB λ 1 on the rebuilt file give the committed curve of
docs/study/models/tasft_lb_l1 to 6 decimals (loss, CE, harmful NLL, harmful tokens, EMD LB,
gradient norm).
"""
from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from semloss_jax.data import harvest  # noqa: E402
from semloss_jax.data.readers import write_jsonl  # noqa: E402
from semloss_jax.data.schema import Record  # noqa: E402
from semloss_jax.models import loading  # noqa: E402

sys.path.insert(0, str(REPO / "experiments"))
from study import GEN_BATCH, HARVEST  # noqa: E402  (the study's harvest settings, written once)

DETECTOR_COMMIT = "cf7840b"


def old_is_refusal():
    """judges.is_refusal as it was at DETECTOR_COMMIT."""
    src = subprocess.run(["git", "show", f"{DETECTOR_COMMIT}:semloss_jax/eval/judges.py"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / "judges_old.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("judges_old", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["judges_old"] = mod
    spec.loader.exec_module(mod)
    return mod.is_refusal


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    is_refusal = old_is_refusal()
    cfg, params, tok = loading.load_model(None)[:3]
    prompts = harvest.pick_prompts(HARVEST["n"], seed=HARVEST["seed"])
    replies = harvest.generate_responses(params, cfg, tok, [r.prompt for r in prompts],
                                         max_new_tokens=HARVEST["max_new_tokens"], batch_size=GEN_BATCH,
                                         seed=HARVEST["seed"],
                                         schedule="static")  # the decoder of the 2026-11-28 harvest
    kept = [Record(id=f"harvest:{p.id}", prompt=p.prompt, response=x.strip(), source="harvest",
                   split="train", label="harmful", score=None, category=p.source)
            for p, x in zip(prompts, replies) if x.strip() and not is_refusal(x)]
    write_jsonl(Path(args.out), kept)
    print(f"kept {len(kept)} of {len(prompts)} -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
