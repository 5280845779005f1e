"""rk.nn.to_shift_add: whole-model conversion to ShiftAddLinear, weight-only and calibrated
(ShiftAddLLM's multi-objective), mixed bits by sensitivity, and the refusals."""
import copy
import itertools
import os
import sys

import pytest
import torch
from torch import nn

import recurkit as rk
from recurkit.nn.bcq import bcq_quantize, bcq_quantize_hessian, round_pow2
from recurkit.nn.convert import allocate_bits

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
import tiny_llama  # noqa: E402


class Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(64, 64)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(64, 128), nn.GELU(),
                                                  nn.Linear(128, 64)) for _ in range(2))
        self.heads = nn.ModuleDict({"a": nn.Linear(64, 32, bias=False), "b": nn.Linear(64, 8)})

    def forward(self, x):
        x = self.inp(x)
        for b in self.blocks:
            x = x + b(x)
        return torch.cat([self.heads["a"](x), self.heads["b"](x)], -1)


def linear_names(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear))


def shift_names(model):
    return sorted(n for n, m in model.named_modules()
                  if isinstance(m, rk.nn.ShiftAddLinear))


def dequantized_copy(model):
    """The converted model with each ShiftAddLinear as an nn.Linear of its dense weight."""
    ref = copy.deepcopy(model)
    for name, m in list(ref.named_modules()):
        if isinstance(m, rk.nn.ShiftAddLinear):
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            with torch.no_grad():
                lin.weight.copy_(m.dequantized_weight())
                if m.bias is not None:
                    lin.bias.copy_(m.bias)
            parent, _, attr = name.rpartition(".")
            setattr(ref.get_submodule(parent) if parent else ref, attr, lin)
    return ref


def test_every_linear_replaced_including_nested():
    torch.manual_seed(0)
    m = Nested()
    before = linear_names(m)
    out = rk.nn.to_shift_add(m, bits=2, group_size=32)
    assert out is m
    assert linear_names(m) == [] and shift_names(m) == before
    assert {r["bits"] for r in m.shift_add_report} == {2}
    assert len(m.shift_add_report) == len(before)


def test_skip_names_and_prefixes_are_kept():
    torch.manual_seed(0)
    m = Nested()
    rk.nn.to_shift_add(m, bits=3, group_size=32, skip=["inp", "blocks.1"])
    assert linear_names(m) == ["blocks.1.0", "blocks.1.2", "inp"]
    assert shift_names(m) == ["blocks.0.0", "blocks.0.2", "heads.a", "heads.b"]


def test_shared_linear_converts_once():
    torch.manual_seed(0)
    lin = nn.Linear(64, 64)
    m = nn.Sequential(lin, nn.ReLU(), lin)
    rk.nn.to_shift_add(m, bits=3, group_size=32, calibration=[torch.randn(16, 64)])
    assert isinstance(m[0], rk.nn.ShiftAddLinear) and m[0] is m[2]
    assert len(m.shift_add_report) == 1 and m.shift_add_report[0]["names"] == ["0", "2"]


@pytest.mark.parametrize("calibrated", [False, True])
def test_output_equals_the_dequantized_model(calibrated):
    torch.manual_seed(0)
    m = Nested()
    x = torch.randn(5, 64)
    cal = [torch.randn(32, 64)] if calibrated else None
    rk.nn.to_shift_add(m, bits=3, group_size=32, calibration=cal)
    with torch.no_grad():
        y, want = m(x), dequantized_copy(m)(x)
    assert y.dtype == torch.float32
    assert ((y - want).abs().max() / want.abs().max()).item() < 1e-5
    assert all(r["calibrated"] == calibrated for r in m.shift_add_report)


BAD = [({"bits": 5}, "bits must be"),
       ({"bits": 0}, "bits must be"),
       ({"group_size": 12}, "group_size"),
       ({"avg_bits": 4.5}, "avg_bits must be"),
       ({"avg_bits": 1.5}, "avg_bits must be"),
       ({"avg_bits": 2.5, "bit_choices": (2, 5)}, "bit_choices"),
       ({"skip": ["blocks.7"]}, "skip names \\['blocks.7'\\] match no module"),
       ({"group_size": 48}, "layer 'inp' has in_features 64.*skip=\\['inp'\\]"),
       ({"weight_error": 0}, "weight_error"),
       ({"calibration": [torch.randn(4, 3)]}, None)]   # the model's own error, mid-calibration


@pytest.mark.parametrize("kwargs,match", BAD, ids=lambda v: str(v)[:40])
def test_bad_arguments_leave_the_model_unchanged(kwargs, match):
    torch.manual_seed(0)
    m = Nested()
    state = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises((ValueError, RuntimeError), match=match):
        rk.nn.to_shift_add(m, **{"group_size": 32, **kwargs})
    assert shift_names(m) == [] and not hasattr(m, "shift_add_report")
    assert all(torch.equal(v, state[k]) for k, v in m.state_dict().items())
    for _, mod in m.named_modules():   # no hook left behind
        assert not mod._forward_hooks


def test_model_that_is_a_linear_is_refused():
    with pytest.raises(ValueError, match="from_linear"):
        rk.nn.to_shift_add(nn.Linear(64, 64), group_size=32)


def test_deepcopy_of_a_converted_model():
    torch.manual_seed(0)
    m = rk.nn.to_shift_add(Nested(), bits=2, group_size=32)
    c = copy.deepcopy(m)
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.equal(c(x), m(x))
    assert c.shift_add_report == m.shift_add_report


@pytest.fixture(scope="module")
def trained():
    """A small trained TinyLlama (the example's model), calibration and held-out batches."""
    torch.manual_seed(0)
    cfg = tiny_llama.Config(vocab=64, d=64, layers=1, heads=2, ffn=128, max_len=64)
    data = tiny_llama.MarkovData(vocab=64, fanout=3)
    model = tiny_llama.TinyLlama(cfg)
    tiny_llama.train(model, data, steps=60, B=16, T=32, lr=1e-2, log=None)
    g = torch.Generator().manual_seed(5)
    cal = [data.batch(8, 32, g) for _ in range(4)]
    held = [data.batch(8, 33, g) for _ in range(4)]
    return model.eval(), data, cal, held


def test_the_trained_example_model_learned(trained):
    model, data, _, held = trained
    loss = tiny_llama.heldout_loss(model, held)
    assert loss < 0.5 * tiny_llama.uniform_loss(data.vocab)


@pytest.mark.parametrize("bits", [2, 3])
def test_calibrated_has_lower_output_error_than_weight_only(trained, bits):
    model, _, cal, held = trained
    with torch.no_grad():
        ref = torch.cat([model(x) for x in held])

    def err(calibration):
        q = rk.nn.to_shift_add(copy.deepcopy(model), bits=bits, group_size=32,
                               calibration=calibration)
        with torch.no_grad():
            y = torch.cat([q(x) for x in held])
        return ((y - ref).norm() / ref.norm()).item(), q

    e_w, qw = err(None)
    e_c, qc = err(cal)
    assert e_c < 0.9 * e_w, (e_c, e_w)
    # and per layer on the calibration inputs, the fitted objective's output part
    assert len(qc.shift_add_report) == 8 and all(r["calibrated"] for r in qc.shift_add_report)


def weighted_avg(model):
    rep = model.shift_add_report
    return (sum(r["bits"] * r["in_features"] * r["out_features"] for r in rep)
            / sum(r["in_features"] * r["out_features"] for r in rep))


def parallel(n=4, scale=None):
    torch.manual_seed(0)
    m = nn.ModuleList(nn.Linear(64, 64) for _ in range(n))
    if scale is not None:
        with torch.no_grad():
            m[scale].weight.mul_(10)
    return m


@pytest.mark.parametrize("avg", [2.0, 2.25, 2.5, 3.0, 3.75, 4.0])
def test_avg_bits_hit_exactly_with_equal_layers(avg):
    m = rk.nn.to_shift_add(parallel(), group_size=32, avg_bits=avg)
    assert weighted_avg(m) == avg
    assert all(isinstance(x, rk.nn.ShiftAddLinear) and x.bits == r["bits"]
               for x, r in zip(m, m.shift_add_report))


@pytest.mark.parametrize("avg", [2.3, 2.6, 3.1])
def test_avg_bits_never_exceeded_and_as_near_as_sizes_allow(avg):
    m = rk.nn.to_shift_add(parallel(), group_size=32, avg_bits=avg)
    got = weighted_avg(m)
    assert got <= avg and avg - got < 0.25   # four equal layers: steps of 1/4


def test_avg_bits_with_calibration_on_the_example_model(trained):
    model, _, cal, _ = trained
    q = rk.nn.to_shift_add(copy.deepcopy(model), group_size=32, calibration=cal, avg_bits=2.5)
    got = weighted_avg(q)
    bits = {r["bits"] for r in q.shift_add_report}
    assert 2.4 < got <= 2.5 and len(bits) > 1


def test_a_more_sensitive_layer_gets_more_bits():
    m = rk.nn.to_shift_add(parallel(scale=2), group_size=32, avg_bits=2.5)
    bits = [x.bits for x in m]
    assert bits[2] == max(bits) and bits[2] > min(bits)
    # with calibration: the layer whose inputs are largest
    torch.manual_seed(0)

    class Par(nn.Module):
        def __init__(self):
            super().__init__()
            self.ls = nn.ModuleList(nn.Linear(64, 64) for _ in range(4))

        def forward(self, x):
            return [lin(x * (10 if i == 1 else 1)) for i, lin in enumerate(self.ls)]

    p = rk.nn.to_shift_add(Par(), group_size=32, avg_bits=2.5,
                           calibration=[torch.randn(64, 64)])
    bits = [x.bits for x in p.ls]
    assert bits[1] == max(bits) and bits[1] > min(bits)


def test_allocate_bits_is_the_exact_optimum():
    gen = torch.Generator().manual_seed(0)
    for _ in range(30):
        n = 4
        sizes = [int(s) for s in torch.randint(1, 5, (n,), generator=gen) * 64]
        errors = []
        for _ in range(n):
            e = sorted(torch.rand(3, generator=gen).tolist(), reverse=True)
            errors.append(dict(zip((2, 3, 4), e)))
        avg = 2 + 2 * torch.rand(1, generator=gen).item()
        got = allocate_bits(errors, sizes, avg)
        best = min((sum(e[b] for e, b in zip(errors, bs)), bs)
                   for bs in itertools.product((2, 3, 4), repeat=n)
                   if sum(s * b for s, b in zip(sizes, bs)) <= avg * sum(sizes) + 1e-9)
        assert sum(s * b for s, b in zip(sizes, got)) <= avg * sum(sizes) + 1e-9
        assert sum(e[b] for e, b in zip(errors, got)) == pytest.approx(best[0])


def test_hessian_quantizer_keeps_the_format_and_beats_weight_only_on_its_objective():
    torch.manual_seed(0)
    W = torch.randn(32, 128)
    X = torch.randn(512, 128) * torch.exp(torch.randn(128))   # anisotropic inputs
    H = X.double().T @ X.double()
    q = bcq_quantize_hessian(W, H, 3, 64)
    w = bcq_quantize(W, 3, 64)
    assert q.codes.shape == (3, 32, 128) and set(q.codes.unique().tolist()) == {-1, 1}
    assert q.alpha.shape == (3, 32, 2)
    # alphas are sums of two signed powers of two: rounding them again changes nothing
    assert torch.equal(round_pow2(q.alpha.double(), 2), q.alpha.double())

    def out_err(qq):
        E = (W - qq.dequantize()).double()
        return (E @ H * E).sum().item()

    assert out_err(q) < 0.9 * out_err(w)


class WithAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.att = nn.MultiheadAttention(16, 2)
        self.norm = nn.BatchNorm1d(16)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(16, 16)
        self.unused = nn.Linear(16, 16)

    def forward(self, x):
        x = self.att(x, x, x)[0]
        return self.fc(self.drop(self.norm(x.reshape(-1, 16)))).reshape(x.shape)


def test_linear_subclasses_and_unreached_layers_are_refused():
    """MultiheadAttention reads out_proj.weight itself: converting it would break the model;
    a layer calibration never reaches would be fitted and scored on another scale."""
    torch.manual_seed(0)
    m = WithAttention()
    x = torch.randn(5, 3, 16)
    with pytest.raises(ValueError, match="'att.out_proj' is a NonDynamicallyQuantizableLinear"):
        rk.nn.to_shift_add(m, bits=3, group_size=8, skip=["unused"])
    with pytest.raises(ValueError, match="no input rows to the layers \\['unused'\\]"):
        rk.nn.to_shift_add(m, bits=3, group_size=8, calibration=[x], skip=["att.out_proj"])
    assert linear_names(m) == ["att.out_proj", "fc", "unused"]   # unchanged
    m.train()
    stats = m.norm.running_mean.clone()
    rk.nn.to_shift_add(m, bits=3, group_size=8, calibration=[x],
                       skip=["att.out_proj", "unused"])
    assert shift_names(m) == ["fc"] and m.training and m.drop.training
    assert torch.equal(m.norm.running_mean, stats)   # calibration ran in eval mode
    m.eval()
    assert m(x).shape == x.shape


def test_greedy_allocation_spends_no_bits_that_do_not_help():
    errors = [{2: 1.0, 3: 1.0, 4: 1.0}, {2: 5.0, 3: 1.0, 4: 0.5}] * 400   # too big to be exact
    bits = allocate_bits(errors, [1, 1] * 400, 3.5)   # room for more: none helps
    assert bits[0::2] == [2] * 400 and bits[1::2] == [4] * 400
