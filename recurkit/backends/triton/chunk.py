"""Triton source for the chunk forms: one kernel per stage of the tile program.

The tile program is first rewritten by ``lowering.fuse.optimize`` (the output computed inside
the state pass, cheap values recomputed where read), so a chunk form is two kernels: a chunk
stage, one program per (sequence, head, chunk), and the state pass, one program per
(sequence, head[, block of V]) looping over the chunks with the state in registers. A value is
a register block holding exactly its own named axes, in a recorded order; ops align their
operands by name (permute, then insert size-1 axes), so broadcasting never needs the author's
help. Contractions of two matrices over one axis are ``tl.dot``; the rest multiply and reduce.

Per-token values are computed in the kernels from the call's tensors (``prologue``); the
output is stored straight into the call's [B, T, H, *dims] output in its dtype. Values that
cross stages go through [N, H, chunks, *axes] buffers (true sizes; blocks are padded to powers
of two, at least 16, with masked loads and stores), in the call's 16-bit dtype when it has one,
except values made from the gates alone (log-space: they stay fp32), and the state, always fp32.
"""
from __future__ import annotations

import re

from ...lowering.tile import Stage, TileOp, TileProgram
from .blocked import BlockedContractions
from .position_loop import PositionLoops
from .state_loop import StateLoops
from .shift_invert import ShiftInvert
from .prologue import ChunkIO, PrologueRender
from .kernel_io import KernelIO
from .segment_pass import SegmentPass
from .sequential import FLUSH, TRITON_BINARY, TRITON_UNARY, pow2


def _var(name: str) -> str:
    return "v_" + re.sub(r"\W", "_", name.replace("'", "p"))


class _StageGen(BlockedContractions, PositionLoops, StateLoops, PrologueRender, ShiftInvert,
                SegmentPass, KernelIO):
    def __init__(self, st: Stage, tp: TileProgram, sizes: dict[str, int], H: int,
                 inputs: dict[str, tuple[str, ...]], cfg: dict, io: ChunkIO):
        self.st, self.tp, self.C, self.H, self.io = st, tp, tp.chunk, H, io
        self.sizes, self.inputs, self.cfg = dict(sizes), inputs, cfg
        self.used: set[str] = set()   # kernel arguments the body reads
        self.accesses: list[tuple] = []   # (r|w, pointer, axes, per chunk, by token) for the
        self.dots: list[tuple] = []       # traffic model; (FLOPs, per chunk) per tl.dot
        self._tok: dict[int, bool] = {}
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
        # a chunk stage splits only a wide state (its work along the other axes is repeated
        # by every block); the state pass by ``block_v``
        bv = cfg["block_v"] or (64 if cfg.get("_16bit") else 16)
        bv = bv if st.kind == "loop" else max(bv, 128)
        self.bsplit = min(pow2(bv), max(16, pow2(sizes[last]))) if self.split else 0
        if self.split and self.bsplit >= max(16, pow2(sizes[last])):
            self.split, self.bsplit = None, 0
        self.dot = "tf32"   # tl.dot operands: "tf32", "ieee", or a 16-bit dtype they take
        self.kctx: tuple[str, int] | None = None   # (axis, block) inside a blocked loop
        self.hoist: tuple[int, int] | None = None  # (line, indent) just before that loop
        self.hoisted: set[str] = set()
        self.ptrs: dict[str, tuple[str, str]] = {}  # buffer input -> (pointer, lead offset)
        self.deferred: dict[str, str] = {}            # load op output -> the input it reads
        self.late: list[tuple] = []   # (pointer, IR, dims): per-token values of the prologue's
                                      # IR over the stage's values, stored once those exist
        self.reread = False   # reads from here on may repeat earlier ones (cache hits)

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

    def strided(self, dims: tuple[str, ...], axes: tuple[str, ...]) -> tuple[str, int]:
        """Offsets of a block over ``axes`` into a contiguous row over ``dims`` (true sizes,
        the last fastest; "0" when there are none), and the row's element count."""
        terms, stride = [], 1
        for a in reversed(dims):
            t = self.ar(a, axes)
            terms.append(f"{t} * {stride}" if stride != 1 else t)
            stride *= self.size(a)
        return " + ".join(reversed(terms)) or "0", stride

    def dim_masks(self, axes: tuple[str, ...], skip: tuple[str, ...] = ()) -> list[str]:
        """Lane masks of the axes whose block may run past their size (padded to a power of
        two, split over programs, or a block of a blocked loop)."""
        return [f"({self.ar(a, axes)} < {self.size(a)})" for a in axes if a not in skip and (
            self.block(a) != self.size(a) or a == self.split or
            (self.kctx and a == self.kctx[0]))]

    def full(self, axes: tuple[str, ...], fill: str = "0.0") -> str:
        """A block over ``axes`` holding ``fill``."""
        return f"tl.full([{', '.join(str(self.block(a)) for a in axes)}], {fill}, tl.float32)"

    def offset(self, axes: tuple[str, ...]) -> tuple[str, str | None, int]:
        """Offsets of a [*axes] row (true sizes), its mask, and its element count."""
        off, numel = self.strided(axes, axes)
        return off, " & ".join(self.dim_masks(axes)) or None, numel

    def ensure(self, names, ind: int) -> None:
        """Read the stage inputs among ``names`` that are not read yet."""
        for name in names:
            if name in self.var:
                continue
            src = self.deferred.get(name, name)
            if src != name:
                self.ensure([src], ind)
            else:
                self.read(name, ind)
            if src in self.var:
                self.var[name], self.axes[name] = self.var[src], self.axes[src]

    def emit(self, out: str, axes: tuple[str, ...], expr: str, ind: int) -> None:
        self.n += 1
        v = f"{_var(out)}_{self.n}"
        self.L.append("    " * ind + f"{v} = {expr}")
        self.var[out], self.axes[out] = v, tuple(axes)

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

    # --- the kernel -------------------------------------------------------------------------
    def source(self, out_axes: dict[str, tuple[str, ...]], known, bufs: dict[str, str],
               results: dict[str, tuple[str, tuple[str, ...]]], flags: dict
               ) -> tuple[str, list[str]]:
        """The stage's kernel, and its parameters in order (before NC and TT). ``results``:
        the values stored per token, each into (its pointer, its dims)."""
        st, C, H = self.st, self.C, self.H
        carried = st.carried[0] if st.carried else None
        outs = [n for n in st.outputs if n != carried and n not in known]
        L = self.L
        loop = st.kind == "loop"
        # in-GPU segments: a state pass as a "local" or "joined" kernel (``segment_pass``)
        segs = flags.get("segments", 1) if loop else 1
        phase = flags.get("phase") if segs > 1 else None
        self.seg = (segs, phase, None, [], None)   # + M's ops, summed gates, M's variable
        L += ["    pid = tl.program_id(0)", "    pv = tl.program_id(1)"]
        if phase:
            L += self.segment_programs()
        else:
            L += ["    nh = pid.to(tl.int64)"] if loop else [
                "    p = pid.to(tl.int64)", "    c = p % NC", "    nh = p // NC"]
        L += [f"    n = nh // {H}", f"    h = nh % {H}"]
        if flags["varlen"]:   # the sequence's first token and the one past its last
            self.used.add("CU")
            runs = (segs - 1 if phase == "local" else segs) if phase else 1
            for _ in range(2):
                self.note("r", "CU", (), 1, times=runs)
            L += ["    bos = tl.load(CU + n).to(tl.int64)",
                  "    eos = tl.load(CU + n + 1).to(tl.int64)"]
        else:
            L += ["    bos = n * TT", "    eos = bos + TT"]
        if loop:
            lead, ind = "nh * NC + c", 2
            sd = tuple(self.tp.meta["program"].state.dims)
            self.inputs = {**self.inputs, carried: sd}
            # the carried value starts from the initial state or, backwards, from the final
            # state's cotangent (zeros where the call has none)
            adjoint = next(op for op in st.ops if op.out == carried).attr("init") != \
                "initial_state"
            src = ("DSF", "has_dsf") if adjoint else ("S0", "has_s0")
            # segments: the one that starts from it (the last, backwards)
            first = (f"sg == {segs - 1}" if st.reverse else "sg == 0") if phase else None
            if flags.get(src[1]):
                self.load(carried, src[0], "nh", 1, only=first)
            else:
                self.emit(carried, sd, self.full(sd), 1)
            if phase:
                self.segment_entry(carried, sd, flags)
            elif st.reverse:
                L += ["    for cr in range(0, NC):", "        c = NC - 1 - cr"]
            else:
                L += ["    for c in range(0, NC):"]
            L += [f"        tok0 = bos + c * {C}", "        rem = eos - tok0"]
            v = self.var[carried]
        else:
            lead, ind = "p", 1
            L += [f"    tok0 = bos + c * {C}", "    rem = eos - tok0"]
        for name in self.inputs:
            if name in bufs:
                self.ptrs[name] = (bufs[name], lead)
        groups = self.blocked_groups()
        done = {op.out for members in groups.values() for op, _ in members}
        self.defs_all = {op.out: op for op in st.ops}
        ploops, lazy = self.position_loops() if not loop else (set(), set())
        live = self.live(done, carried) if groups else {op.out for op in st.ops}
        if phase == "local":   # only what the state needs: no outputs, no buffers
            outs, live, groups = [], *self.state_only(carried, live, groups)
        # an output that only renames a value is stored as soon as that value exists, so
        # that it is not held in registers to the end of the kernel
        alias = {op.out: op for op in st.ops if op.op in ("rename", "load")}
        stored: set[str] = set()

        def put(name: str, at: int = ind) -> None:
            self.ensure([name], at)
            if name in results and results[name] is None:   # read by ``late`` alone
                pass
            elif name in results:
                self.store_output(name, at, *results[name])
            else:
                self.store(name, bufs[name], lead, at)
            out_axes[name] = self.axes[name]
            stored.add(name)

        def store_ready() -> None:
            for name in outs:
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
                put(name)
        for op in st.ops:
            if op.op == "load":   # read where first used
                self.deferred[op.out] = op.attr("value")

        def body(op: TileOp) -> None:
            if op.out in groups:
                self.blocked(groups[op.out], ind)
            if op.op == "load" or op.op == "zeros" or op.out in lazy:
                pass
            elif op.out in ploops:
                self.position_loop(op, lazy, ind)
            elif op.out not in done and op.out in live:
                self.ensure(op.args, ind)
                self.op(op, ind)
            if loop and op.out == carried and op.op != "zeros":   # the next chunk's state
                L.append("    " * ind + f"{v} = {self.to(carried, sd)}")
                self.var[carried], self.axes[carried] = v, sd
            for name in outs:
                if op.out == name and name not in stored:
                    put(name)
            store_ready()
            self.store_late(ind)
        plan = None if loop else self.state_loop_plan(groups, lazy)
        if plan is None:
            for op in st.ops:
                body(op)
            if phase == "local":
                self.segment_step(carried, sd, ind)
        else:   # the state blocks a block of V at a time
            self.split_by_state_loop(plan, body, outs, stored, put, store_ready, lazy, ind)
        if self.late:
            raise RuntimeError(f"{st.name}: the values of the prologue's backward were never "
                               "all made")
        if loop:
            self.var[carried], self.axes[carried] = v, sd
            if phase == "local":   # the segment's state and maps
                self.segment_exit(carried, sd)
            elif adjoint:   # the initial state's cotangent
                self.store(carried, "DS0", "nh", 1, only="sg == 0" if phase else None)
            elif flags["has_sf"]:
                self.store(carried, "SF", "nh", 1, only=f"sg == {segs - 1}" if phase else None)
        params = sorted(self.used, key=_param_order)
        name = f"{st.name}_local" if phase == "local" else st.name
        head = ["", "", "@triton.jit",
                f"def {name}_kernel({', '.join(params + ['NC', 'TT'])}):"]
        return "\n".join(head + L), params


FIXED = ("O", "S0", "SL", "GK", "GV", "MK", "SF", "DSF", "DS0", "CU")


def _param_order(name: str) -> tuple[int, int]:
    kinds = "XFBLOS"
    if name in FIXED:
        return (10 + FIXED.index(name), 0)
    if name.startswith("SC"):
        return (20, int(name[2:]))
    return (kinds.index(name[0]), int(name[1:]))
