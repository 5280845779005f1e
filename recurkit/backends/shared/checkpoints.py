"""Chunk checkpoints the op's forward saves for its backward.

The sequential adjoint walks each chunk of tokens back from the state entering it. Those
states are a by-product of the forward, so when a backward will follow, the forward kernel
that can (``tvm.sequential``) writes them and the backward kernel (``tvm.adjoint``) starts
from them instead of running the forward again (a quarter of its time for Gated DeltaNet).

The request travels with the call, not through every kernel's signature: the op's Python
entry (``custom_op.TorchOp.__call__``, where grad mode is known) opens ``recording()``, the
forward kernel ``offer``s its states, the op's autograd setup ``take``s them into the
context, and the backward hands them to the kernel, which checks they belong to its call
(declaration, chunk, shape) and recomputes otherwise. Anything that skips the entry (the op
called as ``torch.ops...``, a torch.compile'd graph) records nothing: the backward then
recomputes, with the same result.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass

import torch

_LOCAL = threading.local()


@dataclass(frozen=True)
class Checkpoints:
    """The state entering every chunk of ``chunk`` tokens, per (sequence, head):
    ``states`` [N, H, chunks, *state] (fp32) of a call of the declaration ``program``
    (its content hash)."""

    program: str
    chunk: int
    states: torch.Tensor


@contextmanager
def recording():
    """While open, a forward kernel run on this thread may ``offer`` its checkpoints."""
    prev = getattr(_LOCAL, "box", None)
    _LOCAL.box = []
    try:
        yield
    finally:
        _LOCAL.box = prev


def wanted() -> bool:
    """Whether the running forward should save checkpoints (a recording is open and holds
    none yet: an op's forward offers once)."""
    box = getattr(_LOCAL, "box", None)
    return box is not None and not box


def offer(ck: Checkpoints) -> None:
    box = getattr(_LOCAL, "box", None)
    if box is not None and not box:
        box.append(ck)


def take() -> Checkpoints | None:
    """The checkpoints offered in the open recording (removed from it), or None."""
    box = getattr(_LOCAL, "box", None)
    return box.pop() if box else None
