"""The training run: setup (run directory, mesh, model, state, data), the jitted step, the loop.

    result = train(load_config("configs/smoke.yaml", ["run.output_dir=/tmp/x"]))

Run directory (cfg.run.output_dir):
    train.lock      held while a run uses the directory (semloss_jax.train.runlock; a remote
                    directory is locked through a local file named by its URL)
    config.yaml     the resolved config (written once every check has passed)
    metrics.jsonl   one JSON object per step (step, loss, ce, emd_lower, emd_upper, emd_onehot,
                    harm_nll, grad_norm, lr, tokens, tokens_per_s, step_time_s, ...)
    checkpoints/    Orbax (semloss_jax.train.checkpoint)
    damaged_checkpoints/  checkpoints that a resume found damaged and set aside
    tb/             TensorBoard scalars (tensorboardX)
    hf/             the final model as a Hugging Face safetensors directory (LoRA merged)

`train` reads as the pipeline: `setup_run_dir`, `setup_mesh_and_model`, `restore_or_start`,
`setup_train_step`, then `train_loop` and `finish`. The step (semloss_jax.train.step) is
jitted ONCE with in/out shardings from semloss_jax.train.sharding and the state donated. Every
batch has the fixed shape [grad_accum, batch, seq_len], so it compiles exactly once per run
(`TrainResult.compiles` counts the traces; the jitted function's cache size is checked too).

Faults: `run.resume` continues from the newest checkpoint that restores and verifies (damaged
newer ones are named and set aside); SIGTERM / SIGINT finish the current step, save it and
stop with the resume command (semloss_jax.train.interrupt); a failed save (a full disk) stops
the run at once with one line.

Data streams are deterministic functions of (seed, epoch, index): the position of each stream
is saved in every checkpoint, so `run.resume` replays exactly the batches an uninterrupted run
would have seen. In a multi-process run every process walks the same global batch plan and
tokenizes and builds only its own rows (sharding.process_rows), assembled with
jax.make_array_from_process_local_data. The step is jitted by semloss_jax.train.jitstep (state,
batch and activation shardings); rule fallbacks and large replicated params are warnings, or
stop the run with mesh.strict.
"""
from __future__ import annotations

import dataclasses
import math
import shlex
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

from semloss_jax import paths as paths_lib
from semloss_jax.data import reference as reference_lib
from semloss_jax.data import streams as streams_lib
from semloss_jax.errors import CheckpointError, Interrupted, ModelError, NonFiniteLoss, TrainError
from semloss_jax.loss import emd
from semloss_jax.loss.objective import CHOSEN
from semloss_jax.models import loading, weights
from semloss_jax.models.llama import LlamaConfig
from semloss_jax.models.tokenizer import ChatTokenizer, load_tokenizer
from semloss_jax.train import checkpoint as ckpt_lib
from semloss_jax.train import config as config_lib
from semloss_jax.train import jitstep, optim, sharding
from semloss_jax.train import state as state_lib
from semloss_jax.train.interrupt import StopSignals, signal_name
from semloss_jax.train.runlock import RunLock
from semloss_jax.train.telemetry import MetricsLog, device_peak_flops, read_metrics, truncate_metrics


@dataclasses.dataclass
class TrainResult:
    """What train() returns: the run's paths, per-step metrics, compile count, timing and MFU."""

    output_dir: Path
    steps_run: int
    final_step: int
    metrics: list[dict]
    compiles: int
    cache_size: int
    flops_per_step: float
    step_time_s: float | None       # median over the steps after the first
    first_step_s: float | None      # includes compilation
    mfu: float | None
    export_dir: Path | None
    checkpoint_dir: Path
    resumed_from: int | None
    stopped: str | None = None      # a reason when the run stopped early


class RunPaths(NamedTuple):
    """The run directory, its checkpoints/ folder and its metrics.jsonl."""

    out: Path
    checkpoints: Path
    metrics: Path


@dataclasses.dataclass
class TrainSetup:
    """Everything the loop needs that setup built: mesh, model, tokenizer, data, state."""

    mesh: Any
    model_cfg: LlamaConfig
    tok: ChatTokenizer
    streams: dict[str, streams_lib.BatchStream]
    plan: state_lib.StatePlan
    state: dict
    E_hat: jax.Array


class CompiledStep(NamedTuple):
    """The jitted step, its trace counter, the batch feeder and the model FLOPs of one step."""

    fn: Callable
    traces: list
    next_batches: Callable[[], tuple]
    flops_per_step: float


def is_main() -> bool:
    """Whether this is process 0, the one that writes the config, metrics and the export."""
    return jax.process_index() == 0


# ---------------------------------------------------------------------------------------------
# Setup


def setup_run_dir(cfg: config_lib.TrainConfig, say) -> RunPaths | TrainResult:
    """The run's paths; the finished result when the directory already holds this config's
    completed run (reruns are no-ops); an error when it holds another run and no --resume."""
    out = paths_lib.run_dir(cfg.run.output_dir)   # a gs:// URL stays one (etils.epath)
    paths = RunPaths(out, out / "checkpoints", out / "metrics.jsonl")
    if not cfg.run.resume and paths.checkpoints.exists() and any(paths.checkpoints.iterdir()):
        done = finished_run(cfg, paths, say)
        if done is not None:
            say(f"{out} already holds the finished run of this config (step {done.final_step}); "
                f"nothing to do")
            return done
        raise TrainError(f"{paths.checkpoints} already holds checkpoints: pass --resume "
                         f"(run.resume=true) to continue that run, or choose another run.output_dir")
    out.mkdir(parents=True, exist_ok=True)
    return paths


def run_tokenizer(m: config_lib.ModelSection) -> ChatTokenizer:
    """The tokenizer a run uses: model.tokenizer, or the one beside the weights."""
    return load_tokenizer(loading.resolve_model_path(m.tokenizer or m.path))


def setup_mesh_and_model(cfg: config_lib.TrainConfig, tok: ChatTokenizer | None,
                         say) -> TrainSetup:
    """Model config and weights, tokenizer, data streams, mesh, and the sharded initial state."""
    t0 = time.perf_counter()
    model_cfg, host_params = state_lib.build_model(cfg.model)
    tok = tok or run_tokenizer(cfg.model)
    if tok.vocab_size > model_cfg.vocab_size:
        raise ModelError(f"the tokenizer has {tok.vocab_size} tokens but the model's vocab_size "
                         f"is {model_cfg.vocab_size} (model.tokenizer / model.path)")
    rows = {name: sharding.process_rows(n) for name, n in (("benign", cfg.data.benign_batch),
                                                             ("harmful", cfg.data.harmful_batch)) if n}
    mesh = sharding.make_mesh(cfg.mesh)
    k_init, k_state = jax.random.split(jax.random.PRNGKey(cfg.run.seed))
    plan = state_lib.plan_state(model_cfg, cfg.optim, mesh, k_state)
    sharding.report_fallbacks(plan.fallbacks, cfg.mesh.strict)
    state, E_hat = state_lib.initial_state(plan, model_cfg, host_params, k_init, k_state)
    reference = None
    if cfg.objective.kind == "dpo":  # π_ref = the initial model (LoRA: the base, adapters at 0)
        initial = optim.full_params(state["params"], state["frozen"], cfg.optim)

        def reference(examples):
            return reference_lib.with_reference_logprobs(initial, model_cfg, examples, pad_id=tok.pad_id)

    streams, data_stats = streams_lib.build_streams(cfg.data, cfg.objective, cfg.run.seed, tok, rows=rows,
                                                    reference=reference)
    for k, v in data_stats.items():
        say(f"data {k}: {v}")
    say(f"model: {model_cfg.num_params / 1e6:.1f}M params, {model_cfg.num_hidden_layers} layers, "
        f"vocab {model_cfg.vocab_size}; trainable={cfg.optim.trainable}; mesh {dict(mesh.shape)} "
        f"on {jax.device_count()} {jax.devices()[0].platform} device(s); "
        f"setup {time.perf_counter() - t0:.1f}s")
    return TrainSetup(mesh, model_cfg, tok, streams, plan, state, E_hat)


def restore_or_start(cfg: config_lib.TrainConfig, s: TrainSetup, paths: RunPaths,
                     ckpt: ckpt_lib.Checkpointer, say) -> int | None:
    """With run.resume, restore the newest checkpoint that restores and verifies into s.state
    and seek the streams; damaged newer ones are named and set aside. Returns the step resumed
    from (None for a fresh start). metrics.jsonl is cut to match."""
    got = None
    if cfg.run.resume:
        got = ckpt.restore_newest(s.state, s.plan.state_shardings, verify=_step_counter_matches)
    if got is None:
        if cfg.run.resume:
            say(f"resume: no finalized checkpoint in {paths.checkpoints}; starting from step 0")
        if is_main() and paths.metrics.exists():
            paths.metrics.unlink()
        return None
    if got.skipped:
        moved = ckpt.set_aside([st for st, _ in got.skipped])
        say("resume: WARNING skipped damaged checkpoint(s) " + "; ".join(
            f"{st} ({why}) -> moved to {dest}" for (st, why), dest in zip(got.skipped, moved)))
    s.state = dict(s.state, **got.state)
    for name, pos in got.meta.get("data", {}).items():
        if name in s.streams:
            s.streams[name].seek(pos)
    if got.meta.get("config") not in (None, fingerprint(cfg)):
        say("resume: WARNING the config differs from the one that wrote the checkpoint "
            "(the continuation is not the uninterrupted run of either config)")
    if is_main():
        truncate_metrics(paths.metrics, got.step)
    say(f"resume: restored step {got.step} from {paths.checkpoints / str(got.step)}")
    return got.step


def _step_counter_matches(step: int, state: dict, meta: dict) -> None:
    counter = int(sharding.to_host(state["step"]))
    if counter != step:
        raise CheckpointError(f"checkpoint {step}: the state's step counter is {counter}")


def setup_train_step(cfg: config_lib.TrainConfig, s: TrainSetup, say) -> CompiledStep:
    """The step jitted once with its shardings (jitstep), and the feeder of its global batches."""
    basis = None
    if cfg.objective.divergence == "gelbrich":  # the step's frozen basis, computed once
        basis = np.asarray(emd.principal_basis(s.E_hat, cfg.objective.gelbrich_rank))
    traces = [0]

    def count():
        traces[0] += 1

    A, d = cfg.optim.grad_accum, cfg.data
    parts = jitstep.batch_parts(cfg, "harmful" in s.streams)
    js = jitstep.jit_train_step(cfg, s.model_cfg, s.plan, s.mesh,
                                jitstep.batch_shapes(cfg, s.model_cfg, parts), on_trace=count, basis=basis)

    def next_batches():
        out = []
        for name in ("benign", "harmful"):
            if name not in parts:
                out.append(None)
                continue
            sh = js.batch_shardings[name]
            b = s.streams[name].next_micro(A)   # this process's rows
            if name == "harmful" and "chosen" in s.streams:  # dpo: row i of both is one pair
                b.update({CHOSEN + k: v for k, v in s.streams["chosen"].next_micro(A).items()})
            out.append(sharding.put_global_batch({k: v for k, v in b.items() if k in sh}, sh))
        if traces[0] == 1 and js.fallbacks:
            sharding.report_fallbacks(js.fallbacks, False, "activation sharding")
            js.fallbacks.clear()
        return tuple(out)

    rows = sum(parts.values()) + (parts.get("harmful", 0) if "chosen" in s.streams else 0)  # dpo: + chosen
    slots = A * d.seq_len * rows  # every slot is computed, padding included
    flops = s.model_cfg.flops_per_token(d.seq_len) * slots
    peak = device_peak_flops()
    say(f"model FLOPs per step: {flops:.3e} ({slots} token slots x "
        f"{s.model_cfg.flops_per_token(d.seq_len):.3e} FLOPs/token, 6N + attention)"
        + (f"; device peak {peak:.3e} FLOP/s x {jax.device_count()}" if peak
           else "; device peak unknown (no MFU)"))
    return CompiledStep(js.fn, traces, next_batches, flops)


# ---------------------------------------------------------------------------------------------
# The loop


class LoopOutcome(NamedTuple):
    """How train_loop ended: the last step done, the finite steps' records, per-step times, why
    it stopped early (or None), and the signal that stopped it (or None)."""

    step: int                 # the last step done
    history: list[dict]       # the finite steps' records
    times: list[float]        # wall seconds per step
    stopped: str | None       # why the loop stopped early (non-finite loss or params)
    signum: int | None = None  # SIGTERM / SIGINT: the loop saved at `step` and stopped


def run_step(cs: CompiledStep, s: TrainSetup, step: int) -> dict:
    """Run one step (updating s.state); its metrics record (step = the step number it makes)."""
    benign, harmful = cs.next_batches()
    t = time.perf_counter()
    s.state, m = cs.fn(s.state, benign, harmful, s.E_hat)
    m = {k: float(v) for k, v in jax.device_get(m).items()}
    dt = time.perf_counter() - t
    peak, n_dev = device_peak_flops(), jax.device_count()
    return {"step": step, **m, "tokens_per_s": m["tokens"] / dt if dt > 0 else None,
            "step_time_s": dt, "flops_per_step": cs.flops_per_step,
            "mfu": cs.flops_per_step / dt / (peak * n_dev) if (peak and dt > 0) else None}


def train_loop(cfg: config_lib.TrainConfig, s: TrainSetup, cs: CompiledStep, paths: RunPaths,
               ckpt: ckpt_lib.Checkpointer, start: int, end: int) -> LoopOutcome:
    """Steps start+1..end: run the step, log its metrics, checkpoint on schedule; stop at the
    first non-finite loss (or params at a checkpoint) without saving the bad state; on SIGTERM /
    SIGINT save after the current step and stop. A failed save stops the run (CheckpointError)."""
    meta = {"config": fingerprint(cfg)}
    history, times = [], []
    last_good, step, stopped, signum = ckpt.latest_step(), start, None, None
    try:
        with MetricsLog(paths.out, enabled=is_main(), tensorboard=cfg.run.tensorboard,
                        progress=cfg.run.progress, tb_every=cfg.run.log_every, total=cfg.run.steps,
                        initial=start) as mlog, StopSignals() as stop:
            while step < end:
                rec = run_step(cs, s, step + 1)
                step += 1
                times.append(rec["step_time_s"])
                if not math.isfinite(rec["loss"]):
                    stopped = f"non-finite loss ({rec['loss']}) at step {step}"
                    mlog.write({**rec, "stopped": stopped})
                    break
                history.append(rec)
                mlog.write(rec)
                ckpt.poll()  # a failed asynchronous save stops the run here
                signum = stop.requested() if step < end else None
                if ckpt.should_save(step, cfg.run.steps) or signum:
                    if not bool(state_lib.params_finite(s.state["params"])):
                        stopped, signum = f"non-finite parameters after step {step}", None
                        break
                    ckpt.save(step, s.state, dict(meta, data={n: st.position()
                                                              for n, st in s.streams.items()}))
                    last_good = step
                if signum:
                    break
        ckpt.wait()
    except CheckpointError as e:
        raise CheckpointError(f"{e}; stopped after step {step}; the last good checkpoint is step "
                              f"{ckpt.latest_step()} in {paths.checkpoints}: make room, then resume "
                              f"with: {resume_command(paths.out)}") from e
    if stopped:
        stopped += f": stopping; the last good checkpoint is step {last_good} in {paths.checkpoints}"
    return LoopOutcome(step, history, times, stopped, signum)


def resume_command(out: Path) -> str:
    """The command that continues the run in `out` (its config.yaml, its directory, --resume)."""
    return (f"python train.py --config {shlex.quote(str(out / 'config.yaml'))} "
            f"run.output_dir={shlex.quote(str(out))} --resume")


def finish(cfg: config_lib.TrainConfig, s: TrainSetup, cs: CompiledStep, paths: RunPaths,
           o: LoopOutcome, resumed_from: int | None, say) -> TrainResult:
    """Check the step compiled once, export the final model, and summarize the run."""
    cache_size = cs.fn._cache_size() if hasattr(cs.fn, "_cache_size") else -1
    if cs.traces[0] > 1 or cache_size > 1:
        raise TrainError(f"the train step compiled {max(cs.traces[0], cache_size)} times over the "
                         "run (expected once): a batch shape or dtype changed")
    export_dir = None
    if o.step >= cfg.run.steps and cfg.run.export_hf:
        final = sharding.to_host(optim.export_params(s.state, cfg.optim))  # collective
        export_dir = paths.out / "hf"
        if is_main():
            export_model(final, s.model_cfg, export_dir, s.tok)
    times, peak = o.times, device_peak_flops()
    step_time = float(np.median(times[1:])) if len(times) > 1 else (times[0] if times else None)
    mfu = (cs.flops_per_step / step_time / (peak * jax.device_count())
           if (peak and step_time) else None)
    if times:
        tps = np.mean([r["tokens"] for r in o.history]) / step_time
        say(f"steps {o.step - len(times) + 1}..{o.step}: first step {times[0]:.2f}s (with "
            f"compilation), then {step_time:.3f}s/step median, {tps:.0f} tokens/s, "
            f"{cs.flops_per_step / step_time / 1e9:.2f} GFLOP/s"
            + (f", MFU {mfu:.1%}" if mfu is not None else ", MFU n/a (device peak unknown)")
            + f"; step compiled {cs.traces[0]} time(s)")
    return TrainResult(output_dir=paths.out, steps_run=len(times), final_step=o.step,
                       metrics=o.history, compiles=cs.traces[0], cache_size=cache_size,
                       flops_per_step=cs.flops_per_step, step_time_s=step_time,
                       first_step_s=times[0] if times else None, mfu=mfu, export_dir=export_dir,
                       checkpoint_dir=paths.checkpoints, resumed_from=resumed_from)


def export_model(params, model_cfg, export_dir, tok) -> None:
    """weights.export_hf into export_dir; a remote one (gs://...) gets a local export copied up."""
    if not paths_lib.is_remote(export_dir):
        weights.export_hf(params, model_cfg, export_dir, tokenizer=tok)
        return
    with tempfile.TemporaryDirectory(prefix="semloss_export_") as tmp:
        weights.export_hf(params, model_cfg, Path(tmp), tokenizer=tok)
        paths_lib.copy_tree(Path(tmp), export_dir)


def train(cfg: config_lib.TrainConfig, *, echo: Callable[[str], None] | None = None,
          max_steps_this_run: int | None = None, tokenizer: ChatTokenizer | None = None
          ) -> TrainResult:
    """Run (or resume) the training described by cfg; returns figures and where things are.

    The run holds the lock of run.output_dir throughout (semloss_jax.train.runlock): a second
    run on the same directory fails at once. max_steps_this_run: stop after this many steps of
    this invocation (tests), checkpointing as configured; None runs to cfg.run.steps.
    tokenizer: an already loaded ChatTokenizer for the run's tokenizer (saves reloading it when
    one process runs several trainings).
    """
    sharding.maybe_initialize_distributed(cfg.distributed)  # before anything touches a backend
    echo = echo or (lambda line: print(line, flush=True))
    say = echo if is_main() else (lambda line: None)
    with RunLock(cfg.run.output_dir, jax.process_index()):
        return train_locked(cfg, say, max_steps_this_run, tokenizer)


def train_locked(cfg: config_lib.TrainConfig, say: Callable[[str], None],
                 max_steps_this_run: int | None, tokenizer: ChatTokenizer | None) -> TrainResult:
    """train() once the run directory is locked: set up, restore, write config.yaml (every check
    has passed by then), run the loop, finish."""
    paths = setup_run_dir(cfg, say)
    if isinstance(paths, TrainResult):
        return paths
    s = setup_mesh_and_model(cfg, tokenizer, say)
    ckpt = ckpt_lib.Checkpointer(paths.checkpoints, every=cfg.run.checkpoint_every,
                                 keep_last=cfg.run.keep_last, async_save=cfg.run.async_checkpoint)
    try:
        resumed_from = restore_or_start(cfg, s, paths, ckpt, say)
        if is_main():
            config_lib.write_config(cfg, paths.out / "config.yaml")
        start = resumed_from or 0
        end = cfg.run.steps if max_steps_this_run is None else min(cfg.run.steps,
                                                                  start + max_steps_this_run)
        cs = setup_train_step(cfg, s, say)
        outcome = train_loop(cfg, s, cs, paths, ckpt, start, end)
        if outcome.signum:
            raise Interrupted(f"stopped by {signal_name(outcome.signum)} after step {outcome.step} "
                              f"of {cfg.run.steps}; checkpoint {outcome.step} saved in "
                              f"{paths.checkpoints}; resume with: {resume_command(paths.out)}",
                              outcome.signum)
        if outcome.stopped:
            say(outcome.stopped)
            raise NonFiniteLoss(outcome.stopped)
        return finish(cfg, s, cs, paths, outcome, resumed_from, say)
    finally:
        ckpt.close()


# ---------------------------------------------------------------------------------------------
# Finished runs


def fingerprint(cfg: config_lib.TrainConfig) -> str:
    """A hash of what determines the trajectory (not resume/progress/logging switches)."""
    run = dataclasses.replace(cfg.run, resume=False, progress=True, tensorboard=True,
                              async_checkpoint=True, output_dir="", export_hf=True)
    return ckpt_lib.config_fingerprint(config_lib.to_yaml(dataclasses.replace(cfg, run=run)))


def finished_run(cfg: config_lib.TrainConfig, paths: RunPaths, say) -> TrainResult | None:
    """The result of a completed run of the same config in the run dir (reruns are no-ops).
    Checkpoints whose meta cannot be read are named and passed over (the newest readable one
    decides)."""
    ck = ckpt_lib.Checkpointer(paths.checkpoints, every=0, keep_last=cfg.run.keep_last,
                               async_save=False)
    try:
        step, meta, skipped = ck.newest_meta()
    finally:
        ck.close()
    for st, why in skipped:
        say(f"WARNING checkpoint {st} in {paths.checkpoints} is damaged ({why}); "
            f"--resume continues from the newest good one")
    if not meta or int(meta.get("step", -1)) != cfg.run.steps or meta.get("config") != fingerprint(cfg):
        return None
    hf = paths.out / "hf"
    if cfg.run.export_hf and not (hf / "config.json").exists():
        return None
    return TrainResult(output_dir=paths.out, steps_run=0, final_step=cfg.run.steps,
                       metrics=read_metrics(paths.metrics), compiles=0, cache_size=0,
                       flops_per_step=float("nan"), step_time_s=None, first_step_s=None, mfu=None,
                       export_dir=hf if cfg.run.export_hf else None,
                       checkpoint_dir=paths.checkpoints, resumed_from=None,
                       stopped="already complete")
