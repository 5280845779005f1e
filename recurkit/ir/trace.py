"""``@rk.recurrence``: trace a step function into a verified Program."""
from __future__ import annotations

import inspect
import os
import traceback
from typing import Any, Callable

from . import dsl
from .dimexpr import DimExpr
from .errors import DeclarationError, Loc
from .node import F32, INDEX, TILED_ROLES, Node
from .program import InputSpec, Program
from .verify import verify_program

_PKG_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Recurrence:
    """A declaration: the traced Program plus the user's step function.

    Calling it runs the reference interpreter (the semantic definition); ``rk.compile`` turns
    it into a fast op with the same call signature.
    """

    def __init__(self, fn: Callable, program: Program):
        self.fn, self.program = fn, program
        self.name = program.name
        self.__doc__ = fn.__doc__
        self.__wrapped__ = fn

    def __call__(self, *args, **kwargs):
        from .interpret import reference_op
        return reference_op(self.program)(*args, **kwargs)

    def content_hash(self) -> str:
        return self.program.content_hash()

    def __str__(self) -> str:
        return str(self.program)

    def __repr__(self) -> str:
        return f"<rk.recurrence {self.name} {self.content_hash()[:12]}>"


class Tiled(Recurrence):
    """A tiled declaration: a stateless op over rows (samples), e.g. a logic-gate layer.

    Calling it runs the reference interpreter on ``(*rows/weights/indices, **scalars)`` and
    returns the output [N, *out_dims]; ``rk.compile`` gives the kernels and their backward.
    """

    def __call__(self, *args, **kwargs):
        from .tiled import run_tiled_reference
        return run_tiled_reference(self.program, args, kwargs)

    def __repr__(self) -> str:
        return f"<rk.tiled {self.name} {self.content_hash()[:12]}>"


def tiled(fn: Callable | None = None, *, name: str | None = None):
    """Decorator: trace ``fn`` into a tiled declaration.

    ``fn(x: rk.Row[...], idx: rk.Index[...], w: rk.Weight[...], c: rk.Scalar = 1.0) -> out``
    computes one output row from one input row; ``rk.gather(x, idx)`` reads a row at fixed
    indices. Every value must be elementwise over the output's dims (see DESIGN.md, "tiled").
    """
    if fn is None:
        return lambda f: tiled(f, name=name)
    return Tiled(fn, trace(fn, name, kind="tiled"))


def recurrence(fn: Callable | None = None, *, name: str | None = None):
    """Decorator: trace ``fn`` (the step of a recurrence) into a declaration.

    ``fn(S: rk.State[...], x: rk.Token[...], ..., c: rk.Scalar = default) -> (S_new, out)``;
    with no rk.State argument, ``fn(...) -> out`` declares a stateless per-token op.
    Refused declarations raise DeclarationError naming the file, line and fix.
    """
    if fn is None:
        return lambda f: recurrence(f, name=name)
    return Recurrence(fn, trace(fn, name))


def trace(fn: Callable, name: str | None = None, kind: str = "recurrence") -> Program:
    if not callable(fn) or not hasattr(fn, "__code__"):
        raise TypeError(f"@rk.{kind} decorates a Python function, got {fn!r}")
    name = name or fn.__name__
    where = Loc(fn.__code__.co_filename, fn.__code__.co_firstlineno)

    def err(what, hint=None, loc=None):
        return DeclarationError(what, loc or where, hint, name)

    specs = _read_signature(fn, err)
    allowed = TILED_ROLES if kind == "tiled" else ("state", "token", "param", "scalar")
    for s in specs:
        if s.role not in allowed:
            names = {"row": "Row", "weight": "Weight", "index": "Index", "bits": "Bits",
                     "state": "State",
                     "token": "Token", "param": "Param", "scalar": "Scalar"}
            raise err(f"argument '{s.name}' is an rk.{names[s.role]}, which @rk.{kind} does "
                      "not take", "use rk.Row / rk.Weight / rk.Index / rk.Bits / rk.Scalar with "
                      "@rk.tiled" if kind == "tiled" else "rk.Row / rk.Weight / rk.Index "
                      "inputs belong to @rk.tiled declarations")
    dims: list[str] = []
    for s in sorted(specs, key=lambda s: s.role != "state"):
        dims += [d for d in s.dims if d not in dims]
    for s in specs:
        if isinstance(s.default, DimExpr):
            for d in s.default.dims():
                if d not in dims:
                    raise err(f"the default of scalar '{s.name}' uses dim '{d}', which no "
                              f"input declares", f"declared dims are {dims}")
    tracer = dsl.Tracer(name, tuple(dims), where)
    args = []
    for i, s in enumerate(specs):
        node = Node("input", (), tuple(d for d in dims if d in s.dims),
                    INDEX if s.role == "index" else F32,
                    (("role", s.role), ("index", i), ("name", s.name)), where)
        args.append(dsl.Sym(node, tracer))

    dsl._current.append(tracer)
    try:
        result = fn(*args)
    except DeclarationError:
        raise
    except Exception as e:  # a Python error inside the user's step: point at the user's line
        raise err(f"tracing the step raised {type(e).__name__}: {e}", loc=_user_frame(e)) from e
    finally:
        dsl._current.pop()

    stateful = any(s.role == "state" for s in specs)
    if stateful:
        if not (isinstance(result, tuple) and len(result) == 2):
            raise err(f"the step must return (new_state, output), got {_describe(result)}",
                      "end the step with `return S, out`")
        new_state, out = result
        if not isinstance(new_state, dsl.Sym):
            raise err(f"the new state is {_describe(new_state)}, not a traced value",
                      "return the updated state computed from the inputs")
    else:
        if isinstance(result, tuple):
            raise err(f"a stateless step returns one output, got a tuple of {len(result)}",
                      "declare an rk.State argument to carry state, or return one value")
        new_state, out = None, result
    if not isinstance(out, dsl.Sym):
        raise err(f"the output is {_describe(out)}, not a traced value",
                  "return a value computed from the inputs, e.g. q @ S")
    program = Program(name, tuple(dims), tuple(specs), out._node,
                      new_state._node if new_state is not None else None, where)
    verify_program(program)
    return program


def _read_signature(fn: Callable, err) -> list[InputSpec]:
    specs = []
    for p in inspect.signature(fn).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.KEYWORD_ONLY):
            raise err(f"argument '{p.name}': *args, **kwargs and keyword-only arguments are "
                      "not supported", "list every input as a plain argument")
        ann = p.annotation
        if isinstance(ann, str):
            try:
                ann = eval(ann, fn.__globals__)  # noqa: S307 - the user's own annotation
            except Exception as e:
                raise err(f"argument '{p.name}': cannot evaluate annotation {ann!r} ({e})")
        if ann is dsl.Scalar:
            ann = dsl.Spec("scalar", ())
        if not isinstance(ann, dsl.Spec):
            raise err(f"argument '{p.name}' is annotated {_describe_ann(ann)}",
                      "annotate every argument: rk.State[...], rk.Token[...], rk.Param[...] "
                      "or rk.Scalar (rk.Row / rk.Weight / rk.Index in @rk.tiled)")
        default = None
        if p.default is not inspect.Parameter.empty:
            if ann.role != "scalar":
                raise err(f"argument '{p.name}' ({ann}) has a default value",
                          "only rk.Scalar arguments take defaults")
            default = p.default
            if default is not None and not isinstance(default, (DimExpr, int, float)):
                raise err(f"scalar '{p.name}' has default {default!r}",
                          "use a number or an rk.dim(...) expression such as "
                          "rk.dim('K') ** -0.5")
            if isinstance(default, (int, float)) and not isinstance(default, bool):
                default = float(default)
        specs.append(InputSpec(p.name, ann.role, ann.dims, default))
    if not specs:
        raise err("the step takes no arguments")
    if any(s.role == "state" for s in specs) and specs[0].role != "state":
        raise err("the rk.State argument must come first",
                  "write def step(S: rk.State[...], x: rk.Token[...], ...)")
    return specs


def _describe(x: Any) -> str:
    if isinstance(x, tuple):
        return f"a tuple of {len(x)}"
    return "None" if x is None else f"a {type(x).__name__}"


def _describe_ann(ann: Any) -> str:
    if ann is inspect.Parameter.empty:
        return "nothing"
    if isinstance(ann, type) and issubclass(ann, dsl._Annotation):
        return f"rk.{ann.__name__} without dims"
    return repr(ann)


def _user_frame(e: BaseException) -> Loc | None:
    frames = traceback.extract_tb(e.__traceback__)
    for fr in reversed(frames):
        if not os.path.abspath(fr.filename).startswith(_PKG_DIR + os.sep + "ir"):
            return Loc(fr.filename, fr.lineno or 0)
    return None


def as_program(decl) -> Program:
    """The program of a declaration, of a built-in op (its ``decl``) or a program itself."""
    if isinstance(decl, Recurrence):
        return decl.program
    if isinstance(decl, Program):
        return decl
    inner = getattr(decl, "decl", None)  # a built-in op exposes its declaration
    if isinstance(inner, Recurrence):
        return inner.program
    raise TypeError(f"expected an @rk.recurrence declaration, got {type(decl).__name__}")
