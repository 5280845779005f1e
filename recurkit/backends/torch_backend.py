"""The torch backend: executes a tile program with batched torch ops.

Chunk stages run for all chunks of all sequences at once (batch axes N, H, chunks); only the
state pass loops, over chunks. Values carry named axes; every op aligns its operands by name.
The sequential form is the reference step loop; the scan form is a parallel doubling scan.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ir.bind import BoundCall
from ..ir.interpret import BINARY_TORCH, UNARY_TORCH, evaluate, run_reference
from ..lowering.tile import TileOp, TileProgram


class Val:
    """A tensor whose last axes have names; the leading ``nb`` axes are batch axes."""

    __slots__ = ("t", "axes")

    def __init__(self, t: torch.Tensor, axes: tuple[str, ...]):
        self.t, self.axes = t, tuple(axes)

    def permuted(self, want: tuple[str, ...]) -> "Val":
        return self if self.axes == tuple(want) else Val(self.to(want), want)

    def to(self, want: tuple[str, ...]) -> torch.Tensor:
        """View with axes in ``want`` order, size 1 where this value lacks an axis."""
        if self.axes == want:
            return self.t
        nb = self.t.dim() - len(self.axes)
        order = [a for a in want if a in self.axes]
        perm = list(range(nb)) + [nb + self.axes.index(a) for a in order]
        t = self.t.permute(perm) if perm != list(range(self.t.dim())) else self.t
        shape = list(t.shape[:nb])
        it = iter(t.shape[nb:])
        for a in want:
            shape.append(next(it) if a in self.axes else 1)
        return t.reshape(shape)


FLUSH_BELOW = 1e-20


def _decay_exp(x: torch.Tensor) -> torch.Tensor:
    """exp of a log-decay, with results below 1e-20 set to 0. Products of such factors would
    be fp32 denormals, which make x86 matmuls ~100x slower, while a term scaled by 1e-20 is
    far below fp32 resolution (6e-8) next to the undecayed terms it is summed with."""
    return F.threshold(torch.exp(x), FLUSH_BELOW, 0.0)


def _flush(x: torch.Tensor) -> torch.Tensor:
    """Zero the entries below 1e-30 in magnitude (one fused op; see _decay_exp): applied to
    the operands of the state pass's matmuls, where decayed values meet the state."""
    return F.hardshrink(x, 1e-30)


def _tril(C: int, strict: bool, device) -> torch.Tensor:
    return torch.ones(C, C, dtype=torch.bool, device=device).tril(-1 if strict else 0)


def _contract(x: Val, y: Val, over: tuple[str, ...], want: tuple[str, ...]) -> Val:
    """sum over ``over`` of x * y, as one batched matmul: [.., bat, m, c] @ [.., bat, c, n]."""
    bat = tuple(d for d in x.axes if d in y.axes and d not in over)
    m = tuple(d for d in x.axes if d not in y.axes)
    n = tuple(d for d in y.axes if d not in x.axes)
    xt, yt = x.to(bat + m + over), y.to(bat + over + n)
    nbx, nby = xt.dim() - len(x.axes), yt.dim() - len(y.axes)
    bshape = xt.shape[nbx:nbx + len(bat)]
    msz = xt.shape[nbx + len(bat):nbx + len(bat) + len(m)]
    csz = xt.shape[xt.dim() - len(over):]
    nsz = yt.shape[yt.dim() - len(n):] if n else ()
    mm = 1
    for v in msz:
        mm *= v
    cc = 1
    for v in csz:
        cc *= v
    xr = xt.reshape(*xt.shape[:nbx], *bshape, mm, cc)
    yr = yt.reshape(*yt.shape[:nby], *bshape, cc, -1)
    r = torch.matmul(xr, yr)
    r = r.reshape(*r.shape[:-2], *msz, *nsz)
    return Val(r, bat + m + n).permuted(want)


def exec_op(op: TileOp, env: dict[str, Val], C: int, sizes: dict[str, int]) -> Val:
    a = [env[x] for x in op.args]
    o = op.op
    dev = next(iter(env.values())).t.device
    if o == "ir":
        fn = op.attr("ir_op")
        xs = [v.to(op.axes) for v in a]
        if fn == "exp":
            return Val(_decay_exp(xs[0]), op.axes)
        if fn in UNARY_TORCH:
            return Val(UNARY_TORCH[fn](xs[0]), op.axes)
        if fn == "where":
            return Val(torch.where(*xs), op.axes)
        return Val(BINARY_TORCH[fn](*xs), op.axes)
    if o == "contract":
        return _contract(a[0], a[1], tuple(op.attr("over")), op.axes)
    if o == "eye":
        return Val(torch.eye(sizes[op.axes[0]], device=dev), op.axes)
    if o == "rename":
        return Val(a[0].t, op.axes)
    if o in ("cumsum", "last", "shift"):
        x = a[0]
        d = x.t.dim() - len(x.axes) + x.axes.index(op.attr("axis"))
        if o == "cumsum":
            return Val(x.t.cumsum(d), op.axes)
        if o == "last":
            return Val(x.t.select(d, -1), op.axes)
        head = torch.zeros_like(x.t.narrow(d, 0, 1))
        return Val(torch.cat([head, x.t.narrow(d, 0, x.t.shape[d] - 1)], d), op.axes)
    if o == "decay_ratio":
        x, y = a
        diff = x.to(op.axes) - y.to(op.axes)
        keep = _tril(C, op.attr("mask") == "i>j", diff.device)
        keep = Val(keep, ("i", "j")).to(op.axes)
        return Val(_decay_exp(diff.masked_fill(~keep, float("-inf"))), op.axes)
    if o == "mask":
        keep = _tril(C, op.attr("mask") == "i>j", a[0].t.device)
        return Val(a[0].to(op.axes) * Val(keep, ("i", "j")).to(op.axes), op.axes)
    if o == "invert_unit_lower":
        Lt = a[0].to(("i", "j"))
        eye = torch.eye(C, dtype=Lt.dtype, device=Lt.device)
        inv = torch.linalg.solve_triangular(eye - Lt, eye.expand_as(Lt), upper=False,
                                            unitriangular=True)
        return Val(inv, ("i", "j")).permuted(op.axes)
    raise NotImplementedError(f"torch backend: no rule for tile op {o!r}")


# --- packing tokens into chunks -------------------------------------------------------------
def _segments(bc: BoundCall) -> list[tuple[int, int, int]]:
    """(batch row, start, end) per sequence."""
    if bc.cu_seqlens is None:
        return [(b, 0, bc.T) for b in range(bc.B)]
    return [(0, s, e) for s, e in zip(bc.cu_seqlens[:-1], bc.cu_seqlens[1:])]


class Packing:
    """Gathers [B, T, H, ...] token values into [N, H, chunks, C, ...] with zero padding."""

    def __init__(self, bc: BoundCall, C: int):
        segs = _segments(bc)
        self.N, self.C = len(segs), C
        longest = max([e - s for _, s, e in segs] + [1])
        self.nc = -(-longest // C)
        L = self.nc * C
        pos = torch.arange(L, device=bc.device)
        starts = torch.tensor([s for _, s, _ in segs], device=bc.device)
        lens = torch.tensor([e - s for _, s, e in segs], device=bc.device)
        rows = torch.tensor([b for b, _, _ in segs], device=bc.device)
        self.valid = pos[None, :] < lens[:, None]                               # [N, L]
        self.t_idx = torch.where(self.valid, starts[:, None] + pos[None, :], 0)  # [N, L]
        self.rows = rows[:, None].expand(-1, L)
        self.bc = bc

    def pack(self, v: torch.Tensor) -> torch.Tensor:
        """v: [B|1, T|1, H|1, *dims] -> [N, H, chunks, C, *dims] (zeros where padded)."""
        bc = self.bc
        v = v.expand(bc.B, bc.T, bc.H, *v.shape[3:])
        if bc.cu_seqlens is None:   # fixed length: pad the end, no gather
            pad = self.nc * self.C - bc.T
            g = torch.cat([v, v.new_zeros(bc.B, pad, *v.shape[2:])], 1) if pad else v
        else:
            g = v[self.rows, self.t_idx]                                        # [N, L, H, ...]
            mask = self.valid.reshape(*self.valid.shape, *([1] * (g.dim() - 2)))
            g = torch.where(mask, g, torch.zeros((), dtype=g.dtype, device=g.device))
        g = g.reshape(self.N, self.nc, self.C, *g.shape[2:])                   # [N, nc, C, H, ..]
        return g.movedim(3, 1).contiguous()                                     # [N, H, nc, C, ..]

    def unpack(self, o: torch.Tensor) -> torch.Tensor:
        """o: [N, H, chunks, C, *dims] -> [B, T, H, *dims]."""
        bc = self.bc
        flat = o.movedim(1, 3).reshape(self.N, self.nc * self.C, bc.H, *o.shape[4:])
        if bc.cu_seqlens is None:
            return flat[:, :bc.T]
        out = flat.new_zeros(bc.B, bc.T, bc.H, *o.shape[4:])
        return out.index_put((self.rows[self.valid], self.t_idx[self.valid]), flat[self.valid])


# --- the forms ---------------------------------------------------------------------------------
def run_tile(tp: TileProgram, bc: BoundCall):
    if tp.form == "sequential":
        return run_reference(bc)
    if not decays_positive(tp, bc):
        return run_reference(bc)   # a non-positive decay: the log-space chunk forms do not apply
    vals = evaluate(bc, list(tp.prologue.values()))
    pro = {k: vals[id(n)] for k, n in tp.prologue.items()}
    if tp.form == "scan":
        return _run_scan(tp, bc, pro)
    return _run_chunked(tp, bc, pro)


def decays_positive(tp: TileProgram, bc: BoundCall) -> bool:
    """Whether the log-space forms apply to this call: true unless the analysis could not
    prove the decays positive and some decay of this call is <= 0."""
    if tp.meta.get("positive", True):
        return True
    rec = tp.meta["recurrence"]
    decays = [n for n in (rec.decay_k, rec.decay_v) if n is not None]
    vals = evaluate(bc, decays)
    return not any(bool((vals[id(n)] <= 0).any()) for n in decays)


def _initial_state(bc: BoundCall, N: int) -> torch.Tensor:
    p = bc.program
    shape = (N, bc.H, *(bc.sizes[d] for d in p.state.dims))
    if bc.initial_state is None:
        return torch.zeros(shape, dtype=torch.float32, device=bc.device)
    return bc.initial_state.float()


CHUNK_STAGE_BYTES = 1 << 28   # 256 MiB for the widest intermediate of a chunk stage


def _run_chunk_stage(st, env: dict[str, Val], nc: int, group: int, C: int,
                     sizes: dict[str, int]) -> dict[str, Val]:
    """Run a chunk-parallel stage on slices of ``group`` chunks; returns its outputs."""
    parts: dict[str, list[torch.Tensor]] = {n: [] for n in st.outputs}
    axes: dict[str, tuple[str, ...]] = {}
    for c0 in range(0, nc, group):
        local = {k: Val(v.t[:, :, c0:c0 + group], v.axes) if v.t.dim() - len(v.axes) == 3
                 else v for k, v in env.items()}
        for op in st.ops:
            local[op.out] = local[op.attr("value")] if op.op == "load" else exec_op(
                op, local, C, sizes)
        for n in st.outputs:
            parts[n].append(local[n].t)
            axes[n] = local[n].axes
    return {n: Val(ts[0] if len(ts) == 1 else torch.cat(ts, 2), axes[n])
            for n, ts in parts.items()}


def _run_chunked(tp: TileProgram, bc: BoundCall, pro: dict[str, torch.Tensor]):
    C = tp.chunk
    pk = Packing(bc, C)
    env: dict[str, Val] = {}
    for k, n in tp.prologue.items():
        env[k] = Val(pk.pack(pro[k]), ("i", *n.dims))
    prep, sp, out = tp.stages
    # chunk stages run on groups of chunks, so that [i, j, K] intermediates stay bounded
    widest = max([bc.sizes[d] for d in bc.sizes] + [1])
    per_chunk_bytes = pk.N * bc.H * C * C * widest * 4
    group = max(1, min(pk.nc, CHUNK_STAGE_BYTES // per_chunk_bytes))
    env.update(_run_chunk_stage(prep, env, pk.nc, group, C, bc.sizes))
    # the state pass: loop over chunks, batch axes [N, H]
    S = tp.meta["state"]
    matmul_operands = {a for op in sp.ops if op.op == "contract" for a in op.args}
    per_chunk = {name: Val(_flush(env[name].t), env[name].axes) if name in matmul_operands
                 else env[name] for name in prep.outputs}
    collected: dict[str, torch.Tensor] = {}
    local: dict[str, Val] = {}
    for c in range(pk.nc):
        for name, v in per_chunk.items():
            local[name] = Val(v.t[:, :, c], v.axes)
        for op in sp.ops:
            if op.op == "zeros":
                if c == 0:
                    local[op.out] = Val(_initial_state(bc, pk.N), op.axes)
                continue
            val = exec_op(op, local, C, bc.sizes)
            if op.out == S:
                val = Val(_flush(val.t), val.axes)
            local[op.out] = val
        for name in sp.outputs:
            if name == S:
                continue
            t = local[name].t
            if name not in collected:   # [N, H, chunks, ...], filled chunk by chunk
                collected[name] = t.new_empty(t.shape[:2] + (pk.nc,) + t.shape[2:])
            collected[name][:, :, c] = t
    for name, t in collected.items():
        env[name] = Val(t, local[name].axes)
    env.update(_run_chunk_stage(out, env, pk.nc, group, C, bc.sizes))
    o = env[out.outputs[0]]
    odims = bc.program.output.dims
    o_t = pk.unpack(o.to(("i", *odims)))
    final = local[S].to(bc.program.state.dims) if bc.output_final_state else None
    return o_t.to(bc.out_dtype), final


def _scan(la: torch.Tensor, sg: torch.Tensor | None, b: torch.Tensor, dim: int) -> torch.Tensor:
    """h_t = a_t h_(t-1) + b_t along ``dim`` (h_(-1) = 0), a = sg * exp(la), by recursive
    doubling (log2 T passes). The coefficients stay in log space: a product of segment
    coefficients is a sum of their logs, so a decay of 1 - 1e-6 does not compound its fp32
    rounding over T steps, and a tiny one underflows to its true, negligible, value."""
    T = la.shape[dim]
    s = 1
    while s < T:
        la_cur, b_cur = la.narrow(dim, s, T - s), b.narrow(dim, s, T - s)
        la_prev, b_prev = la.narrow(dim, 0, T - s), b.narrow(dim, 0, T - s)
        a_cur = torch.exp(la_cur) if sg is None else sg.narrow(dim, s, T - s) * torch.exp(la_cur)
        b = torch.cat([b.narrow(dim, 0, s), a_cur * b_prev + b_cur], dim)
        la = torch.cat([la.narrow(dim, 0, s), la_cur + la_prev], dim)
        if sg is not None:
            sg = torch.cat([sg.narrow(dim, 0, s), sg.narrow(dim, s, T - s) *
                            sg.narrow(dim, 0, T - s)], dim)
        s *= 2
    return b


def _run_scan(tp: TileProgram, bc: BoundCall, pro: dict[str, torch.Tensor]):
    p = bc.program
    shape = (bc.B, bc.T, bc.H, *(bc.sizes[d] for d in p.state.dims))
    la = pro["scan_log_a"].expand(shape).clone()
    sg = torch.sign(pro["scan_sign"]).expand(shape).clone() if "scan_sign" in pro else None
    b = pro["scan_b"].expand(shape).clone()
    h0 = _initial_state(bc, bc.N)
    segs = _segments(bc)
    # each sequence starts from its initial state: fold a_t0 * h0 into b_t0 and cut the link
    for n, (row, s, e) in enumerate(segs):
        if e > s:
            a0 = torch.exp(la[row, s]) * (1.0 if sg is None else sg[row, s])
            b[row, s] = a0 * h0[n] + b[row, s]
            la[row, s] = float("-inf")
    h = _scan(la, sg, b, 1)
    vals = evaluate(bc, [p.output], {id(p.new_state): h})
    o = vals[id(p.output)].expand(bc.B, bc.T, bc.H, *(bc.sizes[d] for d in p.output.dims))
    final = None
    if bc.output_final_state:
        final = torch.stack([h[row, e - 1] if e > s else h0[n]
                             for n, (row, s, e) in enumerate(segs)])
    return o.to(bc.out_dtype), final
