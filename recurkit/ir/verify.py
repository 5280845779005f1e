"""Checks a Program before anything downstream sees it (after tracing and after JSON load)."""
from __future__ import annotations

import math

from .dimexpr import DimExpr
from .errors import DeclarationError
from .node import BOOL, F32, INDEX, ROLES, TILED_ROLES, TILED_TENSOR_ROLES
from .program import Program
from .typing_rules import TypeRule, infer

RESERVED_DIMS = ("B", "T", "H", "N")   # the call's batch, time, head and sequence axes
POSITION_AXES = ("i", "j")              # positions inside a chunk, in tile programs


def verify_program(p: Program) -> None:
    """Raise DeclarationError (with the offending line) if ``p`` is not well formed."""
    err = _raiser(p)
    if len(set(p.dims)) != len(p.dims):
        err(f"dims listed twice in {list(p.dims)}")
    for d in p.dims:
        if d in RESERVED_DIMS:
            err(f"dim name '{d}' is reserved for the layout axes {list(RESERVED_DIMS)}",
                hint="pick another name, e.g. 'K', 'V' or 'D'")
        if d in POSITION_AXES:
            err(f"dim name '{d}' is reserved for the positions inside a chunk "
                f"{list(POSITION_AXES)} that lowered programs index",
                hint="pick another name, e.g. 'K', 'V' or 'D'")
    names = [s.name for s in p.inputs]
    if len(set(names)) != len(names):
        err(f"input names repeat: {names}")
    states = [s for s in p.inputs if s.role == "state"]
    if len(states) > 1:
        err("more than one rk.State argument", hint="carry one state; stack several into it")
    if states and p.inputs[0].role != "state":
        err(f"the state '{states[0].name}' must be the first argument of the step")
    for s in p.inputs:
        if s.role not in ROLES + TILED_ROLES or s.role == "head":
            err(f"input '{s.name}' has unknown role {s.role!r}")
        for d in s.dims:
            if d not in p.dims:
                err(f"input '{s.name}' uses undeclared dim '{d}'")
        if s.role == "scalar" and s.default is not None:
            if isinstance(s.default, DimExpr):
                for d in s.default.dims():
                    if d not in p.dims:
                        err(f"default of scalar '{s.name}' uses undeclared dim '{d}'",
                            hint=f"declared dims are {list(p.dims)}")
            elif not (isinstance(s.default, (int, float)) and math.isfinite(s.default)):
                err(f"default of scalar '{s.name}' must be a finite number or rk.dim(...) "
                    f"expression, got {s.default!r}")

    for n in p.nodes():
        if list(n.dims) != sorted(n.dims, key=p.dims.index):
            err(f"node {n.op} has dims {list(n.dims)} out of canonical order", n.loc)
        if n.op == "input":
            role, idx = n.attr("role"), n.attr("index")
            if role == "head":
                if n.dims != () or n.dtype != F32:
                    err("rk.head() must be an f32 scalar", n.loc)
                continue
            if not (isinstance(idx, int) and 0 <= idx < len(p.inputs)):
                err(f"input node refers to argument #{idx}, which does not exist", n.loc)
            spec = p.inputs[idx]
            want = INDEX if role == "index" else F32
            if spec.role != role or n.dims != p.canonical(spec.dims) or n.dtype != want:
                err(f"input node for '{spec.name}' does not match its declaration", n.loc)
        elif n.op == "const":
            v = n.attr("value")
            if n.dims != () or not isinstance(v, (int, float)) or isinstance(v, bool):
                err(f"bad constant {v!r}", n.loc)
        else:
            try:
                dims, dtype = infer(n.op, [(a.dims, a.dtype) for a in n.args], dict(n.attrs),
                                    p.dims)
            except TypeRule as e:
                err(e.what, n.loc, e.hint)
            if (dims, dtype) != (n.dims, n.dtype):
                err(f"node {n.op} is typed {list(n.dims)} {n.dtype}, its rule gives "
                    f"{list(dims)} {dtype}", n.loc)

    tiled = [s.name for s in p.inputs if s.role in TILED_TENSOR_ROLES]
    timed = [s.name for s in p.inputs if s.role in ("state", "token", "param")]
    if tiled and timed:
        err(f"inputs {tiled} (tiled) and {timed} (recurrence) are mixed in one declaration")
    if p.output.dtype == INDEX:
        err("the output is an rk.Index input", p.output.loc, "gather with it: rk.gather(x, idx)")
    if p.output.dtype == BOOL:
        err("the output is a comparison (bool)", p.output.loc,
            "return numbers, e.g. rk.where(cond, 1.0, 0.0)")
    if states:
        st = states[0]
        want = p.canonical(st.dims)
        if p.new_state is None:
            err("the step declares a state but returns no new state", p.loc)
        if p.new_state.dims != want:
            err(f"the returned state has dims [{', '.join(p.new_state.dims)}], but the state "
                f"'{st.name}' is declared rk.State{list(st.dims)}", p.new_state.loc or p.loc,
                "the new state must carry exactly the declared dims: reduce extra dims "
                "(rk.sum / @) or broadcast missing ones (rk.outer)")
        if p.new_state.dtype != F32:
            err("the returned state is a comparison (bool)", p.new_state.loc)
        bound = {d for s in p.inputs if s.role in ("token", "param") for d in s.dims}
        unbound = [d for d in st.dims if d not in bound]
        if unbound:
            err(f"state dim '{unbound[0]}' appears in no token or param input, so its size "
                "cannot be bound from the call", p.loc,
                f"add an input that carries '{unbound[0]}' (e.g. rk.Token['{unbound[0]}'])")
    elif p.new_state is not None:
        err("a new state is returned but no rk.State argument is declared", p.loc)


def _raiser(p: Program):
    def err(what, loc=None, hint=None):
        raise DeclarationError(what, loc or p.loc, hint, p.name)
    return err
