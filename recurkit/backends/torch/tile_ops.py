"""Executing single tile ops with torch: named-axis values, batched contractions, and a plan
that runs a state pass's loop body with its layout work done once, outside the loop."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ...ir.interpret import BINARY_TORCH, UNARY_TORCH
from ...lowering.tile import TileOp
from ..shared.host import FLUSH_BELOW


class Val:
    """A tensor whose last axes have names; the leading ``nb`` axes are batch axes."""

    __slots__ = ("t", "axes")

    def __init__(self, t: torch.Tensor, axes: tuple[str, ...]):
        self.t, self.axes = t, tuple(axes)

    def permuted(self, want: tuple[str, ...]) -> "Val":
        return self if self.axes == tuple(want) else Val(self.to(want), want)

    def to(self, want: tuple[str, ...]) -> torch.Tensor:
        """View with axes in ``want`` order, size 1 where this value lacks an axis."""
        if self.axes == want:
            return self.t
        nb = self.t.dim() - len(self.axes)
        order = [a for a in want if a in self.axes]
        perm = list(range(nb)) + [nb + self.axes.index(a) for a in order]
        t = self.t.permute(perm) if perm != list(range(self.t.dim())) else self.t
        shape = list(t.shape[:nb])
        it = iter(t.shape[nb:])
        for a in want:
            shape.append(next(it) if a in self.axes else 1)
        return t.reshape(shape)


# exp(x) < FLUSH_BELOW for x below this, so clamping there first changes no result. It keeps
# torch's vectorised exp on its fast path: inputs below about -87 (results fp32 denormal or 0,
# and -inf) take a slow path, 5x slower for -inf and 40x for -90.
LOG_FLUSH = -50.0


def _decay_exp(x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """exp of a log-decay, with results below 1e-20 set to 0. Products of such factors would
    be fp32 denormals, which make x86 matmuls ~100x slower, while a term scaled by 1e-20 is
    far below fp32 resolution (6e-8) next to the undecayed terms it is summed with.
    ``inplace``: x is a temporary of the caller's and may be overwritten."""
    if x.requires_grad:   # under autograd (backward="torch"): no in-place steps
        return F.threshold(torch.exp(x.clamp_min(LOG_FLUSH)), FLUSH_BELOW, 0.0)
    x = x.clamp_min_(LOG_FLUSH) if inplace else x.clamp_min(LOG_FLUSH)
    return F.threshold(x.exp_(), FLUSH_BELOW, 0.0, inplace=True)


def _flush(x: torch.Tensor) -> torch.Tensor:
    """Zero the entries below 1e-30 in magnitude (one fused op; see _decay_exp): applied to
    the operands of the state pass's matmuls, where decayed values meet the state."""
    return F.hardshrink(x, 1e-30)


@functools.lru_cache(maxsize=64)
def _tril_bias(C: int, strict: bool, device: torch.device) -> torch.Tensor:
    """[C, C]: 0 where the (strict) lower-triangular mask keeps, -inf elsewhere."""
    return torch.zeros(C, C, device=device).masked_fill_(~_tril(C, strict, device),
                                                         float("-inf"))


def _tril(C: int, strict: bool, device) -> torch.Tensor:
    return torch.ones(C, C, dtype=torch.bool, device=device).tril(-1 if strict else 0)


def _contract(x: Val, y: Val, over: tuple[str, ...], want: tuple[str, ...]) -> Val:
    """sum over ``over`` of x * y, as one batched matmul: [.., bat, m, c] @ [.., bat, c, n]."""
    bat = tuple(d for d in x.axes if d in y.axes and d not in over)
    m = tuple(d for d in x.axes if d not in y.axes)
    n = tuple(d for d in y.axes if d not in x.axes)
    if not bat and len(m) == 1 and len(n) == 1 and len(over) == 1:   # a matmul of views
        xt = x.t if x.axes == m + over else x.t.transpose(-1, -2)
        yt = y.t if y.axes == over + n else y.t.transpose(-1, -2)
        return Val(torch.matmul(xt, yt), m + n).permuted(want)
    xt, yt = x.to(bat + m + over), y.to(bat + over + n)
    nbx, nby = xt.dim() - len(x.axes), yt.dim() - len(y.axes)
    bshape = xt.shape[nbx:nbx + len(bat)]
    msz = xt.shape[nbx + len(bat):nbx + len(bat) + len(m)]
    csz = xt.shape[xt.dim() - len(over):]
    nsz = yt.shape[yt.dim() - len(n):] if n else ()
    mm = 1
    for v in msz:
        mm *= v
    cc = 1
    for v in csz:
        cc *= v
    xr = xt.reshape(*xt.shape[:nbx], *bshape, mm, cc)
    yr = yt.reshape(*yt.shape[:nby], *bshape, cc, -1)
    r = torch.matmul(xr, yr)
    r = r.reshape(*r.shape[:-2], *msz, *nsz)
    return Val(r, bat + m + n).permuted(want)


def exec_op(op: TileOp, env: dict[str, Val], C: int, sizes: dict[str, int]) -> Val:
    a = [env[x] for x in op.args]
    o = op.op
    dev = next(iter(env.values())).t.device
    if o == "ir":
        fn = op.attr("ir_op")
        xs = [v.to(op.axes) for v in a]
        if fn == "exp":
            return Val(_decay_exp(xs[0]), op.axes)
        if fn in UNARY_TORCH:
            return Val(UNARY_TORCH[fn](xs[0]), op.axes)
        if fn == "where":
            return Val(torch.where(*xs), op.axes)
        return Val(BINARY_TORCH[fn](*xs), op.axes)
    if o == "contract":
        return _contract(a[0], a[1], tuple(op.attr("over")), op.axes)
    if o == "eye":
        return Val(torch.eye(sizes[op.axes[0]], device=dev), op.axes)
    if o == "rename":
        return Val(a[0].t, op.axes)
    if o in ("cumsum", "last", "shift"):
        x = a[0]
        d = x.t.dim() - len(x.axes) + x.axes.index(op.attr("axis"))
        if o == "cumsum":
            return Val(x.t.cumsum(d), op.axes)
        if o == "last":
            return Val(x.t.select(d, -1), op.axes)
        head = torch.zeros_like(x.t.narrow(d, 0, 1))
        return Val(torch.cat([head, x.t.narrow(d, 0, x.t.shape[d] - 1)], d), op.axes)
    if o == "decay_ratio":
        x, y = a
        bias = Val(_tril_bias(C, op.attr("mask") == "i>j", dev), ("i", "j")).to(op.axes)
        diff = torch.sub(x.to(op.axes), y.to(op.axes)).add_(bias)   # -inf where masked
        return Val(_decay_exp(diff, inplace=True), op.axes)
    if o == "mask":
        keep = _tril(C, op.attr("mask") == "i>j", a[0].t.device)
        return Val(a[0].to(op.axes) * Val(keep, ("i", "j")).to(op.axes), op.axes)
    if o == "invert_unit_lower":
        Lt = a[0].to(("i", "j"))
        eye = torch.eye(C, dtype=Lt.dtype, device=Lt.device)
        inv = torch.linalg.solve_triangular(eye - Lt, eye.expand_as(Lt), upper=False,
                                            unitriangular=True)
        return Val(inv, ("i", "j")).permuted(op.axes)
    raise NotImplementedError(f"torch backend: no rule for tile op {o!r}")


class LoopPlan:
    """The body of a state pass (with the output stage's reads of the entering state), run once
    per chunk on raw [B, ...] tensors (B: sequences x heads, one batch axis, so a matmul's
    operands need no reshaping). Built from the first chunk's values, so the layout of
    every operand is resolved once: contractions of one axis become batched matmuls on
    transposed views, ``add(x, contract(a, b))`` becomes one ``baddbmm``, renames are free, and
    the state is flushed of values below 1e-30 after each update (see ``_flush``). ``needed``
    names the values read after the loop body."""

    def __init__(self, ops: list[TileOp], state: str, first: dict[str, Val], C: int,
                 sizes: dict[str, int], needed: tuple[str, ...] = ()):
        self.axes = {n: v.axes for n, v in first.items()}
        uses: dict[str, int] = {}
        for op in ops:
            for x in op.args:
                uses[x] = uses.get(x, 0) + 1
        made = {op.out: op for op in ops}
        fused = {}   # add op out -> (accumulator arg, contract op)
        for op in ops:
            if op.op == "ir" and op.attr("ir_op") == "add":
                for acc, other in (op.args, op.args[::-1]):
                    cop = made.get(other)
                    if cop is not None and cop.op == "contract" and uses[other] == 1 \
                            and other != acc and other not in needed:
                        fused[op.out] = (acc, cop)
                        break
        # accumulators this body makes and reads once: the fused matmul adds onto them in place
        # (ir and contract ops make fresh tensors; renames, zeros and 'last' make views)
        own = {acc for acc, _ in fused.values()
               if acc in made and made[acc].op in ("ir", "contract") and uses[acc] == 1
               and acc not in needed and acc != state}
        skip = {cop.out for _, cop in fused.values()}
        # (out name, fn, arg names, whether fn takes out=: a contiguous buffer of its shape)
        self.steps: list[tuple[str, object, tuple[str, ...], bool]] = []
        for op in ops:
            if op.out in skip:
                continue
            if op.out in fused:
                acc, cop = fused[op.out]
                fn = self._matmul(cop, acc_axes=self.axes[acc], inplace=acc in own,
                                  out_axes=op.axes)
                args = (*cop.args, acc)
            elif op.op == "contract":
                fn, args = self._matmul(op), op.args
            elif op.op == "rename":
                fn, args = (lambda t: t), op.args
            else:
                fn, args = self._generic(op, C, sizes), op.args
            if fn is None:   # not a one-axis matmul: the general path, unfused
                if op.out in fused:
                    cop = fused[op.out][1]
                    self.steps.append((cop.out, self._generic(cop, C, sizes), cop.args, False))
                    self.axes[cop.out] = cop.axes
                fn, args = self._generic(op, C, sizes), op.args
            takes_out = getattr(fn, "takes_out", False)
            if op.out == state:
                fn, takes_out = (lambda f: lambda *ts: _flush(f(*ts)))(fn), False
            self.steps.append((op.out, fn, args, takes_out))
            self.axes[op.out] = op.axes

    def run(self, env: dict[str, torch.Tensor], out: dict[str, torch.Tensor] | None = None) -> None:
        """One chunk. ``out``: buffers (contiguous, the value's shape) that the steps computing
        those values write into where they can; check ``env[name]`` for the result."""
        for name, fn, args, takes_out in self.steps:
            ts = [env[a] for a in args]
            if takes_out and out is not None and name in out:
                env[name] = fn(*ts, out=out[name])
            else:
                env[name] = fn(*ts)

    def _generic(self, op: TileOp, C: int, sizes: dict[str, int]):
        names = op.args

        def fn(*ts):
            return exec_op(op, {n: Val(t, self.axes[n]) for n, t in zip(names, ts)}, C,
                           sizes).t
        return fn

    def _matmul(self, op: TileOp, acc_axes=None, inplace: bool = False, out_axes=None):
        """[B, m, c] x [B, c, n] (either operand possibly transposed) as one bmm on views,
        optionally accumulated onto ``acc`` (axes (m, n); overwritten if ``inplace``), the
        result in ``out_axes`` order (default: the contraction's); None if the contraction is
        not of that shape. ``fn.takes_out``: whether it can write into an ``out=`` buffer (a
        result neither transposed nor accumulated in place)."""
        xa, ya = self.axes[op.args[0]], self.axes[op.args[1]]
        over = tuple(op.attr("over"))
        m = tuple(d for d in xa if d not in ya)
        n = tuple(d for d in ya if d not in xa)
        if len(over) != 1 or len(m) != 1 or len(n) != 1 or set(xa) != {*m, *over} \
                or set(ya) != {*n, *over} or set(op.axes) != {*m, *n}:
            return None
        if acc_axes is not None and acc_axes != m + n:
            return None
        tx = xa != m + over
        ty = ya != over + n
        tr = (out_axes or op.axes) != m + n

        def fn(x, y, acc=None, out=None):
            x = x.transpose(1, 2) if tx else x
            y = y.transpose(1, 2) if ty else y
            if acc is None:
                r = torch.bmm(x, y, out=out)
            elif inplace and acc.shape == (x.shape[0], x.shape[1], y.shape[2]):
                r = acc.baddbmm_(x, y)
            else:
                r = torch.baddbmm(acc, x, y, out=out)
            return r.transpose(1, 2) if tr else r
        fn.takes_out = not tr and not inplace
        return fn
