"""Reference-model log-probabilities of training examples (DPO's π_ref), computed once.

    exs = with_reference_logprobs(params, cfg, exs, pad_id=tok.pad_id)

DPO compares the policy's log-probability of a reply with the frozen initial model's. That
reference term does not change during training, so it is computed here once per example (one
forward of the initial params, no gradient) and carried by the example (`response_ref`), which
batching writes into the batch as `ref_logp` [B, T]. The alternative, a frozen copy of the
params forwarded inside every step, would cost a forward of every pair at every step (steps x
batch pairs instead of N pairs once) and, for full or last-K training, a second copy of the
weights in memory.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from semloss_jax.data.batching import Example, make_batches
from semloss_jax.loss.objective import token_logprob
from semloss_jax.models.llama import LlamaConfig, forward


def with_reference_logprobs(params, cfg: LlamaConfig, examples: Sequence[Example], *, pad_id: int,
                            batch_size: int = 4) -> list[Example]:
    """The examples with `response_ref` set: log p_ref(r_j | prompt, r_<j) for each response
    token r_j under `params` (float32 [len(response_ids)])."""
    if not examples:
        return []
    seq_len = max(e.n_slots for e in examples)

    @jax.jit
    def logp(p, ids, targets, mask, pos, seg):
        logits = forward(p, cfg, ids, positions=pos, segment_ids=seg)
        return token_logprob(logits, targets, (mask != 0) & (seg != 0))

    out: list[np.ndarray | None] = [None] * len(examples)
    for b in make_batches(examples, batch_size=batch_size, seq_len=seq_len, pad_id=pad_id, seed=None):
        lp = np.asarray(logp(params, *(jnp.asarray(b[k]) for k in ("input_ids", "targets", "loss_mask",
                                                                     "positions", "segment_ids"))))
        for row in range(lp.shape[0]):
            on = b["loss_mask"][row] > 0
            if on.any():
                out[int(b["example_index"][row][on][0])] = lp[row][on].astype(np.float32)
    missing = [examples[i].id for i, v in enumerate(out) if v is None]
    if missing:
        raise AssertionError(f"no reference log-probs for {len(missing)} examples, e.g. {missing[0]!r}")
    return [dataclasses.replace(e, response_ref=r) for e, r in zip(examples, out)]
