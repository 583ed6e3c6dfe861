"""Collective operations in compiled HLO text: which, how large, and whether inside the layer scan.

    text = jax.jit(f).lower(...).compile().as_text()
    coll = collectives(text, n_layers)    # {"all_gather": {"count", "in_layer_scan", "by_size", ...}, ...}

The layer scan is recognized as the while loops whose known trip count is the number of layers;
every computation reachable from their bodies counts as inside it. Used by bench/memory_plan.py
and by the tests that check how a compiled step communicates.
"""
from __future__ import annotations

import re
from collections import defaultdict

import jax

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "collective-permute", "all-to-all")
_OP = re.compile(r"^\s*(?:ROOT )?%\S+ = (.+?) (" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
_LAYOUT = re.compile(r"\{[^{}]*\}")
_COMP = re.compile(r"^(?:ENTRY )?%(\S+) .*\{$")
_CALLS = re.compile(r"(?:body|condition|calls|to_apply|branch_computations)=\{?%([\w.\-]+)")
_TRIP = re.compile(r"known_trip_count\":\{\"n\":\"(\d+)\"")
_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "f64": 8, "s8": 1, "u8": 1}


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO result type such as bf16[4,512,4096] (tuples: the sum of their parts)."""
    total = 0
    for dt, dims in re.findall(r"(\w+)\[([\d,]*)\]", shape):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * _BYTES.get(dt, 4)
    return total


def hlo_computations(text: str) -> dict[str, list[str]]:
    """Computation name -> its lines, from the compiled HLO text."""
    comps, cur = {}, None
    for line in text.splitlines():
        m = _COMP.match(line)
        if m:
            cur = m.group(1)
            comps[cur] = []
        elif cur is not None:
            comps[cur].append(line)
    return comps


def layer_scan_computations(comps: dict[str, list[str]], n_layers: int) -> set[str]:
    """Every computation reachable from the body of a while loop that runs n_layers times."""
    roots = set()
    for lines in comps.values():
        for line in lines:
            if " while(" in line:
                trip = _TRIP.search(line)
                body = re.search(r"body=%([\w.\-]+)", line)
                if trip and body and int(trip.group(1)) == n_layers:
                    roots.add(body.group(1))
    seen, todo = set(), list(roots)
    while todo:
        c = todo.pop()
        if c in seen or c not in comps:
            continue
        seen.add(c)
        for line in comps[c]:
            todo.extend(_CALLS.findall(line))
    return seen


def collectives(text: str, n_layers: int) -> dict:
    """The collective ops of the HLO by kind: count, bytes and the sizes, inside the layer scan or not."""
    comps = hlo_computations(text)
    in_scan = layer_scan_computations(comps, n_layers)
    out = {k.replace("-", "_"): {"count": 0, "in_layer_scan": 0, "largest_in_layer_scan_bytes": 0,
                                  "by_size": defaultdict(int)} for k in COLLECTIVES}
    for name, lines in comps.items():
        for line in lines:
            m = _OP.match(line)
            if not m:
                continue
            rec = out[m.group(2).replace("-", "_")]
            shape = _LAYOUT.sub("", m.group(1))     # layouts off; tuples (combined ops) kept whole
            b = shape_bytes(shape)
            rec["count"] += 1
            where = " [layer scan]" if name in in_scan else ""
            rec["by_size"][f"{shape} ({b / 2**20:.1f} MiB){where}"] += 1
            if name in in_scan:
                rec["in_layer_scan"] += 1
                rec["largest_in_layer_scan_bytes"] = max(rec["largest_in_layer_scan_bytes"], b)
    for rec in out.values():
        rec["by_size"] = dict(sorted(rec["by_size"].items(), key=lambda kv: -shape_bytes(kv[0])))
    return out


def activation_shaped(shape: str, rows: int, seq_len: int, global_rows: int | None = None,
                      weight_shapes: frozenset = frozenset()) -> bool:
    """Whether an HLO result type holds activations: some part [r, seq_len, ...] with r at most the
    global rows of a micro-batch (a device's rows, or all of them when activations are not
    sharded), or [r x seq_len, ...] with r = rows or global_rows (tokens flattened).
    weight_shapes: shapes of parameters (`param_shapes`); a part of exactly such a shape is a
    weight, not an activation (on small models a hidden size can equal rows x seq_len)."""
    top = max(rows, global_rows or rows)
    flat = {rows * seq_len, top * seq_len}
    for dims in re.findall(r"\w+\[([\d,]*)\]", shape):
        d = [int(x) for x in dims.split(",") if x]
        if tuple(d) in weight_shapes:
            continue
        if (len(d) >= 2 and d[1] == seq_len and d[0] <= top) or (d and d[0] in flat):
            return True
    return False


def param_shapes(abstract_params, layer_axis: bool = True) -> frozenset:
    """The shapes of every parameter leaf, and (layer_axis) of one layer of a scanned stack."""
    shapes = set()
    for leaf in jax.tree_util.tree_leaves(abstract_params):
        shapes.add(tuple(leaf.shape))
        if layer_axis and len(leaf.shape) > 1:
            shapes.add(tuple(leaf.shape[1:]))
    return frozenset(shapes)
