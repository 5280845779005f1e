"""Train a small convolutional logic-gate network on synthetic binary images, on CPU, and
compile it into one hard kernel.

    python examples/logic_conv.py [--steps 300] [--size 12] [--seed 0] [--backend torch]

The task (generated here, no downloads): 4 classes of size x size binary images - a
horizontal bar, a vertical bar, a diagonal (either direction) or a cross ("+"), each at a
random position and length, with every pixel flipped with probability ``noise``. Chance is
25%. The net: LogicConv2d (3x3, depth-2 gate trees) -> OrPool2d -> LogicConv2d -> OrPool2d ->
Flatten -> two LogicLayers -> GroupSum; trained soft with Adam, then
``rk.nn.compile_hard`` runs it on bool images. Prints the soft (train-mode relaxation) and
hard test accuracy, checks the hard scores equal the eval-mode model's, and times the hard
net in samples/s from a bool tensor.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

import recurkit as rk

CLASSES = ("horizontal", "vertical", "diagonal", "cross")


def make_images(n: int, size: int = 12, noise: float = 0.03,
                gen: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Bool images [n, 1, size, size] and labels [n] in 0..3 (see the module docstring)."""
    y = torch.randint(0, 4, (n,), generator=gen)
    x = torch.zeros(n, size, size, dtype=torch.bool)
    r = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=gen))   # noqa: E731
    for i, c in enumerate(y.tolist()):
        if c in (0, 1):                       # a bar of length 5..size-2
            L = r(5, size - 1)
            a, b = r(0, size), r(0, size - L + 1)
            if c == 0:
                x[i, a, b:b + L] = True
            else:
                x[i, b:b + L, a] = True
        elif c == 2:                          # a diagonal of length 5..size-2
            L = r(5, size - 1)
            a, b = r(0, size - L + 1), r(0, size - L + 1)
            d = torch.arange(L)
            cols = b + d if r(0, 2) else b + L - 1 - d
            x[i, a + d, cols] = True
        else:                                 # a cross with arms of 2..3
            arm = r(2, 4)
            a, b = r(arm, size - arm), r(arm, size - arm)
            x[i, a, b - arm:b + arm + 1] = True
            x[i, a - arm:a + arm + 1, b] = True
    flip = torch.rand(n, size, size, generator=gen) < noise
    return (x ^ flip).unsqueeze(1), y


def build(size: int, widths=(16, 32, 1024), tau: float = 8.0, pool: str = "prob",
          backend: str = "auto", seed: int = 0) -> nn.Sequential:
    g = torch.Generator().manual_seed(seed)
    k1, k2, d = widths
    s = size // 2 // 2
    kw = dict(backend=backend, generator=g)
    return nn.Sequential(
        rk.nn.LogicConv2d(1, k1, 3, depth=2, padding=1, **kw),
        rk.nn.OrPool2d(2, relaxation=pool, backend=backend),
        rk.nn.LogicConv2d(k1, k2, 3, depth=2, padding=1, **kw),
        rk.nn.OrPool2d(2, relaxation=pool, backend=backend),
        nn.Flatten(),
        rk.nn.LogicLayer(k2 * s * s, d, **kw), rk.nn.LogicLayer(d, d, **kw),
        rk.nn.GroupSum(len(CLASSES), tau, backend=backend))


def run(steps: int = 300, size: int = 12, train_batch: int = 128, test_n: int = 4000,
        widths=(16, 32, 1024), tau: float = 4.0, pool: str = "max", lr: float = 0.05,
        backend: str = "auto", seed: int = 0, log=print) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    model = build(size, widths, tau, pool, backend, seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        x, y = make_images(train_batch, size, gen=gen)
        loss = F.cross_entropy(model(x.float()), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if log and (step % 50 == 0 or step == steps):
            log(f"step {step:4d}  loss {loss.item():.3f}  ({time.perf_counter() - t0:.0f} s)")
    train_s = time.perf_counter() - t0
    xt, yt = make_images(test_n, size, gen=torch.Generator().manual_seed(seed + 2))
    with torch.no_grad():
        soft_acc = (model(xt.float()).argmax(-1) == yt).float().mean().item()
        model.eval()
        want = model(xt.float())
    hard = rk.nn.compile_hard(model, input_shape=(1, size, size))
    got = hard(xt)   # builds the kernel on the first call
    equal = torch.equal(got, want)
    assert equal, "hard scores differ from the eval-mode model's"
    reps, t = 0, time.perf_counter()
    while reps < 3 or time.perf_counter() - t < 1.0:
        hard(xt)
        reps += 1
    throughput = reps * test_n / (time.perf_counter() - t)
    r = dict(soft_acc=soft_acc, eval_acc=(want.argmax(-1) == yt).float().mean().item(),
             hard_acc=(got.argmax(-1) == yt).float().mean().item(), hard_equals_eval=equal,
             throughput=throughput, train_s=train_s, stats=hard.stats)
    if log:
        s = hard.stats
        log(f"trained {steps} steps in {train_s:.0f} s; test accuracy: soft {soft_acc:.3f}, "
            f"hard {r['hard_acc']:.3f} (hard scores == eval-mode scores: {equal})")
        log(f"hard net: {s['gates']} gates -> {s['ops']} ops after optimisation "
            f"({s['folded']} folded, {s['shared']} shared, {s['dead']} unread); "
            f"{throughput:,.0f} samples/s from bool [{test_n}, 1, {size}, {size}]")
    return r


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--size", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="auto", help="the soft layers' backend (auto, torch, ...)")
    a = p.parse_args()
    run(a.steps, a.size, backend=a.backend, seed=a.seed)
