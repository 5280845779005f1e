"""``rk.compile``: a declaration in, an op with the declaration's call signature out."""
from __future__ import annotations

import torch

from .backends.torch_backend import run_tile
from .backends.tvm_backend import run_tvm_sequential
from .backends.tvm_tile import run_tvm_chunked, run_tvm_scan
from .ir import CallError, Program, Recurrence, bind_call, run_reference
from .ir.bind import signature_names
from .lowering.forms import lower

BACKENDS = ("reference", "torch", "tvm")
PLANNED = ("triton",)


def as_program(decl) -> Program:
    if isinstance(decl, Recurrence):
        return decl.program
    if isinstance(decl, Program):
        return decl
    inner = getattr(decl, "decl", None)  # a built-in op exposes its declaration
    if isinstance(inner, Recurrence):
        return inner.program
    raise TypeError(f"expected an @rk.recurrence declaration, got {type(decl).__name__}")


def resolve_backend(backend: str) -> str:
    if backend in BACKENDS or backend == "auto":
        return backend
    if backend in PLANNED:
        raise NotImplementedError(
            f"backend '{backend}' is not available in this version of recurkit; available: "
            f"{', '.join(['auto', *BACKENDS])}")
    raise ValueError(f"unknown backend {backend!r}; choose one of "
                     f"{', '.join(['auto', *BACKENDS, *PLANNED])}")


class CompiledOp:
    """A compiled declaration. Call it like the declaration's inputs, in order or by name:

    ``op(*inputs, initial_state=None, output_final_state=False, cu_seqlens=None)``
    returns ``(output [B, T, H, *out_dims], final_state [N, H, *state_dims] or None)``.
    """

    def __init__(self, program: Program, backend: str, form: str | None = None,
                 chunk: int | None = None):
        self.program, self.backend = program, backend
        self.tile_program = None
        if backend == "auto" and form is not None:
            backend = self.backend = "tvm" if form == "sequential" else "torch"
        if backend in ("torch", "auto"):
            self.tile_program = lower(program, form, chunk)
            self.form = self.tile_program.form
        elif backend == "tvm":
            if program.new_state is None:
                raise ValueError(f"backend 'tvm' compiles stateful declarations; "
                                 f"{program.name} is stateless")
            if form in ("chunk_gated", "chunk_wy", "scan"):
                self.tile_program = lower(program, form, chunk)
            self.form = form or "sequential"
        else:
            if form not in (None, "sequential"):
                raise ValueError(f"backend 'reference' runs the step itself; form={form!r} "
                                 "needs backend='torch'")
            self.form = "reference"
        self.__name__ = program.name
        self.__doc__ = (f"{program.name}({', '.join(signature_names(program))}) "
                        f"[backend={backend}, form={self.form}]")

    def __call__(self, *args, **kwargs):
        bc = bind_call(self.program, args, kwargs)
        if self.backend == "auto":
            return (run_tvm_sequential if self._tvm_fits(bc) else
                    lambda b: run_tile(self.tile_program, b))(bc)
        if self.backend == "tvm":
            if bc.device.type != "cpu":
                raise CallError(f"backend 'tvm' runs on CPU tensors, got device {bc.device}")
            if self.tile_program is not None:
                run = run_tvm_scan if self.form == "scan" else run_tvm_chunked
                return run(self.tile_program, bc)
            return run_tvm_sequential(bc)
        if self.tile_program is None:
            return run_reference(bc)
        return run_tile(self.tile_program, bc)

    def _tvm_fits(self, bc) -> bool:
        """auto: the compiled TVM kernel for stateful CPU calls that need no gradient (it has
        no backward yet); the torch backend, which autograd differentiates, otherwise."""
        if bc.device.type != "cpu" or self.program.new_state is None:
            return False
        tensors = list(bc.tensors.values()) + ([bc.initial_state] if bc.initial_state
                                               is not None else [])
        return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))

    def __repr__(self) -> str:
        if self.backend == "auto":
            return (f"<rk.compile {self.program.name} backend=auto: tvm sequential on CPU "
                    f"without grad, else torch {self.form} chunk={self.tile_program.chunk}>")
        chunk = f" chunk={self.tile_program.chunk}" if self.tile_program is not None and \
            self.tile_program.chunk else ""
        return f"<rk.compile {self.program.name} backend={self.backend} form={self.form}{chunk}>"


def compile(decl, backend: str = "auto", *, form: str | None = None,  # noqa: A001
            chunk: int | None = None) -> CompiledOp:
    """Compile a declaration.

    backend: "auto" (per call: "tvm" for CPU tensors that need no gradient, else "torch"),
    "torch" (tile programs run with batched torch ops),
    "tvm" (the sequential form as a compiled CPU kernel) or "reference" (the step-by-step
    interpreter). form: "chunk_gated", "chunk_wy", "scan" or
    "sequential" (default: the first exact form, see ``rk.analyze``); chunk: 16, 32, 64, 128
    (default: 64, or 16 with per-channel gates).
    """
    return CompiledOp(as_program(decl), resolve_backend(backend), form, chunk)
