"""Steps made of several chunk-form updates, run as sub-steps: n per token.

A step that applies several rank-1 erases in a row (DeltaProduct's Householder products), or
whose write is a rank-R contraction ``kt @ vt`` (Mamba-3's MIMO), is not one step of the
chunk forms, but it is a short sequence of them. ``split`` finds that sequence in the IR:

- the *cuts*: values of the state's dims that every path from the new state back to the old
  one passes through (``S1 = exp(g) * S``, ``S2 = S1 + b1 k1 (v1 - k1^T S1)``, ...), in order;
- greedily, the longest runs of cuts whose composed transition is one update
  ``S' = D S + u (r^T S) + sum a b^T`` (one erase at most, ``analysis.Update``);
- each rank-R write of a run as R further sub-steps of one write each (its R columns), after
  the run's own update (writes do not read the state, so they may come in any order).

The expanded declaration (``Expansion.program``) is that one update with every coefficient a
token input (``log_gate_k``, ``erase_r``, ``write_a0``, ...) and the original readout on the
last sub-step of each token; its chunk forms are exact for the sequence of sub-steps, so
every backend runs it unchanged. The host side (``backends.shared.substeps``) evaluates the
coefficients from the call's inputs, interleaves them (``T * n`` tokens; neutral values where
a sub-step lacks a role: log-gate 0, erase and write 0) and keeps every n-th output.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field

from ..ir import dsl
from ..ir.node import Node, toposort
from ..ir.program import Program
from ..ir.trace import trace
from .analysis import Recurrence, Update, _reaches, _scalar_ratio, _update, analyze
from .linear import Builder, LinearForms, Nonlinear


@dataclass
class SubStep:
    """One sub-step: its coefficients by role (nodes of the source program). ``along``: a
    dim of the source it repeats over (its values carrying that dim give one column per
    repetition); ``first``: roles that apply on its first repetition only."""
    roles: dict[str, Node]
    along: str | None = None
    first: dict[str, Node] = field(default_factory=dict)


@dataclass
class Expansion:
    source: Program
    program: Program              # one sub-step per token
    steps: list[SubStep]
    readout: dict[str, Node]      # read_q, read_post, out_const: on each token's last sub-step
    erases: int                   # sub-steps with an erase

    def count(self, sizes: dict[str, int]) -> int:
        """Sub-steps per token at these dim sizes."""
        return sum(sizes[s.along] if s.along else 1 for s in self.steps)

    def describe(self) -> str:
        fixed = sum(1 for s in self.steps if s.along is None)
        along = [s.along for s in self.steps if s.along]
        n = " + ".join(([str(fixed)] if fixed else []) + along)
        return f"{n} sub-step{'s' if n != '1' else ''}"


def cuts(p: Program, state: Node) -> list[Node]:
    """The old state, the values every path from the new state to it passes through (of
    the state's dims, in order) and the new state."""
    dep: dict[int, bool] = {}
    order = toposort([p.new_state])
    for n in order:
        dep[id(n)] = n is state or any(dep[id(a)] for a in n.args)
    mids = [n for n in order if dep[id(n)] and n is not state and n is not p.new_state
            and set(n.dims) == set(state.dims) and not _reaches(p.new_state, state, n)]
    return [state, *mids, p.new_state]


def split(p: Program, b: Builder, state: Node, rec: Recurrence) -> Expansion | str | None:
    """The step as sub-steps of the chunk forms (``rec``: its readout analysed), or why not
    (None: the step is one update, or no shorter run is either)."""
    kdim, vdim = rec.kdim, rec.vdim
    chain = cuts(p, state)
    runs: list[Update] = []
    i = 0
    why = None
    while i < len(chain) - 1:
        for j in range(len(chain) - 1, i, -1):
            try:
                trans = LinearForms(p, chain[i], b).form(chain[j])
            except Nonlinear as e:
                why = str(e)
                continue
            up = _update(b, trans, kdim, vdim)
            if isinstance(up, str) or len(up.erases) > 1:
                why = up if isinstance(up, str) else why
                continue
            if not up.gate_positive:
                return "a decay is not provably positive"
            runs.append(up)
            i = j
            break
        else:
            return why if len(chain) > 2 else None   # no cut: the step's own reason says it
    steps: list[SubStep] = []
    for up in runs:
        roles = {k: v for k, v in (("log_gate_k", up.log_gate_k),
                                   ("log_gate_v", up.log_gate_v)) if v is not None}
        if up.erases:
            roles["erase_u"], roles["erase_r"] = up.erases[0]
        for j, (a, w) in enumerate(up.writes):
            roles[f"write_a{j}"], roles[f"write_b{j}"] = a, w
        rest = [SubStep({"write_a0": a, "write_b0": w}, R) for a, w, R in up.rank_writes]
        if rest and set(roles) <= {"log_gate_k", "log_gate_v"}:   # a bare decay: merged
            rest[0].first = roles
        elif roles:
            steps.append(SubStep(roles))
        steps += rest
    if len(steps) < 2 and not any(s.along for s in steps):
        return None
    ex = _expansion(p, b, rec, steps)
    want = "chunk_wy" if ex.erases else "chunk_gated"
    got = analyze(ex.program)   # the sub-steps' roles together must be one form's update
    if want not in got.forms:
        return f"the sub-steps as one update: {got.reasons[-1].split('; as sub-steps')[0]}"
    return ex


def _expansion(p: Program, b: Builder, rec: Recurrence, steps: list[SubStep]) -> Expansion:
    K, V = rec.kdim, rec.vdim
    every = [s.roles | s.first for s in steps]
    erasing = [r for r in every if "erase_u" in r]
    writes = max(sum(1 for k in r if k.startswith("write_a")) for r in every)
    # the delta rule's erase along its write key: u = c a, the WY form's fast path
    prop = writes == 1 and all("write_a0" in r and _scalar_ratio(
        b, r["erase_u"], r["write_a0"]) is not None for r in erasing)
    if prop:
        for s in steps:
            for r in (s.roles, s.first):
                if "erase_u" in r:
                    r["erase_c"] = _scalar_ratio(b, r.pop("erase_u"), r["write_a0"])
    inputs: dict[str, tuple[str, ...]] = {}
    for role, dims in (("log_gate_k", (K,)), ("log_gate_v", (V,))):
        have = [r[role] for r in every if role in r]
        if have:   # a per-channel gate somewhere: every sub-step's over the channel
            inputs[role] = dims if any(n.dims for n in have) else ()
    if erasing:
        inputs.update({"erase_c": ()} if prop else {"erase_u": (K,)})
        inputs["erase_r"] = (K,)
    for j in range(writes):
        inputs[f"write_a{j}"], inputs[f"write_b{j}"] = (K,), (V,)
    readout = {"read_q": rec.read_q}
    inputs["read_q"] = (V,) if rec.read_across else (K,)
    for role in ("read_post", "out_const"):
        n = getattr(rec, role)
        if n is not None:
            readout[role] = n
            inputs[role] = tuple(d for d in p.dims if d in n.dims)
    program = _declare(p, inputs, prop)
    return Expansion(p, program, steps, readout, len(erasing))


def _declare(p: Program, inputs: dict[str, tuple[str, ...]], prop: bool) -> Program:
    """The expanded declaration: one update with its coefficients as token inputs."""
    names = list(inputs)

    def step(S, *xs):
        x = dict(zip(names, xs))
        new = S
        for role in ("log_gate_k", "log_gate_v"):
            if role in x:
                new = dsl.exp(x[role]) * new
        if "erase_r" in x:
            u = x["erase_c"] * x["write_a0"] if prop else x["erase_u"]
            new = new + dsl.outer(u, x["erase_r"] @ S)
        j = 0
        while f"write_a{j}" in x:
            new = new + dsl.outer(x[f"write_a{j}"], x[f"write_b{j}"])
            j += 1
        o = x["read_q"] @ new
        if "read_post" in x:
            o = x["read_post"] * o
        if "out_const" in x:
            o = o + x["out_const"]
        return new, o

    state = inspect.Parameter(p.state.name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                              annotation=dsl.Spec("state", p.state.dims))
    params = [state] + [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                          annotation=dsl.Spec("token", d))
                        for n, d in inputs.items()]
    step.__signature__ = inspect.Signature(params)
    return trace(step, f"{p.name}_substeps")
