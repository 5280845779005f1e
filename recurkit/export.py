"""``rk.export``: a declaration as a torch custom op (``torch.ops.<ns>.<name>``).

The op has one schema for every device: the declaration's tensor inputs in order, its scalars
as optional floats (None: the declared default), then ``initial_state``, ``cu_seqlens``; it
always returns ``(output, final_state)``. Its kernel is the compiled op (``backend="auto"``:
the TVM kernel on CPU, the torch tile program elsewhere), its fake impl follows the IR's shape
rules, and its backward recomputes the forward with the torch backend under autograd. (The
backward generated from the declaration, as an adjoint recurrence, is not built yet.)
"""
from __future__ import annotations

import torch

from .compiler import CompiledOp, as_program
from .ir.bind import bind_call

_EXPORTED: dict[str, "ExportedOp"] = {}


class ExportedOp:
    """Calls ``torch.ops.<ns>.<name>`` with the declaration's call signature; returns
    ``(output, final_state or None)`` like a compiled op."""

    def __init__(self, program, qualname: str, backend: str):
        self.program, self.qualname = program, qualname
        specs = program.call_inputs
        self.tensor_names = [s.name for s in specs if s.role in ("token", "param")]
        self.scalar_names = [s.name for s in specs if s.role == "scalar"]
        # the op's arguments, in schema order
        self.arg_names = self.tensor_names + self.scalar_names + ["initial_state", "cu_seqlens"]
        ns, name = qualname.split("::")
        args = [f"Tensor {n}" for n in self.tensor_names] + \
               [f"float? {n}=None" for n in self.scalar_names] + \
               ["Tensor? initial_state=None", "Tensor? cu_seqlens=None"]
        self.lib = torch.library.Library(ns, "FRAGMENT")
        self.lib.define(f"{name}({', '.join(args)}) -> (Tensor, Tensor)")
        fwd = CompiledOp(program, backend)
        grad_path = CompiledOp(program, "torch")
        self._fwd, self._grad_path = fwd, grad_path
        self.lib.impl(name, self._kernel, "CompositeExplicitAutograd")
        torch.library.register_fake(qualname, self._fake, lib=self.lib)
        torch.library.register_autograd(qualname, self._backward, setup_context=self._setup,
                                        lib=self.lib)
        self.op = getattr(getattr(torch.ops, ns), name)

    # --- the op's parts --------------------------------------------------------------------
    def _kwargs(self, args) -> dict:
        names = self.arg_names
        kw = dict(zip(names, list(args) + [None] * (len(names) - len(args))))
        for n in self.scalar_names:   # None: the declared default
            if kw[n] is None:
                del kw[n]
        return kw

    def _kernel(self, *args):
        kw = self._kwargs(args)
        o, S = self._fwd(**kw, output_final_state=True)
        return o, S

    def _fake(self, *args):
        kw = self._kwargs(args)
        p = self.program
        sizes: dict[str, int] = {}
        first = None
        for spec in p.call_inputs:
            if spec.role not in ("token", "param"):
                continue
            x = kw[spec.name]
            first = first if first is not None else x
            lead = 3 if spec.role == "token" else 1
            sizes.update(zip(spec.dims, x.shape[lead:]))
        B, T, H = first.shape[:3]
        cu = kw.get("cu_seqlens")
        N = cu.shape[0] - 1 if cu is not None else B
        o = first.new_empty((B, T, H, *(sizes[d] for d in p.output.dims)))
        S = first.new_empty((N, H, *(sizes[d] for d in p.state.dims)), dtype=torch.float32)
        return o, S

    def _setup(self, ctx, inputs, output) -> None:
        ctx.n_in = len(inputs)
        saved = [x if isinstance(x, torch.Tensor) else None for x in inputs]
        ctx.scalars = [None if isinstance(x, torch.Tensor) else x for x in inputs]
        ctx.save_for_backward(*[x if x is not None else torch.empty(0) for x in saved])
        ctx.is_tensor = [x is not None for x in saved]

    def _backward(self, ctx, grad_o, grad_S):
        saved = ctx.saved_tensors
        args = [saved[i] if ctx.is_tensor[i] else ctx.scalars[i] for i in range(ctx.n_in)]
        kw = self._kwargs(args)
        names = self.tensor_names + ["initial_state"]
        leaves = {n: kw[n].detach().requires_grad_(kw[n].is_floating_point())
                  for n in names if kw.get(n) is not None}
        with torch.enable_grad():
            o, S = self._grad_path(**{**kw, **leaves}, output_final_state=True)
            outs, grads_out = [o], [grad_o]
            if grad_S is not None:
                outs.append(S)
                grads_out.append(grad_S)
            want = [v for v in leaves.values() if v.requires_grad]
            got = torch.autograd.grad(outs, want, grads_out, allow_unused=True)
        by_name = dict(zip([n for n, v in leaves.items() if v.requires_grad], got))
        return tuple(by_name.get(n) for n in self.arg_names)

    # --- calling it -------------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        want_final = kwargs.pop("output_final_state", False)
        bc = bind_call(self.program, args, dict(kwargs))   # errors name the argument
        del bc
        given = dict(zip(self.tensor_names + self.scalar_names, args))
        given.update(kwargs)
        o, S = self.op(*[given.get(n) for n in self.arg_names])
        return o, (S if want_final else None)

    def __repr__(self) -> str:
        return f"<rk.export {self.program.name} as torch.ops.{self.qualname.replace('::', '.')}>"


def export(decl, qualname: str, backend: str = "auto") -> ExportedOp:
    """Register ``decl`` as the torch custom op ``qualname`` ("namespace::name") and return a
    callable with the declaration's signature. ``torch.ops.namespace.name`` takes the tensor
    inputs, the scalars (None for their defaults), ``initial_state`` and ``cu_seqlens`` and
    returns ``(output, final_state)``; it works with autograd, ``torch.compile`` (no graph
    breaks) and ``torch.library.opcheck``."""
    if not isinstance(qualname, str) or qualname.count("::") != 1 or not all(
            part.isidentifier() for part in qualname.split("::")):
        raise ValueError(f"export name must look like 'namespace::name', got {qualname!r}")
    p = as_program(decl)
    if p.new_state is None:
        raise ValueError(f"{p.name} is stateless: export takes recurrences")
    hit = _EXPORTED.get(qualname)
    if hit is not None:
        if hit.program.content_hash() != p.content_hash():
            raise ValueError(f"{qualname} is already registered for another declaration "
                             f"({hit.program.name}); choose another name")
        return hit
    op = ExportedOp(p, qualname, backend)
    _EXPORTED[qualname] = op
    return op
