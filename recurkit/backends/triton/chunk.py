"""Triton source for the chunk forms: one kernel per stage of the tile program.

A chunk stage runs one program per (sequence, head, chunk); the state pass one program per
(sequence, head), looping over the chunks with the state in registers. A value is a register
block holding exactly its own named axes, in a recorded order; ops align their operands by
name (permute, then insert size-1 axes), so broadcasting never needs the author's help.
Contractions of two matrices over one axis are ``tl.dot``; the rest multiply and reduce.
Values cross stages in [N, H, chunks, *axes] buffers (true sizes; blocks are padded to powers
of two, at least 16, with masked loads and stores).
"""
from __future__ import annotations

import re

from ...lowering.tile import Stage, TileOp, TileProgram, stage_inputs
from .blocked import BlockedContractions
from .sequential import FLUSH, HEADER, TRITON_BINARY, TRITON_UNARY, pow2


def _var(name: str) -> str:
    return "v_" + re.sub(r"\W", "_", name.replace("'", "p"))


class _StageGen(BlockedContractions):
    def __init__(self, st: Stage, tp: TileProgram, sizes: dict[str, int],
                 inputs: dict[str, tuple[str, ...]], cfg: dict):
        self.st, self.tp, self.C = st, tp, tp.chunk
        self.sizes, self.inputs, self.cfg = dict(sizes), inputs, cfg
        self.axes: dict[str, tuple[str, ...]] = {}   # value -> axes of its register block
        self.var: dict[str, str] = {}
        self.L: list[str] = []
        self.defs: dict[str, TileOp] = {}   # value -> the op that made it
        self.n = 0
        # the state's last dim splits over programs when no op of the stage reduces along it
        # (columns of the state, and everything computed from them, are then independent)
        sd = tp.meta["program"].state.dims
        last = sd[-1] if sd else None
        along = {a for op in st.ops for a in (tuple(op.attr("over") or ()) +
                                              ((op.attr("axis"),) if op.attr("axis") else ()))}
        uses = any(last in op.axes for op in st.ops)
        self.split = last if last and uses and last not in along and \
            last + "'" not in {a for op in st.ops for a in op.axes} else None
        self.bsplit = min(pow2(cfg["block_v"]), max(16, pow2(sizes[last]))) if self.split else 0
        self.kctx: tuple[str, int] | None = None   # (axis, block) inside a blocked loop
        self.ptrs: dict[str, tuple[str, str]] = {}  # stage input -> (pointer, lead offset)
        self.deferred: dict[str, str] = {}            # load op output -> the input it reads

    # --- axes -------------------------------------------------------------------------------
    def size(self, a: str) -> int:
        return self.C if a in ("i", "j") else self.sizes[a.rstrip("'")]

    def block(self, a: str) -> int:
        if self.kctx and a == self.kctx[0]:
            return self.kctx[1]
        if a == self.split:
            return self.bsplit
        return self.C if a in ("i", "j") else max(16, pow2(self.size(a)))

    def nsplit(self) -> int:
        return -(-self.size(self.split) // self.bsplit) if self.split else 1

    def ar(self, a: str, axes: tuple[str, ...]) -> str:
        """Index of axis ``a`` shaped to broadcast over ``axes``."""
        base = f"tl.arange(0, {self.block(a)})"
        if self.kctx and a == self.kctx[0]:
            base = f"(kb + {base})"
        elif a == self.split:
            base = f"(pv * {self.bsplit} + {base})"
        if len(axes) <= 1:
            return base
        return base + "[" + ", ".join(":" if x == a else "None" for x in axes) + "]"

    def to(self, name: str, want: tuple[str, ...]) -> str:
        """The value ``name`` viewed with axes ``want`` (a superset of its own)."""
        x, have = self.var[name], self.axes[name]
        order = tuple(a for a in want if a in have)
        if order != have:
            perm = tuple(have.index(a) for a in order)
            x = f"tl.trans({x})" if len(perm) == 2 else f"tl.permute({x}, {perm})"
        if order != want and have:
            x = f"{x}[{', '.join(':' if a in have else 'None' for a in want)}]"
        return x

    def offset(self, axes: tuple[str, ...]) -> tuple[str, str | None, int]:
        """Offsets of a [*axes] row (true sizes), its mask, and its element count."""
        terms, stride = [], 1
        for a in reversed(axes):
            t = self.ar(a, axes)
            terms.append(f"{t} * {stride}" if stride != 1 else t)
            stride *= self.size(a)
        masks = [f"({self.ar(a, axes)} < {self.size(a)})" for a in axes
                 if self.block(a) != self.size(a) or a == self.split or
                 (self.kctx and a == self.kctx[0])]
        return " + ".join(reversed(terms)) or "0", " & ".join(masks) or None, stride

    def ensure(self, names, ind: int) -> None:
        """Read the stage inputs among ``names`` that are not read yet."""
        for name in names:
            if name in self.var:
                continue
            src = self.deferred.get(name, name)
            if src != name:
                self.ensure([src], ind)
            elif name in self.ptrs:
                self.load(name, *self.ptrs[name], ind)
            if src in self.var:
                self.var[name], self.axes[name] = self.var[src], self.axes[src]

    def emit(self, out: str, axes: tuple[str, ...], expr: str, ind: int) -> None:
        self.n += 1
        v = f"{_var(out)}_{self.n}"
        self.L.append("    " * ind + f"{v} = {expr}")
        self.var[out], self.axes[out] = v, tuple(axes)

    def load(self, name: str, ptr: str, lead: str, ind: int) -> None:
        axes = self.inputs[name]
        off, m, numel = self.offset(axes)
        mk = f", mask={m}, other=0.0" if m else ""
        self.emit(name, axes, f"tl.load({ptr} + ({lead}) * {numel} + {off}{mk})", ind)

    def store(self, name: str, ptr: str, lead: str, ind: int) -> None:
        axes = self.axes[name]
        off, m, numel = self.offset(axes)
        if self.split and self.split not in axes:   # computed alike by every column block
            first = f"(({off}) * 0 + pv == 0)"   # a block-shaped mask
            m = f"({m}) & {first}" if m else first
        mk = f", mask={m}" if m else ""
        self.L.append("    " * ind + f"tl.store({ptr} + ({lead}) * {numel} + {off}, "
                      f"{self.var[name]}{mk})")

    # --- ops --------------------------------------------------------------------------------
    def cond(self, mask: str, axes) -> str:
        return f"{self.ar('i', axes)} {'>=' if mask == 'i>=j' else '>'} {self.ar('j', axes)}"

    def op(self, op: TileOp, ind: int) -> None:
        o, ax = op.op, tuple(op.axes)
        a = op.args
        self.defs[op.out] = op
        if o == "load":
            self.var[op.out], self.axes[op.out] = self.var[op.attr("value")], \
                self.axes[op.attr("value")]
            return
        if o == "rename":
            self.var[op.out] = self.var[a[0]]
            self.axes[op.out] = ax
            return
        if o == "zeros":
            return   # the carried state: loaded before the loop
        if o == "ir":
            fn = op.attr("ir_op")
            xs = [self.to(x, ax) for x in a]
            if fn == "exp":
                e = f"tl.exp({xs[0]})"
                expr = f"tl.where({e} < {FLUSH}, 0.0, {e})"
            elif fn in TRITON_UNARY:
                expr = TRITON_UNARY[fn].format(*xs)
            elif fn == "where":
                expr = f"tl.where({xs[0]}, {xs[1]}, {xs[2]})"
            elif fn == "pow":
                expr = f"tl.exp({xs[1]} * tl.log({xs[0]}))"
            else:
                expr = TRITON_BINARY[fn].format(*xs)
            self.emit(op.out, ax, expr, ind)
        elif o == "contract":
            self.contract(op, ind)
        elif o == "cumsum":
            x = op.args[0]
            self.emit(op.out, self.axes[x], f"tl.associative_scan({self.var[x]}, "
                      f"{self.axes[x].index(op.attr('axis'))}, _add)", ind)
        elif o == "last":
            x, axis = a[0], op.attr("axis")
            have = self.axes[x]
            sel = f"tl.where({self.ar(axis, have)} == {self.size(axis) - 1}, {self.var[x]}, 0.0)"
            self.emit(op.out, tuple(d for d in have if d != axis),
                      f"tl.reduce({sel}, {have.index(axis)}, _add)", ind)
        elif o == "shift":
            self.shift(op, ind)
        elif o == "decay_ratio":
            diff = f"{self.to(a[0], ax)} - {self.to(a[1], ax)}"
            e = f"tl.exp(tl.where({self.cond(op.attr('mask'), ax)}, {diff}, float(\"-inf\")))"
            self.emit(op.out, ax, e, ind)
            self.emit(op.out, ax, f"tl.where({self.var[op.out]} < {FLUSH}, 0.0, "
                      f"{self.var[op.out]})", ind)
        elif o == "mask":
            self.emit(op.out, ax, f"tl.where({self.cond(op.attr('mask'), ax)}, "
                      f"{self.to(a[0], ax)}, 0.0)", ind)
        elif o == "eye":
            self.emit(op.out, ax, f"tl.where({self.ar(ax[0], ax)} == {self.ar(ax[1], ax)}, "
                      "1.0, 0.0)", ind)
        elif o == "invert_unit_lower":
            self.invert(op, ind)
        else:
            raise NotImplementedError(f"triton tile renderer: no rule for tile op {o!r}")

    def contract(self, op: TileOp, ind: int) -> None:
        x, y = op.args
        over = tuple(op.attr("over"))
        ax = tuple(op.axes)
        hx, hy = self.axes[x], self.axes[y]
        if len(hx) == 2 and len(hy) == 2 and len(over) == 1 and len(ax) == 2:
            c = over[0]
            m = next(a for a in hx if a != c)
            n = next(a for a in hy if a != c)
            dot = (f"tl.dot({self.to(x, (m, c))}, {self.to(y, (c, n))}, "
                   f"input_precision=\"{self.cfg['precision']}\")")
            self.emit(op.out, (m, n), dot, ind)
            if (m, n) != ax:
                self.emit(op.out, ax, self.to(op.out, ax), ind)
            return
        union = ax + over
        prod = f"{self.to(x, union)} * {self.to(y, union)}"
        for k in range(len(union) - 1, len(ax) - 1, -1):
            prod = f"tl.reduce({prod}, {k}, _add)"
        self.emit(op.out, ax, prod, ind)

    def shift(self, op: TileOp, ind: int) -> None:
        """y[i] = x[i-1] (0 at i = 0), exactly: a 0/1 matrix product (one nonzero term per
        entry) for blocks, a masked reduction for a vector. The shift of a decay ratio
        exp(a_i - b_j) [i >= j] is the ratio of the shifted a, exp(a_(i-1) - b_j) [i > j]: the
        same numbers, without a [C, C*K] product when the ratio is per channel."""
        x, axis = op.args[0], op.attr("axis")
        src = self.defs.get(x)
        if axis == "i" and src is not None and src.op == "decay_ratio" and \
                src.attr("mask") == "i>=j":
            a = src.args[0]
            self.shift(TileOp(a + "_prev", "shift", (a,), self.axes[a], (("axis", "i"),)), ind)
            self.op(TileOp(op.out, "decay_ratio", (a + "_prev", src.args[1]), op.axes,
                           (("mask", "i>j"),)), ind)
            return
        have = self.axes[x]
        C = self.size(axis)
        rest = tuple(d for d in have if d != axis)
        if not rest:
            sel = (f"tl.where(tl.arange(0, {C})[:, None] - 1 == tl.arange(0, {C})[None, :], "
                   f"{self.var[x]}[None, :], 0.0)")
            self.emit(op.out, have, f"tl.reduce({sel}, 1, _add)", ind)
            return
        sh = (f"tl.where(tl.arange(0, {C})[:, None] - 1 == tl.arange(0, {C})[None, :], "
              "1.0, 0.0)")
        xv = self.to(x, (axis, *rest))
        if len(rest) == 1 and self.block(rest[0]) < 16:   # too narrow for tl.dot
            self.emit(op.out, (axis, *rest), f"tl.reduce({sh}[:, :, None] * {xv}[None, :, :], "
                      "1, _add)", ind)
        elif len(rest) == 1:
            self.emit(op.out, (axis, *rest), f"tl.dot({sh}, {xv}, input_precision=\"ieee\")",
                      ind)
        else:
            widths = [self.block(d) for d in rest]
            flat = 1
            for w in widths:
                flat *= w
            self.emit(op.out, (axis, *rest), f"tl.reshape(tl.dot({sh}, tl.reshape({xv}, "
                      f"({C}, {flat})), input_precision=\"ieee\"), ({C}, "
                      f"{', '.join(map(str, widths))}))", ind)
        if tuple(op.axes) != (axis, *rest):
            self.emit(op.out, tuple(op.axes), self.to(op.out, tuple(op.axes)), ind)

    def invert(self, op: TileOp, ind: int) -> None:
        """(I - L)^-1 by forward substitution, one row per iteration: row r is e_r plus
        L[r, :] times the rows above it (rows not yet solved are still 0)."""
        C, pad = self.C, "    " * ind
        Lm = self.to(op.args[0], ("i", "j"))
        self.n += 1
        v, lv = f"inv_{self.n}", f"lmat_{self.n}"
        rows = f"tl.arange(0, {C})[:, None]"
        self.L += [f"{pad}{lv} = {Lm}",
                   f"{pad}{v} = tl.full([{C}, {C}], 0.0, tl.float32)",
                   f"{pad}for r in range({C}):",
                   f"{pad}    lrow = tl.reduce(tl.where({rows} == r, {lv}, 0.0), 0, _add)",
                   f"{pad}    row = tl.reduce(lrow[:, None] * {v}, 0, _add) + "
                   f"tl.where(tl.arange(0, {C}) == r, 1.0, 0.0)",
                   f"{pad}    {v} = tl.where({rows} == r, row[None, :], {v})"]
        self.var[op.out], self.axes[op.out] = v, ("i", "j")
        if tuple(op.axes) != ("i", "j"):
            self.emit(op.out, tuple(op.axes), self.to(op.out, tuple(op.axes)), ind)

    # --- the kernel -------------------------------------------------------------------------
    def source(self, out_axes: dict[str, tuple[str, ...]], known
               ) -> tuple[str, list[str], list[str]]:
        st = self.st
        carried = st.carried[0] if st.carried else None
        ins = list(self.inputs)
        # outputs that are already global (a prologue value passed on) are not stored again
        outs = [n for n in st.outputs if n != carried and n not in known]
        params = [f"X{k}" for k in range(len(ins))] + [f"Y{k}" for k in range(len(outs))]
        if carried:
            params += ["S0", "SF"]
        L = self.L
        L += ["", "", "@triton.jit", f"def {st.name}_kernel({', '.join(params + ['NC'])}):",
              "    pid = tl.program_id(0)", "    pv = tl.program_id(1)"]
        loop = st.kind == "loop"
        if loop:
            L += ["    nh = pid.to(tl.int64)"]
            lead = "nh * NC + c"
            ind = 2
            sd = tuple(self.tp.meta["program"].state.dims)
            self.inputs = {**self.inputs, carried: sd}
            self.load(carried, "S0", "nh", 1)
            L.append("    for c in range(0, NC):")
            v = self.var[carried]
        else:
            lead = "p"
            L += ["    p = pid.to(tl.int64)"]
            ind = 1
        for k, name in enumerate(ins):   # each input is read where it is first used
            self.ptrs[name] = (f"X{k}", lead)
        groups = self.blocked_groups()
        done = {op.out for members in groups.values() for op, _ in members}
        live = self.live(done, carried) if groups else {op.out for op in st.ops}
        # an output that only renames a value is stored as soon as that value exists, so
        # that it is not held in registers to the end of the kernel
        alias = {op.out: op for op in st.ops if op.op in ("rename", "load")}
        stored: set[str] = set()

        def store_ready() -> None:
            for k, name in enumerate(outs):
                chain, x = [], name
                while x in alias and x not in self.var:
                    chain.append(alias[x])
                    nxt = alias[x].attr("value") if alias[x].op == "load" else alias[x].args[0]
                    if nxt == x:   # a load of the stage input of the same name
                        break
                    x = nxt
                if name in stored or not chain or x not in self.var or x == carried:
                    continue
                self.ensure([x], ind)
                for op in reversed(chain):
                    self.op(op, ind)
                self.store(name, f"Y{k}", lead, ind)
                out_axes[name] = self.axes[name]
                stored.add(name)
        for op in st.ops:
            if op.out in groups:
                self.blocked(groups[op.out], ind)
            if op.op == "load" and not loop:   # read where first used
                self.deferred[op.out] = op.attr("value")
            elif op.out not in done and op.out in live:
                self.ensure(op.args, ind)
                self.op(op, ind)
            if loop and op.out == carried and op.op != "zeros":   # the next chunk's state
                L.append("    " * ind + f"{v} = {self.to(carried, sd)}")
                self.var[carried], self.axes[carried] = v, sd
            for k, name in enumerate(outs):
                if op.out == name and name not in stored:
                    self.ensure([name], ind)
                    self.store(name, f"Y{k}", lead, ind)
                    out_axes[name] = self.axes[name]
                    stored.add(name)
            store_ready()
        if loop:
            self.var[carried], self.axes[carried] = v, sd
            self.store(carried, "SF", "nh", 1)
        return "\n".join(L), ins, outs


def chunk_source(tp: TileProgram, sizes: dict[str, int], H: int, cfg: dict
                 ) -> tuple[str, tuple[str, tuple[str, ...]]]:
    """The module for a chunk-form tile program, and the name and axes of its output."""
    known = {k: ("i", *n.dims) for k, n in tp.prologue.items()}
    C = tp.chunk
    kernels, calls = [], []
    alloc: list[str] = []
    out_axes: dict[str, tuple[str, ...]] = {}
    for st in tp.stages:
        gen = _StageGen(st, tp, sizes, stage_inputs(st, known), cfg)
        src, ins, outs = gen.source(out_axes, known)
        kernels.append(src)
        for name in outs:
            known[name] = out_axes[name]
            shape = ", ".join(str(C if a in ("i", "j") else sizes[a.rstrip("'")])
                              for a in out_axes[name])
            alloc.append(f"    env[{name!r}] = torch.empty((N, {H}, NC, {shape}), "
                         "device=s0.device, dtype=torch.float32)")
        nv = gen.nsplit()
        grid = f"(N * {H}, {nv})" if st.kind == "loop" else f"(N * {H} * NC, {nv})"
        args = [f"env[{n!r}]" for n in ins + outs] + (["s0", "sf"] if st.carried else [])
        calls.append(f"    {st.name}_kernel[{grid}]({', '.join(args + ['NC'])}, "
                     f"num_warps={cfg['num_warps'] or 8}, num_stages={cfg['num_stages']})")
    last = tp.stages[-1].outputs[0]
    launch = ["", "", "def launch(env, N, NC, s0, sf):",
              '    """Run the stages; env maps value names to [N, H, chunks, ...] tensors."""',
              *alloc, *calls, ""]
    return HEADER + "\n".join(kernels) + "\n".join(launch), (last, out_axes[last])
