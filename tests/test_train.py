"""train.py end to end on configs/smoke.yaml: run directory, metrics, one compilation,
exact resume after SIGKILL, NaN stop, CLI errors."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import jax
import numpy as np
import pytest

from semloss_jax.data import batching, readers, registry
from semloss_jax.data import streams as streams_lib
from semloss_jax.data.schema import Record
from semloss_jax.errors import ConfigError, NonFiniteLoss, TrainError
from semloss_jax.loss import cost
from semloss_jax.models import llama as M
from semloss_jax.models import weights
from semloss_jax.train import checkpoint as CK
from semloss_jax.train import config as C
from semloss_jax.train import loop as train_loop
from semloss_jax.train import sharding
from semloss_jax.train import state as state_lib

REPO = Path(__file__).resolve().parent.parent
SMOKE = REPO / "configs" / "smoke.yaml"
# one persistent XLA cache per test session: the runs after the first load the compiled step
_JCC = tempfile.mkdtemp(prefix="semloss_jcc_")
ENV = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", JAX_COMPILATION_CACHE_DIR=_JCC)
REQUIRED = ("step", "loss", "ce", "emd_lower", "emd_upper", "tokens_per_s")


def _train(args, timeout=600, **kw):
    return subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=timeout, **kw)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("smoke") / "run"
    proc = _train(["--config", str(SMOKE), f"output_dir={run}", "--quiet"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return run, proc


def test_smoke_run_directory(smoke_run):
    run, proc = smoke_run
    cfg = C.load_config(run / "config.yaml")
    assert cfg == C.load_config(SMOKE, [f"output_dir={run}", "run.progress=false"])
    rows = _metrics(run)
    assert [r["step"] for r in rows] == list(range(1, cfg.run.steps + 1))
    for r in rows:
        for k in REQUIRED:
            assert k in r and r[k] is not None, k
        assert 0.0 <= r["emd_lower"] <= r["emd_upper"] <= 2.0
        assert r["tokens_per_s"] > 0 and r["flops_per_step"] > 0
    assert rows[-1]["loss"] < rows[0]["loss"]  # it trains
    # Orbax: every 2 steps, keep the last 2
    steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [4, 6]
    hf = run / "hf"
    assert (hf / "config.json").exists() and (hf / "model.safetensors").exists()
    assert json.loads((hf / "config.json").read_text())["vocab_size"] == 49152
    assert list((run / "tb").glob("events.out.tfevents.*"))
    out = proc.stdout
    assert str(run / "metrics.jsonl") in out and str(run / "checkpoints") in out and str(hf) in out
    assert "model FLOPs per step" in out and "tokens/s" in out and "MFU n/a" in out


def test_step_compiles_once(smoke_run):
    _, proc = smoke_run
    assert "step compiled 1 time(s)" in proc.stdout


def test_exported_model_equals_final_checkpoint(smoke_run):
    """hf/ reloads (weights.load_model) to exactly the params of the last checkpoint."""
    run, _ = smoke_run
    cfg = C.load_config(run / "config.yaml")
    mcfg, exported = weights.load_model(run / "hf")
    assert (mcfg.num_hidden_layers, mcfg.hidden_size, mcfg.vocab_size) == (2, 64, 49152)
    plan = state_lib.plan_state(state_lib.model_config_of(cfg.model), cfg.optim,
                                sharding.make_mesh(C.MeshSection(1, 1, 1)))
    ck = CK.Checkpointer(run / "checkpoints", every=2, keep_last=2)
    saved, meta = ck.restore(plan.abstract_state)
    ck.close()
    assert meta["step"] == cfg.run.steps
    a = jax.tree_util.tree_leaves_with_path(saved["params"])
    b = dict(jax.tree_util.tree_leaves_with_path(exported))
    assert len(a) == len(b)
    for path, x in a:
        np.testing.assert_array_equal(np.asarray(x), np.asarray(b[path]), err_msg=str(path))


@pytest.mark.slow
def test_sigkill_then_resume_logs_the_same_losses(smoke_run, tmp_path):
    ref_run, _ = smoke_run
    ref = {r["step"]: r["loss"] for r in _metrics(ref_run)}
    run = tmp_path / "run"
    args = ["--config", str(SMOKE), f"output_dir={run}", "--quiet"]
    child = subprocess.Popen([sys.executable, str(REPO / "train.py"), *args], cwd=REPO, env=ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ck2 = run / "checkpoints" / "2"
    deadline = time.time() + 600
    while not ck2.is_dir() and child.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.kill(child.pid, signal.SIGKILL)   # right after the first checkpoint is finalized
    child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL, child.stdout.read()[-3000:]
    killed_at = len(_metrics(run))
    assert 2 <= killed_at < 6, killed_at
    proc = _train(args + ["--resume"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "resume: restored step" in proc.stdout
    got = {r["step"]: r["loss"] for r in _metrics(run)}
    assert sorted(got) == sorted(ref)
    for s in ref:
        assert got[s] == pytest.approx(ref[s], rel=1e-6, abs=0), (s, got[s], ref[s])


def test_rerun_of_a_finished_run_is_a_no_op_and_other_configs_are_refused(smoke_run):
    run, _ = smoke_run
    before = (run / "metrics.jsonl").read_text()
    proc = _train(["--config", str(SMOKE), f"output_dir={run}", "--quiet"])
    assert proc.returncode == 0 and "nothing to do" in proc.stdout, proc.stderr[-3000:]
    assert (run / "metrics.jsonl").read_text() == before
    proc = _train(["--config", str(SMOKE), f"output_dir={run}", "--quiet", "objective.lam=0.1"])
    assert proc.returncode == 2 and "--resume" in proc.stderr


def test_cli_config_error_names_key(tmp_path):
    proc = _train(["--config", str(SMOKE), f"output_dir={tmp_path}", "objective.lamda=0.5"], timeout=120)
    assert proc.returncode == 2
    assert "objective.lamda" in proc.stderr and "<command line>" in proc.stderr


def test_safeinstr_refusal_stream_trains_on_ce_plus_lambda_refusal_nll(tmp_path):
    """kind=safeinstr with a harmful batch: the refusal rows are a second stream whose mean NLL
    enters the loss with weight λ (logged as harm_nll)."""
    cfg = C.load_config(SMOKE, [f"output_dir={tmp_path}", "objective.kind=safeinstr", "objective.lam=0.7",
                                "data.safeinstr_n=16", "run.steps=2", "run.progress=false",
                                "run.tensorboard=false", "run.async_checkpoint=false"])
    train_loop.train(cfg, echo=lambda s: None)
    rows = _metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["harm_tokens"] > 0 and r["harm_nll"] > 0
        assert r["loss"] == pytest.approx(r["ce"] + 0.7 * r["harm_nll"], rel=1e-5)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    cfg = C.load_config(SMOKE, [f"output_dir={tmp_path}", "optim.lr=1e30", "optim.clip_norm=null",
                                "run.checkpoint_every=1", "run.steps=6", "run.progress=false",
                                "run.tensorboard=false", "run.async_checkpoint=false"])
    with pytest.raises(NonFiniteLoss) as ei:
        train_loop.train(cfg, echo=lambda s: None)
    msg = str(ei.value)
    assert "non-finite" in msg and "last good checkpoint" in msg
    bad_step = int(re.search(r"(?:at|after) step (\d+)", msg).group(1))
    assert bad_step < 6
    rows = _metrics(tmp_path)
    assert rows[-1]["step"] == bad_step
    if "stopped" in rows[-1]:  # a non-finite loss is logged with the reason
        assert not math.isfinite(rows[-1]["loss"])
    good_steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert good_steps and max(good_steps) < bad_step  # nothing saved from the bad state
    assert msg.endswith(f"step {max(good_steps)} in {tmp_path / 'checkpoints'}")
    assert not (tmp_path / "hf").exists()


@pytest.mark.slow
@pytest.mark.real_model
def test_default_config_two_steps(tmp_path, real_model_path):
    """configs/default.yaml (real SmolLM2-135M, LoRA, real data), shortened to 2 steps."""
    proc = _train([f"output_dir={tmp_path}", "run.steps=2", "--quiet"], timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    rows = _metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["ce"] < 6.0 for r in rows)  # a pretrained model, not a random one (ln V = 10.8)
    assert (tmp_path / "hf" / "model.safetensors").exists()


@pytest.mark.slow
def test_soft_targets_equal_to_onehot_means_give_the_onehot_metrics(tmp_path):
    """objective.target=soft reads μ(q) beside a harvested JSONL; with μ(q) = ê_y (the one-hot
    target's mean embedding) every harmful metric equals the one-hot run's."""
    base = C.load_config(SMOKE, ["run.steps=2", "run.progress=false", "run.tensorboard=false",
                                 "run.export_hf=false", "run.checkpoint_every=0", "data.harmful_n=0"])
    tok = train_loop.run_tokenizer(base.model)
    recs = registry.load_d_harmful("pyrit")[:8]
    path = tmp_path / "d_harmful.jsonl"
    readers.write_jsonl(path, recs)
    mcfg = state_lib.model_config_of(base.model)
    k_init = jax.random.split(jax.random.PRNGKey(base.run.seed))[0]  # train_loop's init key
    E_hat = np.asarray(cost.unit_embeddings(M.embedding_matrix(M.init_params(mcfg, k_init))))
    readers.save_response_mu(path, [E_hat[np.asarray(tok.response_ids(r.response))] for r in recs])
    runs = {}
    for target in ("onehot", "soft"):
        cfg = C.load_config(SMOKE, ["run.steps=2", "run.progress=false", "run.tensorboard=false",
                                    "run.export_hf=false", "run.checkpoint_every=0", "data.harmful_n=0",
                                    f"data.harmful={path}", f"objective.target={target}",
                                    f"run.output_dir={tmp_path / target}"])
        runs[target] = train_loop.train(cfg, tokenizer=tok, echo=lambda s: None).metrics
    for a, b in zip(runs["onehot"], runs["soft"]):
        for k in ("loss", "emd_lower", "emd_upper", "ce"):
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-6), (k, a[k], b[k])
    assert runs["onehot"][0]["emd_lower"] > 0
    # and the μ(q) file is really what drives it: μ(q) = 0 gives LB = ½||μ(p)||², UB = 1
    readers.save_response_mu(path, [np.zeros((len(tok.response_ids(r.response)), mcfg.hidden_size),
                                             np.float32) for r in recs])
    cfg = C.load_config(SMOKE, ["run.steps=1", "run.progress=false", "run.tensorboard=false",
                                "run.export_hf=false", "run.checkpoint_every=0", "data.harmful_n=0",
                                f"data.harmful={path}", "objective.target=soft",
                                f"run.output_dir={tmp_path / 'zero'}"])
    z = train_loop.train(cfg, tokenizer=tok, echo=lambda s: None).metrics[0]
    assert z["emd_upper"] == pytest.approx(1.0, abs=1e-6)
    assert abs(z["emd_lower"] - runs["onehot"][0]["emd_lower"]) > 1e-3
    bad = C.load_config(SMOKE, ["objective.target=soft", f"run.output_dir={tmp_path / 'bad'}"])
    with pytest.raises(ConfigError, match="'data.harmful': objective.target=soft needs a harvested"):
        streams_lib.load_records(bad.data, bad.objective, bad.run.seed)


def test_data_sizes_and_safeinstr_records():
    cfg = C.load_config(SMOKE, ["objective.kind=safeinstr", "data.safeinstr_n=5", "data.harmful_batch=0"])
    recs = streams_lib.load_records(cfg.data, cfg.objective, cfg.run.seed)
    assert len(recs.benign) == cfg.data.benign_n + 5 and recs.harmful == []
    assert [r.label for r in recs.benign[-5:]] == ["refusal"] * 5
    assert {r.label for r in recs.benign[:-5]} == {"benign"}
    # with a harmful batch the same 5 refusals are a second stream, and the benign data is SFT's
    stream = C.load_config(SMOKE, ["objective.kind=safeinstr", "data.safeinstr_n=5", "objective.lam=1"])
    assert stream.data.harmful_batch > 0
    recs_s = streams_lib.load_records(stream.data, stream.objective, stream.run.seed)
    sft = C.load_config(SMOKE, ["objective.kind=sft", "data.harmful_batch=0"])
    sft_benign = streams_lib.load_records(sft.data, sft.objective, sft.run.seed).benign
    assert [r.id for r in recs_s.benign] == [r.id for r in sft_benign]
    assert [r.id for r in recs_s.harmful] == [r.id for r in recs.benign[-5:]] and recs_s.harmful_mu is None
    with pytest.raises(ConfigError, match="objective.lam.*refusal stream"):
        C.load_config(SMOKE, ["objective.kind=safeinstr", "data.safeinstr_n=5", "objective.lam=0"])
    many = C.load_config(SMOKE, ["objective.kind=safeinstr", "data.safeinstr_n=100000",
                                 "objective.lam=1"])
    with pytest.raises(ConfigError, match=r"'data.safeinstr_n': asks for 100000 records but the data"):
        streams_lib.load_records(many.data, many.objective, many.run.seed)
    cfg2 = C.load_config(SMOKE)
    recs2 = streams_lib.load_records(cfg2.data, cfg2.objective, cfg2.run.seed)
    assert len(recs2.harmful) == cfg2.data.harmful_n and {r.label for r in recs2.harmful} == {"harmful"}
    assert all(r.response.strip() for r in recs2.harmful)
    # the same seed picks the same records; another seed other ones
    same_seed = streams_lib.load_records(cfg2.data, cfg2.objective, cfg2.run.seed).benign
    assert [r.id for r in same_seed] == [r.id for r in recs2.benign]
    cfg3 = C.load_config(SMOKE, ["run.seed=1"])
    other_seed = streams_lib.load_records(cfg3.data, cfg3.objective, cfg3.run.seed).benign
    assert [r.id for r in other_seed] != [r.id for r in recs2.benign]


def test_batch_stream_position_is_the_whole_state():
    """A stream restarted at a saved (epoch, index) yields exactly the batches that follow."""
    exs = [batching.Example(id=str(i), prompt_ids=(1, 2, 3), response_ids=tuple(range(4, 5 + i % 5)))
           for i in range(7)]

    def mk():
        return streams_lib.BatchStream("benign", exs, batch_size=3, seq_len=16, pad_id=0, seed=3)

    a = mk()
    seq = [a.next_batch() for _ in range(6)]  # crosses two epoch boundaries (7 examples, 3 per batch)
    b = mk()
    for _ in range(2):
        b.next_batch()
    pos = b.position()
    c = mk()
    c.seek(pos)
    for want in seq[2:]:
        got = c.next_batch()
        assert set(got) == set(want)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
    assert a.epoch == 2 and all(x["input_ids"].shape == (3, 16) for x in seq)
    with pytest.raises(TrainError, match="examples"):
        mk().seek(dict(pos, examples=8))


def test_packed_stream_places_every_example_once_per_epoch_and_resumes():
    """data.pack: several examples per row, each in its own segment with positions from 0; one
    epoch's batches hold every example exactly once; a saved position resumes exactly."""
    exs = [batching.Example(id=str(i), prompt_ids=(1, 2, 3), response_ids=tuple(range(4, 5 + i % 9)))
           for i in range(23)]

    def mk():
        return streams_lib.BatchStream("benign", exs, batch_size=2, seq_len=24, pad_id=0, seed=5,
                                       pack=True)

    a, seen, batches = mk(), [], []
    while a.epoch == 0:
        b = a.next_batch()
        batches.append(b)
        assert b["input_ids"].shape == (2, 24)
        for row in range(2):
            seg = b["segment_ids"][row]
            for s in sorted(set(seg[seg > 0].tolist())):
                idx = np.flatnonzero(seg == s)
                np.testing.assert_array_equal(b["positions"][row][idx], np.arange(len(idx)))
                seen.append(tuple(b["input_ids"][row][idx].tolist()))
    assert max(len(np.unique(b["segment_ids"][0])) for b in batches) > 2
    # every example of epoch 0 once, whole, in one segment; the last batch may already hold the
    # first a.index examples of epoch 1
    want = Counter(tuple(e.prompt_ids + e.response_ids[:-1]) for e in exs)
    extra = Counter(seen) - want
    assert not (want - Counter(seen)) and sum(extra.values()) == a.index == len(seen) - len(exs)
    assert len(batches) < len(exs) / 2  # packing did put several examples in a row
    b = mk()
    b.next_batch()
    c = mk()
    c.seek(b.position())
    got = c.next_batch()
    for k in ("input_ids", "segment_ids", "positions", "loss_mask"):
        np.testing.assert_array_equal(got[k], batches[1][k])


# ---------------------------------------------------------------------------------------------
# Faults: signals, damaged checkpoints, a failed resume, a full disk


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _metrics(run)}


def _assert_same_losses(got: dict, ref: dict) -> None:
    assert sorted(got) == sorted(ref)
    for s in ref:
        assert got[s] == pytest.approx(ref[s], rel=1e-6, abs=0), (s, got[s], ref[s])


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_after_the_step_and_resume_gives_the_same_losses(smoke_run, tmp_path, sig):
    """SIGTERM (preemption) / SIGINT (Ctrl-C) after step 3: the step finishes, a checkpoint of
    it is saved, the one-line message gives the resume command, and the resumed run logs the
    uninterrupted losses."""
    ref_run, _ = smoke_run
    run = tmp_path / "run"
    child = subprocess.Popen([sys.executable, str(REPO / "train.py"), "--config", str(SMOKE),
                              f"output_dir={run}", "--quiet"], cwd=REPO, env=ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while child.poll() is None and time.time() < deadline:
        if (run / "metrics.jsonl").exists() and len(_metrics(run)) >= 3:
            break
        time.sleep(0.01)
    os.kill(child.pid, sig)
    out, err = child.communicate(timeout=300)
    assert child.returncode == 128 + sig, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and f"stopped by {signal.Signals(sig).name}" in lines[0], err[-3000:]
    stopped = len(_metrics(run))
    assert 3 <= stopped < 6
    assert f"after step {stopped} of 6; checkpoint {stopped} saved" in lines[0]
    assert stopped in {int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()}
    resume = lines[0].split("resume with: ")[1].split(" (--debug")[0].split()
    assert resume[:2] == ["python", "train.py"] and resume[-1] == "--resume"
    proc = _train(resume[2:] + ["--quiet"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert f"resume: restored step {stopped}" in proc.stdout
    _assert_same_losses(_losses(run), _losses(ref_run))


def _copy_run(src: Path, dst: Path) -> Path:
    import shutil
    shutil.copytree(src, dst)
    return dst


@pytest.mark.slow
def test_damaged_latest_checkpoint_resumes_from_the_previous_one_exactly(smoke_run, tmp_path):
    """A finished run whose newest checkpoint (6) has a bad meta: a rerun names the damaged
    checkpoint and asks for --resume; --resume names it, sets it aside, restores 4 and logs the
    uninterrupted losses (the other kinds of damage: tests/test_checkpoint.py)."""
    ref_run, _ = smoke_run
    run = _copy_run(ref_run, tmp_path / "run")
    (run / "checkpoints" / "6" / "meta" / "metadata").write_text("{not json")
    said: list[str] = []
    cfg = C.load_config(run / "config.yaml", [f"run.output_dir={run}", "run.tensorboard=false"])
    with pytest.raises(TrainError, match="--resume"):
        train_loop.train(cfg, echo=said.append)
    assert any("checkpoint 6" in s and "damaged" in s for s in said), said
    res = train_loop.train(C.replace(cfg, run__resume=True), echo=said.append)
    assert res.resumed_from == 4 and res.final_step == 6
    assert any("skipped damaged checkpoint(s) 6" in s for s in said), said
    assert (run / "damaged_checkpoints" / "6").is_dir()
    _assert_same_losses(_losses(run), _losses(ref_run))


def test_a_failed_resume_leaves_config_yaml_as_it_was(smoke_run, tmp_path):
    ref_run, _ = smoke_run
    run = _copy_run(ref_run, tmp_path / "run")
    before = (run / "config.yaml").read_text()
    cfg = C.load_config(run / "config.yaml", [f"run.output_dir={run}", "data.benign_n=12",
                                              "run.resume=true"])
    with pytest.raises(TrainError, match="examples"):  # the data changed: no exact resume
        train_loop.train(cfg, echo=lambda s: None)
    assert (run / "config.yaml").read_text() == before
    assert not (run / "train.lock").exists()


def test_resume_checks_the_records_by_content_not_by_path_or_count(smoke_run, tmp_path):
    """The harmful records rewritten under the same count: the resumed run refuses, naming the
    stream and both digests; the same records from another path (a file instead of the
    registry) resume (the run that lost its D_harmful file and rebuilt it identically)."""
    ref_run, _ = smoke_run
    run = _copy_run(ref_run, tmp_path / "run")
    cfg = C.load_config(run / "config.yaml")
    harmful = streams_lib.load_records(cfg.data, cfg.objective, cfg.run.seed).harmful
    same, changed = tmp_path / "same.jsonl", tmp_path / "changed.jsonl"
    readers.write_jsonl(same, harmful)
    readers.write_jsonl(changed, harmful[:-1] + [dataclasses.replace(harmful[-1], response="Other.")])
    base = [f"run.output_dir={run}", "run.resume=true", "run.progress=false"]
    with pytest.raises(TrainError, match="other records .*digest"):
        train_loop.train(C.load_config(run / "config.yaml", base + [f"data.harmful={changed}"]),
                         echo=lambda s: None)
    said = []
    res = train_loop.train(C.load_config(run / "config.yaml", base + [f"data.harmful={same}", "run.steps=7"]),
                           echo=said.append)
    assert res.resumed_from == 6 and res.final_step == 7


def test_stream_positions_carry_the_records_digest():
    recs = [Record(id=str(i), prompt=f"p{i}", response=f"r{i}", source="t") for i in range(5)]
    a = streams_lib.TokenizedRecords(recs, None, seq_len=16, max_prompt_len=None)
    b = streams_lib.TokenizedRecords(recs[:4] + [Record(id="4", prompt="p4", response="R4", source="t")],
                                     None, seq_len=16, max_prompt_len=None)
    assert a.digest == streams_lib.TokenizedRecords(list(recs), None, seq_len=16, max_prompt_len=None).digest
    assert a.digest != b.digest
    mk = lambda ex: streams_lib.BatchStream("harmful", ex, batch_size=2, seq_len=16, pad_id=0, seed=0)  # noqa: E731
    pos = mk(a).position()
    assert pos["digest"] == a.digest
    mk(a).seek(pos)
    with pytest.raises(TrainError, match="other records"):
        mk(b).seek(pos)
    mk(b).seek({k: v for k, v in pos.items() if k != "digest"})   # an older checkpoint: count only


def _tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


@pytest.mark.slow
def test_full_disk_stops_at_the_failed_save_in_one_line(tmp_path):
    """On a 60 MB tmpfs the first checkpoint (35 MB) fits and the second does not: the run stops
    at once with one line naming the failed save, the last good checkpoint and the resume
    command. Needs root (mount); skipped otherwise."""
    disk = tmp_path / "disk"
    if not _tmpfs(disk, "60m"):
        pytest.skip("cannot mount a tmpfs (needs root)")
    try:
        proc = _train(["--config", str(SMOKE), f"output_dir={disk / 'run'}", "--quiet"])
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-5000:]
        assert "saving checkpoint 4" in lines[0] and "no space left on device" in lines[0]
        assert "last good checkpoint is step 2" in lines[0] and "--resume" in lines[0]
        assert len(_metrics(disk / "run")) <= 6
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)
