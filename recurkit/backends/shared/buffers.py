"""Reused CPU buffers for the large fp32 tensors a kernel call needs and then drops.

A fresh CPU tensor of tens of megabytes comes from the operating system page by page: the
first write to each 4 KB page faults and the kernel zeroes it. On the project's machines
writing 32 MB fresh took 13 ms on one core, against 1.2 ms for the same write to memory
touched before. The forward's checkpoints (the state every 32 tokens: 32 MB for Gated
DeltaNet at T 4096, H 4, K = V = 128) and the backward kernel's scratch are such tensors,
made on every training step; CUDA's caching allocator keeps such memory, CPU allocators
return it to the system (glibc maps anything over 32 MB afresh on every call).

``empty(shape)`` hands out a view of a kept buffer that nothing else uses (its storage is
referenced by the pool's own tensor alone), else of a new one; a buffer is free again once
every tensor viewing it is gone (saved for a backward, it stays taken until autograd frees
the graph). Buffers no longer in use are kept up to ``KEEP_BYTES`` in all (checked at each
request, the largest dropped first); ``release()`` drops them all. ``output(shape, dtype)``
does the same for a kernel's output, which the caller gets (the sequential CPU kernel's: an
HGRN output at T 4096, H 4, D 512 is 32 MB, and its page faults took as long as the kernel). Where torch does not
expose the storage's use count, ``empty`` is ``torch.empty``.
"""
from __future__ import annotations

import threading

import torch

KEEP_BYTES = 1 << 30     # idle buffers kept at most (bytes)
MIN_BYTES = 1 << 20      # smaller tensors come from torch.empty (the allocator reuses them)

_LOCK = threading.Lock()
_BUFS: list[torch.Tensor] = []   # flat fp32 buffers the pool owns


def _uses(t: torch.Tensor) -> int:
    """References to ``t``'s storage, the temporary storage object made here included."""
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


def _works() -> bool:
    """The use count tells a view of a buffer apart (it is 2 alone, 3 with a view)."""
    try:
        t = torch.empty(4)
        alone = _uses(t)
        v = t[:2]
        seen = _uses(t)
        del v
        return alone == 2 and seen == 3 and _uses(t) == 2
    except Exception:  # noqa: BLE001 - an API torch lacks: no pooling
        return False


_ENABLED = _works()


def _free(b: torch.Tensor) -> bool:
    return _uses(b) == 2


def empty(shape, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An uninitialised CPU tensor of ``shape`` (contiguous), from a kept buffer where one
    is free and at most twice the size, else a new one."""
    n = 1
    for s in shape:
        n *= int(s)
    if not _ENABLED or dtype != torch.float32 or n * 4 < MIN_BYTES:
        return torch.empty(*shape, dtype=dtype, device="cpu")
    return _buffer(4 * n)[:n].view(*shape)


def output(shape, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Like ``empty``, for a tensor handed to the caller (a kernel's output): any dtype, and
    not a view (it shares the kept buffer's storage without being derived from it, so that
    autograd lets the caller modify it in place)."""
    n = 1
    for s in shape:
        n *= int(s)
    size = n * torch.empty((), dtype=dtype).element_size()
    if not _ENABLED or size < MIN_BYTES:
        return torch.empty(*shape, dtype=dtype, device="cpu")
    b = _buffer(size)
    with torch.inference_mode(False):
        return torch.empty(0, dtype=dtype).set_(b.untyped_storage(), 0, tuple(shape))


def _buffer(nbytes: int) -> torch.Tensor:
    """A kept buffer of at least ``nbytes`` (at most twice) that nothing else uses."""
    n = -(-nbytes // 4)
    with _LOCK, torch.inference_mode(False):   # a normal tensor, whatever the caller's mode
        idle = [b for b in _BUFS if _free(b)]
        fit = [b for b in idle if n <= b.numel() <= 2 * n]
        if fit:
            b = min(fit, key=torch.Tensor.numel)
            _trim([x for x in idle if x is not b], keep=KEEP_BYTES)
            return b
        _trim(idle, keep=KEEP_BYTES - 4 * n)
        b = torch.empty(n, dtype=torch.float32, device="cpu")
        _BUFS.append(b)
        return b


def _trim(idle: list[torch.Tensor], keep: int) -> None:
    """Drop idle buffers, the largest first, until at most ``keep`` bytes of them remain."""
    total = sum(4 * b.numel() for b in idle)
    for b in sorted(idle, key=torch.Tensor.numel, reverse=True):
        if total <= keep:
            break
        total -= 4 * b.numel()
        _drop(b)


def _drop(b: torch.Tensor) -> None:
    _BUFS[:] = [x for x in _BUFS if x is not b]   # by identity (== compares values)


def release() -> int:
    """Drop every kept buffer nothing uses; returns the bytes released."""
    with _LOCK:
        idle = [b for b in _BUFS if _free(b)]
        for b in idle:
            _drop(b)
        return sum(4 * b.numel() for b in idle)


def kept() -> tuple[int, int]:
    """(bytes in use, bytes idle) of the kept buffers."""
    with _LOCK:
        busy = sum(4 * b.numel() for b in _BUFS if not _free(b))
        return busy, sum(4 * b.numel() for b in _BUFS) - busy
