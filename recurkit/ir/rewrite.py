"""Rewrites of a traced declaration that produce a new, verified declaration."""
from __future__ import annotations

from typing import Callable

from . import dsl
from .errors import DeclarationError
from .node import Node
from .program import Program
from .trace import Recurrence
from .verify import verify_program


def with_prologue(decl: Recurrence, name: str | None = None,
                  **transforms: Callable[[dsl.Sym], dsl.Sym]) -> Recurrence:
    """The same step with some inputs transformed first, e.g.
    ``with_prologue(gdn, q=rk.l2norm, k=rk.l2norm)`` normalises q and k before the step."""
    p = decl.program
    by_name = {s.name: i for i, s in enumerate(p.inputs)}
    for arg in transforms:
        if arg not in by_name or p.inputs[by_name[arg]].role == "state":
            raise DeclarationError(f"with_prologue: '{arg}' is not a token, param or scalar "
                                   f"input of {p.name}", p.loc, decl=p.name)
    new_name = name or p.name
    tracer = dsl.Tracer(new_name, p.dims, p.loc)
    nodes = p.nodes()
    inputs = {n.attr("name"): n for n in nodes if n.op == "input"}
    replace: dict[int, Node] = {}
    dsl._current.append(tracer)
    try:
        for arg, fn in transforms.items():
            if arg in inputs:
                out = fn(dsl.Sym(inputs[arg], tracer))
                if not isinstance(out, dsl.Sym) or out.dims != inputs[arg].dims:
                    raise DeclarationError(f"with_prologue: the transform of '{arg}' must keep "
                                           f"its dims {list(inputs[arg].dims)}", p.loc,
                                           decl=new_name)
                replace[id(inputs[arg])] = out._node
    finally:
        dsl._current.pop()
    rebuilt: dict[int, Node] = {}
    for n in nodes:
        if id(n) in replace:
            rebuilt[id(n)] = replace[id(n)]
        elif n.args:
            rebuilt[id(n)] = Node(n.op, tuple(rebuilt[id(a)] for a in n.args), n.dims, n.dtype,
                                  n.attrs, n.loc)
        else:
            rebuilt[id(n)] = n
    prog = Program(new_name, p.dims, p.inputs, rebuilt[id(p.output)],
                   None if p.new_state is None else rebuilt[id(p.new_state)], p.loc)
    verify_program(prog)
    return Recurrence(decl.fn, prog)
