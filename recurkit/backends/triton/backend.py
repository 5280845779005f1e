"""The Triton backend's protocol object (see ``backends.base``)."""
from __future__ import annotations

from ...lowering.lut import LutPlan
from ..base import Backend
from . import runtime


class TritonBackend(Backend):
    name = "triton"
    forms = ("sequential", "scan", "chunk_gated", "chunk_wy")
    kinds = ("recurrence", "tiled")
    auto_rank = 20
    devices = ("cuda", "cpu")   # CPU tensors run in Triton's interpreter
    interpreted = ("cpu",)
    knob_defaults = runtime.DEFAULT_CONFIG
    knob_word = "Triton config key"

    def auto_for(self, kind, form, device_type):
        return kind == "tiled" and device_type == "cuda"

    def check_knobs(self, knobs):
        return runtime.check_config(knobs)

    def default_chunk(self, program, form):
        return runtime.default_chunk(program)

    def runner(self, form, tp, knobs):
        if knobs is None:   # none given: a tuned config shipped for this GPU, if any
            from . import configs

            def pick(bc):
                return configs.for_call(bc.program, tp, bc) if bc.device.type == "cuda" \
                    else None
        else:
            def pick(bc):
                return knobs
        if form == "sequential":
            return lambda bc: runtime.run_triton_sequential(bc, pick(bc))
        run = runtime.run_triton_scan if form == "scan" else runtime.run_triton_chunked
        return lambda bc: run(tp, bc, pick(bc))

    def default_adjoint_chunk(self, program, form):
        return 16   # its gradient kernel holds the state and its cotangent: fewest spills

    def chunk_adjoint_kernel(self, device_type):
        from .chunk_adjoint import run_chunk_adjoint_triton
        return run_chunk_adjoint_triton   # CUDA, or Triton's interpreter for CPU tensors

    def scan_adjoint_kernel(self, device_type):
        from .scan_adjoint import run_scan_adjoint_triton
        return run_scan_adjoint_triton

    def codegen(self, program, tp, sizes, H, knobs):
        return runtime.module_source(program, tp, sizes, H, knobs)

    def codegen_tiled(self, plan, sizes):
        if isinstance(plan, LutPlan):   # one module: tables + look-ups, and decode-and-dot
            from .lut import KERNEL_SOURCE
            return KERNEL_SOURCE
        from .tiled import module_source
        return module_source(plan, sizes)

    def tiled_forward(self, plan, tc):
        if isinstance(plan, LutPlan):
            from .lut import run_lut_triton
            return run_lut_triton(plan, tc)
        from .tiled import run_tiled_triton
        return run_tiled_triton(plan, tc)

    def tiled_backward(self, plan, tc, dy, need):
        if isinstance(plan, LutPlan):   # two matmuls with the dequantized weight, in torch
            from ..torch.lut import lut_grads_torch
            return lut_grads_torch(plan, tc, dy, need)
        from .tiled import tiled_grads_triton
        return tiled_grads_triton(plan, tc, dy)

    def run_packed(self, net, x, words, cache, scores=False):
        from .packed import program_buffers, run_packed_triton
        key = f"triton:{x.device}"
        if key not in cache:
            cache[key] = program_buffers(cache["program"], x.device)
        return run_packed_triton(cache["program"], x, cache[key])

    def tuning_space(self, program, form, device_type, quick):
        if device_type != "cuda":
            return []   # the interpreter is for correctness, not speed
        if form in ("sequential", "scan"):
            return [(None, {"block_v": bv, "num_warps": w})
                    for bv in ((32, 64) if quick else (16, 32, 64, 128)) for w in (2, 4, 8)]
        # segments: the state pass split along T (``segments.py``), for calls with too few
        # (sequence, head) pairs to fill the device
        return [(c, {"num_warps": w, "num_stages": s, "block_v": bv, "segments": sg})
                for sg in ((1, 8) if quick else (1, 4, 16))
                for c in ((16, 32) if quick else (16, 32, 64))
                for w in ((4, 8) if quick else (4, 8, 16))
                for s in ((2,) if quick else (1, 2, 3))
                for bv in ((32, 64) if quick else (16, 32, 64, 128))]

    def model_seconds(self, program, form, chunk, knobs, shape, dtype, device):
        """The roofline time of the chunk kernels' modelled traffic (``chunk_module.
        model_traffic``); the token loops (sequential, scan) are latency-bound over T, which
        a roofline does not see: no model."""
        if form not in ("chunk_gated", "chunk_wy"):
            return None
        import torch

        from ...ir.bind import bind_meta
        from ...lowering.forms import lower
        from .chunk_module import model_traffic
        dt = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        B, T, H, sizes = shape["B"], shape["T"], shape["H"], shape["sizes"]
        tp = lower(program, form, chunk or runtime.default_chunk(program))
        if tp.meta.get("frame") is not None:   # a rotating state: the rotation-free call
            program = tp.meta["frame"].program
        ex = tp.meta.get("expansion")
        if ex is not None:   # sub-steps: the expanded declaration's T * n fp32 tokens
            program, T, dt = ex.program, T * ex.count(sizes), torch.float32
        bc = bind_meta(program, B, T, H, sizes, dt, output_final_state=True)   # no data
        return model_traffic(tp, bc, runtime.check_config(knobs)).roofline(device)

    def static_check(self, program, form, chunk, knobs, sizes, H, arch, dtype="float32"):
        """Compiled ahead of time for ``arch``: more shared memory than the device has, or
        spilled registers, is a reason; so is failing to compile."""
        import torch

        from ...lowering.forms import lower
        cfg = runtime.check_config(knobs)
        dtype = runtime.DTYPE_NAMES.get(getattr(torch, dtype), "fp32")
        try:
            tp = None if form == "sequential" else lower(program, form, chunk)
            from ..shared.rotation import frame_of
            if frame_of(program) is not None:   # a rotating state: the rotation-free kernels
                program = frame_of(program).program
            if tp is not None and tp.meta.get("expansion") is not None:
                dtype = "fp32"   # sub-steps: the expanded call's inputs are fp32
            src = runtime.module_source(program, tp, sizes, H, cfg, dtype)
            report = runtime.aot_compile(src, arch, cfg, io=dtype)
        except Exception as e:  # noqa: BLE001 - a candidate that does not compile is dropped
            return f"does not compile for {arch}: {type(e).__name__}: {e}"[:300]
        bad = [r for r in report if r["shared"] > runtime.SHARED_LIMIT[arch] or
               (r["spill_bytes"] or 0) > 0]
        if bad:
            r = bad[0]
            return (f"{r['kernel']}: {r['shared']} B shared (limit "
                    f"{runtime.SHARED_LIMIT[arch]}), {r['spill_bytes']} B spilled")
        return None


BACKEND = TritonBackend()
