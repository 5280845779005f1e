"""Checking a call against a declaration and binding its dim sizes, before any kernel runs.

Every refusal is a CallError that names the argument, what was expected and what was given.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import CallError
from .node import PAIRED
from .program import InputSpec, Program

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CALL_OPTIONS = ("initial_state", "output_final_state", "cu_seqlens")


class HeadTensors(Mapping):
    """A call's tensors by input name, where inputs with grouped heads (FLA's GVA) read as
    repeated to the call's H heads, repeated on first read: a kernel that indexes the head
    group itself (``given``, ``groups``) never copies them."""

    def __init__(self, given: dict[str, torch.Tensor], groups: dict[str, int],
                 axes: dict[str, int]):
        self.given, self.groups, self.axes = given, groups, axes
        self._full: dict[str, torch.Tensor] = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        G = self.groups.get(name)
        if not G:
            return self.given[name]
        if name not in self._full:
            self._full[name] = self.given[name].repeat_interleave(G, dim=self.axes[name])
        return self._full[name]

    def __iter__(self):
        return iter(self.given)

    def __len__(self) -> int:
        return len(self.given)

    def shape(self, name: str) -> torch.Size:
        """The shape of input ``name`` at H heads, without repeating it."""
        s = list(self.given[name].shape)
        if self.groups.get(name):
            s[self.axes[name]] *= self.groups[name]
        return torch.Size(s)


def full_shape(bc: "BoundCall", name: str) -> torch.Size:
    """The shape of the call's input ``name`` at H heads (grouped inputs not repeated)."""
    t = bc.tensors
    return t.shape(name) if isinstance(t, HeadTensors) else t[name].shape


def as_given(bc: "BoundCall", name: str) -> tuple[torch.Tensor, int]:
    """(input ``name`` as the call gave it, the heads each of its heads serves): 1 unless
    grouped and not yet repeated."""
    t = bc.tensors
    if isinstance(t, HeadTensors) and t.groups.get(name):
        return t.given[name], t.groups[name]
    return t[name], 1


@dataclass
class BoundCall:
    """A checked call: the tensors by input name, scalar values, and every size."""

    program: Program
    tensors: dict[str, torch.Tensor]
    scalars: dict[str, float]
    sizes: dict[str, int]          # every declared dim
    B: int
    T: int
    H: int
    initial_state: torch.Tensor | None
    output_final_state: bool
    cu_seqlens: list[int] | None
    out_dtype: torch.dtype
    device: torch.device
    cu_seqlens_tensor: torch.Tensor | None = field(default=None, repr=False)
    # grouped heads (FLA's GVA): inputs given with H / G heads, each serving G consecutive
    # heads, by name -> G; ``tensors`` reads them repeated to H heads (``HeadTensors``)
    groups: dict[str, int] = field(default_factory=dict, repr=False)

    @property
    def N(self) -> int:
        """Number of sequences: B, or len(cu_seqlens) - 1 for varlen."""
        return self.B if self.cu_seqlens is None else len(self.cu_seqlens) - 1


def signature_names(program: Program) -> list[str]:
    return [s.name for s in program.call_inputs] + list(CALL_OPTIONS)


def match_args(op: str, names: list[str], args: tuple, kwargs: dict) -> dict[str, Any]:
    """``args``/``kwargs`` by argument name (a CallError for too many, unknown or repeated)."""
    if len(args) > len(names):
        raise CallError(f"{op}() takes at most {len(names)} arguments ({', '.join(names)}), "
                        f"got {len(args)}")
    given: dict[str, Any] = dict(zip(names, args))
    for k, v in kwargs.items():
        if k not in names:
            raise CallError(f"{op}() got an unexpected argument '{k}'; it takes "
                            f"{', '.join(names)}")
        if k in given:
            raise CallError(f"{op}() got argument '{k}' twice (by position and by name)")
        given[k] = v
    return given


def bind_call(program: Program, args: tuple, kwargs: dict, repeat: bool = True) -> BoundCall:
    """Match ``args``/``kwargs`` to the declaration and check every tensor. Grouped inputs
    read as repeated to H heads (``HeadTensors``); ``repeat=False``: they stay as given (a
    call checked, not run)."""
    op = program.name
    given = match_args(op, signature_names(program), args, kwargs)
    sizes: dict[str, int] = {}
    where: dict[str, str] = {}
    lead: dict[str, int] = {}
    device = out_dtype = None
    tensors: dict[str, torch.Tensor] = {}
    heads: dict[str, tuple[int, int, str]] = {}   # name -> (heads, axis, layout)

    def bind(dim: str, size: int, arg: str, spec_layout: str, axis: int) -> None:
        if dim in sizes and sizes[dim] != size:
            raise CallError(
                f"argument '{arg}': dim {dim} (axis {axis} of {spec_layout}) is {size}, but "
                f"{where[dim]} bound {dim} = {sizes[dim]}")
        sizes.setdefault(dim, size)
        where.setdefault(dim, f"'{arg}'")

    for spec in program.call_inputs:
        if spec.role == "scalar":
            continue
        if spec.name not in given or given[spec.name] is None:
            raise CallError(f"{op}() missing required argument '{spec.name}' "
                            f"(a tensor laid out {spec.layout()})")
        x = given[spec.name]
        _check_tensor(spec.name, x, spec.layout())
        leads = ("B", "T", "H") if spec.role == "token" else ("H",)
        expect = len(leads) + len(spec.dims)
        if x.dim() != expect:
            raise CallError(f"argument '{spec.name}': expected {expect} dims laid out "
                            f"{spec.layout()}, got shape {tuple(x.shape)}")
        if device is None:
            device, out_dtype = x.device, x.dtype
        elif x.device != device:
            raise CallError(f"argument '{spec.name}': expected device {device} (the device of "
                            f"'{program.call_inputs[0].name}'), got {x.device}")
        for axis, (d, n) in enumerate(zip((*leads, *spec.dims), x.shape)):
            if d == "H":   # heads may be grouped: checked below, once all are known
                heads[spec.name] = (n, axis, spec.layout())
            elif d in ("B", "T"):
                if d in lead and lead[d] != n:
                    raise CallError(f"argument '{spec.name}': {d} (axis {axis} of "
                                    f"{spec.layout()}) is {n}, but {where[d]} has {d} = "
                                    f"{lead[d]}")
                lead.setdefault(d, n)
                where.setdefault(d, f"'{spec.name}'")
            else:
                bind(d, n, spec.name, spec.layout(), axis)
        tensors[spec.name] = x
    if device is None:
        raise CallError(f"{op}() has no tensor inputs to take sizes from")
    H, groups = _head_groups(heads)
    if repeat and groups:
        tensors = HeadTensors(tensors, groups, {n: heads[n][1] for n in groups})
    B, T = lead.get("B", 1), lead.get("T", 1)
    if "T" in lead and T == 0:
        raise CallError(f"argument '{where['T'][1:-1]}': the sequence is empty (T = 0)")
    if any(n == 0 for n in sizes.values()):
        d = next(k for k, n in sizes.items() if n == 0)
        raise CallError(f"dim {d} bound by {where[d]} is 0; every dim needs size >= 1")
    _check_pairs(program, sizes, where)

    scalars = {}
    for spec in program.call_inputs:
        if spec.role == "scalar":
            scalars[spec.name] = _scalar(op, spec, given.get(spec.name), sizes)

    cu = given.get("cu_seqlens")
    cu_list = None
    if cu is not None:
        cu_list = _check_cu_seqlens(cu, B, T)
    state = program.state
    init = given.get("initial_state")
    if init is not None:
        if state is None:
            raise CallError(f"argument 'initial_state': {op} is stateless and takes none")
        _check_tensor("initial_state", init, state.layout())
        N = B if cu_list is None else len(cu_list) - 1
        want = (N, H, *(sizes[d] for d in state.dims))
        if tuple(init.shape) != want:
            why = "len(cu_seqlens) - 1" if cu_list is not None else "B"
            raise CallError(f"argument 'initial_state': expected shape {want} laid out "
                            f"{state.layout()} (N = {why}), got {tuple(init.shape)}")
        if init.device != device:
            raise CallError(f"argument 'initial_state': expected device {device}, got "
                            f"{init.device}")
    ofs = given.get("output_final_state", False)
    if not isinstance(ofs, bool):
        raise CallError(f"argument 'output_final_state': expected a bool, got {ofs!r}")
    if ofs and state is None:
        raise CallError(f"argument 'output_final_state': {op} is stateless")
    return BoundCall(program, tensors, scalars, sizes, B, T, H, init, ofs, cu_list, out_dtype,
                     device, cu if cu is not None else None, groups)


def _check_pairs(program: Program, sizes: dict[str, int], where: dict[str, str]) -> None:
    """A dim rotated in pairs (rk.rotate, rk.pairs) is even, and the angles' pair dim is
    half of it."""
    for n in program.nodes():
        if n.op not in PAIRED or n.attr("dim") not in sizes:
            continue
        d, pair = n.attr("dim"), n.attr("pair")
        line = f" (rk.{n.op} at {n.loc})" if n.loc else f" (rk.{n.op})"
        if sizes[d] % 2:
            raise CallError(f"argument {where[d]}: dim {d} = {sizes[d]} is rotated in pairs"
                            f"{line}, so it must be even")
        if pair is not None and pair in sizes and sizes[pair] * 2 != sizes[d]:
            raise CallError(f"argument {where[pair]}: dim {pair} = {sizes[pair]} numbers the "
                            f"pairs of {d} = {sizes[d]} (bound by {where[d]}){line}: expected "
                            f"{pair} = {sizes[d] // 2}")


def _head_groups(heads: dict[str, tuple[int, int, str]]) -> tuple[int, dict[str, int]]:
    """(H, the most heads any input has; the inputs with fewer, by name -> G, their heads
    times G being H): each serves G consecutive heads, as FLA's grouped value heads (GVA)."""
    top, H = "", 0
    for name, (n, _, _) in heads.items():
        if n > H:
            top, H = name, n
    out = {}
    for name, (n, axis, layout) in heads.items():
        if n != H:
            if H % n:
                raise CallError(f"argument '{name}': H (axis {axis} of {layout}) is {n}, which "
                                f"does not divide the {H} heads of '{top}' (grouped heads "
                                f"serve H / {n} consecutive heads each)")
            out[name] = H // n
    return H, out


def _check_tensor(name: str, x: Any, layout: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise CallError(f"argument '{name}': expected a torch.Tensor laid out {layout}, got "
                        f"{type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise CallError(f"argument '{name}': expected dtype float32, float16 or bfloat16, got "
                        f"{x.dtype}")


def _scalar(op: str, spec: InputSpec, value: Any, sizes: dict[str, int]) -> float:
    if value is None:
        if spec.default is None:
            raise CallError(f"{op}() missing required scalar argument '{spec.name}'")
        return spec.default if isinstance(spec.default, float) else spec.default.evaluate(sizes)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CallError(f"argument '{spec.name}': expected a finite number, got {value!r}")
    return float(value)


def _check_cu_seqlens(cu: Any, B: int, T: int) -> list[int]:
    if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.dtype not in (torch.int32,
                                                                                torch.int64):
        got = (f"{cu.dtype} tensor of shape {tuple(cu.shape)}" if isinstance(cu, torch.Tensor)
               else type(cu).__name__)
        raise CallError(f"argument 'cu_seqlens': expected a 1-D int32/int64 tensor [N + 1], "
                        f"got {got}")
    if B != 1:
        raise CallError(f"argument 'cu_seqlens': varlen inputs are packed along T with B = 1, "
                        f"got B = {B}")
    vals = [int(v) for v in cu.tolist()]
    if len(vals) < 2:
        raise CallError(f"argument 'cu_seqlens': expected at least 2 offsets [0, ..., T], got "
                        f"{vals}")
    if vals[0] != 0:
        raise CallError(f"argument 'cu_seqlens': must start at 0, got {vals[0]}")
    for i in range(1, len(vals)):
        if vals[i] < vals[i - 1]:
            raise CallError(f"argument 'cu_seqlens': offsets must be non-decreasing, but "
                            f"cu_seqlens[{i}] = {vals[i]} < cu_seqlens[{i - 1}] = {vals[i - 1]}")
    if vals[-1] != T:
        raise CallError(f"argument 'cu_seqlens': must end at T = {T}, got {vals[-1]}")
    return vals


def fold_groups(bc: BoundCall, name: str, g: torch.Tensor | None) -> torch.Tensor | None:
    """A gradient of input ``name`` over the call's H heads, summed back to the heads it was
    given with (grouped heads, ``BoundCall.groups``)."""
    G = bc.groups.get(name)
    if not G or g is None:
        return g
    spec = next(s for s in bc.program.call_inputs if s.name == name)
    ax = 2 if spec.role == "token" else 0
    if g.shape[ax] != bc.H:
        return g
    return g.reshape(*g.shape[:ax], bc.H // G, G, *g.shape[ax + 1:]).sum(ax + 1)


def bind_meta(program: Program, B: int, T: int, H: int, sizes: dict[str, int],
              dtype: torch.dtype = torch.float32, **options) -> BoundCall:
    """A call of ``program`` at these sizes whose tensors are on the meta device (shapes and
    dtypes, no data): what traffic models price. Scalars are 1.0; ``options`` are the call's
    (``output_final_state``, ...)."""
    xs: dict[str, Any] = {}
    for spec in program.call_inputs:
        if spec.role == "scalar":
            xs[spec.name] = 1.0
        elif spec.role in ("token", "param"):
            lead = (B, T, H) if spec.role == "token" else (H,)
            xs[spec.name] = torch.empty(*lead, *(sizes[d] for d in spec.dims), dtype=dtype,
                                        device="meta")
    return bind_call(program, (), {**xs, **options})
