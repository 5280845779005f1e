"""ir: the declaration language, the IR, its verifier and the reference interpreter."""
from .bind import BoundCall, bind_call
from .dimexpr import DimExpr, dim
from .annotations import Bits, Index, Param, Row, Scalar, State, Token, Weight
from .errors import CallError, DeclarationError, Loc
from .interpret import reference_op, run_reference
from .node import Node
from .program import InputSpec, Program
# the submodule first: importing it later would replace the name ``tiled`` (the decorator)
from . import tiled as _tiled_calls  # noqa: F401
from .trace import Recurrence, Tiled, as_program, recurrence, tiled
from .verify import verify_program

__all__ = ["BoundCall", "bind_call", "DimExpr", "dim", "Param", "Scalar", "State", "Token",
           "CallError", "DeclarationError", "Loc", "reference_op", "run_reference", "Node",
           "InputSpec", "Program", "Recurrence", "recurrence", "verify_program", "Bits", "Index", "Row",
           "Weight", "Tiled", "tiled", "as_program"]
