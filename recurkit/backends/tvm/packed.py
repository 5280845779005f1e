"""A hard logic-gate network as one compiled TVM CPU kernel of bitwise ops.

Samples are bit-packed 64 to an int64 word and processed in blocks of ``words`` words (the
innermost, vectorised loop). Per block, in parallel over blocks: every layer computes each
neuron as ``m0 ^ (m1 & a) ^ (m2 & b) ^ (m3 & a & b)`` (its gate's algebraic normal form, masks
all-ones or zero) from the two input rows it reads, ping-ponging between two scratch buffers;
then GroupSum counts each class's bits with bit-sliced counters (a ripple-carry add of each
output word into ``ceil(log2(group + 1))`` counter words) and writes the counts per sample.
(No let-bindings inside vectorised loops: TVM 0.27 miscompiles them with int64 bitwise ops.)
"""
from __future__ import annotations

from typing import Callable

import torch

from ...lowering.packed import PackedNet, net_buffers
from .build import _LOCK, compile_source

_KERNELS: dict[tuple, Callable] = {}


def _xor(*xs: str) -> str:
    out = xs[0]
    for x in xs[1:]:
        out = f"T.bitwise_xor({out}, {x})"
    return out


def _and(a: str, b: str) -> str:
    return f"T.bitwise_and({a}, {b})"


def _count_bit(k: int) -> str:
    bit = _and('T.shift_right(CNT[c, %d, w], T.Cast("int64", s))' % k, "T.int64(1)")
    return f'T.Cast("int32", {bit}) * {1 << k}'


def packed_source(net: PackedNet, words: int = 4) -> str:
    """TVMScript of the whole network for blocks of ``words`` int64 words (64 samples each)."""
    widths = [layer.out_dim for layer in net.layers]
    total, wmax = sum(widths), max(widths)
    K, G = net.classes, net.group
    nbits = G.bit_length()
    W = words
    L = [
        "@T.prim_func",
        "def main(h_x: T.handle, h_ia: T.handle, h_ib: T.handle, h_m: T.handle, "
        "h_out: T.handle):",
        '    T.func_attr({"global_symbol": "main", "tir.noalias": True})',
        "    NB = T.int32()",
        f"    X = T.match_buffer(h_x, (NB, {net.in_dim}, {W}), \"int64\")",
        f"    IA = T.match_buffer(h_ia, ({total},), \"int32\")",
        f"    IB = T.match_buffer(h_ib, ({total},), \"int32\")",
        f"    MK = T.match_buffer(h_m, ({total}, 4), \"int64\")",
        f"    OUT = T.match_buffer(h_out, (NB, {W * 64}, {K}), \"int32\")",
        "    for blk in T.parallel(NB):",
        f"        P0 = T.alloc_buffer(({wmax}, {W}), \"int64\")",
        f"        P1 = T.alloc_buffer(({wmax}, {W}), \"int64\")",
        f"        CNT = T.alloc_buffer(({K}, {nbits}, {W}), \"int64\")",
        f"        CARRY = T.alloc_buffer(({W},), \"int64\")",
        f"        TMP = T.alloc_buffer(({W},), \"int64\")",
    ]
    off = 0
    for i, O in enumerate(widths):
        src = (lambda r: f"X[blk, {r}, w]") if i == 0 else \
            (lambda r, b=f"P{(i - 1) % 2}": f"{b}[{r}, w]")
        dst = f"P{i % 2}"
        a, b = src(f"IA[o + {off}]"), src(f"IB[o + {off}]")
        L += [f"        for o in T.serial({O}):",
              f"            for w in T.vectorized({W}):",
              f"                {dst}[o, w] = " + _xor(
                  f"MK[o + {off}, 0]", _and(f"MK[o + {off}, 1]", a),
                  _and(f"MK[o + {off}, 2]", b), _and(f"MK[o + {off}, 3]", _and(a, b)))]
        off += O
    last = f"P{(len(widths) - 1) % 2}"
    L += [f"        for c in T.serial({K}):",
          f"            for k in T.serial({nbits}):",
          f"                for w in T.vectorized({W}):",
          "                    CNT[c, k, w] = T.int64(0)",
          f"            for j in T.serial({G}):",
          f"                for w in T.vectorized({W}):",
          f"                    CARRY[w] = {last}[c * {G} + j, w]",
          f"                for k in T.serial({nbits}):",
          f"                    for w in T.vectorized({W}):",
          "                        TMP[w] = " + _and("CNT[c, k, w]", "CARRY[w]"),
          "                        CNT[c, k, w] = " + _xor("CNT[c, k, w]", "CARRY[w]"),
          "                        CARRY[w] = TMP[w]",
          f"        for w in T.serial({W}):",
          "            for s in T.serial(64):",
          f"                for c in T.serial({K}):",
          "                    OUT[blk, w * 64 + s, c] = " + " + ".join(
              _count_bit(k) for k in range(nbits))]
    return "\n".join(L) + "\n"


def _kernel(net: PackedNet, words: int) -> Callable:
    key = (net.in_dim, tuple(layer.out_dim for layer in net.layers), net.classes, words,
           torch.get_num_threads())
    with _LOCK:
        hit = _KERNELS.get(key)
    if hit is None:
        hit = compile_source(packed_source(net, words))
        with _LOCK:
            _KERNELS[key] = hit
    return hit


def run_packed_tvm(net: PackedNet, xp: torch.Tensor, words: int = 4,
                   buffers: tuple | None = None) -> torch.Tensor:
    """Counts [NB * words * 64, classes] (int32) of packed inputs ``xp`` [NB, in_dim, words]."""
    ia, ib, mk = buffers if buffers is not None else net_buffers(net)
    out = torch.empty(xp.shape[0], words * 64, net.classes, dtype=torch.int32)
    _kernel(net, words)(xp, ia, ib, mk, out)
    return out.reshape(-1, net.classes)


PACK_SOURCE = '''@T.prim_func
def main(h_x: T.handle, h_out: T.handle):
    T.func_attr({"global_symbol": "main", "tir.noalias": True})
    NB = T.int32()
    X = T.match_buffer(h_x, (NB * %(P)d, %(F)d), "uint8")
    OUT = T.match_buffer(h_out, (NB, %(F)d, %(W)d), "int64")
    for blk in T.parallel(NB):
        LOC = T.alloc_buffer((%(W)d, %(F)d), "int64")
        for w in T.serial(%(W)d):
            for f in T.vectorized(%(F)d):
                LOC[w, f] = T.int64(0)
            for s in T.serial(64):
                for f in T.vectorized(%(F)d):
                    LOC[w, f] = T.bitwise_or(LOC[w, f], T.shift_left(
                        T.Cast("int64", X[blk * %(P)d + w * 64 + s, f]), T.Cast("int64", s)))
        for f in T.serial(%(F)d):
            for w in T.serial(%(W)d):
                OUT[blk, f, w] = LOC[w, f]
'''


def pack_bits(x: torch.Tensor, words: int = 4) -> torch.Tensor:
    """Bool inputs [N, F] on the CPU as int64 words [NB, F, words] (the layout of
    ``lowering.packed.pack_bits_torch``),
    by a compiled kernel: whole blocks straight from ``x``, the last partial block from a
    zero-padded copy of its rows."""
    N, F = x.shape
    xb = x.contiguous()
    xb = xb.view(torch.uint8) if xb.dtype == torch.bool else (xb != 0).to(torch.uint8)
    per = 64 * words
    full, NB = N // per, -(-N // per)
    key = ("pack", F, words, torch.get_num_threads())
    with _LOCK:
        fn = _KERNELS.get(key)
    if fn is None:
        fn = compile_source(PACK_SOURCE % {"F": F, "W": words, "P": per})
        with _LOCK:
            _KERNELS[key] = fn
    out = torch.empty(NB, F, words, dtype=torch.int64)
    if full:
        fn(xb[:full * per], out[:full])
    if NB > full:
        tail = torch.zeros(per, F, dtype=torch.uint8)
        tail[:N - full * per] = xb[full * per:]
        fn(tail, out[full:])
    return out
