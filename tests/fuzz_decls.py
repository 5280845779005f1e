"""Random valid declarations for differential fuzzing (``test_fuzz.py``): a hypothesis strategy
that writes the source of an ``@rk.recurrence`` from the vocabulary the analysis knows
(scalar / per-key / per-value decays, rank-1 erases along either dim, up to three per
step, outer-product and rank-R writes, gated
readouts with skips, token-only prologues) and from what it does not (several erases, steps
nonlinear in the state; rotations of the state along either dim, anywhere in the step,
a per-pair gate, RoPE on the query), and traces it. Inputs are drawn by name: ``g*`` log-decays, ``k*``
unit keys, ``b*`` betas in (0, 1)."""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from hypothesis import strategies as st

import recurkit as rk

SIZES = {"K": 4, "V": 3, "D": 5, "R": 2}
PAIRS = {"P": "K", "Q": "V", "E": "D"}   # the angles' pair dims: half the rotated dim
_COUNT = itertools.count()


@st.composite
def matrix_step(draw) -> str:
    """The body of a [K, V]-state step; the inputs it reads are declared from their names."""
    lines, out = [], []
    decay = draw(st.sampled_from(["", "scalar", "key", "value", "both"]))
    if decay in ("scalar",):
        lines.append("S = rk.exp(g) * S")
    elif decay == "key":
        lines.append("S = rk.exp(gk) * S")
    elif decay == "value":
        lines.append("S = rk.exp(gv) * S")
    elif decay == "both":
        lines.append("S = rk.exp(gk) * (rk.exp(gv) * S)")
    layout = draw(st.sampled_from(["interleaved", "halves"]))
    if decay == "" and draw(st.integers(0, 5)) == 0:   # a complex gate per pair (GateLoop)
        lines.append(f"S = rk.exp(rk.pairs(gp, 'P', 'K', layout={layout!r})) * S")
    erases = draw(st.sampled_from([0, 0, 1, 1, 1, 2, 2, 3])) if decay in ("", "scalar", "key") \
        else 0
    if erases and draw(st.booleans()):
        lines.append("k1 = rk.l2norm(k1)")   # a token-only prologue
    for e in range(erases):   # a delta-rule update: erase along the key, write the new value
        key = ("k1", "k2", "k1")[e]
        if e == 2 and draw(st.booleans()):   # an erase along another key than the write's
            lines.append("S = S - 0.5 * rk.outer(k2, k2 @ S) + rk.outer(k1, v1)")
        else:
            lines.append(f"S = S + rk.sigmoid(b{e + 1}) * rk.outer({key}, v{e + 1} - {key} @ S)")
        if e == 0 and erases > 1 and draw(st.integers(0, 3)) == 0:
            lines.append("S = S + kt @ vt")      # a rank-R write between the updates
    writes = draw(st.integers(0 if erases else 1, 2))
    for w in range(writes):
        if w == 0 and draw(st.integers(0, 3)) == 0:
            lines.append("S = S + kt @ vt")      # a rank-R write
        else:
            lines.append(f"S = S {draw(st.sampled_from('+-'))} rk.outer(ka{w}, va{w})")
    if draw(st.integers(0, 3)) == 0:   # a rotation of the state, anywhere in the step
        turn = draw(st.sampled_from([f"rk.rotate(S, th, 'K', layout={layout!r})",
                                     "rk.rotate(S, ts, 'K')", "rk.rotate(S, tq, 'V')"]))
        lines.insert(draw(st.integers(0, len(lines))), f"S = {turn}")
    if draw(st.integers(0, 5)) == 0 and decay in ("", "scalar", "key") and not erases:
        # an erase along the value dim, read along it too (the transposed delta rule)
        lines.append("S = S - rk.sigmoid(b1) * rk.outer(S @ w, w)")
        return "\n    ".join(lines + ["return S, S @ p"])
    read = "q @ S" if draw(st.integers(0, 5)) else "rk.rotate(q, th, 'K') @ S"   # RoPE
    if draw(st.booleans()):
        read = f"rk.silu(z) * ({read})"
    if draw(st.booleans()):
        read = f"{read} + va0" if writes else f"{read} + v1"
    if draw(st.booleans()):
        read = f"0.5 * ({read})"
    out.append(read)
    return "\n    ".join(lines + [f"return S, {out[0]}"])


@st.composite
def vector_step(draw) -> str:
    """The body of a [D]-state step: elementwise (any gate sign), or nonlinear in the state."""
    kind = draw(st.sampled_from(["scalar", "channel", "signed", "nonlinear", "complex"]))
    body = {"complex": "h = rk.exp(g) * rk.rotate(h, te) + x",   # a complex diagonal state
            "scalar": "h = rk.exp(g) * h + x",
            "channel": "h = rk.sigmoid(a) * h + (1.0 - rk.sigmoid(a)) * x",
            "signed": "h = rk.tanh(a) * h + x",
            "nonlinear": "h = rk.tanh(h * rk.sigmoid(a) + x)"}[kind]
    read = draw(st.sampled_from(["h", "h * h", "rk.silu(x) * h"]))
    return f"{body}\n    return h, {read}"


DIMS = {"S": ("K", "V"), "h": ("D",), "q": ("K",), "k1": ("K",), "k2": ("K",), "g": (),
        "gk": ("K",), "gv": ("V",), "b1": (), "b2": (), "b3": (), "v1": ("V",), "v3": ("V",), "w": ("V",), "p": ("V",), "v2": ("V",),
        "ka0": ("K",), "ka1": ("K",), "va0": ("V",), "va1": ("V",), "kt": ("K", "R"),
        "vt": ("R", "V"), "z": ("V",), "x": ("D",), "a": ("D",),
        "gp": ("P",), "th": ("P",), "ts": (), "tq": ("Q",), "te": ("E",)}


def declaration(body: str):
    """Trace the step ``body`` as a declaration reading every input it names."""
    state = "S" if "return S" in body else "h"
    names = [n for n in DIMS if n != state and _reads(body, n)]
    ann = lambda n, kind: f"rk.{kind}[{', '.join(repr(d) for d in DIMS[n]) or '()'}]"  # noqa: E731
    params = [f"{state}: {ann(state, 'State')}"] + [f"{n}: {ann(n, 'Token')}" for n in names]
    name = f"fuzz_{next(_COUNT)}"
    src = f"def {name}({', '.join(params)}):\n    {body}\n"
    env = {"rk": rk}
    exec(compile(src, f"<{name}>", "exec"), env)   # noqa: S102 - our own generated source
    return rk.recurrence(env[name]), src


def _reads(body: str, name: str) -> bool:
    import re
    return re.search(rf"\b{name}\b", body) is not None


sizes = st.fixed_dictionaries({"K": st.integers(1, 9), "V": st.integers(1, 9),
                               "D": st.integers(1, 9), "R": st.integers(1, 4)})


KEY_SIDE = ("q", "k1", "k2", "ka0", "ka1", "kt")


def paired(decl, sizes: dict) -> dict:
    """``sizes`` with every dim the declaration rotates in pairs even, and its pair dim half."""
    out = dict(sizes)
    used = {n.attr("dim") for n in decl.program.nodes() if n.op in ("rotate", "pairs")}
    for pair, d in PAIRS.items():
        if d in used:
            out[d] = 2 * max(1, (out[d] + 1) // 2)
        out[pair] = out[d] // 2 if out[d] > 1 else 1
    return out


def inputs(decl, T: int, B: int = 1, H: int = 2, seed: int = 0, sizes: dict | None = None,
           grouped: bool = False) -> dict[str, torch.Tensor]:
    """``grouped``: the key-side inputs with H / 2 heads (grouped heads, as FLA's GVA), where
    some other input keeps H."""
    gen = torch.Generator().manual_seed(seed)
    sizes = sizes or SIZES
    names = [s.name for s in decl.program.call_inputs]
    grouped = grouped and H % 2 == 0 and any(n not in KEY_SIDE for n in names) and \
        any(n in KEY_SIDE for n in names)
    out = {}
    for spec in decl.program.call_inputs:
        h = H // 2 if grouped and spec.name in KEY_SIDE else H
        shape = (B, T, h) + tuple(sizes[d] for d in spec.dims)
        x = torch.randn(*shape, generator=gen)
        if spec.name.startswith("g"):
            x = -0.05 - 0.5 * torch.rand(*shape, generator=gen)
        elif (spec.name.startswith("k") and spec.dims == ("K",)) or spec.name == "w":
            x = F.normalize(x, dim=-1)
        elif spec.name in ("kt", "vt"):
            x = x * 0.5
        out[spec.name] = x
    return out
