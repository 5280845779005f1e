"""Batch-1 greedy decode of a LLaMA-style model on CPU (examples/tiny_llama.py: RMSNorm,
rotary embeddings, causal attention with a KV cache, SwiGLU MLP): tokens/s in fp32 and bf16
(torch F.linear) against the same model with every Linear a ShiftAddLinear of 2 / 3 / 4 bits,
in one run; the Linear layers' bytes; then the held-out loss of a small trained model of the
same architecture converted with rk.nn.to_shift_add, weight-only and calibrated.

    python benchmarks/shift_add_decode.py [--repeats 5] [--tokens 32] [--steps 80]

Timing model: d 1024, 4 layers, 8 heads, SwiGLU 2816, vocab 512 (the Linear layers are 98%
of the weights), random init; its shift-add layers get random codes and alphas (the kernels'
time does not depend on their values; fitting 51M weights would take minutes). A prompt of 16
tokens is prefilled, then ``--tokens`` tokens are decoded one at a time; tokens/s is over the
decode steps alone, best of ``--repeats`` rounds with the candidates interleaved.

OMP_WAIT_POLICY is PASSIVE unless set otherwise (see shift_add_cpu.py).
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # before torch starts its threads
import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "examples"))
from common import cpu_features, machine, save_results  # noqa: E402
import shift_add_llm  # noqa: E402
import tiny_llama  # noqa: E402

import recurkit as rk  # noqa: E402

GROUP = 128
TIMING = tiny_llama.Config(vocab=512, d=1024, layers=4, heads=8, ffn=2816, max_len=256)


def random_shift_add(model: torch.nn.Module, bits: int) -> torch.nn.Module:
    """Every Linear of ``model`` (in place) a ShiftAddLinear of random codes and alphas of the
    Linear's scale (for timing only)."""
    gen = torch.Generator().manual_seed(bits)
    for name, m in list(model.named_modules()):
        if isinstance(m, torch.nn.Linear):
            G, O = m.in_features // GROUP, m.out_features
            codes = torch.randint(0, 256, (G, O, bits, GROUP // 8), dtype=torch.uint8,
                                  generator=gen)
            alpha = torch.rand(G, O, bits, generator=gen) * m.weight.detach().abs().mean()
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr,
                    rk.nn.ShiftAddLinear(codes, alpha, m.bias, GROUP))
    return model


@torch.no_grad()
def decode_time(model, prompt, tokens: int, dtype) -> float:
    """Seconds per decoded token (prefill excluded)."""
    caches = model.new_caches(1, dtype)
    logits = model(prompt, caches, 0)
    pos = prompt.shape[1]
    tok = logits[:, -1].argmax(-1, keepdim=True)
    t = time.perf_counter()
    for _ in range(tokens):
        logits = model(tok, caches, pos)
        pos += 1
        tok = logits[:, -1].argmax(-1, keepdim=True)
    return (time.perf_counter() - t) / tokens


def decode_table(repeats: int, tokens: int) -> list[dict]:
    torch.manual_seed(0)
    fp32 = tiny_llama.TinyLlama(TIMING).eval()
    models = {"torch fp32": (fp32, torch.float32),
              "torch bf16": (copy.deepcopy(fp32).to(torch.bfloat16), torch.bfloat16)}
    for bits in (2, 3, 4):
        models[f"shift-add {bits}-bit"] = (random_shift_add(copy.deepcopy(fp32), bits),
                                           torch.float32)
    prompt = torch.randint(0, TIMING.vocab, (1, 16))
    for m, dt in models.values():   # compile the kernels, warm the caches
        decode_time(m, prompt, 4, dt)
    times: dict[str, list[float]] = {n: [] for n in models}
    for _ in range(repeats):
        for n, (m, dt) in models.items():
            time.sleep(0.05)
            times[n].append(decode_time(m, prompt, tokens, dt))
    best = {n: min(ts) for n, ts in times.items()}
    rows = []
    print(f"{'model':<18} {'Linear MB':>9} {'ms/token':>9} {'tokens/s':>9} {'vs fp32':>8} "
          f"{'vs bf16':>8}")
    for n, (m, _) in models.items():
        t = best[n]
        mb = shift_add_llm.model_bytes(m) / 1e6
        row = {"model": n, "linear_bytes": shift_add_llm.model_bytes(m),
               "ms_per_token": t * 1e3, "tokens_per_s": 1 / t,
               "speedup_vs_fp32": best["torch fp32"] / t,
               "speedup_vs_bf16": best["torch bf16"] / t,
               "ms_per_token_all": [x * 1e3 for x in times[n]]}
        rows.append(row)
        print(f"{n:<18} {mb:9.1f} {t * 1e3:9.2f} {1 / t:9.1f} {row['speedup_vs_fp32']:7.2f}x "
              f"{row['speedup_vs_bf16']:7.2f}x")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--steps", type=int, default=80, help="training steps of the loss model")
    args = ap.parse_args()
    print(f"machine: {machine()}, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}")
    print(f"vector features: {' '.join(cpu_features())}")
    print(f"\nbatch-1 greedy decode, d {TIMING.d}, {TIMING.layers} layers, {TIMING.heads} heads, "
          f"SwiGLU {TIMING.ffn}, vocab {TIMING.vocab}, group {GROUP}; prompt 16, "
          f"{args.tokens} tokens decoded, best of {args.repeats}:")
    rows = decode_table(args.repeats, args.tokens)
    r3 = next(r for r in rows if r["model"] == "shift-add 3-bit")
    ok = r3["speedup_vs_fp32"] > 1 and r3["speedup_vs_bf16"] > 1
    print(f"bar: 3-bit decode faster than fp32 and bf16: {r3['speedup_vs_fp32']:.2f}x / "
          f"{r3['speedup_vs_bf16']:.2f}x -> {'met' if ok else 'MISSED'}")

    print("\nthe same architecture at d 256, 2 layers, trained on a sparse Markov chain, "
          "converted with rk.nn.to_shift_add:")
    model, data, cal, held = shift_add_llm.trained_model(args.steps, log=None)
    quality = shift_add_llm.quality_rows(model, cal, held)
    shift_add_llm.print_quality(quality, tiny_llama.uniform_loss(data.vocab), data.entropy())
    save_results("shift_add_decode", {"group": GROUP, "config": vars(TIMING),
                                      "prompt": 16, "tokens": args.tokens,
                                      "omp_wait_policy": os.environ["OMP_WAIT_POLICY"],
                                      "decode": rows, "quality": quality,
                                      "quality_train_steps": args.steps})
    return 0


if __name__ == "__main__":
    sys.exit(main())
