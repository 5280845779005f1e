"""How a built-in op runs a declaration: one compiled op per (declaration, backend), cached."""
from __future__ import annotations

import contextvars
from functools import wraps
from typing import Callable

from ..compiler import CompiledOp, compile as rk_compile
from ..ir import CallError, Recurrence

_compiled: dict[tuple[int, str], CompiledOp] = {}


_CP_GROUP: contextvars.ContextVar = contextvars.ContextVar("cp_group", default=None)


def run(decl: Recurrence, backend: str, *args, **kwargs):
    key = (id(decl), backend)
    if key not in _compiled:
        _compiled[key] = rk_compile(decl, backend=backend)
    group = _CP_GROUP.get()
    if group is not None:
        kwargs["cp_group"] = group
    return _compiled[key](*args, **kwargs)


def builtin(decl: Recurrence, **variants: Recurrence) -> Callable:
    """Mark a function as the public op for ``decl``; ``fn.decl`` is its declaration and
    ``fn.variants`` the declarations its options switch to (e.g. in-kernel l2norm)."""
    def wrap(fn: Callable) -> Callable:
        @wraps(fn)
        def op(*args, cp_group=None, **kwargs):
            """``cp_group``: the sequence split along T over the group's ranks."""
            token = _CP_GROUP.set(cp_group)
            try:
                return fn(*args, **kwargs)
            finally:
                _CP_GROUP.reset(token)
        op.decl = decl
        op.variants = dict(variants)
        return op
    return wrap


def flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise CallError(f"argument '{name}': expected a bool, got {value!r}")
    return value
