"""In-GPU segments of the Triton chunk forms: when (sequences x heads x blocks of V) programs
are too few to fill the device, the state pass (a loop over a sequence's chunks, the one
sequential part of a chunk form) runs each sequence as ``segments`` runs of chunks in
parallel, joined exactly, as context parallelism joins ranks (``shared.segment_maps``):

1. the chunk stage, once, as unsegmented;
2. ``<state pass>_local``: every segment but the last from a zero state (the first from the
   initial state), storing its final state ``SL`` [N, H, segments - 1, *state dims] (fp32)
   and its map (``segment_pass``: a gated form's summed log-gates; a WY form's product of
   transitions ``M`` where K = V);
3. the join (``Joiner``, ``join_kernel``): in place, ``SL[j] = P_j(SL[j - 1]) + SL[j]``, so
   ``SL[j - 1]`` is the state entering segment ``j``; a WY forward with K != V takes its maps
   from the host (the transition declaration's final state from ``I``, run with the Triton
   chunk form over the segments as varlen pieces); two segments need no join;
4. ``<state pass>``: every segment from the state entering it, writing the outputs and (the
   last) the final state.

The backward's two state passes split alike, the reverse one mirrored (its local kernel
runs every segment but the first, from the end; the join runs from the end).

The state pass's work is done about twice (segments - 1 of them locally, then all), in
1 / segments of the sequential steps: it pays when the state pass is latency-bound, which
``traffic.Traffic.roofline`` models (``serial`` steps per launch) and ``choose`` asks.
Where a call cannot be segmented (a state that is not [K, V], an erase read across, a token
loop, a WY backward with K != V or whose kernels cannot make M) it runs unsegmented: the
knob changes speed, never results.
"""
from __future__ import annotations

import torch

from ...lowering.analysis import analyze
from ..shared.host import segments as sequences
from ..shared.segment_maps import Pieces, maps

JOIN_SOURCE = '''import triton
import triton.language as tl


@triton.jit
def join_kernel(SL, LEFT, AV, H, S1, MS, K: tl.constexpr, V: tl.constexpr,
                KFIRST: tl.constexpr, FULL: tl.constexpr, MT: tl.constexpr,
                LOGK: tl.constexpr, LOGV: tl.constexpr, KW: tl.constexpr, VW: tl.constexpr,
                BK: tl.constexpr, BV: tl.constexpr, KB: tl.constexpr, REV: tl.constexpr):
    """SL [N, H, S1, state]: for j = 1 .. S1 - 1, SL[j] = P_j(SL[j - 1]) + SL[j] (REV: for
    j = S1 - 2 .. 0, SL[j] = P_j(SL[j + 1]) + SL[j]). The map P_j of (sequence, head) nh
    sits at row nh * MS + j of LEFT and AV: LEFT [., KW] (KW = 0: none; 1: one value; FULL:
    M [., K, K], MT: stored transposed), AV [., VW]; LOGK / LOGV: they hold summed
    log-gates (exponentiated here). A program per (sequence, head) and block of V."""
    nh = tl.program_id(0).to(tl.int64)
    pv = tl.program_id(1)
    k = tl.arange(0, BK)
    v = pv * BV + tl.arange(0, BV)
    mk = k < K
    mv = v < V
    m2 = mk[:, None] & mv[None, :]
    if KFIRST:
        off = k[:, None] * V + v[None, :]
    else:
        off = v[None, :] * K + k[:, None]
    base = SL + nh * S1 * K * V
    if REV:
        st = tl.load(base + (S1 - 1) * K * V + off, mask=m2, other=0.0)
    else:
        st = tl.load(base + off, mask=m2, other=0.0)
    for t in range(1, S1):
        if REV:
            j = S1 - 1 - t
            jp = j + 1
        else:
            j = t
            jp = j - 1
        row = nh * MS + j
        if FULL:   # M [K, K] times the state entering, read back a block of K at a time
            acc = tl.full([BK, BV], 0.0, tl.float32)
            for kb in range(0, K, KB):
                kk = kb + tl.arange(0, KB)
                mkk = kk < K
                if MT:
                    at = kk[None, :] * K + k[:, None]
                else:
                    at = k[:, None] * K + kk[None, :]
                m = tl.load(LEFT + row * K * K + at, mask=mk[:, None] & mkk[None, :],
                            other=0.0)
                if KFIRST:
                    prev = base + jp * K * V + kk[:, None] * V + v[None, :]
                else:
                    prev = base + jp * K * V + v[None, :] * K + kk[:, None]
                s = tl.load(prev, mask=mkk[:, None] & mv[None, :], other=0.0)
                acc += tl.dot(m, s, input_precision="ieee")
            st = acc
        elif KW > 0:
            a = tl.load(LEFT + row * KW + (k if KW > 1 else k * 0), mask=mk, other=0.0)
            st = st * (tl.exp(a) if LOGK else a)[:, None]
        if VW > 0:
            a = tl.load(AV + row * VW + (v if VW > 1 else v * 0), mask=mv, other=0.0)
            st = st * (tl.exp(a) if LOGV else a)[None, :]
        st = st + tl.load(base + j * K * V + off, mask=m2, other=0.0)
        tl.store(base + j * K * V + off, st, mask=m2)
        tl.debug_barrier()   # the next segment reads this one back (FULL)
'''


def why_not(tp, program, sizes: dict[str, int]) -> str | None:
    """Why ``tp`` (lowered from ``program``, run at dim ``sizes``) cannot run its state
    passes in segments (None: it can)."""
    if tp is None or tp.form not in ("chunk_gated", "chunk_wy"):
        return "only a chunk form's state passes split"
    rec = analyze(program)
    if rec.read_across:
        return "its erase is read across"
    sd = program.state.dims
    if rec.kdim is None or rec.vdim is None or set(sd) != {rec.kdim, rec.vdim} or len(sd) != 2:
        return "its state is not [K, V]"
    if tp.meta.get("adjoint") and tp.form == "chunk_wy" and \
            sizes[rec.kdim] != sizes[rec.vdim]:
        return "a WY form's backward joins segments with K = V only (M made in its kernels)"
    return None


def choose(tp, bc, cfg: dict) -> int:
    """The segments a call of ``tp`` runs with: the knob's (at most the chunks of the
    longest sequence), 1 where the call cannot be segmented; ``None`` (auto): 1 in the
    interpreter, on a GPU the count the traffic model times fastest."""
    want = cfg.get("segments")
    if want is None and bc.device.type != "cuda":
        return 1
    if want == 1 or why_not(tp, bc.program, bc.sizes) is not None:
        return 1
    if want is None:
        return auto_count(tp, bc, cfg)
    from ..shared.host import chunk_count
    return max(1, min(want, chunk_count(bc, tp.chunk)))


def chunks_per_segment(length: int, C: int, count: int) -> int:
    """A sequence of ``length`` tokens in ``count`` segments: chunks of C tokens a segment
    (the last fewer), as the kernels split it (``segment_pass.SegmentPass.segment_entry``)."""
    return (-(-length // C) + count - 1) // count


def pieces(bc, C: int, count: int) -> Pieces:
    """Every sequence's ``count`` segments as pieces of the flattened tokens, split as the
    kernels split them (``chunks_per_segment``)."""
    cuts = []
    for b, s, e in sequences(bc):
        base, L = b * bc.T + s, e - s
        per = chunks_per_segment(L, C, count)
        cuts += [base + min(L, j * per * C) for j in range(count)]
    cuts.append(bc.B * bc.T)
    return Pieces(bc, torch.tensor(cuts, dtype=torch.int64))


class Joiner:
    """``join(SL, GK, GV, MK)`` for a chunk module's ``launch``: applies every segment's map
    in place with ``join_kernel``. The maps are those the local kernel stored where it makes
    them (``segment_pass``: summed log-gates GK / GV, a WY form's product MK), else (a WY
    form it cannot make M for) computed when the Joiner is made (``segment_maps.maps``: the
    transition declaration's Triton chunk form)."""

    def __init__(self, tp, bc, count: int, cfg: dict, interpret: bool,
                 in_kernel: bool = True):
        self.count, self.interpret, self.H = count, interpret, bc.H
        rec = analyze(bc.program)
        self.K, self.V = bc.sizes[rec.kdim], bc.sizes[rec.vdim]
        self.kfirst = bc.program.state.dims[0] == rec.kdim
        self.maps = None
        if count > 2 and not in_kernel:   # two segments: no map is needed
            M, av = maps(rec, bc, pieces(bc, tp.chunk, count), _transition_runner(cfg))
            N = bc.N   # [N * count, H, ...] -> [N, H, count, ...]: row nh * count + j
            self.maps = [x.reshape(N, count, bc.H, *x.shape[2:]).transpose(1, 2).contiguous()
                         .float() for x in (M, av)]

    @staticmethod
    def blocks_for(K: int, V: int) -> tuple[int, int, int]:
        """(BK, BV, KB) of ``join_kernel``."""
        bk = max(16, 1 << (K - 1).bit_length())
        bv = min(32, max(16, 1 << (V - 1).bit_length()))
        return bk, bv, 16 if bk >= 128 else min(bk, 32)

    def __call__(self, SL: torch.Tensor, GK=None, GV=None, MK=None,
                 reverse: bool = False) -> None:
        if self.count <= 2:
            return
        from .runtime import load_module
        mod = load_module(JOIN_SOURCE, self.interpret)
        bk, bv, kb = self.blocks_for(self.K, self.V)
        if self.maps is not None:   # WY, from the host: M [K, K] and a_V
            left, av = self.maps
            rows, full, mt, vlog, vw = self.count, True, False, False, self.V
        else:   # from the local kernel: M (stored as the state) or log-gates, and a_V's logs
            rows, full, mt, vlog = self.count - 1, MK is not None, not self.kfirst, True
            left = MK if MK is not None else GK
            av, vw = GV, (0 if GV is None else GV[0, 0, 0].numel())
        kw = 0 if left is None else self.K if full else left[0, 0, 0].numel()
        mod.join_kernel[(SL.shape[0] * self.H, -(-self.V // bv))](
            SL, SL if left is None else left, SL if av is None else av, self.H,
            self.count - 1, rows, K=self.K, V=self.V, KFIRST=self.kfirst, FULL=full, MT=mt,
            LOGK=True, LOGV=vlog, KW=kw, VW=vw, BK=bk, BV=bv, KB=kb, REV=reverse,
            num_warps=4)


def _transition_runner(cfg: dict, model: list | None = None):
    """``segment_maps.maps``' way to run a WY form's transition declaration: its Triton
    chunk form (unsegmented; its pieces run in parallel), or its token loop. ``model``: a
    list to append the chunk form's modelled launches to instead (meta tensors)."""
    def run(decl, kw, eye, pieces):
        from ...ir.bind import bind_call
        from ...lowering.forms import lower
        from .runtime import default_chunk, run_triton_chunked, run_triton_sequential
        one = {**cfg, "segments": 1}
        chunked = "chunk_wy" in analyze(decl).forms
        tp = lower(decl, "chunk_wy", default_chunk(decl)) if chunked else None
        if model is not None:
            from .chunk_module import model_traffic
            bc = bind_call(decl, (), {**kw, "initial_state": eye, "output_final_state": True,
                                      "cu_seqlens": torch.tensor(pieces.host)})
            if chunked:
                model.extend(model_traffic(tp, bc, one).launches)
            return torch.empty(eye.shape, device="meta")
        bc = bind_call(decl, (), {**kw, "initial_state": eye, "output_final_state": True,
                                  "cu_seqlens": pieces.cu})
        _, M = run_triton_chunked(tp, bc, one) if chunked else run_triton_sequential(bc, one)
        return M
    return run


def _meta(bc):
    """``bc`` with its tensors on the meta device (shapes and dtypes, no data)."""
    from dataclasses import replace

    from ...ir.bind import HeadTensors
    t = bc.tensors
    if isinstance(t, HeadTensors):
        t = HeadTensors({k: v.to("meta") for k, v in t.given.items()}, t.groups, t.axes)
    else:
        t = {k: v.to("meta") for k, v in t.items()}
    s0 = bc.initial_state.to("meta") if bc.initial_state is not None else None
    return replace(bc, tensors=t, initial_state=s0, device=torch.device("meta"),
                   cu_seqlens_tensor=None)


def join_model(tp, bc, count: int, cfg: dict, in_kernel: bool = True):
    """(the launches that make the maps, the join kernel's) of a call in ``count`` > 2
    segments, as ``chunk_module.model_traffic`` models kernels. Maps the local kernel makes
    (``in_kernel``) need no launch; a WY form's from the host: the torch ops that feed the
    transition declaration, counted on meta tensors, and its chunk kernels, modelled. The
    join reads the local states and maps and writes the states entering the segments."""
    from .traffic import Launch, Traffic, _TorchOps
    rec = analyze(bc.program)
    K, V = bc.sizes[rec.kdim], bc.sizes[rec.vdim]
    made = Traffic()
    trans: list = []
    if tp.form == "chunk_wy" and not in_kernel:
        mc = _meta(bc)
        with _TorchOps(made):
            maps(rec, mc, pieces(mc, tp.chunk, count), _transition_runner(cfg, trans))
    N, H = bc.N, bc.H
    steps = count - 2   # segments 1 .. count - 2: a map, a local state read, a state written
    bk, bv, kb = Joiner.blocks_for(K, V)
    nv = -(-V // bv)
    if tp.form == "chunk_wy":   # M read a block of K at a time, the entering state read back
        left, flops = nv * K * K + K * V, nv * 2 * bk * (-(-K // kb) * kb) * bv
    else:
        left, flops = (nv * K if "log_gate_k" in tp.prologue else 0), 0
    av = V if (tp.form == "chunk_wy" and not in_kernel) or "log_gate_v" in tp.prologue \
        else 0
    join = Launch("triton", "join_kernel", 4 * N * H * (K * V + steps * (left + av + K * V)),
                  4 * N * H * steps * K * V, N * H * steps * flops,
                  programs=N * H * nv, serial=steps)
    return [x for x in made.launches if x.kind == "torch"] + trans, join


def auto_count(tp, bc, cfg: dict) -> int:
    """The segments the traffic model times fastest for ``bc`` on the GPU it runs on (H200's
    constants for an H200, else H100's), among 1, 2, 4, ... up to a quarter of the chunks;
    1 unless it saves a fifth. Cached per shape bucket (T and the longest sequence rounded
    up to a power of two: a varlen batch of new lengths is not modelled again)."""
    from ..shared.host import chunk_count
    from .chunk_module import model_traffic
    nc = chunk_count(bc, tp.chunk)
    pow2 = lambda n: 1 << max(n - 1, 0).bit_length()   # noqa: E731
    key = (bc.N, bc.H, pow2(bc.T), pow2(nc), tuple(sorted(bc.sizes.items())),
           str(bc.out_dtype), bc.cu_seqlens is not None, bc.initial_state is not None,
           bc.output_final_state, tuple(sorted((k, v) for k, v in cfg.items()
                                                if k != "segments")))
    cache = tp.meta.setdefault("_segments", {})
    if key in cache:
        return cache[key]
    if len(cache) > 1024:   # many shapes: forget the old ones
        cache.clear()
    name = torch.cuda.get_device_name(bc.device).lower() if bc.device.type == "cuda" else ""
    device = "h200" if "h200" in name else "h100"
    one = model_traffic(tp, bc, {**cfg, "segments": 1}).roofline(device)
    best, best_s, s = 1, one, 2
    while s <= nc // 4:
        t = model_traffic(tp, bc, {**cfg, "segments": s}).roofline(device)
        if t < best_s:
            best, best_s = s, t
        s *= 2
    cache[key] = best if best_s < 0.8 * one else 1
    return cache[key]
