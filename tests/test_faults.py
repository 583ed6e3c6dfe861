"""Bad input and faults reach the user as one line (file, line or key, what to do), exit code 2.

Configs, data encodings, CLI options, prompts longer than the context, replies cut inside a
character, a pod config on one host. Checkpoint, lock and signal faults are in
test_checkpoint.py, test_runlock.py and test_train.py; the fetch cache in test_fetch.py.
"""
from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace as NS

import jax
import pytest

from semloss_jax.data import harvest, readers
from semloss_jax.data import streams as streams_lib
from semloss_jax.errors import ConfigError, DataError, Interrupted, ModelError, cli_main
from semloss_jax.models import context
from semloss_jax.models.generation import generate, generate_ids
from semloss_jax.models.llama import init_params, tiny_config
from semloss_jax.train import config as C

REPO = Path(__file__).resolve().parent.parent
SMOKE = REPO / "configs" / "smoke.yaml"
ENV = dict(os.environ, JAX_PLATFORMS="cpu")
RECORD = '{"id": "a", "prompt": "%s", "response": %s, "source": "s", "split": "train", "label": "benign"}\n'


def _cli(script: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, *([script] if script.endswith(".py") else ["-m", script]), *args]
    return subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)


def _one_line_error(proc: subprocess.CompletedProcess, prog: str) -> str:
    """The CLI's stderr is exactly one line `prog: error: ...` and the exit code is 2."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    return lines[0]


# ---------------------------------------------------------------------------------------------
# cli_main


def test_cli_main_one_line_exit_codes_and_debug(capsys):
    def boom(_):
        raise DataError("f.jsonl", 3, "prompt", "empty value")

    assert cli_main("prog", boom, []) == 2
    assert capsys.readouterr().err.strip().startswith("prog: error: f.jsonl:3: field 'prompt': empty value")
    with pytest.raises(DataError):
        cli_main("prog", boom, ["--debug"])

    def stopped(_):
        raise Interrupted("stopped by SIGTERM", signal.SIGTERM)

    assert cli_main("prog", stopped, []) == 128 + signal.SIGTERM

    def ctrl_c(_):
        raise KeyboardInterrupt

    assert cli_main("prog", ctrl_c, []) == 130
    assert capsys.readouterr().err.strip().endswith("interrupted (Ctrl-C)")

    def bug(_):
        raise ZeroDivisionError  # not a project error: a real bug keeps its traceback

    with pytest.raises(ZeroDivisionError):
        cli_main("prog", bug, [])


def test_cli_error_stays_one_line_when_a_failed_background_task_is_collected_later():
    """Orbax's failed write tasks are reported by asyncio ("Task exception was never retrieved",
    a traceback) when garbage collected, which can be after cli_main printed its one line."""
    script = textwrap.dedent("""
        import asyncio, gc, logging
        from semloss_jax.errors import CheckpointError, cli_main
        logging.basicConfig()
        held = []

        async def write():
            raise OSError(28, "No space left on device")

        def main(_):
            loop = asyncio.new_event_loop()
            held.append(loop.create_task(write()))
            loop.run_until_complete(asyncio.sleep(0.01))
            loop.close()
            raise CheckpointError("saving checkpoint 4 failed: no space left on device")

        rc = cli_main("train.py", main, [])
        held.clear()
        gc.collect()
        raise SystemExit(rc)
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=120)
    assert "saving checkpoint 4" in _one_line_error(proc, "train.py")


# ---------------------------------------------------------------------------------------------
# Configs


def test_config_path_that_is_a_directory_missing_or_not_utf8(tmp_path):
    with pytest.raises(ConfigError, match="is a directory"):
        C.load_config(tmp_path)
    with pytest.raises(ConfigError, match="no such config file"):
        C.load_config(tmp_path / "nope.yaml")
    p = tmp_path / "latin1.yaml"
    p.write_bytes(b"run:\n  steps: 3\n  # caf\xe9\n")
    with pytest.raises(ConfigError) as ei:
        C.load_config(p)
    assert ei.value.file == str(p) and ei.value.line == 3 and "UTF-8" in str(ei.value)


def test_empty_config_is_an_error_not_a_silent_default_run(tmp_path):
    for text in ("", "# only a comment\n"):
        p = tmp_path / "empty.yaml"
        p.write_text(text)
        with pytest.raises(ConfigError, match="empty") as ei:
            C.load_config(p)
        assert ei.value.file == str(p)
    assert C.load_config(None).run.steps == C.RunSection.steps  # programmatic defaults still work


def test_validation_names_the_key_and_where_it_was_set(tmp_path):
    # run.steps=-3 is reported as run.steps (not optim.total_steps), at the YAML line or the
    # command-line argument that set it
    p = tmp_path / "c.yaml"
    p.write_text("run:\n  steps: -3\noptim:\n  lr: 1.0e-3\n")
    e = pytest.raises(ConfigError, C.load_config, p).value
    assert (e.key, e.file, e.line) == ("run.steps", str(p), 2)
    e = pytest.raises(ConfigError, C.load_config, SMOKE, ["run.steps=-3"]).value
    assert (e.key, e.file, e.line) == ("run.steps", C.CLI, "argument 1")
    for key in ("model.arch.hidden_size", "model.arch.head_dim"):
        e = pytest.raises(ConfigError, C.load_config, SMOKE, ["run.steps=2", f"{key}=0"]).value
        assert (e.key, e.file, e.line) == (key, C.CLI, "argument 2")


def test_train_cli_config_errors_are_one_line():
    assert "is a directory" in _one_line_error(_cli("train.py", "--config", "configs"), "train.py")
    line = _one_line_error(_cli("train.py", "--config", str(SMOKE), "run.steps=-3"), "train.py")
    assert "run.steps" in line and "<command line>" in line


def test_batch_larger_than_the_data_is_reported(tmp_path):
    cfg = C.load_config(SMOKE, ["data.benign_n=3", "data.benign_batch=8"])
    from semloss_jax.train.loop import run_tokenizer  # the smoke config's (real) tokenizer
    _, stats = streams_lib.build_streams(cfg.data, cfg.objective, cfg.run.seed, run_tokenizer(cfg.model))
    assert "WARNING 3 example(s) < data.benign_batch=8" in stats["benign"]
    assert "WARNING" not in stats["harmful"]


# ---------------------------------------------------------------------------------------------
# Data files


def test_latin1_data_file_names_file_and_line(tmp_path):
    good = RECORD % ("hi", '"x"')
    bad = (RECORD % ("caf\u00e9", '"x"')).encode("latin-1")
    p = tmp_path / "d.jsonl"
    p.write_bytes(good.encode() + good.encode() + bad)
    for read in (readers.read_jsonl, lambda q: readers.read_records(q, source="s")):
        e = pytest.raises(DataError, read, p).value
        assert (e.file, e.line) == (str(p), "3") and "UTF-8" in str(e), str(e)
    c = tmp_path / "d.csv"
    c.write_bytes(b"prompt,response\nhi,x\ncaf\xe9,y\n")
    e = pytest.raises(DataError, readers.read_records, c, source="s").value
    assert (e.file, e.line) == (str(c), "3")


def test_null_response_names_file_and_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(RECORD % ("hi", '"x"') + RECORD % ("ho", "null"))
    e = pytest.raises(DataError, readers.read_jsonl, p).value
    assert (e.file, e.line, e.field) == (str(p), "2", "response") and "null" in str(e)


def test_train_cli_data_errors_are_one_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes((RECORD % ("caf\u00e9", '"x"')).encode("latin-1"))
    line = _one_line_error(_cli("train.py", "--config", str(SMOKE), f"data.benign=[{p}]",
                                f"run.output_dir={tmp_path / 'run'}"), "train.py")
    assert f"{p}:1:" in line and "UTF-8" in line
    assert not (tmp_path / "run" / "config.yaml").exists()  # nothing written before the checks


# ---------------------------------------------------------------------------------------------
# CLI options


def test_eval_cli_rejects_zero_tokens_and_batch_before_loading(tmp_path, capsys):
    ev = _load_module("eval_cli", REPO / "eval.py")
    for opt in ("--max-new-tokens", "--batch-size", "--limit"):
        assert cli_main("eval.py", ev.main, ["run", "--out", str(tmp_path / "ev"), opt, "0"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"eval.py: error: {opt} must be >= 1, got 0") and "\n" not in err
    assert not (tmp_path / "ev").exists()
    line = _one_line_error(_cli("eval.py", "chat", "--prompt", "hi", "--max-new-tokens", "0"), "eval.py")
    assert "--max-new-tokens" in line


def test_eval_cli_model_errors_are_one_line(tmp_path):
    line = _one_line_error(_cli("eval.py", "chat", "--prompt", "hi", "--model", str(tmp_path / "nope")),
                           "eval.py")
    assert str(tmp_path / "nope") in line and "no such file" in line
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    line = _one_line_error(_cli("eval.py", "chat", "--prompt", "hi", "--model", str(bad)), "eval.py")
    assert str(bad) in line


def test_harvest_out_directory_is_one_line_and_leaves_no_temporary_file(tmp_path):
    out = tmp_path / "outdir"
    out.mkdir()
    line = _one_line_error(_cli("semloss_jax.data.harvest", "--n", "2", "--source", "pyrit",
                                "--out", str(out)), "python -m semloss_jax.data.harvest")
    assert "is a directory" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outdir"] and not any(out.iterdir())
    # and the writer itself leaves nothing behind when the rename fails
    with pytest.raises(IsADirectoryError):
        readers.write_jsonl(out, [])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outdir"]
    with pytest.raises(DataError, match="--n"):
        harvest.check_args(NS(n=0, max_new_tokens=4, batch_size=1), tmp_path / "x.jsonl")


def test_pod_config_on_one_host_is_a_sharding_error():
    script = textwrap.dedent("""
        import sys
        from types import SimpleNamespace as NS
        from semloss_jax.errors import ShardingError
        from semloss_jax.train import sharding
        try:
            sharding.maybe_initialize_distributed(NS(enabled=True, coordinator_address="",
                                                     num_processes=0, process_id=-1), environ={})
        except ShardingError as e:
            print(e)
            sys.exit(3)
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "distributed.enabled=false" in proc.stdout and "coordinator_address" in proc.stdout


def test_train_cli_pod_config_on_one_host_is_one_line():
    line = _one_line_error(_cli("train.py", "--config", str(REPO / "configs" / "llama2_7b_tpu.yaml")),
                           "train.py")
    assert "distributed" in line and "coordinator_address" in line


# ---------------------------------------------------------------------------------------------
# Context length and whole characters


@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_config(vocab_size=128, max_position_embeddings=64)
    return cfg, init_params(cfg, jax.random.PRNGKey(3))


def test_fit_prompts_errors_and_left_truncation():
    ids, cut = context.fit_prompts([[1] * 10, list(range(60))], max_new_tokens=4, context=64)
    assert cut == [] and ids[1] == list(range(60))  # 60 + 4 fit in 64 ...
    with pytest.raises(ModelError, match=r"prompt 1 has 60 tokens.*65 > the model's context of 64"):
        context.fit_prompts([[1] * 10, list(range(60))], max_new_tokens=5, context=64)
    ids, cut = context.fit_prompts([[1] * 10, list(range(70))], max_new_tokens=8, context=64, truncate=True)
    assert cut == [1] and ids[1] == list(range(14, 70)) and ids[0] == [1] * 10
    with pytest.raises(ModelError, match="leaves no room"):
        context.fit_prompts([[1]], max_new_tokens=64, context=64, truncate=True)
    with pytest.raises(ModelError, match=">= 1"):
        context.fit_prompts([[1]], max_new_tokens=0, context=64)


def test_generation_checks_the_context_before_allocating(tiny):
    cfg, params = tiny
    long = list(range(3, 3 + 60))
    with pytest.raises(ModelError, match="context of 64"):
        generate_ids(params, cfg, [long], eos_ids=(0,), pad_id=1, max_new_tokens=8, batch_size=1)
    with pytest.raises(ModelError, match="batch_size"):
        generate_ids(params, cfg, [[5]], eos_ids=(0,), pad_id=1, max_new_tokens=8, batch_size=0)
    got = generate_ids(params, cfg, [long], eos_ids=(0,), pad_id=1, max_new_tokens=8, batch_size=1,
                       truncate_prompt=True)
    want = generate_ids(params, cfg, [long[-56:]], eos_ids=(0,), pad_id=1, max_new_tokens=8, batch_size=1)
    assert got == want and got[0]


def test_decode_whole_chars_never_ends_in_a_replacement_character(real_tokenizer):
    tok = real_tokenizer
    text = "ok 🌟 café 日本語 ✓"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    partial = [n for n in range(1, len(ids) + 1) if tok.decode(ids[:n]).endswith("\ufffd")]
    assert partial, "the test string must have multi-token characters"
    for n in range(len(ids) + 1):
        got = context.decode_whole_chars(tok.decode, ids[:n])
        assert "\ufffd" not in got and text.startswith(got), (n, got)
    assert context.decode_whole_chars(tok.decode, ids) == text


@pytest.mark.real_model
def test_chat_reply_cut_mid_character_has_no_replacement_character(real_model, real_tokenizer):
    cfg, params = real_model
    prompt = "Write three emojis that show happiness."
    ids = generate_ids(params, cfg, [real_tokenizer.prompt_ids(prompt)], eos_ids=real_tokenizer.eos_ids,
                       pad_id=real_tokenizer.pad_id, max_new_tokens=12, batch_size=1)[0]
    cuts = [n for n in range(1, len(ids) + 1) if real_tokenizer.decode(ids[:n]).endswith("\ufffd")]
    assert cuts, real_tokenizer.decode(ids)  # the greedy reply has multi-token characters
    for n in cuts[:3]:
        reply = generate(params, cfg, real_tokenizer, [prompt], max_new_tokens=n, batch_size=1)[0]
        assert "\ufffd" not in reply and real_tokenizer.decode(ids).startswith(reply), (n, reply)


@pytest.mark.real_model
def test_chat_cli_oversize_prompt_is_one_line_not_an_oom():
    proc = _cli("eval.py", "chat", "--prompt", "word " * 10500)
    line = _one_line_error(proc, "eval.py")
    assert "context of 8192" in line and "--truncate-prompt" in line


def _load_module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---------------------------------------------------------------------------------------------
# Signals (the end-to-end resume after SIGTERM / SIGINT is in test_train.py)


def test_stop_signals_flag_then_second_ctrl_c_stops_at_once():
    from semloss_jax.train.interrupt import StopSignals
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with StopSignals() as stop:
        assert stop.requested() is None
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested() == signal.SIGTERM  # the process was not terminated
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # after a first signal, Ctrl-C stops at once
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested() == signal.SIGINT
