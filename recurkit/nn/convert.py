"""``to_shift_add``: every ``nn.Linear`` of a model replaced by a ``ShiftAddLinear``.

Weight-only, each layer is ``bcq_quantize``d. With calibration batches, forward hooks on the
Linear layers sum ``H = x x^T`` (fp64) over the inputs each one sees, and each layer is fitted
with ``bcq_quantize_hessian`` to ShiftAddLLM's multi-objective: output-activation error on
those inputs plus ``weight_error`` times the weight error. With ``avg_bits``, every layer is
fitted at each of ``bit_choices`` and the bits are allocated per layer to minimize the summed
error (output error with calibration, weight error without) under a parameter-weighted average
of at most ``avg_bits`` (``allocate_bits``).
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from .bcq import BCQWeight, bcq_quantize, bcq_quantize_hessian
from .shift_add import ShiftAddLinear


def _linears(model: nn.Module, skip: tuple[str, ...]):
    """{id: (module, [names])} of the Linear layers to convert, in module order, and the set of
    skip names that matched nothing. A layer reachable under several names converts once; one
    skipped under any of its names (or under a skipped parent) is not converted."""
    found: dict[int, tuple[nn.Linear, list[str]]] = {}
    skipped: set[int] = set()
    used: set[str] = set()
    for name, mod in model.named_modules(remove_duplicate=False):
        if not isinstance(mod, nn.Linear):
            continue   # (subclasses are refused by the caller unless skipped)
        hit = [s for s in skip if name == s or name.startswith(s + ".")]
        used.update(hit)
        if hit:
            skipped.add(id(mod))
        found.setdefault(id(mod), (mod, []))[1].append(name)
    names = {n for n, _ in model.named_modules(remove_duplicate=False)}
    unknown = [s for s in skip if s not in used and s not in names]
    return {k: v for k, v in found.items() if k not in skipped}, unknown


def _call(model: nn.Module, batch) -> None:
    if isinstance(batch, Mapping):
        model(**batch)
    elif isinstance(batch, (tuple, list)):
        model(*batch)
    else:
        model(batch)


def calibrate(model: nn.Module, layers: Iterable[nn.Linear], batches) -> dict[int, tuple]:
    """{id(layer): (H fp64 [in, in], rows)}: the sums of ``x x^T`` over the inputs each layer
    sees while ``model`` runs the batches (in eval mode, no gradient; the modules' modes and
    hooks restored afterwards). A batch is
    passed as ``model(batch)``, ``model(*batch)`` for a tuple or list, ``model(**batch)`` for a
    mapping."""
    stats: dict[int, list] = {}

    def hook(mod, args, _out):
        x = args[0].detach().reshape(-1, mod.in_features).to(torch.float64).cpu()
        s = stats.setdefault(id(mod), [torch.zeros(mod.in_features, mod.in_features,
                                                   dtype=torch.float64), 0])
        s[0].addmm_(x.T, x)
        s[1] += x.shape[0]

    handles = [m.register_forward_hook(hook) for m in layers]
    modes = [(m, m.training) for m in model.modules()]
    try:   # in eval mode: no dropout in H, no batch-norm statistics updated
        model.eval()
        with torch.no_grad():
            for batch in batches:
                _call(model, batch)
    finally:
        for h in handles:
            h.remove()
        for m, training in modes:
            m.training = training
    return {k: (v[0], v[1]) for k, v in stats.items()}


def allocate_bits(errors: list[dict[int, float]], sizes: list[int], avg_bits: float
                  ) -> list[int]:
    """Bits per layer, one of each ``errors[i]``'s keys, minimizing ``sum errors[i][bits_i]``
    with ``sum sizes_i * bits_i <= avg_bits * sum sizes`` (exact: a knapsack over the extra
    bits above the smallest choice, in units of the sizes' gcd; where that table would be too
    big, greedy upgrades by error saved per extra parameter-bit)."""
    choices = sorted(errors[0])
    low = choices[0]
    g = 0
    for s in sizes:
        g = math.gcd(g, s)
    units = [s // g for s in sizes]
    cap = math.floor((avg_bits - low) * sum(sizes) / g + 1e-9)
    if cap * len(sizes) <= 300_000:
        INF = float("inf")
        best = [0.0] + [INF] * cap    # best[c]: least error with c units of extra bits spent
        back = []                     # per layer, the bits taken to reach each c
        for e, u in zip(errors, units):
            new, took = [INF] * (cap + 1), [0] * (cap + 1)
            for c in range(cap + 1):
                if best[c] == INF:
                    continue
                for b in choices:
                    c2 = c + u * (b - low)
                    if c2 <= cap and best[c] + e[b] < new[c2]:
                        new[c2], took[c2] = best[c] + e[b], b
            best = new
            back.append(took)
        c = min(range(cap + 1), key=lambda c: (best[c], -c))
        out = []
        for took, u in zip(reversed(back), reversed(units)):
            out.append(took[c])
            c -= u * (took[c] - low)
        return out[::-1]
    bits = [low] * len(sizes)
    spent = 0
    while True:
        cand = []
        for i, (e, u) in enumerate(zip(errors, units)):
            up = [b for b in choices if b > bits[i]]
            if up and spent + u * (up[0] - bits[i]) <= cap:
                cand.append(((e[bits[i]] - e[up[0]]) / (u * (up[0] - bits[i])), i, up[0]))
        if not cand or max(cand)[0] <= 0:   # nothing left to spend bits on that helps
            return bits
        _, i, b = max(cand)
        spent += units[i] * (b - bits[i])
        bits[i] = b


def _check_args(model, bits, group_size, avg_bits, bit_choices, weight_error):
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(group_size, int) or group_size < 8 or group_size % 8:
        raise ValueError(f"group_size must be a positive multiple of 8, got {group_size!r}")
    if not bit_choices or any(b not in (1, 2, 3, 4) for b in bit_choices):
        raise ValueError(f"bit_choices must be bit widths among 1, 2, 3, 4, got {bit_choices!r}")
    if avg_bits is None:
        if bits not in (1, 2, 3, 4) or isinstance(bits, bool):
            raise ValueError(f"bits must be 1, 2, 3 or 4, got {bits!r}")
    elif not (isinstance(avg_bits, (int, float)) and not isinstance(avg_bits, bool)
              and min(bit_choices) <= avg_bits <= max(bit_choices)):
        raise ValueError(f"avg_bits must be a number in [{min(bit_choices)}, "
                         f"{max(bit_choices)}] (the range of bit_choices {tuple(bit_choices)}),"
                         f" got {avg_bits!r}")
    if not (isinstance(weight_error, (int, float)) and weight_error > 0):
        raise ValueError(f"weight_error must be > 0, got {weight_error!r}")


def to_shift_add(model: nn.Module, bits: int = 3, group_size: int = 128, calibration=None,
                 avg_bits: float | None = None, skip: Iterable[str] = (), *,
                 bit_choices: Iterable[int] = (2, 3, 4), weight_error: float = 0.1,
                 terms: int = 2) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` (in place; names in ``skip``, and the layers
    under them, excepted) by a ``ShiftAddLinear`` of ``bits`` bits per weight, groups of
    ``group_size`` inputs and alphas of ``terms`` powers of two; returns ``model``.

    ``calibration``: an iterable of input batches for ``model``; each layer is then fitted to
    ``tr(E H' E^T)``, ``E = W - Wq``, ``H' = H / mean(diag H) + weight_error * I`` with ``H``
    the sum of ``x x^T`` over its inputs on those batches (``bcq_quantize_hessian``); without,
    to the weight error ``||E||^2``. ``avg_bits``: bits per layer chosen from ``bit_choices``
    by measured sensitivity (the layer's error at each choice: ``tr(E H E^T) / rows`` with
    calibration, ``||E||^2`` without) so that the parameter-weighted average is at most, and as
    near as the layer sizes allow to, ``avg_bits``; ``bits`` is then unused.

    ``model.shift_add_report`` lists per converted layer: its names, shape, bits, bytes and
    relative weight error (and output error on the calibration inputs). Every argument is
    checked, the calibration run and all layers fitted before the first replacement: an error
    leaves the model as it was."""
    skip = (skip,) if isinstance(skip, str) else tuple(skip)
    bit_choices = tuple(sorted(set(bit_choices)))
    _check_args(model, bits, group_size, avg_bits, bit_choices, weight_error)
    layers, unknown = _linears(model, skip)
    if unknown:
        raise ValueError(f"skip names {unknown} match no module of the model")
    for mod, names in layers.values():
        if "" in names:
            raise ValueError("the model itself is an nn.Linear: convert it with "
                             "ShiftAddLinear.from_linear")
        if mod.in_features % group_size:
            raise ValueError(f"layer {names[0]!r} has in_features {mod.in_features}, which "
                             f"group_size {group_size} does not divide; pass "
                             f"skip=[{names[0]!r}] to keep it, or another group_size")
        if type(mod) is not nn.Linear:
            raise ValueError(f"layer {names[0]!r} is a {type(mod).__name__}, a subclass of "
                             "nn.Linear whose owner may read its weight directly (as "
                             "nn.MultiheadAttention does its out_proj's): pass "
                             f"skip=[{names[0]!r}] to keep it")
        if not mod.weight.is_floating_point():
            raise ValueError(f"layer {names[0]!r} has a {mod.weight.dtype} weight, not float")
    stats = {}
    if calibration is not None:
        stats = calibrate(model, [m for m, _ in layers.values()], calibration)
        missed = [names[0] for key, (_, names) in layers.items()
                  if key not in stats or stats[key][1] == 0]
        if missed:
            raise ValueError(f"calibration gave no input rows to the layers {missed} (empty "
                             "batches, or batches that do not reach them): their fit and bits "
                             "would be chosen on another scale than the others'; pass them in "
                             "skip, or batches that run them")
        bad = [names[0] for key, (_, names) in layers.items()
               if not torch.isfinite(stats[key][0]).all()]
        if bad:
            raise ValueError(f"calibration inputs of the layers {bad} hold NaN or infinity")
    wanted = bit_choices if avg_bits is not None else (bits,)

    fits: list[dict[int, BCQWeight]] = []
    errs: list[dict[int, tuple[float, float | None, float]]] = []
    for key, (mod, _) in layers.items():
        W = mod.weight.detach().to(torch.float64).cpu()
        H = stats.get(key)
        f, e = {}, {}
        for b in wanted:
            if H is None:
                q = bcq_quantize(W, b, group_size, terms=terms)
            else:
                q = bcq_quantize_hessian(W, H[0], b, group_size, lam=weight_error, terms=terms)
            E = W - q.dequantize().double()
            w_err = (E.square().sum() / W.square().sum().clamp_min(1e-300)).item()
            o_err = out_abs = None
            if H is not None:
                out_abs = (E @ H[0] * E).sum().item()
                o_err = out_abs / max((W @ H[0] * W).sum().item(), 1e-300)
            f[b] = q
            # the allocation's error: output error per row with calibration, else weight error
            e[b] = (w_err, o_err, out_abs / H[1] if H is not None else E.square().sum().item())
        fits.append(f)
        errs.append(e)

    if avg_bits is not None:
        choice = allocate_bits([{b: v[2] for b, v in e.items()} for e in errs],
                               [m.weight.numel() for m, _ in layers.values()], avg_bits)
    else:
        choice = [bits] * len(fits)

    report, new_layers = [], [ShiftAddLinear.from_bcq(f[b], mod.bias, device=mod.weight.device)
                              for (mod, _), f, b in zip(layers.values(), fits, choice)]
    for (key, (mod, names)), new, e, b in zip(layers.items(), new_layers, errs, choice):
        for name in names:
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, new)
        report.append({"names": names, "in_features": mod.in_features,
                       "out_features": mod.out_features, "bits": b, "bytes": new.nbytes(),
                       "fp32_bytes": sum(p.numel() * 4 for p in mod.parameters()),
                       "weight_error": e[b][0], "output_error": e[b][1],
                       "calibrated": key in stats})
    model.shift_add_report = report
    return model
