"""rk.nn layers: shapes, gradients to every parameter, and the recall example learning."""
import sys
from pathlib import Path

import pytest
import torch

import recurkit as rk

sys.path.insert(0, str(Path(__file__).parent.parent / "examples"))


@pytest.mark.parametrize("cls", [rk.nn.GatedDeltaNet, rk.nn.GLA, rk.nn.KDA])
def test_layer_shapes_and_gradients(cls):
    torch.manual_seed(0)
    layer = cls(32, num_heads=4)
    x = torch.randn(2, 13, 32, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape
    y.square().mean().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert x.grad.abs().sum() > 0


def test_layer_is_causal():
    torch.manual_seed(0)
    layer = rk.nn.GatedDeltaNet(16, num_heads=2)
    x = torch.randn(1, 10, 16)
    x2 = x.clone()
    x2[:, 6:] = torch.randn(1, 4, 16)   # the future changes
    assert torch.allclose(layer(x)[:, :6], layer(x2)[:, :6], atol=1e-6)


def test_bad_head_split_is_refused():
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        rk.nn.GLA(30, num_heads=4)


@pytest.mark.parametrize("layer,steps", [("gdn", 120), ("kda", 120)])
def test_recall_example_learns(layer, steps):
    from recall import train
    hist = train(layer, steps=steps, log_every=steps // 2, verbose=False)
    (_, loss0, _), (_, loss1, acc1) = hist[0], hist[-1]
    assert loss1 < 0.75 * loss0, hist
    assert acc1 > 3 / 16, hist      # chance is 1/16
