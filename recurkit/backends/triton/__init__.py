"""The Triton backend: generated Triton modules, run on the GPU for CUDA tensors and in
Triton's interpreter for CPU tensors, compiled ahead of time for sm_80 / sm_90 / gfx942.

By what it renders: ``sequential`` (the token loop, the scan, shared expression rendering),
``chunk`` and ``blocked`` (the chunk forms' stages and their blocked contractions),
``tiled`` / ``lut`` / ``packed`` (the tiled families), ``runtime`` (the launch config,
module loading and the on-disk module cache, launching, ahead-of-time compiles).
"""
from .backend import BACKEND, TritonBackend

__all__ = ["BACKEND", "TritonBackend"]
