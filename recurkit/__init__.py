"""recurkit: declare the step of a recurrence in Python, get exact fast kernels.

    import recurkit as rk

    @rk.recurrence
    def gated_delta_rule(S: rk.State["K", "V"], q: rk.Token["K"], k: rk.Token["K"],
                         v: rk.Token["V"], g: rk.Token[()], beta: rk.Token[()],
                         scale: rk.Scalar = rk.dim("K") ** -0.5):
        S = rk.exp(g) * S
        S = S + beta * rk.outer(k, v - k @ S)
        return S, scale * (q @ S)

    op = rk.compile(gated_delta_rule)
    o, final = op(q, k, v, g, beta, output_final_state=True)
"""
from .compiler import CompiledOp, codegen, compile, tuning_group
from .export import export
from .lowering import analyze
from .lowering.forms import LoweringError, lower
from .ir import (Bits, CallError, DeclarationError, DimExpr, Index, Param, Program, Recurrence, Row,
                 Scalar, State, Tiled, Token, Weight, dim, recurrence, tiled)
from .ir.dsl import (contract, dot, exp, gather, head, l2norm, log, max, maximum, minimum, outer, relu,
                     pairs, rotate, rsqrt, sigmoid, silu, softplus, sqrt, sum, tanh, where)
from . import ops  # noqa: E402  (ops use the names above)
from . import nn  # noqa: E402,F401  (layers use the ops)

from ._version import __version__  # noqa: E402

__all__ = ["CompiledOp", "codegen", "compile", "tuning_group", "export", "analyze", "lower", "LoweringError",
           "CallError", "DeclarationError", "DimExpr", "Param",
           "Program", "Recurrence", "Scalar", "State", "Token", "dim", "recurrence", "contract",
           "Row", "Weight", "Index", "Bits", "Tiled", "tiled", "gather",
           "dot", "exp", "head", "l2norm", "log", "max", "maximum", "minimum", "outer", "relu",
           "rsqrt", "sigmoid", "silu", "softplus", "sqrt", "sum", "tanh", "where", "ops",
           "rotate", "pairs",
           "nn", "__version__"]
