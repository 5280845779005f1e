"""The affine map of a segment of a linear recurrence, from the analysis: over a run of tokens
the state leaving is ``S_out = P(S_in) + S_loc``, ``S_loc`` the run's final state from a zero
state and ``P`` the product of its transitions, whose shape the analysis gives:

- gated forms: ``P(S) = a_K * S * a_V``, the run's summed log-gates exponentiated;
- WY forms: ``P(S) = M S * a_V``, ``M`` [K, K] the product of ``D + u r^T``: the final state of
  the *transition declaration* (``S' = D S + u (r^T S)`` over a [K, K] state) from ``I``;
- scans: ``P(h) = a * h``, the product of the coefficients.

What joins segments run in parallel: context parallelism across ranks (``recurkit.context``)
and the Triton chunk forms' in-GPU segments (``backends.triton.segments``). A call's tokens
are cut into *pieces*, contiguous runs of one sequence given by offsets into the call's
tokens flattened [B * T] (``Pieces``); every map here is [pieces, H, ...], fp32.
"""
from __future__ import annotations

import inspect
import weakref

import torch

from ...ir import dsl
from ...ir.interpret import evaluate
from ...ir.trace import trace
from .host import on_dims

_TRANSITIONS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class Pieces:
    """A call's flattened tokens [B * T] cut at ``cu`` (offsets from 0 to B * T, one piece
    between each two; a piece may be empty)."""

    def __init__(self, bc, cu: torch.Tensor | list[int]):
        self.host = [int(c) for c in (cu.tolist() if isinstance(cu, torch.Tensor) else cu)]
        self.bc, self.count = bc, len(self.host) - 1
        self.cu = torch.tensor(self.host, dtype=torch.int64).to(bc.device)
        self.ids = torch.repeat_interleave(torch.arange(self.count, device=bc.device),
                                           self.cu[1:] - self.cu[:-1],
                                           output_size=bc.B * bc.T)

    @classmethod
    def of_call(cls, bc) -> "Pieces":
        """One piece per sequence of the call (its rows, or its ``cu_seqlens``)."""
        if bc.cu_seqlens is not None:
            return cls(bc, bc.cu_seqlens_tensor)
        return cls(bc, [b * bc.T for b in range(bc.B + 1)])

    def flat(self, v: torch.Tensor) -> torch.Tensor:
        """A per-token value [B|1, T|1, H|1, *dims] as [1, B * T, H, *dims]."""
        bc = self.bc
        v = v.expand(bc.B, bc.T, bc.H, *v.shape[3:])
        return v.reshape(1, bc.B * bc.T, bc.H, *v.shape[3:])

    def sum(self, v: torch.Tensor) -> torch.Tensor:
        """A per-token value summed over each piece, in float64: [pieces, H, *dims]."""
        v = self.flat(v.double())[0]
        return torch.zeros(self.count, *v.shape[1:], dtype=v.dtype,
                           device=v.device).index_add(0, self.ids, v)


def _gate(rec, bc, pieces: Pieces, log_node, decay_node):
    """exp of a gate's log summed over each piece (times the sign of its product where the
    gate is not proven positive): [pieces, H, *dims], or None."""
    if log_node is None and decay_node is None:
        return None
    if rec.gate_positive or decay_node is None:
        return torch.exp(pieces.sum(evaluate(bc, [log_node])[id(log_node)])).float()
    d = evaluate(bc, [decay_node])[id(decay_node)]
    mag = torch.exp(pieces.sum(torch.log(d.abs())))
    neg = pieces.sum((d < 0).double())
    return (mag * (1 - 2 * torch.remainder(neg, 2))).float()


def maps(rec, bc, pieces: Pieces, run_transition) -> list[torch.Tensor]:
    """Each piece's map, as tensors [pieces, H, ...]: (a_K, a_V) for gated forms (ones where
    a side has no gate), (M, a_V) for WY forms, (a,) for scans. ``run_transition(decl, kw,
    eye, pieces)``: the final state of the transition declaration ``decl`` called with the
    tensors ``kw`` ([1, B * T, H, ...]), initial state ``eye`` and the pieces as its
    sequences (``cu_seqlens=pieces.cu``)."""
    H, count = bc.H, pieces.count
    if "chunk_gated" not in rec.forms and "chunk_wy" not in rec.forms:   # the scan
        sd = bc.program.state.dims
        nodes = [n for n in (rec.scan_log_a, rec.scan_sign) if n is not None]
        vals = evaluate(bc, nodes)
        la, sg = (on_dims(vals[id(n)], n.dims, sd) if n is not None else None
                  for n in (rec.scan_log_a, rec.scan_sign))
        a = torch.exp(pieces.sum(la))
        if sg is not None:
            a = a * (1 - 2 * torch.remainder(pieces.sum((sg < 0).double()), 2))
        return [a.float().expand(count, H, *(bc.sizes[d] for d in sd))]
    K, V = bc.sizes[rec.kdim], bc.sizes[rec.vdim]
    ones = torch.ones(count, H, 1, device=bc.device)

    def side(t, n):
        if t is None:
            return ones.expand(count, H, n)
        return t.reshape(count, H, -1).expand(count, H, n)
    a_v = side(_gate(rec, bc, pieces, rec.log_gate_v, rec.decay_v), V)
    if rec.erase_u is None:
        return [side(_gate(rec, bc, pieces, rec.log_gate_k, rec.decay_k), K), a_v]
    decl = transition_declaration(bc.program, rec)
    g = rec.log_gate_k if rec.gate_positive else rec.decay_k
    feeds = {"d": g, "u": rec.erase_u, "r": rec.erase_r}
    vals = evaluate(bc, [n for n in feeds.values() if n is not None])
    kw = {}
    for name, n in feeds.items():
        if n is None:   # no K-side gate: log 0 (or a decay of 1)
            kw[name] = torch.full((1, bc.B * bc.T, H), 0.0 if rec.gate_positive else 1.0,
                                  device=bc.device)
            continue
        kw[name] = pieces.flat(vals[id(n)].float()).contiguous()
    eye = torch.eye(K, device=bc.device).expand(count, H, K, K).contiguous()
    kw["e"] = torch.zeros(H, K, device=bc.device)
    return [run_transition(decl, kw, eye, pieces), a_v]


def transition_declaration(program, rec):
    """The transition declaration of a WY-form ``program``: S' = D S + u (r^T S) over a
    [K, K'] state (its final state from I is the product of the transitions)."""
    if program in _TRANSITIONS:
        return _TRANSITIONS[program]
    K = rec.kdim
    gd = tuple(d for d in (rec.log_gate_k or rec.decay_k).dims) if (
        rec.log_gate_k is not None or rec.decay_k is not None) else ()
    positive = rec.gate_positive

    def step(S, d, u, r, e):   # e: zeros [K'], binding K' (and the WY form's write)
        S2 = (dsl.exp(d) if positive else d) * S + dsl.outer(u, r @ S) + dsl.outer(u, e)
        return S2, e * (r @ S2)
    kin = f"{K}in"
    params = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=a)
              for n, a in (("S", dsl.Spec("state", (K, kin))), ("d", dsl.Spec("token", gd)),
                           ("u", dsl.Spec("token", (K,))), ("r", dsl.Spec("token", (K,))),
                           ("e", dsl.Spec("param", (kin,))))]
    step.__signature__ = inspect.Signature(params)
    _TRANSITIONS[program] = trace(step, f"{program.name}_transition")
    return _TRANSITIONS[program]


def apply_map(rec, state_dims, m: list[torch.Tensor], S: torch.Tensor) -> torch.Tensor:
    """A piece's map (its rows of ``maps``) applied to the state entering it: [..., H,
    *state dims]."""
    if len(m) == 1:   # the scan: elementwise
        return m[0] * S
    kfirst = tuple(state_dims).index(rec.kdim) == 0
    St = S if kfirst else S.transpose(-1, -2)          # [H, K, V]
    left, a_v = m
    St = left.unsqueeze(-1) * St if left.dim() == St.dim() - 1 else left @ St
    St = St * a_v.unsqueeze(-2)
    return St if kfirst else St.transpose(-1, -2)
