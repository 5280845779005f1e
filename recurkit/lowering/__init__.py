"""lowering: analysis of a declaration and its lowering to backend-neutral tile programs."""
from .analysis import FORMS, Recurrence, analyze

__all__ = ["FORMS", "Recurrence", "analyze"]
