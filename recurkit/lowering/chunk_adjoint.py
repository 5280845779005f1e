"""The backward of the chunk forms, as a tile program: the adjoint of a linear recurrence
lowered through the same chunk algebra as its forward (``forms``), written once over the
analysis' roles, never per op.

For ``S_t = D_t S_(t-1) + u_t e_t^T + sum_m a_t b_t^T`` with ``e_t = S_(t-1)^T r_t`` (no
``u``, ``r`` in the gated form), ``D_t = Diag(exp g_K) x Diag(exp g_V)``, and the readout
``h_t = S_t^T q_t`` (``o = post * h + c``; ``dz = post * do`` is the backward's input), the
cotangent ``L_t`` of ``S_t`` obeys the transposed recurrence, run from the last token to the
first:

    L_(t-1) = D_t L_t + r_t f_t^T + q_(t-1) dz_(t-1)^T,     f_t = L_t^T u_t

itself of the WY kind (``u`` and ``r`` swap places) or gated. Per chunk (positions i, j,
``S_in`` the state entering it, ``dS`` the cotangent of the state leaving it, ``T`` the forward's
UT transform) the cotangents of the erase reads solve the transposed system

    (I - L_u^T) F = A_u^T dZ + U_end dS        F = T^T (A_u^T dZ + U_end dS)

so the pass over chunks (backwards) carries ``dS`` as the forward carries ``S``:
``dS_prev = exp(G_C) dS + (q exp G)^T dZ + (r exp Gx)^T F``. The feeds' cotangents follow per
chunk, in parallel: ``dq = S_t dz``, ``dr = S_(t-1) f``, ``da = L_t b``, ``du = L_t e``,
``db = L_t^T a``, each an in-chunk product plus a term of ``S_in`` or ``dS``. The log-gates' follow
from rescaling the chunk's states by their cumulative gates (``S~_t = exp(-G_t) S_t``, which
leaves the loss unchanged): with the in-chunk reverse cumulative sum ``rev``,

    dg_K = rev(q dq - sum a da - u du + r dr) - r dr + rowsum(dS * S_end)
    dg_V = rev(dz h - sum b db) + colsum(dS * S_end)

(summed over K for a scalar gate; ``S_end`` the state leaving the chunk: its decayed ``S_in``
term read, its write terms ``sum_i a * (dS b)`` taken from the products ``da`` and ``db``
already hold, so no [K, V] product is rebuilt per chunk). What computed the
feeds (the prologue) is differentiated by the host (``backends.shared.chunk_backward``).
"""
from __future__ import annotations

from ..ir.node import F32, Node
from ..ir.trace import as_program
from .analysis import analyze
from .forms import CHUNK_SIZES, LoweringError, _chunked, _Emit, default_chunk
from .prologue_vjp import prologue_vjp
from .tile import Stage, TileProgram, verify_tile_program

#: the prologue value the backward reads besides the forward's: the readout's cotangent
D_H = "d_h"


def lower_adjoint(decl_or_program, form: str | None = None, chunk: int | None = None
                  ) -> TileProgram:
    """The backward of ``decl`` in chunk form ``form`` (its first chunk form by default) as
    a tile program: stages ``prep`` (the forward's, with the backward's per-chunk matrices),
    ``state_pass`` (the forward's states entering each chunk and, WY, its erase reads),
    ``adjoint_pass`` (the cotangent state, last chunk first) and ``grads`` (every feed's
    cotangent per token). ``meta["grads"]``: prologue value -> the value holding its
    cotangent; ``meta["d_init"]``: the initial state's; ``meta["h"]``: the readout before its
    post-scale (the host needs it for the post's gradient), or None."""
    p = as_program(decl_or_program)
    rec = analyze(p)
    form = form or next((f for f in rec.forms if f.startswith("chunk")), None)
    if form not in ("chunk_gated", "chunk_wy") or form not in rec.forms:
        why = "; ".join(rec.reasons) or f"it is a {rec.kind} recurrence"
        raise LoweringError(f"{p.name}: no chunk-form backward (exact forms: "
                            f"{', '.join(rec.forms)}): {why}")
    if rec.read_across:
        raise LoweringError(f"{p.name}: no chunk-form backward for a readout across the "
                            "erase (S q over V); the sequential adjoint serves it")
    if rec.expansion is not None:
        raise LoweringError(f"{p.name} runs as sub-steps: its chunk-form backward is its "
                            f"expanded declaration's ({rec.expansion.program.name})")
    chunk = chunk or default_chunk(rec)
    if chunk not in CHUNK_SIZES:
        raise LoweringError(f"chunk size {chunk} is not one of {CHUNK_SIZES}")
    if tuple(p.output.dims) != (rec.vdim,):
        raise LoweringError(f"{p.name}: the chunk-form backward needs an output over "
                            f"{rec.vdim} alone, not {p.output.dims}")
    fwd = _chunked(p, rec, form, chunk, proportional=False)
    prep, sp = fwd.stages[0], fwd.stages[1]
    wy = form == "chunk_wy"
    K, V = rec.kdim, rec.vdim
    S = p.state.name
    sd = tuple(p.state.dims)
    nw = len(rec.writes)
    pro = dict(fwd.prologue)
    pro[D_H] = Node("input", (), (V,), F32, (("role", "d_out"), ("index", -1),
                                             ("name", D_H)))
    val = fwd.meta["values"]   # role -> name: W, AkB, qg, decay_end, u_end, ...
    axes = {k: ("i", *n.dims) for k, n in pro.items()}
    for st in (prep, sp):
        axes.update({op.out: op.axes for op in st.ops})
    has = {op.out for op in prep.ops}
    G = "G" if "G" in has else None
    Gv = "Gv" if "Gv" in has else None
    Rv = next((op.out for op in prep.ops if op.op == "decay_ratio" and op.args[0] == "Gv"),
              None)

    # --- prep: the forward's, then the backward's per-chunk values -----------------------
    e = _Emit(prep, axes)
    e.n = 1000
    dz = e("load", (), axes[D_H], out=D_H, value=D_H)
    dzg = e.ir("mul", dz, "out_gate_v", out="dz_g") if Gv else dz
    back = {"Wb": e.contract(val["qg"], dzg, ("i",), out="Wb")}
    if wy:
        r = "erase_r"
        Gx = "Gx" if "Gx" in e.axes else e("shift", (G,), e.axes[G], out="Gx", axis="i") \
            if G else None
        back["rx"] = e.ir("mul", r, e.ir("exp", Gx), out="r_x") if G else r
        AuT = e.rename(e.contract("A_u", dz, ("i",)), frm="j", to="i")
        back["P"] = e.rename(e.contract("T_inv", AuT, ("i",)), out="P", frm="j", to="i")
        back["Q"] = e.rename(e.contract("T_inv", val["u_end"], ("i",)), out="Q", frm="j", to="i")
    prep.outputs = tuple(dict.fromkeys(prep.outputs + tuple(back.values())))

    # --- the forward's state pass, keeping what the gradients read -----------------------
    sp.outputs = ("S_in", "E") if wy else ("S_in",)

    # --- the adjoint pass: dS from the last chunk to the first ---------------------------
    dS = "d" + S
    ap = Stage("adjoint_pass", "loop", ("N", "H"), over="chunks", carried=(dS,), reverse=True)
    a = _Emit(ap, {**axes, **e.axes})
    a("zeros", (), sd, out=dS, init="final_cotangent")
    a("rename", (dS,), sd, out="dS_end")   # the cotangent of the state leaving this chunk
    nxt = dS
    if "decay_end" in axes:
        nxt = a.ir("mul", nxt, "decay_end")
    if "decay_end_v" in axes:
        nxt = a.ir("mul", nxt, "decay_end_v")
    nxt = a.ir("add", nxt, back["Wb"])
    if wy:   # the erase reads' cotangents, F = P + Q dS, and their writes r_x^T F
        F = a.ir("add", back["P"], a.contract(back["Q"], dS, (K,)), out="F")
        nxt = a.ir("add", nxt, a.contract(back["rx"], F, ("i",)))
    a("rename", (nxt,), sd, out=dS)
    ap.outputs = ("dS_end", "F", dS) if wy else ("dS_end", dS)

    # --- grads: every feed's cotangent, per chunk ----------------------------------------
    gs = Stage("grads", "chunk", ("N", "H", "chunks"))
    g = _Emit(gs, {**axes, **a.axes, **e.axes})
    ld = {k: g("load", (), axes[k], out=k, value=k) for k in pro if k in fwd.prologue or
          k == D_H}
    q, dz = ld["read_q"], ld[D_H]
    Ri = "R_incl" if G else None
    Rs = ("R_strict" if "R_strict" in e.axes else None) if G else None
    if wy and G and Rs is None:
        raise LoweringError("chunk_adjoint: the WY prep lost its strict decay ratio")
    gk = g.axes[G][1:] if G else ()
    to_end = g.ir("exp", g.ir("sub", "G_last", G)) if G else None
    to_end_v = g.ir("exp", g.ir("sub", "Gv_last", Gv)) if Gv else None

    def pair(x_i: str, y_i: str, R: str | None = None) -> str:
        """[i, j] = sum_V x_i y_j (R[i, j, V])."""
        yj = g.rename(y_i)
        return g.contract(g.ir("mul", x_i, R) if R else x_i, yj, (V,))

    def rows(X: str, R: str | None, mask: str, w_i: str) -> str:
        """[i, K] = sum_j X[i, j] R[i, j] w_j (R masked; the plain mask without one)."""
        XR = g.ir("mul", X, R) if R else g("mask", (X,), ("i", "j"), mask=mask)
        return g.contract(XR, g.rename(w_i), ("j",))

    def cols(X: str, R: str | None, mask: str, w_i: str) -> str:
        """[i, K] = sum_s X[s, i] R[s, i] w_s: the transposed product, back on axis i."""
        XR = g.ir("mul", X, R) if R else g("mask", (X,), ("i", "j"), mask=mask)
        return g.rename(g.contract(XR, w_i, ("i",)), frm="j", to="i")

    def named(x: str, out: str) -> str:
        return g("rename", (x,), g.axes[x], out=out)

    def add(x: str | None, y: str | None) -> str | None:
        return y if x is None else x if y is None else g.ir("add", x, y)

    def scaled(x: str, s: str | None) -> str:
        return g.ir("mul", x, s) if s else x

    E, F = ("E", "F") if wy else (None, None)
    Sin, dSe = "S_in", "dS_end"
    dzg = g.ir("mul", dz, "out_gate_v") if Gv else dz
    # dq = S_t dz
    dq = scaled(g.contract(dzg, Sin, (V,)), g.ir("exp", G) if G else None)
    X = [pair(dz, ld[f"write_b{m}"], Rv) for m in range(nw)]
    for m in range(nw):
        dq = add(dq, rows(X[m], Ri, "i>=j", ld[f"write_a{m}"]))
    if wy:
        XE, XdE = pair(dz, E), [pair(F, ld[f"write_b{m}"]) for m in range(nw)]
        XdEE = pair(F, E)
        dq = add(dq, rows(XE, Ri, "i>=j", ld["erase_u"]))
    grads = {"read_q": named(dq, "d_read_q")}
    da, db = [], []
    ta, tb = [], []   # the terms of da, db from the state leaving the chunk
    for m in range(nw):
        am, bm = ld[f"write_a{m}"], ld[f"write_b{m}"]
        x = cols(X[m], Ri, "i>=j", q)
        if wy:
            x = add(x, cols(XdE[m], Rs, "i>j", "erase_r"))
        ta.append(scaled(g.contract(scaled(bm, to_end_v), dSe, (V,)), to_end))
        x = add(x, ta[-1])
        da.append(named(x, f"d_write_a{m}"))
        Aa = g.ir("mul", f"A_a{m}", Rv) if Rv else f"A_a{m}"
        y = g.rename(g.contract(Aa, dz, ("i",)), frm="j", to="i")
        if wy:
            y = add(y, g.rename(g.contract(f"L_a{m}", F, ("i",)), frm="j", to="i"))
        tb.append(scaled(g.contract(scaled(am, to_end), dSe, (K,)), to_end_v))
        y = add(y, tb[-1])
        db.append(named(y, f"d_write_b{m}"))
        grads[f"write_a{m}"], grads[f"write_b{m}"] = da[-1], db[-1]
    if wy:
        u, r = ld["erase_u"], ld["erase_r"]
        du = add(cols(XE, Ri, "i>=j", q), cols(XdEE, Rs, "i>j", r))
        EdS = g.contract(E, dSe, (V,))
        du = add(du, scaled(EdS, to_end))
        Gx = "Gx" if "Gx" in g.axes else None
        dr = scaled(g.contract(F, Sin, (V,)), g.ir("exp", Gx) if Gx else None)
        for m in range(nw):
            dr = add(dr, rows(XdE[m], Rs, "i>j", ld[f"write_a{m}"]))
        dr = add(dr, rows(XdEE, Rs, "i>j", u))
        grads["erase_u"] = named(du, "d_erase_u")
        grads["erase_r"] = named(dr, "d_erase_r")
    # the readout before its post-scale, where the post's or a value-side gate's needs it
    h = None
    if "read_post" in pro or Gv:
        h = g.contract(val["qg"], Sin, (K,))
        h = add(scaled(h, "out_gate_v" if Gv else None), val["AkB"])
        if wy:
            h = add(h, g.contract("A_u", g.rename(E), ("j",)))
        h = named(h, "h")
    def boundary(side: str, keep: tuple[str, ...]) -> str:
        """sum(dS * S_end) over the state dims the gate does not keep, with the state leaving
        the chunk S_end = D_end S_in + sum_m (a_m to_end)(b_m to_end_v)^T [+ u_end^T E]: its
        write terms are sums over i of a_m * ta_m (K side) or b_m * tb_m (V side), of products
        the gradients above already made, so no [K, V] product is rebuilt here."""
        kept = K if side == "k" else V
        over = tuple(d for d in sd if d != kept) + (() if kept in keep else (kept,))
        inner, outer = Sin, []
        for f in ("decay_end" if G else None, "decay_end_v" if Gv else None):
            if f is not None and set(g.axes[f]) & set(over):
                inner = g.ir("mul", inner, f)
            elif f is not None:
                outer.append(f)
        out = g.contract(dSe, inner, over)
        for f in outer:
            out = g.ir("mul", out, f)
        ovi = ("i",) + (() if kept in keep else (kept,))
        for m in range(nw):
            w = (ld[f"write_a{m}"], ta[m]) if side == "k" else (ld[f"write_b{m}"], tb[m])
            out = g.ir("add", out, g.contract(*w, ovi))
        if wy:
            w = (val["u_end"], EdS) if side == "k" else (E, g.contract(val["u_end"], dSe, (K,)))
            out = g.ir("add", out, g.contract(*w, ovi))
        return out

    def dot(x: str, y: str, keep: tuple[str, ...], over: str) -> str:
        """x * y summed over ``over`` unless the gate keeps it."""
        return g.ir("mul", x, y) if over in keep else g.contract(x, y, (over,))

    def rev(x: str) -> str:
        """sum over s >= i in the chunk (positions past the sequence hold 0)."""
        cs = g("cumsum", (x,), g.axes[x], axis="i")
        return g.ir("add", g.ir("sub", g("last", (cs,), g.axes[x][1:], axis="i"), cs), x)

    if G:
        x = dot(q, dq, gk, K)
        for m in range(nw):
            x = g.ir("sub", x, dot(ld[f"write_a{m}"], da[m], gk, K))
        if wy:
            rdr = dot(r, dr, gk, K)
            x = g.ir("add", g.ir("sub", x, dot(u, du, gk, K)), rdr)
        d = rev(x)
        if wy:
            d = g.ir("sub", d, rdr)
        grads["log_gate_k"] = named(g.ir("add", d, boundary("k", gk)), "d_log_gate_k")
    if Gv:
        gv = g.axes[Gv][1:]
        x = dot(dz, h, gv, V)
        for m in range(nw):
            x = g.ir("sub", x, dot(ld[f"write_b{m}"], db[m], gv, V))
        grads["log_gate_v"] = named(g.ir("add", rev(x), boundary("v", gv)), "d_log_gate_v")
    gs.outputs = tuple(grads.values()) + ((h,) if h else ())
    _export_reads([prep, sp, ap, gs])
    ivjp, why = prologue_vjp(p, pro, grads, h, V)
    meta = {"reasons": list(rec.reasons), "recurrence": rec, "program": p, "kdim": K,
            "vdim": V, "state": S, "positive": rec.gate_positive, "adjoint": True,
            "grads": grads, "d_init": dS, "h": h, "out": gs.outputs[0],
            "results": gs.outputs, "input_vjp": ivjp, "input_vjp_reason": why}
    tp = TileProgram(p.name + "_adjoint", form, chunk, p.dims, pro, [prep, sp, ap, gs], meta)
    verify_tile_program(tp)
    return tp


def _export_reads(stages: list[Stage]) -> None:
    """Make every value a stage reads from an earlier one an output of that stage."""
    for k, st in enumerate(stages):
        made = {op.out for op in st.ops}
        reads = {x for op in st.ops for x in op.args if x not in made}
        for src in stages[:k]:
            mine = {op.out for op in src.ops} - set(src.carried)
            extra = tuple(sorted(x for x in reads & mine if x not in src.outputs))
            src.outputs = src.outputs + extra
