"""A hard logic-gate network as one Triton kernel of bitwise ops (see ``tvm.packed`` for the
math). Each program owns ``BLOCK_W`` int64 words (64 samples each) of every row: it runs the
layers one after another through a global scratch [2, widest layer, words] (its own words
only, so a barrier between layers is all the synchronisation), each layer in blocks of
``BLOCK_O`` neurons, then GroupSum with bit-sliced counters in a global [classes, bits, words]
scratch, and writes every sample's counts. Runs on the GPU for CUDA tensors and in Triton's
interpreter for CPU tensors.
"""
from __future__ import annotations

import torch

from ...lowering.packed import PackedNet, pack_bits_torch
from .runtime import aot_compile_kernel, load_module
from .sequential import HEADER

BLOCK_W, BLOCK_O = 16, 64
MAX_WORDS = 1024   # words per launch (65536 samples): bounds the scratch memory


def packed_source(net: PackedNet) -> str:
    widths = [layer.out_dim for layer in net.layers]
    K, G = net.classes, net.group
    nbits = G.bit_length()
    L = [HEADER, "", "@triton.jit",
         "def hard(X, IA, IB, MK, S, CNT, OUT, NW, BLOCK_W: tl.constexpr, "
         "BLOCK_O: tl.constexpr):",
         "    w = tl.program_id(0) * BLOCK_W + tl.arange(0, BLOCK_W)",
         "    wmask = w < NW",
         f"    half = {max(widths)} * NW"]
    off = 0
    for i, O in enumerate(widths):
        src = "X" if i == 0 else f"S + {(i - 1) % 2} * half"
        dst = f"S + {i % 2} * half"
        L += [f"    for o0 in range(0, {O}, BLOCK_O):",
              "        o = o0 + tl.arange(0, BLOCK_O)",
              f"        om = o < {O}",
              f"        ia = tl.load(IA + {off} + o, mask=om, other=0).to(tl.int64)",
              f"        ib = tl.load(IB + {off} + o, mask=om, other=0).to(tl.int64)",
              "        msk = om[:, None] & wmask[None, :]",
              f"        a = tl.load({src} + ia[:, None] * NW + w[None, :], mask=msk, other=0)",
              f"        b = tl.load({src} + ib[:, None] * NW + w[None, :], mask=msk, other=0)",
              *(f"        m{j} = tl.load(MK + ({off} + o) * 4 + {j}, mask=om, other=0)[:, None]"
                for j in range(4)),
              "        y = m0 ^ (m1 & a) ^ (m2 & b) ^ (m3 & (a & b))",
              f"        tl.store({dst} + o.to(tl.int64)[:, None] * NW + w[None, :], y, mask=msk)",
              "    tl.debug_barrier()"]
        off += O
    last = f"S + {(len(widths) - 1) % 2} * half"
    L += [f"    for c in range({K}):",
          f"        for j in range({G}):",
          f"            carry = tl.load({last} + (c * {G} + j) * NW + w, mask=wmask, other=0)",
          f"            for k in range({nbits}):",
          f"                at = CNT + (c * {nbits} + k) * NW + w",
          "                cur = tl.load(at, mask=wmask, other=0)",
          "                tl.store(at, cur ^ carry, mask=wmask)",
          "                carry = cur & carry",
          "    s = tl.arange(0, 64).to(tl.int64)",
          f"    for c in range({K}):",
          "        acc = tl.full([BLOCK_W, 64], 0, tl.int32)",
          f"        for k in range({nbits}):",
          f"            cw = tl.load(CNT + (c * {nbits} + k) * NW + w, mask=wmask, other=0)",
          "            acc += (((cw[:, None] >> s[None, :]) & 1) << k).to(tl.int32)",
          f"        tl.store(OUT + (w[:, None] * 64 + s[None, :]) * {K} + c, acc, "
          "mask=wmask[:, None])"]
    return "\n".join(L) + "\n"


def pack_words(x: torch.Tensor) -> torch.Tensor:
    """Bool inputs [N, F] as int64 words [F, ceil(N / 64)] (sample n at bit n % 64 of word
    n // 64), with torch ops on the inputs' device."""
    return pack_bits_torch(x, 1)[:, :, 0].T.contiguous()


def run_packed_triton(net: PackedNet, x: torch.Tensor, buffers: tuple) -> torch.Tensor:
    """Counts [N rounded up to 64, classes] (int32) of bool inputs ``x`` [N, in_dim]."""
    import triton
    interpret = x.device.type != "cuda"
    mod = load_module(packed_source(net), interpret)
    ia, ib, mk = buffers
    outs = []
    for start in range(0, x.shape[0], MAX_WORDS * 64):
        xp = pack_words(x[start:start + MAX_WORDS * 64])
        NW = xp.shape[1]
        widest = max(layer.out_dim for layer in net.layers)
        S = torch.empty(2 * widest * NW, dtype=torch.int64, device=x.device)
        CNT = torch.zeros(net.classes * net.group.bit_length() * NW, dtype=torch.int64,
                          device=x.device)
        out = torch.empty(NW * 64, net.classes, dtype=torch.int32, device=x.device)
        grid = (-(-NW // BLOCK_W),)
        args = (xp, ia, ib, mk, S, CNT, out, NW, BLOCK_W, BLOCK_O)
        if interpret:
            with triton.knobs.runtime.scope():
                triton.knobs.runtime.interpret = True
                mod.hard[grid](*args)
        else:
            mod.hard[grid](*args)
        outs.append(out)
    return torch.cat(outs)


def aot_report(net: PackedNet, arch: str = "sm_90") -> dict:
    """Compile the network's kernel for ``arch`` with no GPU (registers, spills, shared)."""
    fn = load_module(packed_source(net), interpret=False).hard
    sig = {"X": "*i64", "IA": "*i32", "IB": "*i32", "MK": "*i64", "S": "*i64", "CNT": "*i64",
           "OUT": "*i32", "NW": "i32", "BLOCK_W": "constexpr", "BLOCK_O": "constexpr"}
    return aot_compile_kernel(fn, sig, {"BLOCK_W": BLOCK_W, "BLOCK_O": BLOCK_O}, arch)
