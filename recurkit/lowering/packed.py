"""Hard (bit-packed) logic-gate networks: the gate tables and the network a trained model
lowers to.

Each of the 16 two-input gates is its truth table: gate g maps (a, b) to bit ``3 - (2a + b)`` of
g (0 = false, 1 = and, 3 = a, 5 = b, 6 = xor, 7 = or, 14 = nand, 15 = true, ...), difflogic's
numbering. Its exact real form y = k0 + k1 a + k2 b + k3 ab is the relaxation's basis
(``GATE_COEFFS``[g] = k). A ``PackedNet`` is what the hard kernels run, after
``recurkit.lowering.gates.optimize`` has made it a gate program of bitwise ops.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def gate_bit(g: int, a: int, b: int) -> int:
    return (g >> (3 - (2 * a + b))) & 1


def _coeffs() -> torch.Tensor:
    coeffs = []
    for g in range(16):
        f00, f01, f10, f11 = (gate_bit(g, a, b) for a, b in ((0, 0), (0, 1), (1, 0), (1, 1)))
        coeffs.append([f00, f10 - f00, f01 - f00, f11 - f10 - f01 + f00])
    return torch.tensor(coeffs, dtype=torch.float32)


GATE_COEFFS = _coeffs()   # [16, 4]


@dataclass(frozen=True)
class PackedLayer:
    """One hard layer: neuron o computes gate ``gates[o]`` of inputs ``ia[o]``, ``ib[o]``."""

    ia: torch.Tensor      # [O] int64
    ib: torch.Tensor      # [O] int64
    gates: torch.Tensor   # [O] int64 in 0..15

    @property
    def out_dim(self) -> int:
        return self.ia.numel()


@dataclass(frozen=True)
class PackedNet:
    """A hard network: layers of gates on ``in_dim`` bits, then GroupSum over ``classes``
    equal groups of the last layer's outputs divided by ``tau``."""

    in_dim: int
    layers: tuple[PackedLayer, ...]
    classes: int
    tau: float

    def __post_init__(self):
        width = self.in_dim
        for i, layer in enumerate(self.layers):
            for name, idx in (("ia", layer.ia), ("ib", layer.ib)):
                if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= width):
                    raise ValueError(f"layer {i}: {name} indexes outside its {width} inputs")
            width = layer.out_dim
        if not self.layers:
            raise ValueError("a hard network needs at least one logic layer")
        if width % self.classes:
            raise ValueError(f"GroupSum over {self.classes} classes needs the last layer's "
                             f"width ({width}) to be a multiple of it")

    @property
    def group(self) -> int:
        return self.layers[-1].out_dim // self.classes

    def gate_count(self) -> int:
        return sum(layer.out_dim for layer in self.layers)


def eval_packed_reference(net: PackedNet, x: torch.Tensor) -> torch.Tensor:
    """Class counts [N, classes] (int64) of bool inputs [N, in_dim], gate by gate in torch:
    the semantic definition the packed kernels are tested against."""
    h = x.to(torch.int64)
    for layer in net.layers:
        a, b = h[:, layer.ia], h[:, layer.ib]
        g = layer.gates
        h = (g >> (3 - (2 * a + b))) & 1
    return h.reshape(h.shape[0], net.classes, net.group).sum(-1)


def pack_bits_torch(x: torch.Tensor, words: int = 4) -> torch.Tensor:
    """Bool (or 0/1) inputs [N, F] as int64 words [NB, F, words] on ``x``'s device: sample n
    at bit n % 64 of word (n // 64) % words of block n // (64 * words); padding samples are
    zero. (The kernels' layout, in torch ops.)"""
    N, F = x.shape
    per = 64 * words
    NB = -(-N // per)
    bits = torch.zeros(NB * per, F, dtype=torch.int64, device=x.device)
    bits[:N] = x.to(torch.int64)
    bits = bits.reshape(NB, words, 64, F).permute(0, 3, 1, 2)          # [NB, F, words, 64]
    shifts = torch.arange(64, dtype=torch.int64, device=x.device)
    return (bits << shifts).sum(-1)   # distinct bits: the sum is their OR
