"""Reused CPU buffers (``backends.shared.buffers``): a buffer is handed out again only once
nothing views it, training steps reuse the forward's checkpoint memory, gradients unchanged."""
import gc

import pytest
import torch

import recurkit as rk
from recurkit.backends.shared import buffers
from test_adjoint import BUILTINS, draw, rel

MB = 1 << 20
pytestmark = pytest.mark.skipif(not buffers._ENABLED, reason="torch exposes no use count")


@pytest.fixture(autouse=True)
def empty_pool():
    buffers.release()
    yield
    buffers.release()


def test_a_buffer_is_reused_only_once_free():
    a = buffers.empty((MB // 4, 2))                 # 2 MB
    assert a.shape == (MB // 4, 2) and a.is_contiguous()
    b = buffers.empty((MB // 2,))
    assert b.data_ptr() != a.data_ptr()            # a is still in use
    held = a[3:]                                   # a view keeps it taken
    pa = a.data_ptr()
    del a
    gc.collect()
    c = buffers.empty((MB // 2,))
    assert c.data_ptr() not in (pa, b.data_ptr())
    del held, c
    gc.collect()
    assert buffers.empty((MB // 2,)).data_ptr() == pa   # free again: reused


def test_sizes_kept_and_released():
    small = buffers.empty((16,))
    assert buffers.kept() == (0, 0) and small.numel() == 16    # small ones: torch.empty
    x = buffers.empty((MB,))                       # 4 MB
    assert buffers.kept() == (4 * MB, 0)
    y = buffers.empty((MB // 4,))                  # too small for x's buffer: a new one
    del x, y
    gc.collect()
    assert buffers.kept() == (0, 5 * MB)
    big = buffers.empty((MB // 2 - 1,))            # at most twice its size: not x's 4 MB
    assert buffers.kept()[0] == 4 * (MB // 2 - 1)
    del big
    assert buffers.release() == 4 * MB + MB + 4 * (MB // 2 - 1)
    assert buffers.kept() == (0, 0)


def test_idle_buffers_are_dropped_beyond_the_limit(monkeypatch):
    monkeypatch.setattr(buffers, "KEEP_BYTES", 5 * MB)
    for n in (MB, MB // 4):                        # 4 MB and 1 MB, both idle after
        buffers.empty((n,))
    gc.collect()
    assert buffers.kept() == (0, 5 * MB)
    z = buffers.empty((3 * MB // 8,))              # 1.5 MB fits neither: the 4 MB one goes
    assert buffers.kept() == (3 * MB // 2, MB)
    del z


def test_training_steps_reuse_checkpoints_and_gradients_hold(monkeypatch):
    """Two calls' graphs alive at once (two layers), a graph kept for a second backward
    while other calls run: every gradient equals the reference's, and a later step takes
    the checkpoint memory of the ones before."""
    monkeypatch.setattr(buffers, "MIN_BYTES", 0)    # pool even these small ones
    decl = BUILTINS["gated_delta_rule"]
    sizes = {"K": 32, "V": 64}
    xs = draw(decl, 100, sizes=sizes)           # checkpoints: 4 chunks x 2 heads x 8 KB
    op, ref = rk.compile(decl), rk.compile(decl, backend="reference")

    def grads(fn, xs, retain=False, twice=None):
        leaves = {n: x.clone().requires_grad_() for n, x in xs.items()}
        o = fn(**leaves)[0]
        w = torch.randn(o.shape, generator=torch.Generator().manual_seed(3))
        loss = (o * w).sum()
        first = torch.autograd.grad(loss, list(leaves.values()), retain_graph=twice is not None)
        if twice is not None:
            twice()                              # other calls reuse whatever is free
            second = torch.autograd.grad(loss, list(leaves.values()))
            for a, b in zip(first, second):
                assert torch.equal(a, b)
        return first
    want = grads(ref, xs)
    other = {n: x.flip(1) for n, x in xs.items()}
    kept = []
    for _ in range(3):
        got = grads(op, xs, twice=lambda: grads(op, other))
        for n, a, b in zip(xs, got, want):
            assert rel(a, b) < 1e-4, n
        gc.collect()
        kept.append(len(buffers._BUFS))
    assert kept[0] >= 2 and kept[0] == kept[-1], kept   # checkpoints and scratch, reused


def test_the_limit_holds_when_a_request_is_served_from_the_pool(monkeypatch):
    monkeypatch.setattr(buffers, "KEEP_BYTES", 5 * MB)
    monkeypatch.setattr(buffers, "MIN_BYTES", 0)
    bufs = [buffers.empty((MB,)) for _ in range(3)]    # three 4 MB buffers, then all idle
    del bufs
    gc.collect()
    again = buffers.empty((MB,))                      # served by one; idle beyond 5 MB goes
    assert buffers.kept() == (4 * MB, 4 * MB)
    del again


def test_fp32_cpu_tensors_whatever_the_defaults_and_mode():
    """The kernels read fp32 CPU memory: a float64 default dtype changes nothing, and a
    buffer first made under inference mode can later be saved for a backward."""
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        for n in (16, MB):                            # torch.empty path and the pool's
            t = buffers.empty((n,))
            assert t.dtype == torch.float32 and t.device.type == "cpu"
        del t
    finally:
        torch.set_default_dtype(prev)
    gc.collect()
    buffers.release()
    with torch.inference_mode():
        t = buffers.empty((MB,))
        p = t.data_ptr()
    del t
    gc.collect()
    x = torch.ones(3, requires_grad=True)
    ck = buffers.empty((MB,))
    assert ck.data_ptr() == p and not ck.is_inference()
    (x[:1] * ck[:1]).sum().backward()                # saves the view: refused if inference
