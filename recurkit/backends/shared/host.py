"""Host-side plumbing shared by the backends: the segments of a call, packing tokens into
chunks, the initial state, and for the TVM and Triton kernels: for the kernels that walk each
sequence's tokens (sequential, scan), state-free feeds at full size, the segment table, the
states and the scan's readout; for the chunk forms, the packed prologue and the unpacked
output."""
from __future__ import annotations

import torch

from ...ir.bind import BoundCall
from ...ir.interpret import evaluate
from ...lowering.tile import TileProgram

FLUSH_BELOW = 1e-20   # decay factors below this are 0, in every backend's chunk forms


# --- segments, chunk packing, states -------------------------------------------------------------
def segments(bc: BoundCall) -> list[tuple[int, int, int]]:
    """(batch row, start, end) per sequence."""
    if bc.cu_seqlens is None:
        return [(b, 0, bc.T) for b in range(bc.B)]
    return [(0, s, e) for s, e in zip(bc.cu_seqlens[:-1], bc.cu_seqlens[1:])]


def chunk_count(bc: BoundCall, C: int) -> int:
    """Chunks of C tokens per sequence: enough for the longest (at least 1)."""
    return -(-max([e - s for _, s, e in segments(bc)] + [1]) // C)


class Packing:
    """Gathers [B, T, H, ...] token values into [N, H, chunks, C, ...] with zero padding."""

    def __init__(self, bc: BoundCall, C: int):
        segs = segments(bc)
        self.N, self.C = len(segs), C
        self.nc = chunk_count(bc, C)
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
        return g.movedim(3, 1)                                                  # [N, H, nc, C, ..]

    def pack_group(self, v: torch.Tensor, Tg: int, G: int) -> torch.Tensor:
        """v: [B|1, Tg|1, H|1, *dims], the Tg tokens of G chunks (fixed length; Tg <= G * C)
        -> [N, H, G, C, *dims], contiguous, zeros where padded."""
        bc = self.bc
        v = v.expand(bc.B, Tg, bc.H, *v.shape[3:])
        pad = G * self.C - v.shape[1]
        if pad:
            v = torch.cat([v, v.new_zeros(bc.B, pad, *v.shape[2:])], 1)
        return v.reshape(self.N, G, self.C, *v.shape[2:]).movedim(3, 1).contiguous()

    def unpack(self, o: torch.Tensor) -> torch.Tensor:
        """o: [N, H, chunks, C, *dims] -> [B, T, H, *dims]."""
        bc = self.bc
        flat = o.movedim(1, 3).reshape(self.N, self.nc * self.C, bc.H, *o.shape[4:])
        if bc.cu_seqlens is None:
            return flat[:, :bc.T]
        out = flat.new_zeros(bc.B, bc.T, bc.H, *o.shape[4:])
        return out.index_put((self.rows[self.valid], self.t_idx[self.valid]), flat[self.valid])


def decays_positive(tp: TileProgram, bc: BoundCall) -> bool:
    """Whether the log-space forms apply to this call: true unless the analysis could not
    prove the decays positive and some decay of this call is <= 0."""
    if tp.meta.get("positive", True):
        return True
    rec = tp.meta["recurrence"]
    decays = [n for n in (rec.decay_k, rec.decay_v) if n is not None]
    vals = evaluate(bc, decays)
    return not any(bool((vals[id(n)] <= 0).any()) for n in decays)


def initial_state(bc: BoundCall, N: int) -> torch.Tensor:
    """The initial state [N, H, *state dims] in fp32 (zeros when none was given)."""
    p = bc.program
    shape = (N, bc.H, *(bc.sizes[d] for d in p.state.dims))
    if bc.initial_state is None:
        return torch.zeros(shape, dtype=torch.float32, device=bc.device)
    return bc.initial_state.float()



def on_dims(x: torch.Tensor, have, want) -> torch.Tensor:
    """A value [B|1, T|1, H|1, *have] viewed over [B|1, T|1, H|1, *want] (``have`` among
    ``want``, in any order): size 1 along the dims it does not vary over, ready to expand."""
    have, want = tuple(have), tuple(want)
    if any(d not in want for d in have):
        raise ValueError(f"a value over {have} cannot be laid out over {want}")
    order = [d for d in want if d in have]
    if tuple(order) != have:
        x = x.permute(0, 1, 2, *(3 + have.index(d) for d in order))
    lead, sizes = list(x.shape[:3]), dict(zip(order, x.shape[3:]))
    return x.reshape(lead + [sizes.get(d, 1) for d in want])


def off_dims(x: torch.Tensor, have, want) -> torch.Tensor:
    """The cotangent [B, T, H, *have] of a value over ``want`` (among ``have``) broadcast to
    ``have`` (``on_dims``): summed over the others, the dims in ``want``'s order."""
    have, want = tuple(have), tuple(want)
    x = x.sum(tuple(3 + i for i, d in enumerate(have) if d not in want)) if \
        set(have) - set(want) else x
    kept = [d for d in have if d in want]
    return x.permute(0, 1, 2, *(3 + kept.index(d) for d in want)) if kept != list(want) \
        else x


def per_token(bc: BoundCall, nodes, dims=None) -> list[torch.Tensor]:
    """Each node's value for every token as a contiguous fp32 [B, T, H, *dims] tensor
    (``dims``: the node's own, unless given: a value over fewer of them is broadcast)."""
    vals = evaluate(bc, list(nodes)) if nodes else {}
    out = []
    for n in nodes:
        want = n.dims if dims is None else dims
        out.append(on_dims(vals[id(n)], n.dims, want).expand(
            bc.B, bc.T, bc.H, *(bc.sizes[d] for d in want)).contiguous())
    return out


def token_loop_args(bc: BoundCall, nodes, dims=None):
    """(feeds, seg, s0, sf): ``per_token`` values of the nodes, the segments as an int32
    [N, 3] table of (batch row, start, end), the initial state and an empty final state."""
    feeds = per_token(bc, nodes, dims)
    segs = segments(bc)
    seg = torch.tensor(segs, dtype=torch.int32, device=bc.device)
    s0 = initial_state(bc, len(segs)).contiguous()
    return feeds, seg, s0, torch.empty_like(s0)


def scan_args(tp: TileProgram, bc: BoundCall):
    """(m, sign or None, b, seg, s0, sf) for h_t = a_t h_(t-1) + b_t with m = expm1(log|a|):
    the scan kernels form |a| h as h + m h (see tvm.chunk._scan_source). The recurrence is
    elementwise, so a state of several dims runs as one of their product: m, sign, b are
    [B, T, H, D] and s0, sf [N, H, D] (``scan_result`` restores the dims)."""
    p = bc.program
    feeds, seg, s0, sf = token_loop_args(bc, tp.prologue.values(), p.state.dims)
    flat = lambda x: x.reshape(*x.shape[:3], -1)   # noqa: E731
    pro = {k: flat(v) for k, v in zip(tp.prologue, feeds)}
    sg = torch.sign(pro["scan_sign"]) if "scan_sign" in pro else None
    s0, sf = s0.reshape(*s0.shape[:2], -1), sf.reshape(*sf.shape[:2], -1)
    return torch.expm1(pro["scan_log_a"]), sg, pro["scan_b"], seg, s0, sf


def state_shaped(bc: BoundCall, x: torch.Tensor) -> torch.Tensor:
    """A [..., D] value of the scan kernels (``scan_args``) with the state's dims again."""
    return x.reshape(*x.shape[:-1], *(bc.sizes[d] for d in bc.program.state.dims))


def scan_result(bc: BoundCall, hs: torch.Tensor, sf: torch.Tensor):
    """The declaration's output evaluated from the states h of every token (both as the
    scan kernels lay them out)."""
    p = bc.program
    hs, sf = state_shaped(bc, hs), state_shaped(bc, sf)
    out = evaluate(bc, [p.output], {id(p.new_state): hs})[id(p.output)]
    o = out.expand(bc.B, bc.T, bc.H, *(bc.sizes[d] for d in p.output.dims))
    return o.to(bc.out_dtype), (sf if bc.output_final_state else None)


def chunk_args(tp: TileProgram, bc: BoundCall):
    """(packing, env, s0): the prologue values packed to contiguous [N, H, chunks, C, *dims]
    tensors by name, and the initial state, for a chunk-form tile program."""
    pk = Packing(bc, tp.chunk)
    vals = evaluate(bc, list(tp.prologue.values()))
    env = {k: pk.pack(vals[id(n)]).contiguous() for k, n in tp.prologue.items()}
    return pk, env, initial_state(bc, pk.N).contiguous()


def chunk_result(bc: BoundCall, pk: Packing, o: torch.Tensor, axes: tuple[str, ...],
                 sf: torch.Tensor):
    """The output [N, H, chunks, *axes] of the last stage, unpacked to [B, T, H, *dims]."""
    perm = [0, 1, 2] + [3 + axes.index(a) for a in ("i", *bc.program.output.dims)]
    return (pk.unpack(o.permute(perm)).to(bc.out_dtype),
            sf if bc.output_final_state else None)
