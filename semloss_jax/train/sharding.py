"""Device mesh, the logical-axis rule table, and NamedShardings for the train state and batches.

Mesh axes are ("data", "fsdp", "tensor"):
- "data": pure data parallelism (params replicated along it);
- "fsdp": data parallelism whose params/optimizer state are sharded along it (ZeRO-3 style:
  XLA all-gathers the weights for the matmuls and reduce-scatters the gradients);
- "tensor": Megatron-style model parallelism of heads / MLP width / vocabulary.

The model names every parameter dimension with a logical axis (model.param_logical_axes:
vocab, embed, q_heads, kv_heads, head_dim, mlp, layers, norm); `RULES` maps those to mesh axes.
A rule is a preference: when the mesh axis size does not divide the dimension, or the mesh axis is
already used by another dimension of the same array, that dimension is replicated instead
(the fallback is reported as a warning; `mesh.strict` turns it into a ShardingError). Batches are
sharded along ("data", "fsdp").

Activations are sharded the same way: the model and the loss head name the axes of their
activations (models/axes.py), and `ACTIVATION_RULES` maps those names while the step is traced
(`activation_resolver`, entered by `traced_with_activation_rules`): rows over data x fsdp (each
device computes only its rows, and XLA all-gathers the fsdp-sharded weights for the matmuls),
heads, MLP width and vocabulary tiles over tensor, and the residual stream between blocks
sharded over tensor along the positions (sequence parallelism: the tensor-parallel matmul
outputs are reduce-scattered instead of all-reduced).

Nothing here knows about the objective: the train step is sharding-free; the trainer passes the
shardings built here to jax.jit(in_shardings=..., out_shardings=...).
"""
from __future__ import annotations

import logging
import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
import optax
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from semloss_jax.errors import ShardingError
from semloss_jax.models import axes
from semloss_jax.paths import distributed_env

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical axis name -> mesh axis (or None = replicated)
RULES: dict[str, str | tuple[str, ...] | None] = {
    "embed": "fsdp",
    "vocab": "tensor",
    "mlp": "tensor",
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "layers": None,
    "norm": None,
    # the LoRA rank axis (lora.lora_logical_axes): small, replicated
    "lora": None,
}

# activation logical axis (models/axes.py) -> mesh axis
ACTIVATION_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": BATCH_AXES,
    "seq": None,
    "res_seq": "tensor",
    "embed": None,
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "vocab": "tensor",
}

# params of at least this many bytes left replicated over every model axis (fsdp, tensor) of a
# mesh that has one are reported like a fallback
LARGE_PARAM_BYTES = 4 * 2**20


# ---------------------------------------------------------------------------------------------
# Mesh


def resolve_mesh_shape(sizes: Sequence[int], n_devices: int) -> tuple[int, int, int]:
    """Fill the one -1 entry so that the product is n_devices; check it divides exactly."""
    sizes = list(sizes)
    if len(sizes) != 3:
        raise ShardingError(f"mesh needs 3 sizes (data, fsdp, tensor), got {sizes}")
    fill = [i for i, s in enumerate(sizes) if s == -1]
    if len(fill) > 1:
        raise ShardingError(f"mesh {sizes}: at most one axis may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if fill:
        if n_devices % known:
            raise ShardingError(f"mesh {dict(zip(MESH_AXES, sizes))}: {n_devices} devices are not a "
                                f"multiple of {known}")
        sizes[fill[0]] = n_devices // known
    if math.prod(sizes) != n_devices:
        raise ShardingError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                            f"but {n_devices} are available")
    return tuple(sizes)  # type: ignore[return-value]


def _devices_line(devices: Sequence[jax.Device]) -> str:
    kinds = sorted({getattr(d, "device_kind", d.platform) for d in devices})
    return (f"{len(devices)} {devices[0].platform if devices else 'no'} device(s) ({', '.join(kinds)}; "
            f"{jax.process_count()} process(es), jax {jax.__version__})")


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A Mesh with axes ("data", "fsdp", "tensor") from a config section (data/fsdp/tensor sizes).

    A mesh that does not fit the devices is a ShardingError naming the devices JAX sees (a
    CPU-only jax on a GPU/TPU host shows up here); when the topology-aware device order is not
    available, the plain order is used and the reason logged as a warning.
    """
    devices = list(devices if devices is not None else jax.devices())
    sizes = (mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor)
    if -1 not in sizes and math.prod(sizes) < len(devices):
        # an explicit smaller mesh: use the first devices (tests, a 1-device baseline)
        log.warning("mesh %s uses %d of %d devices", dict(zip(MESH_AXES, sizes)), math.prod(sizes),
                    len(devices))
        devices = devices[:math.prod(sizes)]
    try:
        shape = resolve_mesh_shape(sizes, len(devices))
    except ShardingError as e:
        hint = ("; a GPU or TPU host needs the accelerator jax: pip install -e '.[cuda12]' or -e '.[tpu]'"
                if devices and devices[0].platform == "cpu" else "")
        raise ShardingError(f"{e}: JAX sees {_devices_line(devices)} (config keys mesh.data/fsdp/tensor)"
                            f"{hint}") from None
    try:  # topology-aware device order on TPU/GPU; plain order otherwise
        arr = mesh_utils.create_device_mesh(shape, devices=devices)
    except (ValueError, NotImplementedError, AssertionError) as e:  # what create_device_mesh raises
        if devices[0].platform != "cpu":
            log.warning("mesh %s: no topology-aware device order (%s: %s); using the plain device order",
                        shape, type(e).__name__, e)
        arr = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(arr, MESH_AXES)


# ---------------------------------------------------------------------------------------------
# Rules -> PartitionSpecs


def _axis_size(mesh: Mesh, axis) -> int:
    if axis is None:
        return 1
    if isinstance(axis, tuple):
        return math.prod(mesh.shape[a] for a in axis)
    return mesh.shape[axis]


def _axis_names(axis) -> tuple[str, ...]:
    if axis is None:
        return ()
    return axis if isinstance(axis, tuple) else (axis,)


def spec_for(logical: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh,
             rules: Mapping[str, Any] = RULES, name: str = "", fallbacks: list | None = None) -> P:
    """PartitionSpec for one array: logical names -> mesh axes, with the divisibility fallback."""
    if logical is None or len(logical) == 0:
        return P()
    if len(logical) != len(shape):
        raise ShardingError(f"{name}: logical axes {tuple(logical)} do not match shape {tuple(shape)}")
    used: set[str] = set()
    out = []
    for dim, (lname, size) in enumerate(zip(logical, shape)):
        if lname is None:
            out.append(None)
            continue
        if lname not in rules:
            raise ShardingError(f"{name}: logical axis {lname!r} has no rule (known: {sorted(rules)})")
        axis = rules[lname]
        names = _axis_names(axis)
        n = _axis_size(mesh, axis)
        if axis is None or n == 1:
            out.append(None)
            continue
        if used & set(names):
            msg = f"{name}: dim {dim} ({lname}) replicated: mesh axis {axis} already used in this array"
            out.append(None)
        elif size % n:
            msg = f"{name}: dim {dim} ({lname}={size}) replicated: not divisible by mesh {axis}={n}"
            out.append(None)
        else:
            out.append(axis)
            used |= set(names)
            continue
        if fallbacks is not None:
            fallbacks.append(msg)
    while out and out[-1] is None:
        out.pop()
    return P(*out)


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def tree_specs(abstract_tree, logical_tree, mesh: Mesh, rules: Mapping[str, Any] = RULES,
               fallbacks: list | None = None):
    """PartitionSpecs for a pytree of arrays/ShapeDtypeStructs given its logical-axes pytree."""
    def is_leaf(x):
        return isinstance(x, P) or x is None

    def one(path, logical, leaf):
        return spec_for(tuple(logical) if logical is not None else None, leaf.shape, mesh, rules,
                        name=_path_str(path), fallbacks=fallbacks)

    return jax.tree_util.tree_map_with_path(
        lambda path, logical, leaf: one(path, logical, leaf), logical_tree, abstract_tree,
        is_leaf=is_leaf)


def replicated_large_params(abstract_tree, specs, mesh: Mesh, min_bytes: int = LARGE_PARAM_BYTES,
                            prefix: str = "") -> list[str]:
    """Messages for params of at least min_bytes that no model axis (fsdp, tensor) of the mesh
    shards (none when the mesh has no model axis: pure data parallelism replicates by design)."""
    if _axis_size(mesh, ("fsdp", "tensor")) == 1:
        return []
    out = []
    flat = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, P))[0]
    for (path, spec), leaf in zip(flat, jax.tree_util.tree_leaves(abstract_tree)):
        used = {n for ax in spec for n in _axis_names(ax)}
        size = math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
        if size >= min_bytes and not used & {"fsdp", "tensor"}:
            out.append(f"{prefix}{_path_str(path)}: {size / 2**20:.0f} MiB replicated on every fsdp/tensor "
                       f"device (spec {spec})")
    return out


def report_fallbacks(messages: Sequence[str], strict: bool, what: str = "sharding") -> None:
    """Log each message as a warning; with strict, stop with a ShardingError naming the first."""
    msgs = sorted(set(messages))
    if strict and msgs:
        raise ShardingError(f"{what}: {msgs[0]} ({len(msgs)} in all; mesh.strict=true stops here: change "
                            f"the mesh sizes or set mesh.strict=false to run with them replicated)")
    for m in msgs:
        log.warning("%s fallback: %s", what, m)


def activation_resolver(mesh: Mesh, rules: Mapping[str, Any] = ACTIVATION_RULES,
                        fallbacks: list | None = None, strict: bool = False):
    """resolve(names, shape) -> NamedSharding of an activation, for models/axes.activation_sharding.

    The divisibility fallback of the param rules applies; fallbacks are appended to `fallbacks`
    (once per message) or, with strict, raised as a ShardingError while the step is traced."""
    def resolve(names, shape):
        found: list[str] = []
        spec = spec_for(tuple(names), tuple(shape), mesh, rules, name=f"activation {tuple(names)}",
                        fallbacks=found)
        if found and strict:
            report_fallbacks(found, True, "activation sharding")
        if fallbacks is not None:
            fallbacks.extend(m for m in found if m not in fallbacks)
        return NamedSharding(mesh, spec)

    return resolve


def traced_with_activation_rules(fn, resolve):
    """fn, run inside models.axes.activation_sharding(resolve): its activation names become sharding
    constraints when it is traced (by jax.jit)."""
    def wrapped(*args, **kwargs):
        with axes.activation_sharding(resolve):
            return fn(*args, **kwargs)

    return wrapped


def named(mesh: Mesh, specs):
    """NamedShardings on mesh for a pytree of PartitionSpecs."""
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs,
                                  is_leaf=lambda x: isinstance(x, P))


def replicated(mesh: Mesh) -> NamedSharding:
    """A NamedSharding that puts a full copy on every device of mesh."""
    return NamedSharding(mesh, P())


# ---------------------------------------------------------------------------------------------
# Batches


def batch_spec(ndim: int, leading: int = 0) -> P:
    """Shard the batch axis (after `leading` unsharded axes, e.g. the micro-batch axis)."""
    return P(*([None] * leading), BATCH_AXES, *([None] * (ndim - leading - 1)))


def batch_shardings(mesh: Mesh, batch: Mapping[str, Any], leading: int = 1):
    """NamedShardings for a batch dict of arrays [grad_accum, B, T, ...] (batch axis = `leading`)."""
    n = _axis_size(mesh, BATCH_AXES)
    out = {}
    for k, v in batch.items():
        shape = np.shape(v)
        if len(shape) <= leading:
            out[k] = replicated(mesh)
            continue
        if shape[leading] % n:
            raise ShardingError(f"batch field {k!r}: batch size {shape[leading]} is not divisible by "
                                f"the data x fsdp mesh size {n}")
        out[k] = NamedSharding(mesh, batch_spec(len(shape), leading))
    return out


def put_global_batch(batch: Mapping[str, np.ndarray], shardings: Mapping[str, NamedSharding],
                     leading: int = 1) -> dict:
    """Host numpy arrays -> global jax.Arrays.

    Single process: `batch` is the whole global batch. Multi-process: `batch` holds this process's
    rows of the global batch (its contiguous slice along the batch axis, see `process_rows`), and
    jax.make_array_from_process_local_data assembles the global array.
    """
    out = {}
    nproc = jax.process_count()
    for k, v in batch.items():
        v = np.asarray(v)
        sh = shardings[k]
        if nproc == 1:
            out[k] = jax.device_put(v, sh)
        else:
            gshape = list(v.shape)
            if len(gshape) > leading:
                gshape[leading] *= nproc
            out[k] = jax.make_array_from_process_local_data(sh, v, tuple(gshape))
    return out


def process_rows(global_rows: int) -> slice:
    """The rows of a global batch that this process loads (contiguous, equal shares)."""
    n, i = jax.process_count(), jax.process_index()
    if global_rows % n:
        raise ShardingError(f"global batch of {global_rows} rows is not divisible by {n} processes")
    per = global_rows // n
    return slice(i * per, (i + 1) * per)


# ---------------------------------------------------------------------------------------------
# The train state


def opt_state_specs(optimizer: optax.GradientTransformation, abstract_opt_state, param_specs):
    """Optimizer-state PartitionSpecs: leaves that mirror params take the param's spec
    (optax.tree_map_params), everything else (counts, scalars) is replicated. Entries that
    optax.masked leaves out (MaskedNode: no state for a frozen param) stay MaskedNode."""
    def spec_of(leaf, spec):
        return leaf if isinstance(leaf, optax.MaskedNode) else spec

    return optax.tree_map_params(
        optimizer, spec_of, abstract_opt_state, param_specs,
        transform_non_params=lambda _leaf: P(),
        is_leaf=lambda x: isinstance(x, (P, optax.MaskedNode)))


def state_specs(abstract_state: Mapping[str, Any], *, optimizer, trainable_logical, frozen_logical,
                mesh: Mesh, rules: Mapping[str, Any] = RULES, fallbacks: list | None = None) -> dict:
    """PartitionSpecs for the train state dict {"params", "frozen", "opt_state", "step", "rng"}.

    trainable_logical: logical axes of state["params"] (model axes, or LoRA axes);
    frozen_logical: logical axes of state["frozen"] (None when there is no frozen part).
    Extra keys of the state (scalars, keys) are replicated.
    """
    specs = {}
    specs["params"] = tree_specs(abstract_state["params"], trainable_logical, mesh, rules, fallbacks)
    frozen = abstract_state.get("frozen")
    specs["frozen"] = (None if frozen is None else
                       tree_specs(frozen, frozen_logical, mesh, rules, fallbacks))
    specs["opt_state"] = opt_state_specs(optimizer, abstract_state["opt_state"], specs["params"])
    for k, v in abstract_state.items():
        if k not in specs:
            specs[k] = jax.tree_util.tree_map(lambda _: P(), v)
    return specs


# ---------------------------------------------------------------------------------------------
# Multi-host


def maybe_initialize_distributed(dist_cfg, environ: Mapping[str, str] | None = None) -> bool:
    """Call jax.distributed.initialize when the config or the environment asks for it.

    Environment (overrides empty config fields): SEMLOSS_COORDINATOR, SEMLOSS_NUM_PROCESSES,
    SEMLOSS_PROCESS_ID. With enabled=true and nothing given, JAX auto-detects the cluster
    (TPU pods, SLURM, Open MPI). Returns whether it initialized.
    """
    env = distributed_env(environ)  # paths.py: the one place that reads the environment
    addr = dist_cfg.coordinator_address or env["coordinator_address"]
    nproc = dist_cfg.num_processes or env["num_processes"]
    pid = dist_cfg.process_id if dist_cfg.process_id >= 0 else env["process_id"]
    if not (dist_cfg.enabled or addr):
        return False
    kw = {}
    if addr:
        kw["coordinator_address"] = addr
    if nproc:
        kw["num_processes"] = nproc
    if pid >= 0:
        kw["process_id"] = pid
    try:
        jax.distributed.initialize(**kw)
    except (ValueError, RuntimeError) as e:  # no cluster found, or the coordinator unreachable
        raise ShardingError(
            f"distributed: jax.distributed.initialize({', '.join(f'{k}={v!r}' for k, v in kw.items())})"
            f" failed: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}; on "
            f"one host set distributed.enabled=false, otherwise give distributed.coordinator_address,"
            f" num_processes and process_id (or SEMLOSS_COORDINATOR / SEMLOSS_NUM_PROCESSES / "
            f"SEMLOSS_PROCESS_ID)") from e
    return True


def to_host(tree):
    """NumPy copies of (possibly multi-process sharded) arrays; call it on EVERY process
    (the gather is collective)."""
    if jax.process_count() > 1:
        return jax.tree_util.tree_map(
            lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), tree)
    return jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x)), tree)
