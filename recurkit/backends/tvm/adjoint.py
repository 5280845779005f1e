"""The generated backward of a recurrence as one compiled TVM CPU kernel.

It renders the adjoint step (``lowering/adjoint.py``) with the sequential kernel's expression
machinery (``tvm.sequential._Gen``). Per (sequence, head), in parallel:

  1. the forward, saving the state entering every chunk of ``chunk`` tokens (checkpoints),
     unless the op's forward saved them (``shared.checkpoints``);
  2. for each chunk, last first: the chunk's states recomputed from its checkpoint into a
     scratch of chunk + 1 states, then its tokens walked in reverse, each evaluating the
     adjoint step: it reads the old state (scratch slot j), the new one (slot j + 1), the
     feeds, the output's cotangent and ``G``, the cotangent of the new state carried back in
     time (a local buffer, overwritten with the old state's cotangent), and writes each
     feed's cotangent for the token;
  3. ``G``, now the cotangent of the initial state, is written out.

The recompute accumulates each token's contractions of the state while the token before it
writes its state, and keeps the small values the walk reads again (``tvm.recompute``); the
walk writes ``dS' + q do^T`` over ``G`` where only it reads ``dS'``, makes values with fewer
dims than their readers once per step, and, for states whose last dim separates, runs in
column blocks of it (``tvm.columns``). Vectors are the host's width (``build.vector_lanes``).

Memory beyond the inputs: one checkpoint per chunk and the scratch, per (sequence, head),
both from ``shared.buffers`` (reused across calls).
"""
from __future__ import annotations

import os
from typing import Callable

import torch

from ...ir.bind import BoundCall
from ...ir.node import BINARY, UNARY, Node, toposort
from ...lowering.adjoint import AdjointStep
from ..shared import buffers
from ..shared.checkpoints import Checkpoints
from ..shared.host import initial_state, segments
from .sequential import CHECKPOINT_CHUNK, _Gen
from .columns import ColumnBlocks
from .nests import NestEmitter, _Item
from .recompute import Recompute
from .build import _LOCK, compile_source, vector_lanes

# tokens between checkpoints: the scratch (chunk + 1 states) stays in cache; the forward
# kernel writes its checkpoints at the same spacing
DEFAULT_CHUNK = CHECKPOINT_CHUNK
# columns of the state walked at a time where the step separates along its last dim
# (``lowering.columns``): wider states walk in blocks of this many columns. Measured (GDN,
# K = V = 128, one thread, 2026-12-03, AMD EPYC AVX-512): the whole state beat blocks of
# 32 and 64 columns both in AVX-512 code (16 lanes) and in AVX2 code (znver3 target, 8
# lanes: 0.9x the time of 32-column blocks)
BLOCK_COLUMNS = 128
INLINE_COST = 6      # a value used twice is stored when its inline expression has more ops


class _AdjGen(ColumnBlocks, Recompute, NestEmitter, _Gen):
    """TVMScript text of the backward kernel of one program at fixed dim sizes."""

    def __init__(self, adj: AdjointStep, sizes: dict[str, int], chunk: int = DEFAULT_CHUNK,
                 knobs: dict | None = None, given: bool = False, block: int | None = None,
                 lanes: int | None = None):
        from .sequential import check_knobs
        p = adj.program
        self.lanes = lanes or vector_lanes()
        block = BLOCK_COLUMNS if block is None else block
        self.p, self.adj, self.sizes, self.chunk = p, adj, dict(sizes), chunk
        self.full = dict(sizes)                  # the dims' sizes (``sizes``: a block's)
        self.given = given                       # the checkpoints come from the forward
        self.knobs = check_knobs(knobs)
        self.tdim, self.tvar = None, "tt"
        self.state = next(n for n in p.nodes() if n.role == "state")
        self.slot, self.slot_next = "j", None   # the scratch slots of the old and new state
        self.lets: tuple | None = None           # (nest dims, hoisted loads) while rendering
        self.nlet = 0
        feed_ids = {id(f) for f in adj.feeds}
        self.fwd = toposort([p.new_state], stop=feed_ids)
        self.bwd = adj.nodes()
        every = {id(n): n for n in self.fwd + self.bwd}
        self.free_inline = set(adj.inlined)
        self.feeds = list(adj.feeds)
        self.dep = {i: (i not in feed_ids and i not in self.free_inline) for i in every}
        self.leaves = {id(self.state), id(adj.d_new), id(p.new_state)} | (
            {id(adj.d_out)} if adj.d_out is not None else set())
        uses: dict[int, int] = {}
        for n in every.values():
            if n.op == "input" or id(n) in feed_ids:
                continue
            for a in n.args:
                uses[id(a)] = uses.get(id(a), 0) + 1
        # what is stored: every reduction, values with fewer dims than a consumer (made once
        # per step, not once per row: b * (k^T dS), v - k^T S), and values used more than
        # once whose inline expression (down to leaves and stored values) is not short
        self.mat: set[int] = set()
        order = toposort(list(every.values()), stop=feed_ids)

        def leaf(n: Node) -> bool:
            return not self.dep.get(id(n), False) or n.op in ("input", "const") or \
                id(n) in self.leaves
        for c in order:
            if leaf(c):
                continue
            cdims = set(c.dims) | set(c.attr("over") or ())
            for a in c.args:
                if not leaf(a) and a.dtype == "f32" and set(a.dims) < cdims and not (
                        (a.op in UNARY or a.op in BINARY) and all(leaf(x) for x in a.args)):
                    self.mat.add(id(a))
        cost: dict[int, int] = {}
        for n in order:
            if leaf(n) or id(n) in self.mat:
                cost[id(n)] = 0
                continue
            if n.op in ("contract", "sum", "max"):
                self.mat.add(id(n))
                cost[id(n)] = 0
                continue
            c = 1 + sum(cost.get(id(a), 0) for a in n.args)
            if uses.get(id(n), 0) > 1 and n.dtype == "f32" and c > INLINE_COST:
                self.mat.add(id(n))
                c = 0
            cost[id(n)] = c
        self.names = {id(f): f"F{i}" for i, f in enumerate(self.feeds)}
        # the new state's cotangent plus what the output adds to it (dS' + q do^T), when it
        # alone reads dS' and is read more than once: written over G in its nest, where the
        # later nests read it, instead of remade from dS' by each
        self.over_g: Node | None = None
        readers = [n for n in every.values() if any(a is adj.d_new for a in n.args)]
        if len(readers) == 1 and (readers[0].op in BINARY or readers[0].op in UNARY) and \
                readers[0].dims == self.state.dims and readers[0].dtype == "f32" and \
                uses.get(id(readers[0]), 0) > 1 and self.dep.get(id(readers[0]), False):
            self.over_g = readers[0]
            self.mat.add(id(self.over_g))
            self.names[id(self.over_g)] = "G"
        for i, n in enumerate(toposort(list(every.values()))):
            self.names.setdefault(id(n), f"N{i}")
        self.L, self.kinds = self._column_blocks(block)
        self._plan_recompute(every, feed_ids)

    # --- scheduling: stored values and outputs, fused into loop nests ------------------------
    def reads(self, n: Node, top: bool = True) -> set[int]:
        """The stored values (and leaves) that evaluating ``n`` inline loads."""
        if not top and (id(n) in self.mat or id(n) in self.leaves):
            return {id(n)}
        if n.op in ("input", "const") or not self.dep.get(id(n), False):
            return set()
        out: set[int] = set()
        for a in n.args:
            out |= self.reads(a, top=False)
        return out

    def items(self, nodes: list[Node]) -> list["_Item"]:
        out = []
        for n in nodes:
            if id(n) not in self.mat:
                continue
            red = n.op in ("contract", "sum", "max")
            dom = self.p.canonical(set(n.dims) | set(n.attr("over") or ())) if red else n.dims
            out.append(_Item(n, red, dom, self.reads(n)))
        return out

    def expr(self, n: Node, env: dict[str, str]) -> str:
        if n is self.state:
            return f"SCR[n, h, {self.slot}, {self.lidx(n.dims, env)}]"
        if n is self.p.new_state and self.slot_next is not None:
            return f"SCR[n, h, {self.slot_next}, {self.lidx(n.dims, env)}]"
        if n is self.adj.d_new:
            return f"G[{self.idx(n.dims, env)}]"
        if n is self.adj.d_out:
            lead = f"row, {self.tvar}, h" + (", " if n.dims else "")
            return self.hoist(f"DOUT[{lead}{self.gidx(n.dims, env)}]", n.dims)
        if id(n) in self.kept and self.slot_next is not None:   # in the walk: as kept
            return self.hoist(f"{self.names[id(n)]}_c[{self.slot}, {self.idx(n.dims, env)}]",
                              n.dims)
        if id(n) in self.mat:
            return self.hoist(super().expr(n, env), n.dims)
        if n.op != "const" and not self.dep.get(id(n), True) and id(n) not in self.free_inline:
            return self.hoist(super().expr(n, self.genv(env)), n.dims)   # a feed: a whole buffer
        return super().expr(n, env)

    def backward_step(self, ind: int, j: str, tt: str) -> list[str]:
        self.slot, self.slot_next, self.tvar = j, f"{j} + 1", tt
        adj = self.adj
        items = self.items(self.walk)
        for i, d in enumerate(adj.d_feeds):
            if d is None:
                continue
            fd = adj.feeds[i].dims
            lead = f"row, {tt}, h" + (", " if fd else "")
            # a column block's share of a sum over the columns is added to the others'
            items.append(_Item(None, False, fd, self.reads(d, top=id(d) not in self.mat),
                               value=d, target=lambda e, i=i, fd=fd, lead=lead:
                               f"DF{i}[{lead}{self.gidx(fd, e)}]", add=self.partial(d)))
        sd = self.state.dims
        # G is overwritten in place by the old state's cotangent: after every read of it
        g_val = adj.d_state
        g_item = _Item(None, False, sd, set() if g_val is None else self.reads(
            g_val, top=id(g_val) not in self.mat), value=g_val,
            target=lambda e: f"G[{self.idx(sd, e)}]")
        placed = self.schedule(items)
        self.place_last(placed, g_item, {id(adj.d_new)} | (
            {id(self.over_g)} if self.over_g is not None else set()))
        lines = self.emit(placed, ind)
        self.slot_next = None
        return lines

    def place_last(self, groups: list[list[_Item]], it: _Item, over: set[int]) -> None:
        """Put ``it``, which overwrites the values ``over`` (those held in G) elementwise,
        last into the first nest over its dims from the last one reading ``over`` on (a read
        there is at the element being written) that comes after what ``it`` reads, else into
        a nest of its own after the others."""
        last = max((k for k, g in enumerate(groups) if any(over & x.reads for x in g)),
                   default=0)
        made = {id(x.node): k + (x.red or groups[k][0].domain != it.domain)
                for k, g in enumerate(groups) for x in g if x.node is not None}
        need = max([last] + [made[r] for r in it.reads if r in made])
        k = next((k for k in range(need, len(groups)) if groups[k][0].domain == it.domain),
                 None)
        if k is None:
            groups.append([it])
        else:
            groups[k].append(it)

    def source(self) -> str:
        p, sz, adj, C = self.p, self.sizes, self.adj, self.chunk
        sd = self.state.dims
        H = sz["__H"]
        shape = lambda dims: ", ".join(str(self.full[d]) for d in dims)  # noqa: E731
        lead = lambda dims: f"(B, TT, {H}{', ' if dims else ''}{shape(dims)})"  # noqa: E731
        grads = [i for i, d in enumerate(adj.d_feeds) if d is not None]
        args = ["s0: T.handle", "dsf: T.handle", "ds0: T.handle", "seg: T.handle",
                "scr: T.handle", "ck: T.handle"] + \
            (["dout: T.handle"] if adj.d_out is not None else []) + \
            [f"f{i}: T.handle" for i in range(len(self.feeds))] + \
            [f"df{i}: T.handle" for i in grads]
        L = ["@T.prim_func", f"def main({', '.join(args)}):",
             '    T.func_attr({"global_symbol": "main", "tir.noalias": True})',
             "    B = T.int32()", "    TT = T.int32()", "    NS = T.int32()",
             "    NC = T.int32()"]
        for nm in ("S0", "DSF", "DS0"):
            L.append(f"    {nm} = T.match_buffer({nm.lower()}, (NS, {H}, {shape(sd)}), "
                     "\"float32\")")
        L.append("    SEG = T.match_buffer(seg, (NS, 3), \"int32\")")
        L.append(f"    SCR = T.match_buffer(scr, (NS, {H}, {C + 1}, {self.local_shape(sd)}), "
                 "\"float32\")")
        L.append(f"    CK = T.match_buffer(ck, (NS, {H}, NC, {shape(sd)}), \"float32\")")
        if adj.d_out is not None:
            L.append(f"    DOUT = T.match_buffer(dout, {lead(p.output.dims)}, \"float32\")")
        for i, f in enumerate(self.feeds):
            L.append(f"    F{i} = T.match_buffer(f{i}, {lead(f.dims)}, \"float32\")")
        for i in grads:
            L.append(f"    DF{i} = T.match_buffer(df{i}, {lead(adj.feeds[i].dims)}, "
                     "\"float32\")")
        kind = "T.parallel" if self.knobs["parallel"] else "T.serial"
        L.append(f"    for nh in {kind}(NS * {H}):")
        pad = "        "
        L += [f"{pad}n: T.let = nh // {H}", f"{pad}h: T.let = nh % {H}", f"{pad}row: T.let = SEG[n, 0]",
              f"{pad}t0: T.let = SEG[n, 1]", f"{pad}nt: T.let = SEG[n, 2] - SEG[n, 1]",
              f"{pad}nck: T.let = (nt + {C - 1}) // {C}",
              f"{pad}G = T.alloc_buffer(({self.local_shape(sd)},), \"float32\")"]
        for n in toposort(self.fwd + self.bwd):
            if id(n) in self.mat and n is not self.over_g:
                L.append(f"{pad}{self.names[id(n)]} = T.alloc_buffer(("
                         f"{self.local_shape(n.dims)},), \"float32\")")
                if id(n) in self.kept:
                    L.append(f"{pad}{self.names[id(n)]}_c = T.alloc_buffer(({C}, "
                             f"{self.local_shape(n.dims)},), \"float32\")")
                if n in self.pre:
                    L.append(f"{pad}{self.names[id(n)]}_next = T.alloc_buffer(("
                             f"{self.local_shape(n.dims)},), \"float32\")")
                over = n.attr("over") or ()
                dom = self.p.canonical(set(n.dims) | set(over))
                if dom and dom[-1] in over and self.sizes[dom[-1]] % self.lanes == 0:
                    shp = ", ".join([str(self.sizes[d]) for d in n.dims
                                     if not self.row_local(n)] + [str(self.width(dom[-1]))])
                    L.append(f"{pad}{self.names[id(n)]}_acc = T.alloc_buffer(({shp},), "
                             "\"float32\")")
        b = 2   # the indent of the walk: inside the loop over column blocks, if any
        if self.L is not None:   # each block of columns walks the whole sequence on its own
            L.append(f"{pad}for vb in T.serial({self.full[self.L] // sz[self.L]}):")
            b, pad = 3, pad + "    "
        e = self.env(sd)
        g, s = self.gidx(sd, e), self.lidx(sd, e)
        p3 = pad + "    "
        if not self.given:   # 1. the forward, keeping the state entering each chunk
            L += self.loops(sd, [f"SCR[n, h, 0, {s}] = S0[n, h, {g}]"], b)
            L.append(f"{pad}for c in T.serial(nck):")
            L += self.loops(sd, [f"CK[n, h, c, {g}] = SCR[n, h, 0, {s}]"], b + 1)
            L.append(f"{p3}nj: T.let = T.min({C}, nt - c * {C})")
            if self.pre:
                L.append(f"{p3}tt0: T.let = T.min(t0 + c * {C}, TT - 1)")
                L += self.forward_first(b + 1, "0", "tt0")
            L.append(f"{p3}for j in T.serial(nj):")
            L.append(f"{p3}    tt: T.let = t0 + c * {C} + j")
            L += self.forward_step(b + 2, "j", "tt")
            L += self.loops(sd, [f"SCR[n, h, 0, {s}] = SCR[n, h, nj, {s}]"], b + 1)
        # 2. back through the chunks: recompute the chunk's states, then walk it in reverse
        L += self.loops(sd, [f"G[{self.idx(sd, e)}] = DSF[n, h, {g}]"], b)
        L.append(f"{pad}for cr in T.serial(nck):")
        L.append(f"{p3}cb: T.let = nck - 1 - cr")
        L.append(f"{p3}njb: T.let = T.min({C}, nt - cb * {C})")
        L += self.loops(sd, [f"SCR[n, h, 0, {s}] = CK[n, h, cb, {g}]"], b + 1)
        if self.pre:
            L.append(f"{p3}tf0: T.let = T.min(t0 + cb * {C}, TT - 1)")
            L += self.forward_first(b + 1, "0", "tf0")
        L.append(f"{p3}for jf in T.serial(njb):")
        L.append(f"{p3}    tf: T.let = t0 + cb * {C} + jf")
        L += self.forward_step(b + 2, "jf", "tf")
        L.append(f"{p3}for jr in T.serial(njb):")
        L.append(f"{p3}    jb: T.let = njb - 1 - jr")
        L.append(f"{p3}    tb: T.let = t0 + cb * {C} + jb")
        L += self.backward_step(b + 2, "jb", "tb")
        # 3. the initial state's cotangent
        L += self.loops(sd, [f"DS0[n, h, {g}] = G[{self.idx(sd, e)}]"], b)
        return "\n".join(L) + "\n"


def adjoint_source(adj: AdjointStep, sizes: dict[str, int], H: int,
                   chunk: int = DEFAULT_CHUNK, knobs: dict | None = None,
                   given: bool = False, block: int | None = None,
                   lanes: int | None = None) -> str:
    """The TVMScript of the backward kernel (for reading and golden tests); ``given``: the
    checkpoints are an input (the op's forward wrote them), step 1 is skipped; ``block``:
    the columns walked at a time where the step separates (0: the whole state; default
    ``BLOCK_COLUMNS``); ``lanes``: fp32 lanes of a vector (default: the host's)."""
    return _AdjGen(adj, {**sizes, "__H": H}, chunk, knobs, given, block, lanes).source()


_KERNELS: dict[tuple, tuple[Callable, _AdjGen]] = {}


def _kernel(adj: AdjointStep, sizes: dict[str, int], H: int, chunk: int,
            knobs: dict | None, given: bool, block: int | None) -> tuple[Callable, _AdjGen]:
    from .sequential import check_knobs
    knobs = check_knobs(knobs)
    key = (adj.program.content_hash(), tuple(sorted(sizes.items())), H, chunk,
           torch.get_num_threads(), tuple(sorted(knobs.items())), given, block,
           os.environ.get("RECURKIT_TVM_MCPU"))   # the target, and so the vectors' width
    with _LOCK:
        hit = _KERNELS.get(key)
    if hit is None:
        gen = _AdjGen(adj, {**sizes, "__H": H}, chunk, knobs, given, block)
        hit = (compile_source(gen.source()), gen)
        with _LOCK:
            _KERNELS[key] = hit
    return hit


def run_adjoint_tvm(bc: BoundCall, adj: AdjointStep, feeds: list[torch.Tensor],
                    d_out: torch.Tensor | None, d_final: torch.Tensor | None,
                    chunk: int = DEFAULT_CHUNK, knobs: dict | None = None,
                    checkpoints: Checkpoints | None = None, block: int | None = None):
    """The backward kernel (see ``shared.adjoint.generated_backward`` for the contract);
    ``checkpoints`` the op's forward saved, used where they are this call's at ``chunk``;
    ``block``: the columns of the state walked at a time where the step separates (default:
    ``BLOCK_COLUMNS``)."""
    p = bc.program
    segs = segments(bc)
    seg = torch.tensor(segs, dtype=torch.int32)
    s0 = initial_state(bc, len(segs)).contiguous()
    dsf = torch.zeros_like(s0) if d_final is None else d_final.contiguous()
    ds0 = torch.empty_like(s0)
    longest = max([e - s for _, s, e in segs] + [1])
    sd = s0.shape[2:]
    ck_shape = (len(segs), bc.H, -(-longest // chunk), *sd)
    given = checkpoints is not None and checkpoints.program == p.content_hash() and \
        checkpoints.chunk == chunk and tuple(checkpoints.states.shape) == ck_shape and \
        checkpoints.states.dtype == torch.float32 and checkpoints.states.is_contiguous()
    ck = checkpoints.states if given else buffers.empty(ck_shape)
    fn, gen = _kernel(adj, bc.sizes, bc.H, chunk, knobs, given, block)
    scr = buffers.empty((len(segs), bc.H, chunk + 1, *gen.block_shape(sd)))
    args = [s0, dsf, ds0, seg, scr, ck]
    if adj.d_out is not None:
        args.append(d_out.contiguous() if d_out is not None else torch.zeros(
            bc.B, bc.T, bc.H, *(bc.sizes[d] for d in p.output.dims)))
    args += feeds
    # a sum over the column blocks is added up in its output (by position: the kernel and
    # its generator may be cached from another derivation of the same declaration)
    d_feeds = [None if d is None else (torch.zeros_like if add else torch.empty_like)(f)
               for f, d, add in zip(feeds, adj.d_feeds, gen.added())]
    args += [d for d in d_feeds if d is not None]
    fn(*args)
    return d_feeds, ds0
