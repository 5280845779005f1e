"""One table from (backend, form) to the function that runs a bound call: used by
``rk.compile`` and by the autotuner's measuring process alike."""
from __future__ import annotations

from typing import Callable

from ..ir.interpret import run_reference
from ..lowering.tile import TileProgram
from .torch_backend import run_tile
from .triton_backend import run_triton_chunked, run_triton_scan, run_triton_sequential
from .tvm_backend import run_tvm_sequential
from .tvm_tile import run_tvm_chunked, run_tvm_scan


def runner(backend: str, form: str, tp: TileProgram | None, knobs: dict | None = None
           ) -> Callable:
    """run(bound call) -> (output, final_state) for ``backend`` running ``form``; ``tp`` is
    the lowered tile program (not needed by the kernels of the sequential form)."""
    if backend == "reference":
        return run_reference
    if backend == "torch":
        return lambda bc: run_tile(tp, bc)   # the sequential tile program runs the reference
    if backend == "tvm":
        if form == "sequential":
            return lambda bc: run_tvm_sequential(bc, knobs)
        run = run_tvm_scan if form == "scan" else run_tvm_chunked
        return lambda bc: run(tp, bc)
    if backend == "triton":
        if form == "sequential":
            return lambda bc: run_triton_sequential(bc, knobs)
        run = run_triton_scan if form == "scan" else run_triton_chunked
        return lambda bc: run(tp, bc, knobs)
    raise ValueError(f"no runner for backend {backend!r} and form {form!r}")
