"""The shift-add op's AVX2 shuffle kernels (tvm_lut_shuffle): fixed-point byte tables looked up
with vpshufb, against the float64 matmul with the dequantized weight; the packed-codes cache
(rebuilt when the codes change); ShiftAddLinear's direct call of them (bit for bit the op's)."""
import copy
import os
import pickle
from pathlib import Path

import pytest
import torch

import recurkit as rk
from recurkit.backends.tvm import lut as tvm_lut
from recurkit.backends.tvm import lut_shuffle as tvm_lut_shuffle
from recurkit.backends.tvm.lut import has_avx2, run_lut_tvm
from recurkit.backends.tvm.lut_shuffle import chunk_size, packed_codes
from recurkit.ir.tiled import bind_tiled, run_tiled, unpack_signs
from recurkit.lowering.lut import lower_lut
from test_shift_add import (_inputs, binary_no_planes, dense, draw, group_major_scaled,
                            plane_major, rel, signs_only)

pytestmark = pytest.mark.skipif(not has_avx2(), reason="the shuffle kernels need AVX2")
PLAN = lower_lut(rk.ops.shift_add.program)

# (G, E, O, Q, N): E = 8 (one chunk of 8), 24 (a chunk of 24), 136 (17 chunks of 8), 256 (two
# of 128); O x Q = 1, 10, 99: lanes padded to 32; 120 = 32 x 3.75; 15 and 17 samples
SHAPES = [(1, 8, 1, 1, 1), (3, 24, 5, 2, 4), (2, 136, 33, 3, 1), (2, 256, 40, 3, 3),
          (4, 128, 30, 4, 15), (1, 64, 8, 1, 17)]


def want(x, signs, alpha):
    return x.reshape(x.shape[0], -1).double() @ dense(signs, alpha).double().T


def call(x, codes, alpha, kernel="shuffle"):
    tc = bind_tiled(rk.ops.shift_add.program, (x, codes, alpha), {})
    return run_lut_tvm(PLAN, tc, kernel=kernel)


def test_chunk_size():
    assert [chunk_size(E) for E in (8, 24, 128, 136, 200, 256, 4096)] == \
        [8, 24, 128, 8, 40, 128, 128]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_shuffle_kernels_equal_the_dequantized_matmul(shape):
    G, E, O, Q, N = shape
    x, codes, alpha, signs = draw(*shape, seed=2)
    y = call(x, codes, alpha)
    assert y.shape == (N, O) and y.dtype == torch.float32
    assert rel(y, want(x, signs, alpha)) < 1e-5
    assert torch.equal(call(x, codes, alpha, "auto"), y)   # what auto takes on AVX2
    # half inputs: read as fp32, the output in the input's dtype
    for dtype in (torch.float16, torch.bfloat16):
        yh = call(x.to(dtype), codes, alpha)
        assert yh.dtype == dtype
        assert rel(yh, want(x.to(dtype).float(), signs, alpha)) < 1e-2


def test_auto_takes_the_dense_kernel_from_dense_from():
    n = tvm_lut.dense_from()
    assert n == tvm_lut.SHUFFLE_DENSE_FROM
    x, codes, alpha, _ = draw(2, 32, 9, 2, n, seed=8)
    assert torch.equal(call(x, codes, alpha, "auto"), call(x, codes, alpha, "dense"))
    assert torch.equal(call(x[:-1], codes, alpha, "auto"), call(x[:-1], codes, alpha))


def test_rows_of_any_scale_and_outliers():
    """The fixed point is per chunk of inputs: an outlier, a chunk of zeros, tiny and huge
    chunks all stay within 1e-5 of the float64 result (largest error over largest output)."""
    x, codes, alpha, signs = draw(4, 128, 64, 3, 3, seed=3)
    x[0, 0, 5] = 3e3              # one outlier 1000x the rest of its chunk
    x[0, 1] = 0                   # a chunk of zeros
    x[1] *= 1e-30                 # every chunk tiny: each is scaled on its own
    x[1, 2] *= 1e25
    x[2] *= 1e30                  # huge, still finite in fp32 after the sums
    y = call(x, codes, alpha)
    ref = want(x, signs, alpha)
    for n in range(3):
        assert rel(y[n], ref[n]) < 1e-5, n
    assert torch.equal(call(torch.zeros(1, 4, 128), codes, alpha), torch.zeros(1, 64))


@pytest.mark.parametrize("scale", [1e-33, 1e-36, 1e-40, 1e36], ids=str)
def test_chunks_at_the_ends_of_fp32(scale):
    """Chunks whose scale s leaves fp32's normal range (QMAX / max|x| overflows below ~6e-33;
    subnormal inputs; x * alpha near fp32's largest): the scales are applied in fp64."""
    x, codes, alpha, signs = draw(2, 64, 32, 2, 2, seed=11)
    x = (x.double() * scale).float()
    if scale > 1:
        alpha = alpha * 1e-3
    y = call(x, codes, alpha).double()
    ref = want(x, signs, alpha)
    assert ref.abs().max() > 0 and y.isfinite().all()
    assert ((y - ref).abs().max() / ref.abs().max()).item() < 1e-5


def test_non_finite_inputs_give_nan_not_numbers():
    x, codes, alpha, _ = draw(2, 64, 32, 2, 3, seed=4)
    x[0, 1, 3] = float("nan")
    x[1, 0, 0] = float("inf")
    y = call(x, codes, alpha)
    assert y[:2].isnan().all() and y[2].isfinite().all()


@pytest.mark.parametrize("decl", [binary_no_planes, plane_major, signs_only, group_major_scaled],
                         ids=lambda d: d.name)
def test_shuffle_kernels_on_other_declarations(decl):
    """Codes in any layout ([O, G, E], planes first), no planes, no groups, a scale over fewer
    dims than the codes: the packing reorders the codes once."""
    args = _inputs(decl, {"G": 3, "E": 40, "O": 7, "Q": 2}, N=2)
    tc = bind_tiled(decl.program, tuple(args), {})
    assert rel(run_lut_tvm(lower_lut(decl.program), tc, kernel="shuffle"), run_tiled(tc)) < 1e-5


def test_views_at_odd_offsets_and_strided_rows():
    x, codes, alpha, signs = draw(2, 64, 20, 3, 2, seed=5)
    y = call(x, codes, alpha)
    for off in (1, 3, 4, 16):
        cs = torch.zeros(codes.numel() + off, dtype=torch.uint8)[off:].view(codes.shape)
        al = torch.zeros(alpha.numel() + off)[off:].view(alpha.shape)
        xv = torch.zeros(2, 2, 64 + off)[..., off:]     # rows not contiguous
        xv.copy_(x)
        assert torch.equal(call(xv, cs.copy_(codes), al.copy_(alpha)), y)


def test_packed_codes_are_kept_and_rebuilt_when_the_codes_change():
    x, codes, alpha, signs = draw(2, 64, 16, 2, 1, seed=6)
    sizes = {"G": 2, "E": 64, "O": 16, "Q": 2}
    first = packed_codes(PLAN, codes, sizes)
    assert packed_codes(PLAN, codes, sizes) is first          # kept
    y = call(x, codes, alpha)
    codes[1, 3] ^= 0xA5                                        # changed in place
    signs = unpack(codes)
    assert packed_codes(PLAN, codes, sizes) is not first
    y2 = call(x, codes, alpha)
    assert not torch.equal(y, y2) and rel(y2, want(x, signs, alpha)) < 1e-5
    # two views of one buffer: packed apart
    buf = torch.cat([codes.flatten(), codes.flatten().flip(0)])
    a, b = buf[:codes.numel()].view(codes.shape), buf[codes.numel():].view(codes.shape)
    assert torch.equal(call(x, a, alpha), y2)
    assert rel(call(x, b, alpha), want(x, unpack(b), alpha)) < 1e-5
    with torch.inference_mode():                               # no version counter: packed
        ci = codes.clone()                                     # every call, still right
    assert torch.equal(call(x, ci, alpha), y2)


def unpack(codes):
    return unpack_signs(codes).float()


def _layer(seed=7, O=48, K=256, bits=3):
    torch.manual_seed(seed)
    return rk.nn.ShiftAddLinear.from_linear(torch.nn.Linear(K, O), bits, 128)


def test_layer_calls_the_kernels_directly_bit_for_bit_the_op():
    layer = _layer()
    x = torch.randn(3, 256)
    y = layer(x)
    assert layer._bound is not None                            # the direct call was taken
    xr = x.clone().requires_grad_()
    yo = layer(xr)                                             # a gradient: through the op
    assert yo.requires_grad and torch.equal(y, yo.detach())
    with torch.no_grad():
        assert torch.equal(layer(x.reshape(3, 1, 256)).reshape(3, -1), y)
    ref = x @ layer.dequantized_weight().T + layer.bias
    assert rel(y, ref) < 1e-5


def test_layer_rebinds_when_its_weights_change():
    layer, other = _layer(), _layer(seed=8)
    x = torch.randn(2, 256)

    def ref():
        return x @ layer.dequantized_weight().T + layer.bias
    y = layer(x)
    layer.codes.copy_(other.codes)                             # changed in place
    y2 = layer(x)
    assert not torch.equal(y, y2) and rel(y2, ref()) < 1e-5
    layer.alpha = other.alpha * 2                              # replaced
    assert rel(layer(x), ref()) < 1e-5
    layer.load_state_dict(other.state_dict())                  # in place, every buffer
    assert torch.equal(layer(x), other(x))


def test_layer_copies_and_pickles_after_a_call():
    layer = _layer()
    x = torch.randn(1, 256)
    y = layer(x)
    for twin in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert torch.equal(twin(x), y)


def test_layer_leaves_the_op_visible_to_dispatch_modes():
    from torch.utils._python_dispatch import TorchDispatchMode
    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))
    layer = _layer()
    x = torch.randn(1, 256)
    y = layer(x)
    with Record():
        y2 = layer(x)
    assert any("shift_add" in s for s in seen) and torch.equal(y, y2)


def test_layer_without_avx2_takes_the_op(monkeypatch):
    layer = _layer()
    x = torch.randn(2, 256)
    y = layer(x)
    monkeypatch.setattr(tvm_lut, "has_avx2", lambda: False)
    layer._bound = None
    assert rel(layer(x), y) < 1e-5 and layer._bound is None   # the byte tables, via the op
    with pytest.raises(ValueError, match="shuffle kernels need an AVX2 CPU"):
        call(x.reshape(2, 2, 128), layer.codes, layer.alpha)


def test_shuffle_source_matches_golden(two_threads):
    """The generated kernel, as rk.codegen shows it on an AVX2 CPU."""
    path = Path(__file__).parent / "golden" / "shift_add.shuffle.tvm.py.txt"
    sizes = {"G": 2, "E": 64, "O": 20, "Q": 2}
    text = rk.codegen(rk.ops.shift_add, "tvm", sizes=sizes)
    assert text == tvm_lut_shuffle.shuffle_source(PLAN, sizes)
    if os.environ.get("RECURKIT_UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text()


def test_swapped_memory_is_seen_and_uncounted_writes_can_be_forgotten():
    layer, other = _layer(), _layer(seed=9)
    x = torch.randn(2, 256)

    def ref():
        return x @ layer.dequantized_weight().T + layer.bias
    layer(x)
    layer.codes.data = other.codes.clone()          # same object and version, new memory
    assert rel(layer(x), ref()) < 1e-5
    layer.alpha.data = other.alpha.clone()
    assert rel(layer(x), ref()) < 1e-5
    layer.codes.data.copy_(_layer(seed=10).codes)   # not counted by torch: must be forgotten
    layer.forget_weights()
    assert rel(layer(x), ref()) < 1e-5


def test_layer_under_functorch_and_empty_batches():
    layer = _layer()
    x = torch.randn(5, 3, 256)
    want = torch.stack([layer(xi) for xi in x])
    assert rel(torch.vmap(layer)(x), want) < 1e-5           # through the op, not the kernel
    with pytest.raises(rk.CallError, match="is 0"):
        layer(torch.randn(0, 256))


def test_swapped_memory_replaces_the_packed_copy():
    x, codes, alpha, _ = draw(1, 64, 32, 2, 1, seed=12)
    sizes = {"G": 1, "E": 64, "O": 32, "Q": 2}
    for _ in range(3):
        packed_codes(PLAN, codes, sizes)
        codes.data = codes.clone()
    assert len(tvm_lut_shuffle._PACKED[codes]) == 1
