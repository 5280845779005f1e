"""Input annotations of a declaration: ``rk.State``, ``rk.Token``, ``rk.Param``, ``rk.Row``,
``rk.Weight``, ``rk.Index``, ``rk.Bits`` (named dims per role) and ``rk.Scalar``."""
from __future__ import annotations

from typing import Any


# --- annotations ------------------------------------------------------------------------
class Spec:
    """What ``rk.State[...]``, ``rk.Token[...]``, ``rk.Param[...]`` and ``rk.Scalar`` mean."""

    def __init__(self, role: str, dims: tuple[str, ...]):
        self.role, self.dims = role, dims

    def __repr__(self) -> str:
        return f"rk.{self.role.capitalize()}{list(self.dims)}"


def _dims_of(role: str, item: Any) -> tuple[str, ...]:
    if item == () or item is None:
        return ()
    dims = item if isinstance(item, tuple) else (item,)
    for d in dims:
        if not isinstance(d, str) or not d.isidentifier():
            raise TypeError(f"rk.{role.capitalize()}[...] takes dim names such as 'K', got {d!r}")
    if len(set(dims)) != len(dims):
        raise TypeError(f"rk.{role.capitalize()}{list(dims)} names a dim twice")
    return dims


def _packed_dims(role: str, item: Any) -> tuple[str, ...]:
    dims = _dims_of(role, item)
    if not dims:
        raise TypeError("rk.Bits[...] needs at least one dim: the codes are packed 8 per "
                        "byte along the last one, e.g. rk.Bits['O', 'E']")
    return dims


class _Annotation:
    role = ""

    def __class_getitem__(cls, item) -> Spec:
        return Spec(cls.role, _dims_of(cls.role, item))


class State(_Annotation):
    """The carried state per (batch, head): ``rk.State["K", "V"]``; initial_state is [N, H, K, V]."""
    role = "state"


class Token(_Annotation):
    """A per-token input laid out [B, T, H, *dims]: ``rk.Token["K"]``, ``rk.Token[()]``."""
    role = "token"


class Param(_Annotation):
    """A per-head parameter laid out [H, *dims]: ``rk.Param[()]``, ``rk.Param["K"]``."""
    role = "param"


class Row(_Annotation):
    """A per-sample input of a tiled op, laid out [N, *dims]: ``rk.Row["I"]``."""
    role = "row"


class Weight(_Annotation):
    """A parameter of a tiled op laid out [*dims] (no heads): ``rk.Weight["O"]``."""
    role = "weight"


class Index(_Annotation):
    """Integer indices of a tiled op laid out [*dims], read through ``rk.gather``:
    ``rk.Index["O"]``."""
    role = "index"


class Bits(_Annotation):
    """Sign codes of a tiled op, each -1 or +1, packed 8 per byte along the last dim:
    ``rk.Bits["O", "G", "E"]`` is a uint8 tensor [O, G, E // 8] whose byte b holds the codes
    of positions 8b .. 8b + 7 (bit j set: +1, clear: -1). In the step it is a float of
    value -1 or +1; ``rk.sum(codes * x, "E")`` lowers to table look-ups (the LUT form)."""
    role = "bits"

    def __class_getitem__(cls, item) -> Spec:
        return Spec(cls.role, _packed_dims(cls.role, item))


class Scalar(_Annotation):
    """A call-time number (e.g. ``scale: rk.Scalar = rk.dim("K") ** -0.5``)."""
    role = "scalar"
