"""The torch backend: executes a tile program with batched torch ops.

Chunk stages run batched over sequences, heads and a group of chunks (batch axes N, H,
chunks); the groups are streamed: prep for a group, the state pass over its chunks (the only
Python loop, run through a ``LoopPlan`` on [N * H, ...] values laid out chunk-major), then
the group's outputs. Values carry named axes; every op aligns its operands by name.
The sequential form is the reference step loop; the scan form is a parallel doubling scan.
"""
from __future__ import annotations

import dataclasses

import torch

from ...ir.bind import BoundCall
from ...ir.interpret import evaluate, run_reference
from ...lowering.tile import TileProgram
from ..shared.host import Packing, decays_positive, initial_state, on_dims, segments
from .tile_ops import LoopPlan, Val, _flush, exec_op


# --- the forms ---------------------------------------------------------------------------------
def run_tile(tp: TileProgram, bc: BoundCall):
    if tp.form == "sequential":
        return run_reference(bc)
    if not decays_positive(tp, bc):
        return run_reference(bc)   # a non-positive decay: the log-space chunk forms do not apply
    if tp.form == "chunk_gated" or tp.form == "chunk_wy":
        return _run_chunked(tp, bc)
    vals = evaluate(bc, list(tp.prologue.values()))
    return _run_scan(tp, bc, {k: vals[id(n)] for k, n in tp.prologue.items()})


STREAM_BYTES = 1 << 20   # the widest intermediate of a chunk stage, per group of chunks


def _run_stage(st, env: dict[str, Val], C: int, sizes: dict[str, int],
               skip: frozenset = frozenset()) -> dict[str, Val]:
    """Run a chunk-parallel stage on the chunks in ``env`` (but the ops whose outputs are in
    ``skip``: already there); returns its outputs."""
    local = dict(env)
    for op in st.ops:
        if op.out not in skip:
            local[op.out] = local[op.attr("value")] if op.op == "load" else exec_op(
                op, local, C, sizes)
    return {n: local[n] for n in st.outputs}


def _numel(axes: tuple[str, ...], size: dict[str, int]) -> int:
    n = 1
    for a in axes:
        n *= size.get(a.rstrip("'"), 1)
    return n


def _group_prologue(tp: TileProgram, bc: BoundCall, t0: int, t1: int) -> dict:
    """The prologue values of tokens t0..t1 (fixed length), evaluated on slices of the
    token inputs."""
    tensors = {s.name: bc.tensors[s.name][:, t0:t1] if s.role == "token" else
               bc.tensors[s.name] for s in bc.program.inputs if s.name in bc.tensors}
    gbc = dataclasses.replace(bc, tensors=tensors, T=t1 - t0)
    vals = evaluate(gbc, list(tp.prologue.values()))
    return {k: vals[id(n)] for k, n in tp.prologue.items()}


def _run_chunked(tp: TileProgram, bc: BoundCall):
    """The three stages streamed over groups of chunks: the prologue and prep for a group,
    the state pass over its chunks, then its outputs. Intermediates are group-sized (about
    STREAM_BYTES), so they stay in cache and come from the allocator's free lists instead of
    fresh pages."""
    C = tp.chunk
    pk = Packing(bc, C)
    full = None   # varlen: the prologue for all tokens, gathered per group
    if bc.cu_seqlens is not None:
        vals = evaluate(bc, list(tp.prologue.values()))
        full = {k: pk.pack(vals[id(n)]) for k, n in tp.prologue.items()}
    prep, sp, out = tp.stages
    N, H, nc = pk.N, bc.H, pk.nc
    size = {**bc.sizes, "i": C, "j": C}
    widest = max([1] + [_numel(op.axes, size) for st in (prep, out) for op in st.ops])
    G = max(1, min(nc, STREAM_BYTES // (N * H * widest * 4)))
    S = tp.meta["state"]
    state_axes = sp.ops[0].axes
    matmul_operands = {a for op in sp.ops if op.op == "contract" for a in op.args}
    # the output stage's reads of the state entering each chunk run inside the loop, so that
    # those states ([chunks, K, V] per sequence and head) are never stored
    states = {op.out for op in sp.ops if op.out in sp.outputs and op.axes == state_axes}
    in_loop = [op for op in out.ops if op.op == "contract" and any(x in states for x in op.args)
               and all(x in states or x in prep.outputs for x in op.args)]
    later = {x for op in out.ops if op not in in_loop for x in op.args}
    keep = [n for n in sp.outputs if n != S and n in later] + [op.out for op in in_loop]
    skip = frozenset(op.out for op in in_loop)
    loop_ops = [op for op in sp.ops if op.op != "zeros"] + in_loop
    # the loop runs on [N * H, ...] values (one batch axis); the group's are chunk-major,
    # [chunks of the group, N * H, ...], so that a chunk's value is one index away
    cur: dict[str, torch.Tensor] = {S: initial_state(bc, N).flatten(0, 1)}
    plan, o_all = None, None
    grad = torch.is_grad_enabled() and any(
        t.requires_grad for t in (*bc.tensors.values(), bc.initial_state)
        if isinstance(t, torch.Tensor))
    for g0 in range(0, nc, G):
        g1 = min(nc, g0 + G)
        if full is None:
            t0, t1 = g0 * C, min(bc.T, g1 * C)
            gpro = _group_prologue(tp, bc, t0, t1)
            packed: dict[int, torch.Tensor] = {}   # a value that two names share, packed once
            for k in tp.prologue:
                if id(gpro[k]) not in packed:
                    packed[id(gpro[k])] = pk.pack_group(gpro[k], t1 - t0, g1 - g0)
            genv = {k: Val(packed[id(gpro[k])], ("i", *n.dims)) for k, n in tp.prologue.items()}
        else:
            genv = {k: Val(full[k][:, :, g0:g1].contiguous(), ("i", *n.dims))
                    for k, n in tp.prologue.items()}
        pre = _run_stage(prep, genv, C, bc.sizes)
        chunk_t = {n: (_flush(v.t) if n in matmul_operands else v.t).movedim(2, 0).flatten(1, 2)
                   for n, v in pre.items()}
        kept: dict[str, torch.Tensor] = {}   # chunk-major too: the loop writes into them
        for c in range(g1 - g0):
            for name, t in chunk_t.items():
                cur[name] = t[c]
            if plan is None:
                first = {n: Val(cur[n], pre[n].axes) for n in chunk_t}
                first[S] = Val(cur[S], state_axes)
                plan = LoopPlan(loop_ops, S, first, C, bc.sizes, tuple(keep))
            outs = {n: t[c] for n, t in kept.items()}
            plan.run(cur, None if grad else outs)   # (out= has no autograd)
            for name in keep:
                t = cur[name]
                if name not in kept:
                    kept[name] = t.new_empty((g1 - g0,) + t.shape)
                    kept[name][c].copy_(t)
                elif t is not outs[name]:
                    outs[name].copy_(t)
        genv.update(pre)
        genv.update({n: Val(t.unflatten(1, (N, H)).movedim(0, 2), plan.axes[n])
                     for n, t in kept.items()})
        o = _run_stage(out, genv, C, bc.sizes, skip)[out.outputs[0]]
        o_t = o.to(("i", *bc.program.output.dims))
        if o_all is None:   # [N, chunks, C, H, dims]: the token order of the output
            o_all = o_t.new_empty(N, nc, C, H, *o_t.shape[4:])
        o_all[:, g0:g1].copy_(o_t.movedim(1, 3))
    o_full = pk.unpack(o_all.movedim(3, 1))
    final = Val(cur[S].unflatten(0, (N, H)), plan.axes[S] if plan else state_axes).to(
        bc.program.state.dims) if bc.output_final_state else None
    return o_full.to(bc.out_dtype), final


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
    sd = p.state.dims
    shape = (bc.B, bc.T, bc.H, *(bc.sizes[d] for d in sd))

    def full(role: str) -> torch.Tensor:   # a value over fewer dims than the state's
        return on_dims(pro[role], tp.prologue[role].dims, sd).expand(shape).clone()
    la = full("scan_log_a")
    sg = torch.sign(full("scan_sign")) if "scan_sign" in pro else None
    b = full("scan_b")
    h0 = initial_state(bc, bc.N)
    segs = segments(bc)
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
