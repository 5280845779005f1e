"""Errors raised by recurkit, with the place and the fix in the message."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Loc:
    """A place in the user's source: file and line."""

    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


class DeclarationError(ValueError):
    """A declaration that recurkit refuses, raised at decoration time.

    The message starts with the user's ``file:line`` and ends with what to change.
    """

    def __init__(self, what: str, loc: Loc | None = None, hint: str | None = None,
                 decl: str | None = None):
        self.what, self.loc, self.hint, self.decl = what, loc, hint, decl
        where = f"{loc}: " if loc else ""
        inside = f"in recurrence '{decl}': " if decl else ""
        msg = f"{where}{inside}{what}"
        if hint:
            msg += f"\n  hint: {hint}"
        super().__init__(msg)


class CallError(ValueError):
    """A call of a compiled op with bad arguments, raised before any kernel runs.

    The message names the argument, what was expected and what was given.
    """
