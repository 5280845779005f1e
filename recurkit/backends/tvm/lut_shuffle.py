"""The LUT form's *shuffle* kernels: look-ups as AVX2 byte shuffles over fixed-point tables.

``vpshufb`` looks up 32 bytes at once, each in a 16-entry byte table, where ``vpermps`` (the
permute kernels) looks up 8 floats in an 8-entry one. A 16-entry table is the signed sums of
4 inputs, and a code byte's two nibbles index it directly: one shuffle answers 4 inputs for
32 (output, plane) lanes. Table entries must then be bytes, so the row is taken in fixed
point. One TVM function (one call, one wake-up of the thread pool) runs three loops:

1. tables: per (sample, chunk of ``chunk_size(E)`` <= 128 inputs of a group), the inputs
   scaled to integers of at most ``QMAX`` (~2^21) in magnitude, ``xq = round(x / s)`` with
   ``s = max |x| / QMAX`` over the chunk; for every 4 inputs, the 16 sums
   ``sum_j (bit j of i ? xq : -xq) + 2^23``, all in (0, 2^24), stored as 3 byte planes (low,
   middle, high byte; each 16 bytes twice, for both halves of a register).
2. look-ups: per chunk, each thread's run of 32-lane blocks; per 4 inputs and byte plane one
   shuffle; each plane's bytes are summed in 16-bit lanes over the chunk: all 32 bytes as
   16-bit words (wrapping: even byte + 256 x odd byte) and the odd bytes alone
   (``vpmaddubsw`` with weights 0, 1), the even sums recovered as the difference. At the end
   of a chunk the three planes are joined in int32 (exact: at most 32 look-ups of 24-bit
   entries), the offsets removed, and the result converted to fp32, times ``s`` and the
   lanes' scale (in fp64 where fp32 would overflow or underflow: chunks of magnitudes below
   ~1e-23 or above ~1e33), added to the lanes.
3. finish: per (sample, output), the planes' lanes summed.

So the result is the matmul with the dequantized weight of ``x`` rounded to the grid ``s``:
each input is off by at most ``s / 2 ~= 2.4e-7 max|x|`` of its chunk, every other step is
exact integer arithmetic or fp32 rounding. Measured, the relative error (largest deviation
over the largest output) is ~5e-7 on random data, also with outliers, tiny or huge chunks
(tests/test_shift_add_shuffle.py); a NaN or infinity in a chunk makes every output NaN.

The codes are laid out anew once per codes tensor, [chunks, lane blocks of 32, chunk bytes,
32] (a thread's blocks of a chunk are one contiguous run, which streams from memory), the
lanes padded to a multiple of 32, and kept (``packed_codes``) while the tensor lives and is
unchanged (its version counter and address are checked on every call; see ``packed_codes``
for the writes that escape them): one more copy of the codes in memory. ``bind_weights`` fixes codes and scale for a layer's repeated calls.
"""
from __future__ import annotations

import threading
from typing import Callable

import torch
from torch.utils.weak import WeakIdKeyDictionary

from ...ir.tiled import TiledCall
from ...lowering.lut import LutPlan
from ..torch.lut import dims_of
from .lut import _compiled, _ordered, canonical_order, ordered_scale, plan_sizes, row_order

QMAX = 2 ** 21 - 4    # largest |xq|: 4 of them plus the offset 2^23 stay within (0, 2^24)
OFFSET = 2 ** 23      # added to every table entry so its bytes are unsigned
NAN = 'T.reinterpret("float32", T.uint32(0x7FC00000))'
CHUNK = 128           # inputs per chunk at most: 32 look-ups keep the 16-bit sums exact


def chunk_size(E: int) -> int:
    """Inputs per chunk: the largest multiple of 8 that divides ``E`` (a multiple of 8, the
    codes being bytes) and is at most ``CHUNK``."""
    return max(c for c in range(8, min(E, CHUNK) + 1, 8) if E % c == 0)


def _geometry(plan: LutPlan, sizes: dict[str, int]) -> tuple[int, int, int, int, int]:
    """(groups, chunks per group, chunk size, lanes O x Q, lane blocks of 32)."""
    Gs, O, Q, E = plan.extents(sizes)
    ch = chunk_size(E)
    return Gs, E // ch, ch, O * Q, -(-O * Q // 32)


def _tables(NC: int, ch: int) -> list[str]:
    """The tables loop: X [N, chunks x ch] -> TB [N, chunks, ch / 4, 3, 32], SX [N, chunks]
    (fp64)."""
    ent = " + ".join(f"T.Select((i >> {b}) & 1 == 1, XQ[u * 4 + {b}], -XQ[u * 4 + {b}])"
                     for b in range(4))
    return [
        f"    for nc in T.parallel(N * {NC}):",
        f"        n: T.let = nc // {NC}",
        f"        c: T.let = nc % {NC}",
        "        red = T.alloc_buffer((2,), \"float32\")",
        f"        XQ = T.alloc_buffer(({ch},), \"int32\")",
        "        red[0] = T.float32(0)",
        "        red[1] = T.float32(0)",
        f"        for e in T.serial({ch}):",
        f"            red[0] = T.max(red[0], T.abs(X[n, c * {ch} + e]))",
        f"            red[1] = red[1] + T.Select(T.isfinite(X[n, c * {ch} + e]), T.float32(0), "
        "T.float32(1))",
        "        ok: T.let = red[1] == T.float32(0) and red[0] > T.float32(0)",
        # the scales in fp64: QMAX / max overflows fp32 for max < ~6e-33, max / QMAX is
        # subnormal in fp32 below ~2.5e-32
        f"        inv: T.let = T.Select(ok, T.float64({QMAX}) / T.Cast(\"float64\", red[0]), "
        "T.float64(0))",
        f"        SX[n, c] = T.Select(red[1] == T.float32(0), T.Cast(\"float64\", red[0]) / "
        f"T.float64({QMAX}), T.Cast(\"float64\", {NAN}))",
        f"        for e in T.serial({ch}):",
        f"            XQ[e] = T.Cast(\"int32\", T.round(T.Cast(\"float64\", T.Select(ok, "
        f"X[n, c * {ch} + e], T.float32(0))) * inv))",
        f"        for u in T.serial({ch // 4}):",
        "            for i in T.serial(16):",
        f"                t: T.let = {ent} + {OFFSET}",
        "                for h in T.serial(2):",
        "                    TB[n, c, u, 0, h * 16 + i] = T.Cast(\"uint8\", t & 255)",
        "                    TB[n, c, u, 1, h * 16 + i] = T.Cast(\"uint8\", (t >> 8) & 255)",
        "                    TB[n, c, u, 2, h * 16 + i] = T.Cast(\"uint8\", t >> 16)",
    ]


def _shuf(table: str, idx: str) -> str:
    return f'T.call_llvm_pure_intrin("uint8x32", "llvm.x86.avx2.pshuf.b", {table}, {idx})'


def _lookups(plan: LutPlan, sizes: dict[str, int]) -> list[str]:
    """The look-ups: TB, SX from the tables; C the packed codes [chunks, blocks, ch / 8, 32];
    A the scale [groups, lanes]; Y [N, blocks x 32] the lanes (o x Q + q) in order."""
    Gs, per, ch, M, MB = _geometry(plan, sizes)
    S, U = ch // 8, ch // 4
    threads = max(1, torch.get_num_threads())
    nt = min(threads, MB)
    tile = -(-MB // nt)
    odd_w = 'T.reinterpret("int8x32", T.Broadcast(T.uint16(256), 16))'   # bytes 0, 1, 0, 1..
    at = " " * 24
    body = [f"{at}acc = T.alloc_buffer((96,), \"uint16\")",
            f"{at}for i in T.vectorized(96):",
            f"{at}    acc[i] = T.uint16(0)",
            f"{at}for s in T.unroll({S}):",
            f"{at}    cb: T.let = C[c, mb, s, T.ramp(0, 1, 32)]"]
    for h, idx in enumerate(("cb & T.Broadcast(T.uint8(15), 32)",
                             "cb >> T.Broadcast(T.uint8(4), 32)")):
        body.append(f"{at}    ix{h}: T.let = {idx}")
        for p in range(3):
            lk = f"l{h}{p}"
            full, odd = f"acc[T.ramp({32 * p}, 1, 16)]", f"acc[T.ramp({32 * p + 16}, 1, 16)]"
            body += [
                f"{at}    {lk}: T.let = {_shuf(f'TB[n, c, s * 2 + {h}, {p}, T.ramp(0, 1, 32)]', f'ix{h}')}",
                f"{at}    {full} = {full} + T.reinterpret(\"uint16x16\", {lk})",
                f"{at}    {odd} = {odd} + T.reinterpret(\"uint16x16\", T.call_llvm_pure_intrin("
                f"\"int16x16\", \"llvm.x86.avx2.pmadd.ub.sw\", {lk}, {odd_w}))"]
    for p in range(3):
        body += [f"{at}o{p}: T.let = acc[T.ramp({32 * p + 16}, 1, 16)]",
                 f"{at}e{p}: T.let = acc[T.ramp({32 * p}, 1, 16)] - "
                 f"(o{p} << T.Broadcast(T.uint16(8), 16))"]

    def lanes(v: str, pick: int, wide: bool) -> str:   # the int32 sums x s x the scale
        whole = " + ".join([f'T.Cast("int32x16", {v}0)'] + [
            f'(T.Cast("int32x16", {v}{p}) << T.Broadcast({8 * p}, 16))' for p in (1, 2)])
        whole = f"{whole} - T.Broadcast({U * OFFSET}, 16)"
        a = f"T.Shuffle([A[g, T.ramp(mb * 32, 1, 32)]], [{', '.join(map(str, range(pick, 32, 2)))}])"
        if not wide:
            return (f'T.Cast("float32x16", {whole}) * T.Broadcast(T.Cast("float32", SX[n, c]), '
                    f"16) * {a}")
        return (f'T.Cast("float32x16", T.Cast("float64x16", {whole}) * T.Broadcast(SX[n, c], '
                f'16) * T.Cast("float64x16", {a}))')
    inter = ", ".join(f"{i}, {i + 16}" for i in range(16))
    yv = "Y[n, T.ramp(mb * 32, 1, 32)]"
    # in fp32 where s keeps |int| x s within fp32's normal range (|int| < 2^29), else in fp64
    # (a chunk of magnitudes below ~1e-23 or above ~1e33): no overflow or underflow before
    # the last rounding either way
    body += [f"{at}if T.float64(2.0 ** -100) <= SX[n, c] and SX[n, c] <= T.float64(2.0 ** 90):",
             f"{at}    {yv} = {yv} + T.Shuffle([{lanes('e', 0, False)}, "
             f"{lanes('o', 1, False)}], [{inter}])",
             f"{at}else:",
             f"{at}    {yv} = {yv} + T.Shuffle([{lanes('e', 0, True)}, "
             f"{lanes('o', 1, True)}], [{inter}])"]
    return [
        f"    for mt in T.parallel({nt}):",
        f"        for mi in T.serial({tile}):",
        f"            if mt * {tile} + mi < {MB}:",
        "                for n in T.serial(N):",
        f"                    Y[n, T.ramp((mt * {tile} + mi) * 32, 1, 32)] = "
        "T.Broadcast(T.float32(0), 32)",
        f"        for c in T.serial({Gs * per}):",
        f"            g: T.let = c // {per}",
        f"            for mi in T.serial({tile}):",
        f"                mb: T.let = mt * {tile} + mi",
        f"                if mb < {MB}:",
        "                    for n in T.serial(N):",
        *body,
    ]


def shuffle_source(plan: LutPlan, sizes: dict[str, int]) -> str:
    """The shuffle kernels as one function (one call, one wake-up of the thread pool):
    x [N, groups x positions] fp32, the packed codes, the scale [groups, lanes] (the lanes padded to
    a multiple of 32), out [N, O]; the tables and lanes are its own buffers."""
    Gs, per, ch, M, MB = _geometry(plan, sizes)
    _, O, Q, _ = plan.extents(sizes)
    NC = Gs * per
    terms = " + ".join(f"Y[n, o * {Q} + {q}]" for q in range(Q))
    return "\n".join([
        "@T.prim_func",
        "def main(x: T.handle, c_: T.handle, a: T.handle, out: T.handle):",
        '    T.func_attr({"global_symbol": "main", "tir.noalias": True})',
        "    N = T.int32()",
        f"    X = T.match_buffer(x, (N, {NC * ch}), \"float32\")",
        f"    C = T.match_buffer(c_, ({NC}, {MB}, {ch // 8}, 32), \"uint8\")",
        f"    A = T.match_buffer(a, ({Gs}, {MB * 32}), \"float32\")",
        f"    R = T.match_buffer(out, (N, {O}), \"float32\")",
        f"    TB = T.alloc_buffer((N, {NC}, {ch // 4}, 3, 32), \"uint8\")",
        f"    SX = T.alloc_buffer((N, {NC}), \"float64\")",
        f"    Y = T.alloc_buffer((N, {MB * 32}), \"float32\")",
        *_tables(NC, ch),
        *_lookups(plan, sizes),
        f"    for no in T.parallel(N * {O}):",
        f"        n: T.let = no // {O}",
        f"        o: T.let = no % {O}",
        f"        R[n, o] = {terms}",
    ]) + "\n"


_PACKED = WeakIdKeyDictionary()   # base tensor -> {view key: ((version, address), packed)}
_PACK_LOCK = threading.Lock()


def _pack(codes: torch.Tensor, Gs: int, per: int, ch: int, M: int, MB: int) -> torch.Tensor:
    """codes [groups, out, planes, bytes] (canonical) -> [chunks, blocks, ch / 8, 32]."""
    flat = codes.reshape(Gs, M, per, ch // 8)
    if MB * 32 != M:
        flat = torch.cat([flat, flat.new_zeros(Gs, MB * 32 - M, per, ch // 8)], 1)
    return (flat.reshape(Gs, MB, 32, per, ch // 8).permute(0, 3, 1, 4, 2)
            .reshape(Gs * per, MB, ch // 8, 32).contiguous())


def packed_codes(plan: LutPlan, codes: torch.Tensor, sizes: dict[str, int]) -> torch.Tensor:
    """The codes laid out for the look-up kernel, built once per codes tensor (and view of
    it) and kept while the tensor lives; rebuilt when the tensor was changed in place or its
    memory swapped. Writes that torch does not count in the version counter are not seen:
    through ``codes.data``, ``codes.untyped_storage()``, another tensor set onto the same
    storage or a numpy array sharing the memory (as autograd misses them); after one, call
    ``forget_packed(codes)``."""
    Gs, per, ch, M, MB = _geometry(plan, sizes)
    base = codes if codes._base is None else codes._base
    key = (plan.codes, dims_of(plan, plan.codes), canonical_order(plan),
           codes.storage_offset(), tuple(codes.shape), codes.stride(), ch)
    # checked besides the version: the address (a `.data =` swap keeps object and version);
    # a swap replaces the entry
    try:
        version = codes._version
    except RuntimeError:   # an inference tensor has no version counter: pack every call
        version = None
    if version is not None:
        with _PACK_LOCK:
            hit = _PACKED.get(base, {}).get(key)
        if hit is not None and hit[0] == (version, codes.data_ptr()):
            return hit[1]
    nbytes = {**sizes, plan.packed: sizes[plan.packed] // 8}   # the codes' last dim: bytes
    canon = _ordered(codes, dims_of(plan, plan.codes), canonical_order(plan), nbytes)
    packed = _pack(canon, Gs, per, ch, M, MB)
    if version is not None:
        with _PACK_LOCK:
            _PACKED.setdefault(base, {})[key] = ((version, codes.data_ptr()), packed)
    return packed


def forget_packed(codes: torch.Tensor) -> None:
    """Drop the packed copies of ``codes`` (and of every view of its base tensor)."""
    with _PACK_LOCK:
        _PACKED.pop(codes if codes._base is None else codes._base, None)


def bind_weights(plan: LutPlan, tc: TiledCall) -> Callable[[torch.Tensor], torch.Tensor]:
    """The shuffle kernels with ``tc``'s codes and scale fixed (packed and evaluated now):
    ``f(x)`` for rows ``x`` [N, groups x positions] (the row's dims in order (group, packed)),
    fp32 and contiguous, any N, returns [N, out] fp32. For a layer that calls with new rows
    and the same weights: per call, one allocation and the kernel."""
    sizes = plan_sizes(plan, tc)
    fn, = _compiled("shuffle", plan, sizes, shuffle_source)
    Gs, per, ch, M, MB = _geometry(plan, sizes)
    codes = packed_codes(plan, tc.tensors[plan.codes], sizes)
    a = ordered_scale(plan, tc, sizes).reshape(Gs, M)
    if MB * 32 != M:
        a = torch.cat([a, a.new_zeros(Gs, MB * 32 - M)], 1)
    O = sizes[plan.out]

    def call(x: torch.Tensor) -> torch.Tensor:
        out = torch.empty(x.shape[0], O)
        fn(x, codes, a, out)
        return out
    return call


def run_shuffle(plan: LutPlan, tc: TiledCall) -> torch.Tensor:
    """The LUT form with the shuffle kernels (any codes layout; an AVX2 CPU)."""
    x = tc.tensors[plan.row]
    rdims = dims_of(plan, plan.row)
    if x.dtype != torch.float32 or rdims != row_order(plan) or not x.is_contiguous():
        x = _ordered(x.float(), rdims, row_order(plan), tc.sizes, 1)
    out = bind_weights(plan, tc)(x.view(tc.N, -1))
    return out if tc.out_dtype == torch.float32 else out.to(tc.out_dtype)
