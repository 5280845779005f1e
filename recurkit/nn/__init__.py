"""Layers: sequence mixers built on the exported recurrences (``mixers``), and differentiable
logic-gate networks with their compiled hard inference (``logic``)."""
from .logic import GroupSum, HardLogicNet, LogicLayer, compile_hard, connections
from .mixers import GLA, KDA, GatedDeltaNet, GatedRMSNorm, ShortConv

__all__ = ["GLA", "KDA", "GatedDeltaNet", "GatedRMSNorm", "ShortConv", "GroupSum",
           "HardLogicNet", "LogicLayer", "compile_hard", "connections"]
