"""The TVM backend's protocol object (see ``backends.base``)."""
from __future__ import annotations

import itertools

import torch

from ...lowering.lut import LutPlan
from ..base import CHUNK_FORMS, Backend
from . import lut as _lut
from .sequential import DEFAULT_KNOBS, check_knobs


class TvmBackend(Backend):
    name = "tvm"
    forms = ("sequential", "scan", "chunk_gated", "chunk_wy")
    kinds = ("recurrence", "tiled")
    auto_rank = 10
    devices = ("cpu",)
    knob_defaults = DEFAULT_KNOBS
    knob_word = "TVM knob"

    def auto_for(self, kind, form, device_type):
        # CPU calls: the sequential kernel for recurrences, the compiled tiled kernels
        return device_type == "cpu" and (kind == "tiled" or form in (None, "sequential"))

    def check_knobs(self, knobs):
        return check_knobs(knobs)

    def default_form(self, program):
        return "sequential"   # on a CPU the token loop is the fastest form at most shapes

    def runner(self, form, tp, knobs):
        if form == "sequential":
            from . import sequential   # looked up per call (tests replace it)
            return lambda bc: sequential.run_tvm_sequential(bc, knobs)
        from .chunk import run_tvm_chunked, run_tvm_scan
        run = run_tvm_scan if form == "scan" else run_tvm_chunked
        return lambda bc: run(tp, bc)

    def codegen(self, program, tp, sizes, H, knobs):
        if tp is None:
            from .sequential import sequential_source
            return sequential_source(program, sizes, H, knobs=knobs)
        from .chunk import _scan_source, stage_sources
        if tp.form == "scan":
            return _scan_source(sizes[program.state.dims[0]], H, "scan_sign" in tp.prologue)
        return "\n\n".join(stage_sources(tp, sizes, H))

    def codegen_tiled(self, plan, sizes):
        if isinstance(plan, LutPlan):   # what this CPU runs for small batches
            from . import lut
            if lut.has_avx2():
                from .lut_shuffle import shuffle_source
                return shuffle_source(plan, sizes)
            return lut.tables_source(plan, sizes) + "\n\n" + lut.lookup_source(plan, sizes)
        from .tiled import INVERSE_SOURCE, columns_source, forward_source, rows_source
        return "\n\n".join(f(plan, sizes) for f in (forward_source, rows_source,
                                                     columns_source)) + "\n\n" + INVERSE_SOURCE

    def tiled_forward(self, plan, tc):
        if isinstance(plan, LutPlan):
            from .lut import run_lut_tvm
            return run_lut_tvm(plan, tc)
        from .tiled import run_tiled_tvm
        return run_tiled_tvm(plan, tc)

    def tiled_backward(self, plan, tc, dy, need):
        if isinstance(plan, LutPlan):   # the dense weight built block by block by TVM kernels
            from .lut_dense import lut_grads_tvm
            return lut_grads_tvm(plan, tc, dy, need)
        from .tiled import tiled_grads_tvm
        return tiled_grads_tvm(plan, tc, dy)

    def run_packed(self, net, x, words, cache, scores=False):
        if x.device.type != "cpu":
            raise ValueError("the TVM hard kernel runs on CPU tensors")
        from .packed import choose_words, program_tables, run_hard_tvm
        prog = cache["program"]
        words = words or choose_words(prog)
        key = f"tvm:{words}"
        if key not in cache:
            cache[key] = program_tables(prog, words)
        return run_hard_tvm(prog, x, words, cache[key], scores)

    def binds(self, plan, x):
        """The shuffle kernels (AVX2) take fp32 CPU rows fewer than ``lut.dense_from()``."""
        return (x.dtype is torch.float32 and x.is_cpu and 0 < x.shape[0] < _lut.SHUFFLE_DENSE_FROM
                and isinstance(plan, LutPlan) and _lut.has_avx2())

    def bind_weights(self, plan, tc):
        from .lut_shuffle import bind_weights
        return bind_weights(plan, tc)

    def forget_weights(self, weights):
        from .lut_shuffle import forget_packed
        forget_packed(weights)

    def adjoint_kernel(self, device_type):
        if device_type != "cpu":
            return None
        from .adjoint import run_adjoint_tvm
        return run_adjoint_tvm

    def default_candidate(self, program, form=None, chunk=None):
        form, c, _ = super().default_candidate(program, form, chunk)
        return form, c, (dict(DEFAULT_KNOBS) if form == "sequential" else {})

    def tuning_space(self, program, form, device_type, quick):
        if device_type != "cpu":
            return []
        if form == "sequential":
            vec = (1024,) if quick else (1024, 0)
            unroll = (0,) if quick else (0, 8)
            tokens = (4,) if quick else (4, 1)
            # a vector state: its column blocks' width (0: the default) is tuned, and it has
            # no reads of the old state to pipeline nor rows to block; a matrix state's
            # columns stay whole rows (cutting them was slower wherever measured)
            vector = program.state is not None and len(program.state.dims) == 1
            columns = (0, 16, 64) if vector and not quick else (0,)
            pipeline = (True,) if vector else (True, False)
            block = (32,) if vector else (32, 0) if quick else (32, 16, 0)
            space = [   # includes DEFAULT_KNOBS
                dict(vectorize=v, unroll=u, parallel=p, pipeline=pl, block=b, tokens=t,
                     columns=c)
                for v, u, p, pl, b, t, c in itertools.product(
                    vec, unroll, (True, False) if not quick else (True,), pipeline, block,
                    tokens, columns)]
            return [(None, k) for k in space]
        if form == "scan":
            return [(None, {})]
        if form in CHUNK_FORMS:
            return [(c, {}) for c in ((16, 32, 64) if quick else (16, 32, 64, 128))]
        return []


BACKEND = TvmBackend()
