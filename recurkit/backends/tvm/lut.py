"""The LUT form as TVM CPU kernels (see ``lowering/lut.py``). ``run_lut_tvm`` picks one.

On x86 CPUs with AVX2 the default for small batches is the *shuffle* kernels
(``tvm.lut_shuffle``: byte shuffles over fixed-point tables of 4 inputs, within ~5e-7 of the
matmul). Kept beside them, and the default without AVX2, the *byte tables*, exact to fp32
rounding:

1. tables: per (sample, group) in parallel, for each byte s of 8 inputs the 256 signed sums
   ``L[n, g, s, b] = sum_j (bit j of b ? x : -x)[n, g, 8 s + j]``, built as the sum of two
   16-entry tables (low and high nibble), so each entry costs one add.
2. look-ups: blocks of outputs in parallel; per group (whose tables, S x 1 KB, stay in L1
   while the block's codes stream past), per output and sample, every code byte of every
   plane is one look-up; a plane's look-ups are summed as a balanced tree (independent adds,
   no serial chain), scaled and added to the output.

The *permute* kernels (``kernel="perm"``; AVX2, 32 | the packed size, 8 | outputs x planes,
codes laid out (group, out, plane, packed)), fp32 too, whose look-ups are register shuffles:

1. tables: per (sample, group, 32 inputs), ten 8-entry tables of the signed sums of 3
   consecutive inputs (positions 3j..3j+2) and one of the last 2 (30, 31): 8 floats, one
   AVX2 register each.
2. look-ups: 8 (output, plane) lanes at a time; a 32-bit word of codes holds a lane's 32 signs
   of those inputs in order, so ``vpermps(table_j, word >> 3j)`` answers 3 inputs for 8 lanes
   at once (it reads the low 3 bits of each lane's index), 11 per word. The lanes' words are
   loaded as they are stored (4 vectors for a group of 128) and transposed in registers.
   The lanes sit in the order [0, 2, 4, 6, 1, 3, 5, 7] in the registers (the in-lane transpose
   is cheaper); the alphas are shuffled to match. Each group's tables (1.4 KB for 128
   inputs) stay in L1 while a thread's run of lanes streams its codes past them.
3. finish: the lanes read back in order, the planes summed, per (sample, output).

The sums differ from the byte tables' only in grouping (3 inputs per table entry instead of
8), so both stay within fp32 rounding of the matmul with the dequantized weight.

From ``dense_from()`` samples on, look-ups cost more than a matmul (each sample repeats all
of them): ``run_lut_tvm`` then builds the dense weight a block of rows at a time with a TVM
kernel (codes laid out as above) and multiplies each block as it is built.
"""
from __future__ import annotations

import functools
import math
import threading
from typing import Callable

import torch

from ...ir.tiled import TiledCall
from ...lowering.lut import LutPlan
from ..torch.lut import dims_of, scale_tensor
from .sequential import _f
from .build import compile_source
from .nests import _fold

BLOCK_O = 512    # outputs per parallel block of the look-up kernel (at most)
PERM_TILE = 32   # lane blocks (of 8 lanes) per parallel tile of the permute look-up kernel
LANES = (0, 2, 4, 6, 1, 3, 5, 7)   # the permute kernel's lane order within a register
# from this many samples on, "auto" builds the dense weight and multiplies instead of looking
# up (see tvm.lut_dense and dense_from). Measured here, 4096 x 4096, 3 bits: the byte tables
# cost ~1 ms per sample, the weight ~7 ms once and the matmul with 16 samples ~12 ms; the
# shuffle kernels cost ~0.55 ms per sample: 18 / 28 / 40 / 64 ms at 32 / 48 / 64 / 96 samples
# against 30 / 35 / 43 / 57 ms dense, a crossover between 64 and 96. 48 leaves room for 4
# bits, whose look-ups cost ~4/3 as much per sample (an estimate from the plane count; the
# 4-bit crossover was not measured)
DENSE_FROM = 16
SHUFFLE_DENSE_FROM = 48


def dense_from() -> int:
    """The batch from which "auto" takes the dense kernel: ``SHUFFLE_DENSE_FROM`` where the
    shuffle kernels run (AVX2), else ``DENSE_FROM``."""
    return SHUFFLE_DENSE_FROM if has_avx2() else DENSE_FROM


def _index(dims, at: dict[str, str]) -> str:
    return ", ".join(at[d] for d in dims)


def _shape(dims, sizes: dict[str, int], packed: str | None = None) -> str:
    return ", ".join(str(sizes[d] // 8 if d == packed else sizes[d]) for d in dims)


def tables_source(plan: LutPlan, sizes: dict[str, int]) -> str:
    rdims = dims_of(plan, plan.row)
    Gs, _, _, E = plan.extents(sizes)
    S = E // 8

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
        f"                lo[b] = {_fold([x(j) for j in range(4)], 'add')}",
        f"                hi[b] = {_fold([x(j) for j in range(4, 8)], 'add')}",
        "            for bh in T.serial(16):",
        "                for bl in T.vectorized(16):",
        "                    L[n, g, s, bh * 16 + bl] = lo[bl] + hi[bh]",
    ]) + "\n"


def lookup_source(plan: LutPlan, sizes: dict[str, int], block: int = BLOCK_O) -> str:
    cdims = dims_of(plan, plan.codes)
    Gs, O, _, E = plan.extents(sizes)
    S = E // 8
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
        terms.append(f"{w} * {_fold(looks, 'add')}")
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


_KERNELS: dict[tuple, tuple[Callable, ...]] = {}
_SCRATCH = threading.local()   # per calling thread: tables and weight blocks, reused


def _scratch(name: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32
             ) -> torch.Tensor:
    n = math.prod(shape)
    buf = getattr(_SCRATCH, name, None)
    if buf is None or buf.numel() < n:
        buf = torch.empty(n, dtype=dtype)
        setattr(_SCRATCH, name, buf)
    return buf[:n].view(shape)


def _sel(bit: str, v: str) -> str:
    return f"T.Select({bit} == 1, {v}, -{v})"


def perm_tables_source(plan: LutPlan, sizes: dict[str, int]) -> str:
    """Tables of the permute kernels: TB[n, g, w, j, i] = sum_b (bit b of i ? x : -x) over
    inputs 32 w + 3 j + b (b < 3; b < 2 for j = 10), x read as [N, groups, positions]."""
    Gs, _, _, E = plan.extents(sizes)
    W = E // 32

    def x(k: str) -> str:
        return f"X[n, g, w * 32 + {k}]"
    trip = " + ".join(_sel(f"(i >> {b}) & 1", x(f"j * 3 + {b}")) for b in range(3))
    pair = " + ".join(_sel(f"(i >> {b}) & 1", x(str(30 + b))) for b in range(2))
    return "\n".join([
        "@T.prim_func",
        "def main(x: T.handle, tb: T.handle):",
        '    T.func_attr({"global_symbol": "main", "tir.noalias": True})',
        "    N = T.int32()",
        f"    X = T.match_buffer(x, (N, {Gs}, {E}), \"float32\")",
        f"    TB = T.match_buffer(tb, (N, {Gs}, {W}, 11, 8), \"float32\")",
        f"    for ng in T.parallel(N * {Gs}):",
        f"        n: T.let = ng // {Gs}",
        f"        g: T.let = ng % {Gs}",
        f"        for w in T.serial({W}):",
        "            for j in T.serial(10):",
        "                for i in T.vectorized(8):",
        f"                    TB[n, g, w, j, i] = {trip}",
        "            for i in T.vectorized(8):",
        f"                TB[n, g, w, 10, i] = {pair}",
    ]) + "\n"


def perm_lookup_source(plan: LutPlan, sizes: dict[str, int], tile: int = PERM_TILE) -> str:
    """Look-ups of the permute kernels: C the codes as int32 words [groups, lanes x words],
    A the scale [groups, lanes], Y [N, lanes] in the register lane order (``LANES``)."""
    Gs, O, Q, E = plan.extents(sizes)
    W, M = E // 32, O * Q
    MB = M // 8
    threads = max(1, torch.get_num_threads())
    nt = threads * -(-MB // (threads * tile))   # tiles: a multiple of the threads ...
    tile = -(-MB // nt)                         # ... of equal size
    vecs = ", ".join(f"C[g, T.ramp(mb * {8 * W} + {8 * k}, 1, 8)]" for k in range(W))
    leaves = []
    for w in range(W):
        word = f"T.Shuffle([{vecs}], [{', '.join(str(ln * W + w) for ln in LANES)}])"
        for j in range(11):
            idx = word if j == 0 else f"T.shift_right({word}, T.Broadcast({3 * j}, 8))"
            leaves.append(f'T.call_llvm_pure_intrin("float32x8", "llvm.x86.avx2.permps", '
                          f"TB[n, g, {w}, {j}, T.ramp(0, 1, 8)], {idx})")
    lanes = ", ".join(map(str, LANES))
    yv = "Y[n, T.ramp(mb * 8, 1, 8)]"
    return "\n".join([
        "@T.prim_func",
        "def main(tb: T.handle, c: T.handle, a: T.handle, y: T.handle):",
        '    T.func_attr({"global_symbol": "main", "tir.noalias": True})',
        "    N = T.int32()",
        f"    TB = T.match_buffer(tb, (N, {Gs}, {W}, 11, 8), \"float32\")",
        f"    C = T.match_buffer(c, ({Gs}, {M * W}), \"int32\")",
        f"    A = T.match_buffer(a, ({Gs}, {M}), \"float32\")",
        f"    Y = T.match_buffer(y, (N, {M}), \"float32\")",
        f"    for mt in T.parallel({nt}):",
        f"        for mi in T.serial({tile}):",
        f"            if mt * {tile} + mi < {MB}:",
        "                for n in T.serial(N):",
        f"                    Y[n, T.ramp((mt * {tile} + mi) * 8, 1, 8)] = "
        "T.Broadcast(T.float32(0), 8)",
        f"        for g in T.serial({Gs}):",
        f"            for mi in T.serial({tile}):",
        f"                mb: T.let = mt * {tile} + mi",
        f"                if mb < {MB}:",
        "                    for n in T.serial(N):",
        f"                        {yv} = {yv} + T.Shuffle([A[g, T.ramp(mb * 8, 1, 8)]], "
        f"[{lanes}]) * {_fold(leaves, 'add')}",
    ]) + "\n"


def perm_finish_source(plan: LutPlan, sizes: dict[str, int]) -> str:
    """y[n, o] = sum over planes of the look-up kernel's lanes, read back in order."""
    _, O, Q, _ = plan.extents(sizes)
    terms = []
    for q in range(Q):
        m = f"o * {Q} + {q}" if Q > 1 else "o"
        terms.append(f"Y[n, ({m}) // 8 * 8 + ({m}) % 2 * 4 + ({m}) % 8 // 2]")
    return "\n".join([
        "@T.prim_func",
        "def main(y: T.handle, out: T.handle):",
        '    T.func_attr({"global_symbol": "main", "tir.noalias": True})',
        "    N = T.int32()",
        f"    Y = T.match_buffer(y, (N, {O * Q}), \"float32\")",
        f"    R = T.match_buffer(out, (N, {O}), \"float32\")",
        f"    for no in T.parallel(N * {O}):",
        f"        n: T.let = no // {O}",
        f"        o: T.let = no % {O}",
        f"        R[n, o] = {' + '.join(terms)}",
    ]) + "\n"


def canonical_order(plan: LutPlan) -> tuple[str, ...]:
    """The codes' dims as the permute, shuffle and dense kernels read them: (group, out,
    plane, packed), the absent ones skipped."""
    return tuple(d for d in (plan.group, plan.out, plan.plane, plan.packed) if d)


def canonical_codes(plan: LutPlan) -> bool:
    """Whether the codes are laid out (group, out, plane, packed), the absent ones skipped."""
    return dims_of(plan, plan.codes) == canonical_order(plan)


def row_order(plan: LutPlan) -> tuple[str, ...]:
    """The row's dims as the permute and dense kernels read it: (group, packed)."""
    return tuple(d for d in (plan.group, plan.packed) if d)


def scale_order(plan: LutPlan) -> tuple[str, ...]:
    """The scale's dims as the permute and dense kernels read it: (group, out, plane)."""
    return tuple(d for d in (plan.group, plan.out, plan.plane) if d)


def plan_sizes(plan: LutPlan, tc: TiledCall) -> dict[str, int]:
    """The sizes the LUT kernels are specialised to (all dims of the plan but the samples)."""
    return {d: tc.sizes[d] for d in (plan.out, plan.plane, plan.group, plan.packed) if d}


def perm_applies(plan: LutPlan, sizes: dict[str, int]) -> bool:
    """Whether the permute kernels can run this plan at these sizes (the CPU aside)."""
    _, O, Q, E = plan.extents(sizes)
    return canonical_codes(plan) and E % 32 == 0 and O * Q % 8 == 0


@functools.cache
def has_avx2() -> bool:
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def _ordered(t: torch.Tensor, have: tuple[str, ...], want: tuple[str, ...],
             sizes: dict[str, int], lead: int = 0) -> torch.Tensor:
    """``t`` (``lead`` leading axes, then dims ``have``) permuted and broadcast to dims
    ``want``, contiguous."""
    if have == want:
        return t.contiguous()
    perm = list(range(lead)) + [lead + have.index(d) for d in want if d in have]
    view = list(t.shape[:lead]) + [sizes[d] if d in have else 1 for d in want]
    full = list(t.shape[:lead]) + [sizes[d] for d in want]
    return t.permute(perm).reshape(view).expand(full).contiguous()


def _compiled(kind: str, plan: LutPlan, sizes: dict[str, int], *sources) -> tuple:
    key = (kind, plan, tuple(sorted(sizes.items())), torch.get_num_threads())
    hit = _KERNELS.get(key)
    if hit is None:
        hit = _KERNELS[key] = tuple(compile_source(f(plan, sizes)) for f in sources)
    return hit


def _operands(plan: LutPlan, tc: TiledCall, sizes: dict[str, int]):
    """(x [N, groups, positions], codes [groups, out, planes, bytes], scale [groups, out,
    planes]) for the permute and dense kernels: fp32, contiguous, in those orders."""
    Gs, O, Q, E = plan.extents(sizes)
    x = _ordered(tc.tensors[plan.row].float(), dims_of(plan, plan.row), row_order(plan),
                 sizes, 1)
    codes = tc.tensors[plan.codes].contiguous().reshape(Gs, O, Q, E // 8)
    return x.reshape(tc.N, Gs, E), codes, ordered_scale(plan, tc, sizes)


def ordered_scale(plan: LutPlan, tc: TiledCall, sizes: dict[str, int]) -> torch.Tensor:
    """The scale [groups, out, planes] (absent dims of size 1), fp32, contiguous."""
    Gs, O, Q, _ = plan.extents(sizes)
    w = scale_tensor(plan, tc).reshape([sizes[d] for d in plan.scale_dims])
    return _ordered(w, plan.scale_dims, scale_order(plan), sizes).reshape(Gs, O, Q)


def _run_perm(plan: LutPlan, tc: TiledCall, sizes: dict[str, int]) -> torch.Tensor:
    tables, lookup, finish = _compiled("perm", plan, sizes, perm_tables_source,
                                       perm_lookup_source, perm_finish_source)
    x, codes, a = _operands(plan, tc, sizes)
    Gs, O, Q, S = codes.shape
    if codes.data_ptr() % 4:    # read as int32 words: a view needs 4-byte alignment
        codes = codes.clone()
    tb = _scratch("tables", (tc.N, Gs, S // 4, 11, 8))
    y = torch.empty(tc.N, O * Q)
    tables(x, tb)
    lookup(tb, codes.view(torch.int32).reshape(Gs, -1), a.reshape(Gs, O * Q), y)
    out = torch.empty(tc.N, O)
    finish(y, out)    # the lanes back in order, the planes summed
    return out.to(tc.out_dtype)


KERNELS = ("auto", "shuffle", "perm", "bytes", "dense")


def run_lut_tvm(plan: LutPlan, tc: TiledCall, kernel: str = "auto") -> torch.Tensor:
    """The LUT form on CPU. ``kernel``: "shuffle" (the AVX2 byte-shuffle kernels over
    fixed-point tables, ``tvm.lut_shuffle``), "perm" (the AVX2 permute kernels), "bytes" (the
    byte tables), "dense" (the dense weight built by a kernel, then one matmul) or "auto":
    dense from ``dense_from()`` samples on, else shuffle on an AVX2 CPU, else bytes (dense and
    perm need codes laid out (group, out, plane, packed); shuffle takes any layout)."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {', '.join(map(repr, KERNELS))}, got "
                         f"{kernel!r}")
    sizes = plan_sizes(plan, tc)
    if kernel == "dense" or (kernel == "auto" and tc.N >= dense_from()):
        if canonical_codes(plan):
            from .lut_dense import run_dense
            return run_dense(plan, tc, sizes)
        if kernel == "dense":
            raise ValueError("the dense kernel needs codes laid out (group, out, plane, "
                             "packed)")
    if kernel in ("auto", "shuffle"):
        if has_avx2():
            from .lut_shuffle import run_shuffle
            return run_shuffle(plan, tc)
        if kernel == "shuffle":
            raise ValueError("the shuffle kernels need an AVX2 CPU")
    if kernel == "perm":
        if perm_applies(plan, sizes) and has_avx2():
            return _run_perm(plan, tc, sizes)
        raise ValueError("the permute kernels need an AVX2 CPU, a packed size divisible "
                         "by 32, outputs x planes divisible by 8 and codes laid out "
                         "(group, out, plane, packed)")
    tables, lookup = _compiled("bytes", plan, sizes, tables_source, lookup_source)
    x = tc.tensors[plan.row].float().contiguous()
    codes = tc.tensors[plan.codes].contiguous()
    w = scale_tensor(plan, tc)
    Gs, O, _, E = plan.extents(sizes)
    lut = _scratch("tables", (tc.N, Gs, E // 8, 256))
    y = torch.empty(tc.N, O)
    tables(x, lut)
    lookup(lut, codes, w, y)
    return y.to(tc.out_dtype)
