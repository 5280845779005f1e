"""The TVM backend: compiled CPU kernels (llvm for this machine's CPU) and CUDA source.

By what it renders: ``sequential`` (the token-walking kernel of every recurrence, built on
``update`` and ``nests``), ``chunk`` (the chunk forms' stages and the scan), ``adjoint`` (the
generated backward), ``tiled`` / ``lut`` / ``lut_shuffle`` / ``lut_dense`` / ``packed`` (the
tiled families), ``build`` (compiling, the on-disk kernel cache, CUDA source and PTX).
"""
from .backend import BACKEND, TvmBackend

__all__ = ["BACKEND", "TvmBackend"]
