"""Compiled tiled declarations, as torch custom ops with their generated backward.

Each compiled tiled declaration is two custom ops, ``<ns>::<name>`` (the forward) and
``<ns>::<name>_backward`` (every row and weight gradient at once, from the backward derived in
``lowering.tiled``): schema ``(Tensor <each row, index, weight in order>, float? <scalars>)``.
A declaration in the LUT form has a third, ``<ns>::<name>_backward_row`` (the row's gradient
alone, called when no weight needs one). The forward's autograd calls a backward op, so
``torch.compile`` sees opaque ops and traces them without graph breaks. Kernels by device and backend: "tvm" on CPU tensors,
"triton" on CUDA tensors (and in Triton's interpreter for CPU tensors when asked for), "torch"
anywhere.
"""
from __future__ import annotations

import hashlib

import torch

from .custom_op import register_once
from .ir.tiled import TiledCall, bind_tiled
from .lowering.lut import LutPlan, has_bits, lower_lut
from .lowering.tiled import TiledPlan, lower_tiled

TILED_BACKENDS = ("auto", "torch", "tvm", "triton")


def _forward(backend: str, plan: TiledPlan | LutPlan, tc: TiledCall) -> torch.Tensor:
    if isinstance(plan, LutPlan):
        if backend == "tvm":
            from .backends.tvm_lut import run_lut_tvm
            return run_lut_tvm(plan, tc)
        if backend == "triton":
            from .backends.triton_lut import run_lut_triton
            return run_lut_triton(plan, tc)
        from .backends.lut_torch import run_lut_torch
        return run_lut_torch(plan, tc)
    if backend == "tvm":
        from .backends.tvm_tiled import run_tiled_tvm
        return run_tiled_tvm(plan, tc)
    if backend == "triton":
        from .backends.triton_tiled import run_tiled_triton
        return run_tiled_triton(plan, tc)
    from .backends.tiled_torch import run_tiled_torch
    return run_tiled_torch(plan, tc)


def _backward(backend: str, plan: TiledPlan | LutPlan, tc: TiledCall, dy: torch.Tensor,
              need: frozenset[str]) -> dict:
    """The gradients of the inputs named in ``need`` (at least those; others may come too)."""
    if isinstance(plan, LutPlan):   # two matmuls with the dequantized weight
        if backend == "tvm":        # built block by block by TVM kernels
            from .backends.tvm_lut_dense import lut_grads_tvm
            return lut_grads_tvm(plan, tc, dy, need)
        from .backends.lut_torch import lut_grads_torch
        return lut_grads_torch(plan, tc, dy, need)
    if backend == "tvm":
        from .backends.tvm_tiled import tiled_grads_tvm
        return tiled_grads_tvm(plan, tc, dy)
    if backend == "triton":
        from .backends.triton_tiled import tiled_grads_triton
        return tiled_grads_triton(plan, tc, dy)
    from .backends.tiled_torch import tiled_grads_torch
    return tiled_grads_torch(plan, tc, dy)


def kernel_backend(backend: str, device: torch.device) -> str:
    """The backend that runs on ``device``: "auto" is TVM on CPU, Triton on CUDA, else torch;
    a TVM op given CUDA tensors runs Triton (TVM kernels here are CPU kernels)."""
    if backend == "auto":
        return {"cpu": "tvm", "cuda": "triton"}.get(device.type, "torch")
    if backend == "tvm" and device.type != "cpu":
        return "triton" if device.type == "cuda" else "torch"
    return backend


class TiledTorchOp:
    """A tiled declaration as ``torch.ops.<ns>.<name>``, called with the declaration's
    signature (inputs by position or name, scalars as numbers)."""

    def __init__(self, program, qualname: str, backend: str = "auto"):
        if backend not in TILED_BACKENDS:
            raise ValueError(f"unknown backend {backend!r} for a tiled op; choose one of "
                             f"{', '.join(TILED_BACKENDS)}")
        self.program, self.qualname, self.backend = program, qualname, backend
        self.plan = lower_lut(program) if has_bits(program) else lower_tiled(program)
        specs = program.call_inputs
        self.tensor_names = [s.name for s in specs if s.role != "scalar"]
        self.scalar_names = [s.name for s in specs if s.role == "scalar"]
        self.grad_names = self.plan.grad_inputs
        ns, name = qualname.split("::")
        args = [f"Tensor {n}" for n in self.tensor_names] + \
               [f"float? {n}=None" for n in self.scalar_names]
        self.lib = torch.library.Library(ns, "FRAGMENT")
        self.lib.define(f"{name}({', '.join(args)}) -> Tensor")
        self.lib.define(f"{name}_backward(Tensor dy, {', '.join(args)}) -> Tensor[]")
        self.lib.impl(name, self._kernel, "CompositeExplicitAutograd")
        self.lib.impl(f"{name}_backward", self._backward_kernel, "CompositeExplicitAutograd")
        torch.library.register_fake(qualname, self._fake, lib=self.lib)
        torch.library.register_fake(f"{qualname}_backward", self._fake_backward, lib=self.lib)
        # the LUT form: also the row's gradient alone, for when no weight needs one (frozen
        # weights, a layer's buffers: the scale's cotangent is half the backward's time). An
        # op of its own: Inductor (torch 2.13) called the backward without an int or bool[]
        # argument saying which gradients to compute.
        self.row_name = self.plan.row if isinstance(self.plan, LutPlan) else None
        if self.row_name is not None:
            self.lib.define(f"{name}_backward_row(Tensor dy, {', '.join(args)}) -> Tensor")
            self.lib.impl(f"{name}_backward_row", self._backward_row_kernel,
                          "CompositeExplicitAutograd")
            torch.library.register_fake(f"{qualname}_backward_row", self._fake_backward_row,
                                        lib=self.lib)
        torch.library.register_autograd(qualname, self._autograd, setup_context=self._setup,
                                        lib=self.lib)
        self.op = getattr(getattr(torch.ops, ns), name)
        self.backward_op = getattr(getattr(torch.ops, ns), f"{name}_backward")
        self.backward_row_op = getattr(getattr(torch.ops, ns), f"{name}_backward_row", None)

    def _bind(self, args, check: bool = False) -> TiledCall:
        names = self.tensor_names + self.scalar_names
        kw = {n: v for n, v in zip(names, args) if v is not None}
        return bind_tiled(self.program, (), kw, check_indices=check)

    def _kernel(self, *args):
        tc = self._bind(args, check=True)   # out-of-range indices never reach a kernel
        with torch.no_grad():
            return _forward(kernel_backend(self.backend, tc.device), self.plan, tc).contiguous()

    def _backward_kernel(self, dy, *args):
        tc = self._bind(args)
        g = _backward(kernel_backend(self.backend, tc.device), self.plan, tc, dy.contiguous(),
                      frozenset(self.grad_names))
        return [g[n] for n in self.grad_names]

    def _backward_row_kernel(self, dy, *args):
        tc = self._bind(args)
        return _backward(kernel_backend(self.backend, tc.device), self.plan, tc,
                         dy.contiguous(), frozenset([self.row_name]))[self.row_name]

    def _fake(self, *args):
        p = self.program
        kw = dict(zip(self.tensor_names, args))
        sizes: dict[str, int] = {}
        first = None
        for spec in p.call_inputs:
            if spec.role == "scalar":
                continue
            x = kw[spec.name]
            lead = 1 if spec.role == "row" else 0
            if spec.role == "row" and first is None:
                first = x
            dims = spec.dims[:-1] if spec.role == "bits" else spec.dims   # last one packed
            sizes.update(zip(dims, x.shape[lead:]))
        return first.new_empty((first.shape[0], *(sizes[d] for d in p.output.dims)))

    def _fake_backward(self, dy, *args):
        kw = dict(zip(self.tensor_names, args))
        return [torch.empty_like(kw[n]) for n in self.grad_names]

    def _fake_backward_row(self, dy, *args):
        return torch.empty_like(dict(zip(self.tensor_names, args))[self.row_name])

    def _setup(self, ctx, inputs, output) -> None:
        ctx.save_for_backward(*[x for x in inputs if isinstance(x, torch.Tensor)])
        ctx.scalars = [x for x in inputs[len(self.tensor_names):]]

    def _autograd(self, ctx, dy):
        tensors = ctx.saved_tensors
        at = {n: i for i, n in enumerate(self.tensor_names)}
        others = [n for n in self.grad_names if n != self.row_name]
        if self.row_name is not None and not any(ctx.needs_input_grad[at[n]] for n in others):
            by_name = {self.row_name: self.backward_row_op(dy, *tensors, *ctx.scalars)}
        else:
            by_name = dict(zip(self.grad_names, self.backward_op(dy, *tensors, *ctx.scalars)))
        return tuple(by_name.get(n) for n in self.tensor_names) + \
            tuple(None for _ in self.scalar_names)

    def __call__(self, *args, **kwargs):
        # errors name the argument; the index range is checked once, by the op's kernel
        tc = bind_tiled(self.program, args, kwargs, check_indices=False)
        return self.op(*[tc.tensors[n] for n in self.tensor_names],
                       *[tc.scalars[n] for n in self.scalar_names])

    def __repr__(self) -> str:
        return f"<tiled {self.program.name} as torch.ops.{self.qualname.replace('::', '.')}>"


def register_tiled(program, qualname: str, backend: str = "auto") -> TiledTorchOp:
    """The op ``qualname`` for ``program`` (registered once; a ValueError when the name is
    taken by another declaration)."""
    return register_once(program, qualname, lambda: TiledTorchOp(program, qualname, backend))


# part of every jit op's name: bump when the ops' schemas change, so that graphs compiled and
# cached on disk by torch.compile (which keys them by op name) never call an op of the old
# schema (seen: "expected at most 4 argument(s) but received 5" after a change)
OP_SCHEMA = 2


def compile_tiled(program, backend: str = "auto") -> TiledTorchOp:
    """``rk.compile`` of a tiled declaration: a custom op under ``recurkit_jit`` named by the
    declaration, its content hash and ``OP_SCHEMA``."""
    key = hashlib.sha1(f"{program.content_hash()}:{backend}:{OP_SCHEMA}".encode()
                       ).hexdigest()[:12]
    return register_tiled(program, f"recurkit_jit::{program.name}_{key}", backend)
