"""Tile programs: the backend-neutral output of lowering.

A tile program is a prologue (state-free values per token, as IR nodes) and a list of stages,
one kernel each. A stage runs its ops once per grid point: per chunk in parallel (``chunk``),
sequentially over chunks or tokens with carried values (``loop``), or as a parallel scan over
the tokens (``scan``). Values are blocks with *named axes*: ``i`` and ``j``
index positions inside a chunk (size C), the other axes are the declaration's dims (K, V, D).
Broadcasting is by axis name, as in the IR, so no op ever needs a transpose.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..ir.node import BINARY, COMPARE, UNARY

# op -> (number of args, doc)
TILE_OPS: dict[str, tuple[int, str]] = {
    "load": (0, "a per-token value of the prologue, as a block over positions i"),
    "load_chunk": (0, "a per-chunk value from an earlier stage"),
    "zeros": (0, "a zero block"),
    "eye": (0, "the identity [X, X'] over a dim and its primed copy"),
    "cumsum": (1, "inclusive cumulative sum along axis"),
    "shift": (1, "shift along axis by one position, filling 0 (exclusive cumsum from cumsum)"),
    "rename": (1, "rename one axis (i -> j, K -> K')"),
    "last": (1, "the value at the last position of axis"),
    "decay_ratio": (2, "exp(a_i - b_j) where the mask holds, else 0; masked before exp"),
    "mask": (1, "keep where the mask holds (i >= j or i > j), else 0"),
    "contract": (2, "multiply and sum over the shared axes named in `over`"),
    "invert_unit_lower": (1, "(I - L)^-1 [i, j] for strictly lower-triangular L [i, j]"),
    "scan_linear": (-1, "h_t = a_t h_(t-1) + b_t over the tokens, from log|a|, b and the sign "
                        "of a where it is not known positive; a parallel scan in log space"),
    "step": (-1, "one step of the declaration (sequential form): new state and output"),
    "readout": (1, "the declaration's output evaluated from the new state, per token"),
    "ir": (-1, "an elementwise op of the declaration's vocabulary"),
}
ELEMENTWISE = set(UNARY) | set(BINARY) | set(COMPARE) | {"where"}
MASKS = ("i>=j", "i>j")
# what a carried value starts from: the call's initial state (zeros when none), or, for a
# backward pass, the cotangent of the final state (zeros when none flows)
INITS = ("initial_state", "final_cotangent")


@dataclass(frozen=True)
class TileOp:
    out: str
    op: str
    args: tuple[str, ...]
    axes: tuple[str, ...]
    attrs: tuple[tuple[str, Any], ...] = ()

    def attr(self, key: str, default: Any = None) -> Any:
        return dict(self.attrs).get(key, default)

    def __str__(self) -> str:
        extra = ", ".join(f"{k}={v}" for k, v in self.attrs if k != "ir_op")
        name = self.attr("ir_op") if self.op == "ir" else self.op
        args = ", ".join(self.args + ((extra,) if extra else ()))
        return f"{self.out}[{', '.join(self.axes)}] = {name}({args})"


@dataclass
class Stage:
    name: str
    kind: str                        # "chunk" | "loop" | "scan"
    grid: tuple[str, ...]
    ops: list[TileOp] = field(default_factory=list)
    carried: tuple[str, ...] = ()    # loop: values carried from one iteration to the next
    over: str | None = None          # loop: "chunks" or "tokens"
    outputs: tuple[str, ...] = ()
    reverse: bool = False            # loop: last chunk first (the backward's adjoint pass)

    def __str__(self) -> str:
        head = f"stage {self.name} ({self.kind}, grid {' x '.join(self.grid)}"
        if self.over:
            order = "backwards " if self.reverse else ""
            head += f", sequential {order}over {self.over}, carries {', '.join(self.carried)}"
        lines = [head + ")"]
        lines += [f"    {op}" for op in self.ops]
        if self.outputs:
            lines.append(f"    -> {', '.join(self.outputs)}")
        return "\n".join(lines)


@dataclass
class TileProgram:
    """Lowered declaration: the form, its chunk size, the prologue values and the stages."""

    name: str
    form: str
    chunk: int | None
    dims: tuple[str, ...]
    prologue: dict[str, Any]          # value name -> IR node (computed per token)
    stages: list[Stage]
    meta: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        c = f", chunk {self.chunk}" if self.chunk else ""
        lines = [f"tile program {self.name}: form {self.form}{c}"]
        if self.meta.get("reasons"):
            lines += [f"  note: {r}" for r in self.meta["reasons"]]
        if self.prologue:
            lines.append("  prologue (per token): " + ", ".join(
                f"{k}[{', '.join(v.dims)}]" for k, v in self.prologue.items()))
        for s in self.stages:
            lines += ["  " + line for line in str(s).splitlines()]
        return "\n".join(lines)


class TileVerifyError(ValueError):
    pass


def verify_tile_program(tp: TileProgram) -> None:
    """Every op known, every value defined before use, axes consistent with the op's rule."""
    defined: dict[str, tuple[str, ...]] = {}
    pos = {"i", "j"}
    for st in tp.stages:
        if st.kind not in ("chunk", "loop", "scan"):
            raise TileVerifyError(f"stage {st.name}: unknown kind {st.kind!r}")
        local = dict(defined)
        for op in st.ops:
            if op.op not in TILE_OPS:
                raise TileVerifyError(f"stage {st.name}: unknown tile op {op.op!r}")
            arity = TILE_OPS[op.op][0]
            if arity >= 0 and len(op.args) != arity:
                raise TileVerifyError(f"{op}: {op.op} takes {arity} args")
            for a in op.args:
                if a not in local:
                    raise TileVerifyError(f"stage {st.name}: {op} uses {a} before it is "
                                          "defined")
            ins = [local[a] for a in op.args]
            _check_axes(op, ins, pos, tp.dims)
            local[op.out] = op.axes
        for name in st.carried:
            first = next((op for op in st.ops if op.out == name), None)
            if first is None or first.op != "zeros" or first.attr("init") not in INITS:
                raise TileVerifyError(f"stage {st.name}: carried value {name} must start as "
                                      f"zeros(init=...) with init one of {INITS}")
        if st.reverse and (st.kind != "loop" or st.over != "chunks"):
            raise TileVerifyError(f"stage {st.name}: only a loop over chunks runs backwards")
        for name in st.outputs:
            if name not in local:
                raise TileVerifyError(f"stage {st.name}: output {name} is never computed")
            defined[name] = local[name]


def _check_axes(op: TileOp, ins: list[tuple[str, ...]], pos: set[str], dims) -> None:
    known = pos | set(dims) | {d + "'" for d in dims}
    for ax in op.axes:
        if ax not in known:
            raise TileVerifyError(f"{op}: unknown axis {ax!r}")
    if len(set(op.axes)) != len(op.axes):
        raise TileVerifyError(f"{op}: repeated axis")
    if op.op == "contract":
        over = set(op.attr("over"))
        union = set(ins[0]) | set(ins[1])
        if not over <= set(ins[0]) & set(ins[1]):
            raise TileVerifyError(f"{op}: contracts {sorted(over)} not shared by both args")
        if set(op.axes) != union - over:
            raise TileVerifyError(f"{op}: result axes should be {sorted(union - over)}")
    elif op.op in ("mask", "decay_ratio"):
        if op.attr("mask") not in MASKS:
            raise TileVerifyError(f"{op}: mask must be one of {MASKS}")
    elif op.op == "ir":
        if op.attr("ir_op") not in ELEMENTWISE:
            raise TileVerifyError(f"{op}: not an elementwise op")
        if set(op.axes) != set().union(*map(set, ins)):
            raise TileVerifyError(f"{op}: elementwise result axes are the union of its args'")
    elif op.op == "invert_unit_lower":
        if set(ins[0]) != {"i", "j"} or set(op.axes) != {"i", "j"}:
            raise TileVerifyError(f"{op}: needs L[i, j] and gives [i, j]")


def stage_inputs(st: Stage, known: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
    """The values a stage reads from earlier stages (or the prologue), with their axes."""
    made: set[str] = set(st.carried)
    ins: dict[str, tuple[str, ...]] = {}
    for op in st.ops:
        for name in list(op.args) + ([op.attr("value")] if op.op == "load" else []):
            if name not in made and name in known and name not in ins:
                ins[name] = known[name]
        made.add(op.out)
    return ins
