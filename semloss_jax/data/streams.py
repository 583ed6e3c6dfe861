"""Training batches as deterministic streams: which records, tokenized on first use, walked in a
seeded order whose position (epoch, index) is all the state there is.

    records = load_records(cfg.data, cfg.objective, cfg.run.seed)   # benign, harmful, harmful_mu
    streams, stats = build_streams(cfg.data, cfg.objective, cfg.run.seed, tok, records, rows=rows)
    b = streams["benign"].next_micro(grad_accum)   # [grad_accum, rows of this process, seq_len]

A checkpoint stores every stream's `position()`; `seek(position)` on resume replays exactly
the batches an uninterrupted run would have seen.

Multi-process runs: every process walks the same plan of the GLOBAL batch (which records go in
which row) but tokenizes and builds only the rows it feeds (`rows`, sharding.process_rows), so
the processes together build exactly the single-process batch. A record that tokenization drops
(no prompt or response token left after truncation) keeps its place in the order and fills its
row with padding (no loss); with packing it takes no slot. Packing plans rows from the slot
counts of the upcoming records, so there every process tokenizes the records of each global
batch (and still builds only its rows). The dpo objective's pairs are the exception: every
process tokenizes all (harmful, chosen) pairs up front, since the reference log-probs are
computed once for all of them (_pair_streams).

Data sources: named sets of the registry, schema JSONL files, and `hf:<name>`: a `datasets` hub
name, a directory written by `datasets.Dataset.save_to_disk`, or a local JSON/JSONL/CSV/Parquet
file, whose columns map onto the schema by data.benign_columns / data.harmful_columns
(readers.read_hub).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from semloss_jax.data import batching, readers, registry
from semloss_jax.data.schema import FieldMap, Record
from semloss_jax.data.splits import normalize
from semloss_jax.errors import ConfigError, DataError, TrainError

# "chosen" walks the same order as "harmful" (same seed, same number of examples): row i of
# both batches is one DPO pair.
STREAM_SEEDS = {"benign": 0, "harmful": 1, "chosen": 1}


@dataclass(frozen=True)
class DataSection:
    """What each step sees: a benign batch and (for objectives that use one) a harmful batch.

    benign: named sets of semloss_jax.data.registry.load_set (their train split), JSONL paths, or
            "hf:<name>" (a datasets hub name, a save_to_disk directory or a local data file).
    harmful: "pyrit" (PyRIT's real harmful responses), the path of a harvested D_harmful JSONL
             (semloss_jax.data.registry.load_d_harmful), or "hf:<name>".
    benign_columns / harmful_columns: for hf: sources, schema field -> column (keys of
             schema.FieldMap: prompt, response, input, messages, id, ...), e.g. Alpaca's
             {prompt: instruction, input: input, response: output}; hub_split / hub_config: the
             split and configuration read.
    safeinstr: the refusal set of the safeinstr objective (safeinstr_n of its records): with
               harmful_batch > 0 they are a second stream in the harmful batch's place (the
               benign stream stays the same as SFT's), with harmful_batch = 0 they are mixed
               into the benign data.
    chosen: for the dpo objective, a JSONL of safe replies; each harmful record is paired with
            the chosen record of the same (normalized) prompt.
    *_n: how many records to take (0 = all available; a seeded shuffle picks which);
    seq_len: slots per row (every batch is [batch, seq_len]: one compiled step);
    *_batch: rows per micro-batch (optim.grad_accum micro-batches per step);
    max_prompt_len: prompt tokens kept when truncating (0 = seq_len // 2, batching's default);
    pack: put several examples in a row (first fit, in stream order; each example keeps its own
          segment id and positions, so none attends to another): short examples then fill the
          slots a one-example-per-row batch would pad.
    """

    benign: tuple[str, ...] = ("benign",)
    benign_n: int = 0
    harmful: str = "pyrit"
    harmful_n: int = 100
    safeinstr: str = "refusals"
    safeinstr_n: int = 0
    chosen: str = ""
    seq_len: int = 256
    benign_batch: int = 4
    harmful_batch: int = 4
    shuffle: bool = True
    max_prompt_len: int = 0
    pack: bool = False
    benign_columns: dict = field(default_factory=dict)
    harmful_columns: dict = field(default_factory=dict)
    hub_split: str = "train"
    hub_config: str = ""

    def validate(self, where) -> None:
        """Check sizes and required fields; errors are built by where(field, message)."""
        if not self.benign:
            raise where("benign", "needs at least one benign dataset")
        for f in ("benign_n", "harmful_n", "safeinstr_n"):
            if getattr(self, f) < 0:
                raise where(f, f"must be >= 0, got {getattr(self, f)}")
        if self.seq_len < 2:
            raise where("seq_len", f"must be >= 2, got {self.seq_len}")
        if self.benign_batch < 1:
            raise where("benign_batch", f"must be >= 1, got {self.benign_batch}")
        if self.harmful_batch < 0:
            raise where("harmful_batch", f"must be >= 0, got {self.harmful_batch}")
        if self.max_prompt_len < 0:
            raise where("max_prompt_len", f"must be >= 0, got {self.max_prompt_len}")
        if not self.harmful:
            raise where("harmful", "must be 'pyrit', a path to a harvested D_harmful JSONL or hf:<name>")
        known = {f for f in FieldMap.__dataclass_fields__}
        for f in ("benign_columns", "harmful_columns"):
            cols = getattr(self, f)
            bad = [k for k, v in cols.items() if k not in known or not isinstance(v, str)]
            if bad:
                raise where(f, f"{bad[0]!r}: keys must be schema fields ({', '.join(sorted(known))}) "
                               f"mapped to column names")


class TrainRecords(NamedTuple):
    """The records a run trains on (before tokenization)."""

    benign: list[Record]        # benign data (+ SafeInstr refusals, kind=safeinstr, mixed)
    harmful: list[Record]       # D_harmful ([] when the objective uses none; SafeInstr's
                                # refusals for kind=safeinstr with a harmful batch)
    harmful_mu: list | None     # per harmful record, μ(q) [n_response_tokens, d] (soft targets)
    chosen: list[Record] | None = None  # dpo: the safe reply paired with each harmful record


class TokenizedRecords(Sequence):
    """Records tokenized on first use (and kept): item i is the Example of record i, or None
    when tokenization drops it; `stats` counts what was tokenized so far."""

    def __init__(self, records: Sequence[Record], tok, *, seq_len: int, max_prompt_len: int | None,
                 response_mu: Sequence | None = None):
        self.records, self.tok = list(records), tok
        self.seq_len, self.max_prompt_len = seq_len, max_prompt_len
        self.response_mu = response_mu
        self.stats = batching.TokenizeStats()
        self._done: dict[int, batching.Example | None] = {}

    def __len__(self) -> int:
        return len(self.records)

    @functools.cached_property
    def digest(self) -> str:
        """SHA-256 (16 hex digits) of the records' prompts and responses in stream order: what a
        resumed run checks its data by (a file rewritten under the same path changes it)."""
        h = hashlib.sha256()
        for r in self.records:
            h.update(json.dumps([r.prompt, r.response]).encode("utf-8"))
        return h.hexdigest()[:16]

    def __getitem__(self, i: int) -> batching.Example | None:
        if i not in self._done:
            mu = None if self.response_mu is None else [self.response_mu[i]]
            exs, st = batching.tokenize_records([self.records[i]], self.tok, seq_len=self.seq_len,
                                                max_prompt_len=self.max_prompt_len, response_mu=mu)
            for f in ("records", "kept", "prompt_truncated", "response_truncated"):
                setattr(self.stats, f, getattr(self.stats, f) + getattr(st, f))
            self.stats.dropped.update(st.dropped)
            self._done[i] = exs[0] if exs else None
        return self._done[i]


class BatchStream:
    """Fixed-shape batches [rows, seq_len] from a sequence of tokenized examples, walking a
    seeded permutation per epoch. The position (epoch, index) is all the state there is.

    pack=False: one example per row. pack=True: examples are placed, in stream order, into the
    first row with room for them (batching.first_fit) until the next one fits no row.
    rows: the rows of each [batch_size, seq_len] batch this stream builds (a multi-process run's
    share; default all). An example that is None (dropped by tokenization) leaves its row
    empty (pack=False) or takes no slot (pack=True). mu_dim: the width of target_mu (soft
    targets), None without. ref: the batches carry ref_logp (every example has response_ref).
    """

    def __init__(self, name: str, examples: Sequence[batching.Example | None], *, batch_size: int,
                 seq_len: int, pad_id: int, seed: int, shuffle: bool = True, pack: bool = False,
                 rows: slice | None = None, mu_dim: int | None = None, ref: bool = False):
        if not len(examples):
            raise DataError(None, None, f"data.{name}", "no examples to stream")
        self.name, self.examples = name, examples
        self.batch_size, self.seq_len, self.pad_id = batch_size, seq_len, pad_id
        self.seed, self.shuffle, self.pack = seed, shuffle, pack
        self.rows = rows if rows is not None else slice(0, batch_size)
        self.mu_dim, self.ref = mu_dim, ref
        self.epoch, self.index = 0, 0
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            n = len(self.examples)
            rng = np.random.default_rng([self.seed, STREAM_SEEDS.get(self.name, 7), epoch])
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}
            self._perms[epoch] = rng.permutation(n) if self.shuffle else np.arange(n)
        return self._perms[epoch]

    def _upcoming(self, n: int) -> list[int]:
        """The next n example indices of the stream (crossing epochs), without moving."""
        out, epoch, index = [], self.epoch, self.index
        while len(out) < n:
            perm = self._perm(epoch)
            take = min(n - len(out), len(perm) - index)
            out.extend(int(i) for i in perm[index:index + take])
            index += take
            if index >= len(perm):
                epoch, index = epoch + 1, 0
        return out

    def _advance(self, n: int) -> None:
        for _ in range(n):
            self.index += 1
            if self.index >= len(self.examples):
                self.epoch, self.index = self.epoch + 1, 0

    def _slots(self, i: int) -> int:
        ex = self.examples[i]
        return 0 if ex is None else ex.n_slots

    def next_batch(self) -> dict[str, np.ndarray]:
        """This stream's rows of the next [batch_size, seq_len] batch, continuing into the next
        epoch as needed."""
        if self.pack:  # at most batch_size * seq_len examples fit (one slot each at least)
            ahead = self._upcoming(min(self.batch_size * self.seq_len, 4 * len(self.examples)))
            rows, used = batching.first_fit((self._slots(i) for i in ahead), n_rows=self.batch_size,
                                            seq_len=self.seq_len)
            rows = [[ahead[k] for k in row] for row in rows]
        else:
            used = self.batch_size
            rows = [[i] for i in self._upcoming(used)]
        rows = rows + [[]] * (self.batch_size - len(rows))
        mine = [[i for i in row if self.examples[i] is not None] for row in rows[self.rows]]
        b = batching.rows_to_batch(self.examples, mine, batch_size=len(mine), seq_len=self.seq_len,
                                   pad_id=self.pad_id, mu_dim=self.mu_dim, ref=self.ref)
        self._advance(used)
        b.pop("example_index", None)
        return b

    def next_micro(self, n: int) -> dict[str, np.ndarray]:
        """The next n batches stacked: [n, batch_size, seq_len]."""
        bs = [self.next_batch() for _ in range(n)]
        return {k: np.stack([b[k] for b in bs]) for k in bs[0]}

    def position(self) -> dict:
        """The stream's resumable state: epoch, index, the number of examples and (records
        streams) the digest of their content."""
        pos = {"epoch": self.epoch, "index": self.index, "examples": len(self.examples)}
        digest = getattr(self.examples, "digest", None)
        return pos if digest is None else dict(pos, digest=digest)

    def seek(self, pos: Mapping[str, int | str]) -> None:
        """Resume at a saved position; TrainError if the number of examples or their content
        has changed (checkpoints written before the digest existed are checked by count only)."""
        if int(pos.get("examples", len(self.examples))) != len(self.examples):
            raise TrainError(f"stream {self.name!r}: the checkpoint was made with {pos['examples']} "
                             f"examples, the data now has {len(self.examples)}: cannot resume exactly")
        have = getattr(self.examples, "digest", None)
        if pos.get("digest") and have and pos["digest"] != have:
            raise TrainError(f"stream {self.name!r}: the checkpoint was made on other records (content "
                             f"digest {pos['digest']}, now {have}; same count): a data file was rewritten "
                             f"or the sampling changed, so this is not the run that wrote it; start a new "
                             f"run.output_dir, or delete its checkpoints to start over")
        self.epoch, self.index = int(pos["epoch"]), int(pos["index"])


def _take_idx(n_all: int, n: int, seed: int, salt: int, key: str) -> list[int]:
    """A seeded choice of n of n_all indices (all for n = 0); asking for more than there are is
    a ConfigError naming the key (a run would otherwise say N and train on fewer)."""
    if n > n_all:
        raise ConfigError(f"asks for {n} records but the data has {n_all} (0 takes all)", key=key)
    if n <= 0 or n == n_all:
        return list(range(n_all))
    return sorted(int(i) for i in np.random.default_rng([seed, salt]).permutation(n_all)[:n])


def _take(records: list, n: int, seed: int, salt: int, key: str) -> list:
    return [records[i] for i in _take_idx(len(records), n, seed, salt, key)]


def _load_hub(d: DataSection, name: str, part: str) -> list[Record]:
    """Records of an hf:<name> source, its columns mapped by data.<part>_columns."""
    cols = getattr(d, f"{part}_columns")
    recs, _ = readers.read_hub(name, split=d.hub_split, config=d.hub_config or None,
                               fields=FieldMap(**cols) if cols else readers.DEFAULT_FIELDS,
                               label=part, require_response=True)
    return recs


def _load_named(d: DataSection, name: str):
    if name.startswith("hf:"):
        return _load_hub(d, name[3:], "benign")
    p = Path(name).expanduser()
    if name.endswith((".jsonl", ".json")) or p.exists():
        recs, _ = readers.read_jsonl(p)
        return recs
    return registry.load_set(name, "train")


def load_records(d: DataSection, objective, seed: int) -> TrainRecords:
    """The benign and harmful records (and soft targets' μ(q) arrays), sized by the data
    section; `objective` (an ObjectiveConfig) says whether SafeInstr refusals join the benign
    data and whether targets are soft. Soft targets read the μ(q) files that
    `python -m semloss_jax.data.harvest --soft-targets` writes beside the harvested JSONL."""
    benign = [r for name in d.benign for r in _load_named(d, name)]
    benign = _take(benign, d.benign_n, seed, 11, "data.benign_n")
    harmful, mu = [], None
    if objective.kind == "safeinstr":  # the refusals: a second stream, or mixed into the benign data
        refusals = _take(_load_named(d, d.safeinstr), d.safeinstr_n, seed, 13, "data.safeinstr_n")
        if d.harmful_batch > 0:
            return TrainRecords(benign, refusals, None, None)
        return TrainRecords(benign + refusals, [], None, None)
    if d.harmful_batch > 0:
        every = (_load_hub(d, d.harmful[3:], "harmful") if d.harmful.startswith("hf:")
                 else registry.load_d_harmful(d.harmful))
        idx = _take_idx(len(every), d.harmful_n, seed, 17, "data.harmful_n")
        harmful = [every[i] for i in idx]
        if objective.target == "soft":
            if d.harmful == "pyrit" or d.harmful.startswith("hf:"):
                raise ConfigError("objective.target=soft needs a harvested JSONL with μ(q) files "
                                  "(python -m semloss_jax.data.harvest --soft-targets), not "
                                  f"{d.harmful!r}", key="data.harmful")
            try:
                all_mu = readers.load_response_mu(d.harmful)
            except FileNotFoundError as e:
                raise DataError(d.harmful, None, None, f"objective.target=soft: no μ(q) beside "
                                f"this file ({e}); harvest with --soft-targets") from None
            mu = [all_mu[i] for i in idx]
    chosen = pair_chosen(d.chosen, harmful) if objective.kind == "dpo" else None
    return TrainRecords(benign, harmful, mu, chosen)


def pair_chosen(path: str, harmful: Sequence[Record]) -> list[Record]:
    """For each harmful record, the record of `path` (a JSONL of safe replies) with the same
    normalized prompt; a DataError names the file and the first harmful record without one."""
    if not path:
        raise ConfigError("objective.kind=dpo needs data.chosen: a JSONL of safe replies to the "
                          "harmful prompts (python experiments/study.py writes one)", key="data.chosen")
    recs, _ = readers.read_jsonl(Path(path).expanduser())
    by_prompt = {normalize(r.prompt): r for r in recs if r.response.strip()}
    out = []
    for h in harmful:
        c = by_prompt.get(normalize(h.prompt))
        if c is None:
            raise DataError(path, None, "prompt", f"no safe reply for the prompt of harmful record "
                            f"{h.id!r} ({h.prompt[:60]!r}); add one or drop that record")
        out.append(c)
    return out


def build_streams(d: DataSection, objective, seed: int, tok, records: TrainRecords | None = None, *,
                  rows: Mapping[str, slice] | None = None, reference=None
                  ) -> tuple[dict[str, BatchStream], dict[str, str]]:
    """One BatchStream per part ("benign", and "harmful" when its batch is > 0; for dpo also
    "chosen", aligned row by row with "harmful"), tokenized with the chat template on first use
    (dpo pairs all at once, see _pair_streams); rows: each part's rows of the global batch that
    this process builds (default all; "chosen" builds the rows of "harmful"). reference: for dpo,
    a function examples -> examples with `response_ref` set
    (semloss_jax.data.reference.with_reference_logprobs). Also a line per part saying what it
    holds (with a warning when a part has fewer records than its batch has rows, so that every
    batch repeats some)."""
    records = load_records(d, objective, seed) if records is None else records
    streams, stats = {}, {}
    mpl = d.max_prompt_len or None
    for name, bsz in (("benign", d.benign_batch), ("harmful", d.harmful_batch)):
        recs = getattr(records, name)
        mu = records.harmful_mu if name == "harmful" else None
        keep = [i for i, r in enumerate(recs) if r.response.strip()]   # batching drops empty responses
        if bsz <= 0 or not keep:
            if name == "benign" or (bsz > 0 and objective.uses_harmful):
                raise DataError(None, None, f"data.{name}", f"no records in {getattr(d, name)!r}")
            continue
        exs = TokenizedRecords([recs[i] for i in keep], tok, seq_len=d.seq_len, max_prompt_len=mpl,
                               response_mu=None if mu is None else [mu[i] for i in keep])
        mine = (rows or {}).get(name, slice(0, bsz))
        mu_dim = None if mu is None else int(np.asarray(mu[keep[0]]).shape[1])
        if name == "harmful" and records.chosen is not None:
            streams.update(_pair_streams(records, keep, exs, tok, d, seed, mine, mu_dim, reference, stats))
            continue
        stats[name] = (f"{len(recs)} records ({len(recs) - len(keep)} with an empty response left out), "
                       f"tokenized on first use; this process builds rows {mine.start}..{mine.stop - 1} "
                       f"of {bsz}")
        if len(keep) < bsz:
            stats[name] += (f"; WARNING {len(keep)} example(s) < data.{name}_batch={bsz}: every batch "
                            f"repeats examples (add data or lower data.{name}_batch)")
        streams[name] = BatchStream(name, exs, batch_size=bsz, seq_len=d.seq_len, pad_id=tok.pad_id,
                                    seed=seed, shuffle=d.shuffle, pack=d.pack, rows=mine, mu_dim=mu_dim)
    return streams, stats


def _pair_streams(records: TrainRecords, keep: list[int], harmful_exs: TokenizedRecords, tok,
                  d: DataSection, seed: int, mine: slice, mu_dim: int | None, reference,
                  stats: dict[str, str]) -> dict[str, BatchStream]:
    """The "harmful" (rejected) and "chosen" streams of dpo: equal-length example lists (a pair is
    dropped when either side was dropped by truncation), both with reference log-probs, walked in
    the same order (same seed), never packed. Every pair is tokenized and scored by the reference
    here, once (in every process: each builds its rows of both batches). Fills stats."""
    if reference is None:
        raise TrainError("dpo needs a reference model to precompute log-probs (build_streams(reference=...))")
    chosen_recs = [dataclasses.replace(records.chosen[i], id=f"{records.harmful[i].id}|chosen") for i in keep]
    chosen_exs = TokenizedRecords(chosen_recs, tok, seq_len=d.seq_len,
                                  max_prompt_len=d.max_prompt_len or None)
    pairs = [(harmful_exs[k], chosen_exs[k]) for k in range(len(keep))]
    pairs = [(h, c) for h, c in pairs if h is not None and c is not None]
    if not pairs:
        raise DataError(d.chosen, None, "response", "no (harmful, chosen) pair survived tokenization")
    bsz = d.harmful_batch
    stats["harmful"] = f"{harmful_exs.stats}; this process builds rows {mine.start}..{mine.stop - 1} of {bsz}"
    stats["chosen"] = f"{chosen_exs.stats}; {len(pairs)} pairs"
    if len(pairs) < bsz:
        stats["chosen"] += (f"; WARNING {len(pairs)} pair(s) < data.harmful_batch={bsz}: every batch "
                            f"repeats pairs (add data or lower data.harmful_batch)")
    out = {}
    for name, side, dim in (("harmful", 0, mu_dim), ("chosen", 1, None)):
        out[name] = BatchStream(name, reference([p[side] for p in pairs]), batch_size=bsz, seq_len=d.seq_len,
                                pad_id=tok.pad_id, seed=seed, shuffle=d.shuffle, pack=False, rows=mine,
                                mu_dim=dim, ref=True)
    return out
