"""In-GPU segments of the Triton chunk forms (``backends/triton/segments.py``): the state pass
runs each sequence as runs of chunks in parallel, joined exactly. Run in Triton's interpreter
against the reference interpreter and the unsplit kernels, forward and backward, and the
traffic model of the segmented kernels against what the interpreter counts."""
import pytest
import torch

import recurkit as rk
from recurkit.backends.triton import segments as seg
from recurkit.backends.triton.chunk_module import model_traffic
from recurkit.backends.triton.runtime import check_config
from recurkit.backends.triton.traffic import count_traffic
from recurkit.ir.bind import bind_call, bind_meta
from test_custom_recurrences import draw
from cases import matrix_inputs
from test_lowering import decl_of, inputs, rel, state


@rk.recurrence
def v_first_two_gates(S: rk.State["V", "K"], q: rk.Token["K"], k: rk.Token["K"],
                      v: rk.Token["V"], gk: rk.Token["K"], gv: rk.Token["V"]):
    S = rk.exp(gv) * (rk.exp(gk) * S) + rk.outer(v, k)   # the state stored [V, K]
    return S, S @ q


@rk.recurrence
def keyed_erase(S: rk.State["K", "V"], q: rk.Token["K"], k: rk.Token["K"], v: rk.Token["V"],
                e: rk.Token["K"], gk: rk.Token["K"]):
    S = rk.exp(gk) * S
    S = S - rk.outer(e, e @ S) + rk.outer(k, v)   # erase along its own key, not the write's
    return S, q @ S


@rk.recurrence
def v_first_delta(S: rk.State["V", "K"], q: rk.Token["K"], k: rk.Token["K"],
                  v: rk.Token["V"], b: rk.Token[()], g: rk.Token[()]):
    S = rk.exp(g) * S
    S = S + rk.sigmoid(b) * rk.outer(v - S @ k, k)   # a delta rule, the state stored [V, K]
    return S, S @ q


def spy_joins(monkeypatch):
    """The local states every join was given (a list filled as calls run)."""
    seen = []
    real = seg.Joiner.__call__

    def spy(self, SL, *maps, **kw):
        seen.append((self.count, tuple(SL.shape)))
        return real(self, SL, *maps, **kw)
    monkeypatch.setattr(seg.Joiner, "__call__", spy)
    return seen


def run(decl, x, segments, chunk=16, **kw):
    return rk.compile(decl, backend="triton", chunk=chunk,
                      knobs={"segments": segments})(*x, **kw)


@pytest.mark.parametrize("T", [1, 63, 100])
@pytest.mark.parametrize("segments", [2, 3, 5])
@pytest.mark.parametrize("name", ["gla", "simple_gla", "linear_attn"])
def test_gated_forms_in_segments_match_the_reference(name, segments, T, monkeypatch):
    seen = spy_joins(monkeypatch)
    x = inputs(name, T, 2)
    kw = dict(initial_state=state(name, 2), output_final_state=True)
    o_ref, S_ref = rk.compile(decl_of(name), backend="reference")(*x, **kw)
    o, S = run(decl_of(name), x, segments, **kw)
    assert rel(o, o_ref) < 1e-5 and rel(S, S_ref) < 1e-5
    chunks = -(-T // 16)   # no more segments than the chunks of the longest sequence
    if min(segments, chunks) > 1:
        assert seen == [(min(segments, chunks), (2, 2, min(segments, chunks) - 1, 6, 5))]
    else:
        assert seen == []


def kv_inputs(name, T, B=2, **kw):
    """Inputs at K = V = 8 (a WY form's local kernel then makes M) and an initial state."""
    return matrix_inputs(name, B, T, 2, 8, 8, **kw), torch.randn(
        B, 2, 8, 8, generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("segments", [3, pytest.param(5, marks=pytest.mark.slow)])
@pytest.mark.parametrize("name", ["gated_delta_rule", *(pytest.param(
    n, marks=pytest.mark.slow) for n in ("kda", "dplr_delta_rule"))])
def test_wy_forms_in_segments_match_the_reference(name, segments, monkeypatch):
    """K = V: the local kernel carries each segment's product of transitions M beside the
    state; the host computes no map."""
    seen = spy_joins(monkeypatch)
    monkeypatch.setattr(seg, "maps", None)   # the host's maps: not called
    x, S0 = kv_inputs(name, 100)
    kw = dict(initial_state=S0, output_final_state=True)
    o_ref, S_ref = rk.compile(decl_of(name), backend="reference")(*x, **kw)
    o, S = run(decl_of(name), x, segments, **kw)
    assert rel(o, o_ref) < 1e-5 and rel(S, S_ref) < 1e-5
    assert [c for c, _ in seen] == [segments]


def test_wy_form_with_k_not_v_takes_its_maps_from_the_transition_declaration():
    """K != V: M is not the state's shape; the join's maps come from the transition
    declaration run over the segments as varlen pieces (``segment_maps``)."""
    x = inputs("gated_delta_rule", 60, 1)
    kw = dict(initial_state=state("gated_delta_rule", 1), output_final_state=True)
    o_ref, S_ref = rk.compile(decl_of("gated_delta_rule"), backend="reference")(*x, **kw)
    o, S = run(decl_of("gated_delta_rule"), x, 3, **kw)
    assert rel(o, o_ref) < 1e-5 and rel(S, S_ref) < 1e-5


@pytest.mark.parametrize("name", ["gla", pytest.param("gated_delta_rule",
                                                      marks=pytest.mark.slow)])
def test_varlen_segments_cross_nothing_and_skip_empty_sequences(name):
    lens = [1, 0, 70, 2, 45, 0]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    x, _ = kv_inputs(name, sum(lens), 1)
    S0 = torch.randn(len(lens), 2, 8, 8)
    kw = dict(initial_state=S0, output_final_state=True, cu_seqlens=cu)
    o_ref, S_ref = rk.compile(decl_of(name), backend="reference")(*x, **kw)
    o, S = run(decl_of(name), x, 4, **kw)
    assert rel(o, o_ref) < 1e-5 and rel(S, S_ref) < 1e-5


@pytest.mark.parametrize("gate", [(-69.0, -69.0), (-1e-6, -1e-6)],
                         ids=["decay1e-30", "decay1-1e-6"])
@pytest.mark.parametrize("name", ["gla", "gated_delta_rule"])
def test_extreme_gates_in_segments(name, gate):
    x, S0 = kv_inputs(name, 100, 1, gate=gate)
    kw = dict(initial_state=S0, output_final_state=True)
    o_ref, S_ref = rk.compile(decl_of(name), backend="reference")(*x, **kw)
    o, S = run(decl_of(name), x, 3, **kw)
    assert rel(o, o_ref) < 1e-5 and rel(S, S_ref) < 1e-5


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_low_precision_inputs_in_segments(dtype, tol):
    x = inputs("gla", 100, 2, dtype=dtype)
    o_ref, S_ref = rk.compile(decl_of("gla"), backend="reference")(*x, output_final_state=True)
    o1, S1 = run(decl_of("gla"), x, 1, output_final_state=True)
    o, S = run(decl_of("gla"), x, 4, output_final_state=True)
    assert o.dtype == dtype and S.dtype == torch.float32
    assert rel(o, o_ref) < tol and rel(S, S_ref) < tol
    # the join is fp32: the segmented state is as close to the unsplit one as fp32 goes
    assert rel(S, S1) < 1e-5 and rel(o, o1) < tol


@pytest.mark.parametrize("decl,form,V", [(v_first_two_gates, "chunk_gated", 5),
                                         pytest.param(keyed_erase, "chunk_wy", 6,
                                                      marks=pytest.mark.slow),
                                         (v_first_delta, "chunk_wy", 6)],
                         ids=lambda d: getattr(d, "name", str(d)))
def test_declarations_of_our_own_in_segments(decl, form, V):
    """A [V, K] state with gates on both sides (the maps' K and V parts, transposed), a WY
    form erasing along its own key with a per-key gate, and a delta rule stored [V, K] (the
    local kernel's M stored transposed)."""
    assert form in rk.analyze(decl).forms
    x = draw(decl, 70, sizes={"K": 6, "V": V})
    kw = dict(initial_state=torch.randn(2, 2, *(6 if d == "K" else V
                                                for d in decl.program.state.dims)),
              output_final_state=True)
    o_ref, S_ref = rk.compile(decl, backend="reference")(*x, **kw)
    o, S = run(decl, x, 4, **kw)
    assert rel(o, o_ref) < 1e-5 and rel(S, S_ref) < 1e-5


def grads(decl, x, kw, segments=None):
    """The output and final state, then the gradients of every input and the initial state:
    the reference's (segments None) or the Triton kernels' in ``segments``."""
    x = [t.detach().requires_grad_() for t in x]
    S0 = kw["initial_state"].detach().requires_grad_()
    kw = {**kw, "initial_state": S0}
    op = rk.compile(decl, backend="reference") if segments is None else \
        rk.compile(decl, backend="triton", chunk=16, knobs={"segments": segments})
    o, S = op(*x, **kw)
    gen = torch.Generator().manual_seed(1)
    w, w2 = (torch.randn(t.shape, generator=gen) for t in (o, S))
    return (o, S, *torch.autograd.grad((o * w).sum() + (S * w2).sum(), [*x, S0]))


@pytest.mark.parametrize("segments", [3, pytest.param(5, marks=pytest.mark.slow)])
def test_gradients_in_segments_match_the_reference(segments, monkeypatch):
    """The backward's two state passes (the states again, then the cotangent state from the
    end) run in segments too: the reverse one joined from the sequence's end."""
    seen = []
    real = seg.Joiner.__call__

    def spy(self, SL, *maps, reverse=False):
        seen.append(reverse)
        return real(self, SL, *maps, reverse=reverse)
    monkeypatch.setattr(seg.Joiner, "__call__", spy)
    x = inputs("gla", 70, 2)
    kw = dict(initial_state=state("gla", 2), output_final_state=True)
    got = grads(decl_of("gla"), x, kw, segments)
    assert all(rel(a, b) < 1e-5 for a, b in zip(got, grads(decl_of("gla"), x, kw)))
    assert seen == [False, False, True]   # the forward, the backward's two passes


@pytest.mark.parametrize("name", ["gated_delta_rule", pytest.param("kda",
                                                                   marks=pytest.mark.slow)])
def test_wy_gradients_in_segments_with_varlen(name):
    """A WY form's backward (K = V: each pass's kernel makes its segments' M) over varlen
    sequences, empty and length-1 ones included."""
    lens = [1, 0, 40, 2, 35, 0]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    x, _ = kv_inputs(name, sum(lens), 1)
    kw = dict(initial_state=torch.randn(len(lens), 2, 8, 8), output_final_state=True,
              cu_seqlens=cu)
    got = grads(decl_of(name), x, kw, 3)
    assert all(rel(a, b) < 1e-5 for a, b in zip(got, grads(decl_of(name), x, kw)))


def test_wy_backward_with_k_not_v_runs_whole():
    """K != V: the backward's kernels cannot make M, so its passes run unsplit (the forward
    still splits); the gradients are right either way."""
    x = inputs("gated_delta_rule", 50, 1)
    kw = dict(initial_state=state("gated_delta_rule", 1), output_final_state=True)
    got = grads(decl_of("gated_delta_rule"), x, kw, 3)
    want = grads(decl_of("gated_delta_rule"), x, kw)
    assert all(rel(a, b) < 1e-5 for a, b in zip(got, want))


def test_rotating_state_and_grouped_heads_in_segments():
    """Derived calls: a rotating state runs its frame's declaration in segments; grouped
    (GVA) q / k are read at h // G by the segmented kernels too."""
    from test_rotation import rot_gla
    x = draw(rot_gla, 80, B=1, H=2, sizes={"K": 6, "V": 5, "P": 3})
    o_ref, S_ref = rk.compile(rot_gla, backend="reference")(*x, output_final_state=True)
    o, S = run(rot_gla, x, 3, output_final_state=True)
    assert rel(o, o_ref) < 1e-5 and rel(S, S_ref) < 1e-5
    q, k, v, g = inputs("gla", 80, 1)
    q, k = q[:, :, :1], k[:, :, :1]   # one head group of the 2 heads
    o_ref, _ = rk.compile(decl_of("gla"), backend="reference")(q, k, v, g)
    assert rel(run(decl_of("gla"), (q, k, v, g), 3)[0], o_ref) < 1e-5


def test_segments_knob_is_checked_and_ignored_where_nothing_splits():
    with pytest.raises(ValueError, match="'segments' must be an int >= 1 or None"):
        rk.compile(rk.ops.gla, backend="triton", knobs={"segments": 0})
    with pytest.raises(ValueError, match="'segments'"):
        rk.compile(rk.ops.gla, backend="triton", knobs={"segments": 2.5})
    x = inputs("hgrn", 40, 1)   # a scan: a token loop, nothing to split
    o_ref, _ = rk.compile(decl_of("hgrn"), backend="reference")(*x)
    assert rel(run(decl_of("hgrn"), x, 4, chunk=None)[0], o_ref) < 1e-5


def test_sources_of_the_segmented_state_pass():
    src = rk.codegen(rk.ops.gla, "triton", sizes={"K": 64, "V": 64},
                     knobs={"segments": 4})
    assert "def state_pass_local_kernel(" in src and "def state_pass_kernel(" in src
    assert "join(env['_sl_state_pass'], env['_gk_state_pass'], None, None, " \
        "reverse=False)" in src
    assert "(N * 4 * 3, " in src and "(N * 4 * 4, " in src   # 3 local, 4 joined per head
    plain = rk.codegen(rk.ops.gla, "triton", sizes={"K": 64, "V": 64})
    assert "_local_kernel" not in plain and "join(" not in plain
    # what a call would run: an erase read across is never split, so neither is its source
    from test_read_across import value_erase
    src = rk.codegen(value_erase, "triton", sizes={"K": 8, "V": 8}, knobs={"segments": 4})
    assert "_local_kernel" not in src and "join(" not in src


@pytest.mark.parametrize("name,varlen,segments", [("gla", True, 3), ("gla", False, 4),
                                                  ("gated_delta_rule", False, 3)])
def test_model_of_the_segmented_kernels_matches_the_interpreter(name, varlen, segments):
    from test_traffic import _call
    decl = getattr(rk.ops, name).decl
    x, kw = _call(name, varlen)
    if not varlen:   # enough chunks for a join
        x = [torch.cat([t, t, t], 1) for t in x]
    cfg = {"segments": segments}
    op = rk.compile(decl, backend="triton", chunk=16, knobs=cfg)
    with count_traffic() as t:
        op(*x, **kw)
    model = model_traffic(op.tile_program, bind_call(decl.program, tuple(x), kw),
                          check_config(cfg))
    counted = [(k.name, k.read, k.written, k.flops) for k in t.launches if k.kind == "triton"]
    assert counted == [(k.name, k.read, k.written, k.flops) for k in model.launches
                       if k.kind == "triton"]
    names = [k.name for k in model.launches if k.kind == "triton"]
    assert names[-3:] == ["state_pass_local_kernel", "join_kernel", "state_pass_kernel"]


def _meta_call(name, B, T, H):
    decl = getattr(rk.ops, name).decl
    return rk.compile(decl, backend="triton").tile_program, bind_meta(
        decl.program, B, T, H, {"K": 128, "V": 128}, torch.bfloat16, output_final_state=True)


def test_the_model_says_when_segments_pay():
    """One long sequence of few heads: the state pass is a chain of T / C dependent steps
    on a few of the device's 132 multiprocessors; in segments it pays. A batch that fills
    the device: it does not, and the automatic choice keeps one segment."""
    tp, bc = _meta_call("gla", 1, 32768, 4)
    one = model_traffic(tp, bc, check_config({"segments": 1}))
    many = model_traffic(tp, bc, check_config({"segments": 16}))
    assert many.roofline("h100") < 0.5 * one.roofline("h100")
    assert max(x.serial for x in many.launches) * 8 <= max(x.serial for x in one.launches)
    assert seg.auto_count(tp, bc, check_config(None)) >= 8
    tp, bc = _meta_call("gla", 16, 4096, 32)
    assert seg.auto_count(tp, bc, check_config(None)) == 1
    assert model_traffic(tp, bc, check_config({"segments": 8})).roofline("h100") > \
        model_traffic(tp, bc, check_config({"segments": 1})).roofline("h100")


def test_the_autotuner_knows_segments():
    """The GPU tuning space has segment counts, and with no GPU here the autotuner ranks
    candidates by the modelled time, which prefers segments for a long single sequence."""
    from recurkit import backends
    from recurkit.autotune.space import config_space
    p = rk.ops.gated_delta_rule.decl.program
    space = config_space(p, "cuda", "quick")
    # the default candidate (no knobs: segments chosen per call) and counts 1 and 8
    assert {c.knob_dict.get("segments") for c in space if c.form == "chunk_wy"} == {None, 1, 8}
    tb = backends.get("triton")
    shape = {"B": 1, "T": 32768, "H": 4, "N": 1, "sizes": {"K": 128, "V": 128}}
    secs = {s: tb.model_seconds(p, "chunk_wy", 32, {"segments": s}, shape, "bfloat16", "h100")
            for s in (1, 16)}
    assert secs[16] < 0.5 * secs[1]


def test_model_of_the_segmented_backward_matches_the_interpreter():
    from recurkit.lowering.chunk_adjoint import lower_adjoint
    from test_traffic import _call
    decl = rk.ops.gla.decl
    x, kw = _call("gla", True)
    x = [t.detach().requires_grad_() for t in x]
    cfg = {"segments": 3}
    o, _ = rk.compile(decl, backend="triton", chunk=16, knobs=cfg)(*x, **kw)
    with count_traffic() as t:
        torch.autograd.grad(o.float().sum(), x)
    tp = lower_adjoint(decl.program, "chunk_gated", 16)
    model = model_traffic(tp, bind_call(decl.program, tuple(x), kw), check_config(cfg))
    counted = [(k.name, k.read, k.written, k.flops) for k in t.launches if k.kind == "triton"]
    assert counted == [(k.name, k.read, k.written, k.flops) for k in model.launches
                       if k.kind == "triton"]
    assert [k.name for k in model.launches].count("join_kernel") == 2
