"""The TVM backend: the sequential form as a compiled CPU kernel generated from the step's IR.

The kernel reads the call's tensors in place and computes the state-free values (the
prologue: gates, normalised keys, scales) per token (``tvm.prologue``). It runs in parallel
over (sequence, head), or over strips of a vector state's column blocks (``tvm.stepcode``), a
loop over tokens that keeps the state in a local buffer, evaluates the state-dependent nodes
as small loop nests (innermost dim vectorised; single-use elementwise nodes inlined) and
overwrites the state in one pass that also accumulates its reads (``tvm.update``), for groups
of tokens where the step allows (``tvm.tokens``, ``tvm.groups``). Kernels are specialised to
the dim sizes and cached by (IR hash, sizes, target).
"""
from __future__ import annotations

import os
from typing import Callable

import torch

from ...ir.bind import BoundCall
from ...ir.node import Node, depends_on_state
from ..shared.config import merge_defaults
from ..shared import buffers, checkpoints
from ..shared.host import token_loop_args
from .build import (_CACHE, _LOCK, GEN_VERSION, buffer_scope,  # noqa: F401
                        cache_dir, compile_source, cuda_ptx, target)
from .groups import GatedGroups
from .pairs import paired_expr
from .prologue import InKernelPrologue, leaf_args, leaf_layout
from .stepcode import STRIP, StepCode  # noqa: F401 - STRIP: a knob's doc
from .tokens import TokenFusion
from .update import UpdatePass, _f  # noqa: F401 - _f: shared by the other generators

# schedule knobs of the sequential kernel (the autotuner's space): see rk.compile(knobs=...)
CHECKPOINT_CHUNK = 32   # tokens between the checkpoints the backward (tvm.adjoint) walks from
DEFAULT_KNOBS = {"vectorize": 1024,   # vectorise innermost loops up to this extent (0: never)
                 "unroll": 0,         # unroll loops of at most this extent (0: never)
                 "parallel": True,    # run (sequence, head) pairs on all threads
                 "pipeline": True,    # read the state for token t+1 while writing token t's
                 "block": 32,         # update the state in column blocks this wide (0: whole)
                 "tokens": 4,         # tokens per pass over the state, where the step allows
                 "columns": 0}        # blocks of the state's last dim this wide, walked
#                                       by tasks of their own (0: a vector state's STRIP
#                                       wide, in strips for the threads; a matrix state's,
#                                       none)


def check_knobs(knobs: dict | None) -> dict:
    out = merge_defaults(knobs, DEFAULT_KNOBS, "TVM knob")
    for k in ("vectorize", "unroll", "block", "columns", "tokens"):
        if isinstance(out[k], bool) or not isinstance(out[k], int) or out[k] < 0:
            raise ValueError(f"TVM knob {k!r} must be an int >= 0, got {out[k]!r}")
    for k in ("parallel", "pipeline"):
        if not isinstance(out[k], bool):
            raise ValueError(f"TVM knob {k!r} must be a bool, got {out[k]!r}")
    return out


class _Gen(StepCode, TokenFusion, GatedGroups, InKernelPrologue, UpdatePass):
    """TVMScript text for the sequential form of one program at fixed dim sizes."""

    ck_chunk = 0   # > 0: the kernel also writes the state entering each chunk of this many
    cb = None      # (L, width, blocks): the column-blocked layout (``_column_plan``)
    strip = None   # (P, J): tasks per sequence, blocks per task (``_strip_plan``)
    seqs = 1       # sequences of the call the kernel is made for (at most the threads)
    out_dtype = "float32"

    UNARY = {"neg": "(-{0})", "exp": "T.exp({0})", "log": "T.log({0})",
             "sigmoid": "T.sigmoid({0})", "tanh": "T.tanh({0})", "sqrt": "T.sqrt({0})",
             "rsqrt": "T.rsqrt({0})", "abs": "T.fabs({0})",
             "relu": "T.max({0}, T.float32(0))", "silu": "({0} * T.sigmoid({0}))",
             "softplus": "(T.max({0}, T.float32(0)) + T.log1p(T.exp(-T.fabs({0}))))"}
    BINARY = {"add": "({0} + {1})", "sub": "({0} - {1})", "mul": "({0} * {1})",
              "div": "({0} / {1})", "pow": "T.pow({0}, {1})", "maximum": "T.max({0}, {1})",
              "minimum": "T.min({0}, {1})", "lt": "({0} < {1})", "le": "({0} <= {1})",
              "gt": "({0} > {1})", "ge": "({0} >= {1})", "eq": "({0} == {1})",
              "ne": "({0} != {1})"}

    def __init__(self, p, sizes: dict[str, int], gpu: bool = False,
                 knobs: dict | None = None, layout: dict | None = None, seqs: int = 1):
        self.p, self.sizes = p, dict(sizes)
        self.knobs = check_knobs(knobs)
        # on a GPU the last state dim is spread over the threads of a block: each thread keeps
        # its column of the state in registers and contracts the other dims by itself
        self.tdim = p.state.dims[-1] if gpu else None
        self.tvar = "tt"   # the token whose prologue values expressions read
        self.scope = buffer_scope(gpu)
        nodes = p.nodes()
        self.dep = depends_on_state(nodes)
        self.state = next(n for n in nodes if n.role == "state")
        self.step = [n for n in nodes if self.dep[id(n)] and n.op != "input"]
        uses: dict[int, int] = {}
        for n in self.step:
            for a in n.args:
                uses[id(a)] = uses.get(id(a), 0) + 1
        for r in (p.output, p.new_state):
            uses[id(r)] = uses.get(id(r), 0) + 2
        self.out_free = not self.dep[id(p.output)]
        self.gsizes = dict(self.sizes)   # the dims' sizes (``sizes``: a column block's)
        self.seqs = seqs
        self.cb = None if gpu else self._column_plan()
        if self.cb:
            self.sizes[self.cb[0]] = self.cb[1]
        self.free_inline: set[int] = set()
        self.feeds: list[Node] = []
        self.names: dict[int, str] = {}
        if gpu:
            self._plan_feeds()
        else:
            self.fast = True
            self._plan_prologue(layout or {})

        def cheap(n: Node) -> bool:   # one op on leaves: recomputing beats a store and loads
            return n.op in self.UNARY or n.op in self.BINARY and all(
                a is self.state or a.op == "const" or not self.dep[id(a)] for a in n.args)
        self.mat = {id(n) for n in self.step if n.op in ("contract", "sum", "max")
                    or (uses.get(id(n), 0) > 1 and n.dtype == "f32" and not cheap(n))}
        # a rotation reads its value at other positions: computed into a buffer of its own
        self.mat |= {id(n) for n in self.step if n.op in ("rotate", "pairs")}
        # a value with fewer dims than its consumer is computed once, not once per row
        for c in self.step:
            for a in c.args:
                if self.dep[id(a)] and a.op != "input" and a.dtype == "f32" and \
                        set(a.dims) < set(c.dims) and not cheap(a):
                    self.mat.add(id(a))
        # the new state can overwrite S in place when nothing evaluated after it reads the old S
        after = _descendants(self.step, p.new_state)
        self.in_place = not any(self._reads_state(n) for n in self.step
                                if id(n) in after and n is not p.new_state) and \
            not (self.dep[id(p.output)] and id(p.output) in after and
                 self._reads_state(p.output, top=True)) and \
            not any(n.op in ("rotate", "pairs") for n in self.step)   # reads other entries
        self.mat |= {id(a) for a in self.pro_mat}
        for i, f in enumerate(self.feeds):
            self.names.setdefault(id(f), f"F{i}")
        for i, n in enumerate(self.step):
            self.names.setdefault(id(n), f"N{i}")

    def _pure(self, n: Node) -> bool:
        """Computed from S and prologue values only, without materialised intermediates."""
        return n is self.state or not self.dep[id(n)] or (
            id(n) not in self.mat and n.op in self.BINARY | self.UNARY and
            all(self._pure(a) for a in n.args))

    def _pipelined(self, after: set[int]) -> list[Node]:
        """Contractions of the old state that can be computed for token t+1 while token t's
        update writes S: one pass over the state per token instead of two (CPU only)."""
        sd = self.p.state.dims
        if self.tdim is not None or not self.in_place or not sd or not self.knobs["pipeline"]:
            return []
        return [n for n in self.step if n.op == "contract" and id(n) in self.mat and
                id(n) not in after and sd[-1] not in n.attr("over") and
                set(n.attr("over")) <= set(sd) and all(self._pure(a) for a in n.args)]

    def _product(self, n: Node, e: dict[str, str]) -> str:
        """The summand of a contraction as a product, loop-invariant factors first."""
        alld = tuple(d for d in self.p.dims if d in n.dims or d in n.attr("over"))
        fs = sorted(self._factors(n.args[0]) + self._factors(n.args[1]), key=lambda f: (
            bool(f.dims) and alld[-1] in f.dims and alld[-1] != self.tdim, len(f.dims)))
        return self._chain(fs, e)

    def _factors(self, n: Node) -> list[Node]:
        if n.op == "mul" and id(n) not in self.mat and (self.dep[id(n)] or
                                                       id(n) in self.free_inline or
                                                       id(n) in self.pro):
            return self._factors(n.args[0]) + self._factors(n.args[1])
        return [n]

    def _reads_state(self, n: Node, top: bool = False) -> bool:
        """Whether evaluating n (with its inlined args) loads the old state S."""
        if n is self.state:
            return True
        if (not top and id(n) in self.mat) or n is self.p.new_state or not self.dep[id(n)]:
            return False
        return any(self._reads_state(a) for a in n.args)

    def idx(self, dims, env: dict[str, str]) -> str:
        """Index into a local buffer (the thread dim, on a GPU, is not stored)."""
        dims = [d for d in dims if d != self.tdim]
        return ", ".join(env[d] for d in dims) if dims else "0"

    def local_shape(self, dims) -> str:
        dims = [d for d in dims if d != self.tdim]
        return ", ".join(str(self.sizes[d]) for d in dims) if dims else "1"

    def expr(self, n: Node, env: dict[str, str]) -> str:
        if n is self.state:
            return f"S[{self.idx(n.dims, env)}]"
        if n.op == "const":
            return _f(n.attr("value"))
        if id(n) in self.leaf_of:
            return self.leaf_expr(n, env)
        if id(n) in self.pro:
            if id(n) in self.mat:   # stored per token: this token's, or the next one's
                nx = "_nx" if self.tvar == "tn" and not self.in_pro else ""
                return f"{self.names[id(n)]}{nx}[{self.idx(n.dims, env)}]"
        elif not self.dep[id(n)] and id(n) not in self.free_inline:
            lead = f"row, {self.tvar}, h" + (", " if n.dims else "")
            return f"{self.names[id(n)]}[{lead}{', '.join(self.gi(d, env) for d in n.dims)}]"
        if id(n) in self.mat:
            return f"{self.names[id(n)]}[{self.idx(n.dims, env)}]"
        if n.op == "mul":   # a product: loop-invariant factors first, so they are hoisted
            inner = self.p.dims[-1] if self.p.dims else None
            fs = sorted(self._factors(n), key=lambda f: (
                bool(f.dims) and f.dims[-1] == inner and inner != self.tdim, len(f.dims)))
            return self._chain(fs, env)
        if n.op in ("rotate", "pairs"):
            return paired_expr(self, n, env)
        return self.apply_op(n, [self.expr(x, env) for x in n.args])

    def apply_op(self, n: Node, a: list[str]) -> str:
        """An elementwise op of n on its arguments' code ``a``."""
        if n.op in self.UNARY:
            return self.UNARY[n.op].format(*a)
        if n.op in self.BINARY:
            return self.BINARY[n.op].format(*a)
        if n.op == "where":
            return f"T.if_then_else({a[0]}, {a[1]}, {a[2]})"
        raise NotImplementedError(f"tvm backend: op {n.op} cannot be inlined")

    def source(self) -> str:
        p, sz = self.p, self.gsizes
        sd = p.state.dims
        shape = lambda dims: ", ".join(str(sz[d]) for d in dims)  # noqa: E731
        cpu = self.tdim is None
        args = ["o: T.handle", "s0: T.handle", "sf: T.handle", "seg: T.handle"] + [
            f"f{i}: T.handle" for i in range(len(self.feeds))] + (
            self.leaf_params() if cpu else []) + (["ck: T.handle"] if self.ck_chunk else [])
        lines = ["@T.prim_func", f"def main({', '.join(args)}):",
                 '    T.func_attr({"global_symbol": "main", "tir.noalias": True})',
                 "    B = T.int32()", "    TT = T.int32()", "    NS = T.int32()"]
        H = sz["__H"]
        od = p.output.dims
        lines.append(f"    O = T.match_buffer(o, (B, TT, {H}{', ' if od else ''}{shape(od)}), "
                     f"\"{self.out_dtype}\")")
        lines.append(f"    S0 = T.match_buffer(s0, (NS, {H}, {shape(sd)}), \"float32\")")
        lines.append(f"    SF = T.match_buffer(sf, (NS, {H}, {shape(sd)}), \"float32\")")
        lines.append("    SEG = T.match_buffer(seg, (NS, 3), \"int32\")")
        if self.ck_chunk:
            lines += ["    NC = T.int32()", f"    CK = T.match_buffer(ck, (NS, {H}, NC, "
                      f"{shape(sd)}), \"float32\")"]
        for i, f in enumerate(self.feeds):
            fd = f.dims
            lines.append(f"    F{i} = T.match_buffer(f{i}, (B, TT, {H}{', ' if fd else ''}"
                         f"{shape(fd)}), \"float32\")")
        if cpu:
            lines += self.leaf_buffers()
        nb = self.cb[2] if self.cb else 1
        after = _descendants(self.step, p.new_state)
        pre = self._pipelined(after)
        self.strip = self._strip_plan(pre) if cpu else None
        if cpu:
            kind = "T.parallel" if self.knobs["parallel"] else "T.serial"
            lines.append(f"    for nhb in {kind}(NS * {self.strip[0] if self.strip else H * nb}):")
            ind = 2
        else:
            lines.append(f"    for nh in T.thread_binding(NS * {H}, thread=\"blockIdx.x\"):")
            lines.append(f"        for tx in T.thread_binding({sz[self.tdim]}, "
                         "thread=\"threadIdx.x\"):")
            ind = 3
        pad = "    " * ind
        if self.strip:   # a task: one sequence's blocks pp * J .. pp * J + J - 1
            P, J = self.strip
            lines += [f"{pad}n: T.let = nhb // {P}", f"{pad}pp: T.let = nhb % {P}",
                      f"{pad}row: T.let = SEG[n, 0]",
                      f"{pad}S_all = T.alloc_buffer(({J * self.cb[1]},), \"float32\""
                      f"{self.scope})"]
        else:
            if cpu:
                lines += [f"{pad}nh: T.let = nhb // {nb}"] + (
                    [f"{pad}vb: T.let = nhb % {nb}"] if self.cb else [])
            lines += [f"{pad}n: T.let = nh // {H}", f"{pad}h: T.let = nh % {H}",
                      f"{pad}row: T.let = SEG[n, 0]",
                      f"{pad}S = T.alloc_buffer(({self.local_shape(sd)},), \"float32\""
                      f"{self.scope})"]
        sb = 1 if self.strip else 0   # the block loop's indent
        for n in self.step:
            if (id(n) in self.mat or n is p.new_state) and not (n is p.new_state and
                                                                self.in_place):
                lines.append(f"{pad}{self.names[id(n)]} = T.alloc_buffer(("
                             f"{self.local_shape(n.dims)},), \"float32\"{self.scope})")
        e = self.env(sd)
        lines += self.strip_blocks(ind) + self.loops(
            sd, [f"S[{self.idx(sd, e)}] = S0[n, h, {self.gidx(sd, e)}]"], ind + sb)
        for n in pre:   # the next step's reads of the state, accumulated during each update
            lines.append(f"{pad}{self.names[id(n)]}_next = T.alloc_buffer(("
                         f"{self.local_shape(n.dims)},), \"float32\"{self.scope})")
        for a in self.pro_mat:   # the prologue's stored values (and the next token's)
            for sfx in ("", "_nx") if pre else ("",):
                lines.append(f"{pad}{self.names[id(a)]}{sfx} = T.alloc_buffer(("
                             f"{self.local_shape(a.dims)},), \"float32\"{self.scope})")
        self.late_allocs: list[str] = []   # buffers the token loop's code asks for
        alloc_at = len(lines)
        if pre:         # ... and for the first token, before the loop
            lines.append(f"{pad}t0: T.let = T.min(SEG[n, 1], TT - 1)")
            lines += self.pro_code("t0", "", ind)
            self.tvar = "t0"
            for n in pre:
                lines += self.node_code(n, ind)
            self.tvar = "tt"
        U = self.fused_tokens(after, pre)
        ln = "(SEG[n, 2] - SEG[n, 1])"
        ind2 = ind + 1
        pad2 = "    " * ind2
        if U > 1:   # groups of U tokens per pass over the state, then the rest one by one
            lines += self.per_token_allocs(U, pad)
            lines.append(f"{pad}for tg in T.serial({ln} // {U}):")
            lines += [f"{pad2}tt{'' if u == 0 else f'_u{u}'}: T.let = SEG[n, 1] + tg * {U}"
                      f"{f' + {u}' if u else ''}" for u in range(U)]
            lines += self.strip_blocks(ind2)
            self._checkpoint(f"tg * {U}", ind2 + sb, lines)
            reps = [("tt" if u == 0 else f"tt_u{u}", "" if u == 0 else f"_u{u}")
                    for u in range(U)]
            if self.group_plan():   # from the state the group enters (``groups``)
                self._group_body(U, ind2 + sb, lines)
            else:
                self._token_body(reps, ind2 + sb, lines, after, pre)
            lines.append(f"{pad}for tr in T.serial({ln} % {U}):")
            lines.append(f"{pad2}tt: T.let = SEG[n, 1] + {ln} // {U} * {U} + tr")
            lines += self.strip_blocks(ind2)
            self._checkpoint(f"{ln} // {U} * {U} + tr", ind2 + sb, lines)
        else:
            lines.append(f"{pad}for t in T.serial({ln[1:-1]}):")
            lines.append(f"{pad2}tt: T.let = SEG[n, 1] + t")
            lines += self.strip_blocks(ind2)
            self._checkpoint("t", ind2 + sb, lines)
        self._token_body([("tt", "")], ind2 + sb, lines, after, pre)
        e = self.env(sd)
        lines += self.strip_blocks(ind) + self.loops(
            sd, [f"SF[n, h, {self.gidx(sd, e)}] = S[{self.idx(sd, e)}]"], ind + sb)
        lines[alloc_at:alloc_at] = [pad + a for a in dict.fromkeys(self.late_allocs)]
        return "\n".join(lines) + "\n"


def _descendants(nodes: list[Node], root: Node) -> set[int]:
    """ids of the nodes (in topological ``nodes``) that depend on ``root``, root included."""
    out = {id(root)}
    for n in nodes:
        if any(id(a) in out for a in n.args):
            out.add(id(n))
    return out


def sequential_source(p, sizes: dict[str, int], H: int, gpu: bool = False,
                      knobs: dict | None = None, checkpoints: int = 0,
                      layout: dict | None = None, out_dtype: str = "float32",
                      seqs: int = 1) -> str:
    """The TVMScript of the sequential kernel (for reading and golden tests); with
    ``checkpoints``, it also writes the state entering every chunk of that many tokens.
    ``layout``: input name -> (dtype, head group) where not fp32 and ungrouped; ``seqs``:
    the sequences of the call the kernel is for (up to the threads)."""
    gen = _Gen(p, {**sizes, "__H": H}, gpu, knobs, layout, seqs)
    gen.ck_chunk = checkpoints
    gen.out_dtype = out_dtype
    return gen.source()


def cuda_source(p, sizes: dict[str, int], H: int, arch: str = "sm_90") -> str:
    """CUDA C of the sequential kernel for ``arch``, generated with no GPU: one block per
    (sequence, head), one thread per entry of the state's last dim."""
    import tvm
    import tvm.script
    func = tvm.script.from_source(sequential_source(p, sizes, H, gpu=True))
    ex = tvm.compile(tvm.IRModule({"main": func}),
                     target=tvm.target.Target({"kind": "cuda", "arch": arch}))
    return ex.mod.imports[0].inspect_source()


_KERNELS: dict[tuple, tuple[Callable, _Gen]] = {}


def _kernel(p, sizes: dict[str, int], H: int, knobs: dict | None = None,
            checkpoints: int = 0, layout: tuple = (), out_dtype: str = "float32",
            seqs: int = 1) -> tuple[Callable, _Gen]:
    knobs = check_knobs(knobs)
    key = (p.content_hash(), tuple(sorted(sizes.items())), H, torch.get_num_threads(),
           tuple(sorted(knobs.items())), checkpoints, layout, out_dtype, seqs,
           os.environ.get("RECURKIT_TVM_MCPU"))
    with _LOCK:
        hit = _KERNELS.get(key)
    if hit is None:
        gen = _Gen(p, {**sizes, "__H": H}, knobs=knobs,
                   layout={name: (dt, G) for name, dt, G in layout}, seqs=seqs)
        gen.ck_chunk = checkpoints
        gen.out_dtype = out_dtype
        hit = (compile_source(gen.source()), gen)
        with _LOCK:
            _KERNELS[key] = hit
    return hit


_OUT = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def run_tvm_sequential(bc: BoundCall, knobs: dict | None = None):
    """Run the sequential form of a stateful program as a compiled TVM kernel."""
    p = bc.program
    C = CHECKPOINT_CHUNK if checkpoints.wanted() else 0
    out = _OUT.get(bc.out_dtype, "float32")
    # the sequences the call has, up to the threads (a vector state's kernel cuts its
    # columns into as many tasks per sequence as the threads need)
    seqs = min(bc.N, max(1, torch.get_num_threads()))
    fn, gen = _kernel(p, bc.sizes, bc.H, knobs, C, leaf_layout(bc), out, seqs)
    feeds, segt, s0, sf = token_loop_args(bc, gen.feeds)
    o = buffers.output((bc.B, bc.T, bc.H, *(bc.sizes[d] for d in p.output.dims)),
                       torch.float32 if out == "float32" else bc.out_dtype)   # all written
    ck = []
    if C:   # the backward's checkpoints: [N, H, chunks of the longest sequence, *state]
        longest = max([int(e - s) for s, e in segt[:, 1:].tolist()] + [1])
        ck = [buffers.empty((s0.shape[0], bc.H, -(-longest // C), *s0.shape[2:]))]
    fn(o, s0, sf, segt, *feeds, *leaf_args(bc, gen), *ck)
    if C:
        checkpoints.offer(checkpoints.Checkpoints(p.content_hash(), C, ck[0]))
    return o.to(bc.out_dtype), (sf if bc.output_final_state else None)
