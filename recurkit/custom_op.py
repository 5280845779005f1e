"""Torch custom ops for stateful declarations (``torch.ops.<ns>.<name>``).

An op has one schema for every device: the declaration's tensor inputs in order, its scalars
as optional floats (None: the declared default), then ``initial_state``, ``cu_seqlens``; it
always returns ``(output, final_state)``. Its kernel is a given compiled forward, its fake impl
follows the IR's shape rules, and its backward is the generated adjoint (``adjoint``: the
backward step derived from the declaration, run back in time by a compiled kernel) where one
serves the call, else the forward recomputed with a differentiable path (the torch tile
program, or the reference) under autograd. ``rk.export`` names such ops; every
``rk.compile`` result of a stateful declaration calls one registered under ``recurkit_jit``.
"""
from __future__ import annotations

import torch

from .backends.shared import checkpoints
from .ir.bind import bind_call, signature_names

_REGISTERED: dict[str, "TorchOp"] = {}


def _shares(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.device == b.device and a.untyped_storage().data_ptr() == \
        b.untyped_storage().data_ptr()


class TorchOp:
    """Calls ``torch.ops.<ns>.<name>`` with the declaration's call signature; returns
    ``(output, final_state or None)`` like a compiled op. ``kernel(**kw)`` computes
    ``(output, final_state)`` (no gradient); ``grad_kernel(**kw)`` computes the same with
    torch ops that autograd differentiates (the backward recomputes through it);
    ``adjoint(kw, leaves, grad_o, grad_S)``, if given, returns the gradients by argument name
    from the generated adjoint, or None where it does not serve the call."""

    def __init__(self, program, qualname: str, kernel, grad_kernel, adjoint=None):
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
        # the gradient of every tensor input, then of the initial state (empty when none);
        # the chunk checkpoints the forward saved, if it did (``shared.checkpoints``)
        self.lib.define(f"{name}_backward(Tensor? grad_out, Tensor? grad_final_state, "
                        f"{', '.join(args)}, Tensor? checkpoints=None, "
                        f"int checkpoint_chunk=0) -> Tensor[]")
        self._fwd, self._grad_path, self._adjoint = kernel, grad_kernel, adjoint
        self.lib.impl(name, self._kernel, "CompositeExplicitAutograd")
        self.lib.impl(f"{name}_backward", self._backward_kernel, "CompositeExplicitAutograd")
        torch.library.register_fake(qualname, self._fake, lib=self.lib)
        torch.library.register_fake(f"{qualname}_backward", self._fake_backward, lib=self.lib)
        torch.library.register_autograd(qualname, self._backward, setup_context=self._setup,
                                        lib=self.lib)
        self.op = getattr(getattr(torch.ops, ns), name)
        self.backward_op = getattr(getattr(torch.ops, ns), f"{name}_backward")

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
        with torch.no_grad():
            o, S = self._fwd(**kw)
        given = [x for x in args if isinstance(x, torch.Tensor)]
        # a custom op's outputs may not alias its inputs (an empty sequence's final state is
        # its initial state)
        return tuple(t.clone() if any(_shares(t, x) for x in given) else t.contiguous()
                     for t in (o, S))

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
        B, T = first.shape[:2]
        H = max(kw[s.name].shape[2 if s.role == "token" else 0] for s in p.call_inputs
                if s.role in ("token", "param"))   # grouped heads: the most any input has
        cu = kw.get("cu_seqlens")
        N = cu.shape[0] - 1 if cu is not None else B
        o = first.new_empty((B, T, H, *(sizes[d] for d in p.output.dims)))
        S = first.new_empty((N, H, *(sizes[d] for d in p.state.dims)), dtype=torch.float32)
        return o, S

    def _setup(self, ctx, inputs, output) -> None:
        ctx.set_materialize_grads(False)   # an unused final state needs no backward pass
        ctx.n_in = len(inputs)
        saved = [x if isinstance(x, torch.Tensor) else None for x in inputs]
        ctx.scalars = [None if isinstance(x, torch.Tensor) else x for x in inputs]
        ck = checkpoints.take()
        if ck is not None and ck.program != self.program.content_hash():
            ck = None
        ctx.chunk = ck.chunk if ck is not None else 0
        ctx.save_for_backward(*[x if x is not None else torch.empty(0) for x in saved],
                              ck.states if ck is not None else torch.empty(0))
        ctx.is_tensor = [x is not None for x in saved]

    def _backward(self, ctx, grad_o, grad_S):
        if grad_o is None and grad_S is None:
            return tuple(None for _ in self.arg_names)
        saved = ctx.saved_tensors
        args = [saved[i] if ctx.is_tensor[i] else ctx.scalars[i] for i in range(ctx.n_in)]
        args += [None] * (len(self.arg_names) - len(args))
        ck = saved[ctx.n_in] if ctx.chunk else None
        grads = self.backward_op(grad_o, grad_S, *args, ck, ctx.chunk)
        by_name = dict(zip(self.tensor_names, grads))
        if self._kwargs(args).get("initial_state") is not None:
            by_name["initial_state"] = grads[-1]
        return tuple(by_name.get(n) for n in self.arg_names)

    def _backward_kernel(self, grad_o, grad_S, *args):
        """The gradients, from the generated adjoint where it serves the call, else by
        recomputing the forward through the differentiable path under autograd."""
        n = len(self.arg_names)
        states, chunk = (list(args[n:]) + [None, 0])[:2]
        args = args[:n]
        ck = None if states is None or not chunk else checkpoints.Checkpoints(
            self.program.content_hash(), int(chunk), states)
        with torch.inference_mode(False):   # AOT-compiled backwards run in inference mode
            return self._gradients(grad_o, grad_S, self._kwargs(args), ck)

    def _gradients(self, grad_o, grad_S, kw: dict, ck=None) -> list[torch.Tensor]:
        names = self.tensor_names + ["initial_state"]
        # autograd (through the prologue, or the whole recompute) needs leaves that are not
        # inference tensors: those are copied
        leaves = {n: (kw[n].clone() if kw[n].is_inference() else kw[n].detach())
                  .requires_grad_(kw[n].is_floating_point())
                  for n in names if kw.get(n) is not None}
        got = None
        if self._adjoint is not None:
            got = self._adjoint(kw, leaves, grad_o, grad_S, ck)
        if got is None:
            with torch.enable_grad():
                o, S = self._grad_path(**{**kw, **leaves})
                pairs = [(t, g) for t, g in ((o, grad_o), (S, grad_S)) if g is not None]
                want = [n for n, v in leaves.items() if v.requires_grad]
                res = torch.autograd.grad([t for t, _ in pairs], [leaves[n] for n in want],
                                          [g for _, g in pairs], allow_unused=True)
            got = dict(zip(want, res))
        out = [got.get(n) if got.get(n) is not None else torch.zeros_like(kw[n])
               for n in self.tensor_names]
        init = kw.get("initial_state")
        g0 = got.get("initial_state") if init is not None else None
        out.append(out[0].new_empty(0) if init is None else
                   (g0 if g0 is not None else torch.zeros_like(init)))
        return out

    def _fake_backward(self, grad_o, grad_S, *args):
        kw = self._kwargs(args[:len(self.arg_names)])
        init = kw.get("initial_state")
        first = kw[self.tensor_names[0]]
        return [torch.empty_like(kw[n]) for n in self.tensor_names] + [
            first.new_empty(0) if init is None else torch.empty_like(init)]

    # --- calling it -------------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        # checked here, errors naming the argument (grouped inputs are not repeated for it)
        bc = bind_call(self.program, args, dict(kwargs), repeat=False)
        want_final = bc.output_final_state
        given = dict(zip(signature_names(self.program), args))
        given.update(kwargs)
        call = [given.get(n) for n in self.arg_names]
        if self._adjoint is not None and torch.is_grad_enabled() and any(
                isinstance(x, torch.Tensor) and x.requires_grad for x in call):
            with checkpoints.recording():   # the forward may save the backward's checkpoints
                o, S = self.op(*call)
        else:
            o, S = self.op(*call)
        return o, (S if want_final else None)

    def __repr__(self) -> str:
        return f"<{self.program.name} as torch.ops.{self.qualname.replace('::', '.')}>"

    def __deepcopy__(self, memo) -> "TorchOp":
        """A registered op is one per name: a copied model (an EMA, a reference, FSDP's
        copies) calls the same op."""
        return self




def register(program, qualname: str, kernel, grad_kernel, adjoint=None) -> TorchOp:
    """The op ``qualname`` for ``program``: registered now, or the one already registered
    under that name for the same declaration (a ValueError for another one)."""
    return register_once(program, qualname,
                         lambda: TorchOp(program, qualname, kernel, grad_kernel, adjoint))


def register_once(program, qualname: str, make):
    """The op registered under ``qualname`` (one table for every kind of op), made by
    ``make()`` on first use; a ValueError when the name belongs to another declaration."""
    hit = _REGISTERED.get(qualname)
    if hit is not None:
        if hit.program.content_hash() != program.content_hash():
            raise ValueError(f"{qualname} is already registered for another declaration "
                             f"({hit.program.name}); choose another name")
        return hit
    op = make()
    _REGISTERED[qualname] = op
    return op
