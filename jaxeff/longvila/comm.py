"""Communication volume of 2D attention: read from compiled HLO and from the analytic formula.

`hlo_collective_bytes` walks a compiled (SPMD-partitioned, per-device) HLO module and sums, per collective kind,
the operand bytes each device contributes, multiplying ops inside `while` bodies by their known trip count (the
ring's `lax.scan`). "Wire" bytes are what one device sends under the usual algorithms: all-to-all (g-1)/g of its
operand, all-gather its operand g-1 times, collective-permute its operand once, all-reduce 2(g-1)/g.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict

from jaxeff.longvila.attention import kv_repeat_factor

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
                "s64": 8, "u64": 8, "f64": 8}
COLLECTIVES = ("all-to-all", "collective-permute", "all-gather", "all-reduce", "reduce-scatter")
_OP = re.compile(r"=\s+(.*?)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(")
_ARRAY = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")
_CALLEE = re.compile(r"\b(body|condition|calls|to_apply|true_computation|false_computation)=%([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")


def _array_bytes(shape_text: str) -> list[int]:
    out = []
    for dtype, dims in _ARRAY.findall(shape_text):
        if dtype in _DTYPE_BYTES:
            n = 1
            for d in filter(None, dims.split(",")):
                n *= int(d)
            out.append(n * _DTYPE_BYTES[dtype])
    return out


def _group_size(line: str) -> int:
    m = re.search(r"replica_groups=\{\{([\d,]*)\}", line)
    if m:
        return len(m.group(1).split(","))
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]", line)  # iota form [num_groups, group_size]
    if m:
        return int(m.group(2))
    # Mesh form (XLA with jax >= 0.12): replica_groups=mesh['ring'=2,'ulysses'=4] {'ulysses'}
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line)
    if m:
        sizes = {name: int(n) for name, n in re.findall(r"'([^']+)'=(\d+)", m.group(1))}
        return math.prod(sizes[name] for name in re.findall(r"'([^']+)'", m.group(2)))
    return 1


def hlo_collective_bytes(hlo_text: str) -> dict[str, dict[str, float]]:
    """Per collective kind: {"ops", "operand_bytes", "wire_bytes"} per device for one execution of the module."""
    comps: dict[str, list[str]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        m = _HEADER.match(line)
        if m and not line.startswith("HloModule"):
            current = m.group(2)
            comps[current] = []
            if m.group(1):
                entry = current
        elif current is not None:
            comps[current].append(line)
    if entry is None:
        raise ValueError("no ENTRY computation found in the HLO text")
    # Execution count of every computation: while bodies run known_trip_count times per call.
    mult: dict[str, float] = defaultdict(float)
    mult[entry] = 1.0
    order = [entry]
    for name in order:
        for line in comps.get(name, []):
            trip = _TRIP.search(line)
            callees = [(kind, c) for kind, c in _CALLEE.findall(line)]
            for b in _BRANCHES.findall(line):
                callees += [("branch", c.strip().lstrip("%")) for c in b.split(",")]
            for kind, callee in callees:
                factor = int(trip.group(1)) if (trip and kind == "body") else 1
                mult[callee] += mult[name] * factor
                if callee not in order:
                    order.append(callee)
    totals: dict[str, dict[str, float]] = {k: {"ops": 0.0, "operand_bytes": 0.0, "wire_bytes": 0.0}
                                           for k in COLLECTIVES}
    for name, lines in comps.items():
        for line in lines:
            m = _OP.search(line)
            if not m or mult[name] == 0:
                continue
            shape, kind, is_start = m.group(1), m.group(2), m.group(3)
            sizes = _array_bytes(shape)
            if is_start:  # async start ops return (operand, result, ...): count the operand
                sizes = sizes[:1]
            g = _group_size(line)
            result = float(sum(sizes))
            operand = {"all-gather": result / g, "reduce-scatter": result * g}.get(kind, result)
            if is_start and kind == "all-gather":
                operand = result
            wire = {"all-to-all": operand * (g - 1) / g, "all-gather": operand * (g - 1),
                    "all-reduce": 2 * operand * (g - 1) / g, "reduce-scatter": operand * (g - 1) / g,
                    "collective-permute": operand}[kind]
            t = totals[kind]
            t["ops"] += mult[name]
            t["operand_bytes"] += mult[name] * operand
            t["wire_bytes"] += mult[name] * wire
    return {k: v for k, v in totals.items() if v["ops"]}


def analytic_attention_bytes(batch: int, seq: int, heads: int, kv_heads: int, head_dim: int, ring: int,
                             ulysses: int, dtype_bytes: int = 2, pos_bytes: int = 4) -> dict[str, float]:
    """Forward bytes one device sends per attention layer in `sp_attention_local` (wire bytes, as above).

    Ulysses: all-to-all of q, k, v (KV heads repeated to a multiple of U) and of the output: operand
    B(S/N)(2H + 2H_kv')D, of which (U-1)/U leaves the device; plus the all-gather of the positions.
    Ring: R-1 hops of K and V for the ring block (S/R tokens, H_kv'/U heads) plus their positions.
    """
    n = ring * ulysses
    local = batch * seq // n
    hkv = kv_heads * kv_repeat_factor(heads, kv_heads, ulysses)
    out = {"all-to-all": 0.0, "all-gather": 0.0, "collective-permute": 0.0}
    if ulysses > 1:
        out["all-to-all"] = local * (2 * heads + 2 * hkv) * head_dim * dtype_bytes * (ulysses - 1) / ulysses
        out["all-gather"] = local * pos_bytes * (ulysses - 1)
    if ring > 1:
        block = batch * seq // ring
        out["collective-permute"] = (ring - 1) * (2 * block * (hkv // ulysses) * head_dim * dtype_bytes
                                                  + block * pos_bytes)
    return out
