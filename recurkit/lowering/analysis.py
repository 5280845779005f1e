"""What kind of recurrence a declaration is, proven from its IR.

``analyze(program)`` returns a ``Recurrence`` description: the transition

    S' = D S + u (r^T S) + sum_j a_j b_j^T        (matrix state [K, V]; D = Diag(d_K) x Diag(d_V))
    h' = a * h + b                                (elementwise state)

with every coefficient a state-free IR node (the prologue, hoisted out of the time loop), the
readout ``o = post * (q^T S') + c`` (``read_across``: ``o = post * (S' q) + c`` with q over
V, the erase along K), and the forms that are exact for it. A step of several such updates
in a row, or with a rank-R write, is described by ``expansion`` (``lowering.substeps``). When
only the sequential form applies, ``reasons`` says why, pointing at the user's line.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..ir.node import Node, toposort
from ..ir.program import Program
from .rotation import frame, has_rotation
from .linear import Affine, Builder, LinearForms, Nonlinear, factors, summands

FORMS = ("chunk_gated", "chunk_wy", "scan", "sequential")
# how ``_update`` begins its reason when the erase runs along the dim the readout does not
# contract (``_matrix_form`` then tries the roles the other way round: ``read_across``)
ERASES_ACROSS = "the rank-1 term erases along"


@dataclass
class Recurrence:
    program: Program
    kind: str                         # "diagonal" | "rank1" | "elementwise" | "general" | "stateless"
    forms: tuple[str, ...]            # exact forms, fastest-first guess; "sequential" always last
    reasons: list[str] = field(default_factory=list)
    kdim: str | None = None           # the state dim the readout contracts
    vdim: str | None = None
    # matrix state
    log_gate_k: Node | None = None    # log d_K, dims within (K,) ; None: no decay on that side
    log_gate_v: Node | None = None
    gate_positive: bool = True        # False: d was not proven positive (checked at run time)
    decay_k: Node | None = None       # d_K itself (when not proven positive)
    decay_v: Node | None = None
    erase_u: Node | None = None       # u [K]
    erase_r: Node | None = None       # r [K]
    erase_scale: Node | None = None   # c with u = c * a_0 (one write), when provable
    writes: list[tuple[Node, Node]] = field(default_factory=list)   # (a [K], b [V])
    read_q: Node | None = None        # q [K] (read_across: [V])
    read_across: bool = False         # the readout contracts V, the erase runs along K
    read_post: Node | None = None     # post, dims within the output's
    out_const: Node | None = None     # the state-free part of the output
    # elementwise state
    scan_a: Node | None = None        # h' = a * h + b; the output is evaluated from h'
    scan_b: Node | None = None
    scan_log_a: Node | None = None    # log|a|, computed from the gate's own log where known
    scan_sign: Node | None = None     # a itself when its sign is not known to be positive
    # a step of several updates (erases, rank-R writes): the chunk forms run its sub-steps,
    # several per token (``lowering.substeps``); the role fields above are then unset
    expansion: object | None = None
    # a step that rotates its state (``rk.rotate``): every form runs the rotation-free
    # declaration of this frame (``lowering.rotation``); the role fields are then its
    frame: object | None = None

    def prologue(self) -> dict[str, Node]:
        """Every state-free value the parallel forms read per token, by role."""
        vals = {"log_gate_k": self.log_gate_k, "log_gate_v": self.log_gate_v,
                "decay_k": self.decay_k, "decay_v": self.decay_v,
                "erase_u": self.erase_u, "erase_r": self.erase_r,
                "erase_scale": self.erase_scale,
                "read_q": self.read_q, "read_post": self.read_post,
                "out_const": self.out_const, "scan_log_a": self.scan_log_a,
                "scan_sign": self.scan_sign, "scan_b": self.scan_b}
        for j, (a, b) in enumerate(self.writes):
            vals[f"write_a{j}"], vals[f"write_b{j}"] = a, b
        return {k: v for k, v in vals.items() if v is not None}


def analyze(decl) -> Recurrence:
    """What kind of recurrence ``decl`` is and which forms compute it exactly."""
    p = decl if isinstance(decl, Program) else _program(decl)
    if p.new_state is None:
        return Recurrence(p, "stateless", ("sequential",))
    if has_rotation(p):
        fr = frame(p)
        if isinstance(fr, str):
            return Recurrence(p, "general", ("sequential",), [fr])
        rec = analyze(fr.program)
        return replace(rec, program=p, frame=fr, reasons=[fr.describe()] + rec.reasons)
    b = Builder(p)
    state = next(n for n in p.nodes() if n.role == "state")
    try:
        trans = LinearForms(p, state, b).form(p.new_state)
    except Nonlinear as e:
        return Recurrence(p, "general", ("sequential",), [f"not linear in the state: {e}"])
    if len(p.state.dims) == 1 and _elementwise(trans, state):
        return _elementwise_form(p, b, state, trans)
    rec = _matrix_form(p, b, state, trans)
    if rec.expansion is not None and _elementwise(trans, state):
        scan = _elementwise_form(p, b, state, trans)   # rank-R writes: the scan is exact too
        if scan is not None and "scan" in scan.forms:
            rec.forms = (rec.forms[0], "scan", "sequential")
            rec.scan_a, rec.scan_b = scan.scan_a, scan.scan_b
            rec.scan_log_a, rec.scan_sign = scan.scan_log_a, scan.scan_sign
    elif rec.forms == ("sequential",) and _elementwise(trans, state):
        scan = _elementwise_form(p, b, state, trans)
        if "scan" in scan.forms:
            scan.reasons = rec.reasons + scan.reasons
            return scan
    return rec


def _program(decl) -> Program:
    inner = getattr(decl, "decl", decl)   # a built-in op exposes its declaration
    prog = getattr(inner, "program", None)
    if not isinstance(prog, Program):
        raise TypeError(f"expected an @rk.recurrence declaration, got {type(decl).__name__}")
    return prog


def _elementwise(trans: Affine, state: Node) -> bool:
    """True when every coefficient is elementwise over the state (no contraction, no write
    that is a sum of outer products over different dims)."""
    return all(t.read is None and t.post is None for t in trans.terms) and (
        trans.const is None or set(trans.const.dims) <= set(state.dims))


def _elementwise_form(p, b: Builder, state: Node, trans: Affine) -> Recurrence | None:
    reasons = []
    a = None
    for t in trans.terms:
        if t.over or t.read is not None or t.post is not None:
            return None
        a = b.add(a, t.inner if t.inner is not None else b.const(1.0))
    if a is None:
        return None
    c = trans.const
    if c is not None and not set(c.dims) <= set(state.dims):
        return None
    # readout: any function of the new state alone (the scan materialises h' per token)
    used = _old_state_nodes(p)
    bad = next((n for n in p.nodes() if id(n) in used and _reaches(p.output, n, p.new_state)),
               None)
    if bad is not None:
        return Recurrence(p, "elementwise", ("sequential",),
                          [f"the output reads the state before its update at {bad.loc}"])
    pos = _positive(a)
    return Recurrence(p, "elementwise", ("scan", "sequential"), reasons,
                      scan_a=a, scan_b=c if c is not None else b.const(0.0),
                      scan_log_a=_log(b, a) if pos else b.op("log", b.op("abs", a)),
                      scan_sign=None if pos else a)


def _reaches(root: Node, target: Node, stop: Node) -> bool:
    """Whether ``target`` is an ancestor of ``root`` along paths that avoid ``stop``."""
    seen, stack = set(), [root]
    while stack:
        n = stack.pop()
        if n is target:
            return True
        if n is stop or id(n) in seen:
            continue
        seen.add(id(n))
        stack.extend(n.args)
    return False


def _old_state_nodes(p: Program) -> set[int]:
    """The old state and the values computed from it on the way to the new state: the readout
    may only use the new state."""
    dep: dict[int, bool] = {}
    for n in toposort([p.new_state]):
        dep[id(n)] = n.role == "state" or any(dep[id(a)] for a in n.args)
    return {i for i, d in dep.items() if d and i != id(p.new_state)}


def _matrix_form(p: Program, b: Builder, state: Node, trans: Affine) -> Recurrence:
    sd = state.dims
    # readout: o = post * (q^T S') + c
    try:
        out = LinearForms(p, p.new_state, b, _old_state_nodes(p)).form(p.output)
    except Nonlinear as e:
        return Recurrence(p, "general", ("sequential",), [f"readout: {e}"])
    if len(sd) != 2:
        return Recurrence(p, "general", ("sequential",),
                          [f"state has {len(sd)} dims; the chunk forms handle [K, V] states"])
    if len(out.terms) != 1 or len(out.terms[0].over) != 1 or out.terms[0].read is None:
        return Recurrence(p, "general", ("sequential",),
                          ["readout is not one contraction q^T S' of the new state"])
    rt = out.terms[0]
    kdim = rt.over[0]
    vdim = next(d for d in sd if d != kdim)
    reasons: list[str] = []
    q = b.mul(rt.read, rt.inner)
    if set(q.dims) - {kdim} or (rt.post is not None and kdim in rt.post.dims):
        return Recurrence(p, "general", ("sequential",),
                          ["readout query has dims beyond the contracted one"])

    post = rt.post
    if post is not None and not post.dims:   # a scalar post (the scale) folds into q
        q, post = b.mul(q, post), None
    rec = Recurrence(p, "diagonal", (), reasons, kdim=kdim, vdim=vdim, read_q=q,
                     read_post=post, out_const=out.const)
    up = _update(b, trans, kdim, vdim)
    if isinstance(up, str) and up.startswith(ERASES_ACROSS):
        alt = _update(b, trans, vdim, kdim)   # the erase along the other dim: the WY form
        if not isinstance(alt, str):          # with the readout across it (S q, over V)
            up, kdim, vdim = alt, vdim, kdim
            rec.kdim, rec.vdim, rec.read_across = kdim, vdim, True
    if isinstance(up, str) or len(up.erases) > 1 or up.rank_writes:
        # several updates in one step: sub-steps of the chunk forms, where the step splits
        why = up if isinstance(up, str) else (
            f"{len(up.erases)} rank-1 terms; the WY form handles one" if len(up.erases) > 1
            else "a rank-R write (a contraction of a [K, R] and an [R, V] value)")
        from .substeps import split   # it builds on this module
        ex = split(p, b, state, rec)
        if isinstance(ex, str) or ex is None:
            return _sequential(rec, why if ex is None else f"{why}; as sub-steps: {ex}")
        rec.expansion = ex
        rec.kind = "rank1" if ex.erases else "diagonal"
        rec.forms = ("chunk_wy" if ex.erases else "chunk_gated", "sequential")
        rec.reasons.append(f"runs as {ex.describe()} per token ({why})")
        return rec
    rec.log_gate_k, rec.log_gate_v = up.log_gate_k, up.log_gate_v
    rec.decay_k, rec.decay_v = up.decay_k, up.decay_v
    rec.gate_positive = up.gate_positive
    if not rec.gate_positive:
        reasons.append("the decay is not provably positive; the chunk forms check it at run "
                       "time and fall back to sequential")
    rec.writes = up.writes
    if not up.erases:
        rec.forms = ("chunk_gated", "sequential")
        return rec
    rec.kind = "rank1"
    rec.erase_u, rec.erase_r = up.erases[0]
    if len(rec.writes) == 1:
        rec.erase_scale = _scalar_ratio(b, rec.erase_u, rec.writes[0][0])
    rec.forms = ("chunk_wy", "sequential")
    return rec


@dataclass
class Update:
    """One step of the chunk forms' shape, ``S' = D S + sum u (r^T S) + sum a b^T`` (plus
    rank-R writes ``A B`` contracted over a dim R), before it is checked to be one step."""
    log_gate_k: Node | None = None
    log_gate_v: Node | None = None
    decay_k: Node | None = None
    decay_v: Node | None = None
    gate_positive: bool = True
    erases: list[tuple[Node, Node]] = field(default_factory=list)       # (u [K], r [K])
    writes: list[tuple[Node, Node]] = field(default_factory=list)       # (a [K], b [V])
    rank_writes: list[tuple[Node, Node, str]] = field(default_factory=list)  # (A, B, R)


def _update(b: Builder, trans: Affine, kdim: str, vdim: str) -> Update | str:
    """The transition ``trans`` as an ``Update``, or why it is not of that shape."""
    d = None
    rank1 = []
    for t in trans.terms:   # decay: the terms without contraction
        if not t.over:
            if t.post is not None:
                return "a decay term broadcasts the state over a new dim"
            d = b.add(d, t.inner if t.inner is not None else b.const(1.0))
        else:
            rank1.append(t)
    if d is None:
        return "the state is not carried over (no decay term)"
    split = _split_decay(b, d, kdim, vdim)
    if split is None:
        return "the decay is not a product of per-K and per-V gates"
    (lk, dk, pos_k), (lv, dv, pos_v) = split
    up = Update(lk, lv, dk, dv, pos_k and pos_v)
    writes = _outer_sum(b, trans.const, kdim, vdim)
    if writes is None:
        return "the write term is not a sum of outer products k v^T (or of rank-R " \
               "contractions kt @ vt)"
    up.writes = [w for w in writes if len(w) == 2]
    up.rank_writes = [w for w in writes if len(w) == 3]
    for t in rank1:
        if t.over == (vdim,) and t.post is not None and set(t.post.dims) == {vdim} and \
                t.read is not None and set(t.read.dims) == {vdim}:
            return (f"{ERASES_ACROSS} {vdim} but the readout contracts {kdim}: "
                    "the WY form needs the erase and the readout along one dim (a readout "
                    f"over {vdim}, e.g. S @ p, takes it)")
        if t.over != (kdim,) or t.post is None or set(t.post.dims) != {kdim} \
                or t.read is None or set(t.read.dims) != {kdim}:
            return ("the rank-1 term does not erase along the key dim "
                    f"({kdim}): expected u (r^T S) with u, r over {kdim}")
        if t.inner is not None and vdim in t.inner.dims:
            return "the rank-1 term reads a value-side gated state"
        up.erases.append((t.post, b.mul(t.read, t.inner)))
    if up.erases and lv is not None:
        return "value-side decay together with a rank-1 erase"
    return up


def _scalar_ratio(b: Builder, u: Node, a: Node) -> Node | None:
    """c with u = c * a when u and a have the same non-scalar factors (the delta rule's
    erase and write share their key) and c needs no division by a value of the write's,
    else None."""
    fu, fa = factors(u), factors(a)
    vec_u = sorted((f for f in fu if f.dims), key=id)
    vec_a = sorted((f for f in fa if f.dims), key=id)
    if [id(f) for f in vec_u] != [id(f) for f in vec_a]:
        return None
    num = [f for f in fu if not f.dims]
    den = [f for f in fa if not f.dims]
    for f in list(den):   # cancel common scalar factors
        same = next((g for g in num if g is f), None)
        if same is not None:
            num.remove(same)
            den.remove(f)
    if any(f.op != "const" or f.attr("value") == 0 for f in den):
        return None   # c would divide by the write's own scale, which may be 0 at a token
    c = b.const(1.0)
    for f in num:
        c = b.mul(c, f) if not (c.op == "const" and c.attr("value") == 1.0) else f
    for f in den:
        c = b.op("div", c, f)
    return c


def _sequential(rec: Recurrence, why: str) -> Recurrence:
    rec.kind = "general" if rec.kind == "diagonal" else rec.kind
    rec.forms = ("sequential",)
    rec.reasons.append(why)
    return rec


POSITIVE_OPS = ("exp", "sigmoid", "softplus")


def _positive(n: Node) -> bool:
    if n.op in POSITIVE_OPS:
        return True
    if n.op == "const":
        return n.attr("value") > 0
    if n.op in ("mul", "div"):
        return all(_positive(a) for a in n.args)
    if n.op == "add":
        return all(_positive(a) for a in n.args)
    if n.op == "pow":
        return _positive(n.args[0])
    return False


def _log(b: Builder, n: Node) -> Node:
    """log n, simplified for products and exponentials."""
    if n.op == "exp":
        return n.args[0]
    if n.op == "mul":
        return b.op("add", _log(b, n.args[0]), _log(b, n.args[1]))
    if n.op == "sigmoid":  # log sigmoid(x) = -softplus(-x)
        return b.op("neg", b.op("softplus", b.op("neg", n.args[0])))
    return b.op("log", n)


def _split_decay(b: Builder, d: Node, kdim: str, vdim: str):
    """d = d_K * d_V with d_K over (K or nothing), d_V over V: ((log, d, positive), ...)."""
    fk, fv = [], []
    for f in factors(d):
        if f.op == "const" and f.attr("value") == 1.0:
            continue
        if vdim not in f.dims:
            fk.append(f)
        elif kdim not in f.dims:
            fv.append(f)
        else:
            return None
    out = []
    for fs in (fk, fv):
        if not fs:
            out.append((None, None, True))
            continue
        prod = fs[0]
        for f in fs[1:]:
            prod = b.mul(prod, f)
        pos = all(_positive(f) for f in fs)
        log = _log(b, prod) if pos else b.op("log", b.op("abs", prod))
        out.append((log, None if pos else prod, pos))
    return out


def _outer_sum(b: Builder, c: Node | None, kdim: str, vdim: str):
    """c as sum_j a_j b_j^T with a_j over K and b_j over V, plus rank-R terms (A_j, B_j, R)
    for contractions A_j B_j over a dim R with A_j over (K, R), B_j over (R, V); or None."""
    if c is None:
        return []
    pairs = []
    for sign, s in summands(c):
        fk, fv, mixed = [], [], []
        for f in factors(s):
            if vdim not in f.dims:
                fk.append(f)
            elif kdim not in f.dims:
                fv.append(f)
            else:
                mixed.append(f)
        rank = None
        if mixed:
            m = mixed[0]
            if len(mixed) > 1 or m.op != "contract" or len(m.attr("over")) != 1:
                return None
            R = m.attr("over")[0]
            x, y = m.args if vdim not in m.args[0].dims else m.args[::-1]
            if vdim in x.dims or kdim in y.dims or R in set().union(*(f.dims for f in fk + fv)):
                return None
            fk, fv, rank = fk + [x], fv + [y], R
        a = fk[0] if fk else b.const(1.0)
        for f in fk[1:]:
            a = b.mul(a, f)
        if sign < 0:
            a = b.op("neg", a)
        bb = fv[0] if fv else b.const(1.0)
        for f in fv[1:]:
            bb = b.mul(bb, f)
        pairs.append((a, bb) if rank is None else (a, bb, rank))
    return pairs
