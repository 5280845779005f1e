"""exp, sigmoid and silu as vector arithmetic for the CPU kernels.

TVM lowers ``T.exp`` on LLVM to the libm call per lane: a loop over 16 floats becomes 16 calls
(8M exps: 18 ms on 2 Zen 4 cores, torch's vectorised exp 4 ms). These are the same functions
as range reduction and a polynomial, which vectorise: x = n ln2 + r, |r| <= ln2 / 2, with
exp(r) from Cephes' degree-7 expf polynomial (about 1 ulp) and 2^n built in the exponent bits.
Outside the float range: 0 below -87.34 (exp is subnormal there), inf above 88.72, NaN kept.
"""
from __future__ import annotations


def _f(v: float) -> str:
    return f"T.float32({float(v)!r})"


LO, HI = -87.33654, 88.72283
_P = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1,
      5.0000001201e-1)


def _reduce(x: str, N: str, r: str, clamp_hi: bool) -> tuple[list[str], str]:
    """The range reduction of exp(x) (x already clamped below at LO) into the buffers'
    entries ``N`` (the power of two) and ``r`` (the remainder), and the value
    p(r) * 2^N, where N and r hold them."""
    n = f"T.floor({x} * {_f(1.4426950408889634)} + {_f(0.5)})"
    n = f"T.max(T.min({n}, {_f(127)}), {_f(-126)})" if clamp_hi else f"T.max({n}, {_f(-126)})"
    p = _f(_P[0])
    for c in _P[1:]:
        p = f"({p} * {r} + {_f(c)})"
    two_n = f'T.reinterpret("float32", T.shift_left(T.Cast("int32", {N}) + 127, 23))'
    return [f"{N} = {n}",
            f"{r} = {x} - {N} * {_f(0.693359375)} + {N} * {_f(2.12194440e-4)}"], \
        f"({p} * {r} * {r} + {r} + {_f(1)}) * {two_n}"   # ln2 above in two parts


def fast_steps(op: str, a: str, dst: str, at: str) -> tuple[list[str], list[str]]:
    """(scratch buffers, statements): ``dst[at] = op(a)`` for ``op`` in FAST as four
    statements, each to run in a loop nest of its own over the value's dims, through the
    scratch buffers ``dst_a`` (the argument) and ``dst_n`` (the power of two): one copy of
    each intermediate in the text, and no let-bindings inside vectorised loops (TOOLCHAIN)."""
    A, N = f"{dst}_a[{at}]", f"{dst}_n[{at}]"
    steps, val = _reduce(f"T.max(T.min({A}, {_f(HI)}), {_f(LO)})", N, f"{dst}[{at}]", True)
    e = (f"T.if_then_else({A} < {_f(LO)}, {_f(0)}, T.if_then_else({A} > {_f(HI)}, "
         f"T.float32('inf'), T.if_then_else(T.isnan({A}), {A}, {val})))")
    val = {"exp": e, "sigmoid": f"({_f(1)} / ({_f(1)} + {e}))",   # A = -a for these two
           "silu": f"((-{A}) / ({_f(1)} + {e}))"}[op]
    arg = a if op == "exp" else f"(-{a})"
    return [f"{dst}_a", f"{dst}_n"], [f"{A} = {arg}", *steps, f"{dst}[{at}] = {val}"]


def sigmoid_pair_steps(a: str, pos: str, neg: str, at: str) -> tuple[list[str], list[str]]:
    """(scratch buffers, statements): ``pos[at] = sigmoid(a)`` and ``neg[at] = sigmoid(-a)``
    (a gate and its complement: minGRU's z and 1 - z) from one exp and one division:
    e = exp(-|a|) never overflows, r = 1 / (1 + e), and the two are r and e r, by the sign
    of a. Each keeps its relative precision (``1 - sigmoid(a)`` would not, for large a)."""
    A, N, E = f"{pos}_a[{at}]", f"{pos}_n[{at}]", f"{pos}[{at}]"
    m = f"(-T.fabs({A}))"
    steps, val = _reduce(f"T.max({m}, {_f(LO)})", N, E, False)
    e = f"T.if_then_else({m} < {_f(LO)}, {_f(0)}, T.if_then_else(T.isnan({A}), {A}, {val}))"
    return [f"{pos}_a", f"{pos}_n"], [
        f"{A} = {a}", *steps,
        f"{E} = {e}",                                   # e = exp(-|a|)
        f"{N} = {_f(1)} / ({_f(1)} + {E})",             # r
        f"{neg}[{at}] = T.if_then_else({A} >= {_f(0)}, {E} * {N}, {N})",
        f"{E} = T.if_then_else({A} >= {_f(0)}, {N}, {E} * {N})"]


FAST = ("exp", "sigmoid", "silu")
