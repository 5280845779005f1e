"""The prologue of the Triton chunk kernels, computed where it is used.

A chunk stage reads per-token values (the tile program's prologue: gates, scaled queries,
keys times betas, ...) as blocks over the chunk's positions. They are computed in the kernel
from the call's own tensors, read in their own dtype (bf16, fp16, fp32) and converted in
registers, by rendering the prologue's IR: elementwise ops, constants, scalars, the head
index and reductions (sums, maxima, contractions: a norm's sum over K) in the kernel; what
is left (a reduction over the state's last dim, which a program may hold only a block of; a
gather) is evaluated on the host once, as an fp32 [B, T, H, *dims] feed, and read like an
input. Positions past the
end of a sequence and padded lanes of a dim are 0, as in the packed layout the other backends
use.

Tokens are addressed in the call's layout, [B, T, H, *dims] (or the packed varlen [1, T, H,
*dims] with ``cu_seqlens``): the first token of chunk c of sequence n is ``bos + c C``.
"""
from __future__ import annotations

from ...ir.node import BINARY, COMPARE, UNARY, Node, toposort
from .sequential import TRITON_BINARY, TRITON_UNARY, lit, power

ELEMENTWISE = set(UNARY) | set(BINARY) | set(COMPARE) | {"where"}
REDUCE = ("sum", "max", "contract")


class ChunkIO:
    """What the chunk kernels read from a call: the inputs used raw, the host-side feeds and
    the scalars, for one tile program's prologue."""

    def __init__(self, program, prologue: dict[str, Node]):
        self.program = program
        sd = tuple(program.state.dims) if program.state is not None else ()
        self.split_dim = sd[-1] if sd else None   # the dim a kernel may split over programs
        self.values = dict(prologue)
        self.inputs: list[Node] = []    # token / param inputs, read from the call's tensors
        self.feeds: list[Node] = []     # evaluated on the host, [B, T, H, *dims] fp32
        self.scalars: list[Node] = []   # scalar inputs, kernel arguments
        self.kernels: list[dict] = []   # per kernel: what it loads, stores and multiplies
        self.input_grads: list[str] | None = None   # inputs whose gradients a backward's
                                                    # kernels store (O0, O1, ... in order)
        # grouped heads: input index -> G, inputs read at head h // G (``chunk_source``)
        self.groups: dict[int, int] = {}
        self.segments = 1   # the state passes' segments (``chunk_source``)
        self.maps_in_kernel = False   # segments: the local kernel makes the segments' maps
        self.kind: dict[int, tuple[str, int]] = {}
        self.index: dict[int, int] = {}   # a stable name per node, for the generated source
        stops = {id(n) for n in toposort(list(self.values.values()))
                 if not self._in_kernel(n)}   # the host evaluates these whole
        for n in toposort(list(self.values.values()), stop=stops):
            self.index.setdefault(id(n), len(self.index))
            if id(n) in self.kind:
                continue
            if n.op == "input" and n.role in ("token", "param"):
                self.kind[id(n)] = ("input", len(self.inputs))
                self.inputs.append(n)
            elif n.op == "input" and n.role == "scalar":
                self.kind[id(n)] = ("scalar", len(self.scalars))
                self.scalars.append(n)
            elif n.op == "input" and n.role == "d_out":   # a cotangent, given by the host
                self.kind[id(n)] = ("feed", len(self.feeds))
                self.feeds.append(n)
            elif n.op == "input" and n.role == "cotangent":   # a value of the stage
                self.kind[id(n)] = ("tile", 0)
            elif n.op == "input" and n.role == "head":
                self.kind[id(n)] = ("head", 0)
            elif self._in_kernel(n):
                self.kind[id(n)] = (n.op, 0)
            else:
                self.kind[id(n)] = ("feed", len(self.feeds))
                self.feeds.append(n)

    def _in_kernel(self, n: Node) -> bool:
        """Inputs, constants, elementwise ops, and reductions not over the dim a kernel may
        split: what the kernels compute."""
        return n.op in ("input", "const") or n.op in ELEMENTWISE or (
            n.op in REDUCE and self.split_dim not in n.attr("over"))

    def has_token(self, n: Node, memo: dict[int, bool] | None = None) -> bool:
        """Whether ``n`` varies per token (its block has the position axis)."""
        memo = {} if memo is None else memo
        if id(n) not in memo:
            k = self.kind.get(id(n), ("",))[0]
            if k in ("feed", "tile"):
                memo[id(n)] = True
            elif k == "input":
                memo[id(n)] = n.role == "token"
            else:
                memo[id(n)] = any(self.has_token(a, memo) for a in n.args)
        return memo[id(n)]


class PrologueRender:
    """Mixin of the chunk stage generator: reads prologue values and the call's inputs, and
    stores the program's output, in token addressing. Uses the generator's ``io``, ``sizes``,
    ``var``/``axes``, ``emit``, ``ar``, ``block``, ``size``, ``to``, ``strided``,
    ``dim_masks``, ``full``, ``note``, ``kctx``, ``hoist``, ``split`` and ``used`` (the
    kernel arguments read).

    ``relaid``: token addresses and masks are rendered in a second, equivalent form (a scalar
    row plus 32-bit offsets within the chunk; ``tok0 + i < eos``). A stage split by a loop
    over blocks of V (``state_loop``), or with a blocked contraction's loop over K
    (``blocked``), renders what follows the loop so: the compiler cannot
    then merge those addresses and masks with the ones made before the loop, which would
    keep them live (in registers) through it."""

    relaid = False

    def dims_of(self, n: Node) -> tuple[str, ...]:
        """The dims of an input in its tensor's memory order (declared order)."""
        return tuple(self.io.program.inputs[n.attr("index")].dims)

    def valid(self, axes: tuple[str, ...]) -> str | None:
        """Lanes of a block over ``axes`` that hold a real token and real dim entries."""
        i = self.ar('i', axes) if "i" in axes else None
        ms = [] if i is None else [f"(tok0 + {i} < eos)" if self.relaid else f"({i} < rem)"]
        return " & ".join(ms + self.dim_masks(axes, skip=("i",))) or None

    def token_offset(self, axes: tuple[str, ...], numel: int, G: int = 1) -> str:
        """Offsets of a block over ``axes`` (i first, then dims in memory order) into a
        [tokens, H, *dims] tensor (with ``G`` > 1: [tokens, H / G, *dims], head h reading
        its group's, h // G: grouped heads read without a copy)."""
        H, hd = (self.H, "h") if G == 1 else (self.H // G, f"(h // {G})")
        i, row = self.ar('i', axes), H * numel
        within = "" if len(axes) == 1 else f" + {self.strided(axes[1:], axes)[0]}"
        if self.relaid and self.block("i") * row < 2 ** 31:
            # the chunk's first row (a scalar) plus 32-bit offsets within the chunk
            head = f"(tok0 * {H} + {hd}) * {numel}" if numel != 1 else f"(tok0 * {H} + {hd})"
            return f"{head} + ({i} * {row}{within})"
        return f"((tok0 + {i}) * {H} + {hd}) * {numel}{within}"

    def _key(self, n: Node, axes: tuple[str, ...]) -> str:
        k = self.kctx[0] if self.kctx and self.kctx[0] in axes else ""
        return f"@n{self.io.index[id(n)]}{'_' + k if k else ''}"

    def node_axes(self, n: Node) -> tuple[str, ...]:
        dims = self.dims_of(n) if self.io.kind[id(n)][0] == "input" else tuple(n.dims)
        return (("i",) if self.io.has_token(n, self._tok) else ()) + dims

    def node(self, n: Node, ind: int) -> str:
        """Render IR node ``n`` of the prologue; returns its key in ``var``/``axes``."""
        axes = self.node_axes(n)
        key = self._key(n, axes)
        if key in self.var:
            return key
        if self.kctx and self.kctx[0] not in axes and self.hoist is not None:
            return self._hoisted(n)
        kind, k = self.io.kind[id(n)]
        if kind == "tile":   # a value the stage computed (a backward's cotangent)
            name = n.attr("name")
            self.emit(key, axes, self.to(name, axes), ind)
            return key
        if kind in ("input", "feed"):
            ptr = f"X{k}" if kind == "input" else f"F{k}"
            self.used.add(ptr)
            dims = axes[1:] if "i" in axes else axes
            within, numel = self.strided(dims, axes)
            G = self.io.groups.get(n.attr("index"), 1) if kind == "input" else 1
            if "i" in axes:
                off = self.token_offset(axes, numel, G)
            else:   # a per-head parameter [H, *dims] (grouped: [H / G, *dims])
                off = f"{'h' if G == 1 else f'(h // {G})'} * {numel}" + (
                    f" + {within}" if dims else "")
            m = self.valid(axes)
            mk = f", mask={m}, other=0.0" if m else ""
            self.note("r", ptr, axes, ind, by_token="i" in axes)
            self.emit(key, axes, f"tl.load({ptr} + {off}{mk}).to(tl.float32)", ind)
            return key
        if kind == "scalar":
            self.used.add(f"SC{k}")
            self.var[key], self.axes[key] = f"SC{k}", ()
            return key
        if kind == "head":
            self.var[key], self.axes[key] = "h.to(tl.float32)", ()
            return key
        if kind == "const":
            self.var[key], self.axes[key] = lit(n.attr("value")), ()
            return key
        if self._constant(n):
            self.var[key], self.axes[key] = lit(self._fold(n)), ()
            return key
        args = [self.node(a, ind) for a in n.args]
        if n.op in REDUCE:
            return self._reduction(n, key, args, ind)
        xs = [self.to(a, axes) for a in args]
        if n.op == "pow":
            expr = power(xs[0], n.args[1], xs[1])
        elif n.op in TRITON_UNARY:
            expr = TRITON_UNARY[n.op].format(*xs)
        elif n.op == "where":
            expr = f"tl.where({xs[0]}, {xs[1]}, {xs[2]})"
        else:
            expr = TRITON_BINARY[n.op].format(*xs)
        if not axes:   # scalars only (kernel arguments, the head index): inline
            self.var[key], self.axes[key] = f"({expr})", ()
            return key
        self.emit(key, axes, expr, ind)
        return key

    def _reduction(self, n: Node, key: str, args: list[str], ind: int) -> str:
        """sum / max over dims, or a contraction (the sum of a product), of blocks whose
        padded lanes and absent tokens are first set to the reduction's identity."""
        union: list[str] = []
        for a in args:
            union += [x for x in self.axes[a] if x not in union]
        union.sort(key=lambda x: (x != "i", x))
        have = tuple(union)
        x = f"({' * '.join(self.to(a, have) for a in args)})" if n.op == "contract" else \
            self.to(args[0], have)
        fill, fn = ('float("-inf")', "_max") if n.op == "max" else ("0.0", "_add")
        m = self.valid(have)
        x = f"tl.where({m}, {x}, {self.full(have, fill)})" if m else x
        for d in sorted(n.attr("over"), key=have.index, reverse=True):
            x = f"tl.reduce({x}, {have.index(d)}, {fn})"
            have = tuple(a for a in have if a != d)
        if not have:
            self.var[key], self.axes[key] = x, ()
            return key
        self.emit(key, have, x, ind)
        return key

    def _hoisted(self, n: Node) -> str:
        """A node without the blocked axis, needed inside a blocked loop: rendered before the
        loop (once, not once per block) and kept after it."""
        at, ind = self.hoist
        body, kctx = self.L, self.kctx
        self.L, self.kctx = [], None
        try:
            key = self.node(n, ind)
        finally:
            lines, self.L, self.kctx = self.L, body, kctx
        self.L[at:at] = lines
        self.hoist = (at + len(lines), ind)
        self.hoisted.add(key)
        return key

    def _constant(self, n: Node) -> bool:
        return n.op == "const" or (n.op != "input" and bool(n.args) and
                                   all(self._constant(a) for a in n.args))

    @staticmethod
    def _fold(n: Node) -> float:
        """The value of a subtree of constants, computed as the reference does (fp32)."""
        import torch

        from ...ir.interpret import apply_node

        def ev(x: Node):
            if x.op == "const":
                return torch.tensor(float(x.attr("value")))
            return apply_node(x, [ev(a) for a in x.args], 0)
        return float(ev(n))

    def prologue_value(self, name: str, ind: int) -> None:
        """The prologue value ``name`` as a block over (i, *dims), 0 where no token is."""
        n = self.io.values[name]
        want = ("i", *n.dims)
        key = self.node(n, ind)
        m = self.valid(want)
        if self.axes[key] == want and (m is None or n.op == "input"):   # loads are masked
            self.var[name], self.axes[name] = self.var[key], want
            return
        x = self.to(key, want) if self.axes[key] else self.var[key]
        self.emit(name, want, f"tl.where({m or 'True'}, {x} + {self.full(want)}, 0.0)", ind)

    def store_output(self, name: str, ind: int, ptr: str = "O", od=None) -> None:
        """A per-token result (the program's output), into ``ptr`` [tokens, H, *od] (by
        default the output's dims) in its dtype."""
        od = tuple(self.io.program.output.dims) if od is None else tuple(od)
        want = ("i", *od)
        have = self.axes[name]
        x = self.to(name, want) if set(have) <= set(want) else self.var[name]
        if tuple(have) != want:
            x = f"({x} + {self.full(want)})"
        off = self.token_offset(want, self.strided(od, want)[1])
        m = self.valid(want)
        if self.split and self.split not in want:
            first = f"(({off}) * 0 + pv == 0)"
            m = f"({m}) & {first}" if m else first
        self.used.add(ptr)
        self.note("w", ptr, want, ind, by_token=True)
        self.L.append("    " * ind + f"tl.store({ptr} + {off}, {x}.to({ptr}.dtype.element_ty)"
                      f"{', mask=' + m if m else ''})")

    def store_late(self, ind: int) -> None:
        """Store each ``late`` value whose stage values all exist now (so that they need
        not stay live to the end of the kernel)."""
        from ...ir.node import toposort
        if self.late and self.split:
            raise RuntimeError(f"{self.st.name}: a split stage cannot store per-token sums")
        for item in list(self.late):
            ptr, n, od = item
            leaves = [x.attr("name") for x in toposort([n])
                      if x.op == "input" and x.role == "cotangent"]
            if all(x in self.var for x in leaves):
                self.store_output(self.node(n, ind), ind, ptr, od)
                self.late.remove(item)
