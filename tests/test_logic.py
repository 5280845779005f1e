"""Logic-gate networks: gate tables, the soft layer against a plain torch difflogic, hard
bit-packed inference equal to the eval-mode model, and a small net trained to high accuracy."""
import pytest
import torch
import torch.nn.functional as F

import recurkit as rk
from recurkit.lowering.packed import (GATE_COEFFS, PackedLayer, PackedNet,
                                      eval_packed_reference)
from recurkit.nn.logic import HardLogicNet

# the 16 relaxed gates as difflogic writes them, index = difflogic's gate number
RELAXED = [lambda a, b: torch.zeros_like(a), lambda a, b: a * b, lambda a, b: a - a * b,
           lambda a, b: a, lambda a, b: b - a * b, lambda a, b: b,
           lambda a, b: a + b - 2 * a * b, lambda a, b: a + b - a * b,
           lambda a, b: 1 - (a + b - a * b), lambda a, b: 1 - (a + b - 2 * a * b),
           lambda a, b: 1 - b, lambda a, b: 1 - b + a * b, lambda a, b: 1 - a,
           lambda a, b: 1 - a + a * b, lambda a, b: 1 - a * b, lambda a, b: torch.ones_like(a)]


def plain_layer(x, ia, ib, z, train=True):
    a, b = x[:, ia], x[:, ib]
    w = F.softmax(z, -1) if train else F.one_hot(z.argmax(-1), 16).to(x.dtype)
    return sum(w[:, g] * RELAXED[g](a, b) for g in range(16))


def test_gate_tables_match_truth_tables():
    for g in range(16):
        for a in (0, 1):
            for b in (0, 1):
                want = RELAXED[g](torch.tensor(float(a)), torch.tensor(float(b))).item()
                k = GATE_COEFFS[g]
                assert k[0] + k[1] * a + k[2] * b + k[3] * a * b == want


def test_unique_connections_use_every_input_once_per_neuron():
    ia, ib = rk.nn.connections(30, 20, "unique", torch.Generator().manual_seed(1))
    assert set(torch.cat([ia, ib]).tolist()) == set(range(30))
    assert not (ia == ib).any()
    with pytest.raises(ValueError, match="connections must be one of"):
        rk.nn.LogicLayer(4, 4, connections="ring")


@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
def test_soft_layer_matches_plain_difflogic(backend):
    torch.manual_seed(0)
    layer = rk.nn.LogicLayer(13, 50, "unique", backend=backend)
    x = torch.rand(37, 13, requires_grad=True)
    y = layer(x)
    x2 = x.detach().clone().requires_grad_(True)
    z = layer.weights.detach().clone().requires_grad_(True)
    want = plain_layer(x2, layer.ia, layer.ib, z)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-6)
    dy = torch.randn_like(y)
    gx, gz = torch.autograd.grad(y, [x, layer.weights], dy)
    wx, wz = torch.autograd.grad(want, [x2, z], dy)
    torch.testing.assert_close(gx, wx, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gz, wz, rtol=1e-4, atol=1e-5)
    layer.eval()
    torch.testing.assert_close(layer(x), plain_layer(x, layer.ia, layer.ib, z, train=False))


def test_gumbel_straight_through_runs_hard_gates_with_soft_gradients():
    torch.manual_seed(0)
    layer = rk.nn.LogicLayer(10, 30, gumbel_tau=0.5)
    x = (torch.rand(20, 10) < 0.5).float()
    y = layer(x)
    assert set(y.detach().unique().tolist()) <= {0.0, 1.0}   # hard gates on hard inputs
    y.sum().backward()
    assert layer.weights.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="gumbel_tau must be > 0"):
        rk.nn.LogicLayer(4, 4, gumbel_tau=0.0)


def random_model(widths, k, tau, seed=0):
    g = torch.Generator().manual_seed(seed)
    mods = [rk.nn.LogicLayer(a, b, generator=g) for a, b in zip(widths, widths[1:])]
    return torch.nn.Sequential(*mods, rk.nn.GroupSum(k, tau)).eval()


@pytest.mark.parametrize("backend", ["tvm", "triton", "torch"])
@pytest.mark.parametrize("N", [1, 63, 64, 65, 300, 1100])
def test_hard_inference_equals_eval_model(backend, N):
    model = random_model([20, 48, 36, 30], 3, tau=1.7)
    x = torch.rand(N, 20, generator=torch.Generator().manual_seed(N)) < 0.5
    with torch.no_grad():
        want = model(x.float())
    got = rk.nn.compile_hard(model, backend=backend, words=2)(x)
    assert got.dtype == torch.float32 and got.shape == (N, 3)
    assert torch.equal(got, want)


def test_hard_packed_reference_and_kernel_agree_on_a_wide_net():
    g = torch.Generator().manual_seed(3)
    layers, w = [], 100
    for O in (500, 500, 400):
        layers.append(PackedLayer(torch.randint(0, w, (O,), generator=g),
                                  torch.randint(0, w, (O,), generator=g),
                                  torch.randint(0, 16, (O,), generator=g)))
        w = O
    net = PackedNet(100, tuple(layers), 10, 1.0)
    x = torch.rand(777, 100, generator=g) < 0.5
    for words in (1, 8):
        assert torch.equal(HardLogicNet(net, "tvm", words).counts(x).long(),
                           eval_packed_reference(net, x))


def test_packing_kernel_matches_torch_packing():
    from recurkit.backends.tvm.packed import pack_bits
    from recurkit.lowering.packed import pack_bits_torch
    g = torch.Generator().manual_seed(5)
    for N, F, words in ((1, 3, 1), (300, 20, 4), (1000, 37, 8)):
        x = torch.rand(N, F, generator=g) < 0.5
        assert torch.equal(pack_bits(x, words), pack_bits_torch(x, words))


def test_compile_hard_errors():
    with pytest.raises(ValueError, match="followed by one GroupSum"):
        rk.nn.compile_hard(torch.nn.Sequential(rk.nn.LogicLayer(4, 4)))
    with pytest.raises(ValueError, match="multiple of"):
        rk.nn.compile_hard(random_model([4, 9], 2, 1.0))
    hard = rk.nn.compile_hard(random_model([4, 8], 2, 1.0))
    with pytest.raises(ValueError, match="expected a bool tensor"):
        hard(torch.rand(3, 4))
    with pytest.raises(ValueError, match=r"expected inputs \[N, 4\]"):
        hard(torch.rand(3, 5) < 0.5)


def test_small_net_learns_a_boolean_task():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)

    def data(n):
        x = torch.rand(n, 8, generator=g) < 0.5
        return x, ((x[:, 0] & x[:, 1]) | (x[:, 2] ^ x[:, 3])).long()
    model = torch.nn.Sequential(rk.nn.LogicLayer(8, 64, "unique"), rk.nn.LogicLayer(64, 64),
                                rk.nn.LogicLayer(64, 64), rk.nn.GroupSum(2, tau=4.0))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(300):
        x, y = data(128)
        loss = F.cross_entropy(model(x.float()), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    x, y = data(2000)
    acc = (rk.nn.compile_hard(model)(x).argmax(-1) == y).float().mean().item()
    assert acc >= 0.97, acc
