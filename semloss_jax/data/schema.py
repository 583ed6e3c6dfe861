"""One record schema for every dataset (`semloss_jax.data.readers` turns files into it).

Every example the project trains or evaluates on is a `Record` (frozen dataclass):

    id        str   unique within its source ("advbench:17", "alpaca_eval:803", ...)
    prompt    str   the user turn (never empty)
    response  str   the assistant turn; "" for prompt-only data (AdvBench, HarmBench, ...)
    source    str   the source name (see semloss_jax.data.sources.SOURCES, or the name a caller gives)
    split     str   one of SPLITS: "train", "val" (validation: choose settings here), "test",
                    "eval" (eval-only data), "unsplit"
    label     str   one of LABELS (what the record is):
                      "harmful"      harmful prompt; the response, if any, complies harmfully
                      "not_harmful"  a response a human/judge rated not harmful (judge data)
                      "benign"       benign instruction; the response, if any, is a helpful answer
                      "refusal"      the response refuses / answers safely (SafeInstr, judge data)
                      "not_refusal"  the response does not refuse (refusal-judge data)
                      "overrefusal"  a benign prompt that only looks risky (must NOT be refused)
    score     float | None  a graded label where the source has one (mean human harm score in
                            [0, 1] for PyRIT scorer rows); None otherwise
    category  str   the source's own category / harm area, "" when none
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from semloss_jax.errors import ConfigError, DataError

LABELS: tuple[str, ...] = ("harmful", "not_harmful", "benign", "refusal", "not_refusal",
                           "overrefusal")
SPLITS: tuple[str, ...] = ("train", "val", "test", "eval", "unsplit")
ROLES: tuple[str, ...] = ("system", "user", "assistant")


@dataclass(frozen=True)
class Record:
    """One example in the project's schema (see the module docstring)."""

    id: str
    prompt: str
    response: str
    source: str
    split: str = "unsplit"
    label: str = "benign"
    score: float | None = None
    category: str = ""

    def __post_init__(self) -> None:
        if self.label not in LABELS:
            raise DataError(None, None, "label", f"unknown label {self.label!r} (id {self.id!r}); "
                            f"expected one of {LABELS}")
        if self.split not in SPLITS:
            raise DataError(None, None, "split", f"unknown split {self.split!r} (id {self.id!r}); "
                            f"expected one of {SPLITS}")
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise DataError(None, None, "prompt", f"empty prompt (id {self.id!r})")
        if not isinstance(self.response, str):
            got = "null" if self.response is None else type(self.response).__name__
            raise DataError(None, None, "response", f"expected a string, got {got} (id {self.id!r}); "
                            f"a record without a response has \"response\": \"\"")

    def to_dict(self) -> dict[str, Any]:
        """The record as a plain dict of its fields (one JSONL line)."""
        return asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "Record":
        """A Record from a dict holding its fields (other keys are ignored)."""
        return Record(**{k: d[k] for k in RECORD_FIELDS if k in d})


RECORD_FIELDS: tuple[str, ...] = ("id", "prompt", "response", "source", "split", "label",
                                  "score", "category")


@dataclass(frozen=True)
class FieldMap:
    """Which column of the input feeds which schema field.

    prompt / response: column names (response=None: prompt-only data, response "").
    input: an optional column appended to the prompt after a blank line (Alpaca's "input").
    messages: a chat column [{"role", "content"}, ...] used INSTEAD of prompt/response: the
      user turn becomes the prompt, the (single, last) assistant turn the response; a system
      turn is ignored; any other role is an error.
    id / label / score / category: optional columns; a missing id becomes "<source>:<row>".
    """

    prompt: str | None = "prompt"
    response: str | None = "response"
    input: str | None = None
    messages: str | None = None
    id: str | None = None
    label: str | None = None
    score: str | None = None
    category: str | None = None

    def __post_init__(self):
        if self.prompt is None and self.messages is None:
            raise ConfigError("a FieldMap needs a prompt column (prompt=) or a chat column (messages=)",
                              key="prompt")
