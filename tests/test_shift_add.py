"""Shift-add matmul (issue 8): rk.Bits codes, the LUT form matched from the IR, its TVM and
Triton (interpreter) kernels against the matmul with the dequantized weight, gradients,
the custom op, ShiftAddLinear, and the refusals."""
import pytest
import torch

import recurkit as rk
from recurkit.backends.torch.lut import run_lut_torch
from recurkit.backends.triton.lut import run_lut_triton
from recurkit.backends.tvm import lut as tvm_lut
from recurkit.backends.tvm import lut_dense as tvm_lut_dense
from recurkit.backends.tvm.lut import has_avx2, run_lut_tvm
from recurkit.ir.tiled import bind_tiled, pack_signs, run_tiled, unpack_signs
from recurkit.lowering.lut import lower_lut

RUNNERS = {"tvm": run_lut_tvm, "torch": run_lut_torch,
           "triton-dot": lambda plan, tc: run_lut_triton(plan, tc, kernel="dot"),
           # a budget of 2 programs: the groups split into slices, partial sums added
           "triton-dot-sliced": lambda plan, tc: run_lut_triton(plan, tc, kernel="dot",
                                                                programs=2),
           # tiny blocks and program budget: several output blocks, byte blocks and group
           # slices (partial sums added on the host) at the test shapes
           "triton-lut": lambda plan, tc: run_lut_triton(plan, tc, kernel="lut", lut_block_o=16,
                                                         lut_block_b=4, lut_programs=8)}


def rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def draw(G, E, O, Q, N, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, G, E, generator=gen).to(dtype)
    signs = torch.randint(0, 2, (G, O, Q, E), generator=gen).float() * 2 - 1
    alpha = torch.rand(G, O, Q, generator=gen) + 0.1
    return x, pack_signs(signs), alpha, signs


def dense(signs, alpha):
    """W [O, G*E] = sum_q alpha * signs: the dequantized weight."""
    G, O, Q, E = signs.shape
    return torch.einsum("goq,goqe->oge", alpha, signs).reshape(O, G * E)


# (G, E, O, Q, N): E = 24 is no power of two (Triton masks the tail of its
# position blocks); O = 1, 33, 70 leave partial blocks of outputs
SHAPES = [(1, 8, 1, 1, 1), (3, 16, 5, 2, 4), (2, 64, 33, 3, 1), (2, 128, 70, 4, 3),
          (1, 24, 7, 2, 17)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("backend", list(RUNNERS))
def test_kernels_equal_the_dequantized_matmul(backend, shape):
    G, E, O, Q, N = shape
    x, codes, alpha, signs = draw(*shape)
    plan = lower_lut(rk.ops.shift_add.program)
    y = RUNNERS[backend](plan, bind_tiled(rk.ops.shift_add.program, (x, codes, alpha), {}))
    want = x.reshape(N, -1) @ dense(signs, alpha).T
    assert y.shape == (N, O) and y.dtype == torch.float32
    assert rel(y, want) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["tvm", "triton-dot", "triton-lut"])
def test_half_inputs_are_read_and_computed_in_fp32(backend, dtype):
    x, codes, alpha, signs = draw(2, 64, 9, 3, 2, dtype=dtype)
    plan = lower_lut(rk.ops.shift_add.program)
    y = RUNNERS[backend](plan, bind_tiled(rk.ops.shift_add.program, (x, codes, alpha), {}))
    want = x.float().reshape(2, -1) @ dense(signs, alpha).T
    assert y.dtype == dtype
    assert rel(y, want) < 1e-2   # the output's rounding to the dtype


def test_reference_interpreter_agrees():
    x, codes, alpha, signs = draw(3, 16, 5, 2, 4)
    y = run_tiled(bind_tiled(rk.ops.shift_add.program, (x, codes, alpha), {}))
    assert rel(y, x.reshape(4, -1) @ dense(signs, alpha).T) < 1e-6


def test_pack_and_unpack_signs_round_trip():
    s = torch.randint(0, 2, (3, 5, 24)).float() * 2 - 1
    packed = pack_signs(s)
    assert packed.shape == (3, 5, 3) and packed.dtype == torch.uint8
    assert torch.equal(unpack_signs(packed), s)
    assert int(pack_signs(torch.tensor([1., -1, -1, -1, -1, -1, -1, 1]))[0]) == 0b10000001
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_signs(torch.ones(2, 12))


@pytest.mark.parametrize("backend", ["tvm", "torch"])
def test_compiled_op_gradients_match_autograd_through_the_reference(backend):
    op = rk.compile(rk.ops.shift_add, backend=backend)
    x, codes, alpha, _ = draw(2, 16, 6, 3, 5)
    got, want = [], []
    dy = torch.randn(5, 6)
    for fn, out in ((op, got), (None, want)):
        xl, al = x.clone().requires_grad_(), alpha.clone().requires_grad_()
        if fn is None:
            y = run_tiled(bind_tiled(rk.ops.shift_add.program, (xl, codes, al), {}))
        else:
            y = fn(xl, codes, al)
        y.backward(dy)
        out += [xl.grad, al.grad]
    for g, w in zip(got, want):
        assert rel(g, w) < 1e-5


def test_custom_op_passes_opcheck_and_compiles_fullgraph():
    op = rk.compile(rk.ops.shift_add)
    x, codes, alpha, _ = draw(2, 16, 6, 2, 3)
    torch.library.opcheck(op.op.default, (x, codes, alpha))
    layer = torch.nn.Linear(64, 10)
    model = torch.nn.Sequential(rk.nn.ShiftAddLinear.from_linear(layer, bits=2, group_size=32),
                                torch.nn.ReLU(), torch.nn.Linear(10, 3))
    xin = torch.randn(4, 64, requires_grad=True)
    compiled = torch.compile(model, fullgraph=True)   # a graph break would raise here
    torch.testing.assert_close(compiled(xin), model(xin))
    compiled(xin).square().sum().backward()
    assert xin.grad is not None and xin.grad.abs().sum() > 0


def test_shift_add_linear_from_linear():
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 45)
    x = torch.randn(2, 3, 256)
    errs = []
    for bits in (2, 3, 4):
        m = rk.nn.ShiftAddLinear.from_linear(lin, bits=bits, group_size=64)
        W = m.dequantized_weight()
        y = m(x)
        assert y.shape == (2, 3, 45)
        assert rel(y, x @ W.T + lin.bias) < 1e-5           # the kernel is exact for its W
        errs.append((W - lin.weight).norm().item() / lin.weight.norm().item())
        assert m.nbytes() == 45 * 256 * bits // 8 + 4 * 45 * 4 * bits + 4 * 45
    assert errs[0] > errs[1] > errs[2]                       # error falls as bits rise
    assert m(x.half()).dtype == torch.float16


def test_shift_add_linear_errors():
    with pytest.raises(ValueError, match="not a multiple of group_size"):
        rk.nn.ShiftAddLinear.from_linear(torch.nn.Linear(100, 4), group_size=64)
    with pytest.raises(ValueError, match="2-D weight"):
        rk.nn.ShiftAddLinear.from_linear(torch.randn(4, 64, 2), group_size=64)
    with pytest.raises(ValueError, match="float weight"):
        rk.nn.ShiftAddLinear.from_linear(torch.ones(4, 64, dtype=torch.int32), group_size=64)
    m = rk.nn.ShiftAddLinear.from_linear(torch.nn.Linear(64, 4), bits=2, group_size=32)
    with pytest.raises(ValueError, match=r"expects inputs \[\.\.\., 64\]"):
        m(torch.randn(3, 63))


def test_op_call_errors_name_the_argument():
    op = rk.compile(rk.ops.shift_add)
    x, codes, alpha, _ = draw(2, 16, 6, 2, 3)
    with pytest.raises(rk.CallError, match="'codes'.*uint8.*int8"):
        op(x, codes.to(torch.int8), alpha)
    with pytest.raises(rk.CallError, match="'codes': dim E"):
        op(x, codes[..., :1], alpha)
    with pytest.raises(rk.CallError, match="'x'.*float32"):
        op(x.int(), codes, alpha)


@rk.tiled
def binary_no_planes(x: rk.Row["G", "E"], codes: rk.Bits["O", "G", "E"],
                     s: rk.Weight["O", "G"]):
    return rk.sum(s * rk.sum(codes * x, "E"), "G")


@rk.tiled
def plane_major(x: rk.Row["G", "E"], codes: rk.Bits["Q", "O", "G", "E"],
                alpha: rk.Weight["Q", "O", "G"], gain: rk.Weight["O"], tau: rk.Scalar = 2.0):
    return rk.sum(alpha * gain / tau * rk.sum(codes * x, "E"), ("Q", "G"))


@rk.tiled
def signs_only(x: rk.Row["E"], codes: rk.Bits["O", "E"]):
    return rk.sum(codes * x, "E")


def _inputs(decl, sizes, N=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for spec in decl.program.call_inputs:
        if spec.role == "scalar":
            continue
        shape = [sizes[d] for d in spec.dims]
        if spec.role == "row":
            out.append(torch.randn(N, *shape, generator=gen))
        elif spec.role == "bits":
            out.append(pack_signs(torch.randn(*shape, generator=gen)))
        else:
            out.append(torch.rand(*shape, generator=gen) + 0.1)
    return out


@pytest.mark.parametrize("decl", [binary_no_planes, plane_major, signs_only],
                         ids=lambda d: d.name)
@pytest.mark.parametrize("backend", list(RUNNERS))
def test_other_declarations_lower_to_the_lut_form(decl, backend):
    """Other layouts, no planes, no groups, a scale expression of weights and a scalar:
    matched from the IR, no per-op code."""
    sizes = {"G": 2, "E": 16, "O": 5, "Q": 3}
    args = _inputs(decl, sizes)
    plan = lower_lut(decl.program)
    tc = bind_tiled(decl.program, tuple(args), {})
    got = RUNNERS[backend](plan, tc)
    assert rel(got, run_tiled(tc)) < 1e-5
    # the custom op's gradients too
    op = rk.compile(decl, backend="torch")
    leaves = [a.clone().requires_grad_() if a.is_floating_point() else a for a in args]
    op(*leaves).square().sum().backward()
    ref = [a.clone().requires_grad_() if a.is_floating_point() else a for a in args]
    run_tiled(bind_tiled(decl.program, tuple(ref), {})).square().sum().backward()
    for a, b in zip(leaves, ref):
        if a.is_floating_point():
            assert rel(a.grad, b.grad) < 1e-5


def test_declarations_outside_the_lut_form_are_refused():
    @rk.tiled
    def codes_times_weight(x: rk.Row["E"], codes: rk.Bits["O", "E"], w: rk.Weight["O", "E"]):
        return rk.sum(codes * w, "E") + rk.sum(x, "E")

    @rk.tiled
    def packed_elsewhere(x: rk.Row["G"], codes: rk.Bits["O", "G", "E"]):
        return rk.sum(rk.sum(codes * x, "E"), "G")

    @rk.tiled
    def keeps_the_plane(x: rk.Row["E"], codes: rk.Bits["O", "Q", "E"]):
        return rk.sum(codes * x, "E")

    @rk.tiled
    def scale_reads_the_row(x: rk.Row["E"], y: rk.Row["O"], codes: rk.Bits["O", "E"]):
        return y * rk.sum(codes * x, "E")

    for decl, match in ((codes_times_weight, "must contract them with a row"),
                        (packed_elsewhere, "lacks the packed dim 'E'"),
                        (keeps_the_plane, "one output dim"),
                        (scale_reads_the_row, "the scale reads row 'y'")):
        with pytest.raises(rk.LoweringError, match=match):
            lower_lut(decl.program)
        with pytest.raises(rk.LoweringError, match=match):
            rk.compile(decl)


def test_bits_annotation_is_refused_in_recurrences():
    with pytest.raises(rk.DeclarationError, match="rk.Bits"):
        @rk.recurrence
        def bad(S: rk.State["K"], k: rk.Token["K"], c: rk.Bits["K"]):
            return S + k, S


def test_lut_sources_match_golden(two_threads, monkeypatch):
    """The generated TVM table and look-up kernels (what codegen shows without AVX2), and the
    printed plan."""
    import os
    from pathlib import Path
    monkeypatch.setattr(tvm_lut, "has_avx2", lambda: False)
    path = Path(__file__).parent / "golden" / "shift_add.lut.tvm.py.txt"
    text = str(lower_lut(rk.ops.shift_add.program)) + "\n\n" + rk.codegen(
        rk.ops.shift_add, "tvm", sizes={"G": 2, "E": 64, "O": 6, "Q": 2})
    if os.environ.get("RECURKIT_UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text()


@pytest.mark.parametrize("kernel", ["dot", "tables", "lookup"])
@pytest.mark.parametrize("arch", ["sm_80", "sm_90", "gfx942"])
def test_triton_kernels_compile_ahead_of_time_without_spills(arch, kernel):
    from recurkit.backends.triton.lut import aot_report
    # at the runner's default blocks
    r = aot_report(arch, kernel, block_o=128 if kernel == "lookup" else 32,
                   block_b=8 if kernel == "lookup" else 16)
    assert r["spill_bytes"] in (0, None), r


def test_triton_runner_refuses_an_unknown_kernel():
    x, codes, alpha, _ = draw(1, 8, 2, 1, 1)
    tc = bind_tiled(rk.ops.shift_add.program, (x, codes, alpha), {})
    with pytest.raises(ValueError, match="'lut' or 'dot'"):
        run_lut_triton(lower_lut(rk.ops.shift_add.program), tc, kernel="gather")


def test_bits_inputs_round_trip_through_json():
    from recurkit.ir import Program
    p = rk.ops.shift_add.program
    q = Program.from_json(p.to_json())
    assert [s.role for s in q.inputs] == ["row", "bits", "weight"]
    assert q.content_hash() == p.content_hash()
    assert q.inputs[1].layout() == "[G, O, Q, E // 8]"


def test_bits_without_dims_are_refused():
    with pytest.raises(TypeError, match="needs at least one dim"):
        rk.Bits[()]


# the AVX2 permute kernels (tvm.lut.perm_*): packed sizes 32..256, outputs x planes a
# multiple of 8 (O = 40, Q = 3: lane blocks straddle outputs), one to 17 samples
PERM_SHAPES = [(1, 32, 8, 1, 1), (2, 64, 4, 2, 3), (3, 128, 40, 3, 1), (2, 256, 8, 4, 5),
               (1, 128, 16, 2, 17)]
needs_avx2 = pytest.mark.skipif(not has_avx2(), reason="the permute kernels need AVX2")


@needs_avx2
@pytest.mark.parametrize("shape", PERM_SHAPES, ids=str)
def test_permute_kernels_equal_the_dequantized_matmul(shape):
    G, E, O, Q, N = shape
    x, codes, alpha, signs = draw(*shape, seed=1)
    plan = lower_lut(rk.ops.shift_add.program)
    tc = bind_tiled(rk.ops.shift_add.program, (x, codes, alpha), {})
    y = run_lut_tvm(plan, tc, kernel="perm")
    want = x.reshape(N, -1).double() @ dense(signs, alpha).double().T
    assert y.shape == (N, O) and rel(y, want) < 1e-5
    assert rel(y, run_lut_tvm(plan, tc, kernel="bytes")) < 1e-5
    # views: codes and alphas 3, 4 and 16 bytes into their storage (not 64-byte aligned:
    # the kernel loads whole vectors), a row sliced from a larger one, half rows
    for off in (3, 4, 16):
        cs = torch.zeros(codes.numel() + off, dtype=torch.uint8)[off:].view(codes.shape)
        al = torch.zeros(alpha.numel() + off // 4 + 1)[off // 4 + 1:].view(alpha.shape)
        xv = torch.cat([x, x])[N:]
        tc = bind_tiled(rk.ops.shift_add.program, (xv, cs.copy_(codes), al.copy_(alpha)), {})
        assert torch.equal(run_lut_tvm(plan, tc, kernel="perm"), y)
    tc = bind_tiled(rk.ops.shift_add.program, (x.half(), codes, alpha), {})
    yh = run_lut_tvm(plan, tc, kernel="perm")
    assert yh.dtype == torch.float16 and rel(yh, x.half().float().reshape(N, -1) @
                                             dense(signs, alpha).T) < 1e-3


@rk.tiled
def group_major_scaled(x: rk.Row["G", "E"], codes: rk.Bits["G", "O", "E"],
                       s: rk.Weight["O"], gain: rk.Scalar = 0.5):
    return rk.sum(s * gain * rk.sum(codes * x, "E"), "G")


@needs_avx2
@pytest.mark.parametrize("decl", [group_major_scaled, signs_only], ids=lambda d: d.name)
def test_permute_kernels_on_other_declarations(decl):
    """No planes, no groups, a scale over fewer dims than the codes (broadcast on the host)."""
    sizes = {"G": 3, "E": 64, "O": 16}
    args = _inputs(decl, sizes, N=2)
    plan = lower_lut(decl.program)
    tc = bind_tiled(decl.program, tuple(args), {})
    want = run_tiled(tc)
    assert rel(run_lut_tvm(plan, tc, kernel="perm"), want) < 1e-5
    assert rel(rk.compile(decl)(*args), want) < 1e-5


@pytest.mark.parametrize("block", ["one", "rows of 8"])
@pytest.mark.parametrize("shape", [*PERM_SHAPES, (3, 16, 5, 2, 4), (2, 24, 7, 3, 17),
                                   (2, 32, 21, 2, 3)], ids=str)
def test_dense_kernel_equals_the_dequantized_matmul(shape, block, monkeypatch):
    """Large batches: the dense weight built by a TVM kernel, a block of rows at a time (one
    block, or 8 rows with a shorter last one), each multiplied as it is built."""
    if block != "one":
        monkeypatch.setattr(tvm_lut_dense, "DENSE_BLOCK", 1)
    G, E, O, Q, N = shape
    x, codes, alpha, signs = draw(*shape, seed=2)
    plan = lower_lut(rk.ops.shift_add.program)
    tc = bind_tiled(rk.ops.shift_add.program, (x, codes, alpha), {})
    y = run_lut_tvm(plan, tc, kernel="dense")
    assert rel(y, x.reshape(N, -1).double() @ dense(signs, alpha).double().T) < 1e-5
    if N >= tvm_lut.dense_from():
        assert torch.equal(run_lut_tvm(plan, tc), y)      # what auto takes for this batch


@pytest.mark.parametrize("decl", [group_major_scaled, signs_only], ids=lambda d: d.name)
def test_dense_kernel_on_other_declarations(decl):
    args = _inputs(decl, {"G": 3, "E": 24, "O": 5}, N=tvm_lut.dense_from())
    tc = bind_tiled(decl.program, tuple(args), {})
    want = run_tiled(tc)
    assert rel(run_lut_tvm(lower_lut(decl.program), tc, kernel="dense"), want) < 1e-5
    assert rel(rk.compile(decl)(*args), want) < 1e-5


def test_permute_kernels_refuse_what_they_cannot_run():
    plan = lower_lut(rk.ops.shift_add.program)
    for shape in [(2, 16, 8, 1, 1), (1, 32, 3, 1, 1)]:      # E not a multiple of 32; O*Q = 3
        x, codes, alpha, signs = draw(*shape)
        tc = bind_tiled(rk.ops.shift_add.program, (x, codes, alpha), {})
        with pytest.raises(ValueError, match="permute kernels need"):
            run_lut_tvm(plan, tc, kernel="perm")
        want = x.reshape(1, -1) @ dense(signs, alpha).T
        assert rel(run_lut_tvm(plan, tc), want) < 1e-5      # auto: the shuffle kernels
    with pytest.raises(ValueError, match="'auto', 'shuffle', 'perm', 'bytes', 'dense'"):
        run_lut_tvm(plan, tc, kernel="vpermps")
    x, codes, alpha, _ = draw(1, 32, 8, 1, 1)
    tc = bind_tiled(plane_major.program, (x, codes.permute(2, 1, 0, 3).contiguous(),
                                          alpha.permute(2, 1, 0).contiguous(),
                                          torch.ones(8)), {})
    for kernel in ("perm", "dense"):            # planes first: not (G, O, Q, E)
        with pytest.raises(ValueError, match="laid out"):
            run_lut_tvm(lower_lut(plane_major.program), tc, kernel=kernel)


def test_permute_sources_match_golden(two_threads):
    import os
    from pathlib import Path
    from recurkit.backends.tvm import lut as tvm_lut
    path = Path(__file__).parent / "golden" / "shift_add.perm.tvm.py.txt"
    plan = lower_lut(rk.ops.shift_add.program)
    sizes = {"G": 2, "E": 64, "O": 4, "Q": 2}
    text = "\n\n".join(f(plan, sizes) for f in (tvm_lut.perm_tables_source,
                                               tvm_lut.perm_lookup_source,
                                               tvm_lut.perm_finish_source))
    if os.environ.get("RECURKIT_UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text()


@pytest.mark.parametrize("blocks", ["one", "rows of 8"])
@pytest.mark.parametrize("decl", [rk.ops.shift_add, group_major_scaled, signs_only, plane_major],
                         ids=lambda d: d.name)
def test_cpu_backward_matches_autograd_through_the_reference(decl, blocks, monkeypatch):
    """The CPU backward (tvm_lut_dense.lut_grads_tvm: blocks of the dense weight and of
    dy^T x, the codes' signed dot; plane_major's layout takes the torch backward): the row's
    and every weight's gradient, scales over fewer dims than the codes, half rows."""
    if blocks != "one":
        monkeypatch.setattr(tvm_lut_dense, "DENSE_BLOCK", 1)
    sizes = {"G": 3, "E": 24, "O": 21, "Q": 2}
    for dtype in (torch.float32, torch.float16):
        args = [a.to(dtype) if a.dtype == torch.float32 and k == 0 else a
                for k, a in enumerate(_inputs(decl, sizes, N=5, seed=4))]
        dy = torch.randn(5, 21)
        grads = []
        for run in ("tvm", "reference"):
            xs = [a.clone().requires_grad_() if a.is_floating_point() else a for a in args]
            if run == "tvm":
                y = rk.compile(decl, backend="tvm")(*xs)
            else:
                y = run_tiled(bind_tiled(decl.program, tuple(xs), {}))
            y.float().backward(dy)
            grads.append([a.grad for a in xs if a.is_floating_point()])
        for g, w in zip(*grads):
            assert g.dtype == w.dtype and rel(g, w) < (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("backend", ["tvm", "torch"])
def test_backward_computes_only_the_gradients_asked_for(backend, monkeypatch):
    """The backward op is told which inputs need a gradient: frozen alphas (ShiftAddLinear's
    buffers) cost no scale cotangent, a frozen row no dx."""
    from recurkit.backends.torch import lut as lut_torch
    x, codes, alpha, signs = draw(2, 32, 12, 2, 3, seed=9)
    op = rk.compile(rk.ops.shift_add, backend=backend)
    dy = torch.randn(3, 12)
    W = dense(signs, alpha)
    calls = []
    real = lut_torch.weight_grads

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)
    monkeypatch.setattr(lut_torch, "weight_grads", spy)
    monkeypatch.setattr(tvm_lut_dense, "weight_grads", spy)
    xr = x.clone().requires_grad_()
    op(xr, codes, alpha).backward(dy)                      # alphas frozen
    assert not calls and rel(xr.grad.reshape(3, -1), dy @ W) < 1e-5
    ar = alpha.clone().requires_grad_()
    op(x, codes, ar).backward(dy)                          # the row frozen
    want = torch.einsum("no,goqe,nge->goq", dy, signs, x)
    assert calls and rel(ar.grad, want) < 1e-5
