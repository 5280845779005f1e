"""The TVM backend for the chunk forms: each stage of a tile program as a compiled kernel.

Chunk stages run in parallel over (sequence, head, chunk), the state pass in parallel over
(sequence, head) with a serial loop over chunks. Every tile op becomes a loop nest over its
named axes (the innermost one vectorised); a value with an axis another lacks is indexed by
name, so broadcasting needs no code. Values cross stages in [N, H, chunks, *axes] buffers.
"""
from __future__ import annotations

import re
import threading

import torch

from ...ir.bind import BoundCall
from ...lowering.tile import Stage, TileProgram, stage_inputs
from ..shared.host import chunk_args, chunk_result, scan_args, scan_result
from ..shared.host import FLUSH_BELOW, decays_positive
from .sequential import _Gen, _f, compile_source, run_tvm_sequential
from .build import buffer_scope

_PLANS: dict[tuple, list] = {}   # compiled stages per (program, form, chunk, sizes)
_LOCK = threading.Lock()


def _v(axis: str) -> str:
    return "a_" + axis.replace("'", "p")


class _StageGen:
    def __init__(self, st: Stage, tp: TileProgram, sizes: dict[str, int], C: int,
                 inputs: dict[str, tuple[str, ...]], H: int, gpu: bool = False):
        self.st, self.tp, self.C, self.H = st, tp, C, H
        self.gpu = gpu
        # on a GPU, one block per grid point and one thread per entry of the state's last dim
        # (when no op of the stage reduces along it): each thread holds its column of every
        # value that has that dim, and computes the others itself
        sd = tp.meta["program"].state.dims
        last = sd[-1] if sd else None
        along = {a for op in st.ops for a in tuple(op.attr("over") or ()) +
                 ((op.attr("axis"),) if op.attr("axis") else ())}
        primed = {a for op in st.ops for a in op.axes if a.endswith("'")}
        self.tdim = last if gpu and last and last not in along and last + "'" not in primed \
            else None
        self.sizes = dict(sizes)
        self.inputs = inputs            # global values this stage reads: name -> axes
        self.lines: list[str] = []
        self.allocs: list[str] = []      # local buffers, allocated once per parallel task
        self.buf: dict[str, tuple[str, tuple[str, ...]]] = {}   # value -> (buffer expr, axes)
        self.n = 0
        self.alloc_pad = "    " * (3 if gpu else 2)

    def size(self, axis: str) -> int:
        return self.C if axis in ("i", "j") else self.sizes[axis.rstrip("'")]

    def shape(self, axes) -> str:
        axes = [a for a in axes if a != self.tdim]   # a thread's own column
        return ", ".join(str(self.size(a)) for a in axes) if axes else "1"

    def ref(self, name: str, axes_env: dict[str, str]) -> str:
        buf, axes = self.buf[name]
        env = {**axes_env, self.tdim: "tx"} if self.tdim else axes_env
        idx = ", ".join(env[a] for a in axes)
        if buf.startswith("G:"):   # a global [N, H, chunks, *axes] (or [N, H, *axes]) buffer
            lead = buf[2:]
            return f"{lead}{', ' if axes else ''}{idx}]"
        idx = ", ".join(env[a] for a in axes if a != self.tdim)
        return f"{buf}[{idx if idx else '0'}]"

    def loops(self, axes, body: list[str], ind: int, vec: bool = True) -> list[str]:
        out, pad = [], "    " * ind
        axes = [a for a in axes if a != self.tdim]
        for k, a in enumerate(axes):
            kind = "T.vectorized" if vec and not self.gpu and k == len(axes) - 1 and \
                self.size(a) <= 1024 else "T.serial"
            out.append(f"{pad}for {_v(a)} in {kind}({self.size(a)}):")
            pad += "    "
        return out + [pad + b for b in body]

    def alloc(self, name: str | None, axes, ind: int) -> str:
        """A new local buffer; registered as ``name`` now, or by the caller when its op reads
        the value it rebinds (S = S + ...)."""
        self.n += 1
        b = f"L{self.n}"
        self.allocs.append(f"{self.alloc_pad}{b} = T.alloc_buffer(({self.shape(axes)},), "
                           f"\"float32\"{buffer_scope(self.gpu)})")
        if name is not None:
            self.buf[name] = (b, tuple(axes))
        return b

    def op(self, op, ind: int) -> None:
        o, ax = op.op, op.axes
        env = {a: _v(a) for a in set(ax) | {x for n in op.args for x in self.buf[n][1]}
               | set(op.attr("over") or ())}
        if o == "rename":
            buf, axes = self.buf[op.args[0]]
            self.buf[op.out] = (buf, tuple(ax))
            return
        if o == "load":
            self.buf[op.out] = self.buf[op.attr("value")]
            return
        if o == "zeros":   # the carried state, set up by the stage itself
            return
        b = self.alloc(None, ax, ind)
        tgt = f"{b}[{self.lidx(ax, {a: _v(a) for a in ax})}]"
        L = self.lines
        if o == "ir":
            fn = op.attr("ir_op")
            args = [self.ref(n, env) for n in op.args]
            if fn == "exp":   # decay factors below 1e-20 flushed, as in the torch backend
                e = f"T.exp({args[0]})"
                expr = f"T.if_then_else({e} < {_f(FLUSH_BELOW)}, {_f(0.0)}, {e})"
            elif fn in _Gen.UNARY:
                expr = _Gen.UNARY[fn].format(*args)
            elif fn == "where":
                expr = f"T.if_then_else({args[0]}, {args[1]}, {args[2]})"
            else:
                expr = _Gen.BINARY[fn].format(*args)
            L += self.loops(ax, [f"{tgt} = {expr}"], ind)
        elif o == "contract":
            over = tuple(op.attr("over"))
            L += self.loops(ax, [f"{tgt} = {_f(0.0)}"], ind)
            order = tuple(ax[:-1]) + over + tuple(ax[-1:]) if ax else over
            prod = f"{self.ref(op.args[0], env)} * {self.ref(op.args[1], env)}"
            L += self.loops(order, [f"{tgt} = {tgt} + {prod}"], ind,
                            vec=bool(ax) and order[-1] not in over)
        elif o in ("cumsum", "shift"):
            axis = op.attr("axis")
            prev = dict(env)
            prev[axis] = f"T.max({_v(axis)} - 1, 0)"
            x = self.ref(op.args[0], env)
            if o == "cumsum":
                src = self.ref_buf(b, ax, prev)
                body = [f"{tgt} = {x} + T.if_then_else({_v(axis)} > 0, {src}, {_f(0.0)})"]
            else:
                body = [f"{tgt} = T.if_then_else({_v(axis)} > 0, "
                        f"{self.ref(op.args[0], prev)}, {_f(0.0)})"]
            order = (axis,) + tuple(a for a in ax if a != axis)   # serial along the axis
            L += self.loops(order, body, ind, vec=len(order) > 1)
        elif o == "last":
            env2 = dict(env)
            env2[op.attr("axis")] = str(self.C - 1)
            L += self.loops(ax, [f"{tgt} = {self.ref(op.args[0], env2)}"], ind)
        elif o in ("decay_ratio", "mask"):
            cond = f"{_v('i')} {'>=' if op.attr('mask') == 'i>=j' else '>'} {_v('j')}"
            if o == "mask":
                val = self.ref(op.args[0], env)
            else:
                e = f"T.exp({self.ref(op.args[0], env)} - {self.ref(op.args[1], env)})"
                val = f"T.if_then_else({e} < {_f(FLUSH_BELOW)}, {_f(0.0)}, {e})"
            L += self.loops(ax, [f"{tgt} = T.if_then_else({cond}, {val}, {_f(0.0)})"], ind)
        elif o == "eye":
            a0, a1 = ax
            L += self.loops(ax, [f"{tgt} = T.if_then_else({_v(a0)} == {_v(a1)}, "
                                 f"{_f(1.0)}, {_f(0.0)})"], ind)
        elif o == "invert_unit_lower":   # forward substitution, row by row
            Lm = self.ref(op.args[0], {"i": _v("i"), "j": "a_m"})
            pad = "    " * ind
            L.append(f"{pad}for a_i in T.serial({self.C}):")
            L.append(f"{pad}    for a_j in T.serial({self.C}):")
            L.append(f"{pad}        {b}[a_i, a_j] = T.if_then_else(a_i == a_j, {_f(1.0)}, "
                     f"{_f(0.0)})")
            L.append(f"{pad}    for a_m in T.serial(a_i):")
            L.append(f"{pad}        for a_j in T.serial({self.C}):")
            L.append(f"{pad}            {b}[a_i, a_j] = {b}[a_i, a_j] + {Lm} * {b}[a_m, a_j]")
        else:
            raise NotImplementedError(f"tvm tile renderer: no rule for tile op {o!r}")
        self.buf[op.out] = (b, tuple(ax))

    def ref_buf(self, b: str, axes, env) -> str:
        return f"{b}[{self.lidx(axes, env)}]"

    def lidx(self, axes, env) -> str:
        """Index of a local buffer (without the thread's own dim, on a GPU)."""
        return ", ".join(env[a] for a in axes if a != self.tdim) or "0"

    def gidx(self, axes, env) -> str:
        """Index of a global buffer's trailing axes (the thread's own dim is ``tx``)."""
        return ", ".join("tx" if a == self.tdim else env[a] for a in axes)

    def source(self, loop: bool) -> tuple[str, list[str], list[str]]:
        """TVMScript of the stage; the names of its global inputs and outputs, in order."""
        st, H = self.st, self.H
        ins = list(self.inputs)
        carried = st.carried[0] if st.carried else None
        outs = [n for n in st.outputs if n != carried]   # the final state leaves through SF
        handles = [f"x{k}: T.handle" for k in range(len(ins))] + \
                  [f"y{k}: T.handle" for k in range(len(outs))]
        if carried:
            handles += ["s0: T.handle", "sf: T.handle"]
        head = ["@T.prim_func", f"def main({', '.join(handles)}):",
                '    T.func_attr({"global_symbol": "main", "tir.noalias": True})',
                "    NN = T.int32()", "    NC = T.int32()"]
        for k, name in enumerate(ins):
            axes = self.inputs[name]
            head.append(f"    X{k} = T.match_buffer(x{k}, (NN, {H}, NC"
                        f"{''.join(', ' + str(self.size(a)) for a in axes)}), \"float32\")")
            self.buf[name] = (f"G:X{k}[n, h, c", axes)
        out_axes = {}
        for op in st.ops:
            out_axes[op.out] = op.axes
        for k, name in enumerate(outs):
            axes = out_axes[name]
            lead = "NN, {H}" if name == carried else "NN, {H}, NC"
            head.append(f"    Y{k} = T.match_buffer(y{k}, ({lead.format(H=H)}"
                        f"{''.join(', ' + str(self.size(a)) for a in axes)}), \"float32\")")
        sd = tuple(self.tp.meta["program"].state.dims)
        if carried:
            head.append(f"    S0 = T.match_buffer(s0, (NN, {H}{''.join(', ' + str(self.size(a)) for a in sd)}), \"float32\")")
            head.append(f"    SF = T.match_buffer(sf, (NN, {H}{''.join(', ' + str(self.size(a)) for a in sd)}), \"float32\")")
        g = 1 if self.gpu else 0   # the thread loop's extra level
        pad = "    " * (2 + g)
        grid = f"NN * {H}" if loop else f"NN * {H} * NC"
        if self.gpu:
            head.append(f"    for p in T.thread_binding({grid}, thread=\"blockIdx.x\"):")
            nt = self.size(self.tdim) if self.tdim else 1
            head.append(f"        for tx in T.thread_binding({nt}, thread=\"threadIdx.x\"):")
        else:
            head.append(f"    for p in T.parallel({grid}):")
        if loop:
            head += [f"{pad}n: T.let = p // {H}", f"{pad}h: T.let = p % {H}"]
            ind = 2 + g
            self.lines = []
            sb = self.alloc(carried, sd, ind)
            e = {a: _v(a) for a in sd}
            self.lines += self.loops(sd, [f"{sb}[{self.lidx(sd, e)}] = "
                                          f"S0[n, h, {self.gidx(sd, e)}]"], ind)
            self.lines.append(f"{pad}for c in T.serial(NC):")
            body_ind = 3 + g
        else:
            head += [f"{pad}n: T.let = p // ({H} * NC)", f"{pad}h: T.let = p // NC % {H}",
                     f"{pad}c: T.let = p % NC"]
            body_ind = 2 + g
            self.lines = []
        for op in st.ops:
            self.op(op, body_ind)
            if carried and op.out == carried and op.op != "zeros":   # the next chunk's state
                b, axes = self.buf[carried]
                e = {a: _v(a) for a in axes}
                self.lines += self.loops(axes, [f"{sb}[{self.lidx(axes, e)}] = "
                                                f"{b}[{self.lidx(axes, e)}]"],
                                         body_ind)
                self.buf[carried] = (sb, sd)
            for k, name in enumerate(outs):   # stage outputs go to their global buffers
                if op.out == name and name != carried:
                    axes = out_axes[name]
                    e = {a: _v(a) for a in axes}
                    idx = "".join(", " + x for x in self.gidx(axes, e).split(", ") if x)
                    ind, guard = body_ind, []
                    if self.tdim and self.tdim not in axes:   # the same in every thread
                        guard, ind = ["    " * body_ind + "if tx == 0:"], body_ind + 1
                    self.lines += guard + self.loops(axes, [f"Y{k}[n, h, c{idx}] = "
                                                            f"{self.ref(name, e)}"], ind)
        if loop:
            e = {a: _v(a) for a in sd}
            self.lines += self.loops(sd, [f"SF[n, h, {self.gidx(sd, e)}] = "
                                          f"{sb}[{self.lidx(sd, e)}]"], 2 + g)
        return "\n".join(head + self.allocs + self.lines) + "\n", ins, outs


def run_tvm_chunked(tp: TileProgram, bc: BoundCall, emulate_gpu: bool = False):
    """Run a chunk-form tile program with one compiled TVM kernel per stage. With
    ``emulate_gpu``, the kernels are the GPU rendering (the one ``chunk_cuda_source`` compiles)
    with its block and thread loops run serially on the CPU: a check of the GPU kernels'
    semantics on a machine without a GPU."""
    if not decays_positive(tp, bc):   # the log-space form does not apply to this call
        return run_tvm_sequential(bc)
    p = bc.program
    C = tp.chunk
    pk, env, s0 = chunk_args(tp, bc)
    axes = {k: ("i", *n.dims) for k, n in tp.prologue.items()}
    key = (p.content_hash(), tp.form, C, tuple(sorted(bc.sizes.items())), bc.H, emulate_gpu)
    with _LOCK:
        kernels = _PLANS.get(key)
    if kernels is None:
        kernels = []
        for src, ins, outs, out_axes in _stages(tp, bc.sizes, bc.H, gpu=emulate_gpu):
            if emulate_gpu:
                src = re.sub(r'T\.thread_binding\(([^,]+), thread="[^"]+"\)', r"T.serial(\1)",
                             src)
            kernels.append((compile_source(src), ins, outs, out_axes))
        with _LOCK:
            _PLANS[key] = kernels
    final = None
    for st, (fn, ins, outs, out_axes) in zip(tp.stages, kernels):
        args = [env[n] for n in ins]
        ys = []
        for name in outs:
            shape = [pk.N, bc.H, pk.nc] + [
                C if a in ("i", "j") else bc.sizes[a.rstrip("'")] for a in out_axes[name]]
            ys.append(torch.empty(shape))
        extra = []
        if st.carried:
            final = torch.empty_like(s0)
            extra = [s0, final]
        fn(*args, *ys, *extra)
        for name, y in zip(outs, ys):
            env[name] = y
            axes[name] = out_axes[name]
    last = tp.stages[-1].outputs[0]
    return chunk_result(bc, pk, env[last], axes[last], final)


def _stages(tp: TileProgram, sizes: dict[str, int], H: int, gpu: bool = False) -> list:
    """(TVMScript, inputs, outputs, output axes) of every stage of a chunk-form program."""
    known = {k: ("i", *n.dims) for k, n in tp.prologue.items()}
    out = []
    for st in tp.stages:
        gen = _StageGen(st, tp, sizes, tp.chunk, stage_inputs(st, known), H, gpu)
        src, ins, outs = gen.source(loop=st.kind == "loop")
        out_axes = {op.out: op.axes for op in st.ops}
        known.update({n: out_axes[n] for n in outs})
        out.append((src, ins, outs, out_axes))
    return out


def stage_sources(tp: TileProgram, sizes: dict[str, int], H: int, gpu: bool = False
                  ) -> list[str]:
    """The TVMScript of every stage of a chunk-form tile program (for reading and tests)."""
    return [src for src, *_ in _stages(tp, sizes, H, gpu)]


def chunk_cuda_source(tp: TileProgram, sizes: dict[str, int], H: int, arch: str = "sm_90"
                      ) -> str:
    """CUDA C of every stage of a chunk-form tile program for ``arch``, generated with no GPU:
    one block per grid point (sequence, head[, chunk]), one thread per entry of the state's
    last dim where no op of the stage reduces along it (else one thread)."""
    import tvm
    import tvm.script
    out = []
    for k, src in enumerate(stage_sources(tp, sizes, H, gpu=True)):
        func = tvm.script.from_source(src).with_attr("global_symbol", tp.stages[k].name)
        ex = tvm.compile(tvm.IRModule({tp.stages[k].name: func}),
                         target=tvm.target.Target({"kind": "cuda", "arch": arch}))
        out.append(ex.mod.imports[0].inspect_source())
    return "\n".join(out)


def _scan_source(D: int, H: int, signed: bool) -> str:
    """h_t = a_t h_(t-1) + b_t with a_t = sign_t * exp(log|a_t|): serial over the tokens of
    each sequence, vectorised over the state, parallel over (sequence, head).

    The kernel reads m_t = expm1(log|a_t|) and forms |a_t| h as h + m_t h: a decay of 1 - 1e-6
    rounded to fp32 is off by ~3e-8 the same way every step, which compounds to ~1e-4 over
    16384 steps, while m_t carries it to full relative precision. The sum h + (m_t h + b_t)
    is compensated (Kahan: cv holds the rounding error of h), so the adds do not drift either."""
    sgn = "SG[row, tt, h, d] * " if signed else ""
    step = [f"cv[d] = {sgn}cv[d]" if signed else None,
            f"yv[d] = {sgn}LA[row, tt, h, d] * hv[d] + BV[row, tt, h, d] - cv[d]",
            f"tv[d] = {sgn}hv[d] + yv[d]",
            f"cv[d] = (tv[d] - {sgn}hv[d]) - yv[d]",
            "hv[d] = tv[d]", "HS[row, tt, h, d] = hv[d]"]
    sg = ["sg: T.handle"] if signed else []
    lines = ["@T.prim_func",
             f"def main(la: T.handle, {''.join(x + ', ' for x in sg)}b: T.handle, "
             "hs: T.handle, s0: T.handle, sf: T.handle, seg: T.handle):",
             '    T.func_attr({"global_symbol": "main", "tir.noalias": True})',
             "    BB = T.int32()", "    TT = T.int32()", "    NS = T.int32()",
             f"    LA = T.match_buffer(la, (BB, TT, {H}, {D}), \"float32\")"]
    if signed:
        lines.append(f"    SG = T.match_buffer(sg, (BB, TT, {H}, {D}), \"float32\")")
    lines += [f"    BV = T.match_buffer(b, (BB, TT, {H}, {D}), \"float32\")",
              f"    HS = T.match_buffer(hs, (BB, TT, {H}, {D}), \"float32\")",
              f"    S0 = T.match_buffer(s0, (NS, {H}, {D}), \"float32\")",
              f"    SF = T.match_buffer(sf, (NS, {H}, {D}), \"float32\")",
              "    SEG = T.match_buffer(seg, (NS, 3), \"int32\")",
              f"    for nh in T.parallel(NS * {H}):",
              f"        n: T.let = nh // {H}", f"        h: T.let = nh % {H}",
              "        row: T.let = SEG[n, 0]",
              *[f"        {v} = T.alloc_buffer(({D},), \"float32\")"
                for v in ("hv", "cv", "yv", "tv")],
              f"        for d in T.vectorized({D}):", "            hv[d] = S0[n, h, d]",
              f"            cv[d] = {_f(0.0)}",
              "        for t in T.serial(SEG[n, 2] - SEG[n, 1]):",
              "            tt: T.let = SEG[n, 1] + t",
              f"            for d in T.vectorized({D}):",
              *["                " + x for x in step if x],
              f"        for d in T.vectorized({D}):", "            SF[n, h, d] = hv[d]"]
    return "\n".join(lines) + "\n"


def run_tvm_scan(tp: TileProgram, bc: BoundCall):
    """The scan form: the linear scan as a TVM kernel, the readout evaluated from h."""
    m, sg, b, seg, s0, sf = scan_args(tp, bc)
    fn = compile_source(_scan_source(m.shape[-1], bc.H, sg is not None))
    hs = torch.empty_like(m)
    fn(m, *([sg] if sg is not None else []), b, hs, s0, sf, seg)
    return scan_result(bc, hs, sf)
