"""ShiftAddLLM's workflow on a small LLaMA-style model, on CPU: train it on synthetic data, then
convert copies with ``rk.nn.to_shift_add`` at 2 / 3 / 4 bits, weight-only and calibrated
(ShiftAddLLM's multi-objective on a few training-distribution batches), and with mixed bits
(``avg_bits=2.5``); print each one's weight bytes and held-out loss and perplexity against
the fp32 model's, and decode a few tokens with the 3-bit model.

    python examples/shift_add_llm.py [--steps 120]
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tiny_llama  # noqa: E402

import recurkit as rk  # noqa: E402

GROUP = 128


def trained_model(steps: int, log=print, seed: int = 0):
    """The example's model (d 256, 2 layers, vocab 256) trained on an order-1 sparse Markov
    chain; returns (model, data, calibration batches, held-out batches)."""
    torch.manual_seed(seed)
    data = tiny_llama.MarkovData(vocab=256, fanout=4, seed=seed)
    model = tiny_llama.TinyLlama(tiny_llama.Config())
    t = time.perf_counter()
    tiny_llama.train(model, data, steps=steps, B=32, T=64, log=log)
    if log:
        log(f"  trained in {time.perf_counter() - t:.0f} s")
    g = torch.Generator().manual_seed(seed + 1000)
    calibration = [data.batch(16, 64, g) for _ in range(4)]
    held = [data.batch(16, 129, g) for _ in range(4)]
    return model.eval(), data, calibration, held


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of the Linear weights: a ShiftAddLinear's ``nbytes``, else fp32 / bf16 tensors."""
    tot = 0
    for m in model.modules():
        if isinstance(m, rk.nn.ShiftAddLinear):
            tot += m.nbytes()
        elif isinstance(m, torch.nn.Linear):
            tot += sum(p.numel() * p.element_size() for p in m.parameters())
    return tot


def quality_rows(model, calibration, held, bits_list=(2, 3, 4), avg_bits=(2.5,)):
    """Per conversion: bits, calibrated, Linear bytes, held-out loss and its change from fp32,
    output error of the logits relative to fp32 on the held-out batches."""
    base = tiny_llama.heldout_loss(model, held)
    with torch.no_grad():
        ref = torch.cat([model(x[:, :-1]) for x in held])
    rows = [{"bits": "fp32", "calibrated": "-", "bytes": model_bytes(model), "loss": base,
             "d_loss": 0.0, "logit_err": 0.0, "convert_s": 0.0}]
    cases = [(b, None, cal) for b in bits_list for cal in (False, True)]
    cases += [(None, a, cal) for a in avg_bits for cal in (False, True)]
    for bits, avg, cal in cases:
        t = time.perf_counter()
        q = rk.nn.to_shift_add(copy.deepcopy(model), bits=bits or 3, group_size=GROUP,
                               calibration=calibration if cal else None, avg_bits=avg)
        dt = time.perf_counter() - t
        loss = tiny_llama.heldout_loss(q, held)
        with torch.no_grad():
            y = torch.cat([q(x[:, :-1]) for x in held])
        chosen = [r["bits"] for r in q.shift_add_report]
        label = str(bits) if avg is None else f"avg {avg}: " + " ".join(
            f"{chosen.count(b)}x{b}" for b in sorted(set(chosen)))
        rows.append({"bits": label, "calibrated": "yes" if cal else "no",
                     "bytes": model_bytes(q), "loss": loss, "d_loss": loss - base,
                     "logit_err": ((y - ref).norm() / ref.norm()).item(), "convert_s": dt})
    return rows


def print_quality(rows, uniform: float, floor: float) -> None:
    print(f"held-out loss (nats/token; uniform {uniform:.3f}, the chain's entropy {floor:.3f})")
    print(f"{'bits':<22} {'calibrated':>10} {'Linear bytes':>12} {'loss':>7} {'d loss':>7} "
          f"{'ppl':>7} {'logit err':>9} {'convert s':>9}")
    for r in rows:
        print(f"{r['bits']:<22} {r['calibrated']:>10} {r['bytes']:>12} {r['loss']:7.4f} "
              f"{r['d_loss']:+7.4f} {math.exp(r['loss']):7.3f} {r['logit_err']:9.4f} "
              f"{r['convert_s']:9.1f}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=120)
    args = ap.parse_args()
    print("training the tiny LLaMA-style model (d 256, 2 layers, SwiGLU 768, vocab 256):")
    model, data, cal, held = trained_model(args.steps)
    rows = quality_rows(model, cal, held)
    print()
    print_quality(rows, tiny_llama.uniform_loss(data.vocab), data.entropy())
    q = rk.nn.to_shift_add(copy.deepcopy(model), bits=3, group_size=GROUP, calibration=cal)
    prompt = held[0][:1, :8]
    print(f"\nprompt {prompt[0].tolist()}")
    print(f"fp32  greedy: {tiny_llama.greedy_decode(model, prompt, 16)[0].tolist()}")
    print(f"3-bit greedy: {tiny_llama.greedy_decode(q, prompt, 16)[0].tolist()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
