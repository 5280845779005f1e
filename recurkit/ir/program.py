"""A traced declaration: its inputs, its canonical dims and the step as a DAG of nodes.

Printing shows the step as one line per node; ``to_json``/``from_json`` round-trip it; and
``content_hash`` is stable under renaming (of inputs, dims and Python variables) and changes
whenever the math changes. The hash keys kernel caches.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from .dimexpr import DimExpr
from .errors import Loc
from .node import TILED_TENSOR_ROLES, Node, toposort

IR_VERSION = 1


@dataclass(frozen=True)
class InputSpec:
    """One argument of the step function.

    role: "state" | "token" ([B,T,H,*dims]) | "param" ([H,*dims]) | "scalar" (a call-time
    number; ``default`` is a number, a DimExpr or None for required); in tiled declarations
    "row" ([N,*dims]), "weight" ([*dims]), "index" ([*dims], integers) and "bits" ([*dims],
    signs packed 8 per uint8 along the last dim).
    dims are as declared (the tensor layout); nodes use the program's canonical order.
    """

    name: str
    role: str
    dims: tuple[str, ...]
    default: float | DimExpr | None = None

    def layout(self) -> str:
        lead = {"state": "N, H", "token": "B, T, H", "param": "H", "row": "N"}.get(self.role, "")
        dims = list(self.dims)
        if self.role == "bits" and dims:
            dims[-1] = f"{dims[-1]} // 8"
        return "[" + ", ".join(x for x in [lead, *dims] if x) + "]"


@dataclass(frozen=True, eq=False)
class Program:
    """A declaration after tracing.

    ``dims``: every dim name, in canonical order (first appearance, state first); node dims
    follow it. ``new_state`` is None for stateless declarations.
    """

    name: str
    dims: tuple[str, ...]
    inputs: tuple[InputSpec, ...]
    output: Node
    new_state: Node | None = None
    loc: Loc | None = None

    # --- views -------------------------------------------------------------------------
    @property
    def state(self) -> InputSpec | None:
        return next((i for i in self.inputs if i.role == "state"), None)

    @property
    def is_tiled(self) -> bool:
        """A tiled declaration (rows, weights, indices; no time axis, no state)."""
        return any(s.role in TILED_TENSOR_ROLES for s in self.inputs)

    @cached_property
    def call_inputs(self) -> tuple[InputSpec, ...]:
        """Arguments of a compiled op, in declaration order (the state excluded)."""
        return tuple(i for i in self.inputs if i.role != "state")

    def roots(self) -> list[Node]:
        return [self.output] + ([self.new_state] if self.new_state is not None else [])

    @cached_property
    def _order(self) -> tuple[Node, ...]:   # a program never changes: sorted once
        return tuple(toposort(self.roots()))

    def nodes(self) -> list[Node]:
        return list(self._order)

    def canonical(self, dims) -> tuple[str, ...]:
        return tuple(sorted(dims, key=self.dims.index))

    # --- printing ------------------------------------------------------------------------
    def __str__(self) -> str:
        return format_program(self)

    def __repr__(self) -> str:
        return f"<recurkit Program {self.name} {self.content_hash()[:12]}>"

    # --- serialisation -------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(_encode(self, keep_names=True), indent=1, sort_keys=True)

    @staticmethod
    def from_json(text: str) -> "Program":
        return _decode(json.loads(text))

    def content_hash(self) -> str:
        """sha256 of the math: names, source locations and dim spellings left out."""
        return self._content_hash

    @cached_property
    def _content_hash(self) -> str:   # a program never changes: hashed once (kernel keys)
        blob = json.dumps(_encode(self, keep_names=False), sort_keys=True,
                          separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()


def _fmt_dims(dims) -> str:
    return "[" + ", ".join(dims) + "]"


def _node_label(n: Node, ids: dict[int, str]) -> str:
    if n.op == "input":
        return n.attr("name")
    if n.op == "const":
        return repr(n.attr("value"))
    return ids[id(n)]


def format_program(p: Program) -> str:
    kind = "tiled" if p.is_tiled else "recurrence"
    lines = [f"{kind} {p.name}" + (f"  ({p.loc})" if p.loc else "")]
    lines.append(f"  dims    {', '.join(p.dims) if p.dims else '(none)'}")
    for spec in p.inputs:
        if spec.role == "scalar":
            d = "required" if spec.default is None else f"default {spec.default}"
            lines.append(f"  scalar  {spec.name} ({d})")
        else:
            lines.append(f"  {spec.role:<7} {spec.name}: {spec.layout()}")
    ids: dict[int, str] = {}
    body = [n for n in p.nodes() if n.op not in ("input", "const")]
    width = 0
    rendered = []
    for i, n in enumerate(body):
        ids[id(n)] = f"%{i}"
        args = ", ".join(_node_label(a, ids) for a in n.args)
        extra = ""
        if n.op in ("contract", "sum", "max"):
            extra = f"[{', '.join(n.attr('over'))}]"
        elif n.op in ("gather", "rotate"):
            extra = f"[{n.attr('dim')}]"
        elif n.op == "pairs":
            extra = f"[{n.attr('pair')}->{n.attr('dim')}]"
        ty = _fmt_dims(n.dims) + ("" if n.dtype == "f32" else f" {n.dtype}")
        text = f"  %{i}: {ty} = {n.op}{extra}({args})"
        rendered.append((text, n.loc))
        width = max(width, len(text))
    for text, loc in rendered:
        lines.append(f"{text:<{width}}   # line {loc.line}" if loc else text)
    if p.new_state is not None:
        lines.append(f"  {p.state.name}' = {_node_label(p.new_state, ids)}")
    lines.append(f"  out = {_node_label(p.output, ids)}: {_fmt_dims(p.output.dims)}")
    return "\n".join(lines)


def _encode(p: Program, keep_names: bool) -> dict:
    rename = {d: (d if keep_names else f"d{i}") for i, d in enumerate(p.dims)}
    nodes = p.nodes()
    index = {id(n): i for i, n in enumerate(nodes)}

    def attrs(n: Node) -> list:
        out = []
        for k, v in n.attrs:
            if k == "name" and not keep_names:
                continue
            if k == "over":
                v = [rename[d] for d in v]
            elif k == "dim" or (k == "pair" and v is not None):
                v = rename[v]
            out.append([k, v])
        return out

    def spec(s: InputSpec) -> dict:
        d = {"role": s.role, "dims": [rename[x] for x in s.dims]}
        if s.default is not None:
            d["default"] = (s.default.renamed(rename).to_json() if isinstance(s.default, DimExpr)
                            else s.default)
            d["default_kind"] = "dim" if isinstance(s.default, DimExpr) else "num"
        if keep_names:
            d["name"] = s.name
        return d

    enc = {
        "ir_version": IR_VERSION,
        "dims": [rename[d] for d in p.dims],
        "inputs": [spec(s) for s in p.inputs],
        "nodes": [{"op": n.op, "args": [index[id(a)] for a in n.args],
                   "dims": [rename[d] for d in n.dims], "dtype": n.dtype, "attrs": attrs(n)}
                  for n in nodes],
        "output": index[id(p.output)],
        "new_state": None if p.new_state is None else index[id(p.new_state)],
    }
    if keep_names:
        enc["name"] = p.name
        enc["locs"] = [[n.loc.file, n.loc.line] if n.loc else None for n in nodes]
        enc["loc"] = [p.loc.file, p.loc.line] if p.loc else None
    return enc


def _decode(d: dict) -> Program:
    from .verify import verify_program  # local: verify imports this module

    if d.get("ir_version") != IR_VERSION:
        raise ValueError(f"IR JSON has ir_version {d.get('ir_version')!r}, this recurkit reads "
                         f"{IR_VERSION}")
    locs = d.get("locs") or [None] * len(d["nodes"])
    nodes: list[Node] = []
    for nd, lc in zip(d["nodes"], locs):
        attrs = tuple((k, tuple(v) if k == "over" else v) for k, v in nd["attrs"])
        nodes.append(Node(nd["op"], tuple(nodes[i] for i in nd["args"]), tuple(nd["dims"]),
                          nd["dtype"], attrs, Loc(*lc) if lc else None))
    inputs = []
    for s in d["inputs"]:
        default = s.get("default")
        if s.get("default_kind") == "dim":
            default = DimExpr.from_json(default)
        inputs.append(InputSpec(s["name"], s["role"], tuple(s["dims"]), default))
    prog = Program(d["name"], tuple(d["dims"]), tuple(inputs), nodes[d["output"]],
                   None if d["new_state"] is None else nodes[d["new_state"]],
                   Loc(*d["loc"]) if d.get("loc") else None)
    verify_program(prog)
    return prog
