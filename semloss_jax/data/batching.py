"""Tokenization for training: chat template, response-only loss mask, truncation, fixed-shape
batches by length bucket, optional packing.

    exs, stats = tokenize_records(records, tok, seq_len=256)       # tok: semloss_jax.models.tokenizer
    for batch in make_batches(exs, batch_size=8, seq_len=256, seed=0): ...
    for batch in pack_batches(exs, batch_size=8, seq_len=256, seed=0): ...

Every batch is a dict of numpy arrays, each [B, T] (T = a bucket length <= seq_len; always
seq_len when packing):

    input_ids   int32   tokens fed to the model (pad: tok.pad_id)
    targets     int32   the next token: the loss at position t predicts targets[t]
    loss_mask   float32 1 where targets[t] is a response token (the response text and the
                        end-of-turn token(s) of the template), 0 on prompt / template / pads
    positions   int32   position ids, restarting at 0 for each example (0 on pads)
    segment_ids int32   1..k for the k examples in a row, 0 on pads: token i may attend to token
                        j iff segment_ids[i] == segment_ids[j] != 0 and j <= i
    example_index int32 [B, T]: index into the example list (-1 on pads), for bookkeeping
    target_mu   float32 [B, T, d] (only when the examples carry `response_mu`): the soft-target
                        mean embedding mu(q) of each response target token, 0 elsewhere
    ref_logp    float32 [B, T] (only when the examples carry `response_ref`): the reference
                        model's log-probability of each response target token, 0 elsewhere

An example of prompt tokens p and response tokens r is the sequence s = p + r; it occupies
len(s) - 1 slots: input_ids = s[:-1], targets = s[1:], loss_mask = 1 on the len(r) slots whose
target is a token of r.

Truncation to seq_len slots (len(p) + len(r) <= seq_len + 1): the prompt is cut from the LEFT
(keeping the assistant header), down to max_prompt_len tokens or further if the response is
short; then the response is cut from the RIGHT. An example left with no response token is
dropped and counted in TokenizeStats; nothing is dropped silently.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from semloss_jax.data.schema import Record
from semloss_jax.errors import DataError

DEFAULT_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096)


@dataclass(frozen=True)
class Example:
    """One tokenized (prompt, response) pair. response_mu: optional [len(response_ids), d];
    response_ref: optional [len(response_ids)] reference log-probs of the response tokens."""

    id: str
    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]
    response_mu: Any = None
    response_ref: Any = None

    @property
    def n_slots(self) -> int:
        """Row slots the example fills: every token but the last is an input (the last is only a target)."""
        return len(self.prompt_ids) + len(self.response_ids) - 1


@dataclass
class TokenizeStats:
    """Counts of a tokenize_records call: records in, examples kept, truncations, drops by reason."""

    records: int = 0
    kept: int = 0
    prompt_truncated: int = 0
    response_truncated: int = 0
    dropped: Counter = field(default_factory=Counter)   # reason -> count
    dropped_ids: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        d = ", ".join(f"{k}: {v}" for k, v in sorted(self.dropped.items())) or "none"
        return (f"{self.records} records -> {self.kept} examples (prompt cut {self.prompt_truncated}, "
                f"response cut {self.response_truncated}; dropped: {d})")


def truncate(prompt_ids: Sequence[int], response_ids: Sequence[int], seq_len: int,
             max_prompt_len: int | None = None) -> tuple[list[int], list[int]]:
    """Fit p + r into seq_len slots (seq_len + 1 tokens): prompt cut from the left first
    (to at most max_prompt_len, default seq_len // 2, or more when the response is short),
    then the response from the right. The response may come back empty."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    p, r = list(prompt_ids), list(response_ids)
    budget = seq_len + 1
    if len(p) + len(r) <= budget:
        return p, r
    cap = seq_len // 2 if max_prompt_len is None else max_prompt_len
    keep_p = min(len(p), max(budget - len(r), cap), budget)
    p = p[len(p) - keep_p:] if keep_p > 0 else []
    r = r[: max(0, budget - len(p))]
    return p, r


def tokenize_records(records: Sequence[Record], tok, *, seq_len: int,
                     max_prompt_len: int | None = None, system: str | None = None,
                     response_mu: Sequence[Any] | None = None,
                     ) -> tuple[list[Example], TokenizeStats]:
    """Apply the chat template (tok.prompt_ids / tok.response_ids) and the truncation rules.

    response_mu: optional per-record arrays [n_response_tokens, d] (harvest's mu(q)), aligned
    with tok.response_ids(record.response); truncated with the response."""
    if response_mu is not None and len(response_mu) != len(records):
        raise DataError(None, None, "response_mu",
                        f"{len(response_mu)} mu(q) entries for {len(records)} records")
    stats = TokenizeStats(records=len(records))
    out: list[Example] = []
    for i, rec in enumerate(records):
        p0 = tok.prompt_ids(rec.prompt, system)
        r0 = tok.response_ids(rec.response)
        if not rec.response.strip():
            stats.dropped["empty response"] += 1
            stats.dropped_ids.append(rec.id)
            continue
        p, r = truncate(p0, r0, seq_len, max_prompt_len)
        if len(p) < len(p0):
            stats.prompt_truncated += 1
        if len(r) < len(r0):
            stats.response_truncated += 1
        if not r or not p:
            stats.dropped["no response token left after truncation" if not r
                          else "no prompt token left after truncation"] += 1
            stats.dropped_ids.append(rec.id)
            continue
        mu = None
        if response_mu is not None:
            m = np.asarray(response_mu[i])
            if m.ndim != 2 or m.shape[0] != len(r0):
                raise DataError(None, f"record {rec.id!r}", "response_mu",
                                f"shape {m.shape}, expected [{len(r0)}, d] (one row per response "
                                f"token of this tokenizer: was mu(q) harvested with another model?)")
            mu = m[: len(r)]
        out.append(Example(id=rec.id, prompt_ids=tuple(p), response_ids=tuple(r), response_mu=mu))
    stats.kept = len(out)
    return out, stats


def _mu_dim(examples: Sequence[Example]) -> int | None:
    dims = {np.asarray(e.response_mu).shape[1] for e in examples if e.response_mu is not None}
    if not dims:
        return None
    if len(dims) > 1 or any(e.response_mu is None for e in examples):
        raise ValueError("either every example carries response_mu of one width, or none does")
    return dims.pop()


def _has_ref(examples: Sequence[Example]) -> bool:
    n = sum(e.response_ref is not None for e in examples)
    if n not in (0, len(examples)):
        raise ValueError("either every example carries response_ref, or none does")
    return n > 0


def _empty(batch_size: int, T: int, pad_id: int, d: int | None, ref: bool = False) -> dict[str, np.ndarray]:
    b = {
        "input_ids": np.full((batch_size, T), pad_id, np.int32),
        "targets": np.full((batch_size, T), pad_id, np.int32),
        "loss_mask": np.zeros((batch_size, T), np.float32),
        "positions": np.zeros((batch_size, T), np.int32),
        "segment_ids": np.zeros((batch_size, T), np.int32),
        "example_index": np.full((batch_size, T), -1, np.int32),
    }
    if d is not None:
        b["target_mu"] = np.zeros((batch_size, T, d), np.float32)
    if ref:
        b["ref_logp"] = np.zeros((batch_size, T), np.float32)
    return b


def _place(b: dict[str, np.ndarray], row: int, start: int, ex: Example, seg: int, idx: int) -> int:
    s = list(ex.prompt_ids) + list(ex.response_ids)
    n = len(s) - 1
    lp = len(ex.prompt_ids)
    sl = slice(start, start + n)
    b["input_ids"][row, sl] = s[:-1]
    b["targets"][row, sl] = s[1:]
    mask = np.zeros(n, np.float32)
    mask[lp - 1:] = 1.0   # slot t predicts s[t+1]; s[t+1] is in r iff t + 1 >= lp
    b["loss_mask"][row, sl] = mask
    b["positions"][row, sl] = np.arange(n, dtype=np.int32)
    b["segment_ids"][row, sl] = seg
    b["example_index"][row, sl] = idx
    if "target_mu" in b:
        b["target_mu"][row, start + lp - 1: start + n] = np.asarray(ex.response_mu, np.float32)
    if "ref_logp" in b:
        b["ref_logp"][row, start + lp - 1: start + n] = np.asarray(ex.response_ref, np.float32)
    return start + n


def bucket_of(n: int, seq_len: int, buckets: Sequence[int] = DEFAULT_BUCKETS) -> int:
    """The smallest bucket (<= seq_len) that holds n slots, else seq_len; ValueError if n > seq_len."""
    for L in sorted(buckets):
        if n <= L <= seq_len:
            return L
    if n <= seq_len:
        return seq_len
    raise ValueError(f"example of {n} slots does not fit seq_len {seq_len}")


def make_batches(examples: Sequence[Example], *, batch_size: int, seq_len: int, pad_id: int,
                 buckets: Sequence[int] = DEFAULT_BUCKETS, seed: int | None = 0,
                 drop_last: bool = False) -> Iterator[dict[str, np.ndarray]]:
    """One example per row, rows grouped by length bucket: every batch is [batch_size, L] with L
    the bucket (<= seq_len). A last, partial batch of a bucket is filled with empty rows
    (loss_mask 0) unless drop_last. seed=None keeps the input order; otherwise the examples
    and the batch order are shuffled deterministically."""
    d, ref = _mu_dim(examples), _has_ref(examples)
    order = list(range(len(examples)))
    rng = np.random.default_rng(seed) if seed is not None else None
    if rng is not None:
        rng.shuffle(order)
    by_bucket: dict[int, list[int]] = {}
    for i in order:
        by_bucket.setdefault(bucket_of(examples[i].n_slots, seq_len, buckets), []).append(i)
    plan: list[tuple[int, list[int]]] = []
    for L, idxs in sorted(by_bucket.items()):
        for k in range(0, len(idxs), batch_size):
            chunk = idxs[k:k + batch_size]
            if len(chunk) < batch_size and drop_last:
                continue
            plan.append((L, chunk))
    if rng is not None:
        rng.shuffle(plan)  # type: ignore[arg-type]
    for L, chunk in plan:
        b = _empty(batch_size, L, pad_id, d, ref)
        for row, i in enumerate(chunk):
            _place(b, row, 0, examples[i], 1, i)
        yield b


def rows_to_batch(examples: Sequence[Example], rows: Sequence[Sequence[int]], *, batch_size: int,
                  seq_len: int, pad_id: int, mu_dim: int | None = None,
                  ref: bool | None = None) -> dict[str, np.ndarray]:
    """One [batch_size, seq_len] batch; row r holds the examples rows[r] (indices into
    `examples`) one after the other, each with its own segment id and positions from 0.

    mu_dim: the width of target_mu (soft targets); ref: whether the batch carries ref_logp
    (reference log-probs); None (either) = read off the examples placed."""
    if len(rows) > batch_size:
        raise ValueError(f"{len(rows)} rows do not fit a batch of {batch_size}")
    placed = [examples[i] for members in rows for i in members]
    if mu_dim is None:
        mu_dim = _mu_dim(placed)
    if ref is None:
        ref = _has_ref(placed)
    b = _empty(batch_size, seq_len, pad_id, mu_dim, ref)
    for row, members in enumerate(rows):
        start = 0
        for seg, i in enumerate(members, start=1):
            start = _place(b, row, start, examples[i], seg, i)
    return b


def first_fit(sizes: Sequence[int], *, n_rows: int, seq_len: int) -> tuple[list[list[int]], int]:
    """Place items of the given slot counts, IN ORDER, each into the first of n_rows rows of
    seq_len slots it fits; stop at the first item that fits no row. Returns (rows of item
    positions, number of items placed): a prefix of the items, so a stream can resume after it."""
    rows: list[list[int]] = [[] for _ in range(n_rows)]
    free = [seq_len] * n_rows
    placed = 0
    for k, n in enumerate(sizes):  # any iterable: sizes past the first misfit are never read
        if n > seq_len:
            raise ValueError(f"item {k} has {n} slots > seq_len {seq_len}")
        r = next((r for r, f in enumerate(free) if n <= f), None)
        if r is None:
            break
        rows[r].append(k)
        free[r] -= n
        placed = k + 1
    return [x for x in rows if x], placed


def pack_batches(examples: Sequence[Example], *, batch_size: int, seq_len: int, pad_id: int,
                 seed: int | None = 0) -> Iterator[dict[str, np.ndarray]]:
    """Several examples per row (first-fit decreasing into rows of seq_len slots), each with its
    own segment id and positions restarting at 0, so that with the segment mask no example
    attends to another. Every batch is [batch_size, seq_len]."""
    for e in examples:
        if e.n_slots > seq_len:
            raise ValueError(f"example {e.id!r} has {e.n_slots} slots > seq_len {seq_len}")
    order = sorted(range(len(examples)), key=lambda i: -examples[i].n_slots)
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        n = examples[i].n_slots
        for r, f in enumerate(free):
            if n <= f:
                rows[r].append(i)
                free[r] -= n
                break
        else:
            rows.append([i])
            free.append(seq_len - n)
    if seed is not None:
        np.random.default_rng(seed).shuffle(rows)  # type: ignore[arg-type]
    for k in range(0, len(rows), batch_size):
        yield rows_to_batch(examples, rows[k:k + batch_size], batch_size=batch_size,
                            seq_len=seq_len, pad_id=pad_id)


def attention_mask(segment_ids: np.ndarray) -> np.ndarray:
    """[B, T, T] boolean mask implied by segment_ids (causal, same segment, no pads)."""
    seg = np.asarray(segment_ids)
    T = seg.shape[-1]
    causal = np.tril(np.ones((T, T), bool))
    same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] != 0)
    return same & causal[None]
