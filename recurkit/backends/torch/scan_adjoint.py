"""The scan form's backward in torch ops (``backends.shared.scan_backward``): the forward
states and the reverse scan of their cotangents as loops over the tokens, vectorised over
sequences (of equal length), heads and the state: the oracle of the Triton kernel."""
from __future__ import annotations

from typing import Callable

import torch

from ...ir.bind import BoundCall
from ..shared.host import initial_state, segments


def run_scan_adjoint_torch(bc: BoundCall, a: torch.Tensor, b: torch.Tensor, dh_of: Callable,
                           d_final: torch.Tensor | None, config: dict | None = None):
    """(da, db [B, T, H, *state], the initial state's cotangent [N, H, *state]) for
    ``h_t = a_t h_(t-1) + b_t``; ``dh_of(hs)`` is the readout's cotangent of the states. The
    torch renderer has no knobs (``config`` is ignored)."""
    segs = segments(bc)
    s0 = initial_state(bc, len(segs))
    groups = [list(range(len(segs)))] if bc.cu_seqlens is None else [[n] for n in
                                                                      range(len(segs))]
    hs = torch.zeros_like(a)
    for ns in groups:
        rows = [segs[n][0] for n in ns]
        start, end = segs[ns[0]][1], segs[ns[0]][2]
        h = s0[ns]
        for t in range(start, end):
            h = a[rows, t] * h + b[rows, t]
            hs[rows, t] = h
    dh = dh_of(hs)
    da, db = torch.zeros_like(a), torch.zeros_like(b)
    ds0 = torch.empty_like(s0)
    for ns in groups:
        rows = [segs[n][0] for n in ns]
        start, end = segs[ns[0]][1], segs[ns[0]][2]
        L = d_final[ns].clone() if d_final is not None else torch.zeros_like(s0[ns])
        for t in range(end - 1, start - 1, -1):
            L = L + dh[rows, t]
            db[rows, t] = L
            da[rows, t] = L * (hs[rows, t - 1] if t > start else s0[ns])
            L = a[rows, t] * L
        ds0[ns] = L
    return da, db, ds0
