"""A small LLaMA-style decoder-only transformer (RMSNorm, rotary embeddings, causal attention
with a KV cache for decode, SwiGLU MLP), synthetic data with learnable structure, a short
training loop, held-out loss and greedy decode: what ``shift_add_llm.py`` and
``benchmarks/shift_add_decode.py`` convert and time. Plain torch; no downloads.

Data: a random sparse Markov chain over ``vocab`` tokens: the next token depends on the
previous ``order`` tokens (1 or 2), with ``fanout`` possible successors per context (Dirichlet
weights), so that a model that reads its context reaches a loss near the chain's entropy, well
below uniform (``log(vocab)``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Config:
    vocab: int = 256
    d: int = 256
    layers: int = 2
    heads: int = 4
    ffn: int = 768
    max_len: int = 256


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotary(max_len: int, dim: int, base: float = 10000.0):
    """cos, sin [max_len, dim // 2] of the rotary embedding."""
    inv = base ** (-torch.arange(0, dim, 2).float() / dim)
    ang = torch.arange(max_len).float()[:, None] * inv[None]
    return ang.cos(), ang.sin()


def apply_rotary(x, cos, sin):
    """x [B, H, T, hd]; cos, sin [T, hd // 2]: rotate the (first half, second half) pairs."""
    x1, x2 = x.chunk(2, -1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)


class Attention(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.h, self.hd = c.heads, c.d // c.heads
        self.q = nn.Linear(c.d, c.d, bias=False)
        self.k = nn.Linear(c.d, c.d, bias=False)
        self.v = nn.Linear(c.d, c.d, bias=False)
        self.o = nn.Linear(c.d, c.d, bias=False)

    def forward(self, x, cos, sin, cache=None, pos: int = 0):
        B, T, _ = x.shape
        q, k, v = (lin(x).view(B, T, self.h, self.hd).transpose(1, 2)
                   for lin in (self.q, self.k, self.v))
        q, k = apply_rotary(q, cos[pos:pos + T], sin[pos:pos + T]), \
            apply_rotary(k, cos[pos:pos + T], sin[pos:pos + T])
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:   # cache: (k, v) [B, H, max_len, hd], written at pos..pos+T
            cache[0][:, :, pos:pos + T] = k
            cache[1][:, :, pos:pos + T] = v
            k, v = cache[0][:, :, :pos + T], cache[1][:, :, :pos + T]
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)
        return self.o(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.gate = nn.Linear(c.d, c.ffn, bias=False)
        self.up = nn.Linear(c.d, c.ffn, bias=False)
        self.down = nn.Linear(c.ffn, c.d, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.norm1, self.attn = RMSNorm(c.d), Attention(c)
        self.norm2, self.mlp = RMSNorm(c.d), MLP(c)

    def forward(self, x, cos, sin, cache=None, pos=0):
        x = x + self.attn(self.norm1(x), cos, sin, cache, pos)
        return x + self.mlp(self.norm2(x))


class TinyLlama(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.config = c
        self.emb = nn.Embedding(c.vocab, c.d)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.layers))
        self.norm = RMSNorm(c.d)
        self.lm_head = nn.Linear(c.d, c.vocab, bias=False)
        cos, sin = rotary(c.max_len, c.d // c.heads)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, idx, caches=None, pos: int = 0):
        """idx [B, T] -> logits [B, T, vocab]; with ``caches`` (``new_caches``), the tokens
        are positions pos..pos+T-1 and their keys and values are written there."""
        x = self.emb(idx)
        for i, blk in enumerate(self.blocks):
            x = blk(x, self.cos, self.sin, None if caches is None else caches[i], pos)
        return self.lm_head(self.norm(x))

    def new_caches(self, batch: int = 1, dtype=None):
        c = self.config
        dtype = dtype or self.emb.weight.dtype
        shape = (batch, c.heads, c.max_len, c.d // c.heads)
        return [(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype))
                for _ in range(c.layers)]


@torch.no_grad()
def greedy_decode(model: TinyLlama, prompt: torch.Tensor, new_tokens: int,
                  dtype=None) -> torch.Tensor:
    """Batch-``prompt.shape[0]`` greedy decode with the KV cache: one prefill, then one token
    per step. Returns the new tokens [B, new_tokens]."""
    caches = model.new_caches(prompt.shape[0], dtype)
    logits = model(prompt, caches, 0)
    pos = prompt.shape[1]
    out = []
    tok = logits[:, -1].argmax(-1, keepdim=True)
    for _ in range(new_tokens):
        out.append(tok)
        logits = model(tok, caches, pos)
        pos += 1
        tok = logits[:, -1].argmax(-1, keepdim=True)
    return torch.cat(out, 1)


class MarkovData:
    """Sequences from a random sparse Markov chain (see the module doc), seeded."""

    def __init__(self, vocab: int = 256, fanout: int = 4, order: int = 1, seed: int = 0):
        if order not in (1, 2):
            raise ValueError(f"order must be 1 or 2, got {order}")
        g = torch.Generator().manual_seed(seed)
        self.vocab, self.order = vocab, order
        ctx = (vocab,) * order
        self.succ = torch.randint(0, vocab, (*ctx, fanout), generator=g)
        self.prob = _dirichlet((*ctx, fanout), g)

    def entropy(self) -> float:
        """Mean entropy (nats) of the next token over the contexts: about the loss floor."""
        p = self.prob.clamp_min(1e-12)
        return -(p * p.log()).sum(-1).mean().item()

    def batch(self, B: int, T: int, g: torch.Generator) -> torch.Tensor:
        x = torch.empty(B, T, dtype=torch.long)
        x[:, :self.order] = torch.randint(0, self.vocab, (B, self.order), generator=g)
        for t in range(self.order, T):
            ctx = tuple(x[:, t - self.order + i] for i in range(self.order))
            pick = torch.multinomial(self.prob[ctx], 1, generator=g)[:, 0]
            x[:, t] = self.succ[ctx][torch.arange(B), pick]
        return x


def _dirichlet(shape, g: torch.Generator) -> torch.Tensor:
    """Dirichlet(1/2) samples over the last dim from a seeded generator: normalized squares
    of normals (Gamma(1/2) draws, up to a common scale)."""
    z = torch.randn(*shape, generator=g).square()
    return z / z.sum(-1, keepdim=True).clamp_min(1e-12)


def train(model: TinyLlama, data: MarkovData, steps: int = 300, B: int = 32, T: int = 128,
          lr: float = 3e-3, seed: int = 1, log=print) -> None:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.1)
    for step in range(steps):
        x = data.batch(B, T + 1, g)
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if log and (step % 50 == 0 or step == steps - 1):
            log(f"  step {step:4d}  loss {loss.item():.3f}")


@torch.no_grad()
def heldout_loss(model: nn.Module, batches: list[torch.Tensor]) -> float:
    """Mean next-token cross-entropy (nats) over the batches [B, T + 1], positions >= 2 (those
    a chain of order up to 2 determines)."""
    tot, n = 0.0, 0
    for x in batches:
        logits = model(x[:, :-1])[:, 1:]
        tot += F.cross_entropy(logits.flatten(0, 1).float(), x[:, 2:].flatten(),
                               reduction="sum").item()
        n += x[:, 2:].numel()
    return tot / n


def uniform_loss(vocab: int) -> float:
    return math.log(vocab)
