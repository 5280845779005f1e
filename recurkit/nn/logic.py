"""Differentiable logic-gate networks (difflogic): soft layers to train, one hard kernel to run.

``LogicLayer`` runs the tiled declaration ``rk.ops.logic_layer`` (compiled: TVM on CPU, Triton
on CUDA, with its generated backward) on coefficients ``k = softmax(z) @ GATE_COEFFS``; in eval
mode each neuron is its argmax gate. ``GroupSum`` (``rk.ops.group_sum``) sums equal groups of
the last layer per class and divides by ``tau``. ``compile_hard(model)`` turns a trained ``nn.Sequential`` of them
into one bit-packed kernel whose scores equal the eval-mode model's exactly.
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from .. import backends
from ..lowering.gates import optimize
from ..lowering.packed import GATE_COEFFS, PackedLayer, PackedNet

CONNECTIONS = ("random", "unique")


def connections(in_dim: int, out_dim: int, kind: str = "random",
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The two inputs of each neuron. "random": each drawn uniformly (possibly equal);
    "unique": every input used (when 2 * out_dim >= in_dim), inputs used as evenly as
    possible, and no neuron reads one input twice (when in_dim > 1)."""
    if kind not in CONNECTIONS:
        raise ValueError(f"connections must be one of {CONNECTIONS}, got {kind!r}")
    if in_dim < 1 or out_dim < 1:
        raise ValueError(f"a logic layer needs in_dim, out_dim >= 1, got {in_dim}, {out_dim}")
    if kind == "random":
        ia = torch.randint(0, in_dim, (out_dim,), generator=generator)
        ib = torch.randint(0, in_dim, (out_dim,), generator=generator)
        return ia, ib
    reps = -(-2 * out_dim // in_dim)
    slots = torch.cat([torch.randperm(in_dim, generator=generator) for _ in range(reps)])
    ia, ib = slots[:out_dim].clone(), slots[out_dim:2 * out_dim].clone()
    if in_dim > 1:   # repair neurons that read one input twice by swapping their b
        for o in (ia == ib).nonzero().flatten().tolist():
            for p in range(out_dim):
                if ia[o] != ib[p] and ia[p] != ib[o]:
                    ib[o], ib[p] = ib[p].clone(), ib[o].clone()
                    break
    return ia, ib


_connections = connections   # LogicLayer's argument of the same name hides it


def gate_coefficients(z: torch.Tensor, training: bool,
                      gumbel_tau: float | None = None) -> torch.Tensor:
    """[..., 4]: (k0, k1, k2, k3) of gate logits ``z`` [..., 16]: ``softmax(z) @ GATE_COEFFS``
    when training (with ``gumbel_tau``: Gumbel-softmax sampled, forward exactly the sampled
    hard gate, the softmax's gradient), the argmax gate's otherwise."""
    C = GATE_COEFFS.to(z.device)
    if not training:
        return C[z.argmax(-1)]
    if gumbel_tau is None:
        return F.softmax(z, -1) @ C
    u = torch.rand_like(z).clamp_(1e-10, 1.0 - 1e-7)
    p = F.softmax((z - torch.log(-torch.log(u))) / gumbel_tau, -1)
    soft = p @ C   # x - x.detach() is exactly 0: the forward is exactly the hard gate
    return C[p.argmax(-1)] + (soft - soft.detach())


class LogicLayer(nn.Module):
    """``out_dim`` neurons, each a learned mix of the 16 two-input gates of two fixed inputs.

    Input [N, in_dim] with values in [0, 1]; output [N, out_dim]. ``gumbel_tau``: when set,
    training samples Gumbel noise on the gate logits and runs the hard (argmax) gate forward
    with the softmax's gradient (straight-through); ``backend``: as ``rk.compile``.
    """

    def __init__(self, in_dim: int, out_dim: int, connections: str = "random",
                 gumbel_tau: float | None = None, backend: str = "auto",
                 generator: torch.Generator | None = None):
        super().__init__()
        from ..compiler import compile as rk_compile
        from ..ops import logic_layer
        self.in_dim, self.out_dim, self.kind = in_dim, out_dim, connections
        if gumbel_tau is not None and not gumbel_tau > 0:
            raise ValueError(f"gumbel_tau must be > 0 (or None), got {gumbel_tau!r}")
        self.gumbel_tau = gumbel_tau
        ia, ib = _connections(in_dim, out_dim, connections, generator)
        self.register_buffer("ia", ia)
        self.register_buffer("ib", ib)
        self.weights = nn.Parameter(torch.randn(out_dim, 16, generator=generator))
        self.op = rk_compile(logic_layer, backend)

    def gates(self) -> torch.Tensor:
        """The hard gate of each neuron (argmax of its logits), [out_dim] in 0..15."""
        return self.weights.argmax(-1)

    def coefficients(self) -> torch.Tensor:
        """[out_dim, 4]: (k0, k1, k2, k3) of each neuron for the current mode."""
        return gate_coefficients(self.weights, self.training, self.gumbel_tau)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.in_dim:
            raise ValueError(f"LogicLayer({self.in_dim}, {self.out_dim}): expected input "
                             f"[N, {self.in_dim}], got {tuple(x.shape)}")
        if not x.is_floating_point():
            x = x.float()
        k = self.coefficients().to(x.dtype)
        return self.op(x, self.ia, self.ib, k[:, 0], k[:, 1], k[:, 2], k[:, 3])

    def extra_repr(self) -> str:
        return f"{self.in_dim}, {self.out_dim}, connections={self.kind!r}"


class GroupSum(nn.Module):
    """[..., k * g] -> [..., k]: the sum of each of ``k`` consecutive groups, divided by
    ``tau`` (the compiled tiled op ``rk.ops.group_sum``)."""

    def __init__(self, k: int, tau: float = 1.0, backend: str = "auto"):
        super().__init__()
        from ..compiler import compile as rk_compile
        from ..ops import group_sum
        if k < 1 or not tau > 0:
            raise ValueError(f"GroupSum needs k >= 1 and tau > 0, got k={k}, tau={tau}")
        self.k, self.tau = k, float(tau)
        self.op = rk_compile(group_sum, backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 1 or x.shape[-1] % self.k:
            raise ValueError(f"GroupSum({self.k}): the input's last dim "
                             f"({x.shape[-1] if x.dim() else None}) is not a multiple of "
                             f"{self.k}")
        if not x.is_floating_point():
            x = x.float()
        lead = x.shape[:-1]
        y = self.op(x.reshape(-1, self.k, x.shape[-1] // self.k), self.tau)
        return y.reshape(*lead, self.k)

    def extra_repr(self) -> str:
        return f"k={self.k}, tau={self.tau}"


class HardLogicNet:
    """A compiled hard network: ``net(x)`` takes bool inputs [N, in_dim] (or [N, *input_shape],
    e.g. images [N, C, H, W] as ``compile_hard`` was given them) and returns the class
    scores [N, k] (float32) that the eval-mode model gives; ``counts(x)`` the integer counts.
    ``backend``: "auto" (TVM on CPU, Triton on CUDA), "tvm", "triton" or "torch" (the gate by
    gate reference). ``words``: int64 words (64 samples each) per block of the TVM kernel,
    None to size the block to the cache (``recurkit.backends.tvm.packed.choose_words``).

    The network is optimised once, here (``recurkit.lowering.gates.optimize``: constant and
    one-input gates folded into their readers, equal gates shared, unread gates dropped);
    ``stats`` says what it removed and how long that took (``optimize_s``); the TVM kernel
    is built on the first CPU call (and cached on disk)."""

    def __init__(self, net: PackedNet, backend: str = "auto", words: int | None = None,
                 input_shape: tuple[int, ...] | None = None):
        runs = [n for n, b in backends.REGISTRY.items()
                if type(b).run_packed is not backends.Backend.run_packed]
        if backend != backends.AUTO and backend not in runs:
            raise ValueError(f"unknown backend {backend!r}; choose {', '.join([backends.AUTO, *runs])}")
        if words is not None and (isinstance(words, bool) or not isinstance(words, int)
                                  or words < 1):
            raise ValueError(f"words must be an int >= 1 or None, got {words!r}")
        self.net, self.backend, self.words = net, backend, words
        shape = (net.in_dim,) if input_shape is None else tuple(int(d) for d in input_shape)
        if math.prod(shape) != net.in_dim:
            raise ValueError(f"input_shape {shape} does not hold the net's {net.in_dim} inputs")
        self.input_shape = shape
        t0 = time.perf_counter()
        self.program = optimize(net)
        self.stats = dict(self.program.stats, optimize_s=time.perf_counter() - t0)
        self._buffers: dict = {"program": self.program}   # the backends' tables, per device

    def _run(self, x: torch.Tensor, scores: bool) -> torch.Tensor:
        net = self.net
        shapes = ((net.in_dim,), self.input_shape)
        if not isinstance(x, torch.Tensor) or tuple(x.shape[1:]) not in shapes:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            want = " or ".join(dict.fromkeys(str(["N", *s]).replace("'", "") for s in shapes))
            raise ValueError(f"expected inputs {want}, got {got}")
        x = x.reshape(x.shape[0], net.in_dim)
        if x.dtype != torch.bool:
            raise ValueError(f"expected a bool tensor (hard inputs), got {x.dtype}; threshold "
                             "float inputs first, e.g. x > 0.5")
        b = backends.choose("tiled", None, x.device.type) if self.backend == backends.AUTO \
            else backends.get(self.backend)
        y = b.run_packed(net, x, self.words, self._buffers, scores)[:x.shape[0]]
        if scores and y.dtype != torch.float32:   # the backend gave counts
            y = torch.empty(y.shape, dtype=torch.float32, device=y.device).copy_(y)
            # by a tensor on the device: CUDA divides by a Python scalar as a multiplication
            # by its reciprocal, which is not the eval model's correctly rounded count / tau
            y.div_(torch.full((), net.tau, dtype=torch.float32, device=y.device))
        return y

    def counts(self, x: torch.Tensor) -> torch.Tensor:
        """The integer class counts [N, classes] (int32)."""
        return self._run(x, False)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, True)

    def __repr__(self) -> str:
        s = self.stats
        return (f"HardLogicNet({self.net.in_dim} -> {self.net.classes} classes, "
                f"{s['gates']} gates -> {s['ops']} ops, backend={self.backend})")


def compile_hard(model: nn.Module, backend: str = "auto", words: int | None = None,
                 input_shape: tuple[int, ...] | None = None) -> HardLogicNet:
    """A trained ``nn.Sequential`` of logic modules ending in a ``GroupSum`` as one bit-packed
    kernel; see ``HardLogicNet``. The modules: ``LogicLayer``s, ``nn.Flatten`` (flattening
    all but the batch dim), and modules with a ``hard_layers(shape)`` method returning their
    ``PackedLayer``s and output shape (``LogicConv2d``, ``OrPool2d``). ``input_shape``: one
    sample's shape, e.g. (C, H, W); needed when the first logic module is not a
    ``LogicLayer``. The hard net takes bool [N, *input_shape] or [N, prod(input_shape)]."""
    mods = list(model) if isinstance(model, nn.Sequential) else [model]
    body = [m for m in mods[:-1] if not isinstance(m, nn.Flatten)]
    if not mods or not isinstance(mods[-1], GroupSum) or not body or not all(
            isinstance(m, LogicLayer) or hasattr(m, "hard_layers") for m in body):
        raise ValueError("compile_hard takes an nn.Sequential of LogicLayer modules (or "
                         "LogicConv2d/OrPool2d, nn.Flatten) followed by one GroupSum, got "
                         + ", ".join(type(m).__name__ for m in mods))
    if input_shape is None:
        if not isinstance(body[0], LogicLayer):
            raise ValueError(f"compile_hard: input_shape (one sample's shape, e.g. (C, H, W)) "
                             f"is needed when the net starts with {type(body[0]).__name__}")
        input_shape = (body[0].in_dim,)
    shape = tuple(int(d) for d in input_shape)
    packed, prev = [], None
    with torch.no_grad():
        for m in mods[:-1]:
            if isinstance(m, nn.Flatten):
                if m.start_dim != 1 or m.end_dim != -1:
                    raise ValueError("compile_hard: nn.Flatten must flatten all but the batch "
                                     f"dim (start_dim=1, end_dim=-1), got {m}")
                shape = (math.prod(shape),)
            elif isinstance(m, LogicLayer):
                if shape != (m.in_dim,):
                    raise ValueError(f"layer widths do not chain: {prev or 'the input'} feeds "
                                     f"{m} with per-sample shape {list(shape)}")
                packed.append(PackedLayer(m.ia.cpu(), m.ib.cpu(), m.gates().cpu()))
                shape = (m.out_dim,)
            else:
                layers, shape = m.hard_layers(shape)
                packed += layers
            prev = m
    if len(shape) != 1:
        raise ValueError(f"compile_hard: GroupSum reads per-sample shape {list(shape)}; "
                         "flatten it first (nn.Flatten)")
    gs = mods[-1]
    return HardLogicNet(PackedNet(math.prod(input_shape), tuple(packed), gs.k, gs.tau),
                        backend, words, input_shape)
