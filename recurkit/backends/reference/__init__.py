"""The reference interpreter as a backend: the step function run token by token in torch.

The smallest complete backend: one form, any device, differentiable, no knobs, no source;
tiled declarations go to the torch backend's evaluator.
Registering it is one line in ``recurkit/backends/__init__.py``; see docs/architecture.md.
"""
from __future__ import annotations

from ...ir.interpret import run_reference
from ..base import Backend
from ..torch import BACKEND as _torch


class ReferenceBackend(Backend):
    name = "reference"
    forms = ("sequential",)
    kinds = ("recurrence", "tiled")
    stateless = True
    differentiable = True
    autograd_only = True   # the oracle: its gradients are autograd through the step itself
    auto_rank = 100        # never chosen by "auto" (auto_for is False); listed last

    def prepare(self, program, form, chunk):
        if form not in (None, "sequential", "reference"):
            raise ValueError(f"backend 'reference' runs the step itself; form={form!r} "
                             "needs backend='torch'")
        return "reference", None

    def runner(self, form, tp, knobs):
        return run_reference

    def run_fn(self, form, tp, knobs):
        return self.runner(form, tp, knobs)   # the step itself, rotations as declared

    # tiled declarations: the torch backend's evaluation of the declaration's expressions
    def tiled_forward(self, plan, tc):
        return _torch.tiled_forward(plan, tc)

    def tiled_backward(self, plan, tc, dy, need):
        return _torch.tiled_backward(plan, tc, dy, need)


BACKEND = ReferenceBackend()
