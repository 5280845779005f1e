"""The LUT form for CUDA tensors as one Triton kernel: bit-planes decoded in registers, then
``tl.dot``.

On a GPU a batch of samples shares every decoded weight tile, so instead of tables the kernel
decodes, per group, the codes of a block of outputs into a [BLOCK_O, E] tile of
``sum_p w * (+-1)`` in registers and multiplies it with the [BLOCK_N, E] block of samples on
the tensor cores (fp32 inputs with ``input_precision="ieee"``: exact to fp32 rounding). The
plan's dims reach the kernel as strides (0 for a dim a tensor lacks), so any declared layout
works. Runs in Triton's interpreter on CPU tensors (tests) and compiles ahead of time.
"""
from __future__ import annotations

import torch
import triton

from ..ir.tiled import TiledCall
from ..lowering.lut import LutPlan
from .lut_torch import dims_of, scale_tensor
from .triton_backend import load_module

BLOCK_E = 32   # positions decoded per step (larger tiles spill registers on sm_80/sm_90)


KERNEL_SOURCE = '''import triton
import triton.language as tl


@triton.jit
def lut_dot_kernel(x_ptr, c_ptr, w_ptr, y_ptr, N, O, G, P, E,
                   sxn, sxg, sxe, sco, scg, scp, scs, swo, swg, swp,
                   BLOCK_N: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_E: tl.constexpr):
    pid_o = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_o = offs_o < O
    mask_n = offs_n < N
    acc = tl.full([BLOCK_N, BLOCK_O], 0.0, tl.float32)
    for g in range(0, G):
        for e0 in range(0, E, BLOCK_E):
            offs_e = e0 + tl.arange(0, BLOCK_E)
            mask_e = offs_e < E
            byte = offs_e // 8      # the code byte of each position, and its bit
            bit = offs_e % 8
            xt = tl.load(x_ptr + offs_n[:, None] * sxn + g * sxg + offs_e[None, :] * sxe,
                         mask=mask_n[:, None] & mask_e[None, :], other=0.0).to(tl.float32)
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
    tl.store(y_ptr + offs_n[:, None] * O + offs_o[None, :], acc,
             mask=mask_n[:, None] & mask_o[None, :])
'''


def _stride(t: torch.Tensor, dims, d) -> int:
    return t.stride(dims.index(d)) if d is not None and d in dims else 0


def launch_args(plan: LutPlan, tc: TiledCall):
    """(x, codes, w, y, sizes, strides) for the kernel, from the plan's dims."""
    rdims, cdims = dims_of(plan, plan.row), dims_of(plan, plan.codes)
    x = tc.tensors[plan.row].contiguous()
    codes = tc.tensors[plan.codes].contiguous()
    w = scale_tensor(plan, tc)
    y = torch.empty(tc.N, tc.sizes[plan.out], device=x.device, dtype=torch.float32)
    size = lambda d: tc.sizes[d] if d else 1  # noqa: E731
    sizes = (tc.N, size(plan.out), size(plan.group), size(plan.plane), size(plan.packed))
    xs = (x.stride(0), _stride(x, ("N",) + tuple(rdims), plan.group) if plan.group else 0,
          x.stride(1 + rdims.index(plan.packed)))
    cs = (_stride(codes, cdims, plan.out), _stride(codes, cdims, plan.group),
          _stride(codes, cdims, plan.plane), codes.stride(cdims.index(plan.packed)))
    sd = plan.scale_dims
    ws = (_stride(w, sd, plan.out), _stride(w, sd, plan.group), _stride(w, sd, plan.plane)) \
        if sd else (0, 0, 0)
    return x, codes, w, y, sizes, xs + cs + ws


def run_lut_triton(plan: LutPlan, tc: TiledCall, block_n: int = 16,
                   block_o: int = 32) -> torch.Tensor:
    x, codes, w, y, sizes, strides = launch_args(plan, tc)
    N, O = sizes[0], sizes[1]
    block_e = min(BLOCK_E, max(16, triton.next_power_of_2(sizes[4])))
    grid = (triton.cdiv(O, block_o), triton.cdiv(N, block_n))
    interpret = tc.device.type != "cuda"
    kernel = load_module(KERNEL_SOURCE, interpret).lut_dot_kernel
    with triton.knobs.runtime.scope():
        triton.knobs.runtime.interpret = interpret
        kernel[grid](x, codes, w, y, *sizes, *strides, BLOCK_N=block_n, BLOCK_O=block_o,
                     BLOCK_E=block_e)
    return y.to(tc.out_dtype)


def aot_report(arch: str = "sm_90", block_n: int = 16, block_o: int = 32,
               block_e: int = 32) -> dict:
    """Compile the kernel for ``arch`` with no GPU (registers, spills, shared memory)."""
    from .triton_backend import aot_compile_kernel
    fn = load_module(KERNEL_SOURCE, interpret=False).lut_dot_kernel
    blocks = {"BLOCK_N": block_n, "BLOCK_O": block_o, "BLOCK_E": block_e}
    ptrs = {"x_ptr": "*fp32", "c_ptr": "*u8", "w_ptr": "*fp32", "y_ptr": "*fp32"}
    sig = {a: "constexpr" if a in blocks else ptrs.get(a, "i32") for a in fn.arg_names}
    return aot_compile_kernel(fn, sig, blocks, arch)
