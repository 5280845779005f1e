"""The LUT form as two TVM CPU kernels (see ``lowering/lut.py``).

1. tables: per (sample, group) in parallel, for each byte s of 8 inputs the 256 signed sums
   ``L[n, g, s, b] = sum_j (bit j of b ? x : -x)[n, g, 8 s + j]``, built as the sum of two
   16-entry tables (low and high nibble), so each entry costs one add.
2. look-ups: blocks of outputs in parallel; per group (whose tables, S x 1 KB, stay in L1
   while the block's codes stream past), per output and sample, every code byte of every
   plane is one look-up; a plane's look-ups are summed as a balanced tree (independent adds,
   no serial chain), scaled and added to the output.

Kernels are specialised to every dim size but the sample count N, and compiled through the
shared TVM cache (``tvm_build``).
"""
from __future__ import annotations

import math
import threading
from typing import Callable

import torch

from ..ir.tiled import TiledCall
from ..lowering.lut import LutPlan
from .lut_torch import dims_of, scale_tensor
from .tvm_backend import _f
from .tvm_build import compile_source

BLOCK_O = 512    # outputs per parallel block of the look-up kernel (at most)


def _tree(terms: list[str]) -> str:
    while len(terms) > 1:
        terms = [f"({terms[i]} + {terms[i + 1]})" if i + 1 < len(terms) else terms[i]
                 for i in range(0, len(terms), 2)]
    return terms[0]


def _index(dims, at: dict[str, str]) -> str:
    return ", ".join(at[d] for d in dims)


def _shape(dims, sizes: dict[str, int], packed: str | None = None) -> str:
    return ", ".join(str(sizes[d] // 8 if d == packed else sizes[d]) for d in dims)


def tables_source(plan: LutPlan, sizes: dict[str, int]) -> str:
    rdims = dims_of(plan, plan.row)
    Gs = sizes[plan.group] if plan.group else 1
    S = sizes[plan.packed] // 8

    def x(j: int) -> str:
        v = f"X[n, {_index(rdims, {plan.group: 'g', plan.packed: f's * 8 + {j}'})}]"
        return f"T.Select((b >> {j % 4}) & 1 == 1, {v}, -{v})"
    return "\n".join([
        "@T.prim_func",
        "def main(x: T.handle, l: T.handle):",
        '    T.func_attr({"global_symbol": "main", "tir.noalias": True})',
        "    N = T.int32()",
        f"    X = T.match_buffer(x, (N, {_shape(rdims, sizes)}), \"float32\")",
        f"    L = T.match_buffer(l, (N, {Gs}, {S}, 256), \"float32\")",
        f"    for ng in T.parallel(N * {Gs}):",
        f"        n: T.let = ng // {Gs}",
        f"        g: T.let = ng % {Gs}",
        "        lo = T.alloc_buffer((16,), \"float32\")",
        "        hi = T.alloc_buffer((16,), \"float32\")",
        f"        for s in T.serial({S}):",
        "            for b in T.serial(16):",
        f"                lo[b] = {_tree([x(j) for j in range(4)])}",
        f"                hi[b] = {_tree([x(j) for j in range(4, 8)])}",
        "            for bh in T.serial(16):",
        "                for bl in T.vectorized(16):",
        "                    L[n, g, s, bh * 16 + bl] = lo[bl] + hi[bh]",
    ]) + "\n"


def lookup_source(plan: LutPlan, sizes: dict[str, int], block: int = BLOCK_O) -> str:
    cdims = dims_of(plan, plan.codes)
    O = sizes[plan.out]
    Gs = sizes[plan.group] if plan.group else 1
    S = sizes[plan.packed] // 8
    planes = range(sizes[plan.plane]) if plan.plane else [0]
    threads = max(1, torch.get_num_threads())
    nb = threads * -(-O // (threads * block))   # blocks: a multiple of the threads ...
    block = -(-O // nb)                          # ... of equal size
    at = {plan.out: "o", plan.group: "g", plan.packed: None}
    terms = []
    for q in planes:
        at[plan.plane] = str(q)
        looks = []
        for s in range(S):
            at[plan.packed] = str(s)
            looks.append(f"L[n, g, {s}, T.Cast(\"int32\", C[{_index(cdims, at)}])]")
        w = f"W[{_index(plan.scale_dims, at)}]" if plan.scale_dims else "W[0]"
        terms.append(f"{w} * {_tree(looks)}")
    wshape = _shape(plan.scale_dims, sizes) if plan.scale_dims else "1"
    body = " + ".join(terms)
    return "\n".join([
        "@T.prim_func",
        "def main(l: T.handle, c: T.handle, w: T.handle, y: T.handle):",
        '    T.func_attr({"global_symbol": "main", "tir.noalias": True})',
        "    N = T.int32()",
        f"    L = T.match_buffer(l, (N, {Gs}, {S}, 256), \"float32\")",
        f"    C = T.match_buffer(c, ({_shape(cdims, sizes, plan.packed)}), \"uint8\")",
        f"    W = T.match_buffer(w, ({wshape},), \"float32\")",
        f"    Y = T.match_buffer(y, (N, {O}), \"float32\")",
        f"    for ob in T.parallel({nb}):",
        f"        for oi in T.serial({block}):",
        f"            if ob * {block} + oi < {O}:",
        "                for n in T.serial(N):",
        f"                    Y[n, ob * {block} + oi] = {_f(0.0)}",
        f"        for g in T.serial({Gs}):",
        f"            for oi in T.serial({block}):",
        f"                o: T.let = ob * {block} + oi",
        f"                if o < {O}:",
        "                    for n in T.serial(N):",
        f"                        Y[n, o] = Y[n, o] + {body}",
    ]) + "\n"


_KERNELS: dict[tuple, tuple[Callable, Callable]] = {}
_SCRATCH = threading.local()   # per calling thread: the tables' buffer, reused across calls


def _kernels(plan: LutPlan, sizes: dict[str, int]) -> tuple[Callable, Callable]:
    key = (plan, tuple(sorted(sizes.items())), torch.get_num_threads())
    hit = _KERNELS.get(key)
    if hit is None:
        hit = (compile_source(tables_source(plan, sizes)),
               compile_source(lookup_source(plan, sizes)))
        _KERNELS[key] = hit
    return hit


def _tables_buffer(shape: tuple[int, ...]) -> torch.Tensor:
    n = math.prod(shape)
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.numel() < n:
        buf = _SCRATCH.buf = torch.empty(n)
    return buf[:n].view(shape)


def run_lut_tvm(plan: LutPlan, tc: TiledCall) -> torch.Tensor:
    sizes = {d: tc.sizes[d] for d in (plan.out, plan.plane, plan.group, plan.packed) if d}
    tables, lookup = _kernels(plan, sizes)
    x = tc.tensors[plan.row].float().contiguous()
    codes = tc.tensors[plan.codes].contiguous()
    w = scale_tensor(plan, tc)
    Gs = tc.sizes[plan.group] if plan.group else 1
    lut = _tables_buffer((tc.N, Gs, tc.sizes[plan.packed] // 8, 256))
    y = torch.empty(tc.N, tc.sizes[plan.out])
    tables(x, lut)
    lookup(lut, codes, w, y)
    return y.to(tc.out_dtype)
