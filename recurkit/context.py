"""Context parallelism: ``op(..., cp_group=group)`` runs one sequence split along T over the
ranks of a ``torch.distributed`` process group, exactly.

A linear recurrence over a segment is an affine map of the state entering it,
``S_out = P(S_in) + S_loc``: ``S_loc`` the segment's final state from a zero state, and ``P``
the product of its transitions, whose shape the analysis gives (``backends.shared.
segment_maps``: diagonal for gated forms, [K, K] for WY forms, elementwise for scans); with
sub-steps the expanded call's; for a rotating state its frame's, after the segment's whole
turn ``R(Theta_T)`` (the frame runs from ``R(Theta_T) S``).

Each rank runs its slice from a zero state (``S_loc``) and computes its maps; one all-gather
(``torch.distributed.nn``, so autograd runs it backwards) brings every rank's states and
maps; every rank composes them in rank order (fp32) into the state entering each of its
segments and every sequence's final state, and reruns its slice from those. Gradients flow
through the same graph: each rank's inputs get their whole gradient; an input every rank
holds whole (``initial_state``, a per-head ``rk.Param``) gets each rank's share, to be summed
as DDP / FSDP (or the user) sum parameters' gradients.

Per call the all-gather moves, per rank, ``N_r x H x (|S| + |P|)`` fp32 values: the state
and a map per segment (``|P|``: K + V for gated forms, K * K + V for WY forms, |S| for scans).
"""
from __future__ import annotations

import math
import warnings
import weakref

import torch

from .ir.bind import CallError, bind_call, match_args, signature_names
from .backends.shared import segment_maps
from .ir.interpret import evaluate
from .lowering.analysis import analyze

# program -> {backend: its transition declaration compiled}
_TRANSITIONS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def supported(rec) -> str | None:
    """Why context parallelism does not run ``rec`` (None: it does)."""
    inner = rec
    if inner.frame is not None:
        inner = analyze(inner.frame.program)
    if inner.expansion is not None:
        inner = analyze(inner.expansion.program)
    if inner.read_across:
        return "its erase is read across, which context parallelism does not yet join"
    if not any(f in rec.forms for f in ("chunk_gated", "chunk_wy", "scan")):
        why = "; ".join(rec.reasons) or "it is not linear in the state"
        return f"it runs only sequentially ({why}): a segment is no affine map to join"
    return None


def run_context_parallel(op, args: tuple, kwargs: dict, group):
    """``op(*args, **kwargs)`` over ``group``'s ranks, each holding its slice along T."""
    from .compiler import TUNE_GROUP
    token = TUNE_GROUP.set(group)   # an autotuned op tunes on the first rank only
    try:
        return _run(op, args, kwargs, group)
    finally:
        TUNE_GROUP.reset(token)


def _run(op, args: tuple, kwargs: dict, group):
    import torch.distributed as dist
    p = op.program
    rec = analyze(p)
    why = supported(rec)
    if why is not None:
        raise ValueError(f"cp_group: {p.name} cannot run context parallel: {why}")
    given = match_args(p.name, signature_names(p), args, kwargs)
    xs = {s.name: given[s.name] for s in p.call_inputs if s.name in given}
    init, cu = given.get("initial_state"), given.get("cu_seqlens")
    want_final = given.get("output_final_state", False)
    first = next(v for v in xs.values() if isinstance(v, torch.Tensor))
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    # the slice checked here, and every rank told of every refusal before anything else
    try:
        T_r = _length(p, xs)
        bind_call(p, (), {**xs, "initial_state": init, "cu_seqlens": None}
                  if cu is None else xs)
        refused = None if T_r >= 1 else CallError(
            "cp_group: every rank's slice needs at least one token")
    except CallError as e:
        T_r, refused = 0, e
    lens = [torch.zeros(2, dtype=torch.int64, device=first.device) for _ in range(world)]
    dist.all_gather(lens, torch.tensor([T_r, refused is not None], device=first.device),
                    group=group)
    bad = [r for r, x in enumerate(lens) if int(x[1])]
    if bad:   # every rank raises, with the first refused rank's reason
        said = [None] * world
        dist.all_gather_object(said, None if refused is None else str(refused), group=group)
        raise CallError(f"cp_group: the call on rank {bad[0]} of the group was refused: "
                        f"{said[bad[0]]}")
    lens = [int(x[0]) for x in lens]
    t0 = sum(lens[:rank])
    pieces, local_cu, N = _pieces(cu, t0, T_r, sum(lens), first)
    bc = bind_call(p, (), {**xs, "cu_seqlens": local_cu})   # checks the slice
    _, S_loc = op(**xs, output_final_state=True, cu_seqlens=local_cu)
    inner, turns = _inner(rec, bc, local_cu)
    maps = segment_maps.maps(*inner, _transition_runner(op))
    # one all-gather of every rank's segments: their states and maps, padded to the most
    import torch.distributed.nn.functional as dnn
    counts = [None] * world
    dist.all_gather_object(counts, list(pieces), group=group)
    most = max(len(c) for c in counts)
    sent = [S_loc] + maps + ([turns.cos_sin] if turns is not None else [])
    packed = torch.cat([_pad(t.float().reshape(len(pieces), -1), most) for t in sent], 1)
    with warnings.catch_warnings():   # the autograd all-gather; its successor is private
        warnings.simplefilter("ignore", FutureWarning)
        got = dnn.all_gather(packed, group=group)
    widths = [math.prod(t.shape[1:]) for t in sent]
    state_shape = tuple(S_loc.shape[1:])
    # compose in rank order: the state entering each segment, each sequence's final state
    zero = torch.zeros(state_shape, dtype=torch.float32, device=first.device)
    cur = {n: (init[n].float() if init is not None else zero) for n in range(N)}
    entering = []
    for r in range(world):
        for j, n in enumerate(counts[r]):
            parts = torch.split(got[r][j], widths)
            S_in = cur[n]
            if r == rank:
                entering.append(S_in)
            S_l = parts[0].reshape(state_shape)
            m = [x.reshape(t.shape[1:]) for x, t in zip(parts[1:], maps)]
            if turns is not None:   # a rotating state: the segment's whole turn first
                S_in = turns(S_in, parts[len(maps) + 1])
            cur[n] = segment_maps.apply_map(inner[0], p.state.dims, m, S_in) + S_l
    enter = torch.stack(entering) if entering else None
    o, _ = op(**xs, initial_state=enter, output_final_state=False, cu_seqlens=local_cu)
    o = _Tie.apply(o, *got)   # every rank's backward runs the all-gather's (all ranks must)
    final = torch.stack([cur[n] for n in range(N)]) if want_final else None
    return o, final


class _Tie(torch.autograd.Function):
    """``x`` unchanged, made to depend on ``others``: the first rank's output reads no
    gathered tensor (its segments start from the initial state), yet its backward must run
    the all-gather's, whose all-to-all every rank joins and which brings the later ranks'
    gradients of its own segments."""

    @staticmethod
    def forward(ctx, x, *others):
        ctx.likes = [(t.shape, t.dtype, t.device) for t in others]
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return (g, *[torch.zeros(s, dtype=d, device=v) for s, d, v in ctx.likes])


def _inner(rec, bc, cu):
    """(the analysis, call and pieces (``segment_maps.Pieces``: the call's sequences) whose
    transitions are the op's: the rotation-free declaration's (``lowering.rotation``),
    expanded into its sub-steps (``lowering.substeps``) where it has them), and for a rotating
    state the segments' whole turns (``_Turns``) or None."""
    turns = None
    if rec.frame is not None:
        from .backends.shared.rotation import framed_call
        fr = rec.frame
        turns = _Turns(fr, bc, segment_maps.Pieces.of_call(bc)) if fr.rotates_state else None
        bc, _ = framed_call(bc, fr)
        rec = analyze(fr.program)
    if rec.expansion is not None:
        from .backends.shared.substeps import expand_call
        bc, _ = expand_call(bc, rec.expansion)
        rec = analyze(rec.expansion.program)
    return (rec, bc, segment_maps.Pieces.of_call(bc)), turns


def _transition_runner(op):
    """``segment_maps.maps``' way to run a transition declaration: compiled on ``op``'s
    backend (cached per declaration and backend)."""
    def run(decl, kw, eye, pieces):   # keyed by the op's program: the value holds decl
        cache = _TRANSITIONS.setdefault(op.program, {})
        if op.backend not in cache:
            from .compiler import CompiledOp
            cache[op.backend] = CompiledOp(decl, op.backend)
        _, M = cache[op.backend](**kw, initial_state=eye, output_final_state=True,
                                 cu_seqlens=pieces.cu)
        return M
    return run


class _Turns:
    """A rotating state's segments: the frame runs ``S~ = R(Theta_T) S`` in (``Theta_T`` the
    segment's whole angle), so a segment's map is its frame's, after that turn."""

    def __init__(self, fr, bc, pieces):
        from .backends.shared.rotation import cos_sin_of, summed_angle
        from .ir.interpret import turn_pairs
        self.fr, self.turn = fr, turn_pairs
        step = summed_angle(bc, fr, evaluate(bc, [a for a, _ in fr.total]), fr.total)
        c, s = cos_sin_of(pieces.sum(step))
        self.cos_sin = torch.stack([c, s], 2)   # [segments, H, 2, P|1]

    def __call__(self, S: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
        """``S`` [H, *state dims] turned by a segment's angle (``packed``: its cos_sin)."""
        fr = self.fr
        cs = packed.reshape(self.cos_sin.shape[1:])
        return self.turn(S, fr.source.state.dims, cs[:, 0], cs[:, 1],
                         (fr.pair,) if fr.pair else ("_one",), fr.dim, fr.pair, fr.layout, 1)


def _pad(x: torch.Tensor, rows: int) -> torch.Tensor:
    return x if x.shape[0] == rows else torch.cat(
        [x, x.new_zeros(rows - x.shape[0], *x.shape[1:])])


def _length(p, xs) -> int:
    for s in p.call_inputs:
        if s.role == "token" and isinstance(xs.get(s.name), torch.Tensor):
            return xs[s.name].shape[1]
    raise CallError(f"cp_group: {p.name} has no token input to take the slice's length from")


def _pieces(cu, t0: int, T_r: int, T: int, like: torch.Tensor):
    """(the global sequence of each of this rank's segments, the slice's cu_seqlens or None,
    the number of sequences)."""
    if cu is None:
        B = like.shape[0]
        return list(range(B)), None, B
    if not isinstance(cu, torch.Tensor):
        raise CallError("argument 'cu_seqlens': expected a 1-D int tensor of the whole "
                        "sequence's offsets (the same on every rank)")
    offs = [int(c) for c in cu.tolist()]
    if offs[-1] != T:
        raise CallError(f"argument 'cu_seqlens': with cp_group the offsets are the whole "
                        f"sequence's, ending at the ranks' total T = {T}, got {offs[-1]}")
    cuts = sorted({0, T_r} | {c - t0 for c in offs if t0 < c < t0 + T_r})
    seq = []
    for a in cuts[:-1]:
        t = t0 + a
        seq.append(max(n for n in range(len(offs) - 1) if offs[n] <= t < offs[n + 1]))
    return seq, torch.tensor(cuts, dtype=torch.int64), len(offs) - 1


