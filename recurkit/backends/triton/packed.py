"""A hard logic-gate network's gate program (``recurkit.lowering.gates``) as one Triton kernel
of bitwise ops. Each program owns ``BLOCK_W`` int64 words (64 samples each) of every slot of
a global scratch [slots, words] (its own words only, so a barrier between runs is all the
synchronisation): it copies the packed inputs in, runs every run in blocks of ``BLOCK_O``
gates as one bitwise op (the run's op a constant in the code), then counts each class's
members with bit-sliced ripple-carry counters in a global [classes, bits, words] scratch and
writes every sample's count. Runs on the GPU for CUDA tensors and in Triton's interpreter for
CPU tensors.
"""
from __future__ import annotations

import torch

from ...lowering.gates import NOT, GateProgram
from ...lowering.packed import pack_bits_torch
from .runtime import aot_compile_kernel, load_module
from .sequential import HEADER

BLOCK_W, BLOCK_O = 16, 64
MAX_WORDS = 1024   # words per launch (65536 samples): bounds the scratch memory
_OP = {1: "a & b", 2: "a & ~b", 6: "a ^ b", 7: "a | b", 8: "~(a | b)", 9: "~(a ^ b)",
       11: "a | ~b", 14: "~(a & b)", NOT: "~a"}


def count_bits(prog: GateProgram) -> int:
    """Bits of the class counters: enough for the longest (padded) member list."""
    return max(1, max(m.numel() for m in prog.members).bit_length())


def packed_source(prog: GateProgram) -> str:
    K, F = prog.classes, prog.in_dim
    nbits = count_bits(prog)
    L = [HEADER, "", "@triton.jit",
         "def hard(X, D, A, B, M, S, CNT, OUT, NW, BLOCK_W: tl.constexpr, "
         "BLOCK_O: tl.constexpr):",
         "    w = tl.program_id(0) * BLOCK_W + tl.arange(0, BLOCK_W)",
         "    wmask = w < NW",
         f"    for f0 in range(0, {F}, BLOCK_O):",
         "        f = f0 + tl.arange(0, BLOCK_O)",
         f"        msk = (f < {F})[:, None] & wmask[None, :]",
         "        at = f.to(tl.int64)[:, None] * NW + w[None, :]",
         "        tl.store(S + at, tl.load(X + at, mask=msk, other=0), mask=msk)",
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
    off = 0
    for c, mem in enumerate(prog.members):
        L += [f"    for j in range({mem.numel()}):",
              f"        slot = tl.load(M + {off} + j).to(tl.int64)",
              "        carry = tl.load(S + slot * NW + w, mask=wmask, other=0)",
              f"        for k in range({nbits}):",
              f"            at = CNT + ({c} * {nbits} + k) * NW + w",
              "            cur = tl.load(at, mask=wmask, other=0)",
              "            tl.store(at, cur ^ carry, mask=wmask)",
              "            carry = cur & carry"]
        off += mem.numel()
    L += ["    s = tl.arange(0, 64).to(tl.int64)"]
    for c, const in enumerate(prog.const):
        L += [f"    acc = tl.full([BLOCK_W, 64], {const}, tl.int32)",
              f"    for k in range({nbits}):",
              f"        cw = tl.load(CNT + ({c} * {nbits} + k) * NW + w, mask=wmask, other=0)",
              "        acc += (((cw[:, None] >> s[None, :]) & 1) << k).to(tl.int32)",
              f"    tl.store(OUT + (w[:, None] * 64 + s[None, :]) * {K} + {c}, acc, "
              "mask=wmask[:, None])"]
    return "\n".join(L) + "\n"


def program_buffers(prog: GateProgram, device) -> tuple[torch.Tensor, ...]:
    """The kernel's int32 tables on ``device``: the runs' destination, first and second
    slots (concatenated in run order) and the classes' members."""
    cat = lambda ts: torch.cat(ts) if ts else torch.zeros(1, dtype=torch.int32)  # noqa: E731
    return tuple(t.to(device) for t in (cat([r.dst for r in prog.runs]),
                                         cat([r.a for r in prog.runs]),
                                         cat([r.b for r in prog.runs]),
                                         cat(list(prog.members))))


def pack_words(x: torch.Tensor) -> torch.Tensor:
    """Bool inputs [N, F] as int64 words [F, ceil(N / 64)] (sample n at bit n % 64 of word
    n // 64), with torch ops on the inputs' device."""
    return pack_bits_torch(x, 1)[:, :, 0].T.contiguous()


def run_packed_triton(prog: GateProgram, x: torch.Tensor, buffers: tuple) -> torch.Tensor:
    """Counts [N rounded up to 64, classes] (int32) of bool inputs ``x`` [N, in_dim]
    (``buffers``: ``program_buffers`` on x's device)."""
    import triton
    interpret = x.device.type != "cuda"
    mod = load_module(packed_source(prog), interpret)
    outs = []
    for start in range(0, x.shape[0], MAX_WORDS * 64):
        xp = pack_words(x[start:start + MAX_WORDS * 64])
        NW = xp.shape[1]
        S = torch.empty(prog.slots * NW, dtype=torch.int64, device=x.device)
        CNT = torch.zeros(prog.classes * count_bits(prog) * NW, dtype=torch.int64,
                          device=x.device)
        out = torch.empty(NW * 64, prog.classes, dtype=torch.int32, device=x.device)
        grid = (-(-NW // BLOCK_W),)
        args = (xp, *buffers, S, CNT, out, NW, BLOCK_W, BLOCK_O)
        if interpret:
            with triton.knobs.runtime.scope():
                triton.knobs.runtime.interpret = True
                mod.hard[grid](*args)
        else:
            mod.hard[grid](*args)
        outs.append(out)
    return torch.cat(outs)


def aot_report(prog: GateProgram, arch: str = "sm_90") -> dict:
    """Compile the program's kernel for ``arch`` with no GPU (registers, spills, shared)."""
    fn = load_module(packed_source(prog), interpret=False).hard
    sig = {"X": "*i64", "D": "*i32", "A": "*i32", "B": "*i32", "M": "*i32", "S": "*i64",
           "CNT": "*i64",
           "OUT": "*i32", "NW": "i32", "BLOCK_W": "constexpr", "BLOCK_O": "constexpr"}
    return aot_compile_kernel(fn, sig, {"BLOCK_W": BLOCK_W, "BLOCK_O": BLOCK_O}, arch)
