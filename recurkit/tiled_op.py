"""Compiled tiled declarations, as torch custom ops with their generated backward.

Each compiled tiled declaration is two custom ops, ``<ns>::<name>`` (the forward) and
``<ns>::<name>_backward`` (every row and weight gradient at once, from the backward derived in
``lowering.tiled``): schema ``(Tensor <each row, index, weight in order>, float? <scalars>)``.
A declaration in the LUT form has a third, ``<ns>::<name>_backward_row`` (the row's gradient
alone, called when no weight needs one). The forward's autograd calls a backward op, so
``torch.compile`` sees opaque ops and traces them without graph breaks. The kernels are the
backend's (``Backend.tiled_forward`` / ``tiled_backward``), chosen per call by device through
the registry: with "auto", TVM on CPU tensors, Triton on CUDA tensors, torch elsewhere.
"""
from __future__ import annotations

import hashlib

import torch

from . import backends
from .custom_op import register_once
from .ir.tiled import TiledCall, bind_tiled
from .lowering.lut import LutPlan, has_bits, lower_lut
from .lowering.tiled import lower_tiled


def kernel_backend(backend: str, device: torch.device):
    """The backend whose kernels run a call on ``device`` (see ``backends.kernel_backend``:
    "auto" is TVM on CPU, Triton on CUDA, else torch; a CPU-only backend's op given CUDA
    tensors runs what auto runs there)."""
    return backends.kernel_backend(backend, "tiled", device.type)


class TiledTorchOp:
    """A tiled declaration as ``torch.ops.<ns>.<name>``, called with the declaration's
    signature (inputs by position or name, scalars as numbers)."""

    def __init__(self, program, qualname: str, backend: str = "auto"):
        tiled = [n for n, b in backends.REGISTRY.items() if "tiled" in b.kinds]
        if backend != backends.AUTO and backend not in tiled:
            raise ValueError(f"unknown backend {backend!r} for a tiled op; choose one of "
                             f"{', '.join([backends.AUTO, *tiled])}")
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
            return kernel_backend(self.backend, tc.device).tiled_forward(self.plan,
                                                                         tc).contiguous()

    def _backward_kernel(self, dy, *args):
        tc = self._bind(args)
        g = kernel_backend(self.backend, tc.device).tiled_backward(
            self.plan, tc, dy.contiguous(), frozenset(self.grad_names))
        return [g[n] for n in self.grad_names]

    def _backward_row_kernel(self, dy, *args):
        tc = self._bind(args)
        return kernel_backend(self.backend, tc.device).tiled_backward(
            self.plan, tc, dy.contiguous(), frozenset([self.row_name]))[self.row_name]

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

    def __deepcopy__(self, memo) -> "TiledTorchOp":
        return self   # one registered op per name: a copied model calls the same op


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
