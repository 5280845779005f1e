"""The torch backend: tile programs run with batched torch ops (any device; autograd
differentiates it, so it is also the recompute path of the gradients), the tiled and LUT forms
evaluated in torch, and the generated backward's step loop (``backward``)."""
from .backend import BACKEND, TorchBackend

__all__ = ["BACKEND", "TorchBackend"]
