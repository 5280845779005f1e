"""In-GPU segments of the Triton chunk forms: when (sequences x heads x blocks of V) programs
are too few to fill the device, the state pass (a loop over a sequence's chunks, the one
sequential part of a chunk form) runs each sequence as ``segments`` runs of chunks in
parallel, joined exactly, as context parallelism joins ranks (``shared.segment_maps``):

1. the chunk stage, once, as unsegmented;
2. ``<state pass>_local``: every segment but the last from a zero state (the first from the
   initial state), storing its final state ``SL`` [N, H, segments - 1, *state dims] (fp32);
3. the join (``Joiner``, ``join_kernel``): in place, ``SL[j] = P_j(SL[j - 1]) + SL[j]``, so
   ``SL[j - 1]`` is the state entering segment ``j``; ``P_j`` the affine map of segment ``j``
   (gated forms: exponentiated log-gate sums, computed on the host with torch; WY forms: the
   transition declaration's final state from ``I``, run with the Triton chunk form over the
   segments as varlen pieces); two segments need no join;
4. ``<state pass>``: every segment from the state entering it, writing the outputs and (the
   last) the final state.

The state pass's work is done about twice (segments - 1 of them locally, then all), in
1 / segments of the sequential steps: it pays when the state pass is latency-bound, which
``traffic.Traffic.roofline`` models (``serial`` steps per launch) and ``choose`` asks.
Where a call cannot be segmented (a backward program, a state that is not [K, V], an erase
read across, a token loop) it runs unsegmented: the knob changes speed, never results.
"""
from __future__ import annotations

import torch

from ...lowering.analysis import analyze
from ..shared.host import segments as sequences
from ..shared.segment_maps import Pieces, maps

JOIN_SOURCE = '''import triton
import triton.language as tl


@triton.jit
def join_kernel(SL, LEFT, AV, H, S, K: tl.constexpr, V: tl.constexpr, KFIRST: tl.constexpr,
                FULL: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, KB: tl.constexpr):
    """SL [N, H, S - 1, state]: per segment j >= 1, SL[j] = P_j(SL[j - 1]) + SL[j]; P_j of
    segment j of sequence n at map row (n * S + j) * H + h: LEFT [., K] (FULL: [., K, K])
    then AV [., V]. A program per (sequence, head) and block of V."""
    nh = tl.program_id(0).to(tl.int64)
    pv = tl.program_id(1)
    n = nh // H
    h = nh % H
    k = tl.arange(0, BK)
    v = pv * BV + tl.arange(0, BV)
    mk = k < K
    mv = v < V
    m2 = mk[:, None] & mv[None, :]
    if KFIRST:
        off = k[:, None] * V + v[None, :]
    else:
        off = v[None, :] * K + k[:, None]
    base = SL + nh * (S - 1) * K * V
    st = tl.load(base + off, mask=m2, other=0.0)
    for j in range(1, S - 1):
        row = (n * S + j) * H + h
        if FULL:   # M [K, K] times the state entering, read back a block of K at a time
            acc = tl.full([BK, BV], 0.0, tl.float32)
            for kb in range(0, K, KB):
                kk = kb + tl.arange(0, KB)
                mkk = kk < K
                m = tl.load(LEFT + row * K * K + k[:, None] * K + kk[None, :],
                            mask=mk[:, None] & mkk[None, :], other=0.0)
                if KFIRST:
                    prev = base + (j - 1) * K * V + kk[:, None] * V + v[None, :]
                else:
                    prev = base + (j - 1) * K * V + v[None, :] * K + kk[:, None]
                s = tl.load(prev, mask=mkk[:, None] & mv[None, :], other=0.0)
                acc += tl.dot(m, s, input_precision="ieee")
            st = acc
        else:
            st = st * tl.load(LEFT + row * K + k, mask=mk, other=0.0)[:, None]
        st = st * tl.load(AV + row * V + v, mask=mv, other=0.0)[None, :]
        st = st + tl.load(base + j * K * V + off, mask=m2, other=0.0)
        tl.store(base + j * K * V + off, st, mask=m2)
        tl.debug_barrier()   # the next segment reads this one back (FULL)
'''


def why_not(tp, bc) -> str | None:
    """Why a call of ``tp`` cannot run its state pass in segments (None: it can)."""
    if tp.form not in ("chunk_gated", "chunk_wy") or tp.meta.get("adjoint"):
        return "only a chunk form's forward state pass splits"
    rec = analyze(bc.program)
    if rec.read_across:
        return "its erase is read across"
    if rec.kdim is None or rec.vdim is None or \
            set(bc.program.state.dims) != {rec.kdim, rec.vdim} or len(bc.program.state.dims) != 2:
        return "its state is not [K, V]"
    return None


def choose(tp, bc, cfg: dict) -> int:
    """The segments a call of ``tp`` runs with: the knob's (at most the chunks of the
    longest sequence), 1 where the call cannot be segmented; ``None`` (auto): 1 in the
    interpreter, on a GPU the count the traffic model times fastest."""
    want = cfg.get("segments")
    if want is None and bc.device.type != "cuda":
        return 1
    if want == 1 or why_not(tp, bc) is not None:
        return 1
    from ..shared.host import chunk_count
    nc = chunk_count(bc, tp.chunk)
    if want is None:
        return auto_count(tp, bc, cfg)
    return max(1, min(want, nc))


def pieces(bc, C: int, count: int) -> Pieces:
    """Every sequence's ``count`` segments as pieces of the flattened tokens: its chunks
    split as the kernels split them (``per`` = ceil(chunks / count) each, the last fewer)."""
    cuts = []
    for b, s, e in sequences(bc):
        base, L = b * bc.T + s, e - s
        per = (-(-L // C) + count - 1) // count
        cuts += [base + min(L, j * per * C) for j in range(count)]
    cuts.append(bc.B * bc.T)
    return Pieces(bc, torch.tensor(cuts, dtype=torch.int64))


class Joiner:
    """``join(SL)`` for a chunk module's ``launch``: the maps of every segment of ``bc``,
    computed when made, applied in place by ``join_kernel``."""

    def __init__(self, tp, bc, count: int, cfg: dict, interpret: bool):
        self.count, self.interpret, self.H = count, interpret, bc.H
        rec = analyze(bc.program)
        K, V = bc.sizes[rec.kdim], bc.sizes[rec.vdim]
        self.K, self.V, self.kfirst = K, V, bc.program.state.dims[0] == rec.kdim
        self.maps = None
        if count > 2:   # two segments: SL[0] is the state entering the second
            self.maps = [m.contiguous().float() for m in maps(
                rec, bc, pieces(bc, tp.chunk, count), _transition_runner(cfg))]

    def __call__(self, SL: torch.Tensor) -> None:
        if self.maps is None:
            return
        from .runtime import load_module
        mod = load_module(JOIN_SOURCE, self.interpret)
        left, av = self.maps
        N = SL.shape[0]
        bk = max(16, 1 << (self.K - 1).bit_length())
        bv = min(32, max(16, 1 << (self.V - 1).bit_length()))
        mod.join_kernel[(N * self.H, -(-self.V // bv))](
            SL, left, av, self.H, self.count, K=self.K, V=self.V, KFIRST=self.kfirst,
            FULL=left.dim() == 4, BK=bk, BV=bv, KB=16 if bk >= 128 else min(bk, 32),
            num_warps=4)


def _transition_runner(cfg: dict):
    """``segment_maps.maps``' way to run a WY form's transition declaration: its Triton
    chunk form (unsegmented; its pieces run in parallel), or its token loop."""
    def run(decl, kw, eye, cu):
        from ...ir.bind import bind_call
        from ...lowering.forms import lower
        from .runtime import default_chunk, run_triton_chunked, run_triton_sequential
        bc = bind_call(decl, (), {**kw, "initial_state": eye, "output_final_state": True,
                                  "cu_seqlens": cu})
        one = {**cfg, "segments": 1}
        if "chunk_wy" in analyze(decl).forms:
            _, M = run_triton_chunked(lower(decl, "chunk_wy", default_chunk(decl)), bc, one)
        else:
            _, M = run_triton_sequential(bc, one)
        return M
    return run


def auto_count(tp, bc, cfg: dict) -> int:
    return 1
