"""The Python module of a chunk form for the Triton backend: the tile program optimized by
``lowering.fuse``, a kernel per remaining stage (``chunk._StageGen``), the buffers between
them (dtypes chosen here) and a ``launch`` function that allocates them and runs the stages."""
from __future__ import annotations

from ...lowering.fuse import optimize, output_name
from ...lowering.tile import TileProgram, stage_inputs
from ..shared.host import chunk_count
from .chunk import _StageGen
from .prologue import ChunkIO
from .sequential import HEADER


def _gate_only(tp: TileProgram) -> set[str]:
    """Values computed from the log-gates alone (cumulative gates, decays): kept in fp32."""
    gates = {k for k in tp.prologue if k.startswith("log_gate")}
    leaves: dict[str, set[str]] = {k: {k} for k in tp.prologue}
    for st in tp.stages:
        for op in st.ops:
            src = [op.attr("value")] if op.op == "load" else list(op.args)
            leaves[op.out] = set().union(*(leaves.get(a, {a}) for a in src)) if src else set()
    return {k for k, v in leaves.items() if v and v <= gates}


def chunk_source(tp: TileProgram, sizes: dict[str, int], H: int, cfg: dict,
                 varlen: bool = False, has_s0: bool = True, has_sf: bool = True,
                 dtype: str = "fp32", interpret: bool = False, has_dsf: bool = False,
                 groups: tuple[tuple[int, int], ...] = (), segments: int = 1
                 ) -> tuple[str, ChunkIO]:
    """The module for a chunk-form tile program (optimized by ``lowering.fuse`` first), and
    what its ``launch`` reads from a call. ``launch(xs, fs, scs, o, s0, sf, cu, N, NC, TT,
    lowp)`` takes the inputs, host feeds and scalars of the ``ChunkIO``, the output
    [B, T, H, *dims], the initial and final states [N, H, *state dims] (fp32; None where the
    flags say there is none), ``cu_seqlens`` (varlen) and the dtype of the low-precision
    intermediates. ``dtype`` ("fp32", "bf16", "fp16") is the call's: with ``precision``
    "auto", a 16-bit call's dots take 16-bit operands (fp32 accumulation), an fp32 call's
    tf32; in the interpreter (``interpret``) bf16 dots take fp32 operands, as the
    interpreter's bf16 dots are wrong (Triton 3.x: errors of 1e10 measured).

    A backward program (``lowering.chunk_adjoint``, ``meta["adjoint"]``) gets
    ``launch(xs, fs, scs, os, s0, dsf, ds0, cu, N, NC, TT, lowp)``: ``os`` the fp32
    [B, T, H, *dims] cotangent of each prologue value in ``meta["grads"]`` order (then the
    readout h where ``meta["h"]``), ``dsf`` the final state's cotangent (``has_dsf``; else
    None), ``ds0`` the initial state's, written; the readout's cotangent is the feed of the
    ``d_out`` node. ``groups``: (input index, G) of inputs given with H / G heads (FLA's
    GVA), read at head h // G (``call_groups``).

    ``segments`` > 1: each state pass (a backward has a forward and a reverse one) runs each
    sequence as that many segments in parallel (``chunk._StageGen.source``), and ``launch``
    takes ``join``, called between a pass's two kernels with the segments' local final
    states [N, H, segments - 1, *state dims] (fp32), which it turns in place into the states
    entering the segments (``segments.Joiner``), the maps the local kernel made (summed
    log-gates [N, H, segments - 1, *gate dims], K side and V side, and a WY form's M; None
    where it made none) and ``reverse`` (the backward's reverse pass). A backward whose
    kernels cannot make every map runs whole (no host maps there); ``io.segments`` says
    what the module runs.
    """
    cache = tp.meta.setdefault("_triton_chunk", {})
    key = (tuple(sorted(sizes.items())), H, tuple(sorted(cfg.items())), varlen, has_s0,
           has_sf, dtype, interpret, has_dsf, groups, segments)
    if key in cache:
        return cache[key]
    opt = optimize(tp)
    io = ChunkIO(opt.meta["program"], opt.prologue)
    adjoint = bool(opt.meta.get("adjoint"))
    late: list = []
    if adjoint:
        io, late = _input_grads(opt, io)
    io.groups = dict(groups)
    if late:   # the prologue's backward in the grads kernel: the cotangents stay in registers
        res = list(opt.meta["grads"].values()) + ([opt.meta["h"]] if opt.meta["h"] else [])
        results = {v: None for v in res}
    elif adjoint:   # every cotangent (and the readout h) into a [B, T, H, *dims] output
        res = list(opt.meta["grads"].items()) + ([("h", opt.meta["h"])] if opt.meta["h"]
                                                 else [])
        vdim = opt.meta["vdim"]
        results = {v: (f"O{k}", (vdim,) if r == "h" else tuple(opt.prologue[r].dims))
                   for k, (r, v) in enumerate(res)}
    else:
        results = {output_name(opt): ("O", None)}
    known = {k: ("i", *n.dims) for k, n in opt.prologue.items()}
    C = opt.chunk
    flags = {"varlen": varlen, "has_s0": has_s0, "has_sf": has_sf and not adjoint,
             "has_dsf": has_dsf, "segments": segments,
             # the segments' maps, in the local kernel: summed log-gates, a WY form's M
             "gate_sums": "KV" if opt.form == "chunk_gated" else "",
             "wy_product": opt.form == "chunk_wy"}
    dev = "ds0" if adjoint else "o"
    io.segments, io.maps_in_kernel = segments, segments > 1
    fp32 = _gate_only(opt)
    dot = cfg["precision"] if cfg["precision"] != "auto" else \
        "tf32" if dtype not in ("bf16", "fp16") or (interpret and dtype == "bf16") else dtype
    kernels, calls, alloc = [], [], []
    bufs: dict[str, str] = {}
    out_axes: dict[str, tuple[str, ...]] = {}
    for st in opt.stages:
        carried = st.carried[0] if st.carried else None
        for name in st.outputs:
            if name not in known and name not in results and name != carried and \
                    name not in bufs:
                bufs[name] = f"{'B' if name in fp32 else 'L'}{len(bufs)}"
        gcfg = {**cfg, "_16bit": dtype in ("bf16", "fp16")}
        split = segments > 1 and st.kind == "loop"
        if split:   # the segments' local final states, then the join, then the outputs
            gen = _StageGen(st, opt, sizes, H, stage_inputs(st, known), gcfg, io)
            gen.dot = dot
            src, params = gen.source({}, known, bufs, results, {**flags, "phase": "local"})
            kernels.append(src)
            # this pass's local states and maps (a backward has two passes)
            own = {p: f"env['_{p.lower()}_{st.name}']" for p in ("SL", "GK", "GV", "MK")}
            for ptr in ("SL", "GK", "GV", "MK"):
                if ptr in params:
                    dims = opt.meta["program"].state.dims if ptr in ("SL", "MK") else \
                        opt.prologue["log_gate_" + ptr[1].lower()].dims
                    dims = "".join(f", {sizes[d]}" for d in dims)
                    alloc.append(f"    {own[ptr]} = torch.empty((N, {H}, {segments - 1}"
                                 f"{dims}), device={dev}.device, dtype=torch.float32)")
            io.maps_in_kernel &= opt.form == "chunk_gated" or "MK" in params
            _record(io, gen, f"{st.name}_local_kernel", segments - 1, "local")
            calls.append(_call(f"{st.name}_local_kernel", f"(N * {H} * {segments - 1}, "
                               f"{gen.nsplit()})", params, bufs, cfg, own))
            maps = ", ".join(own[p] if p in params else "None" for p in ("GK", "GV", "MK"))
            calls.append(f"    join({own['SL']}, {maps}, reverse={st.reverse})")
        gen = _StageGen(st, opt, sizes, H, stage_inputs(st, known), gcfg, io)
        gen.dot = dot
        if late and st is opt.stages[-1]:
            gen.late = list(late)
        src, params = gen.source(out_axes, known, bufs, results,
                                 {**flags, "phase": "joined"} if split else flags)
        kernels.append(src)
        for name in st.outputs:
            if name in bufs and name not in known:
                known[name] = out_axes[name]
                shape = ", ".join(str(C if a in ("i", "j") else sizes[a.rstrip("'")])
                                  for a in out_axes[name])
                dt = "torch.float32" if bufs[name][0] == "B" else "lowp"
                # a segmented pass writes a sequence's own chunks only: zeros past them
                # (varlen), where a later stage reads every chunk
                make = "zeros" if split and varlen else "empty"
                alloc.append(f"    env[{name!r}] = torch.{make}((N, {H}, NC, {shape}), "
                             f"device={dev}.device, dtype={dt})")
        nv = gen.nsplit()
        _record(io, gen, f"{st.name}_kernel", segments if split else 1,
                "joined" if split else None)
        grid = f"(N * {H}{f' * {segments}' if split else ''}, {nv})" if st.kind == "loop" \
            else f"(N * {H} * NC, {nv})"
        calls.append(_call(f"{st.name}_kernel", grid, params, bufs, cfg, own if split else {}))
    sig = "xs, fs, scs, os, s0, dsf, ds0, cu" if adjoint else "xs, fs, scs, o, s0, sf, cu"
    join = ", join=None" if segments > 1 else ""
    launch = ["", "", f"def launch({sig}, N, NC, TT, lowp{join}):",
              '    """Run the stages; intermediates are [N, H, chunks, ...] tensors."""',
              "    env = {}", *alloc, *calls, ""]
    cache[key] = (HEADER + "\n".join(kernels) + "\n".join(launch), io)
    if segments > 1 and adjoint and not io.maps_in_kernel:
        cache[key] = chunk_source(tp, sizes, H, cfg, varlen, has_s0, has_sf, dtype, interpret,
                                  has_dsf, groups, 1)
    return cache[key]


def _record(io: ChunkIO, gen: _StageGen, name: str, segments: int,
            phase: str | None = None) -> None:
    """What a kernel moves, for ``model_traffic``; ``segments``: its programs per (sequence,
    head, block of V); ``phase``: "local" or "joined" for a segmented state pass."""
    io.kernels.append({"name": name, "kind": gen.st.kind, "nsplit": gen.nsplit(),
                       "accesses": gen.accesses, "dots": gen.dots, "segments": segments,
                       "phase": phase, "reverse": gen.st.reverse})


def _call(name: str, grid: str, params: list[str], bufs: dict[str, str], cfg: dict,
          own: dict | None = None) -> str:
    """A launch line; ``own``: pointers of a segmented pass' own buffers (SL, ...)."""
    inv = {p: n for n, p in bufs.items()}
    args = [(own or {}).get(p) or _arg(p, inv) for p in params]
    return (f"    {name}[{grid}]({', '.join(args + ['NC', 'TT'])}, "
            f"num_warps={cfg['num_warps'] or 8}, num_stages={cfg['num_stages']})")


def _input_grads(opt: TileProgram, io: ChunkIO) -> tuple[ChunkIO, list]:
    """The ChunkIO that also renders the prologue's backward (``meta["input_vjp"]``), and its
    stores: (pointer, IR, dims) per input gradient, pointers ``O0, O1, ...`` in
    ``meta["input_vjp"]`` order (a token input's gradient in its own layout, a parameter's
    per-token shares [tokens, H, *dims]); (``io``, []) where the IR needs what the kernels do
    not compute (a reduction over the dim the kernels split, or no IR)."""
    ivjp = opt.meta.get("input_vjp")
    if not ivjp:
        return io, []
    p = opt.meta["program"]
    full = ChunkIO(p, {**opt.prologue, **{f"@grad:{x}": n for x, n in ivjp.items()}})
    plain = {id(n) for n in io.feeds}
    if any(n.role != "d_out" and id(n) not in plain for n in full.feeds):
        return io, []
    dims = {s.name: tuple(s.dims) for s in p.inputs}
    full.input_grads = list(ivjp)
    return full, [(f"O{k}", n, dims[x]) for k, (x, n) in enumerate(ivjp.items())]


def _arg(p: str, bufs: dict[str, str]) -> str:
    if p[0] in "BL" and p[1:].isdigit():
        return f"env[{bufs[p]!r}]"
    if p[0] in "XF" and p[1:].isdigit():
        return f"{'xs' if p[0] == 'X' else 'fs'}[{p[1:]}]"
    if p.startswith("SC"):
        return f"scs[{p[2:]}]"
    if p[0] == "O" and p[1:].isdigit():
        return f"os[{p[1:]}]"
    return {"O": "o", "S0": "s0", "SF": "sf", "DSF": "dsf", "DS0": "ds0", "CU": "cu"}[p]


def model_traffic(tp: TileProgram, bc, cfg: dict):
    """The traffic of the chunk kernels for call ``bc`` (its sizes, dtypes, lengths; tensors
    may be on the meta device), computed from what the generator emitted instead of by
    running them: per kernel, the bytes of its masked-in loads and stores and its tl.dot
    FLOPs, as ``traffic.count_traffic`` counts them in the interpreter, with its programs
    and, for a state pass, the chunks each takes in turn (``Launch.serial``). With
    ``cfg["segments"]`` > 1 (None counts as 1) the segmented state pass and its join
    (``segments.join_model``: the maps' torch ops and the join kernel) are modelled. Other
    host-side work (feeds of non-elementwise prologue values, copies of non-contiguous
    inputs) is not included. Returns a ``traffic.Traffic``."""
    import torch

    from ...ir.bind import as_given
    from ..shared.host import segments as sequences
    from .runtime import DTYPE_NAMES, call_groups, intermediate_dtype
    from .segments import choose, chunks_per_segment, join_model
    from .traffic import Launch, Traffic
    varlen = bc.cu_seqlens is not None
    N, C, H = bc.N, tp.chunk, bc.H
    NC, tokens = chunk_count(bc, C), bc.B * bc.T   # varlen: B = 1 and cu_seqlens covers T
    _, io = chunk_source(tp, bc.sizes, H, cfg, varlen, bc.initial_state is not None,
                         bc.output_final_state, DTYPE_NAMES.get(bc.out_dtype, "fp32"),
                         groups=call_groups(bc),
                         segments=choose(tp, bc, {**cfg, "segments": cfg.get("segments") or 1}))
    segs = io.segments
    p = bc.program
    xs = [as_given(bc, p.inputs[n.attr("index")].name)[0] for n in io.inputs]
    lowp = torch.empty((), dtype=intermediate_dtype(bc, cfg)).element_size()
    out = torch.empty((), dtype=bc.out_dtype).element_size()
    cu = bc.cu_seqlens_tensor.element_size() if varlen and bc.cu_seqlens_tensor is not None \
        else 8

    spec = {s.name: s for s in p.inputs}

    def item(ptr: str) -> int:
        if ptr[0] == "X" and ptr[1:].isdigit():
            return xs[int(ptr[1:])].element_size()
        if ptr[0] == "F" and ptr[1:].isdigit():   # a host feed: fp32, a cotangent (the
            return out if io.feeds[int(ptr[1:])].role == "d_out" else 4   # output's) as given
        if ptr[0] == "O" and ptr[1:].isdigit() and io.input_grads is not None:
            x = io.input_grads[int(ptr[1:])]   # an input's gradient (a parameter's: fp32)
            return as_given(bc, x)[0].element_size() if spec[x].role == "token" else 4
        if ptr[0] == "O" and ptr[1:].isdigit() and tp.meta.get("adjoint"):
            return lowp   # a prologue value's cotangent
        return {"L": lowp, "O": out}.get(ptr[0], cu if ptr == "CU" else 4)

    # a segmented state pass runs each sequence's own chunks (``per`` a segment), the local
    # kernel those of every segment but the last: (chunks, tokens, longest run) it covers
    lens = [e - s for _, s, e in sequences(bc)]

    def covered(runs: int, reverse: bool) -> tuple[int, int, int]:
        """The first ``runs`` segments' (the last ones backwards)."""
        chunks = toks = run = 0
        for L in lens:
            nc, per = -(-L // C), chunks_per_segment(L, C, segs)
            skip = 0 if runs == segs or not reverse else per   # a reverse local kernel
            chunks += min(nc, runs * per + skip) - min(nc, skip)
            toks += min(L, (runs * per + skip) * C) - min(L, skip * C)
            run = max(run, per)
        return chunks, toks, run

    size = {**bc.sizes, "i": C, "j": C}
    launches = []
    for k in io.kernels:
        read = written = flops = 0
        runs = k["segments"]
        if k["phase"]:
            chunks, toks, serial = covered(segs if k["phase"] == "joined" else segs - 1,
                                           k["reverse"])
        else:
            chunks, toks, serial = N * NC, tokens, NC if k["kind"] == "loop" else 0
        for kind, ptr, axes, per_chunk, by_token, copies in k["accesses"]:
            elems = 1
            for a in axes:
                if not (by_token and a == "i"):
                    elems *= size[a]
            times = toks * H if by_token else H * (chunks if per_chunk else N)
            nbytes = elems * times * copies * item(ptr)
            if kind == "r":
                read += nbytes
            else:
                written += nbytes
        for f, per_chunk in k["dots"]:
            flops += f * H * (chunks if per_chunk else N)
        programs = N * H * k["nsplit"] * (runs if k["kind"] == "loop" else NC)
        launches.append(Launch("triton", k["name"], read, written, flops,
                               programs=programs, serial=serial))
        if k["phase"] == "local" and segs > 2:
            made, join = join_model(tp, bc, segs, cfg, io.maps_in_kernel)
            launches = made + launches + [join]   # the maps are made before the launch
    return Traffic(launches)
