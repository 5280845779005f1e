"""A hard logic-gate network optimised into a *gate program*: the straight-line schedule the
CPU kernel runs.

The network is fixed when it is compiled, so every gate's function is known. ``optimize``
rewrites ``PackedNet`` (layers of 16-way gates) into a DAG of two-input nodes and schedules it:

1. *Folding*, layer by layer: each neuron's gate is applied to what its two inputs are - a
   constant, a node, or a node's negation - and simplified. A gate whose value depends on one
   input only (``a``, ``not b``, ...), a gate of two equal inputs or of a constant becomes an
   alias of a node (maybe negated) or a constant, and costs nothing: its readers read the node
   and absorb the negation into their own gate (a gate of negated inputs is another of the 16).
   What remains is one of the ten truly binary gates, kept as one of eight ops (``OPS``: a gate
   and its mirror, ``a & ~b`` and ``~a & b``, are one op with the inputs swapped).
2. *Sharing*: equal nodes (same op, same inputs, symmetric ops in either order) are one node.
3. *Dead gates*: nodes no class count reads, directly or through other nodes, are dropped.
4. *Levels*: a node runs at 1 + the latest level of its inputs (inputs are level 0), so a node
   whose inputs were folded through aliases may run earlier than its layer.
5. *Runs and slots*: per level, nodes are grouped by op (one loop per (level, op), the op a
   constant in the code) and sorted by the slots they read; each node gets a scratch slot,
   reusing the slots of nodes whose last reader has run (the lowest free first), so the
   scratch holds the live nodes only and stays in cache.

The class counts read each class's member slots (a negated member gets a ``NOT`` node, a
constant member adds to the class's constant); each class's members are padded with a zero
slot to a multiple of ``COUNT_CHUNK`` for the kernel's carry-save counters.
``eval_program_reference`` runs a program in torch, gate by gate: the tests hold it equal to
``eval_packed_reference`` and the kernels equal to it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import heapq
import torch

from .packed import PackedNet, gate_bit

COUNT_CHUNK = 16
# the ops a node can have, in difflogic's numbering (truth table bit 3 - (2a + b) of g):
# and, a & ~b, xor, or, nor, xnor, a | ~b, nand; NOT (12: ~a) only for negated class members
OPS = (1, 2, 6, 7, 8, 9, 11, 14)
NOT = 12
_SYMMETRIC = {1, 6, 7, 8, 9, 14}
_MIRROR = {4: 2, 13: 11}   # ~a & b == b & ~a; ~a | b == b | ~a


@dataclass(frozen=True)
class GateRun:
    """One loop of the kernel: ``S[dst[i]] = op(S[a[i]], S[b[i]])`` for every i."""

    op: int
    level: int
    dst: torch.Tensor   # [n] int32 slots
    a: torch.Tensor
    b: torch.Tensor


@dataclass(frozen=True)
class GateProgram:
    """The schedule of a hard network. Inputs sit in slots ``0..in_dim-1``, ``zero_slot``
    holds zeros; ``members[c]`` are class c's slots (padded with ``zero_slot`` to a multiple
    of ``COUNT_CHUNK``) and ``const[c]`` the count of its members that are constant ones."""

    in_dim: int
    slots: int
    zero_slot: int
    runs: tuple[GateRun, ...]
    members: tuple[torch.Tensor, ...]
    const: tuple[int, ...]
    tau: float
    stats: dict = field(default_factory=dict, compare=False)

    @property
    def classes(self) -> int:
        return len(self.members)

    def gate_count(self) -> int:
        return sum(r.dst.numel() for r in self.runs)


def _table(g: int, na: int, nb: int) -> int:
    """The truth table (difflogic numbering) of gate g with its inputs negated by na, nb."""
    return sum(gate_bit(g, a ^ na, b ^ nb) << (3 - (2 * a + b)) for a in (0, 1) for b in (0, 1))


def _fold_const(g: int, const_a: int | None, const_b: int | None):
    """Gate g with some inputs constant: a function of the other one, as (f(0), f(1))."""
    if const_a is not None and const_b is not None:
        v = gate_bit(g, const_a, const_b)
        return v, v
    if const_a is not None:
        return gate_bit(g, const_a, 0), gate_bit(g, const_a, 1)
    return gate_bit(g, 0, const_b), gate_bit(g, 1, const_b)


class _Builder:
    """Folds layers into hash-consed nodes. A reference is ("c", v) for a constant v or
    (node, neg) for node's value, negated when neg."""

    def __init__(self, in_dim: int):
        self.ops: list[int] = [-1] * in_dim
        self.args: list[tuple[int, int]] = [(-1, -1)] * in_dim
        self.level: list[int] = [0] * in_dim
        self.memo: dict[tuple[int, int, int], int] = {}
        self.folded = self.shared = 0

    def node(self, op: int, a: int, b: int) -> int:
        if op in _MIRROR:
            op, a, b = _MIRROR[op], b, a
        if op in _SYMMETRIC and a > b:
            a, b = b, a
        key = (op, a, b)
        hit = self.memo.get(key)
        if hit is not None:
            self.shared += 1
            return hit
        self.ops.append(op)
        self.args.append((a, b))
        self.level.append(1 + max(self.level[a], self.level[b]))
        self.memo[key] = len(self.ops) - 1
        return len(self.ops) - 1

    def gate(self, g: int, ra, rb):
        ca = ra[1] if ra[0] == "c" else None
        cb = rb[1] if rb[0] == "c" else None
        if ca is not None or cb is not None:
            f = _fold_const(g, ca, cb)
            other = rb if ca is not None else ra
            return self._unary(f, other)
        (xa, na), (xb, nb) = ra, rb
        if xa == xb:   # one input twice: g(x ^ na, x ^ nb), a function of x
            f = (gate_bit(g, na, nb), gate_bit(g, 1 ^ na, 1 ^ nb))
            return self._unary(f, (xa, 0))
        t = _table(g, na, nb)
        fa = (gate_bit(t, 0, 0), gate_bit(t, 1, 0))   # t as a function of a alone, if it is
        if fa == (gate_bit(t, 0, 1), gate_bit(t, 1, 1)):
            return self._unary(fa, (xa, 0))
        fb = (gate_bit(t, 0, 0), gate_bit(t, 0, 1))
        if fb == (gate_bit(t, 1, 0), gate_bit(t, 1, 1)):
            return self._unary(fb, (xb, 0))
        return (self.node(t, xa, xb), 0)

    def _unary(self, f: tuple[int, int], ref):
        """f = (value at 0, value at 1) applied to the value of ref."""
        self.folded += 1
        if f[0] == f[1]:
            return ("c", f[0])
        if ref[0] == "c":
            return ("c", f[ref[1]])
        return (ref[0], ref[1] ^ f[0])   # f = identity (0, 1) or negation (1, 0)


class _Slots:
    """The scratch's slots: the lowest free one is taken first."""

    def __init__(self, n: int):
        self.heap: list[int] = []
        self.top = n

    def free(self, slots: list[int]) -> None:
        for s in slots:
            heapq.heappush(self.heap, s)

    def take(self) -> int:
        if self.heap:
            return heapq.heappop(self.heap)
        self.top += 1
        return self.top - 1


def optimize(net: PackedNet) -> GateProgram:
    """The gate program of ``net`` (see the module docstring)."""
    F = net.in_dim
    bld = _Builder(F)
    refs = [(i, 0) for i in range(F)]
    for layer in net.layers:
        ia, ib, gs = layer.ia.tolist(), layer.ib.tolist(), layer.gates.tolist()
        refs = [bld.gate(g, refs[a], refs[b]) for a, b, g in zip(ia, ib, gs)]
    K, G = net.classes, net.group
    groups = [refs[c * G:(c + 1) * G] for c in range(K)]
    const = [sum(1 for r in grp if r[0] == "c" and r[1] == 1) for grp in groups]
    # negated members: a NOT node each (shared per node)
    members = [[bld.node(NOT, r[0], r[0]) if r[1] else r[0] for r in grp if r[0] != "c"]
               for grp in groups]
    n_nodes = len(bld.ops)
    live = [False] * n_nodes
    stack = [m for grp in members for m in grp]
    while stack:
        v = stack.pop()
        if live[v]:
            continue
        live[v] = True
        if v >= F:
            stack.extend(bld.args[v])
    last = [-1] * n_nodes   # level of the last reader (a member: after every level)
    for v in range(F, n_nodes):
        if live[v]:
            for u in set(bld.args[v]):
                last[u] = max(last[u], bld.level[v])
    end = max(bld.level) + 1
    for grp in members:
        for m in grp:
            last[m] = end
    by_level: dict[int, list[int]] = {}
    for v in range(F, n_nodes):
        if live[v]:
            by_level.setdefault(bld.level[v], []).append(v)
    slot = [-1] * n_nodes
    for i in range(F):
        slot[i] = i
    used = _Slots(F)
    releases: dict[int, list[int]] = {}
    for v in range(n_nodes):
        if v < F or live[v]:
            releases.setdefault(last[v], []).append(v)
    runs = []
    for lvl in sorted(by_level):
        for lv in [k for k in releases if k < lvl]:   # read for the last time: free
            used.free([slot[v] for v in releases.pop(lv)])
        nodes = by_level[lvl]
        nodes.sort(key=lambda v: (bld.ops[v], min(slot[u] for u in bld.args[v]), v))
        i = 0
        while i < len(nodes):
            j = i
            while j < len(nodes) and bld.ops[nodes[j]] == bld.ops[nodes[i]]:
                j += 1
            grp = nodes[i:j]
            for v in grp:
                slot[v] = used.take()
            t = lambda xs: torch.tensor(xs, dtype=torch.int32)  # noqa: E731
            runs.append(GateRun(bld.ops[grp[0]], lvl, t([slot[v] for v in grp]),
                                t([slot[bld.args[v][0]] for v in grp]),
                                t([slot[bld.args[v][1]] for v in grp])))
            i = j
    top = used.top
    zero = top
    padded = []
    for grp in members:
        s = [slot[m] for m in grp]
        s += [zero] * (-len(s) % COUNT_CHUNK)
        padded.append(torch.tensor(s, dtype=torch.int32))
    gates_in = net.gate_count()
    kept = sum(r.dst.numel() for r in runs)
    stats = {"gates": gates_in, "ops": kept, "removed": gates_in - kept,
             "folded": bld.folded, "shared": bld.shared,
             "dead": sum(1 for v in range(F, n_nodes) if not live[v]),
             "levels": len(by_level), "runs": len(runs), "slots": zero + 1}
    return GateProgram(F, zero + 1, zero, tuple(runs), tuple(padded), tuple(const),
                       net.tau, stats)


def _apply(op: int, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Gate ``op`` on int64 words, as the kernels compute it."""
    if op == 1:
        return a & b
    if op == 2:
        return a & ~b
    if op == 6:
        return a ^ b
    if op == 7:
        return a | b
    if op == 8:
        return ~(a | b)
    if op == 9:
        return ~(a ^ b)
    if op == 11:
        return a | ~b
    if op == 14:
        return ~(a & b)
    if op == NOT:
        return ~a
    raise ValueError(f"not an op of a gate program: {op}")


def eval_program_reference(prog: GateProgram, x: torch.Tensor) -> torch.Tensor:
    """Class counts [N, classes] (int64) of bool inputs [N, in_dim], run on 0/1 words in torch
    (bit 0 of each int64 is the sample's value): what the kernels compute."""
    S = torch.zeros(prog.slots, x.shape[0], dtype=torch.int64)
    S[:prog.in_dim] = x.t().to(torch.int64)
    for r in prog.runs:
        a, b = r.a.long(), r.b.long()
        S[r.dst.long()] = _apply(r.op, S[a], S[b]) & 1
    counts = [S[m.long()].sum(0) + c for m, c in zip(prog.members, prog.const)]
    return torch.stack(counts, 1)
