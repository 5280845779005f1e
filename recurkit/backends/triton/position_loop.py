"""Contractions over a chunk position of a product with a per-channel decay ratio, as a loop
over that position.

The backward's gradient stage has, per channel K, sums like
``dq[i, K] = sum_j X[i, j] exp(G[i, K] - G[j, K]) [i >= j] a[j, K]``: a [C, C, K] product
(32K floats at C = 16, K = 128: more than a program's registers) contracted over a position,
with K free, so the blocked loops over the contracted channel (``blocked``) do not apply. It is
rendered as a loop over the contracted position p, each step an exact [C, K] term: the step's
slices of the operands (row p of a register block, taken by a masked sum; a decay ratio's
slice recomputed from the cumulative gates) multiplied and added into the [C, K] result. The
[C, C, K] values on the way (the ratio, its product with X) are never formed; the numbers are
the same products, summed in position order.
"""
from __future__ import annotations

from ...lowering.tile import TileOp

POSITIONS = ("i", "j")


class PositionLoops:
    """Mixin of the chunk stage generator (``chunk._StageGen``): uses its ``st``, ``defs``,
    ``var``/``axes``, ``emit``, ``to``, ``op``, ``ar``, ``full``, ``block``, ``size``,
    ``ensure``, ``L``, ``n``, ``C`` and ``KBLOCK_ELEMS``."""

    _LAZY_OPS = ("ir", "decay_ratio")

    def position_loops(self) -> tuple[set[str], set[str]]:
        """(the contractions to render as position loops, the [i, j, channel] values only
        they read, which are then never formed)."""
        ops = {op.out: op for op in self.st.ops}
        users: dict[str, list[TileOp]] = {}
        for op in self.st.ops:
            for a in op.args:
                users.setdefault(a, []).append(op)

        def three(name: str) -> bool:
            op = ops.get(name)
            if op is None or len(op.axes) != 3 or not set(POSITIONS) <= set(op.axes):
                return False
            elems = 1
            for a in op.axes:
                elems *= self.block(a)
            return elems > self.KBLOCK_ELEMS

        def lazy_chain(name: str, seen: set[str]) -> bool:
            """``name`` and the 3-axis values it is made of can be sliced along a position."""
            op = ops[name]
            if op.op not in self._LAZY_OPS or op.op == "ir" and op.attr("ir_op") in (
                    "where",):
                return False
            seen.add(name)
            return all(lazy_chain(a, seen) if three(a) else True for a in op.args)

        loops, lazy = set(), set()
        for op in self.st.ops:
            over = tuple(op.attr("over") or ())
            if op.op != "contract" or len(over) != 1 or over[0] not in POSITIONS or \
                    len(op.axes) != 2 or not any(three(a) for a in op.args):
                continue
            chain: set[str] = set()
            if all(lazy_chain(a, chain) if three(a) else len(ops[a].axes if a in ops else
                                                              self.inputs.get(a, ())) <= 2
                   for a in op.args):
                loops.add(op.out)
                lazy |= chain
        # a value is left unformed only if every reader is a loop or another such value
        changed = True
        while changed:
            changed = False
            for name in list(lazy):
                if any(u.out not in loops and u.out not in lazy for u in users.get(name, [])) \
                        or name in self.st.outputs:
                    lazy.discard(name)
                    changed = True
            for c in list(loops):
                if any(three(a) and a not in lazy for a in ops[c].args):
                    loops.discard(c)
                    changed = True
        return loops, lazy

    def position_loop(self, op: TileOp, lazy: set[str], ind: int) -> None:
        """``op`` (a contraction over position p of a lazy [i, j, K] operand) as
        ``for pp in range(C): acc += slice(x) * slice(y)``."""
        p = op.attr("over")[0]
        out_axes = tuple(op.axes)
        self.ensure(self._leaves(op.args, lazy), ind)
        self.n += 1
        acc = f"acc_{self.n}"
        self.L.append("    " * ind + f"{acc} = {self.full(out_axes)}")
        self.L.append("    " * ind + f"for pp in range(0, {self.size(p)}):")
        memo: dict[str, str] = {}
        saved = dict(self.var), dict(self.axes)
        xs = [self._slice(a, p, lazy, memo, ind + 1) for a in op.args]
        prod = " * ".join(self.to(x, out_axes) for x in xs)
        self.L.append("    " * (ind + 1) + f"{acc} = {acc} + {prod}")
        self.var, self.axes = saved
        self.var[op.out], self.axes[op.out] = acc, out_axes
        self.defs[op.out] = op

    def _leaves(self, names, lazy: set[str]) -> list[str]:
        """The formed values the lazy chains under ``names`` read."""
        out, stack = [], list(names)
        while stack:
            x = stack.pop()
            if x in lazy:
                stack.extend(self.defs_all[x].args)
            elif x not in out:
                out.append(x)
        return out

    def _slice(self, name: str, p: str, lazy: set[str], memo: dict[str, str],
               ind: int) -> str:
        """A value holding ``name`` at position ``p = pp`` (its other axes kept)."""
        if name in memo:
            return memo[name]
        key = f"{name}@{p}"
        if name in lazy:
            op = self.defs_all[name]
            args = [self._slice(a, p, lazy, memo, ind) for a in op.args]
            ax = tuple(a for a in op.axes if a != p)
            if op.op == "decay_ratio":
                d = f"{self.to(args[0], ax)} - {self.to(args[1], ax)}"
                strict = op.attr("mask") == "i>j"
                # [i >= j] with j = pp is ar(i) >= pp; with i = pp, pp >= ar(j)
                cond = (f"{self.ar('i', ax)} {'>' if strict else '>='} pp" if p == "j" else
                        f"pp {'>' if strict else '>='} {self.ar('j', ax)}")
                e = f"tl.exp(tl.where({cond}, {d}, float(\"-inf\")))"
                self.emit(key, ax, e, ind)
                self.emit(key, ax, f"tl.where({self.var[key]} < 1e-20, 0.0, "
                          f"{self.var[key]})", ind)
            else:
                tmp = dict(zip(op.args, args))
                self.op(TileOp(key, op.op, tuple(tmp[a] for a in op.args), ax, op.attrs), ind)
        else:
            have = self.axes[name]
            if p not in have:
                memo[name] = name
                return name
            rest = tuple(a for a in have if a != p)
            sel = f"tl.where({self.ar(p, have)} == pp, {self.var[name]}, 0.0)"
            self.emit(key, rest, f"tl.reduce({sel}, {have.index(p)}, _add)", ind)
        memo[name] = key
        return key
