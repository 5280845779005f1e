"""Train a tiny model with a recurkit layer on multi-query associative recall, on CPU.

    python examples/recall.py [--layer gdn|gla|kda] [--steps 300]

Each sequence lists key-value pairs (k1 v1 k2 v2 ...) and then asks for some of the keys
again; the model must answer each query with its value, which needs a state that stores and
retrieves associations: what delta-rule layers are built for. Prints the loss and the accuracy
on the queries as training goes; chance accuracy is 1/16.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

import recurkit as rk

N_KEYS = N_VALUES = 16


def batch(B: int, pairs: int = 8, queries: int = 4, gen: torch.Generator | None = None):
    keys = torch.stack([torch.randperm(N_KEYS, generator=gen)[:pairs] for _ in range(B)])
    vals = torch.randint(N_KEYS, N_KEYS + N_VALUES, (B, pairs), generator=gen)
    ctx = torch.stack([keys, vals], -1).reshape(B, 2 * pairs)
    pick = torch.stack([torch.randperm(pairs, generator=gen)[:queries] for _ in range(B)])
    q = keys.gather(1, pick)
    x = torch.cat([ctx, q], 1)
    y = torch.full_like(x, -100)
    y[:, 2 * pairs:] = vals.gather(1, pick) - N_KEYS
    return x, y


class Model(nn.Module):
    def __init__(self, layer: str, d: int = 64, heads: int = 4, depth: int = 2):
        super().__init__()
        cls = {"gdn": rk.nn.GatedDeltaNet, "gla": rk.nn.GLA, "kda": rk.nn.KDA}[layer]
        self.emb = nn.Embedding(N_KEYS + N_VALUES, d)
        self.mixers = nn.ModuleList(cls(d, heads) for _ in range(depth))
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(depth))
        self.head = nn.Linear(d, N_VALUES)

    def forward(self, x):
        h = self.emb(x)
        for norm, mix in zip(self.norms, self.mixers):
            h = h + mix(norm(h))
        return self.head(h)


def train(layer: str = "gdn", steps: int = 300, B: int = 64, lr: float = 3e-3, seed: int = 0,
          log_every: int = 50, verbose: bool = True) -> list[tuple[int, float, float]]:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = Model(layer)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    history = []
    t0 = time.time()
    for step in range(1, steps + 1):
        x, y = batch(B, gen=gen)
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, N_VALUES), y.reshape(-1), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % log_every == 0 or step == 1:
            mask = y != -100
            acc = (logits.argmax(-1)[mask] == y[mask]).float().mean().item()
            history.append((step, loss.item(), acc))
            if verbose:
                print(f"step {step:4d}  loss {loss.item():.3f}  query accuracy {acc:.2f}  "
                      f"({time.time() - t0:.1f} s)", flush=True)
    return history


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layer", choices=["gdn", "gla", "kda"], default="gdn")
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args()
    train(args.layer, args.steps)
