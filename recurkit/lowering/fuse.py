"""Fusion passes over tile programs: fewer stages and fewer values crossing between them.

A chunk-form tile program as lowered has three stages (prep, the state pass, the output), and
every value one stage hands to a later one is a buffer in memory: written once, read once per
program that needs it. For a GPU, where those bytes are most of the time, the passes below
rewrite the program into an equivalent one that moves less:

- ``fuse_output``: the output stage runs inside the state pass, once per chunk, before the
  state is updated; the entering states (a [K, V] value per chunk) and the pseudo-values are
  then never stored.
- ``rematerialize``: a value crossing from a chunk stage that is cheap to make again from the
  per-token values (elementwise ops, cumulative sums along the chunk, decay ratios, and
  contractions over positions only, as the chunk's write k^T v) is recomputed where it is read
  instead of stored; the solve, and contractions over a declaration dim (q k^T) stay where they
  are.
- ``prune``: outputs nobody reads and the ops only they needed are dropped; so are empty stages.

``optimize`` runs them in that order. Each returns a new program (the input is not modified)
that ``verify_tile_program`` accepts; the renderers need nothing new beyond ``load`` ops in a
loop stage.
"""
from __future__ import annotations

from dataclasses import replace

from .tile import Stage, TileOp, TileProgram, stage_inputs, verify_tile_program

# ops that are recomputed rather than stored (besides contractions over positions only)
REMAT = ("load", "rename", "ir", "cumsum", "shift", "last", "decay_ratio", "mask", "eye")
PASSES = ("fuse_output", "rematerialize", "prune")


def _copy(tp: TileProgram, stages: list[Stage]) -> TileProgram:
    return replace(tp, stages=stages, meta={**tp.meta, "passes": tp.meta.get("passes", ())})


def _clone(st: Stage, **kw) -> Stage:
    return replace(st, ops=list(kw.pop("ops", st.ops)), **kw)


def output_name(tp: TileProgram) -> str:
    """The value the program returns (its last stage's first output, as lowered)."""
    return tp.meta.get("out") or tp.stages[-1].outputs[0]


def fuse_output(tp: TileProgram) -> TileProgram:
    """Move a last chunk stage into the loop over chunks before it, placed before the loop's
    update of its carried state (so it reads the entering state, as the stage did)."""
    if len(tp.stages) < 2:
        return tp
    loop, last = tp.stages[-2], tp.stages[-1]
    if last.kind != "chunk" or loop.kind != "loop" or loop.over != "chunks" or \
            len(loop.carried) != 1:
        return tp
    S = loop.carried[0]
    at = next((k for k, op in enumerate(loop.ops) if op.out == S and op.op != "zeros"), None)
    if at is None:
        return tp
    before = {op.out for op in loop.ops[:at]}
    mine = {op.out for op in loop.ops}
    for op in last.ops:
        if op.out in mine or S in op.args:
            return tp   # a name clash, or reads the final state: not a per-chunk value
        if any(a in mine and a not in before for a in op.args):
            return tp   # needs a value the loop makes after the update
    ops = loop.ops[:at] + list(last.ops) + loop.ops[at:]
    outputs = tuple(dict.fromkeys(last.outputs + (S,)))
    fused = _clone(loop, ops=ops, outputs=outputs)
    out = _copy(tp, tp.stages[:-2] + [fused])
    out.meta["passes"] = out.meta["passes"] + ("fuse_output",)
    return out


def _chain(st: Stage, name: str) -> list[TileOp] | None:
    """The ops of ``st`` that make ``name`` from its ``load``s, in order, if all of them are
    cheap to recompute; None otherwise."""
    pos = {op.out: k for k, op in enumerate(st.ops)}
    need: set[str] = set()
    stack = [name]
    while stack:
        x = stack.pop()
        if x in need:
            continue
        if x not in pos:
            return None   # read from an earlier stage: not made here from per-token values
        op = st.ops[pos[x]]
        over = tuple(op.attr("over") or ())
        cheap = op.op in REMAT or (op.op == "contract" and set(over) <= {"i"} and
                                   not {"i", "j"} & set(op.axes))
        if not cheap:
            return None
        need.add(x)
        stack.extend(op.args)
    return [op for op in st.ops if op.out in need]


def _made_by_remat(st: Stage, src: Stage) -> set[str]:
    """The values ``st`` makes by the same op as ``src`` does (copies of its values)."""
    mine = {op.out: op for op in src.ops}
    return {op.out for op in st.ops if op.out in mine and mine[op.out] == op}


def rematerialize(tp: TileProgram) -> TileProgram:
    """Recompute in each later stage the values it reads from a chunk stage when they are
    cheap to make again from per-token values (see the module doc)."""
    stages = [_clone(st) for st in tp.stages]
    changed = False
    for x, st in enumerate(stages):
        if x == 0:
            continue
        known = {op.out: op.axes for s in stages[:x] for op in s.ops}
        copies: list[tuple[int, int, TileOp]] = []   # (source stage, position, op)
        have = {op.out for op in st.ops}
        for name in stage_inputs(st, known):
            # made in a chunk stage (a loop stage making it too holds a copy of its own)
            src = max((k for k in range(x) if stages[k].kind == "chunk" and
                       name in {op.out for op in stages[k].ops}), default=None)
            if src is None or any(name in {op.out for op in stages[k].ops} and
                                  name not in _made_by_remat(stages[k], stages[src])
                                  for k in range(src + 1, x)):
                continue
            chain = _chain(stages[src], name)
            if chain is None:
                continue
            pos = {op.out: k for k, op in enumerate(stages[src].ops)}
            for op in chain:
                if op.out not in have:
                    copies.append((src, pos[op.out], op))
                    have.add(op.out)
        if not copies:
            continue
        copies.sort(key=lambda c: c[:2])
        copies = [op for _, _, op in copies]
        # after the stage's zeros, and after its own ops that the copies read (its loads)
        args = {a for op in copies for a in op.args} - {op.out for op in copies}
        at = max((k + 1 for k, op in enumerate(st.ops) if op.op == "zeros" or
                  op.out in args), default=0)
        st.ops = st.ops[:at] + copies + st.ops[at:]
        changed = True
    if not changed:
        return tp
    out = _copy(tp, stages)
    out.meta["passes"] = out.meta["passes"] + ("rematerialize",)
    return out


def prune(tp: TileProgram) -> TileProgram:
    """Drop outputs no later stage reads (and that are not the program's result), the ops
    only they needed, and stages left with nothing to do."""
    result = output_name(tp)
    stages = [_clone(st) for st in tp.stages]
    need: set[str] = {result, *tp.meta.get("results", ())}
    keep: list[Stage] = []
    for st in reversed(stages):
        live = set(st.carried) | {o for o in st.outputs if o in need}
        outputs = tuple(o for o in st.outputs if o in live)
        ops: list[TileOp] = []
        for op in reversed(st.ops):
            if op.out in live:
                ops.append(op)
                live.update(op.args)
                if op.op == "load":
                    live.add(op.attr("value"))
        ops.reverse()
        made = {op.out for op in ops}
        need |= {a for a in live if a not in made} | {
            op.attr("value") for op in ops if op.op == "load"}
        if outputs or st.carried:
            keep.append(_clone(st, ops=ops, outputs=outputs))
    keep.reverse()
    if [len(s.ops) for s in keep] == [len(s.ops) for s in tp.stages] and \
            [s.outputs for s in keep] == [s.outputs for s in tp.stages]:
        return tp
    out = _copy(tp, keep)
    out.meta["passes"] = out.meta["passes"] + ("prune",)
    return out


def optimize(tp: TileProgram) -> TileProgram:
    """The passes of ``PASSES`` in order, the result verified. A backward program
    (``lowering.chunk_adjoint``) keeps its gradient stage parallel over chunks: it is most
    of the work, and inside the backwards pass it would run one chunk after another."""
    if tp.form not in ("chunk_gated", "chunk_wy"):
        return tp
    for name in PASSES:
        if name == "fuse_output" and tp.meta.get("adjoint"):
            continue
        tp = globals()[name](tp)
    verify_tile_program(tp)
    return tp
