"""Triton source for the forms that walk the tokens: sequential (any declaration) and scan.

Every value of the step is a block over *all* the program's dims, in canonical order, with
size 1 where the value lacks a dim, so Triton's broadcasting is the IR's broadcasting by name.
Dims are padded to powers of two; padded lanes are masked out of every reduction, of the
state and of every store, so whatever they hold never reaches a result.
"""
from __future__ import annotations

from ...ir.node import BINARY, COMPARE, UNARY, Node, depends_on_state, toposort

HEADER = '''import torch
import triton
import triton.language as tl


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _max(a, b):
    return tl.maximum(a, b)
'''

# Only builtins of triton.language (no tl.sum / tl.sigmoid, which are library @jit functions):
# the same module then runs under the interpreter and compiles for a GPU in one process.
TRITON_UNARY = {"neg": "(-{0})", "exp": "tl.exp({0})", "log": "tl.log({0})",
                "sigmoid": "(1.0 / (1.0 + tl.exp(-{0})))",
                "tanh": "(2.0 / (1.0 + tl.exp(-2.0 * {0})) - 1.0)",
                "sqrt": "tl.sqrt({0})", "rsqrt": "tl.rsqrt({0})", "abs": "tl.abs({0})",
                "relu": "tl.maximum({0}, 0.0)", "silu": "({0} / (1.0 + tl.exp(-{0})))",
                "softplus": "(tl.maximum({0}, 0.0) + tl.log(1.0 + tl.exp(-tl.abs({0}))))"}
TRITON_BINARY = {"add": "({0} + {1})", "sub": "({0} - {1})", "mul": "({0} * {1})",
                 "div": "({0} / {1})", "maximum": "tl.maximum({0}, {1})",
                 "minimum": "tl.minimum({0}, {1})", "lt": "({0} < {1})", "le": "({0} <= {1})",
                 "gt": "({0} > {1})", "ge": "({0} >= {1})", "eq": "({0} == {1})",
                 "ne": "({0} != {1})"}
FLUSH = "1e-20"   # decay factors below this are 0, as in the torch and TVM backends


def pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def lit(v: float) -> str:
    v = float(v)
    if v != v:
        return 'float("nan")'
    if v in (float("inf"), float("-inf")):
        return f'float("{"-" if v < 0 else ""}inf")'
    return repr(v)


def power(base: str, exp_node: Node, exp: str) -> str:
    """a ** b: repeated products for small integer constants (exact for negative bases),
    exp(b log a) otherwise (a must be positive; NaN otherwise, as torch.pow with a
    fractional exponent)."""
    if exp_node.op == "const":
        v = float(exp_node.attr("value"))
        if v == int(v) and 0 <= v <= 4:
            return "(" + " * ".join([base] * int(v)) + ")" if v else "1.0"
        if v == 0.5:
            return f"tl.sqrt({base})"
        if v == -0.5:
            return f"tl.rsqrt({base})"
    return f"tl.exp({exp} * tl.log({base}))"


class SeqGen:
    """The sequential form: one program per (sequence, head[, block of the last state dim])
    loops over its tokens, the state a register block; state-free reductions (norms) come in
    as per-token buffers, state-free elementwise math is recomputed in the kernel."""

    def __init__(self, p, sizes: dict[str, int], H: int, block_v: int = 64):
        self.p, self.sizes, self.H = p, dict(sizes), H
        self.dims = tuple(p.dims) or ("one_",)
        self.sizes.setdefault("one_", 1)
        nodes = toposort([p.output, p.new_state])
        self.dep = depends_on_state(nodes)
        self.state = next(n for n in nodes if n.role == "state")
        # the last state dim splits over programs when nothing that reads the state reduces
        # over it (each column of the state then evolves on its own)
        last = p.state.dims[-1] if p.state.dims else None
        reduced = {d for n in nodes if self.dep[id(n)] and n.op in ("contract", "sum", "max")
                   for d in n.attr("over")}
        # a rotation reads each lane's partner: its dim stays whole in one program
        reduced |= {n.attr("dim") for n in nodes if self.dep[id(n)] and n.op == "rotate"}
        # a rotation's angle is loaded at each lane of the rotated dim (its pair's)
        angles = {id(n.args[1]) for n in nodes if self.dep[id(n)] and n.op == "rotate"}
        self.split = last if last is not None and last not in reduced else None
        self.block = {d: pow2(self.sizes[d]) for d in self.dims}
        if self.split:
            self.block[self.split] = min(pow2(block_v), self.block[self.split])
        self.nsplit = -(-self.sizes[self.split] // self.block[self.split]) if self.split else 1
        self.feeds: list[Node] = []
        self.body: list[Node] = []   # computed in the loop, in order
        for n in nodes:
            if n.role == "state" or n.op == "const":
                continue
            elementwise = n.op in UNARY or n.op in BINARY or n.op in COMPARE or n.op == "where"
            if self.dep[id(n)] or (elementwise and id(n) not in angles):
                self.body.append(n)
            else:
                self.feeds.append(n)
        self.name = {id(f): f"f{i}" for i, f in enumerate(self.feeds)}   # loaded per token
        for i, n in enumerate(self.body):
            self.name[id(n)] = f"v{i}"

    # --- blocks over the canonical dims ----------------------------------------------------
    def ar(self, d: str) -> str:
        k, R = self.dims.index(d), len(self.dims)
        sl = "[" + ", ".join(":" if i == k else "None" for i in range(R)) + "]"
        base = f"tl.arange(0, {self.block[d]})"
        if d == self.split:
            base = f"(pv * {self.block[d]} + {base})"
        return f"{base}{sl}"

    def off(self, dims) -> str:
        """Offset of each lane into a contiguous [..., *dims] row."""
        if not dims:
            return f"tl.full([{', '.join('1' for _ in self.dims)}], 0, tl.int32)"
        terms, stride = [], 1
        for d in reversed(dims):
            terms.append(f"o_{d}" + (f" * {stride}" if stride != 1 else ""))
            stride *= self.sizes[d]
        return " + ".join(reversed(terms))

    def mask(self, dims) -> str | None:
        ms = [f"m_{d}" for d in dims if self.block[d] != self.sizes[d] or d == self.split]
        return " & ".join(ms) if ms else None

    def numel(self, dims) -> int:
        n = 1
        for d in dims:
            n *= self.sizes[d]
        return n

    def expr(self, n: Node) -> str:
        if n is self.state:
            return "S"
        if n.op == "const":
            return lit(n.attr("value"))
        return self.name[id(n)]

    def reduce(self, x: str, over, fn: str, fill: str) -> str:
        m = self.mask(over)
        if m:
            x = f"tl.where({m}, {x}, {fill})"
        for d in sorted(over, key=self.dims.index, reverse=True):
            x = f"tl.reduce({x}, {self.dims.index(d)}, {fn}, keep_dims=True)"
        return x

    def compute(self, n: Node) -> str:
        a = [self.expr(x) for x in n.args]
        if n.op == "pow":
            return power(a[0], n.args[1], a[1])
        if n.op in TRITON_UNARY:
            return TRITON_UNARY[n.op].format(*a)
        if n.op in TRITON_BINARY:
            return TRITON_BINARY[n.op].format(*a)
        if n.op == "where":
            return f"tl.where({a[0]}, {a[1]}, {a[2]})"
        if n.op == "contract":
            return self.reduce(f"({a[0]} * {a[1]})", n.attr("over"), "_add", "0.0")
        if n.op == "rotate":
            return self.rotate(n, a[0])
        if n.op == "pairs":
            raise NotImplementedError("triton sequential kernel: rk.pairs of a state value "
                                      "(backend='tvm' or 'torch' runs it)")
        if n.op == "sum":
            return self.reduce(a[0], n.attr("over"), "_add", "0.0")
        if n.op == "max":
            return self.reduce(a[0], n.attr("over"), "_max", 'float("-inf")')
        raise NotImplementedError(f"triton backend: no rule for op {n.op!r}")

    def pair_of(self, n: Node) -> tuple[str, str, str]:
        """(each lane's pair, its partner lane, whether it is the pair's first) along the
        rotated dim of ``n``."""
        K, half = n.attr("dim"), self.sizes[n.attr("dim")] // 2
        if n.attr("layout") == "interleaved":
            return f"(o_{K} // 2)", f"(o_{K} ^ 1)", f"(o_{K} % 2 == 0)"
        return (f"(o_{K} % {half})", f"((o_{K} + {half}) % {2 * half})",
                f"(o_{K} < {half})")

    def rotate(self, n: Node, x: str) -> str:
        """rk.rotate: ``cos * x -+ sin * x[partner]``, the partner gathered along the dim."""
        K = n.attr("dim")
        shape = ", ".join(str(self.block[d]) if d in n.dims else "1" for d in self.dims)
        _, partner, first = self.pair_of(n)
        t = f"a{self.name[id(n)]}"
        xp = f"tl.gather({x}, tl.broadcast_to({partner}, ({shape},)), {self.dims.index(K)})"
        return (f"(tl.cos({t}) * {x} + tl.where({first}, -1.0, 1.0) * tl.sin({t}) * "
                f"{xp})")

    def angle_loads(self) -> list[str]:
        """Each rotation's angle per lane of its dim: the feed read at the lane's pair."""
        out = []
        for n in self.body:
            if n.op != "rotate":
                continue
            a, K, pair = n.args[1], n.attr("dim"), n.attr("pair")
            if a.op == "const":
                out.append(f"        a{self.name[id(n)]} = {lit(a.attr('value'))}")
                continue
            at = self.pair_of(n)[0]
            terms, stride = [], 1
            for d in reversed(a.dims):
                terms.append(f"{at if d == pair else f'o_{d}'} * {stride}")
                stride *= self.sizes[d]
            off = " + ".join(terms) if terms else "0"
            # masked over the dims its offsets vary along (none: one angle, a scalar load)
            m = self.mask(tuple(d for d in a.dims if d != pair) + ((K,) if pair else ()))
            mk = f", mask={m}, other=0.0" if m and terms else ""
            f = self.feeds.index(a)
            out.append(f"        a{self.name[id(n)]} = tl.load(F{f} + base * {stride} + "
                       f"{off}{mk})")
        return out

    def source(self, num_warps: int = 4) -> str:
        p, H = self.p, self.H
        sd, od = p.state.dims, p.output.dims
        feeds = "".join(f", F{i}" for i in range(len(self.feeds)))
        L = ["", "", "@triton.jit", f"def recurrent_kernel(O, S0, SF, SEG{feeds}, TT):",
             "    pid = tl.program_id(0)", "    pv = tl.program_id(1)",
             f"    n = pid // {H}", f"    h = pid % {H}",
             "    row = tl.load(SEG + n * 3)", "    start = tl.load(SEG + n * 3 + 1)",
             "    end = tl.load(SEG + n * 3 + 2)"]
        for d in self.dims:
            L.append(f"    o_{d} = {self.ar(d)}")
            L.append(f"    m_{d} = o_{d} < {self.sizes[d]}")
        ms = self.mask(sd)
        mk = f", mask={ms}, other=0.0" if ms else ""
        L.append(f"    sbase = (n * {H} + h).to(tl.int64) * {self.numel(sd)}")
        L.append(f"    S = tl.load(S0 + sbase + {self.off(sd)}{mk})")
        L.append("    for t in range(start, end):")
        L.append(f"        base = ((row * TT + t) * {H} + h).to(tl.int64)")
        for i, f in enumerate(self.feeds):
            m = self.mask(f.dims)
            mk = f", mask={m}, other=0.0" if m else ""
            L.append(f"        f{i} = tl.load(F{i} + base * {self.numel(f.dims)} + "
                     f"{self.off(f.dims)}{mk})")
        L += self.angle_loads()
        for n in self.body:
            L.append(f"        {self.name[id(n)]} = {self.compute(n)}")
        om = self.mask(od)
        if self.split and self.split not in od:
            om = f"({om}) & (pv == 0)" if om else "pv == 0"
        out = self.expr(p.output)
        if not self.dep[id(p.output)] and p.output.op == "const":
            out = f"tl.full([{', '.join('1' for _ in self.dims)}], {out}, tl.float32)"
        L.append(f"        tl.store(O + base * {self.numel(od)} + {self.off(od)}, "
                 f"{out}.to(O.dtype.element_ty){', mask=' + om if om else ''})")
        new = self.expr(p.new_state)
        L.append(f"        S = tl.where({ms}, {new}, 0.0)" if ms else f"        S = {new}")
        L.append(f"    tl.store(SF + sbase + {self.off(sd)}, S{', mask=' + ms if ms else ''})")
        L += ["", "", "def launch(o, s0, sf, seg, feeds, TT, NS):",
              f"    recurrent_kernel[(NS * {H}, {self.nsplit})](o, s0, sf, seg, *feeds, TT, "
              f"num_warps={num_warps}, num_stages=1)", ""]
        return HEADER + "\n".join(L)


def scan_program_lines(D: int, H: int, B: int) -> list[str]:
    """A token-loop scan kernel's start: its (sequence, head) and block of B of the D state
    entries, the sequence's row, start and end (SEG), the state's offset."""
    return ["    pid = tl.program_id(0)", "    pv = tl.program_id(1)",
            f"    n = pid // {H}", f"    h = pid % {H}",
            "    row = tl.load(SEG + n * 3)", "    start = tl.load(SEG + n * 3 + 1)",
            "    end = tl.load(SEG + n * 3 + 2)",
            f"    o_D = pv * {B} + tl.arange(0, {B})", f"    m_D = o_D < {D}",
            f"    sbase = (n * {H} + h).to(tl.int64) * {D}"]


def scan_source(D: int, H: int, signed: bool, block: int = 256, num_warps: int = 4) -> str:
    """h_t = a_t h_(t-1) + b_t over the tokens, vectorised over the state: the kernel reads
    m_t = expm1(log|a_t|) and forms |a_t| h as h + m_t h, with the add compensated (Kahan),
    so a decay of 1 - 1e-6 does not drift over 16384 steps (see tvm.chunk._scan_source)."""
    B = min(pow2(D), block)
    sgn = "sg * " if signed else ""
    sg_arg = ", SG" if signed else ""
    L = ["", "", "@triton.jit", f"def scan_kernel(M{sg_arg}, BV, HS, S0, SF, SEG, TT):",
         *scan_program_lines(D, H, B),
         "    hv = tl.load(S0 + sbase + o_D, mask=m_D, other=0.0)",
         "    cv = hv * 0.0",
         "    for t in range(start, end):",
         f"        base = ((row * TT + t) * {H} + h).to(tl.int64) * {D} + o_D",
         "        m = tl.load(M + base, mask=m_D, other=0.0)",
         "        b = tl.load(BV + base, mask=m_D, other=0.0)"]
    if signed:
        L += ["        sg = tl.load(SG + base, mask=m_D, other=1.0)", "        cv = sg * cv"]
    L += [f"        y = {sgn}m * hv + b - cv",
          f"        tv = {sgn}hv + y",
          f"        cv = (tv - {sgn}hv) - y",
          "        hv = tv",
          "        tl.store(HS + base, hv, mask=m_D)",
          "    tl.store(SF + sbase + o_D, hv, mask=m_D)",
          "", "",
          "def launch(m, sg, b, hs, s0, sf, seg, TT, NS):",
          f"    scan_kernel[(NS * {H}, {-(-D // B)})](m, {'sg, ' if signed else ''}b, hs, s0, "
          f"sf, seg, TT, num_warps={num_warps}, num_stages=1)", ""]
    return HEADER + "\n".join(L)
