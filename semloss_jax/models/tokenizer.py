"""The model's own tokenizer and chat template, from a GGUF file or an HF directory.

    tok = load_tokenizer(path)                 # GGUF file or HF model directory
    tok.prompt_ids("What is 2+2?")             # chat template up to the assistant header
    tok.response_ids("4")                      # "4" + the end-of-turn token(s) of the template

The end-of-turn token is read off the chat template itself (what the template writes after an
assistant message), not from the tokenizer's `eos_token`, which GGUF conversions can get wrong:
for SmolLM2 it is `<|im_end|>` (id 2).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

from semloss_jax.errors import ModelError
from semloss_jax.paths import cache_dir

_SENTINEL = "\u2063SEMLOSS_SENTINEL\u2063"


@dataclasses.dataclass
class ChatTokenizer:
    """The model's HF tokenizer with its chat template, end-of-turn ids, pad id and end-of-turn text."""

    hf: Any                      # transformers PreTrainedTokenizerFast / TokenizersBackend
    eos_ids: tuple[int, ...]     # tokens that end an assistant turn (generation stops on any)
    pad_id: int
    eot_text: str                # text the template writes right after an assistant message's content
    source: str

    @property
    def eos_id(self) -> int:
        """The first end-of-turn id."""
        return self.eos_ids[0]

    @property
    def vocab_size(self) -> int:
        """Number of tokens, added tokens included."""
        return len(self.hf)

    def encode(self, text: str) -> list[int]:
        """Token ids of text, without special tokens added."""
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of token ids (special tokens skipped by default)."""
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        """The chat template applied to messages (roles system/user/assistant; else ModelError)."""
        for i, m in enumerate(messages):
            if m.get("role") not in ("system", "user", "assistant"):
                raise ModelError(f"message {i}: unknown role {m.get('role')!r} "
                                     "(expected system, user or assistant)")
        return self.hf.apply_chat_template(messages, tokenize=False,
                                           add_generation_prompt=add_generation_prompt)

    def prompt_messages(self, prompt: str, system: str | None = None) -> list[dict]:
        """Messages of one turn: an optional system message, then the user prompt."""
        msgs = [{"role": "system", "content": system}] if system is not None else []
        return msgs + [{"role": "user", "content": prompt}]

    def prompt_ids(self, prompt: str, system: str | None = None) -> list[int]:
        """Template tokens of [system?, user] plus the assistant header (generation prompt)."""
        return self.encode(self.render(self.prompt_messages(prompt, system), add_generation_prompt=True))

    def response_ids(self, response: str) -> list[int]:
        """The response followed by the template's end-of-turn text (up to its end-of-turn token)."""
        return self.encode(response + self.eot_text)

    def save(self, out_dir: str | Path) -> None:
        """Write the HF tokenizer files (with the chat template) to out_dir."""
        self.hf.save_pretrained(str(out_dir))


def _end_of_turn(hf) -> str:
    msgs = [{"role": "user", "content": "x"}, {"role": "assistant", "content": _SENTINEL}]
    text = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
    if _SENTINEL not in text:
        raise ModelError("the chat template does not render assistant messages")
    after = text.split(_SENTINEL, 1)[1]
    # keep the text up to and including the first special token (e.g. "<|im_end|>", "<|eot_id|>", "</s>")
    specials = sorted((t for t in hf.all_special_tokens + list(getattr(hf, "added_tokens_encoder", {}))
                       if t and t in after), key=lambda t: after.index(t))
    if specials:
        tok = specials[0]
        return after[: after.index(tok) + len(tok)]
    if hf.eos_token:
        return hf.eos_token
    raise ModelError("cannot find an end-of-turn token in the chat template or tokenizer")


def _from_hf(hf, source: str, extra_eos: Sequence[int] = ()) -> ChatTokenizer:
    if not getattr(hf, "chat_template", None):
        raise ModelError(f"{source}: the tokenizer has no chat template")
    eot = _end_of_turn(hf)
    eot_ids = list(hf.encode(eot, add_special_tokens=False))
    special = set(hf.all_special_ids) | set(getattr(hf, "added_tokens_decoder", {}))
    eos = [i for i in eot_ids if i in special][:1] or eot_ids[-1:]
    for e in list(extra_eos) + ([hf.eos_token_id] if hf.eos_token_id is not None else []):
        if e is not None and int(e) not in eos:
            eos.append(int(e))
    pad = hf.pad_token_id if hf.pad_token_id is not None else eos[0]
    return ChatTokenizer(hf=hf, eos_ids=tuple(int(e) for e in eos), pad_id=int(pad), eot_text=eot,
                         source=source)


def _gguf_tokenizer_cache(path: Path) -> Path:
    st = path.stat()
    key = hashlib.sha1(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "tokenizers" / f"{path.stem}-{key}"


def load_tokenizer(path: str | Path) -> ChatTokenizer:
    """The tokenizer + chat template of a GGUF file or an HF directory (local paths only)."""
    from transformers import AutoTokenizer

    path = Path(path)
    extra: list[int] = []
    if path.is_dir():
        if not (path / "tokenizer.json").exists() and not (path / "tokenizer_config.json").exists():
            raise ModelError(f"{path}: no tokenizer.json or tokenizer_config.json")
        hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        gen = path / "generation_config.json"
        if gen.exists():

            try:
                e = json.loads(gen.read_text()).get("eos_token_id")
            except json.JSONDecodeError as err:
                raise ModelError(f"{gen}:{err.lineno}: invalid JSON: {err.msg}") from err
            extra = e if isinstance(e, list) else ([e] if e is not None else [])
    elif path.suffix == ".gguf":
        if not path.exists():
            raise ModelError(f"{path}: GGUF file not found")
        cached = _gguf_tokenizer_cache(path)
        if not (cached / "tokenizer.json").exists():
            hf = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
            import gguf

            reader = gguf.GGUFReader(str(path))
            f = reader.fields.get("tokenizer.ggml.eos_token_id")
            if f is not None:  # the GGUF's own eos, not transformers' guess
                extra.append(int(f.contents()))
            tmp = cached.with_name(cached.name + f".tmp-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            hf.save_pretrained(str(tmp))
            (tmp / "gguf_eos.txt").write_text(" ".join(map(str, extra)))
            cached.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(cached, ignore_errors=True)
            os.replace(tmp, cached)
        hf = AutoTokenizer.from_pretrained(str(cached), local_files_only=True)
        extra = [int(x) for x in (cached / "gguf_eos.txt").read_text().split()]
    elif not path.exists():
        raise ModelError(f"{path}: no such file or directory")
    else:
        raise ModelError(f"{path}: not a GGUF file or an HF model directory")
    return _from_hf(hf, str(path), extra)
