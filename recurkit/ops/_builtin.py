"""How a built-in op runs a declaration: one compiled op per (declaration, backend), cached."""
from __future__ import annotations

from functools import wraps
from typing import Callable

from ..compiler import CompiledOp, compile as rk_compile
from ..ir import CallError, Recurrence

_compiled: dict[tuple[int, str], CompiledOp] = {}


def run(decl: Recurrence, backend: str, *args, **kwargs):
    key = (id(decl), backend)
    if key not in _compiled:
        _compiled[key] = rk_compile(decl, backend=backend)
    return _compiled[key](*args, **kwargs)


def builtin(decl: Recurrence, **variants: Recurrence) -> Callable:
    """Mark a function as the public op for ``decl``; ``fn.decl`` is its declaration and
    ``fn.variants`` the declarations its options switch to (e.g. in-kernel l2norm)."""
    def wrap(fn: Callable) -> Callable:
        @wraps(fn)
        def op(*args, **kwargs):
            return fn(*args, **kwargs)
        op.decl = decl
        op.variants = dict(variants)
        return op
    return wrap


def flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise CallError(f"argument '{name}': expected a bool, got {value!r}")
    return value
