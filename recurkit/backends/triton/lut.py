"""The LUT form for CUDA tensors as Triton kernels, two ways.

``dot``: a batch of samples shares every decoded weight tile, so the kernel decodes, per
group, the codes of a block of outputs into a [BLOCK_O, E] tile of ``sum_p w * (+-1)`` in
registers and multiplies it with the [BLOCK_N, E] block of samples (fp32 inputs with
``input_precision="ieee"``: exact to fp32 rounding).

``lut``: the table look-ups of the LUT form itself. A first kernel builds, per sample, group
and code byte, the 256 signed sums of its 8 positions (fp32, in global memory: 1 KiB per byte
of a row, so a sample's tables stay in L2); a second reads each code byte once and looks its
sum up, a program per (block of outputs, sample, slice of the groups); the slices' partial
sums are added on the host.

``run_lut_triton`` picks ``lut`` for batches of at most ``LUT_MAX_N`` samples and ``dot``
above (see benchmarks/shift_add_gpu.py for the measurement behind the switch). The plan's
dims reach the kernels as strides (0 for a dim a tensor lacks), so any declared layout works.
Both run in Triton's interpreter on CPU tensors (tests) and compile ahead of time.
"""
from __future__ import annotations

import torch
import triton

from ...ir.tiled import TiledCall
from ...lowering.lut import LutPlan
from ..torch.lut import dims_of, scale_tensor
from .runtime import load_module

BLOCK_E = 16   # positions decoded per step (32 spills registers on sm_80)
LUT_MAX_N = 8  # batches up to this size take the look-up kernels on a GPU


KERNEL_SOURCE = '''import triton
import triton.language as tl


@triton.jit
def _add(a, b):   # tl.sum is a JIT function of a module imported outside the interpreter
    return a + b


@triton.jit
def lut_dot_kernel(x_ptr, c_ptr, w_ptr, y_ptr, N, O, G, P, E, GS,
                   sxn, sxg, sxe, sco, scg, scp, scs, swo, swg, swp,
                   BLOCK_N: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_E: tl.constexpr):
    # y[s, n, o]: the groups of slice s (GS of them)
    pid_o = tl.program_id(0)
    pid_n = tl.program_id(1)
    s = tl.program_id(2)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    acc = tl.full([BLOCK_N, BLOCK_O], 0.0, tl.float32)
    for gi in range(0, GS):
        g = s * GS + gi
        mask_o = offs_o < tl.where(g < G, O, 0)
        for e0 in range(0, E, BLOCK_E):
            offs_e = e0 + tl.arange(0, BLOCK_E)
            mask_e = offs_e < tl.where(g < G, E, 0)
            byte = offs_e // 8      # the code byte of each position, and its bit
            bit = offs_e % 8
            xt = tl.load(x_ptr + offs_n[:, None] * sxn + g * sxg + offs_e[None, :] * sxe,
                         mask=mask_n[:, None] & mask_e[None, :], other=0.0)
            xt = xt.to(tl.float32)
            wt = tl.full([BLOCK_O, BLOCK_E], 0.0, tl.float32)
            for p in range(0, P):
                codes = tl.load(c_ptr + offs_o[:, None] * sco + g * scg + p * scp +
                                byte[None, :] * scs, mask=mask_o[:, None] & mask_e[None, :],
                                other=0).to(tl.int32)
                sign = ((codes >> bit[None, :]) & 1).to(tl.float32) * 2.0 - 1.0
                scale = tl.load(w_ptr + offs_o * swo + g * swg + p * swp, mask=mask_o,
                                other=0.0)
                wt += sign * scale[:, None]
            acc += tl.dot(xt, tl.trans(wt), input_precision="ieee")
    tl.store(y_ptr + (s * N + offs_n[:, None]) * O + offs_o[None, :], acc,
             mask=mask_n[:, None] & (offs_o < O)[None, :])


@triton.jit
def lut_tables_kernel(x_ptr, t_ptr, G, E, NB, sxn, sxg, sxe, BLOCK_B: tl.constexpr):
    # t[n, g, b, i] = sum_{j < 8} (+x[n, g, 8b + j] if bit j of i else -x[n, g, 8b + j])
    pid_ng = tl.program_id(0)
    n = pid_ng // G
    g = pid_ng % G
    offs_b = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    mask_b = offs_b < NB
    idx = tl.arange(0, 256)
    t = tl.full([BLOCK_B, 256], 0.0, tl.float32)
    for j in range(0, 8):
        e = offs_b * 8 + j
        xv = tl.load(x_ptr + n * sxn + g * sxg + e * sxe, mask=mask_b & (e < E),
                     other=0.0).to(tl.float32)
        on = ((idx >> j) & 1) == 1
        t += tl.where(on[None, :], xv[:, None], -xv[:, None])
    tl.store(t_ptr + (pid_ng * NB + offs_b[:, None]) * 256 + idx[None, :], t,
             mask=mask_b[:, None])


@triton.jit
def lut_lookup_kernel(t_ptr, c_ptr, w_ptr, y_ptr, N, O, G, P, NB, GS,
                      sco, scg, scp, scs, swo, swg, swp,
                      BLOCK_O: tl.constexpr, BLOCK_B: tl.constexpr):
    # y[s, n, o] = sum over the groups of slice s, the planes and the bytes b of
    #              w[o, g, p] * t[n, g, b, c[o, g, p, b]]
    pid_o = tl.program_id(0)
    n = tl.program_id(1)
    s = tl.program_id(2)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    acc = tl.full([BLOCK_O], 0.0, tl.float32)
    for gi in range(0, GS):
        g = s * GS + gi
        mask_g = offs_o < tl.where(g < G, O, 0)   # (not mask_o & (g < G): the interpreter
        #                                        makes that an int mask)
        for p in range(0, P):
            part = tl.full([BLOCK_O], 0.0, tl.float32)
            for b0 in range(0, NB, BLOCK_B):
                offs_b = b0 + tl.arange(0, BLOCK_B)
                m = mask_g[:, None] & (offs_b < NB)[None, :]
                codes = tl.load(c_ptr + offs_o[:, None] * sco + g * scg + p * scp +
                                offs_b[None, :] * scs, mask=m, other=0).to(tl.int32)
                vals = tl.load(t_ptr + ((n * G + g) * NB + offs_b[None, :]) * 256 + codes,
                               mask=m, other=0.0)
                part += tl.reduce(vals, 1, _add)
            scale = tl.load(w_ptr + offs_o * swo + g * swg + p * swp, mask=mask_g, other=0.0)
            acc += part * scale
    tl.store(y_ptr + (s * N + n) * O + offs_o, acc, mask=offs_o < O)
'''


def _stride(t: torch.Tensor, dims, d) -> int:
    return t.stride(dims.index(d)) if d is not None and d in dims else 0


def launch_args(plan: LutPlan, tc: TiledCall):
    """(x, codes, w, sizes, strides) for the kernels, from the plan's dims."""
    rdims, cdims = dims_of(plan, plan.row), dims_of(plan, plan.codes)
    x = tc.tensors[plan.row].contiguous()
    codes = tc.tensors[plan.codes].contiguous()
    w = scale_tensor(plan, tc)
    size = lambda d: tc.sizes[d] if d else 1  # noqa: E731
    sizes = (tc.N, size(plan.out), size(plan.group), size(plan.plane), size(plan.packed))
    xs = (x.stride(0), _stride(x, ("N",) + tuple(rdims), plan.group) if plan.group else 0,
          x.stride(1 + rdims.index(plan.packed)))
    cs = (_stride(codes, cdims, plan.out), _stride(codes, cdims, plan.group),
          _stride(codes, cdims, plan.plane), codes.stride(cdims.index(plan.packed)))
    sd = plan.scale_dims
    ws = (_stride(w, sd, plan.out), _stride(w, sd, plan.group), _stride(w, sd, plan.plane)) \
        if sd else (0, 0, 0)
    return x, codes, w, sizes, xs + cs + ws


def _slices(G: int, programs_per_slice: int, budget: int) -> tuple[int, int]:
    """(groups per slice, slices): split the groups so that about ``budget`` programs run."""
    slices = max(1, min(G, budget // max(1, programs_per_slice)))
    GS = triton.cdiv(G, slices)
    return GS, triton.cdiv(G, GS)


def _module(interpret: bool):
    return load_module(KERNEL_SOURCE, interpret)


def run_lut_triton(plan: LutPlan, tc: TiledCall, kernel: str | None = None,
                   block_n: int = 16, block_o: int = 32, programs: int = 512,
                   lut_block_o: int = 128, lut_block_b: int = 8,
                   lut_programs: int = 1024) -> torch.Tensor:
    """``kernel``: "lut" or "dot" (default: "lut" up to ``LUT_MAX_N`` samples on a GPU, "dot"
    otherwise). Both kernels split the groups into slices (partial sums added on the host)
    so that about ``programs`` / ``lut_programs`` programs run: a GEMV fills the GPU."""
    if kernel is None:
        kernel = "lut" if tc.device.type == "cuda" and tc.N <= LUT_MAX_N else "dot"
    if kernel not in ("lut", "dot"):
        raise ValueError(f"run_lut_triton: kernel must be 'lut' or 'dot', got {kernel!r}")
    x, codes, w, sizes, strides = launch_args(plan, tc)
    N, O, G, P, E = sizes
    interpret = tc.device.type != "cuda"
    mod = _module(interpret)
    if kernel == "dot":
        GS, slices = _slices(G, triton.cdiv(O, block_o) * triton.cdiv(N, block_n), programs)
    else:
        NB = triton.cdiv(E, 8)
        GS, slices = _slices(G, triton.cdiv(O, lut_block_o) * N, lut_programs)
    # each slice of the groups writes its partial sums; one slice writes the output itself
    parts = torch.empty(slices, N, O, device=x.device, dtype=torch.float32)
    with triton.knobs.runtime.scope():
        triton.knobs.runtime.interpret = interpret
        if kernel == "dot":
            block_e = min(BLOCK_E, max(16, triton.next_power_of_2(E)))
            grid = (triton.cdiv(O, block_o), triton.cdiv(N, block_n), slices)
            mod.lut_dot_kernel[grid](x, codes, w, parts, *sizes, GS, *strides,
                                     BLOCK_N=block_n, BLOCK_O=block_o, BLOCK_E=block_e)
        else:
            tables = torch.empty(N * G * NB * 256, device=x.device, dtype=torch.float32)
            tb = min(16, triton.next_power_of_2(NB))
            mod.lut_tables_kernel[(N * G, triton.cdiv(NB, tb))](x, tables, G, E, NB,
                                                                 *strides[:3], BLOCK_B=tb)
            bb = min(lut_block_b, triton.next_power_of_2(NB))
            mod.lut_lookup_kernel[(triton.cdiv(O, lut_block_o), N, slices)](
                tables, codes, w, parts, N, O, G, P, NB, GS, *strides[3:],
                BLOCK_O=lut_block_o, BLOCK_B=bb)
    return (parts[0] if slices == 1 else parts.sum(0)).to(tc.out_dtype)


def aot_report(arch: str = "sm_90", kernel: str = "dot", block_n: int = 16,
               block_o: int = 32, block_e: int = BLOCK_E, block_b: int = 16) -> dict:
    """Compile one of the kernels (``dot``, ``tables``, ``lookup``) for ``arch`` with no GPU
    (registers, spills, shared memory)."""
    from .runtime import aot_compile_kernel
    mod = _module(interpret=False)
    if kernel == "dot":
        fn, blocks = mod.lut_dot_kernel, {"BLOCK_N": block_n, "BLOCK_O": block_o,
                                          "BLOCK_E": block_e}
    elif kernel == "tables":
        fn, blocks = mod.lut_tables_kernel, {"BLOCK_B": block_b}
    elif kernel == "lookup":
        fn, blocks = mod.lut_lookup_kernel, {"BLOCK_O": block_o, "BLOCK_B": block_b}
    else:
        raise ValueError(f"aot_report: unknown kernel {kernel!r}")
    ptrs = {"x_ptr": "*fp32", "c_ptr": "*u8", "w_ptr": "*fp32", "y_ptr": "*fp32",
            "t_ptr": "*fp32"}
    sig = {a: "constexpr" if a in blocks else ptrs.get(a, "i32") for a in fn.arg_names}
    return aot_compile_kernel(fn, sig, blocks, arch)
