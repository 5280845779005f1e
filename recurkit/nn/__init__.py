"""Layers: sequence mixers built on the exported recurrences (``mixers``), and differentiable
logic-gate networks with their compiled hard inference (``logic``; convolutional and OR-pooling
layers: ``logic_conv``), and the shift-add linear layer with binary-coded weights
(``shift_add``, quantized by ``bcq``), with ``to_shift_add`` converting a whole model's Linear
layers to it (``convert``)."""
from .logic import GroupSum, HardLogicNet, LogicLayer, compile_hard, connections
from .logic_conv import LogicConv2d, OrPool2d
from .mixers import GLA, KDA, GatedDeltaNet, GatedRMSNorm, ShortConv
from .convert import to_shift_add
from .shift_add import ShiftAddLinear

__all__ = ["GLA", "KDA", "GatedDeltaNet", "GatedRMSNorm", "ShortConv", "GroupSum",
           "HardLogicNet", "LogicLayer", "LogicConv2d", "OrPool2d", "compile_hard", "connections",
           "ShiftAddLinear", "to_shift_add"]
