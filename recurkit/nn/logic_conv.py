"""Convolutional logic-gate networks (LogicTreeNet-style): logic-gate tree kernels and
logical-OR pooling on the tiled ``rk.ops.logic_layer``, trained soft and compiled hard.

Both layers are a *tree convolution*: per output channel ``k`` a fixed binary tree whose
``2**depth`` leaves are fixed (channel, dy, dx) picks of the receptive field and whose
``2**depth - 1`` nodes are two-input gates, shared by every output position. Each tree level is
one ``logic_layer`` call (the compiled tiled op, with its generated backward):

- level 0 gathers from the zero-padded input flattened per sample as [C, Hp, Wp]; its gather
  indices are the leaves' flat offsets plus each output position's window origin, its
  coefficients the kernel's gate coefficients indexed over positions (so autograd sums their
  gradients over positions);
- level ``l > 0`` pairs sibling nodes of level ``l - 1``.

The values of level ``l`` are laid out per sample as [K, G_l, H', W'] with ``G_l =
2**(depth - 1 - l)`` nodes per kernel, so the last level (G = 1) is [N, K, H', W'] with no copy
and ``nn.Flatten`` of it is what the hard net's layer reads. ``hard_layers`` lowers the same
levels to ``PackedLayer``s over the unpadded input (a leaf in the padding reads a constant
zero: the gate is restricted to it, e.g. ``a and 0`` -> false, ``a or 0`` -> ``a``), which
``compile_hard`` chains with the dense layers.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..lowering.packed import GATE_COEFFS, PackedLayer
from .logic import gate_coefficients

OR_GATE, A_GATE = 7, 3   # difflogic's numbering: a | b, and a (b ignored)
POOL_RELAXATIONS = ("prob", "max")


def _pair(v, name: str, low: int) -> tuple[int, int]:
    t = (v, v) if isinstance(v, int) and not isinstance(v, bool) else tuple(v) \
        if isinstance(v, (tuple, list)) else None
    if t is None or len(t) != 2 or any(isinstance(e, bool) or not isinstance(e, int) or e < low
                                       for e in t):
        raise ValueError(f"{name} must be an int >= {low} or a pair of them, got {v!r}")
    return t


def _restrict_gates(g: torch.Tensor, zero_a: torch.Tensor, zero_b: torch.Tensor) -> torch.Tensor:
    """The gates g with input a (where ``zero_a``) and b (where ``zero_b``) fixed at 0, as
    gates of two inputs (a truth table that ignores the fixed input)."""
    out = torch.zeros_like(g)
    for a in (0, 1):
        for b in (0, 1):
            A = a * (~zero_a).long()
            B = b * (~zero_b).long()
            out |= ((g >> (3 - (2 * A + B))) & 1) << (3 - (2 * a + b))
    return out


class _TreeConv(nn.Module):
    """The mechanism shared by ``LogicConv2d`` and ``OrPool2d``: see the module docstring.
    Subclasses set ``leaves`` (buffer [K, 2**depth]: flat offsets ``c*kh*kw + dy*kw + dx`` in
    the receptive field), ``in_channels``, ``out_channels`` and implement ``node_coefficients``
    ([K, 2**depth - 1, 4], nodes level by level) and ``node_gates`` ([K, 2**depth - 1])."""

    def _setup(self, in_channels, out_channels, kernel_size, depth, stride, padding, backend):
        from ..compiler import compile as rk_compile
        from ..ops import logic_layer
        name = type(self).__name__
        for arg, v in (("in_channels", in_channels), ("out_channels", out_channels),
                       ("depth", depth)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: {arg} must be an int >= 1, got {v!r}")
        self.in_channels, self.out_channels, self.depth = in_channels, out_channels, depth
        self.kernel_size = _pair(kernel_size, "kernel_size", 1)
        self.stride = _pair(stride, "stride", 1)
        self.padding = _pair(padding, "padding", 0)
        self.op = rk_compile(logic_layer, backend)
        self._plans: dict = {}

    def output_shape(self, shape) -> tuple[int, int, int]:
        """(K, H', W') of one sample of shape (C, H, W); a ValueError when it does not fit."""
        name = type(self).__name__
        if len(shape) != 3 or shape[0] != self.in_channels:
            raise ValueError(f"{name}: expected input [N, {self.in_channels}, H, W], got "
                             f"[N, {', '.join(map(str, shape))}]")
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        H, W = shape[1], shape[2]
        if H + 2 * ph < kh or W + 2 * pw < kw:
            raise ValueError(f"{name}: kernel_size {self.kernel_size} is larger than the "
                             f"padded input {H + 2 * ph}x{W + 2 * pw} ({H}x{W}, padding "
                             f"{self.padding})")
        return self.out_channels, (H + 2 * ph - kh) // sh + 1, (W + 2 * pw - kw) // sw + 1

    def _leaf_coords(self):
        """(c, dy, dx) of each leaf, [K, L] each."""
        kh, kw = self.kernel_size
        c = self.leaves // (kh * kw)
        return c, (self.leaves // kw) % kh, self.leaves % kw

    def _positions(self, Ho, Wo, device):
        (sh, sw) = self.stride
        oy = torch.arange(Ho, device=device).repeat_interleave(Wo) * sh
        ox = torch.arange(Wo, device=device).repeat(Ho) * sw
        return oy, ox   # [P] window origins in padded coordinates

    def _level_pairs(self, level: int, P: int, device):
        """(ia, ib) of level ``level`` > 0: sibling nodes of the level below, [K * G * P]."""
        G = 2 ** (self.depth - 1 - level)
        k = torch.arange(self.out_channels, device=device).view(-1, 1, 1)
        j = torch.arange(G, device=device).view(1, -1, 1)
        p = torch.arange(P, device=device).view(1, 1, -1)
        ia = (k * (2 * G) + 2 * j) * P + p
        return ia.flatten(), (ia + P).flatten()

    def _plan(self, H: int, W: int, device):
        """Per level (ia, ib), for inputs [N, C, H, W] on ``device`` (cached)."""
        key = (H, W, str(device))
        if key not in self._plans:
            _, Ho, Wo = self.output_shape((self.in_channels, H, W))
            (ph, pw) = self.padding
            Hp, Wp = H + 2 * ph, W + 2 * pw
            c, dy, dx = (t.to(device) for t in self._leaf_coords())
            base = c * (Hp * Wp) + dy * Wp + dx                                  # [K, L]
            oy, ox = self._positions(Ho, Wo, device)
            flat = base.unsqueeze(-1) + (oy * Wp + ox).view(1, 1, -1)           # [K, L, P]
            levels = [(flat[:, 0::2].flatten(), flat[:, 1::2].flatten())]
            levels += [self._level_pairs(l, Ho * Wo, device) for l in range(1, self.depth)]
            self._plans[key] = (Ho, Wo, levels)
        return self._plans[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        name = type(self).__name__
        if x.dim() != 4:
            raise ValueError(f"{name}: expected input [N, {self.in_channels}, H, W], got "
                             f"{tuple(x.shape)}")
        N, _, H, W = x.shape
        self.output_shape(tuple(x.shape[1:]))
        Ho, Wo, levels = self._plan(H, W, x.device)
        if not x.is_floating_point():
            x = x.float()
        ph, pw = self.padding
        if ph or pw:
            x = F.pad(x, (pw, pw, ph, ph))
        h = x.reshape(N, x[0].numel()) if N else x.reshape(0, math.prod(x.shape[1:]))
        coeffs = self.node_coefficients().to(x.device, x.dtype)                 # [K, T, 4]
        P, start = Ho * Wo, 0
        for level, (ia, ib) in enumerate(levels):
            G = 2 ** (self.depth - 1 - level)
            k = coeffs[:, start:start + G].permute(2, 0, 1).unsqueeze(-1)      # [4, K, G, 1]
            k = k.expand(4, self.out_channels, G, P).reshape(4, -1)
            h = self.op(h, ia, ib, k[0], k[1], k[2], k[3])
            start += G
        return h.view(N, self.out_channels, Ho, Wo)

    @torch.no_grad()
    def hard_layers(self, shape) -> tuple[list[PackedLayer], tuple[int, int, int]]:
        """The hard levels on one sample of shape (C, H, W) flattened (unpadded), and the
        output's shape (K, H', W'): what ``compile_hard`` chains."""
        K, Ho, Wo = self.output_shape(tuple(shape))
        C, H, W = shape
        ph, pw = self.padding
        c, dy, dx = self._leaf_coords()
        oy, ox = self._positions(Ho, Wo, "cpu")
        y = dy.cpu().unsqueeze(-1) + oy.view(1, 1, -1) - ph                    # [K, L, P]
        x = dx.cpu().unsqueeze(-1) + ox.view(1, 1, -1) - pw
        pad = (y < 0) | (y >= H) | (x < 0) | (x >= W)
        flat = torch.where(pad, 0, c.cpu().unsqueeze(-1) * (H * W) + y * W + x)
        gates = self.node_gates().cpu().long()                                   # [K, T]
        P = Ho * Wo
        g0 = gates[:, :2 ** (self.depth - 1)].unsqueeze(-1).expand(K, -1, P)
        g0 = _restrict_gates(g0, pad[:, 0::2], pad[:, 1::2])
        layers = [PackedLayer(flat[:, 0::2].flatten(), flat[:, 1::2].flatten(), g0.flatten())]
        start = 2 ** (self.depth - 1)
        for level in range(1, self.depth):
            G = 2 ** (self.depth - 1 - level)
            ia, ib = self._level_pairs(level, P, "cpu")
            g = gates[:, start:start + G].unsqueeze(-1).expand(K, G, P)
            layers.append(PackedLayer(ia, ib, g.flatten()))
            start += G
        return layers, (K, Ho, Wo)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"depth={self.depth}, stride={self.stride}, padding={self.padding}")


class LogicConv2d(_TreeConv):
    """A convolution whose ``out_channels`` kernels are binary trees of learned logic gates.

    Each kernel has ``2**depth`` leaves, fixed random picks of its ``kernel_size`` x
    ``kernel_size`` x ``in_channels`` receptive field drawn when the layer is built: the two
    leaves of each bottom gate are two distinct picks (when the field has two or more), drawn
    uniformly without replacement, independently per gate. Its ``2**depth - 1`` gates have 16
    logits each (``weights`` [K, 2**depth - 1, 16], nodes level by level, bottom first) shared by
    every output position; the gate relaxation, eval-mode argmax and ``gumbel_tau`` are
    ``LogicLayer``'s. Input [N, C, H, W] in [0, 1] (zero padding); output [N, K, H', W'] with
    the usual size ``(H + 2 padding - kernel_size) // stride + 1``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size=3, depth: int = 2,
                 stride=1, padding=0, gumbel_tau: float | None = None, backend: str = "auto",
                 generator: torch.Generator | None = None):
        super().__init__()
        self._setup(in_channels, out_channels, kernel_size, depth, stride, padding, backend)
        if gumbel_tau is not None and not gumbel_tau > 0:
            raise ValueError(f"LogicConv2d: gumbel_tau must be > 0 (or None), got {gumbel_tau!r}")
        self.gumbel_tau = gumbel_tau
        field = in_channels * self.kernel_size[0] * self.kernel_size[1]
        pairs = 2 ** (depth - 1)
        if field >= 2:
            picks = torch.stack([torch.randperm(field, generator=generator)[:2]
                                 for _ in range(out_channels * pairs)])
        else:
            picks = torch.zeros(out_channels * pairs, 2, dtype=torch.long)
        self.register_buffer("leaves", picks.reshape(out_channels, 2 * pairs))
        self.weights = nn.Parameter(torch.randn(out_channels, 2 ** depth - 1, 16,
                                                generator=generator))

    def node_gates(self) -> torch.Tensor:
        """The hard gate of each node (argmax of its logits), [K, 2**depth - 1]."""
        return self.weights.argmax(-1)

    def node_coefficients(self) -> torch.Tensor:
        return gate_coefficients(self.weights, self.training, self.gumbel_tau)


class OrPool2d(_TreeConv):
    """Logical-OR pooling: each channel's ``kernel_size`` x ``kernel_size`` window ORed.

    ``relaxation="prob"`` (default) runs a fixed tree of OR gates (``a + b - ab``) through the
    tiled ``logic_layer`` like ``LogicConv2d``: the probabilistic OR is associative, so the tree
    gives exactly ``1 - prod(1 - x)`` over the window, every input gets a gradient, and on {0, 1}
    it is OR. ``"max"`` is the max t-conorm (``F.max_pool2d``; LogicTreeNet's choice), also
    exactly OR on {0, 1} but with a gradient to the window's maximum only and not a tiled op.
    The hard compile is OR either way. ``padding`` pads with zeros (OR's identity).
    """

    def __init__(self, kernel_size=2, stride=None, padding=0, channels: int | None = None,
                 relaxation: str = "prob", backend: str = "auto"):
        super().__init__()
        if relaxation not in POOL_RELAXATIONS:
            raise ValueError(f"OrPool2d: relaxation must be one of {POOL_RELAXATIONS}, "
                             f"got {relaxation!r}")
        self.relaxation = relaxation
        window = _pair(kernel_size, "kernel_size", 1)
        depth = max(1, math.ceil(math.log2(window[0] * window[1])))
        self._setup(1, 1, window, depth, window if stride is None else stride, padding, backend)
        self.channels = channels   # None: any (the trees are built per channel count)

    def _for_channels(self, C: int) -> None:
        if self.channels is not None and C != self.channels:
            raise ValueError(f"OrPool2d: expected {self.channels} channels, got {C}")
        if self.in_channels == C and hasattr(self, "leaves"):
            return
        kh, kw = self.kernel_size
        L, n = 2 ** self.depth, kh * kw
        leaf = torch.arange(L).clamp(max=n - 1)          # leaves past the window: unread
        self.in_channels = self.out_channels = C
        leaves = torch.arange(C).view(-1, 1) * n + leaf.view(1, -1)
        if hasattr(self, "leaves"):
            self.leaves = leaves
        else:
            self.register_buffer("leaves", leaves, persistent=False)
        # node i of the heap (level by level): OR of two real subtrees, "a" when its right
        # subtree is past the window (or the whole node is: then it is unread)
        gates, real = [], [i < n for i in range(L)]
        while len(real) > 1:
            gates += [OR_GATE if r else A_GATE for r in real[1::2]]
            real = [a or b for a, b in zip(real[0::2], real[1::2])]
        self._gates = torch.tensor(gates)
        self._plans = {}

    def output_shape(self, shape):
        if len(shape) == 3:
            self._for_channels(shape[0])
        return super().output_shape(shape)

    def node_gates(self) -> torch.Tensor:
        return self._gates.view(1, -1).expand(self.out_channels, -1)

    def node_coefficients(self) -> torch.Tensor:
        return GATE_COEFFS[self.node_gates()]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.relaxation == "max":
            if x.dim() != 4:
                raise ValueError(f"OrPool2d: expected input [N, C, H, W], got {tuple(x.shape)}")
            self.output_shape(tuple(x.shape[1:]))
            if not x.is_floating_point():
                x = x.float()
            ph, pw = self.padding
            if ph or pw:
                x = F.pad(x, (pw, pw, ph, ph))
            return F.max_pool2d(x, self.kernel_size, self.stride)
        return super().forward(x)

    def extra_repr(self) -> str:
        return (f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
                f"relaxation={self.relaxation!r}")
