"""backends: executors and code generators, one package per backend, found through this
registry.

Each backend is one object implementing ``base.Backend`` (the forms and declaration kinds it
runs, ``runner``, ``codegen``, its knobs and defaults, its backward kernels, its tuning
space). ``rk.compile``, ``rk.codegen``, ``rk.export``, the custom ops and the autotuner look
backends up here and never test a backend's name. Adding a backend is a package with a
``BACKEND`` object and one line in ``REGISTRY`` below (see docs/architecture.md).
"""
from __future__ import annotations

import functools
from typing import Callable

from ..ir.node import PAIRED
from .base import Backend
from .reference import BACKEND as _reference
from .torch import BACKEND as _torch
from .triton import BACKEND as _triton
from .tvm import BACKEND as _tvm

AUTO = "auto"

#: every backend by name
REGISTRY: dict[str, Backend] = {b.name: b for b in (_reference, _torch, _tvm, _triton)}


def _by_rank() -> list[Backend]:
    """The backends in the order "auto" asks them and the autotuner lists their candidates
    (``Backend.auto_rank``; the torch backend, which takes any call, comes last)."""
    return sorted(REGISTRY.values(), key=lambda b: b.auto_rank)


def names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def get(name: str) -> Backend:
    """The backend registered as ``name`` (a ValueError lists the choices)."""
    b = REGISTRY.get(name)
    if b is None:
        raise ValueError(f"unknown backend {name!r}; choose one of "
                         f"{', '.join([AUTO, *REGISTRY])}")
    return b


def choose(kind: str, form: str | None, device_type: str, grad: bool = False) -> Backend:
    """The backend that backend="auto" runs a ``kind`` declaration on: the first in
    rank order whose ``auto_for`` takes it (and, when ``grad``, whose results autograd
    differentiates)."""
    for b in _by_rank():
        if kind in b.kinds and b.runs_on(device_type) and b.auto_for(kind, form, device_type) \
                and (b.differentiable or not grad):
            return b
    raise ValueError(f"no backend runs a {kind} declaration on {device_type!r} tensors")


def kernel_backend(name: str, kind: str, device_type: str) -> Backend:
    """The backend whose kernels run a ``kind`` call on ``device_type`` for an op compiled
    with backend ``name``: that backend where it runs there, else auto's choice (a
    CPU-only backend's op given CUDA tensors runs what auto runs on CUDA)."""
    if name != AUTO:
        b = get(name)
        if b.runs_on(device_type):
            return b
    return choose(kind, None, device_type)


def ranked() -> tuple[Backend, ...]:
    return tuple(_by_rank())


def with_knobs() -> tuple[str, ...]:
    """The backends that take ``knobs=``."""
    return tuple(n for n, b in REGISTRY.items() if b.knob_defaults)


def with_source() -> tuple[str, ...]:
    """The backends ``rk.codegen`` shows generated source for."""
    return tuple(n for n, b in REGISTRY.items() if b.generates_source)


def adjoint_runner(program, mode: str = "auto", form: str | None = None,
                   chunk: int | None = None, backend: str | None = None,
                   knobs: dict | None = None) -> Callable | None:
    """The custom op's generated backward for ``program`` (see ``custom_op.TorchOp``), for an
    op compiled with ``backend``, ``form``, ``chunk`` (None: the backward's own default,
    ``Backend.default_adjoint_chunk``) and ``knobs`` (the op's backend's kernels take them).
    Per call:

    - the chunk-form backward (``lowering.chunk_adjoint``, in the op's chunk form, else the
      declaration's first one) where the declaration has one, its decays are positive for the
      call, and a backend offers its kernel there: the op's backend's where that backend
      interprets on the device (backend="triton" on CPU tensors: Triton's interpreter), else
      the first in rank order compiling for the device (Triton on CUDA, torch on CPU); with
      ``mode="chunk"`` on any device, with "auto" off the CPU and in the interpreted case;
    - likewise the scan form's backward (``shared.scan_backward``: the reverse scan) for a
      declaration whose parallel form is the scan, by ``Backend.scan_adjoint_kernel``;
    - else the sequential adjoint: the compiled kernel of the first backend offering one for
      the tensors' device; elsewhere the torch step loop with ``mode="adjoint"`` (or
      "chunk"), or None (the op then recomputes through autograd) with "auto".

    None for ``mode="autograd"``."""
    from ..ir.bind import bind_call
    from ..lowering.adjoint import derive_adjoint
    from ..lowering.analysis import analyze
    from ..lowering.chunk_adjoint import lower_adjoint
    from ..lowering.forms import LoweringError
    from .shared import adjoint as seq, chunk_backward as chunked   # looked up per call
    from .shared import scan_backward as scanned
    from .shared.host import decays_positive
    from .torch.backward import run_adjoint_torch
    if seq.check_backward(mode) == "autograd":
        return None
    rec = analyze(program)
    if rec.frame is not None:
        # a rotating state: the rotation-free declaration's backward, chained to the inputs
        # through the turns (an output turned back needs the forward's: autograd)
        from .shared.rotation import framed_adjoint
        if rec.frame.out_level is not None:
            return None
        inner = adjoint_runner(rec.frame.program, mode, form, chunk, backend, knobs)
        return None if inner is None else framed_adjoint(inner, rec.frame)
    if any(n.op in PAIRED for n in program.nodes()):
        return None   # rotations run sequentially: no adjoint rule for them; autograd
    if rec.expansion is not None and form not in ("sequential", "scan"):
        # sub-steps: the expanded declaration's backward, chained to the inputs
        from .shared.substeps import expanded_adjoint
        inner = adjoint_runner(rec.expansion.program, mode, form, chunk, backend, knobs)
        return None if inner is None else expanded_adjoint(inner, rec.expansion)
    adj = derive_adjoint(program)
    forms = rec.forms
    cform = form if form in ("chunk_gated", "chunk_wy") else None if form == "scan" else next(
        (f for f in forms if f.startswith("chunk")), None)
    own = REGISTRY.get(backend) if backend else None
    lowered: dict[int, object] = {}
    scan = cform is None and "scan" in forms and (form in (None, "scan"))

    def order(device_type: str) -> list:
        """The backends to ask for a parallel form's backward kernel: the op's where it
        interprets on this device (Triton on CPU: asked for by name), else those compiling
        for it in rank order; with "auto" on the CPU only the former (otherwise the compiled
        sequential adjoint, below, is faster)."""
        if mode == "adjoint":
            return []
        if own is not None and device_type in own.interpreted:
            return [own]
        return [] if mode == "auto" and device_type == "cpu" else [
            b for b in _by_rank() if device_type not in b.interpreted]

    def scan_kernel(device_type: str):
        for b in order(device_type) if scan else []:
            k = b.scan_adjoint_kernel(device_type)
            if k is not None:
                return functools.partial(k, config=knobs) if b is own and knobs else k
        return None

    def chunk_kernel(device_type: str):
        if cform is None:
            return None, None
        for b in order(device_type):
            k = b.chunk_adjoint_kernel(device_type)
            if k is None:
                continue
            c = chunk if chunk and form == cform else b.default_adjoint_chunk(program, cform)
            if b is own and knobs:
                k = functools.partial(k, config=knobs)
            if c not in lowered:
                try:
                    lowered[c] = lower_adjoint(program, cform, c)
                except LoweringError:
                    lowered[c] = None
            return k, lowered[c]
        return None, None

    def run(kw: dict, leaves: dict, grad_o, grad_S, checkpoints=None):
        bc = bind_call(program, (), {**kw, **leaves})
        kernel, tp = chunk_kernel(bc.device.type)
        if kernel is not None and tp is not None and decays_positive(tp, bc):
            return chunked.chunk_backward(bc, tp, grad_o, grad_S, kernel, leaves)
        kernel = scan_kernel(bc.device.type)
        if kernel is not None:
            return scanned.scan_backward(bc, grad_o, grad_S, kernel, leaves)
        kernel = next((k for k in (b.adjoint_kernel(bc.device.type) for b in _by_rank())
                       if k is not None), None)
        if kernel is None:
            if mode == "auto":
                return None
            kernel = run_adjoint_torch
        if kernel is run_adjoint_torch:   # the forward's checkpoints serve compiled kernels
            checkpoints = None
        return seq.generated_backward(bc, adj, grad_o, grad_S, kernel, leaves, checkpoints)
    return run


__all__ = ["AUTO", "Backend", "REGISTRY", "adjoint_runner", "choose", "get", "kernel_backend",
           "names", "ranked", "with_knobs", "with_source"]
