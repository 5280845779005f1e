"""A hard logic-gate network as one compiled TVM CPU kernel: one bitwise op per gate.

The kernel runs a ``GateProgram`` (``recurkit.lowering.gates``: constant and one-input gates
folded, equal gates shared, unread gates dropped, scheduled in levels). Samples are bit-packed
64 to an int64 word; a block holds ``words`` words per row (the innermost, vectorised loop),
blocks run in parallel over the cores. Per block:

1. its bool rows are packed into the scratch ``S[slots * words]`` (per 8 samples a byte per
   input, vectorised over the inputs, then 8 bytes joined per word): the reads of the bool
   tensor, bound by memory, overlap the other blocks' gates (``from_bool=False``: the rows
   come packed, ``pack_bits``);
2. every run is a loop ``S[d] = op(S[a], S[b])`` with its op a constant in the code: one
   AND / ANDN / OR / XOR per gate and vector (NAND, NOR, XNOR, ORN: one ``vpternlogq`` on
   AVX-512, two ops on AVX2), the slots read as scratch offsets from an int64 (a, b) and an
   int32 (d) table;
3. each class's members are counted 16 at a time by a carry-save (Harley-Seal) tree into
   ones / twos / fours / eights words, whose sixteens ripple into high counter words; each
   sample's count is read off the counter words' bits (32 samples a vector) and written as
   its score, count / tau, into ``OUT[block, sample, class]`` (or the count).

``choose_words``: one vector register (8 words with AVX-512, 4 with AVX2), two where their
scratch of live slots fits half the L2 (sysfs; 1 MiB where it cannot be read).
(No let-bindings inside vectorised loops: TVM 0.27 miscompiles them with int64 bitwise ops;
temporaries are buffers of one register's size, which TVM puts on the stack.)
"""
from __future__ import annotations

import functools
from typing import Callable

import torch

from ...lowering.gates import COUNT_CHUNK, NOT, GateProgram
from .build import _LOCK, compile_source, vector_lanes

_KERNELS: dict[tuple, Callable] = {}



_OP = {1: "T.bitwise_and({a}, {b})", 2: "T.bitwise_and({a}, T.bitwise_not({b}))",
       6: "T.bitwise_xor({a}, {b})", 7: "T.bitwise_or({a}, {b})",
       8: "T.bitwise_not(T.bitwise_or({a}, {b}))", 9: "T.bitwise_not(T.bitwise_xor({a}, {b}))",
       11: "T.bitwise_or({a}, T.bitwise_not({b}))", 14: "T.bitwise_not(T.bitwise_and({a}, {b}))",
       NOT: "T.bitwise_not({a})"}


def vector_words() -> int:
    """int64 words of the widest vector register kernels use: 8 with AVX-512, else 4."""
    return vector_lanes() // 2


@functools.cache
def l2_bytes() -> int:
    """The L2 cache of one core (sysfs), 1 MiB where it cannot be read."""
    try:
        for i in range(8):
            base = f"/sys/devices/system/cpu/cpu0/cache/index{i}/"
            with open(base + "level") as f:
                if f.read().strip() != "2":
                    continue
            with open(base + "size") as f:
                s = f.read().strip()
            mult = {"K": 1 << 10, "M": 1 << 20}.get(s[-1], 1)
            return int(s.rstrip("KM")) * mult
    except (OSError, ValueError):
        pass
    return 1 << 20


def choose_words(prog: GateProgram) -> int:
    """Words per block: one vector register, two where their scratch fits half the L2."""
    v = vector_words()
    fit = l2_bytes() // 2 // (prog.slots * 8 * v)
    return v * max(1, min(2, fit))


def _or(*xs: str) -> str:
    out = xs[0]
    for x in xs[1:]:
        out = f"T.bitwise_or({out}, {x})"
    return out


def _half(word: str, k: int) -> str:
    """Half h of ``word`` (bits 32h..32h+31) at bits k..k+31: a bit s of it, shifted right by
    s, lands on bit k (k < 32: nothing is shifted out of the 64 bits)."""
    half = f"T.bitwise_and(T.shift_right({word}, T.Cast(\"int64\", h * 32)), T.int64(0xFFFFFFFF))"
    return f"T.shift_left({half}, T.int64({k}))" if k else half


def _csa(h: str, low: str, b: str, c: str) -> list[str]:
    """Carry-save add of ``low`` + b + c: ``h`` = carries (weight 2), ``low`` = sum bits."""
    return [f"{h}[w] = T.bitwise_or(T.bitwise_and({low}[w], {b}), "
            f"T.bitwise_and(T.bitwise_xor({low}[w], {b}), {c}))",
            f"{low}[w] = T.bitwise_xor(T.bitwise_xor({low}[w], {b}), {c})"]


def _harley_seal(x: list[str]) -> list[str]:
    """16 member words into ONES, TWOS, FOURS, EIGHTS and the weight-16 carries SIX."""
    L = []
    for half, eights in ((0, "E8A"), (8, "E8B")):
        for quarter, fours in ((0, "F4A"), (4, "F4B")):
            i = half + quarter
            L += _csa("T2A", "ONES", x[i], x[i + 1]) + _csa("T2B", "ONES", x[i + 2], x[i + 3])
            L += _csa(fours, "TWOS", "T2A[w]", "T2B[w]")
        L += _csa(eights, "FOURS", "F4A[w]", "F4B[w]")
    L += _csa("SIX", "EIGHTS", "E8A[w]", "E8B[w]")
    return L


def packed_source(prog: GateProgram, words: int, from_bool: bool = True,
                  scores: bool = True) -> str:
    """TVMScript of the whole program for blocks of ``words`` int64 words (64 samples each),
    on bool rows (uint8 [NB * 64 * words, in_dim], packed by the kernel into its scratch) or,
    ``from_bool=False``, on packed inputs [NB, in_dim, words]. Output [NB * 64 * words,
    classes]: float32 scores (count / ``tau``, the kernel's last argument), or int32 counts
    with ``scores=False``."""
    W, F, K = words, prog.in_dim, prog.classes
    nrun = sum(r.dst.numel() for r in prog.runs)
    nmem = sum(m.numel() for m in prog.members)
    longest = max(m.numel() for m in prog.members)
    nhigh = max(1, (longest // COUNT_CHUNK).bit_length())   # counter words of weight >= 16
    tmp = ["ONES", "TWOS", "FOURS", "EIGHTS", "T2A", "T2B", "F4A", "F4B", "E8A", "E8B", "SIX",
           "CAR", "TMP"]
    L = ["@T.prim_func",
         "def main(h_x: T.handle, h_g: T.handle, h_gd: T.handle, h_m: T.handle, "
         "h_out: T.handle, tau: T.float32):",
         '    T.func_attr({"global_symbol": "main", "tir.noalias": True})',
         "    NB = T.int32()",
         (f'    X = T.match_buffer(h_x, (NB * {64 * W}, {F}), "uint8")' if from_bool else
          f'    X = T.match_buffer(h_x, (NB, {F}, {W}), "int64")'),
         f'    G = T.match_buffer(h_g, ({max(1, nrun)},), "int64")',
         f'    GD = T.match_buffer(h_gd, ({max(1, nrun)},), "int32")',
         f'    M = T.match_buffer(h_m, ({max(1, nmem)},), "int32")',
         f'    OUT = T.match_buffer(h_out, (NB, {W * 64}, {K}), '
         f'"{"float32" if scores else "int32"}")',
         "    for blk in T.parallel(NB):",
         f'        S = T.alloc_buffer(({prog.slots * W},), "int64")',
         f'        HI = T.alloc_buffer(({nhigh}, {W}), "int64")']
    L += [f'        {t} = T.alloc_buffer(({W},), "int64")' for t in tmp]
    if from_bool:
        L += [f'        B8 = T.alloc_buffer((8, {F}), "uint8")']
        L += _pack_lines(F, W, "S[({f}) * %d + {w}]" % W, " " * 8)
    else:
        L += [f"        for f in T.serial({F}):",
              f"            for w in T.vectorized({W}):",
              f"                S[f * {W} + w] = X[blk, f, w]"]
    L += [f"        for w in T.vectorized({W}):",
          f"            S[{prog.zero_slot * W} + w] = T.int64(0)"]
    off = 0
    for r in prog.runs:
        n = r.dst.numel()
        a = f'S[T.Cast("int32", G[i + {off}]) + w]'
        b = f'S[T.Cast("int32", T.shift_right(G[i + {off}], T.int64(32))) + w]'
        d = f"S[GD[i + {off}] + w]"
        L += [f"        for i in T.serial({n}):",
              f"            for w in T.vectorized({W}):",
              f"                {d} = " + _OP[r.op].format(a=a, b=b)]
        off += n
    off = 0
    levels = ["ONES[w]", "TWOS[w]", "FOURS[w]", "EIGHTS[w]"] + \
        [f"HI[{k}, w]" for k in range(nhigh)]
    for c, (mem, const) in enumerate(zip(prog.members, prog.const)):
        chunks = mem.numel() // COUNT_CHUNK
        L += [f"        for w in T.vectorized({W}):"]
        L += [f"            {t}[w] = T.int64(0)" for t in ("ONES", "TWOS", "FOURS", "EIGHTS")]
        L += [f"            HI[{k}, w] = T.int64(0)" for k in range(nhigh)]
        if chunks:
            xs = [f"S[M[{off} + j * {COUNT_CHUNK} + {i}] + w]" for i in range(COUNT_CHUNK)]
            L += [f"        for j in T.serial({chunks}):",
                  f"            for w in T.vectorized({W}):"]
            L += ["                " + s for s in _harley_seal(xs)]
            L += ["                CAR[w] = SIX[w]"]
            for k in range(nhigh):
                L += [f"                TMP[w] = T.bitwise_and(HI[{k}, w], CAR[w])",
                      f"                HI[{k}, w] = T.bitwise_xor(HI[{k}, w], CAR[w])",
                      "                CAR[w] = TMP[w]"]
        off += mem.numel()
        # sample 32h + s of word w: bit s of the half h of each counter word, at bit k
        bits = _or(*(f"T.bitwise_and(T.shift_right({_half(lv, k)}, T.Cast(\"int64\", s)), "
                     f"T.int64({1 << k}))" for k, lv in enumerate(levels)))
        count = f'T.Cast("int32", {bits})' + (f" + {const}" if const else "")
        if scores:
            count = f'T.Cast("float32", {count}) / tau'
        L += [f"        for w in T.serial({W}):",
              "            for h in T.serial(2):",
              "                for s in T.vectorized(32):",
              f"                    OUT[blk, w * 64 + h * 32 + s, {c}] = {count}"]
    return "\n".join(L) + "\n"


def kernel(prog: GateProgram, words: int, from_bool: bool, scores: bool) -> Callable:
    key = (id(prog), words, from_bool, scores, torch.get_num_threads())
    with _LOCK:
        hit = _KERNELS.get(key)
    if hit is None or hit[0] is not prog:
        hit = (prog, compile_source(packed_source(prog, words, from_bool, scores)))
        with _LOCK:
            _KERNELS[key] = hit
    return hit[1]


def program_tables(prog: GateProgram, words: int) -> tuple[torch.Tensor, ...]:
    """The kernel's tables, slots as offsets into the scratch (slot * ``words``): per gate
    an int64 of its inputs' offsets (the first in the low 32 bits) and an int32 of its
    destination's, in run order; the classes' members (int32)."""
    if prog.slots * words >= 1 << 31:
        raise ValueError(f"a gate program of {prog.slots} live slots x {words} words is "
                         "beyond the kernel's int32 offsets")
    nmem = sum(m.numel() for m in prog.members)   # 0: every class count is constant
    mem = torch.cat(list(prog.members)) * words if nmem else torch.zeros(1, dtype=torch.int32)
    if not prog.runs:
        return torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int32), mem
    d, a, b = (torch.cat([getattr(r, k) for r in prog.runs]).to(torch.int64) * words
               for k in ("dst", "a", "b"))
    return a | (b << 32), d.to(torch.int32), mem


def run_hard_tvm(prog: GateProgram, x: torch.Tensor, words: int, tables: tuple | None = None,
                 scores: bool = True) -> torch.Tensor:
    """Scores (float32, count / tau) or counts (int32) [N', classes] of bool inputs ``x``
    [N, in_dim], N' >= N (whole blocks): one kernel that packs its block's rows and runs the
    program; whole blocks straight from ``x``, the last partial one from a zero-padded copy."""
    tables = tables if tables is not None else program_tables(prog, words)
    fn = kernel(prog, words, True, scores)
    return _by_blocks(x, words, lambda xb, out: fn(xb, *tables, out.view(-1, 64 * words,
                                                                          prog.classes),
                                                   prog.tau),
                      (64 * words, prog.classes), torch.float32 if scores else torch.int32)


def run_packed_tvm(prog: GateProgram, xp: torch.Tensor, words: int, tables: tuple | None = None,
                   scores: bool = False) -> torch.Tensor:
    """Counts (int32) or scores [NB * words * 64, classes] of packed inputs ``xp``
    [NB, in_dim, words] (``pack_bits``)."""
    tables = tables if tables is not None else program_tables(prog, words)
    out = torch.empty(xp.shape[0] * words * 64, prog.classes,
                      dtype=torch.float32 if scores else torch.int32)
    kernel(prog, words, False, scores)(xp, *tables, out.view(-1, 64 * words, prog.classes),
                                       prog.tau)
    return out


def _by_blocks(x: torch.Tensor, words: int, fn: Callable, block: tuple,
               dtype: torch.dtype) -> torch.Tensor:
    """Run ``fn(rows, out)`` (uint8 rows, whole blocks of 64 * ``words``) over bool ``x``
    [N, F]: the whole blocks straight from x, the last partial one zero-padded. ``out`` is
    [blocks * block[0], *block[1:]]: ``block`` the output of one block."""
    N, F = x.shape
    xb = x.contiguous()
    xb = xb.view(torch.uint8) if xb.dtype == torch.bool else (xb != 0).to(torch.uint8)
    per = 64 * words
    full, NB = N // per, -(-N // per)
    out = torch.empty(NB * block[0], *block[1:], dtype=dtype)
    if full:
        fn(xb[:full * per], out[:full * block[0]])
    if NB > full:
        tail = torch.zeros(per, F, dtype=torch.uint8)
        tail[:N - full * per] = xb[full * per:]
        fn(tail, out[full * block[0]:])
    return out


def _spans(F: int, v: int) -> list[tuple[int, int, int]]:
    """(start, chunks, width) loops covering 0..F-1 in vectorised chunks of ``v``."""
    out = [(0, F // v, v)] if F // v else []
    return out + ([(F // v * v, 1, F % v)] if F % v else [])


def _pack_lines(F: int, words: int, dst: str, indent: str) -> list[str]:
    """Loops packing block ``blk``'s bool rows of ``X`` (uint8 [NB * 64 * words, F]) into
    ``dst`` (a format of f and w): per 8 samples a byte per input of their bits (vectorised
    over the inputs, in ``B8``), then 8 such bytes joined per word."""
    P = 64 * words
    L = [f"for w in T.serial({words}):", "    for j in T.serial(8):"]
    for start, n, v in _spans(F, 64):
        f = f"{start} + fo * {v} + fi"
        L += [f"        for fo in T.serial({n}):",
              f"            for fi in T.vectorized({v}):",
              f"                B8[j, {f}] = " + " + ".join(
                  f"T.shift_left(X[blk * {P} + w * 64 + j * 8 + {i}, {f}], T.uint8({i}))"
                  for i in range(8))]
    for start, n, v in _spans(F, 8):
        f = f"{start} + fo * {v} + fi"
        L += [f"    for fo in T.serial({n}):",
              f"        for fi in T.vectorized({v}):",
              f"            {dst.format(f=f, w='w')} = " + " + ".join(
                  f'T.shift_left(T.Cast("int64", B8[{j}, {f}]), T.int64({8 * j}))'
                  for j in range(8))]
    return [indent + line for line in L]


def pack_source(F: int, words: int) -> str:
    """TVMScript packing bool (uint8) rows [NB * 64 * words, F] into words [NB, F, words]."""
    L = ["@T.prim_func",
         "def main(h_x: T.handle, h_out: T.handle):",
         '    T.func_attr({"global_symbol": "main", "tir.noalias": True})',
         "    NB = T.int32()",
         f'    X = T.match_buffer(h_x, (NB * {64 * words}, {F}), "uint8")',
         f'    OUT = T.match_buffer(h_out, (NB, {F}, {words}), "int64")',
         "    for blk in T.parallel(NB):",
         f'        B8 = T.alloc_buffer((8, {F}), "uint8")']
    return "\n".join(L + _pack_lines(F, words, "OUT[blk, {f}, {w}]", " " * 8)) + "\n"


def _pack_fn(F: int, words: int) -> Callable:
    key = ("pack", F, words, torch.get_num_threads())
    with _LOCK:
        fn = _KERNELS.get(key)
    if fn is None:
        fn = compile_source(pack_source(F, words))
        with _LOCK:
            _KERNELS[key] = fn
    return fn


def pack_bits(x: torch.Tensor, words: int = 4) -> torch.Tensor:
    """Bool inputs [N, F] on the CPU as int64 words [NB, F, words] (the layout of
    ``lowering.packed.pack_bits_torch``), by the kernel's packing loops on their own."""
    F = x.shape[1]
    fn = _pack_fn(F, words)
    return _by_blocks(x, words, fn, (1, F, words), torch.int64)
