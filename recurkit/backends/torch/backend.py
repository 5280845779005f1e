"""The torch backend's protocol object (see ``backends.base``)."""
from __future__ import annotations

from ...lowering.forms import lower
from ...lowering.lut import LutPlan
from ..base import Backend


class TorchBackend(Backend):
    name = "torch"
    forms = ("sequential", "scan", "chunk_gated", "chunk_wy")
    kinds = ("recurrence", "tiled")
    auto_rank = 90
    stateless = True
    differentiable = True

    def auto_for(self, kind, form, device_type):
        return True   # the fallback: runs everything, everywhere

    def prepare(self, program, form, chunk):
        tp = lower(program, form, chunk)
        return tp.form, tp

    def runner(self, form, tp, knobs):
        from .tile import run_tile
        return lambda bc: run_tile(tp, bc)   # the sequential tile program runs the reference

    def chunk_adjoint_kernel(self, device_type):
        from .chunk_adjoint import run_chunk_adjoint_torch
        return run_chunk_adjoint_torch

    def scan_adjoint_kernel(self, device_type):
        from .scan_adjoint import run_scan_adjoint_torch
        return run_scan_adjoint_torch

    def tiled_forward(self, plan, tc):
        if isinstance(plan, LutPlan):
            from .lut import run_lut_torch
            return run_lut_torch(plan, tc)
        from .tiled import run_tiled_torch
        return run_tiled_torch(plan, tc)

    def tiled_backward(self, plan, tc, dy, need):
        if isinstance(plan, LutPlan):   # two matmuls with the dequantized weight
            from .lut import lut_grads_torch
            return lut_grads_torch(plan, tc, dy, need)
        from .tiled import tiled_grads_torch
        return tiled_grads_torch(plan, tc, dy)

    def run_packed(self, net, x, words, cache, scores=False):
        import torch

        from ...lowering.packed import eval_packed_reference
        return eval_packed_reference(net, x).to(torch.int32)

    def tuning_space(self, program, form, device_type, quick):
        if device_type != "cpu" or form not in ("scan", "chunk_gated", "chunk_wy"):
            return []   # tuned on CPUs, for the parallel forms; on a GPU Triton's kernels are
        if form == "scan":
            return [(None, {})]
        return [(c, {}) for c in ((16, 32, 64) if quick else (16, 32, 64, 128))]


BACKEND = TorchBackend()
