"""Per-channel contractions of the Triton chunk stages, blocked over the channel axis.

A contraction like A[i, j] = sum_K q[i, K] k[j, K] exp(G[i, K] - G[j, K]) has a [C, C, K]
product block (32K floats at C = 16, K = 128: far more than a program's registers). It is
rendered as a loop over blocks of K that re-reads the stage inputs for that block and recomputes
the chain of K-elementwise ops (cumsum and shift along i, decay ratios, products) leading to the
operands, accumulating the [C, C] result. Contractions of one stage that can share a loop do.
"""
from __future__ import annotations

from ...lowering.tile import TileOp
from .sequential import pow2


class BlockedContractions:
    """Mixin of the stage generator (``_StageGen``), its contractions (``contract``: a
    ``tl.dot`` of two matrices over one axis, else multiply and reduce; ``blocked``: the
    loops over blocks of a channel): uses its ``dot``, ``note_dot``, ``emit``, ``st``,
    ``inputs``, ``ptrs``, ``var``/``axes``/``defs``, ``L``, ``n``, ``kctx``, ``block``,
    ``size``, ``load``, ``op``, ``to`` and ``split``."""

    KBLOCK_ELEMS = 4096   # elements of a blocked [i, j, K-block] value (32 registers at 4 warps)
    _K_SAFE = ("load", "rename", "ir", "cumsum", "shift", "last", "decay_ratio", "mask")

    def k_ancestors(self, op: TileOp, at: int) -> tuple[list[TileOp], set[str]] | None:
        """The stage ops (in order) that make ``op``'s operands and carry its contracted axis,
        and the stage inputs among them, if all those ops are elementwise along the axis and
        every value without it is made before position ``at``; None otherwise."""
        k = op.attr("over")[0]
        pos = {o.out: n for n, o in enumerate(self.st.ops)}
        need: set[str] = set()
        loads: set[str] = set()
        stack = list(op.args)
        while stack:
            name = stack.pop()
            if name in need or name in loads:
                continue
            if name not in pos:
                if k in self.inputs.get(name, ()):
                    loads.add(name)   # read again, one block at a time
                elif name not in self.inputs:
                    return None       # the carried state, or a value of a bigger scope
                continue
            src = self.st.ops[pos[name]]
            if k not in src.axes:
                if pos[name] >= at:
                    return None
                continue
            if src.op not in self._K_SAFE or src.attr("axis") == k or (
                    src.op == "rename" and not all(k in self._axes_of(a) for a in src.args)):
                return None
            need.add(name)
            stack.extend(src.args)
            if src.op == "load":
                loads.add(src.attr("value"))
        return [o for o in self.st.ops if o.out in need], loads

    def _axes_of(self, name: str) -> tuple[str, ...]:
        for o in self.st.ops:
            if o.out == name:
                return tuple(o.axes)
        return self.inputs.get(name, ())

    def blocked_groups(self) -> dict[str, list]:
        """Contractions over one axis of a 3-axis operand (per-channel decays: [i, j, K])
        whose product block is too big for registers, grouped to share one loop over blocks
        of that axis, keyed by the first member (where the loop is emitted)."""
        groups: dict[str, list] = {}
        start, axis = None, None
        for at, op in enumerate(self.st.ops):
            if op.op != "contract" or len(op.attr("over")) != 1 or \
                    max(len(self._axes_of(a)) for a in op.args) < 3:
                continue
            k = op.attr("over")[0]
            union = tuple(op.axes) + (k,)
            elems = 1
            for a in union:
                elems *= self.block(a)
            if len(union) < 3 or elems <= self.KBLOCK_ELEMS or k == self.split or \
                    k.endswith("'") or k in ("i", "j"):
                continue
            first = start if start is not None and axis == k else at
            anc = self.k_ancestors(op, first)
            if anc is None and first != at:
                first, anc = at, self.k_ancestors(op, at)
            if anc is None:
                continue
            key = self.st.ops[first].out
            groups.setdefault(key, []).append((op, anc))
            start, axis = first, k
        return groups

    def blocked(self, members: list, ind: int) -> None:
        """acc[out] = sum over blocks of the axis of the blocked product, recomputing the
        operands' per-channel chains from the loads for each block."""
        k = members[0][0].attr("over")[0]
        rest = 1
        for a in members[0][0].axes:
            rest *= self.block(a)
        bk = max(1, min(pow2(self.size(k)), self.KBLOCK_ELEMS // rest))
        bk = 1 << (bk.bit_length() - 1)
        pad = "    " * ind
        accs = {}
        for op, _ in members:
            self.n += 1
            accs[op.out] = f"acc_{self.n}"
            self.L.append(f"{pad}{accs[op.out]} = {self.full(op.axes)}")
        ops = {o.out: o for _, (anc, _) in members for o in anc}
        loads = {x for _, (_, ls) in members for x in ls}
        self.ensure([x for o in [*ops.values(), *(m for m, _ in members)] for x in o.args
                     if x not in ops and x not in loads], ind)   # read once, outside the loop
        saved = dict(self.var), dict(self.axes)
        self.hoist, self.hoisted = (len(self.L), ind), set()
        self.L.append(f"{pad}for kb in range(0, {self.size(k)}, {bk}):")
        self.kctx = (k, bk)
        order = [o for o in self.st.ops if o.out in ops]
        for name in sorted(loads):
            self.read(name, ind + 1)
        for o in order:
            self.op(o, ind + 1)
        for op, _ in members:
            x, y = op.args
            union = tuple(op.axes) + (k,)
            prod = f"tl.reduce({self.to(x, union)} * {self.to(y, union)}, {len(union) - 1}, _add)"
            self.L.append(f"{pad}    {accs[op.out]} = {accs[op.out]} + {prod}")
        self.kctx = None
        # token addresses and masks after the loop: made again, not kept (PrologueRender);
        # kept, 16-byte aligned pointers made GLA's forward prep kernel spill at 64 registers
        self.relaid = True
        kept = {x: (self.var[x], self.axes[x]) for x in self.hoisted}
        self.var, self.axes = saved
        for x, (v, a) in kept.items():
            self.var[x], self.axes[x] = v, a
        self.hoist = None
        for op, _ in members:
            self.var[op.out], self.axes[op.out] = accs[op.out], tuple(op.axes)
            self.defs[op.out] = op

    def live(self, done: set[str], carried: str | None) -> set[str]:
        """The ops still needed outside the blocked loops (their operands' full-width chains
        are otherwise dead)."""
        live = set(self.st.outputs) | ({carried} if carried else set())
        for op in reversed(self.st.ops):
            if op.out in live and op.out not in done:
                live.update(op.args)
                if op.op == "load":
                    live.add(op.attr("value"))
        return live

    def contract(self, op: TileOp, ind: int) -> None:
        x, y = op.args
        over = tuple(op.attr("over"))
        ax = tuple(op.axes)
        hx, hy = self.axes[x], self.axes[y]
        if len(hx) == 2 and len(hy) == 2 and len(over) == 1 and len(ax) == 2:
            c = over[0]
            m = next(a for a in hx if a != c)
            n = next(a for a in hy if a != c)
            if self.dot in ("bf16", "fp16"):   # 16-bit operands, fp32 accumulation
                t = "tl.bfloat16" if self.dot == "bf16" else "tl.float16"
                dot = f"tl.dot({self.to(x, (m, c))}.to({t}), {self.to(y, (c, n))}.to({t}))"
            else:
                dot = (f"tl.dot({self.to(x, (m, c))}, {self.to(y, (c, n))}, "
                       f"input_precision=\"{self.dot}\")")
            self.emit(op.out, (m, n), dot, ind)
            self.note_dot(self.block(m), self.block(n), self.block(c), ind)
            if (m, n) != ax:
                self.emit(op.out, ax, self.to(op.out, ax), ind)
            return
        union = ax + over
        prod = f"{self.to(x, union)} * {self.to(y, union)}"
        for k in range(len(union) - 1, len(ax) - 1, -1):
            prod = f"tl.reduce({prod}, {k}, _add)"
        self.emit(op.out, ax, prod, ind)
