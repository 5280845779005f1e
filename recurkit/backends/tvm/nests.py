"""Fused loop nests for TVMScript kernels that evaluate IR nodes over named dims.

``NestEmitter`` is the part of a kernel generator that places stored values (reductions and
values used more than once) and outputs into loop nests, fuses items over the same dims into
one nest once everything they read is computed, and emits the nests: reductions along the
innermost dim keep several vector partial sums (``lanes`` lanes each) so consecutive updates do
not wait on each other, loads that do not vary along the innermost dim are bound once at the
outermost loop they vary with. The host generator (``tvm.adjoint._AdjGen``) supplies the
names, the stored set (``mat``), the sizes and the expression rendering (``tvm.sequential._Gen``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ...ir.node import Node
from .sequential import _f

LANES = 8            # fp32 lanes of an AVX2 vector register: the emitter's default ``lanes``


@dataclass(eq=False)
class _Item:
    """One thing a loop nest computes: a stored value (``red``: a reduction), with a
    ``target`` an output written from ``value`` (``add``: added to what it holds), or with
    ``render`` a statement of its own."""

    node: Node | None
    red: bool
    domain: tuple[str, ...]
    reads: set[int]
    value: Node | None = None
    target: Callable | None = None
    writes: int | None = None
    add: bool = False
    render: Callable | None = None     # the item's statement, given the nest's index env


class NestEmitter:
    """Scheduling and emission of loop nests (a mixin: see the module docstring)."""

    lanes = LANES   # fp32 lanes of a vector register: reductions along the innermost dim

    def schedule(self, items: list["_Item"]) -> list[list["_Item"]]:
        """Items (in dependency order) placed into loop nests: each item goes to the first
        nest over the same dims that comes after everything it reads (a value stored
        elementwise over the same dims may be read in its own nest, at the same element)."""
        groups: list[list[_Item]] = []
        where: dict[int, tuple[int, bool]] = {}    # node id -> (nest, read in place)
        for it in items:
            need = 0
            for r in it.reads:
                if r in where:
                    g, same = where[r]
                    need = max(need, g if same and it.domain == groups[g][0].domain else g + 1)
            for k in range(need, len(groups)):
                if groups[k][0].domain == it.domain:
                    groups[k].append(it)
                    break
            else:
                k = len(groups)
                groups.append([it])
            if it.node is not None:
                where[id(it.node)] = (k, not it.red)
            if it.writes is not None:
                where[it.writes] = (k, True)
        return groups

    def emit(self, groups: list[list["_Item"]], ind: int) -> list[str]:
        lines: list[str] = []
        for grp in groups:
            dom = grp[0].domain
            inner = dom[-1] if dom else None
            lane_red = [it for it in grp if it.red and inner in it.node.attr("over")]
            split = bool(lane_red) and self.sizes[inner] % self.lanes == 0
            pre: list[str] = []    # per row of the nest: row-local accumulators reset ...
            post: list[str] = []   # ... and folded into the row's value
            for it in grp:   # reduction targets start at the identity
                if not it.red:
                    continue
                n = it.node
                init = _f(float("-inf")) if n.op == "max" else _f(0.0)
                if split and self.row_local(n):
                    acc = f"{self.names[id(n)]}_acc"
                    pre += [f"for i_w in T.vectorized({self.width(inner)}):",
                            f"    {acc}[i_w] = {init}"]
                    terms = [f"{acc}[{i}]" for i in range(self.width(inner))]
                    post.append(f"{self.names[id(n)]}[{self.idx(n.dims, self.env(n.dims))}] = "
                                f"{_fold(terms, n.op)}")
                elif split and inner in n.attr("over"):
                    e = self.env(n.dims)
                    lead = self.lidx(n.dims, e) + (", " if n.dims else "")
                    lines += self.loops(n.dims, [f"for i_w in T.vectorized("
                                                 f"{self.width(inner)}):", f"    "
                                                 f"{self.names[id(n)]}_acc[{lead}i_w] = {init}"],
                                        ind, vector_last=False)
                else:
                    lines += self.loops(n.dims, [f"{self.names[id(n)]}["
                                                 f"{self.idx(n.dims, self.env(n.dims))}] = "
                                                 f"{init}"], ind)
            e = self.env(dom)
            if split:
                e[inner] = f"((o_{inner} * {self.width(inner) // self.lanes} + i_u) * {self.lanes} + i_lane)"
            body: list[str] = []
            self.lets = (dom, [])
            for it in grp:
                body.append(self.item_code(it, e, split and it.red and
                                           inner in it.node.attr("over")))
            lets, self.lets = self.lets[1], None
            lines += self.nest(dom, body, ind, split, not lane_red or split, lets, pre, post)
            for it in lane_red if split else []:   # lanes summed
                n = it.node
                if self.row_local(n):
                    continue
                en = self.env(n.dims)
                acc = f"{self.names[id(n)]}_acc"
                lead = self.lidx(n.dims, en) + (", " if n.dims else "")
                terms = [f"{acc}[{lead}{i}]" for i in range(self.width(inner))]
                val = terms[0]
                for t in terms[1:]:
                    val = (f"T.max({val}, {t})" if n.op == "max" else f"({val} + {t})")
                lines += self.loops(n.dims, [f"{self.names[id(n)]}[{self.idx(n.dims, en)}] = "
                                             f"{val}"], ind)
        return lines

    def nest(self, dims, body: list[str], ind: int, split: bool, vector: bool,
             lets: list[tuple[int, str, str]], pre: list[str] = (),
             post: list[str] = ()) -> list[str]:
        """The loops over ``dims`` around ``body``, each hoisted load bound at its level;
        ``split``: the innermost dim runs as (outer, unrolled partial sums, vector lanes),
        with ``pre`` and ``post`` around it (inside the outer dims' loops)."""
        pad = "    " * ind
        out = [f"{pad}{name}: T.let = {text}" for lv, name, text in lets if lv == 0]
        for k, d in enumerate(dims):
            if k == len(dims) - 1 and split:
                w = self.width(d)
                out += [pad + x for x in pre]
                out += [f"{pad}for o_{d} in T.serial({self.sizes[d] // w}):",
                        f"{pad}    for i_u in T.unroll({w // self.lanes}):",
                        f"{pad}        for i_lane in T.vectorized({self.lanes}):"]
                return out + [pad + "            " + b for b in body] + [pad + x for x in post]
            kind = "T.vectorized" if vector and k == len(dims) - 1 and \
                self.sizes[d] <= self.knobs["vectorize"] else "T.serial"
            out.append(f"{pad}for i_{d} in {kind}({self.sizes[d]}):")
            pad += "    "
            out += [f"{pad}{name}: T.let = {text}" for lv, name, text in lets if lv == k + 1]
        return out + [pad + b for b in body]

    def lidx(self, dims, env: dict[str, str]) -> str:
        """Index into the kernel's own buffers over ``dims`` (the partial sums' ``_acc``);
        a host whose whole buffers are indexed at an offset (``tvm.columns``) overrides
        ``gidx``, not this."""
        return self.gidx(dims, env)

    def row_local(self, n: Node) -> bool:
        """A reduction along the innermost dim only, keeping the outer ones: its partial
        sums live in registers for one row of the nest and are folded at the row's end."""
        over = n.attr("over") or ()
        dom = self.p.canonical(set(n.dims) | set(over))
        return bool(n.dims) and len(over) == 1 and dom[-1] == over[0] and \
            self.sizes[over[0]] % self.lanes == 0

    def width(self, d: str) -> int:
        """Partial sums kept per row of a reduction along ``d`` (the innermost dim): a few
        vectors, used in turn, so consecutive updates do not wait on each other."""
        for u in (4, 2, 1):
            if self.sizes[d] % (u * self.lanes) == 0:
                return u * self.lanes
        return self.lanes  # pragma: no cover - callers check the size divides by lanes

    def item_code(self, it: "_Item", e: dict[str, str], lanes: bool) -> str:
        n = it.node
        if it.render is not None:
            return it.render(e)
        if it.target is not None:          # an output
            val = _f(0.0) if it.value is None else self.expr(it.value, e)
            tgt = it.target(e)
            return f"{tgt} = {tgt} + {val}" if it.add else f"{tgt} = {val}"
        if not it.red:
            return f"{self.names[id(n)]}[{self.idx(n.dims, e)}] = {self.expr_inline(n, e)}"
        if n.op == "contract":
            val = self._product(n, e)
        else:
            val = self.expr(n.args[0], e)
        if lanes and self.row_local(n):
            tgt = f"{self.names[id(n)]}_acc[i_u * {self.lanes} + i_lane]"
        elif lanes:
            tgt = (f"{self.names[id(n)]}_acc[{self.lidx(n.dims, e)}{', ' if n.dims else ''}"
                   f"i_u * {self.lanes} + i_lane]")
        else:
            tgt = f"{self.names[id(n)]}[{self.idx(n.dims, e)}]"
        if n.op == "max":
            return f"{tgt} = T.max({tgt}, {val})"
        return f"{tgt} = {tgt} + {val}"

    def hoist(self, load: str, dims) -> str:
        """In a loop nest, a load that does not vary along the innermost dim is bound once,
        at the outermost loop it varies with (a let: the compiler cannot prove the stores of
        the nest leave it unchanged, so it would reload it every iteration)."""
        if self.lets is None:
            return load
        dom, lets = self.lets
        level = max((i + 1 for i, d in enumerate(dom) if d in dims), default=0)
        if level == len(dom):
            return load
        for lv, name, text in lets:
            if text == load:
                return name
        name = f"v{self.nlet}"
        self.nlet += 1
        lets.append((level, name, load))
        return name


def _fold(terms: list[str], op: str) -> str:
    """The terms combined pairwise as a vector fold (i with i + half): independent adds."""
    comb = (lambda a, b: f"T.max({a}, {b})") if op == "max" else (lambda a, b: f"({a} + {b})")
    while len(terms) > 1:
        half = len(terms) // 2
        terms = [comb(terms[i], terms[i + half]) for i in range(half)] + terms[2 * half:]
    return terms[0]
