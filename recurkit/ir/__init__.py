"""ir: the declaration language, the IR, its verifier and the reference interpreter."""
from .bind import BoundCall, bind_call
from .dimexpr import DimExpr, dim
from .dsl import Bits, Index, Param, Row, Scalar, State, Token, Weight
from .errors import CallError, DeclarationError, Loc
from .interpret import reference_op, run_reference
from .node import Node
from .program import InputSpec, Program
from .trace import Recurrence, Tiled, recurrence, tiled
from .verify import verify_program

__all__ = ["BoundCall", "bind_call", "DimExpr", "dim", "Param", "Scalar", "State", "Token",
           "CallError", "DeclarationError", "Loc", "reference_op", "run_reference", "Node",
           "InputSpec", "Program", "Recurrence", "recurrence", "verify_program", "Bits", "Index", "Row",
           "Weight", "Tiled", "tiled"]
