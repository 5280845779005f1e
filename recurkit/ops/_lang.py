"""The declaration vocabulary the built-in ops are written in (``rk.State``, ``rk.exp``,
``rk.recurrence``, ``rk.compile`` ...), gathered from the layers below the op library, so that
the ops read like user code without importing the package root above them."""
from ..compiler import compile  # noqa: F401, A004
from ..ir import Param, Scalar, State, Token, dim, recurrence  # noqa: F401
from ..ir.dsl import (exp, head, l2norm, log, outer, sigmoid, silu, softplus,  # noqa: F401
                      sqrt, sum, where)
