"""``ShiftAddLinear``: a linear layer with binary-coded weights, run by the shift-add op.

``ShiftAddLinear.from_linear(linear, bits=3, group_size=128)`` quantizes the weight with
``bcq_quantize`` (power-of-two alphas) and stores the codes packed 8 per byte in the op's
layout (``rk.ops.shift_add``: [G, O, Q, E // 8] with E = group_size, G = in // E) and the
alphas [G, O, Q]. ``forward`` calls the compiled tiled op: a torch custom op whose kernels
are, on CPU, TVM's look-up kernels for small batches (the AVX2 shuffle kernels below 48 rows,
else the byte tables below 16) and its dense-weight kernel plus a matmul above; on CUDA, the
Triton look-up kernels for batches of up to 8 rows and the decode-and-dot kernel above; with
a backward for the input (and the alphas, were they trained). Where nothing needs the op (no
gradient, no tracing), fp32 rows on an AVX2 CPU go to the shuffle kernels directly, bound to
the layer's weights (``_direct``): the same result, less Python per call.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import backends
from ..ir.tiled import bind_tiled, pack_signs, unpack_signs
from .bcq import BCQWeight, bcq_quantize


def _op():
    from .. import ops
    from ..compiler import compile as rk_compile
    return rk_compile(ops.shift_add)


class ShiftAddLinear(nn.Module):
    """y = x W^T + b with ``W[o, g*E + e] = sum_q alpha[g, o, q] * (+-1)``.

    Buffers: ``codes`` uint8 [G, O, Q, E // 8], ``alpha`` fp32 [G, O, Q], ``bias`` fp32 [O]
    or None. Inputs [..., in_features] of any float dtype; the output has the input's dtype.
    """

    def __init__(self, codes: torch.Tensor, alpha: torch.Tensor, bias: torch.Tensor | None,
                 group_size: int):
        super().__init__()
        G, O, Q, S = codes.shape
        if codes.dtype != torch.uint8 or S * 8 != group_size or alpha.shape != (G, O, Q):
            raise ValueError(f"codes must be uint8 [G, O, Q, group_size // 8] and alpha "
                             f"[G, O, Q]; got codes {codes.dtype} {tuple(codes.shape)}, "
                             f"alpha {tuple(alpha.shape)}, group_size {group_size}")
        self.in_features, self.out_features = G * group_size, O
        self.bits, self.group_size = Q, group_size
        self.register_buffer("codes", codes.contiguous())
        self.register_buffer("alpha", alpha.float().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self._fn = _op()
        # (codes, (version, address), alpha, (..), threads, call, backend): see _direct
        self._bound = None
        self._kernels = {}   # device type -> the backend whose kernels run the op there

    def __getstate__(self):   # copy.deepcopy and pickle: the op and kernels are not data
        state = self.__dict__.copy()
        del state["_fn"]
        state["_bound"] = None
        state["_kernels"] = {}
        return state

    def __setstate__(self, state):
        state.setdefault("_kernels", {})   # pickles from before the backend lookup
        self.__dict__.update(state)
        self._fn = _op()

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 3, group_size: int = 128,
                    terms: int = 2) -> "ShiftAddLinear":
        """Quantize ``linear`` (see ``bcq_quantize``; ``terms`` powers of two per alpha, 0
        keeps fp32 alphas). Errors name a weight that is not 2-D or not float, an input
        size that ``group_size`` does not divide, and bad ``bits``."""
        W = linear.weight if isinstance(linear, nn.Linear) else linear
        q = bcq_quantize(W.detach(), bits, group_size, terms=terms)
        return cls.from_bcq(q, linear.bias if isinstance(linear, nn.Linear) else None)

    @classmethod
    def from_bcq(cls, q: BCQWeight, bias: torch.Tensor | None = None,
                 device: torch.device | str | None = None) -> "ShiftAddLinear":
        """The layer of an already quantized weight (``bcq_quantize``,
        ``bcq_quantize_hessian``), its buffers on ``device`` (default: the codes')."""
        Q, O, K = q.codes.shape
        G, E = K // q.group_size, q.group_size
        signs = q.codes.reshape(Q, O, G, E).permute(2, 1, 0, 3)               # [G, O, Q, E]
        codes, alpha = pack_signs(signs), q.alpha.permute(2, 1, 0)
        if device is not None:
            codes, alpha = codes.to(device), alpha.to(device)
            bias = None if bias is None else bias.detach().to(device)
        return cls(codes, alpha, bias, E)

    def nbytes(self) -> int:
        """Bytes stored: the packed codes, the alphas (fp32) and the bias."""
        return sum(t.numel() * t.element_size() for t in (self.codes, self.alpha, self.bias)
                   if t is not None)

    def dequantized_weight(self) -> torch.Tensor:
        """The dense fp32 weight [out_features, in_features] the layer computes with."""
        signs = unpack_signs(self.codes)                                      # [G, O, Q, E]
        W = torch.einsum("goq,goqe->oge", self.alpha, signs)
        return W.reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"ShiftAddLinear expects inputs [..., {self.in_features}], got "
                             f"{tuple(x.shape)}")
        flat = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        bufs = self._buffers   # (not self.codes: Module.__getattr__ is slow per call)
        direct = self._direct(flat, bufs["codes"], bufs["alpha"])
        if direct is not None:
            y = direct(flat)
        else:
            # the registered op: the arguments are the layer's own (its kernel still checks
            # them), which saves a binding pass per call
            y = self._fn.op(flat.reshape(-1, self.in_features // self.group_size,
                                         self.group_size), bufs["codes"], bufs["alpha"])
        bias = bufs["bias"]
        if bias is not None:
            y = y + bias.to(y.dtype)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)

    def forget_weights(self) -> None:
        """Drop what was derived from the weights (the kernel's packed codes): after writing
        them in a way torch does not count (``layer.codes.data.copy_(...)``, numpy)."""
        for b in backends.REGISTRY.values():
            b.forget_weights(self._buffers["codes"])
        self._bound = None

    def _direct(self, x: torch.Tensor, codes: torch.Tensor, alpha: torch.Tensor):
        """The kernel backend's bindable kernel (``Backend.binds`` / ``bind_weights``: TVM's
        shuffle kernels for fp32 rows on an AVX2 CPU, fewer than ``dense_from()``) bound to
        this layer's weights, for a call the op would send to it, where nothing needs the
        op itself: no gradient, no tracing or compiling, no functorch transform (vmap, jvp), no
        torch function or dispatch mode, at least one row (the op names an empty batch).
        Else None. Calling the kernel directly saves the op's dispatch and argument checks
        (the weights were checked when bound); the result is the op's, bit for bit. Rebound
        when the weights are replaced, changed in place or their memory swapped (``.data =``),
        or the thread count changes; writes torch does not count (through ``.data``, numpy)
        need ``forget_weights()``."""
        if torch.compiler.is_compiling() or torch.jit.is_tracing():   # first: dynamo stops here
            return None
        if (type(x) is not torch.Tensor or not x.is_contiguous()
                or torch._C._functorch.is_functorch_wrapped_tensor(x)   # vmap, jvp, grad
                or (torch.is_grad_enabled() and (x.requires_grad or alpha.requires_grad))
                or torch._C._is_torch_function_mode_enabled()
                or torch._C._len_torch_dispatch_stack()):
            return None
        kb = self._kernels.get(x.device.type)
        if kb is None:
            kb = self._kernels[x.device.type] = backends.kernel_backend(
                self._fn.backend, "tiled", x.device.type)
        if not kb.binds(self._fn.plan, x):   # rows its bindable kernel would not take
            return None
        b = self._bound
        threads = torch.get_num_threads()
        if (b is not None and b[0] is codes and b[2] is alpha and b[4] == threads and b[6] is kb
                and b[1] == (codes._version, codes.data_ptr())
                and b[3] == (alpha._version, alpha.data_ptr())):
            return b[5]
        if codes.is_inference() or alpha.is_inference():   # no version counters to watch
            return None
        from .. import ops
        rows = x[:1].reshape(1, self.in_features // self.group_size, self.group_size)
        tc = bind_tiled(ops.shift_add.program, (rows, codes, alpha), {})   # checks the weights
        b = self._bound = (codes, (codes._version, codes.data_ptr()), alpha,
                           (alpha._version, alpha.data_ptr()), threads,
                           kb.bind_weights(self._fn.plan, tc), kb)
        return b[5]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bits={self.bits}, group_size={self.group_size}, bias={self.bias is not None}")
