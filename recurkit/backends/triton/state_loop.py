"""A chunk stage that reads [K, V] states per chunk (the backward's gradient stage: the state
entering the chunk and the cotangent of the one leaving it), rendered with a loop over blocks
of V, as FLA's backward kernels do: the state blocks are [K, BV] at a time instead of two
[K, V] fp32 blocks at once (64 registers a thread each at K = V = 128, 8 warps), which spill.

The stage's ops split three ways: those that neither carry V nor depend on what does (before
the loop), those that carry V or contract over it (in the loop, once per block: a contraction
over V adds its block's part into an accumulator; a value over V is stored, or read by the
prologue's backward, within the block) and the rest (after the loop, from the accumulators).
A stage whose ops do not split so (a value over V made from a sum over V, a value gate's
[i, j, V] products, a reduction over V in the prologue's backward) keeps its straight-line
form.
"""
from __future__ import annotations

import re

from ...ir.node import toposort
from ...lowering.tile import TileOp

REDUCE = ("sum", "max", "contract")
COSTLY = ("contract", "invert_unit_lower")   # kept live across the loop, never remade


class StateLoops:
    """Mixin of the chunk stage generator (``chunk._StageGen``): uses its ``st``, ``tp``,
    ``inputs``, ``size``, ``block``, ``split``, ``late``, ``kctx``, ``hoist``/``hoisted``,
    ``var``/``axes``, ``deferred``, ``reread``, ``ensure``, ``op``, ``emit``, ``full``, ``L``,
    ``n``, ``store_output`` and ``store_late``."""

    after_state_loop = False   # set once a stage's loop over V is emitted (shift_invert)
    STATE_LOOP_ELEMS = 8192   # [K, V] blocks above this many elements loop over V
    STATE_BLOCK_V = 32

    def state_loop_plan(self, groups, lazy) -> tuple[list, list, list] | None:
        """(before, in the loop, after) op lists, or None where the stage keeps its form."""
        sd = tuple(self.tp.meta["program"].state.dims)
        if self.st.kind != "chunk" or not self.tp.meta.get("adjoint") or len(sd) != 2 or \
                self.split or groups:
            return None
        V = sd[-1]
        if self.block(sd[0]) * self.block(V) <= self.STATE_LOOP_ELEMS or \
                self.size(V) <= self.STATE_BLOCK_V:
            return None
        if not any(set(sd) <= set(ax) for ax in self.inputs.values()):
            return None
        axes = {**self.inputs, **{op.out: tuple(op.axes) for op in self.st.ops}}
        inner: set[str] = set()
        for op in self.st.ops:
            if op.op == "load":
                continue
            over = tuple(op.attr("over") or ())
            has_v = lambda a: V in axes.get(a, ())   # noqa: E731
            if V in op.axes or V in over or (op.op != "contract" and any(
                    has_v(a) for a in op.args)):
                inner.add(op.out)
        reads_inner = set(inner)
        before, within, after = [], [], []
        for op in self.st.ops:
            if op.op == "load" or op.op == "zeros":
                continue
            if op.out in inner:
                if V not in op.axes and op.op != "contract":
                    return None   # a reduction over V other than a contraction
                if op.out in lazy:
                    return None
                for a in op.args:   # a block's value must not need a whole sum over V
                    if a in inner and V not in axes.get(a, ()):
                        return None
                    if a in {o.out for o in after}:
                        return None
                within.append(op)
            elif any(a in reads_inner for a in op.args):
                reads_inner.add(op.out)
                after.append(op)
            else:
                before.append(op)
        if not within:
            return None
        for _, n, od in self.late:   # the prologue's backward: by its leaves' side
            leaves = [x.attr("name") for x in toposort([n])
                      if x.op == "input" and x.role == "cotangent"]
            if any(x in inner and V in axes.get(x, ()) for x in leaves):
                if V not in od or any(x.op in REDUCE and V in x.attr("over")
                                      for x in toposort([n])):
                    return None
        return before, within, after

    def split_by_state_loop(self, plan, body, outs: list[str], stored: set[str], put,
                            store_ready, lazy: set[str], ind: int) -> None:
        """Emit a stage split by ``state_loop_plan``: what the loop reads, the loop, then the
        rest (``body`` emits one op) in a low-pressure order. What the loop does not read is
        made after it, and what it reads only through cheap values is made again after it,
        so that neither is held in registers through the loop."""
        before, within, after = plan
        need = {a for op in within for a in op.args}
        for op in reversed(before):
            if op.out in need:
                need.update(op.args)
        rest = {op.out for op in before if op.out not in need} | {op.out for op in after}
        pre, mark = [op for op in before if op.out in need], set(self.var)
        for op in pre:
            body(op)
        at = len(self.L)
        self.state_loop(within, [n for n in outs if n not in stored], put, ind)
        self.relaid = True   # addresses and masks after the loop: made again, not kept
        self.after_state_loop = True
        at = next(k for k in range(at, len(self.L)) if "for kb in" in self.L[k])
        ops = self.st.ops
        rest |= {op.out for op in self.rematerialize(pre, mark, at,
                                                     [op for op in ops if op.out in rest])}
        after = self.low_pressure_order([op for op in ops if op.out in rest], lazy, set(outs))
        stored.update(n for n in outs if n in {op.out for op in within})
        store_ready()
        self.store_late(ind)
        for op in after:
            body(op)

    def state_loop(self, within: list[TileOp], outs: list[str], put, ind: int) -> None:
        """``within`` once per block of V: contractions over V into accumulators, values
        over V stored (``put``) or read by the prologue's backward within their block."""
        V = self.tp.meta["program"].state.dims[-1]
        bv = self.STATE_BLOCK_V
        pad = "    " * ind
        made = {op.out for op in within}
        accs = {}
        for op in within:
            if V not in op.axes:
                self.n += 1
                accs[op.out] = f"acc_{self.n}"
                self.L.append(f"{pad}{accs[op.out]} = {self.full(op.axes)}")
        outside = [a for op in within for a in op.args
                   if a not in made and V not in self._axes_of(a)]
        self.ensure(outside, ind)   # read once, before the loop
        saved = dict(self.var), dict(self.axes)
        self.hoist, self.hoisted = (len(self.L), ind), set()
        # not software-pipelined (num_stages=1): with 16-byte aligned pointers (what the JIT
        # compiles for torch tensors) every block the loop reads becomes an async copy a stage
        # ahead, and the copies' addresses plus ptxas unrolling the pipelined loop overflowed
        # the registers (sm_90: GDN fp32 8 B, KDA bf16 96 B of spills); unpipelined, 0 B
        self.L.append(f"{pad}for kb in tl.range(0, {self.size(V)}, {bv}, num_stages=1):")
        self.kctx = (V, bv)
        for op in within:
            self.ensure(op.args, ind + 1)
            self.op(op, ind + 1)
            if op.out in accs:
                self.L.append(f"{pad}    {accs[op.out]} = {accs[op.out]} + "
                              f"{self.to(op.out, tuple(op.axes))}")
            elif op.out in outs:
                put(op.out, ind + 1)
            self._late_in_block(V, ind + 1)
        self.kctx = None
        kept = {x: (self.var[x], self.axes[x]) for x in self.hoisted}
        self.var, self.axes = saved
        self.var.update({x: v for x, (v, _) in kept.items()})
        self.axes.update({x: a for x, (_, a) in kept.items()})
        self.hoist = None
        for op in within:
            if op.out in accs:
                self.var[op.out], self.axes[op.out] = accs[op.out], tuple(op.axes)

    def rematerialize(self, made_before: list[TileOp], mark: set[str], loop_at: int,
                      after: list[TileOp]) -> list[TileOp]:
        """Forget the values made before the loop (``mark``: what ``var`` held before them;
        ``loop_at``: the loop's first line) that the loop does not read, so that they are not
        held in registers through it: stage inputs and prologue values are read or rendered
        again where next used, cheap ops (no contraction) made again after the loop. Returns
        those ops that ``after`` (or the prologue's backward) reads, to emit with it. Rereads
        hit the cache: the traffic model does not count them again (``self.reread``)."""
        body = "\n".join(self.L[loop_at:])
        read = set(re.findall(r"\bv_\w+", body))
        ops = {op.out: op for op in made_before}
        stage = {op.out for op in self.st.ops}
        gone = {k for k in set(self.var) - mark if self.var[k].startswith("v_") and
                self.var[k] not in read and (ops[k].op not in COSTLY if k in ops else
                                             k not in stage or k in self.deferred)}
        # a value kept (costly, or read by the loop) stays; so do its aliases
        kept_vars = {self.var[k] for k in self.var if k not in gone}
        gone = {k for k in gone if self.var[k] not in kept_vars}
        for k in gone:
            del self.var[k]
        want = {a for op in after for a in op.args}
        want |= {x.attr("name") for _, n, _ in self.late for x in toposort([n])
                 if x.op == "input"}
        redo = []
        for op in reversed(made_before):
            if op.out in gone and op.out in want:
                redo.append(op)
                want.update(op.args)
        self.reread = True
        return redo[::-1]

    def _late_in_block(self, V: str, ind: int) -> None:
        """Store the prologue's backward values over V whose leaves this block has made."""
        for item in list(self.late):
            ptr, n, od = item
            if V not in od:
                continue
            leaves = [x.attr("name") for x in toposort([n])
                      if x.op == "input" and x.role == "cotangent"]
            if leaves and all(x in self.var for x in leaves) and \
                    any(V in self.axes[x] for x in leaves):
                self.store_output(self.node(n, ind), ind, ptr, od)
                self.late.remove(item)

    def low_pressure_order(self, ops: list[TileOp], lazy: set[str],
                           keep: set[str]) -> list[TileOp]:
        """``ops`` (in dependency order) reordered so fewer values are live at once: the
        ready op that frees the most register bytes (its last reads) less the bytes it makes
        goes first, ties in the given order. ``keep``: values read later than these ops (not
        freed). A lazy op (formed inside the position loop that reads it) holds nothing."""
        mine = {op.out for op in ops}
        uses: dict[str, int] = {}
        for op in ops:
            for a in set(op.args):
                uses[a] = uses.get(a, 0) + 1
        axes = {**self.inputs, **{op.out: tuple(op.axes) for op in self.st.ops}}

        def size(name: str) -> int:
            n = 1
            for a in axes.get(name, ()):
                n *= self.block(a)
            return n

        def gain(op: TileOp) -> int:
            made = 0 if op.out in lazy or op.op in ("rename", "load") else size(op.out)
            freed = sum(size(a) for a in set(op.args)
                        if uses.get(a) == 1 and a not in keep and a not in self.inputs)
            return freed - made

        done: set[str] = set()
        left = list(ops)
        out = []
        while left:
            ready = [op for op in left if all(a not in mine or a in done for a in op.args)]
            best = max(ready, key=gain)   # max keeps the first of equals
            out.append(best)
            left.remove(best)
            done.add(best.out)
            for a in set(best.args):
                uses[a] -= 1
        return out

