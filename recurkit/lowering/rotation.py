"""Rotations in the transition (``rk.rotate`` on the state): the rotating frame.

A step that rotates its state in pairs along a dim K, ``S' = D R(theta_t) S + k v^T`` with
``R`` block-diagonal 2 x 2 rotations (a complex-diagonal transition: Mamba-3, GateLoop), is a
rotation-free recurrence in the frame that turns with it. All the rotations of one dim
commute, so with ``Theta_t`` the cumulative angle of a segment and ``Theta_T`` its last,

    S~_t = R(Theta_T - Theta_t) S_t      (S~_T = S_T: the final state needs no turning back)

runs ``S~' = D S~ + (R(-(Theta_t - Theta_T)) k) v^T`` and reads ``o = (R(...) q)^T S~``: every
K-side vector that meets the state is turned by minus the angle the state has where it
meets it (like RoPE), the initial state by ``Theta_T``, and inner products are unchanged.
The frame holds where the step commutes with the rotation: K-carrying values are added,
scaled by factors without K or constant on each pair (``rk.pairs``), contracted and
rotated, and nothing else (a per-K gate, a nonlinearity of a K-carrying state value) touches
them. ``frame(program)`` builds the rotation-free declaration ``<name>_rotating`` (the turned
vectors, and every other rotated or paired state-free value, become its token inputs) or
says why the frame does not hold; the host side is ``backends/shared/rotation.py``.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field

from ..ir.node import BINARY, COMPARE, F32, PAIRED, UNARY, Node, depends_on_state
from ..ir.program import InputSpec, Program
from ..ir.verify import verify_program

Offset = dict   # angle node id -> coefficient: a sum of the step's angles


@dataclass
class Level:
    """The angle of a value's frame: ``sum(c * angle)`` over the step's rotation angles,
    plus the angle of the old state's frame where ``anchored``."""
    anchored: bool
    terms: tuple[tuple[Node, int], ...] = ()

    @property
    def zero(self) -> bool:
        return not self.anchored and not self.terms


@dataclass
class Frame:
    source: Program
    program: Program                  # the rotation-free declaration
    dim: str | None                   # the rotated dim (None: no rotation of the state)
    pair: str | None                  # the angles' pair dim (None: one angle for all pairs)
    layout: str = "interleaved"
    # input of ``program`` -> (the source's state-free value, the level it is turned back by)
    hoisted: dict[str, tuple[Node, Level]] = field(default_factory=dict)
    total: tuple[tuple[Node, int], ...] = ()   # the step's rotation of the state
    out_level: Level | None = None             # the output turned forward by it (None: not)

    @property
    def rotates_state(self) -> bool:
        return bool(self.total)

    def describe(self) -> str:
        if self.dim is None:
            return "its rotated values are computed ahead of the kernels"
        n = len(self.hoisted)
        return (f"runs in the frame rotating along {self.dim} ({n} value{'s' * (n != 1)} "
                f"turned{', the output turned back' if self.out_level else ''})")


class _Refused(Exception):
    pass


class _Levels:
    """Union-find of the K-carrying values, each with its angle relative to its root."""

    def __init__(self):
        self.parent: dict[int, int] = {}
        self.off: dict[int, Offset] = {}

    def find(self, x: int) -> tuple[int, Offset]:
        self.parent.setdefault(x, x)
        self.off.setdefault(x, {})
        if self.parent[x] == x:
            return x, {}
        r, o = self.find(self.parent[x])
        tot = _plus(self.off[x], o)
        self.parent[x], self.off[x] = r, tot
        return r, tot

    def union(self, x: int, y: int, d: Offset, why: str) -> None:
        """level(x) = level(y) + d."""
        rx, ox = self.find(x)
        ry, oy = self.find(y)
        if rx == ry:
            if _plus(oy, d) != ox:
                raise _Refused(why)
            return
        self.parent[rx], self.off[rx] = ry, _plus(_plus(oy, d), _neg(ox))


def _plus(a: Offset, b: Offset) -> Offset:
    out = dict(a)
    for k, v in b.items():
        out[k] = out.get(k, 0) + v
    return {k: v for k, v in out.items() if v}


def _neg(a: Offset) -> Offset:
    return {k: -v for k, v in a.items()}


def has_rotation(p: Program) -> bool:
    return any(n.op in PAIRED for n in p.nodes())


_FRAMES: "weakref.WeakKeyDictionary[Program, Frame | str]" = weakref.WeakKeyDictionary()


def frame(p: Program) -> Frame | str:
    """The rotating frame of ``p`` (which has ``rk.rotate`` or ``rk.pairs`` somewhere), or
    why its rotations do not commute with the rest of the step. One per program (its
    rotation-free declaration is then one object, for the caches keyed by it)."""
    if p not in _FRAMES:
        try:
            _FRAMES[p] = _frame(p)
        except _Refused as e:
            _FRAMES[p] = f"the rotation does not commute with the step: {e}"
    return _FRAMES[p]


def _frame(p: Program) -> Frame:
    nodes = p.nodes()
    dep = depends_on_state(nodes)
    state = next(n for n in nodes if n.role == "state")
    turns = [n for n in nodes if n.op == "rotate" and dep[id(n)]]
    if any(dep[id(n)] for n in nodes if n.op == "pairs"):
        n = next(n for n in nodes if n.op == "pairs" and dep[id(n)])
        raise _Refused(f"rk.pairs of a state value at {n.loc}")
    K = turns[0].attr("dim") if turns else None
    pair, layout = (turns[0].attr("pair"), turns[0].attr("layout")) if turns else (None, "")
    for n in turns:
        if (n.attr("dim"), n.attr("layout")) != (K, layout):
            raise _Refused(f"the state turns along {n.attr('dim')} ({n.attr('layout')}) at "
                           f"{n.loc} and along {K} ({layout}) elsewhere")
        a = n.args[1]
        if dep[id(a)]:
            raise _Refused(f"the angle at {n.loc} depends on the state")
        if n.attr("pair") != pair and n.attr("pair") is not None and pair is not None:
            raise _Refused(f"angles over pairs {n.attr('pair')} and {pair}")
        pair = pair or n.attr("pair")
        if set(a.dims) - {n.attr("pair")}:
            raise _Refused(f"the angle at {n.loc} varies along {list(a.dims)}, beyond the "
                           "pairs: the rotation is not one for the whole state")
    lv = _Levels()
    meets: dict[int, Node] = {}    # state-free K-carrying values the frame turns
    angles: dict[int, Node] = {}

    def framed(a: Node) -> bool:   # a K-carrying value whose frame matters
        return K in a.dims and (dep[id(a)] or not _pair_constant(a, K, layout))

    for n in nodes:
        if K is None or not dep[id(n)] or n.op == "input":
            continue
        ks = [a for a in n.args if framed(a)]
        if K not in n.dims and not ks:
            continue
        where = f"rk.{n.op} at {n.loc}"

        def join(a: Node, d: Offset | None = None) -> None:
            if not dep[id(a)]:
                meets[id(a)] = a
            lv.union(id(n), id(a), d or {}, f"{where} combines values in different frames")

        if n.op == "rotate":
            x, ang = n.args
            if not dep[id(x)]:
                raise _Refused(f"{where}: a state-free value turned by a state angle")
            join(x, {id(ang): 1})
            angles[id(ang)] = ang
        elif n.op in ("add", "sub", "neg"):
            if any(K not in a.dims for a in n.args):
                raise _Refused(f"{where} broadcasts a value over {K}")
            for a in n.args:
                join(a)
        elif n.op in ("mul", "div"):
            if len(ks) != 1 or (n.op == "div" and ks[0] is not n.args[0]):
                raise _Refused(f"{where} scales a value along {K} by a factor that is not "
                               f"constant on each pair (a per-{K} gate; rk.pairs declares one "
                               "that is)")
            join(ks[0])
        elif n.op == "contract":
            over = n.attr("over")
            if K in over:
                a, b = n.args
                if not (framed(a) and framed(b)):
                    raise _Refused(f"{where} contracts {K} with a value constant on pairs")
                for x in (a, b):
                    if not dep[id(x)]:
                        meets[id(x)] = x
                lv.union(id(a), id(b), {}, f"{where} contracts values in different frames")
            elif len(ks) == 1:
                join(ks[0])
            else:   # a value constant on pairs meets the state: no frame turns it
                raise _Refused(f"{where} carries {K} from a value constant on pairs, which "
                               "a turn does not leave constant")
        elif n.op == "sum" and K not in n.attr("over"):
            join(n.args[0])
        else:
            raise _Refused(f"{where} of a value along {K} (only sums, scalings, contractions "
                           "and rotations keep the frame)")
    total: Offset = {}
    if K is not None and K in state.dims:
        new = p.new_state
        if not dep[id(new)]:
            raise _Refused("the new state does not carry the old one")
        if lv.find(id(new))[0] != lv.find(id(state))[0]:
            lv.union(id(new), id(state), {}, "")
        total = _plus(lv.find(id(new))[1], _neg(lv.find(id(state))[1]))
    root = lv.find(id(state))[0] if K is not None else None

    def level(x: Node) -> Level:
        r, o = lv.find(id(x))
        if r == root:
            o = _plus(o, _neg(lv.find(id(state))[1]))
        return Level(r == root, tuple((angles[i], c) for i, c in sorted(
            o.items(), key=lambda kv: list(angles).index(kv[0]))))

    out = p.output
    out_level = level(out) if K is not None and dep[id(out)] and K in out.dims else None
    if out_level is not None and out_level.zero:
        out_level = None
    return _rebuild(p, dep, K, pair, layout, meets, level, out_level,
                    tuple((angles[i], c) for i, c in total.items()))


def _pair_constant(a: Node, K: str, layout: str) -> bool:
    """A state-free value constant on each pair along K (so it commutes with the rotation)."""
    if K not in a.dims or a.op == "const":
        return True
    if a.op == "pairs":
        return a.attr("dim") == K and a.attr("layout") == layout
    if a.op in UNARY or a.op in BINARY or a.op in COMPARE or a.op == "where":
        return all(_pair_constant(x, K, layout) for x in a.args)
    return False


def _rebuild(p: Program, dep: dict, K, pair, layout, meets: dict[int, Node], level,
             out_level: Level | None, total) -> Frame:
    """The rotation-free declaration: the values the frame turns, and every state-free
    rotated or paired value, as new token inputs; rotations of the state dropped."""
    taken = {s.name for s in p.inputs}
    specs = list(p.inputs)
    hoisted: dict[str, tuple[Node, Level]] = {}
    memo: dict[int, Node] = {}
    has = {}

    def paired(n: Node) -> bool:
        if id(n) not in has:
            has[id(n)] = n.op in PAIRED or any(paired(a) for a in n.args)
        return has[id(n)]

    def new_input(src: Node, lev: Level, stem: str) -> Node:
        j = 0
        while f"{stem}{j}" in taken:
            j += 1
        name = f"{stem}{j}"
        taken.add(name)
        specs.append(InputSpec(name, "token", src.dims))
        hoisted[name] = (src, lev)
        return Node("input", (), src.dims, F32, (("role", "token"), ("index", len(specs) - 1),
                                                 ("name", name)), src.loc)

    def free(n: Node) -> Node:   # a state-free value, its rotated or paired parts hoisted
        if id(n) in memo:
            return memo[id(n)]
        if id(n) in meets and not level(n).zero:
            out = turn(n, level(n))
        elif n.op in PAIRED:
            out = new_input(n, Level(False), "rotated_" if n.op == "rotate" else "paired_")
        else:
            out = _copy(n, free) if paired(n) else n
        memo[id(n)] = out
        return out

    turned: dict[tuple, Node] = {}

    def turn(n: Node, lev: Level) -> Node:
        """``n`` turned by minus ``lev``: the turn taken down to the K-carrying factors (a
        write ``outer(k, v)`` stays one, of the turned k), hoisted where it stops."""
        key = (id(n), lev.anchored, tuple((id(a), c) for a, c in lev.terms))
        if key in turned:
            return turned[key]
        ks = [a for a in n.args if K in a.dims and not _pair_constant(a, K, layout)]
        over = n.attr("over") or ()
        if K not in n.dims:
            out = free(n)
        elif n.op in ("add", "sub", "neg") and all(K in a.dims for a in n.args):
            out = _copy(n, lambda a: turn(a, lev))
        elif (n.op == "mul" or (n.op == "div" and ks and ks[0] is n.args[0]) or
              (n.op in ("contract", "sum") and K not in over)) and len(ks) == 1:
            out = _copy(n, lambda a: turn(a, lev) if a is ks[0] else free(a))
        else:
            out = new_input(n, lev, "turned_")
        turned[key] = out
        return out

    def build(n: Node) -> Node:
        if not dep[id(n)]:
            return free(n)
        if id(n) in memo:
            return memo[id(n)]
        if n.op == "rotate":
            out = build(n.args[0])
        elif n.op == "input":
            out = n
        else:
            out = _copy(n, build)
        memo[id(n)] = out
        return out

    new_state = build(p.new_state)
    output = build(p.output)
    prog = Program(f"{p.name}_rotating", p.dims, tuple(specs), output, new_state, p.loc)
    verify_program(prog)
    return Frame(p, prog, K, pair, layout or "interleaved", hoisted, total, out_level)


def _copy(n: Node, f) -> Node:
    args = tuple(f(a) for a in n.args)
    if all(x is y for x, y in zip(args, n.args)):
        return n
    return Node(n.op, args, n.dims, n.dtype, n.attrs, n.loc)
