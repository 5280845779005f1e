"""backends: executors and code generators, one package per backend, found through this
registry.

Each backend is one object implementing ``base.Backend`` (the forms and declaration kinds it
runs, ``runner``, ``codegen``, its knobs and defaults, its backward kernels, its tuning
space). ``rk.compile``, ``rk.codegen``, ``rk.export``, the custom ops and the autotuner look
backends up here and never test a backend's name. Adding a backend is a package with a
``BACKEND`` object and one line in ``REGISTRY`` below (see docs/architecture.md).
"""
from __future__ import annotations

from typing import Callable

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


def adjoint_runner(program, mode: str = "auto") -> Callable | None:
    """The custom op's generated backward for ``program`` (see ``custom_op.TorchOp``): per
    call, the compiled kernel of the first backend offering one for the tensors' device;
    elsewhere the torch step loop with ``mode="adjoint"``, or None (the op then recomputes
    through autograd) with "auto". None for ``mode="autograd"``."""
    from ..ir.bind import bind_call
    from ..lowering.adjoint import derive_adjoint
    from .shared.adjoint import check_backward, generated_backward
    from .torch.backward import run_adjoint_torch
    if check_backward(mode) == "autograd":
        return None
    adj = derive_adjoint(program)

    def run(kw: dict, leaves: dict, grad_o, grad_S):
        bc = bind_call(program, (), {**kw, **leaves})
        kernel = next((k for k in (b.adjoint_kernel(bc.device.type) for b in _by_rank())
                       if k is not None), None)
        if kernel is None:
            if mode != "adjoint":
                return None
            kernel = run_adjoint_torch
        return generated_backward(bc, adj, grad_o, grad_S, kernel, leaves)
    return run


__all__ = ["AUTO", "Backend", "REGISTRY", "adjoint_runner", "choose", "get", "kernel_backend",
           "names", "ranked", "with_knobs", "with_source"]
