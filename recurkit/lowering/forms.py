"""The chunk algebra, written once: each form as a tile program.

Chunkwise (one chunk of positions i, j = 0..C-1, S the state entering the chunk):

    S_t = D_t S_(t-1) + u_t (r_t^T S_(t-1)) + a_t b_t^T,    o_t = post_t * (q_t^T S_t) + c_t

with G the in-chunk cumulative log-gate (Gx its exclusive version) and every decay ratio
exp(G_i - G_j) masked before the exp. The erase reads e_i = r_i^T S_(i-1) solve the
unit-lower-triangular system (I - L_u) E = (r * exp(Gx)) S + L_a B (the UT transform); without
a rank-1 term (the gated form) there is no E. Only the pass that carries S from chunk to chunk
is sequential.
"""
from __future__ import annotations

from ..ir.program import Program
from ..ir.trace import as_program
from .analysis import Recurrence, analyze
from .tile import Stage, TileOp, TileProgram, verify_tile_program

CHUNK_SIZES = (16, 32, 64, 128)
DEFAULT_CHUNK = 64


class LoweringError(ValueError):
    pass


class _Emit:
    """Appends ops to a stage, tracking each value's axes."""

    def __init__(self, stage: Stage, axes: dict[str, tuple[str, ...]] | None = None):
        self.stage, self.n = stage, 0
        self.axes: dict[str, tuple[str, ...]] = dict(axes or {})

    def __call__(self, op: str, args: tuple[str, ...], axes: tuple[str, ...],
                 out: str | None = None, **attrs) -> str:
        if out is None:
            self.n += 1
            out = f"{self.stage.name[0]}{self.n}"
        self.stage.ops.append(TileOp(out, op, tuple(args), tuple(axes),
                                     tuple(sorted(attrs.items()))))
        self.axes[out] = tuple(axes)
        return out

    def ir(self, op: str, *args: str, out: str | None = None) -> str:
        axes: list[str] = []
        for a in args:
            axes += [x for x in self.axes[a] if x not in axes]
        axes.sort(key=lambda x: x not in ("i", "j"))  # positions first, then dims
        return self("ir", args, tuple(axes), out, ir_op=op)

    def rename(self, x: str, out: str | None = None, frm: str = "i", to: str = "j") -> str:
        return self("rename", (x,), tuple(to if a == frm else a for a in self.axes[x]), out)

    def contract(self, a: str, b: str, over: tuple[str, ...], out: str | None = None) -> str:
        union = list(self.axes[a]) + [x for x in self.axes[b] if x not in self.axes[a]]
        return self("contract", (a, b), tuple(x for x in union if x not in over), out,
                    over=tuple(over))


def default_chunk(rec: Recurrence) -> int:
    """64, or 16 with per-channel gates, whose [C, C, K] decay ratios grow with C^2 (for a
    step of sub-steps: its expanded declaration's)."""
    if rec.frame is not None or rec.expansion is not None:
        return default_chunk(analyze((rec.frame or rec.expansion).program))
    gates = (rec.log_gate_k, rec.log_gate_v)
    return 16 if any(g is not None and g.dims for g in gates) else DEFAULT_CHUNK


def lower(decl_or_program, form: str | None = None, chunk: int | None = None) -> TileProgram:
    """Lower a declaration to a tile program in ``form`` (default: the first exact form) with
    ``chunk`` positions per chunk (default: ``default_chunk``)."""
    p: Program = as_program(decl_or_program)
    rec = analyze(p)
    form = form or rec.forms[0]
    chunk = chunk or default_chunk(rec)
    if form not in rec.forms:
        why = "; ".join(rec.reasons) or f"it is a {rec.kind} recurrence"
        raise LoweringError(f"form '{form}' does not apply to {p.name} (exact forms: "
                            f"{', '.join(rec.forms)}): {why}")
    if form in ("chunk_gated", "chunk_wy") and chunk not in CHUNK_SIZES:
        raise LoweringError(f"chunk size {chunk} is not one of {CHUNK_SIZES}")
    if rec.frame is not None:   # a rotating state: its rotation-free declaration, every form
        tp = lower(rec.frame.program, form, chunk)
        tp.meta["frame"] = rec.frame
        tp.meta["reasons"] = list(rec.reasons)
        return tp
    if rec.expansion is not None and form in ("chunk_gated", "chunk_wy"):
        # several updates per step: the expanded declaration, n sub-steps per token
        tp = lower(rec.expansion.program, form, chunk)
        tp.meta["expansion"] = rec.expansion
        tp.meta["reasons"] = list(rec.reasons)
        return tp
    if form == "sequential":
        tp = _sequential(p, rec)
    elif form == "scan":
        tp = _scan(p, rec)
    else:
        tp = _chunked(p, rec, form, chunk)
    verify_tile_program(tp)
    return tp


def _meta(p: Program, rec: Recurrence, **kw) -> dict:
    return {"reasons": list(rec.reasons), "recurrence": rec, "program": p, **kw}


def _sequential(p: Program, rec: Recurrence) -> TileProgram:
    carried = (p.state.name,) if p.state else ()
    st = Stage("recurrent", "loop", ("N", "H"), over="tokens", carried=carried)
    sd = p.state.dims if p.state else ()
    e = _Emit(st)
    if p.state:
        e("zeros", (), sd, out=p.state.name, init="initial_state")
    e("step", carried, p.output.dims, out="o", decl=p.name)
    st.outputs = ("o",) + carried
    return TileProgram(p.name, "sequential", None, p.dims, {}, [st], _meta(p, rec))


def _scan(p: Program, rec: Recurrence) -> TileProgram:
    sd = p.state.dims
    st = Stage("scan", "scan", ("N", "H"), carried=(p.state.name,))
    e = _Emit(st)
    e("zeros", (), sd, out=p.state.name, init="initial_state")
    pro = {k: v for k, v in rec.prologue().items() if k.startswith("scan_")}
    pro.pop("scan_a", None)
    args = tuple(e("load", (), ("i", *pro[k].dims), out=k, value=k) for k in pro)
    h = e("scan_linear", args, ("i", *sd), out="h", init=p.state.name)
    e("readout", (h,), ("i", *p.output.dims), out="o", decl=p.name)
    e("last", (h,), sd, out=p.state.name, axis="i")
    st.outputs = ("o", p.state.name)
    return TileProgram(p.name, "scan", None, p.dims, pro, [st], _meta(p, rec))


def _chunked(p: Program, rec: Recurrence, form: str, chunk: int,
             proportional: bool = True) -> TileProgram:
    """``proportional=False``: the WY form's general E form even where the erase direction
    is proportional to the write key (the backward, ``chunk_adjoint``, reads E)."""
    K, V = rec.kdim, rec.vdim
    pro = rec.prologue()
    for name, v in pro.items():
        need = K if name in ("erase_u", "erase_r") or name.startswith("write_a") \
            else V if name.startswith("write_b") else None
        if name == "read_q":
            need = V if rec.read_across else K
        if need and need not in v.dims:
            raise LoweringError(f"{p.name}: {name} does not vary along {need}; use the "
                                "sequential form")
    wy = form == "chunk_wy"
    S = p.state.name
    prop = wy and rec.erase_scale is not None and proportional   # u = c a: one pseudo-value
    if prop:
        pro.pop("erase_u")
    elif wy:
        pro.pop("erase_scale", None)
    loads = [k for k in pro if k not in ("decay_k", "decay_v", "read_post", "out_const")]

    # --- stage 1: everything per chunk that does not need the incoming state -------------
    prep = Stage("prep", "chunk", ("N", "H", "chunks"))
    e = _Emit(prep)
    ld = {k: e("load", (), ("i", *pro[k].dims), out=k, value=k) for k in loads}
    q = ld["read_q"]
    G = Gj = Gl = Gv = Gvl = None
    if "log_gate_k" in ld:
        G = e("cumsum", (ld["log_gate_k"],), e.axes["log_gate_k"], out="G", axis="i")
        Gj = e.rename(G, out="G_j")
        Gl = e("last", (G,), e.axes[G][1:], out="G_last", axis="i")
    if "log_gate_v" in ld:
        Gv = e("cumsum", (ld["log_gate_v"],), e.axes["log_gate_v"], out="Gv", axis="i")
        Gvl = e("last", (Gv,), e.axes[Gv][1:], out="Gv_last", axis="i")

    def ratio(a_i: str, name: str, mask: str) -> str | None:
        """exp(a_i - G_j) where the mask holds, else 0 (None without a gate)."""
        if G is None:
            return None
        return e("decay_ratio", (a_i, Gj), ("i", "j") + e.axes[G][1:], out=name, mask=mask)

    def attn(left: str, right_j: str, R: str | None, mask: str, out: str) -> str:
        """[i, j] = sum_K left_i right_j R_ij, R masked (the plain mask without a gate)."""
        if R is not None and K in e.axes[R]:
            return e.contract(e.ir("mul", left, R), right_j, (K,), out=out)
        dot = e.contract(left, right_j, (K,))
        if R is not None:
            return e.ir("mul", dot, R, out=out)
        return e("mask", (dot,), ("i", "j"), out=out, mask=mask)

    Ri = ratio(G, "R_incl", "i>=j")
    to_end = e.ir("exp", e.ir("sub", Gl, G)) if G else None
    qg = e.ir("mul", q, e.ir("exp", G), out="q_decayed") if G else q
    decay_end = e.ir("exp", Gl, out="decay_end") if Gl else None
    across = rec.read_across   # o = S q over V: the outputs read across the erase (below)
    if across:
        qg = None
        out_decay = e.ir("exp", G, out="out_decay") if G else None
        keep = tuple(x for x in (Ri, out_decay) if x)
    if prop:
        _wy_proportional(e, ld, G, Gx_of(e, G), attn, to_end, read=not across)
        prep.outputs = tuple(x for x in ("Yc", "bZ", "a_end", qg, decay_end,
                                         None if across else "A_a") if x)
        if across:
            prep.outputs += keep
        sp = Stage("state_pass", "loop", ("N", "H"), over="chunks", carried=(S,))
        s = _Emit(sp, {v: e.axes[v] for v in prep.outputs})
        s("zeros", (), p.state.dims, out=S, init="initial_state")
        s("rename", (S,), p.state.dims, out="S_in")  # the state entering this chunk
        nu = s.ir("add", "bZ", s.contract("Yc", S, (K,)), out="nu")   # pseudo-values b + c e
        nxt = s.ir("mul", S, decay_end) if decay_end else S
        s.ir("add", nxt, s.contract("a_end", nu, ("i",)), out=S)
        sp.outputs = ("S_in", "nu", S)
        ost = Stage("output", "chunk", ("N", "H", "chunks"))
        o = _Emit(ost, {**e.axes, **s.axes})
        if across:
            out = _read_across(o, rec, Ri, out_decay, [(nu, "write_a0")])
        else:
            out = o.ir("add", o.contract(qg, "S_in", (K,)),
                       o.contract("A_a", o.rename(nu), ("j",)))
        return _finish(p, rec, form, chunk, pro, [prep, sp, ost], o, out)

    Rv = e("decay_ratio", (Gv, e.rename(Gv)), ("i", "j", *e.axes[Gv][1:]), mask="i>=j") \
        if Gv else None
    to_end_v = e.ir("exp", e.ir("sub", Gvl, Gv)) if Gv else None
    W = AkB = None
    for m in range(len(rec.writes)):   # the writes a b^T: intra-chunk outputs and state input
        a, b = ld[f"write_a{m}"], ld[f"write_b{m}"]
        if not across:
            Ak = attn(q, e.rename(a), Ri, "i>=j", out=f"A_a{m}")
            bj = e.rename(b)
            akb = e.contract(Ak, e.ir("mul", bj, Rv) if Rv else bj, ("j",),
                             out="o_intra" if len(rec.writes) == 1 else None)
            AkB = akb if AkB is None else e.ir("add", AkB, akb)
        w = e.contract(e.ir("mul", a, to_end) if to_end else a,
                       e.ir("mul", b, to_end_v) if to_end_v else b, ("i",),
                       out="W" if len(rec.writes) == 1 else None)
        W = w if W is None else e.ir("add", W, w)
    outs = {"W": W} if across else {"W": W, "AkB": AkB, "qg": qg}
    if across:
        outs.update({x: x for x in keep})
    if decay_end:
        outs["decay_end"] = decay_end
    if Gvl:
        outs["decay_end_v"] = e.ir("exp", Gvl, out="decay_end_v")
        outs["out_gate_v"] = e.ir("exp", Gv, out="out_gate_v")
    if wy:
        u, r = ld["erase_u"], ld["erase_r"]
        uj = e.rename(u)
        Gx = Gx_of(e, G)
        Rx = ratio(Gx, "R_strict", "i>j")
        Lu = attn(r, uj, Rx, "i>j", out="L_u")
        rx = e.ir("mul", r, e.ir("exp", Gx)) if G else r
        Tinv = e("invert_unit_lower", (Lu,), ("i", "j"), out="T_inv")    # the UT transform
        Y = e.contract(Tinv, e.rename(rx), ("j",), out="Y")
        LaB = None
        for m in range(len(rec.writes)):
            La = attn(r, e.rename(ld[f"write_a{m}"]), Rx, "i>j", out=f"L_a{m}")
            lab = e.contract(La, e.rename(ld[f"write_b{m}"]), ("j",))
            LaB = lab if LaB is None else e.ir("add", LaB, lab)
        Z = e.contract(Tinv, e.rename(LaB), ("j",), out="Z")
        outs.update(Y=Y, Z=Z)
        if not across:
            outs["Au"] = attn(q, uj, Ri, "i>=j", out="A_u")
        outs["u_end"] = e.ir("mul", u, to_end, out="u_end") if to_end else u
    prep.outputs = tuple(outs.values())

    # --- stage 2: the state pass, sequential over chunks ----------------------------------
    sp = Stage("state_pass", "loop", ("N", "H"), over="chunks", carried=(S,))
    s = _Emit(sp, {v: e.axes[v] for v in prep.outputs})
    s("zeros", (), p.state.dims, out=S, init="initial_state")
    s("rename", (S,), p.state.dims, out="S_in")  # the state entering this chunk
    nxt = S
    if decay_end:
        nxt = s.ir("mul", nxt, decay_end)
    if Gvl:
        nxt = s.ir("mul", nxt, outs["decay_end_v"])
    nxt = s.ir("add", nxt, outs["W"])
    if wy:  # the erase reads of this chunk, E = Y S_in + Z, then their writes
        E = s.ir("add", s.contract(outs["Y"], S, (K,)), outs["Z"], out="E")
        nxt = s.ir("add", nxt, s.contract(outs["u_end"], E, ("i",)))
    s("rename", (nxt,), p.state.dims, out=S)
    sp.outputs = ("S_in", "E", S) if wy else ("S_in", S)

    # --- stage 3: the outputs, per chunk ------------------------------------------------------
    ost = Stage("output", "chunk", ("N", "H", "chunks"))
    o = _Emit(ost, {**e.axes, **s.axes})
    if across:
        pieces = [(f"write_b{m}", f"write_a{m}") for m in range(len(rec.writes))]
        out = _read_across(o, rec, Ri, out_decay, pieces + ([("E", "erase_u")] if wy else []))
        tp = _finish(p, rec, form, chunk, pro, [prep, sp, ost], o, out)
        tp.meta["values"] = dict(outs)
        return tp
    out = o.ir("add", o.contract(qg, "S_in", (K,)) if not Gvl else o.ir(
        "mul", o.contract(qg, "S_in", (K,)), outs["out_gate_v"]), outs["AkB"])
    if wy:
        out = o.ir("add", out, o.contract(outs["Au"], o.rename("E"), ("j",)))
    tp = _finish(p, rec, form, chunk, pro, [prep, sp, ost], o, out)
    tp.meta["values"] = dict(outs)   # role -> the prep value holding it (chunk_adjoint)
    return tp


def _read_across(o: _Emit, rec: Recurrence, R: str | None, decay: str | None,
                 pieces: list[tuple[str, str]]) -> str:
    """The outputs o_i = S_i q_i (q over V) of a chunk whose state is S_i = D_i S_in +
    sum_(j <= i) D_i D_j^-1 x_j y_j^T for the pairs (x, y) = (side [j, K], row [j, V]) of
    ``pieces`` (named values: the writes, the erase reads E with the erase vectors, the
    pseudo-values): D_i (S_in q_i) + sum_j R_ij x_j (y_j . q_i). ``R``: the decay ratios
    [i, j] or [i, j, K] (None: the causal mask); ``decay``: exp(G_i)."""
    K, V = rec.kdim, rec.vdim
    q = o("load", (), ("i", V), out="q_across", value="read_q")
    out = o.contract(q, "S_in", (V,))
    if decay is not None:
        out = o.ir("mul", out, decay)
    pro = rec.prologue()

    def fetch(name: str, dim: str) -> str:   # a prologue value is loaded where it is read
        if name in pro:
            return o("load", (), ("i", dim), out=f"{name}_across", value=name)
        return name
    for row, side in pieces:
        m = o.contract(q, o.rename(fetch(row, V)), (V,))
        m = o.ir("mul", m, R) if R is not None else o("mask", (m,), ("i", "j"), mask="i>=j")
        out = o.ir("add", out, o.contract(m, o.rename(fetch(side, K)), ("j",)))
    return out


def Gx_of(e: _Emit, G: str | None) -> str | None:
    """The exclusive cumulative gate (shifted, so G_x[i] is exactly G[i-1])."""
    if G is None:
        return None
    return "Gx" if "Gx" in e.axes else e("shift", (G,), e.axes[G], out="Gx", axis="i")


def _wy_proportional(e: _Emit, ld, G, Gx, attn, to_end, read: bool = True) -> None:
    """Prep of the WY form when the erase direction is c times the write key (delta rules).
    The pseudo-values nu = b + c E, with (I - L_a diag(c)) E = (r exp(Gx)) S + L_a B, are
    nu = M B + M (c r exp(Gx)) S for M = (I - diag(c) L_a)^-1: since diag(c) (I - L_a
    diag(c))^-1 = M diag(c), and b + M diag(c) L_a b = M b. Two matmuls with M, where the
    E form needs three (and three more elementwise passes)."""
    q, r, a, b = ld["read_q"], ld["erase_r"], ld["write_a0"], ld["write_b0"]
    Ri = "R_incl" if G else None
    # exp(Gx_i - G_j) for i > j is R_incl[i-1, j]: a shift of its rows, no second exp
    Rx = e("shift", (Ri,), e.axes[Ri], out="R_strict", axis="i") if G else None
    aj = e.rename(a)
    if read:   # the outputs' q_i . a_j (not with the readout across, forms._read_across)
        attn(q, aj, Ri, "i>=j", out="A_a")
    La = attn(r, aj, Rx, "i>j", out="L_a")
    c = ld["erase_scale"]
    Lc = e.ir("mul", La, c, out="L_c")                  # diag(c) L_a: rows scaled
    M = e("invert_unit_lower", (Lc,), ("i", "j"), out="M")      # the UT transform
    cx = e.ir("mul", c, e.ir("exp", Gx)) if G else c    # per row, before the [i, K] pass
    e.contract(M, e.rename(e.ir("mul", r, cx)), ("j",), out="Yc")
    e.contract(M, e.rename(b), ("j",), out="bZ")        # nu = bZ + Yc S
    e.ir("mul", a, to_end, out="a_end") if to_end else e("rename", (a,), e.axes[a],
                                                         out="a_end")


def _finish(p, rec, form, chunk, pro, stages, o: _Emit, out: str) -> TileProgram:
    for name, op in (("read_post", "mul"), ("out_const", "add")):
        if name in pro:
            out = o.ir(op, out, o("load", (), ("i", *pro[name].dims), out=name, value=name))
    stages[-1].outputs = (out,)
    meta = _meta(p, rec, kdim=rec.kdim, vdim=rec.vdim, state=p.state.name, out=out,
                 positive=rec.gate_positive)
    return TileProgram(p.name, form, chunk, p.dims, pro, stages, meta)
