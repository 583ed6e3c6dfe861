"""What generation may ask of a model: prompts that fit its context, replies cut at whole characters.

    prompts, cut = fit_prompts(prompt_ids, max_new_tokens=128, context=cfg.max_position_embeddings)
    text = decode_whole_chars(tok.decode, reply_ids)

A prompt plus `max_new_tokens` longer than the model's context (`max_position_embeddings`) is
an error before anything is allocated (a 10k-token prompt would otherwise ask the KV cache and
the attention scores for tens of GB); with `truncate=True` the prompt keeps its LAST tokens
(the end of the conversation and the assistant header), and the caller is told which prompts
were cut. A reply stopped by `max_new_tokens` can end inside a multi-byte UTF-8 character
(byte-level BPE tokens hold single bytes); `decode_whole_chars` leaves such a partial
character out instead of ending the text with U+FFFD.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from semloss_jax.errors import ModelError

log = logging.getLogger(__name__)

REPLACEMENT = "\ufffd"
MAX_PARTIAL_BYTES = 3  # a UTF-8 character is at most 4 bytes: at most 3 can be left over


def fit_prompts(prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int, context: int,
                truncate: bool = False) -> tuple[list[list[int]], list[int]]:
    """(the prompts, left-truncated where allowed, and the indices of those truncated).

    ModelError when max_new_tokens < 1, when it leaves no room for a prompt, or when a prompt
    does not fit and truncate is False; the message says what to change.
    """
    if max_new_tokens < 1:
        raise ModelError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    room = int(context) - int(max_new_tokens)
    if room < 1:
        raise ModelError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the "
                         f"model's context of {context} tokens (max_position_embeddings)")
    out, cut = [], []
    for i, ids in enumerate(prompt_ids):
        if len(ids) <= room:
            out.append(list(ids))
            continue
        if not truncate:
            raise ModelError(
                f"prompt {i} has {len(ids)} tokens: with max_new_tokens={max_new_tokens} that is "
                f"{len(ids) + max_new_tokens} > the model's context of {context} tokens "
                f"(max_position_embeddings); shorten the prompt, lower max_new_tokens, or ask for "
                f"left-truncation (eval.py chat --truncate-prompt)")
        out.append(list(ids[len(ids) - room:]))
        cut.append(i)
        log.warning("prompt %d: %d tokens do not fit the context of %d with max_new_tokens=%d; "
                    "kept its last %d tokens", i, len(ids), context, max_new_tokens, room)
    return out, cut


def decode_whole_chars(decode: Callable[[Sequence[int]], str], ids: Sequence[int]) -> str:
    """decode(ids) without a trailing partial UTF-8 character: drops up to MAX_PARTIAL_BYTES
    trailing tokens while the text ends in U+FFFD and a shorter decode does not."""
    ids = list(ids)
    text = decode(ids)
    if not text.endswith(REPLACEMENT):
        return text
    for k in range(1, min(MAX_PARTIAL_BYTES, len(ids)) + 1):
        shorter = decode(ids[:len(ids) - k])
        if not shorter.endswith(REPLACEMENT):
            return shorter
    return text
