"""The training run: model, data streams, mesh, the jitted step, checkpoints, logs, export.

    result = train(load_config("configs/smoke.yaml", ["run.output_dir=/tmp/x"]))

Run directory (cfg.run.output_dir):
    config.yaml     the resolved config
    metrics.jsonl   one JSON object per step (step, loss, ce, emd_lower, emd_upper, emd_onehot,
                    harm_nll, grad_norm, lr, tokens, tokens_per_s, step_time_s, ...)
    checkpoints/    Orbax (semloss_jax.checkpoint)
    tb/             TensorBoard scalars (tensorboardX)
    hf/             the final model as a Hugging Face safetensors directory (LoRA merged)

The step (semloss_jax.optim.make_train_step) is jitted ONCE with in/out shardings from
semloss_jax.sharding and the state donated. Every batch has the fixed shape
[grad_accum, batch, seq_len], so it compiles exactly once per run (`TrainResult.compiles`
counts the traces, and the jitted function's cache size is checked at the end).

Data streams are deterministic functions of (seed, epoch, index): the position of each stream
is saved in every checkpoint, so `run.resume` replays exactly the batches an uninterrupted run
would have seen. In a multi-process run every process builds the same global batch plan and
loads only its own rows (sharding.process_rows), assembled with
jax.make_array_from_process_local_data.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from . import batching, checkpoint as ckpt_lib, config as config_lib, cost, sharding
from . import model as model_lib, optim as optim_lib
from .paths import atomic_write_text, default_model_path

log = logging.getLogger(__name__)

STREAM_SEEDS = {"benign": 0, "harmful": 1}


class TrainError(RuntimeError):
    pass


class NonFiniteLoss(TrainError):
    pass


# ---------------------------------------------------------------------------------------------
# Device peaks (dense bf16 FLOP/s per chip) for MFU; None where unknown (CPU).

PEAK_FLOPS = (  # (substring of device_kind, lower-cased; peak); first match wins
    ("v5 lite", 197e12), ("v5e", 197e12), ("v5p", 459e12), ("v5", 459e12),
    ("v6 lite", 918e12), ("v6e", 918e12), ("v4", 275e12),
    ("h200", 989e12), ("h100 pcie", 756e12), ("h100", 989e12), ("a100", 312e12),
)


def device_peak_flops(device: jax.Device | None = None) -> float | None:
    d = device or jax.devices()[0]
    if d.platform == "cpu":
        return None
    kind = str(getattr(d, "device_kind", "")).lower()
    for sub, peak in PEAK_FLOPS:
        if sub in kind:
            return peak
    return None


# ---------------------------------------------------------------------------------------------
# Model


def _resolve_path(p: str) -> Path:
    return default_model_path() if p == "default" else Path(p).expanduser()


def model_config_of(cfg: config_lib.TrainConfig) -> model_lib.LlamaConfig:
    """The model config from model.arch (no weights needed) with the numerics overrides."""
    m = cfg.model
    if m.arch is None:
        raise TrainError("model.arch is not set; the config comes from the weights (load_model)")
    out = dataclasses.replace(m.arch, dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat,
                              source=m.arch.source or "model.arch")
    out.validate()
    return out


_ARCH_CHECK = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings")


def build_model(cfg: config_lib.TrainConfig, key: jax.Array | None = None):
    """(model_cfg, params as host numpy arrays, or None for init=random: init happens sharded)."""
    m = cfg.model
    if m.init == "random":
        return model_config_of(cfg), None
    from . import weights
    path = _resolve_path(m.path)
    mcfg, params = weights.load_model(path)
    mcfg = dataclasses.replace(mcfg, dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat)
    if m.arch is not None:
        bad = [f for f in _ARCH_CHECK if getattr(m.arch, f) != getattr(mcfg, f)]
        if bad:
            raise TrainError(f"model.arch disagrees with the weights at {path} on "
                             + ", ".join(f"{f} ({getattr(m.arch, f)} vs {getattr(mcfg, f)})" for f in bad))
    pdt = np.dtype(jnp.dtype(m.param_dtype))
    params = jax.tree_util.tree_map(lambda a: np.asarray(a).astype(pdt), params)
    return mcfg, params


def tokenizer_path(cfg: config_lib.TrainConfig) -> Path:
    t = cfg.model.tokenizer or cfg.model.path
    return _resolve_path(t)


# ---------------------------------------------------------------------------------------------
# Data


class BatchStream:
    """Fixed-shape batches [batch_size, seq_len] from a list of tokenized examples, walking a
    seeded permutation per epoch. The position (epoch, index) is all the state there is."""

    def __init__(self, name: str, examples: Sequence[batching.Example], *, batch_size: int,
                 seq_len: int, pad_id: int, seed: int, shuffle: bool = True):
        if not examples:
            raise TrainError(f"data stream {name!r} has no examples")
        self.name, self.examples = name, list(examples)
        self.batch_size, self.seq_len, self.pad_id = batch_size, seq_len, pad_id
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.index = 0, 0
        self._perm_cache: tuple[int, np.ndarray] | None = None

    def _perm(self, epoch: int) -> np.ndarray:
        if self._perm_cache is None or self._perm_cache[0] != epoch:
            n = len(self.examples)
            perm = (np.random.default_rng([self.seed, STREAM_SEEDS.get(self.name, 7), epoch]).permutation(n)
                    if self.shuffle else np.arange(n))
            self._perm_cache = (epoch, perm)
        return self._perm_cache[1]

    def next_batch(self) -> dict[str, np.ndarray]:
        idx = []
        while len(idx) < self.batch_size:
            perm = self._perm(self.epoch)
            take = min(self.batch_size - len(idx), len(perm) - self.index)
            idx.extend(int(i) for i in perm[self.index:self.index + take])
            self.index += take
            if self.index >= len(perm):
                self.epoch, self.index = self.epoch + 1, 0
        exs = [self.examples[i] for i in idx]
        (b,) = list(batching.make_batches(exs, batch_size=self.batch_size, seq_len=self.seq_len,
                                          pad_id=self.pad_id, buckets=(self.seq_len,), seed=None))
        if b["input_ids"].shape != (self.batch_size, self.seq_len):
            raise TrainError(f"stream {self.name!r}: batch shape {b['input_ids'].shape}, expected "
                             f"{(self.batch_size, self.seq_len)}")
        b.pop("example_index", None)
        return b

    def next_micro(self, n: int) -> dict[str, np.ndarray]:
        """n consecutive batches stacked: [n, batch_size, seq_len]."""
        bs = [self.next_batch() for _ in range(n)]
        return {k: np.stack([b[k] for b in bs]) for k in bs[0]}

    def position(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "examples": len(self.examples)}

    def seek(self, pos: Mapping[str, int]) -> None:
        if int(pos.get("examples", len(self.examples))) != len(self.examples):
            raise TrainError(f"stream {self.name!r}: the checkpoint was made with {pos['examples']} "
                             f"examples, the data now has {len(self.examples)}: cannot resume exactly")
        self.epoch, self.index = int(pos["epoch"]), int(pos["index"])


def _take_idx(n_all: int, n: int, seed: int, salt: int) -> list[int]:
    if n <= 0 or n >= n_all:
        return list(range(n_all))
    return sorted(int(i) for i in np.random.default_rng([seed, salt]).permutation(n_all)[:n])


def _take(records: list, n: int, seed: int, salt: int) -> list:
    return [records[i] for i in _take_idx(len(records), n, seed, salt)]


def _load_named(name: str):
    from . import data as data_lib, sources
    p = Path(name).expanduser()
    if name.endswith((".jsonl", ".json")) or p.exists():
        recs, _ = data_lib.read_jsonl(p)
        return recs
    return sources.load_set(name, "train")


def load_records(cfg: config_lib.TrainConfig) -> dict[str, list]:
    """{"benign": [...], "harmful": [...] or [], "harmful_mu": per-record μ(q) arrays or None},
    sized by the config. Soft targets (objective.target=soft) read the μ(q) files that
    `python -m semloss_jax.harvest --soft-targets` writes beside the harvested JSONL."""
    from . import sources
    d, seed = cfg.data, cfg.run.seed
    benign = [r for name in d.benign for r in _load_named(name)]
    benign = _take(benign, d.benign_n, seed, 11)
    if cfg.objective.kind == "safeinstr":
        benign = benign + _take(_load_named(d.safeinstr), d.safeinstr_n, seed, 13)
    harmful, mu = [], None
    if d.harmful_batch > 0:
        every = sources.load_d_harmful(d.harmful)
        idx = _take_idx(len(every), d.harmful_n, seed, 17)
        harmful = [every[i] for i in idx]
        if cfg.objective.target == "soft":
            if d.harmful == "pyrit":
                raise TrainError("objective.target=soft needs data.harmful = a harvested JSONL with "
                                 "μ(q) files (python -m semloss_jax.harvest --soft-targets), not 'pyrit'")
            from .harvest import load_response_mu
            try:
                all_mu = load_response_mu(d.harmful)
            except FileNotFoundError as e:
                raise TrainError(f"objective.target=soft: no μ(q) beside {d.harmful} ({e}); harvest "
                                 "with --soft-targets") from None
            mu = [all_mu[i] for i in idx]
    return {"benign": benign, "harmful": harmful, "harmful_mu": mu}


def build_streams(cfg: config_lib.TrainConfig, tok, records: Mapping[str, list] | None = None
                  ) -> tuple[dict[str, BatchStream], dict[str, str]]:
    records = load_records(cfg) if records is None else records
    d = cfg.data
    streams, stats = {}, {}
    mpl = d.max_prompt_len or None
    for name, bsz in (("benign", d.benign_batch), ("harmful", d.harmful_batch)):
        recs = records.get(name) or []
        if bsz <= 0 or not recs:
            if name == "benign" or (bsz > 0 and cfg.objective.uses_harmful):
                raise TrainError(f"no {name} records (data.{name} = {getattr(d, name)!r})")
            continue
        mu = records.get("harmful_mu") if name == "harmful" else None
        exs, st = batching.tokenize_records(recs, tok, seq_len=d.seq_len, max_prompt_len=mpl,
                                            response_mu=mu)
        stats[name] = str(st)
        streams[name] = BatchStream(name, exs, batch_size=bsz, seq_len=d.seq_len, pad_id=tok.pad_id,
                                    seed=cfg.run.seed, shuffle=d.shuffle)
    return streams, stats


# ---------------------------------------------------------------------------------------------
# Metrics files


def read_metrics(path: Path) -> list[dict]:
    out = []
    if not path.exists():
        return out
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            out.append(json.loads(line))
        except ValueError:
            break  # a line cut by a kill: everything after it is unreliable
    return out


def _truncate_metrics(path: Path, upto_step: int) -> None:
    keep = [r for r in read_metrics(path) if int(r.get("step", 0)) <= upto_step]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))


# ---------------------------------------------------------------------------------------------
# The run


@dataclasses.dataclass
class TrainResult:
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


def _is_main() -> bool:
    return jax.process_index() == 0


def _put_params(host_params, shardings):
    return jax.tree_util.tree_map(lambda a, s: jax.device_put(a, s), host_params, shardings)


def train(cfg: config_lib.TrainConfig, *, echo: Callable[[str], None] | None = None,
          max_steps_this_run: int | None = None, tokenizer=None) -> TrainResult:
    """Run (or resume) the training described by cfg; returns figures and where things are.

    max_steps_this_run: stop after this many steps of this invocation (tests), checkpointing
    as configured; None runs to cfg.run.steps. tokenizer: an already loaded ChatTokenizer for
    cfg's tokenizer path (saves reloading it when one process runs several trainings).
    """
    # first: jax.distributed must be initialized before anything touches the backend
    sharding.maybe_initialize_distributed(cfg.distributed)
    echo = echo or (lambda s: print(s, flush=True))
    say = (lambda s: echo(s)) if _is_main() else (lambda s: None)
    out = Path(cfg.run.output_dir).absolute()
    ckpt_dir = out / "checkpoints"
    metrics_path = out / "metrics.jsonl"

    if not cfg.run.resume and ckpt_dir.exists() and any(ckpt_dir.iterdir()):
        done = _finished_run(cfg, ckpt_dir)
        if done is not None:
            say(f"{out} already holds the finished run of this config (step {done.final_step}); "
                f"nothing to do")
            return done
        raise TrainError(f"{ckpt_dir} already holds checkpoints: pass --resume (run.resume=true) to "
                         f"continue that run, or choose another run.output_dir")
    out.mkdir(parents=True, exist_ok=True)
    if _is_main():
        config_lib.write_config(cfg, out / "config.yaml")

    # --- model, tokenizer, data -----------------------------------------------------------
    t0 = time.perf_counter()
    model_cfg, host_params = build_model(cfg)
    if tokenizer is None:
        from .tokenizer import load_tokenizer
        tokenizer = load_tokenizer(tokenizer_path(cfg))
    tok = tokenizer
    if tok.vocab_size > model_cfg.vocab_size:
        raise TrainError(f"tokenizer {tokenizer_path(cfg)} has {tok.vocab_size} tokens but the model's "
                         f"vocab_size is {model_cfg.vocab_size}")
    streams, data_stats = build_streams(cfg, tok)
    for k, v in data_stats.items():
        say(f"data {k}: {v}")

    # --- mesh, state, shardings ------------------------------------------------------------
    mesh = sharding.make_mesh(cfg.mesh)
    ocfg, obj = cfg.optim, cfg.objective
    key = jax.random.PRNGKey(cfg.run.seed)
    k_init, k_state = jax.random.split(key)
    plan = plan_state(cfg, model_cfg, mesh, k_state)
    optimizer, init_state = plan.optimizer, plan.init_state
    param_sh, state_sh = plan.param_shardings, plan.state_shardings
    for f in sorted(set(plan.fallbacks)):
        log.info("sharding fallback: %s", f)

    E_sh = param_sh["embed"]["embedding"]

    def init_all(p, k):
        # Ê from the INITIAL embeddings, once; never recomputed from the trained params
        E_hat = cost.unit_embeddings(model_lib.embedding_matrix(p))
        return init_state(p, k), E_hat

    if host_params is None:  # random init, created directly in its shards (one compiled program)
        state, E_hat = jax.jit(lambda ki, ks: init_all(model_lib.init_params(model_cfg, ki), ks),
                               out_shardings=(state_sh, E_sh))(k_init, k_state)
    else:
        params = _put_params(host_params, param_sh)
        host_params = None
        state, E_hat = jax.jit(init_all, out_shardings=(state_sh, E_sh), donate_argnums=(0,))(params, k_state)
        del params
    say(f"model: {model_cfg.num_params / 1e6:.1f}M params, {model_cfg.num_hidden_layers} layers, "
        f"vocab {model_cfg.vocab_size}; trainable={ocfg.trainable}; mesh "
        f"{dict(mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} device(s); "
        f"setup {time.perf_counter() - t0:.1f}s")

    # --- checkpoints / resume --------------------------------------------------------------
    ckpt = ckpt_lib.Checkpointer(ckpt_dir, every=cfg.run.checkpoint_every, keep_last=cfg.run.keep_last,
                                 async_save=cfg.run.async_checkpoint)
    start_step, resumed_from = 0, None
    fingerprint = _fingerprint(cfg)
    if cfg.run.resume:
        latest = ckpt.latest_step()
        if latest is None:
            say(f"resume: no finalized checkpoint in {ckpt_dir}; starting from step 0")
            if _is_main() and metrics_path.exists():
                _truncate_metrics(metrics_path, 0)
        else:
            saved, meta = ckpt.restore(state, state_sh, latest)
            state = dict(state, **saved)
            for name, pos in meta.get("data", {}).items():
                if name in streams:
                    streams[name].seek(pos)
            start_step = resumed_from = int(meta["step"])
            if meta.get("config") not in (None, fingerprint):
                say("resume: WARNING the config differs from the one that wrote the checkpoint "
                    "(the continuation is not the uninterrupted run of either config)")
            if int(jax.device_get(state["step"])) != start_step:
                raise TrainError(f"checkpoint {latest}: state step {int(state['step'])} != meta step {start_step}")
            if _is_main():
                _truncate_metrics(metrics_path, start_step)
            say(f"resume: restored step {start_step} from {ckpt_dir / str(latest)}")
    elif _is_main() and metrics_path.exists():
        metrics_path.unlink()

    # --- the step, jitted once -------------------------------------------------------------
    step_fn_raw = optim_lib.make_train_step(model_cfg, obj, ocfg, optimizer)
    traces = [0]

    def counted_step(state, benign, harmful, E_hat):
        traces[0] += 1
        return step_fn_raw(state, benign, harmful, E_hat)

    A = ocfg.grad_accum
    d = cfg.data
    example_b = {k: np.zeros((A, d.benign_batch, d.seq_len), np.int32) for k in
                 ("input_ids", "targets", "loss_mask", "positions", "segment_ids")}
    benign_sh = sharding.batch_shardings(mesh, example_b, leading=1)
    harmful_sh = None
    if "harmful" in streams:
        example_h = {k: np.zeros((A, d.harmful_batch, d.seq_len), np.int32) for k in example_b}
        if obj.target == "soft":
            example_h["target_mu"] = np.zeros((A, d.harmful_batch, d.seq_len, model_cfg.hidden_size),
                                              np.float32)
        harmful_sh = sharding.batch_shardings(mesh, example_h, leading=1)
    rep = sharding.replicated(mesh)
    jit_step = jax.jit(counted_step, in_shardings=(state_sh, benign_sh, harmful_sh, E_sh),
                       out_shardings=(state_sh, rep), donate_argnums=(0,))

    rows_b = sharding.process_rows(d.benign_batch)
    rows_h = sharding.process_rows(d.harmful_batch) if "harmful" in streams else None

    def next_batches():
        b = streams["benign"].next_micro(A)
        b = {k: v[:, rows_b] for k, v in b.items() if k in benign_sh}
        h = None
        if "harmful" in streams:
            h = streams["harmful"].next_micro(A)
            h = {k: v[:, rows_h] for k, v in h.items() if k in harmful_sh}
        return (sharding.put_global_batch(b, benign_sh),
                None if h is None else sharding.put_global_batch(h, harmful_sh))

    # FLOPs: every slot of every row is computed (padding included)
    slots = A * d.seq_len * (d.benign_batch + (d.harmful_batch if "harmful" in streams else 0))
    flops_per_step = model_cfg.flops_per_token(d.seq_len) * slots
    peak = device_peak_flops()
    n_dev = jax.device_count()
    say(f"model FLOPs per step: {flops_per_step:.3e} ({slots} token slots x "
        f"{model_cfg.flops_per_token(d.seq_len):.3e} FLOPs/token, 6N + attention)"
        + (f"; device peak {peak:.3e} FLOP/s x {n_dev}" if peak else "; device peak unknown (no MFU)"))

    # --- loop ------------------------------------------------------------------------------
    total = cfg.run.steps
    end_step = total if max_steps_this_run is None else min(total, start_step + max_steps_this_run)
    tb = _tensorboard(out / "tb") if (cfg.run.tensorboard and _is_main()) else None
    bar = None
    if cfg.run.progress and _is_main() and start_step < end_step:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                   file=sys.stderr)
    metrics_f = open(metrics_path, "a", encoding="utf-8") if _is_main() else None
    history: list[dict] = []
    times: list[float] = []
    stopped = None
    last_good_ckpt = ckpt.latest_step()
    step = start_step
    try:
        while step < end_step:
            benign_b, harmful_b = next_batches()
            t = time.perf_counter()
            state, m = jit_step(state, benign_b, harmful_b, E_hat)
            m = {k: float(v) for k, v in jax.device_get(m).items()}
            dt = time.perf_counter() - t
            step += 1
            times.append(dt)
            rec = {"step": step, **m, "tokens_per_s": m["tokens"] / dt if dt > 0 else None,
                   "step_time_s": dt,
                   "flops_per_step": flops_per_step,
                   "mfu": (flops_per_step / dt / (peak * n_dev)) if (peak and dt > 0) else None}
            if not math.isfinite(m["loss"]):
                stopped = (f"non-finite loss ({m['loss']}) at step {step}: stopping; the last good "
                           f"checkpoint is step {last_good_ckpt} in {ckpt_dir}")
                rec["stopped"] = stopped
                _write_metric(metrics_f, rec)
                break
            history.append(rec)
            _write_metric(metrics_f, rec)
            if tb is not None and step % cfg.run.log_every == 0:
                for k, v in rec.items():
                    if k != "step" and isinstance(v, (int, float)) and v is not None:
                        tb.add_scalar(f"train/{k}", v, step)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{rec['tokens_per_s']:.0f}")
            if ckpt.should_save(step, total):
                if not bool(_params_finite(state["params"])):
                    stopped = (f"non-finite parameters after step {step}: stopping; the last good "
                               f"checkpoint is step {last_good_ckpt} in {ckpt_dir}")
                    break
                meta = {"data": {n: s.position() for n, s in streams.items()}, "config": fingerprint}
                ckpt.save(step, state, meta)
                last_good_ckpt = step
    finally:
        if bar is not None:
            bar.close()
        if metrics_f is not None:
            metrics_f.close()
        if tb is not None:
            tb.close()
        ckpt.wait()

    if stopped:
        ckpt.close()
        say(stopped)
        raise NonFiniteLoss(stopped)

    cache_size = jit_step._cache_size() if hasattr(jit_step, "_cache_size") else -1
    if traces[0] > 1 or cache_size > 1:
        raise TrainError(f"the train step compiled {max(traces[0], cache_size)} times over the run "
                         "(expected once): a batch shape or dtype changed")

    export_dir = None
    if step >= total and cfg.run.export_hf:
        final = optim_lib.export_params(state, ocfg)
        export_dir = ckpt_lib.export_final(final, model_cfg, out / "hf", tokenizer=tok)
    ckpt.close()

    step_time = float(np.median(times[1:])) if len(times) > 1 else (times[0] if times else None)
    mfu = (flops_per_step / step_time / (peak * n_dev)) if (peak and step_time) else None
    res = TrainResult(output_dir=out, steps_run=len(times), final_step=step, metrics=history,
                      compiles=traces[0], cache_size=cache_size, flops_per_step=flops_per_step,
                      step_time_s=step_time, first_step_s=times[0] if times else None, mfu=mfu,
                      export_dir=export_dir, checkpoint_dir=ckpt_dir, resumed_from=resumed_from)
    if times:
        tps = np.mean([r["tokens"] for r in history]) / step_time if step_time else float("nan")
        say(f"steps {start_step + 1}..{step}: first step {times[0]:.2f}s (with compilation), then "
            f"{step_time:.3f}s/step median, {tps:.0f} tokens/s, {flops_per_step / step_time / 1e9:.2f} "
            f"GFLOP/s" + (f", MFU {mfu:.1%}" if mfu is not None else ", MFU n/a (device peak unknown)")
            + f"; step compiled {traces[0]} time(s)")
    return res


@dataclasses.dataclass
class StatePlan:
    optimizer: Any
    init_state: Callable            # (params, key) -> train state
    abstract_params: Any
    param_specs: Any
    param_shardings: Any
    abstract_state: Any
    state_specs: Any
    state_shardings: Any
    fallbacks: list


def plan_state(cfg: config_lib.TrainConfig, model_cfg: model_lib.LlamaConfig, mesh,
               key: jax.Array | None = None) -> StatePlan:
    """Optimizer, abstract train state and its shardings: no array is allocated (eval_shape)."""
    ocfg = cfg.optim
    optimizer = optim_lib.make_optimizer(ocfg)
    key = jax.random.PRNGKey(0) if key is None else key
    fallbacks: list[str] = []
    abstract_params = model_lib.abstract_params(model_cfg)
    param_specs = sharding.tree_specs(abstract_params, model_lib.param_logical_axes(model_cfg), mesh,
                                      fallbacks=fallbacks)

    def init_state(p, k):
        return optim_lib.init_train_state(p, model_cfg, ocfg, optimizer, k)

    abstract_state = jax.eval_shape(init_state, abstract_params, key)
    logical_state = optim_lib.train_state_logical_axes(model_cfg, ocfg, optimizer)
    state_specs = _state_specs(abstract_state, logical_state, mesh, fallbacks)
    return StatePlan(optimizer, init_state, abstract_params, param_specs,
                     sharding.named(mesh, param_specs), abstract_state, state_specs,
                     sharding.named(mesh, state_specs), fallbacks)


def _state_specs(abstract_state, logical_state, mesh, fallbacks):
    """PartitionSpecs of the whole train state from optim.train_state_logical_axes."""
    P = jax.sharding.PartitionSpec
    specs = {}
    for k, sub in abstract_state.items():
        lg = logical_state.get(k)
        if sub is None:
            specs[k] = None
        elif isinstance(sub, jax.ShapeDtypeStruct):  # a single array (step, rng)
            specs[k] = sharding.spec_for(tuple(lg) if isinstance(lg, P) else None, sub.shape, mesh,
                                         name=k, fallbacks=fallbacks)
        elif lg is None or isinstance(lg, P):
            specs[k] = jax.tree_util.tree_map(lambda _: P(), sub)
        else:
            specs[k] = sharding.tree_specs(sub, lg, mesh, fallbacks=fallbacks)
    return specs


def _finished_run(cfg: config_lib.TrainConfig, ckpt_dir: Path) -> "TrainResult | None":
    """The result of a completed run of the same config in ckpt_dir (so reruns are no-ops)."""
    ck = ckpt_lib.Checkpointer(ckpt_dir, every=0, keep_last=cfg.run.keep_last, async_save=False)
    try:
        meta = ck.read_meta()
    finally:
        ck.close()
    if not meta or int(meta.get("step", -1)) != cfg.run.steps or meta.get("config") != _fingerprint(cfg):
        return None
    out = ckpt_dir.parent
    hf = out / "hf"
    if cfg.run.export_hf and not (hf / "config.json").exists():
        return None
    return TrainResult(output_dir=out, steps_run=0, final_step=cfg.run.steps,
                       metrics=read_metrics(out / "metrics.jsonl"), compiles=0, cache_size=0,
                       flops_per_step=float("nan"), step_time_s=None, first_step_s=None, mfu=None,
                       export_dir=hf if cfg.run.export_hf else None, checkpoint_dir=ckpt_dir,
                       resumed_from=None, stopped="already complete")


def _fingerprint(cfg: config_lib.TrainConfig) -> str:
    """A hash of what determines the trajectory (not resume/progress/logging switches)."""
    run = dataclasses.replace(cfg.run, resume=False, progress=True, tensorboard=True,
                              async_checkpoint=True, output_dir="", export_hf=True)
    return ckpt_lib.config_fingerprint(config_lib.to_yaml(dataclasses.replace(cfg, run=run)))


@jax.jit
def _params_finite(params) -> jax.Array:
    leaves = jax.tree_util.tree_leaves(params)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _write_metric(f, rec: dict) -> None:
    if f is None:
        return
    f.write(json.dumps(rec) + "\n")
    f.flush()


def _tensorboard(path: Path):
    try:
        from tensorboardX import SummaryWriter
    except ImportError:  # pragma: no cover
        log.warning("tensorboardX is not installed: no TensorBoard logs")
        return None
    return SummaryWriter(str(path))
