"""Counted GPU traffic without a GPU: Triton kernels run in Triton's interpreter on CPU tensors
while every launch's global memory traffic and ``tl.dot`` work is counted, and every torch op
run on tensors between the kernels is counted as a launch of its own.

    with count_traffic() as t:
        op(...)                       # Triton kernels in the interpreter, torch ops around them
    t.launches, t.by_name()           # per launch: kind, name, bytes read, written, dot FLOPs
    t.roofline("h100")                # seconds: per launch max(bytes / bandwidth, FLOPs / peak)
                                      # plus a launch cost, summed

What counts: a kernel's loads and stores of global memory, masked-in elements only, at the
element size of the pointer (loads through tensor descriptors too); ``tl.dot`` as 2 M N K per
call. A torch op reads its tensor arguments and writes its outputs; ops that only make views
(reshape, permute, expand, slicing, ...) and allocations without a fill (``empty``) move no
bytes and are not launches. Loads that hit a cache on a GPU are counted each time (the count
is an upper bound on HBM traffic: what the kernel asks of memory).
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# (HBM bytes/s, dense bf16 tensor-core FLOP/s, seconds per launch) of the devices we model
DEVICES = {"h100": (3.35e12, 989e12, 4e-6), "h200": (4.8e12, 989e12, 4e-6)}
# (streaming multiprocessors, seconds per dependent step of a loop over chunks: a state
# pass's loads, dots and update of one chunk, after the previous one's). The step time is
# an estimate (FLA's state passes: ~0.5 us a chunk at small batch), not a measurement here
PARALLEL = {"h100": (132, 0.5e-6), "h200": (132, 0.5e-6)}

_aten = torch.ops.aten
# ops that return views or metadata: no memory traffic, no launch
_FREE = {"view", "_unsafe_view", "reshape", "expand", "permute", "transpose", "t", "select",
         "slice", "as_strided", "unsqueeze", "squeeze", "alias", "detach", "unbind", "split",
         "split_with_sizes", "chunk", "narrow", "movedim", "diagonal", "view_as_real",
         "view_as_complex", "unfold", "empty", "empty_like", "empty_strided", "new_empty",
         "new_empty_strided", "lift_fresh", "is_nonzero", "item", "_local_scalar_dense",
         "sym_size", "sym_stride", "sym_numel", "size", "stride", "dim", "is_contiguous",
         "set_", "resize_"}


@dataclass
class Launch:
    kind: str            # "triton" or "torch"
    name: str
    read: int = 0        # bytes
    written: int = 0     # bytes
    flops: int = 0       # tl.dot FLOPs
    calls: int = 1       # launches merged into this row (``by_name``)
    programs: int = 0    # programs of the grid (0: not modelled)
    serial: int = 0      # dependent steps each program takes in turn (a state pass: chunks)


@dataclass
class Traffic:
    launches: list[Launch] = field(default_factory=list)

    @property
    def read(self) -> int:
        return sum(x.read for x in self.launches)

    @property
    def written(self) -> int:
        return sum(x.written for x in self.launches)

    @property
    def flops(self) -> int:
        return sum(x.flops for x in self.launches)

    def count(self, kind: str | None = None) -> int:
        return sum(1 for x in self.launches if kind is None or x.kind == kind)

    def roofline(self, device: str = "h100") -> float:
        """Seconds: per launch the larger of its bytes over the bandwidth, its dot FLOPs
        over the bf16 tensor-core rate and its chain of dependent steps (``serial`` steps
        each, in waves of one program per multiprocessor: ``PARALLEL``), plus the launch
        cost; summed over launches."""
        bw, peak, launch = DEVICES[device]
        sms, step = PARALLEL[device]
        return sum(max((x.read + x.written) / bw, x.flops / peak,
                       x.serial * step * -(-max(x.programs, 1) // sms)) + launch
                   for x in self.launches)

    def by_name(self) -> list[Launch]:
        """Launches of the same kind and name merged, in first-seen order."""
        merged: dict[tuple[str, str], Launch] = {}
        for x in self.launches:
            m = merged.get((x.kind, x.name))
            if m is None:
                merged[(x.kind, x.name)] = Launch(x.kind, x.name, x.read, x.written, x.flops)
            else:
                m.read += x.read
                m.written += x.written
                m.flops += x.flops
                m.calls += 1
        return list(merged.values())


_STATE = threading.local()


def _current() -> Launch | None:
    return getattr(_STATE, "launch", None)


def _nbytes(x) -> int:
    return x.numel() * x.element_size() if isinstance(x, torch.Tensor) else 0


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


_FILLS = {"zeros", "zeros_like", "ones", "ones_like", "full", "full_like", "new_zeros",
          "new_ones", "new_full", "fill", "scalar_tensor", "arange"}
_WRITE_ONLY = {"copy_", "zero_", "fill_"}   # in-place ops that do not read their target


class _TorchOps(TorchDispatchMode):
    def __init__(self, traffic: Traffic):
        super().__init__()
        self.traffic = traffic

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if _current() is not None or name in _FREE:
            return out
        ins = list(_tensors((args, kwargs)))
        if name.endswith("_") and ins:          # in place: writes its first argument
            written = _nbytes(ins[0])
            read = sum(map(_nbytes, ins[1:])) + (0 if name in _WRITE_ONLY else written)
        else:
            written = sum(map(_nbytes, _tensors(out)))
            read = 0 if name in _FILLS else sum(map(_nbytes, ins))
        self.traffic.launches.append(Launch("torch", name, read, written))
        return out


@contextlib.contextmanager
def count_traffic():
    """Count every Triton launch (in the interpreter) and torch op inside the block."""
    import numpy as np
    from triton.runtime import interpreter as ip

    traffic = Traffic()
    builder = ip.interpreter_builder
    real_load, real_store = builder.create_masked_load, builder.create_masked_store
    real_dot, real_call = builder.create_dot, ip.GridExecutor.__call__

    def load(ptrs, mask, other, cache_policy, is_volatile):
        cur = _current()
        if cur is not None:
            item = np.dtype(ip._get_np_dtype(ptrs.get_element_ty())).itemsize
            cur.read += int(np.count_nonzero(mask.data)) * item
        return real_load(ptrs, mask, other, cache_policy, is_volatile)

    def store(ptrs, value, mask, cache_policy):
        cur = _current()
        if cur is not None:
            item = np.dtype(ip._get_np_dtype(ptrs.get_element_ty())).itemsize
            cur.written += int(np.count_nonzero(mask.data)) * item
        return real_store(ptrs, value, mask, cache_policy)

    def dot(a, b, d, input_precision, max_num_imprecise_acc):
        cur = _current()
        if cur is not None:
            *batch, M, K = a.data.shape
            N = b.data.shape[-1]
            cur.flops += 2 * M * N * K * int(np.prod(batch or [1]))
        return real_dot(a, b, d, input_precision, max_num_imprecise_acc)

    def call(self, *args, **kwargs):
        outer = _current()
        launch = Launch("triton", getattr(self.fn, "__name__", "kernel"))
        _STATE.launch = launch
        try:
            return real_call(self, *args, **kwargs)
        finally:
            _STATE.launch = outer
            traffic.launches.append(launch)

    builder.create_masked_load, builder.create_masked_store = load, store
    builder.create_dot = dot
    ip.GridExecutor.__call__ = call
    try:
        with _TorchOps(traffic):
            yield traffic
    finally:
        builder.create_masked_load, builder.create_masked_store = real_load, real_store
        builder.create_dot = real_dot
        ip.GridExecutor.__call__ = real_call
