"""The HLO collectives parser, bench/memory_plan.py and bench/gpu_check.py (their CPU paths)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from semloss_jax.train import hlo

REPO = Path(__file__).resolve().parent.parent

HLO_TEXT = """HloModule jit_step

%body.1 (p: (s32[], f32[4,64,32])) -> (s32[], f32[4,64,32]) {
  %ag = f32[128,32]{1,0} all-gather(f32[16,32]{1,0} %w), dimensions={0}
  %ar = f32[4,64,32]{2,1,0} all-reduce(f32[4,64,32]{2,1,0} %x), to_apply=%add
  %inner = (s32[]) while((s32[]) %t), condition=%cond.2, body=%body.2
}

%body.2 (q: (s32[])) -> (s32[]) {
  %ag2 = (f32[8,8]{1,0}, bf16[8]{0}) all-gather((f32[1,8]{1,0}, bf16[1]{0}) %z), dimensions={0}
}

ENTRY %main (a: f32[4,64,32]) -> f32[4,64,32] {
  %loop = (s32[], f32[4,64,32]) while((s32[], f32[4,64,32]) %init), condition=%cond.1, body=%body.1, \
backend_config={"known_trip_count":{"n":"2"}}
  %rs = f32[16,32]{1,0} reduce-scatter(f32[128,32]{1,0} %g), dimensions={0}, to_apply=%add
  ROOT %cp = f32[4,64,32]{2,1,0} collective-permute(f32[4,64,32]{2,1,0} %a), source_target_pairs={{0,1}}
}
"""


def test_collectives_by_kind_size_and_layer_scan():
    c = hlo.collectives(HLO_TEXT, n_layers=2)
    assert c["all_gather"]["count"] == 2 and c["all_gather"]["in_layer_scan"] == 2   # nested while too
    assert "(f32[8,8], bf16[8]) (0.0 MiB) [layer scan]" in c["all_gather"]["by_size"]
    assert c["all_reduce"]["in_layer_scan"] == 1
    assert c["all_reduce"]["largest_in_layer_scan_bytes"] == 4 * 64 * 32 * 4
    assert c["reduce_scatter"]["count"] == 1 and c["reduce_scatter"]["in_layer_scan"] == 0
    assert c["collective_permute"]["count"] == 1 and c["all_to_all"]["count"] == 0
    assert hlo.collectives(HLO_TEXT, n_layers=3)["all_reduce"]["in_layer_scan"] == 0   # not the layer scan
    assert hlo.shape_bytes("(f32[2,3], bf16[4])") == 2 * 3 * 4 + 4 * 2
    assert hlo.activation_shaped("f32[4,64,32] [layer scan]", rows=4, seq_len=64)
    assert hlo.activation_shaped("f32[256,32]", rows=4, seq_len=64)          # tokens flattened
    assert not hlo.activation_shaped("f32[128,32]", rows=4, seq_len=64)
    # a weight whose leading dim happens to equal rows x seq_len is not an activation
    assert hlo.activation_shaped("(f32[64,128], f32[64]) [layer scan]", rows=1, seq_len=64)
    weights = hlo.param_shapes({"w": jax.ShapeDtypeStruct((2, 64, 128), jnp.float32),
                                "norm": jax.ShapeDtypeStruct((2, 64), jnp.float32)})
    assert not hlo.activation_shaped("(f32[64,128], f32[64]) [layer scan]", rows=1, seq_len=64,
                                     weight_shapes=weights)
    assert hlo.activation_shaped("(f32[64,128], f32[1,64,64])", rows=1, seq_len=64, weight_shapes=weights)


def _run(args, env=None, timeout=900):
    p = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                       env=dict(os.environ, **(env or {})))
    assert p.returncode == 0, p.stderr[-4000:]
    return p.stdout, json.loads(p.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_memory_plan_on_fake_devices():
    """The real step of a config on 8 fake devices: memory figures and collectives, JSON last."""
    out, res = _run(["bench/memory_plan.py", "configs/smoke.yaml", "--devices", "8", "mesh.data=1",
                     "mesh.fsdp=8", "data.seq_len=64"])
    assert res["devices"] == 8 and res["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    for k in ("peak_gib", "temp_gib", "argument_gib", "all_gather", "reduce_scatter", "all_reduce"):
        assert k in res
    assert res["peak_gib"] == pytest.approx(res["argument_gib"] + res["output_gib"] - res["alias_gib"]
                                            + res["temp_gib"])
    assert res["weight_all_gathers_in_layer_scan"] > 0 and res["activation_all_reduces_in_layer_scan"] == []
    assert res["attention"] == "chunked" and res["head_tile"] == 8192
    assert "per device: arguments" in out


@pytest.mark.slow
def test_gpu_check_cpu_path():
    """bench/gpu_check.py on tiny shapes (CPU): both contenders run on the same token slots."""
    out, res = _run(["bench/gpu_check.py", "--tiny", "--steps", "1", "--warmup", "1", "--rows", "4"])
    assert res["sft"]["slots"] == res["tasft"]["slots"] == 4 * 64
    assert res["tasft"]["head_tile"] > 0 and res["sft"]["mfu"] is None   # no peak FLOP/s on a CPU
    assert res["ratios"]["memory_source"] == "compiled_bytes" and res["ratios"]["step_time"] > 0
    assert "TA-SFT / SFT: step time" in out
