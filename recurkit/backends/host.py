"""Host-side buffers shared by the TVM and Triton kernels: for the kernels that walk each
sequence's tokens (sequential, scan), state-free feeds at full size, the segment table, the
states and the scan's readout; for the chunk forms, the packed prologue and the unpacked
output."""
from __future__ import annotations

import torch

from ..ir.bind import BoundCall
from ..ir.interpret import evaluate
from ..lowering.tile import TileProgram
from .torch_backend import Packing, _initial_state, _segments


def token_loop_args(bc: BoundCall, nodes, dims=None):
    """(feeds, seg, s0, sf): each node's value for every token as a contiguous
    [B, T, H, *dims] tensor (``dims``: the node's own, unless given), the segments as an int32
    [N, 3] table of (batch row, start, end), the initial state and an empty final state."""
    vals = evaluate(bc, list(nodes))
    feeds = [vals[id(n)].expand(bc.B, bc.T, bc.H, *(bc.sizes[d] for d in (
        n.dims if dims is None else dims))).contiguous() for n in nodes]
    segs = _segments(bc)
    seg = torch.tensor(segs, dtype=torch.int32, device=bc.device)
    s0 = _initial_state(bc, len(segs)).contiguous()
    return feeds, seg, s0, torch.empty_like(s0)


def scan_args(tp: TileProgram, bc: BoundCall):
    """(m, sign or None, b, seg, s0, sf) for h_t = a_t h_(t-1) + b_t with m = expm1(log|a|):
    the scan kernels form |a| h as h + m h (see tvm_tile._scan_source)."""
    p = bc.program
    if len(p.state.dims) != 1:
        raise NotImplementedError("scan kernels: vector states with one dim only")
    feeds, seg, s0, sf = token_loop_args(bc, tp.prologue.values(), p.state.dims)
    pro = dict(zip(tp.prologue, feeds))
    sg = torch.sign(pro["scan_sign"]) if "scan_sign" in pro else None
    return torch.expm1(pro["scan_log_a"]), sg, pro["scan_b"], seg, s0, sf


def scan_result(bc: BoundCall, hs: torch.Tensor, sf: torch.Tensor):
    """The declaration's output evaluated from the states h of every token."""
    p = bc.program
    out = evaluate(bc, [p.output], {id(p.new_state): hs})[id(p.output)]
    o = out.expand(bc.B, bc.T, bc.H, *(bc.sizes[d] for d in p.output.dims))
    return o.to(bc.out_dtype), (sf if bc.output_final_state else None)


def chunk_args(tp: TileProgram, bc: BoundCall):
    """(packing, env, s0): the prologue values packed to contiguous [N, H, chunks, C, *dims]
    tensors by name, and the initial state, for a chunk-form tile program."""
    pk = Packing(bc, tp.chunk)
    vals = evaluate(bc, list(tp.prologue.values()))
    env = {k: pk.pack(vals[id(n)]).contiguous() for k, n in tp.prologue.items()}
    return pk, env, _initial_state(bc, pk.N).contiguous()


def chunk_result(bc: BoundCall, pk: Packing, o: torch.Tensor, axes: tuple[str, ...],
                 sf: torch.Tensor):
    """The output [N, H, chunks, *axes] of the last stage, unpacked to [B, T, H, *dims]."""
    perm = [0, 1, 2] + [3 + axes.index(a) for a in ("i", *bc.program.output.dims)]
    return (pk.unpack(o.permute(perm)).to(bc.out_dtype),
            sf if bc.output_final_state else None)
