"""``rk.compile``: a declaration in, an op with the declaration's call signature out."""
from __future__ import annotations

from typing import Callable

from .ir import BoundCall, Program, Recurrence, bind_call, run_reference
from .ir.bind import signature_names

# backend name -> runner(BoundCall) -> (output, final_state or None)
BACKENDS: dict[str, Callable[[BoundCall], tuple]] = {"reference": run_reference}
PLANNED = ("torch", "tvm", "triton")


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
    if backend == "auto":
        return "reference"
    if backend in BACKENDS:
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

    def __init__(self, program: Program, backend: str):
        self.program, self.backend = program, backend
        self._run = BACKENDS[backend]
        self.__name__ = program.name
        self.__doc__ = (f"{program.name}({', '.join(signature_names(program))}) "
                        f"[backend={backend}]")

    def __call__(self, *args, **kwargs):
        return self._run(bind_call(self.program, args, kwargs))

    def __repr__(self) -> str:
        return f"<rk.compile {self.program.name} backend={self.backend}>"


def compile(decl, backend: str = "auto") -> CompiledOp:  # noqa: A001 - rk.compile
    """Compile a declaration for ``backend`` ("auto" or "reference" in this version)."""
    return CompiledOp(as_program(decl), resolve_backend(backend))
