"""A hard logic-gate network's gate program (``recurkit.lowering.gates``) as one Triton kernel
of bitwise ops. Each program owns ``block_w`` int64 words (64 samples each) of every slot of
a global scratch [slots, words] (its own words only, so a barrier between runs is all the
synchronisation): it packs its samples' bool input rows into words itself (each byte read
once), runs every run in blocks of ``block_o`` gates as one bitwise op (the run's op a
constant in the code), then counts each class's members ``block_m`` at a time (their words
loaded together, each word's 64 bits added to the samples' counts in registers) and writes
every sample's count. A launch covers as many words as a scratch of ``SCRATCH_BYTES`` holds
(on CUDA; ``INTERPRET_WORDS`` in the interpreter), so there are enough programs in flight to
hide the gathers' latency. Runs on the GPU for CUDA tensors and in Triton's interpreter for
CPU tensors.
"""
from __future__ import annotations

import torch

from ...lowering.gates import COUNT_CHUNK, NOT, GateProgram
from .runtime import aot_compile_kernel, load_module
from .sequential import HEADER

# the defaults: words per program, gates per block, members per count step, warps
BLOCK_W, BLOCK_O, BLOCK_M, NUM_WARPS = 16, 64, 4, 4
SCRATCH_BYTES = 1 << 30   # the gate scratch of one launch on CUDA (the words it covers)
INTERPRET_WORDS = 64      # words per launch in the interpreter
_OP = {1: "a & b", 2: "a & ~b", 6: "a ^ b", 7: "a | b", 8: "~(a | b)", 9: "~(a ^ b)",
       11: "a | ~b", 14: "~(a & b)", NOT: "~a"}


def packed_source(prog: GateProgram, block_m: int = BLOCK_M) -> str:
    """The kernel's source; ``block_m`` (members loaded per count step, a power of two up to
    ``COUNT_CHUNK``) is unrolled in it."""
    if not 1 <= block_m <= COUNT_CHUNK or block_m & (block_m - 1):
        raise ValueError(f"block_m must be a power of two up to {COUNT_CHUNK}, got {block_m}")
    K, F = prog.classes, prog.in_dim
    L = [HEADER, "", "@triton.jit",
         "def hard(X, D, A, B, M, S, OUT, NW, NR, BLOCK_W: tl.constexpr, "
         "BLOCK_O: tl.constexpr):",
         "    w = tl.program_id(0) * BLOCK_W + tl.arange(0, BLOCK_W)",
         "    wmask = w < NW",
         "    row0 = w.to(tl.int64) * 64",
         # the inputs: sample row0 + b of each word's bool row is bit b of its slot's word
         f"    for f0 in range(0, {F}, BLOCK_O):",
         "        f = f0 + tl.arange(0, BLOCK_O)",
         f"        fm = f < {F}",
         "        word = tl.full([BLOCK_O, BLOCK_W], 0, tl.int64)",
         "        for b in range(64):",
         "            r = row0 + b",
         f"            bit = tl.load(X + r[None, :] * {F} + f[:, None], "
         "mask=fm[:, None] & (r < NR)[None, :], other=0)",
         "            word |= bit.to(tl.int64) << b",
         "        tl.store(S + f.to(tl.int64)[:, None] * NW + w[None, :], word, "
         "mask=fm[:, None] & wmask[None, :])",
         f"    tl.store(S + {prog.zero_slot} * NW + w, w * 0, mask=wmask)",
         "    tl.debug_barrier()"]
    off = 0
    for r in prog.runs:
        n = r.dst.numel()
        L += [f"    for i0 in range(0, {n}, BLOCK_O):",
              "        i = i0 + tl.arange(0, BLOCK_O)",
              f"        im = i < {n}",
              "        msk = im[:, None] & wmask[None, :]",
              *(f"        s{v} = tl.load({t} + {off} + i, mask=im, other=0).to(tl.int64)"
                for v, t in (("d", "D"), ("a", "A"), ("b", "B"))),
              "        a = tl.load(S + sa[:, None] * NW + w[None, :], mask=msk, other=0)",
              "        b = tl.load(S + sb[:, None] * NW + w[None, :], mask=msk, other=0)",
              f"        tl.store(S + sd[:, None] * NW + w[None, :], {_OP[r.op]}, mask=msk)",
              "    tl.debug_barrier()"]
        off += n
    # counts: per class, block_m members' words loaded at a time (independent loads, in
    # flight together), each word's bits added per sample
    L += ["    s = tl.arange(0, 64).to(tl.int64)",
          "    out = (w[:, None] * 64 + s[None, :]) * " + str(K)]
    off = 0
    for c, (mem, const) in enumerate(zip(prog.members, prog.const)):
        n = mem.numel()   # a multiple of COUNT_CHUNK, which block_m divides
        L += [f"    acc = tl.full([BLOCK_W, 64], {const}, tl.int32)",
              f"    for j0 in range(0, {n}, {block_m}):",
              *(f"        v{u} = tl.load(S + tl.load(M + {off + u} + j0).to(tl.int64) * NW + w, "
                "mask=wmask, other=0)" for u in range(block_m)),
              "        acc += (" + " + ".join(f"((v{u}[:, None] >> s[None, :]) & 1)"
                                          for u in range(block_m)) + ").to(tl.int32)",
              f"    tl.store(OUT + out + {c}, acc, mask=wmask[:, None])"]
        off += n
    return "\n".join(L) + "\n"


def program_buffers(prog: GateProgram, device) -> tuple[torch.Tensor, ...]:
    """The kernel's int32 tables on ``device``: the runs' destination, first and second
    slots (concatenated in run order) and the classes' members."""
    cat = lambda ts: torch.cat(ts) if ts else torch.zeros(1, dtype=torch.int32)  # noqa: E731
    return tuple(t.to(device) for t in (cat([r.dst for r in prog.runs]),
                                         cat([r.a for r in prog.runs]),
                                         cat([r.b for r in prog.runs]),
                                         cat(list(prog.members))))


def launch_words(prog: GateProgram, device, block_w: int = BLOCK_W,
                 scratch_bytes: int | None = None) -> int:
    """Words one launch covers: as many as a scratch of ``scratch_bytes`` (default
    ``SCRATCH_BYTES``, on CUDA) holds, a multiple of ``block_w``; ``INTERPRET_WORDS`` off
    CUDA."""
    if torch.device(device).type != "cuda":
        return INTERPRET_WORDS
    fit = (scratch_bytes or SCRATCH_BYTES) // (8 * prog.slots)
    return max(block_w, fit // block_w * block_w)


def run_packed_triton(prog: GateProgram, x: torch.Tensor, buffers: tuple,
                      block_w: int = BLOCK_W, block_o: int = BLOCK_O, block_m: int = BLOCK_M,
                      num_warps: int = NUM_WARPS,
                      scratch_bytes: int | None = None) -> torch.Tensor:
    """Counts [N rounded up to 64, classes] (int32) of bool inputs ``x`` [N, in_dim]
    (``buffers``: ``program_buffers`` on x's device). The blocks are powers of two; the
    defaults are the module's constants."""
    import triton
    for name, v in (("block_w", block_w), ("block_o", block_o), ("num_warps", num_warps)):
        if v < 1 or v & (v - 1):
            raise ValueError(f"{name} must be a power of two, got {v}")
    interpret = x.device.type != "cuda"
    mod = load_module(packed_source(prog, block_m), interpret)
    per = launch_words(prog, x.device, block_w, scratch_bytes) * 64
    out = torch.empty(-(-x.shape[0] // 64) * 64, prog.classes, dtype=torch.int32,
                      device=x.device)
    xb = x.contiguous().view(torch.uint8)   # the kernel packs the bool rows itself
    S = None
    for start in range(0, x.shape[0], per):
        rows = xb[start:start + per]
        NW = -(-rows.shape[0] // 64)
        if S is None or S.numel() < prog.slots * NW:
            S = torch.empty(prog.slots * NW, dtype=torch.int64, device=x.device)
        grid = (-(-NW // block_w),)
        args = (rows, *buffers, S, out[start:start + NW * 64], NW, rows.shape[0], block_w,
                block_o)
        if interpret:
            with triton.knobs.runtime.scope():
                triton.knobs.runtime.interpret = True
                mod.hard[grid](*args)
        else:
            mod.hard[grid](*args, num_warps=num_warps)
    return out


def aot_report(prog: GateProgram, arch: str = "sm_90") -> dict:
    """Compile the program's kernel for ``arch`` with no GPU (registers, spills, shared)."""
    fn = load_module(packed_source(prog), interpret=False).hard
    sig = {"X": "*u8", "D": "*i32", "A": "*i32", "B": "*i32", "M": "*i32", "S": "*i64",
           "OUT": "*i32", "NW": "i32", "NR": "i32", "BLOCK_W": "constexpr", "BLOCK_O": "constexpr"}
    return aot_compile_kernel(fn, sig, {"BLOCK_W": BLOCK_W, "BLOCK_O": BLOCK_O}, arch)
