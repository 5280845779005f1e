"""The Triton kernels on a CUDA GPU, against the reference interpreter on the CPU.

Skipped without a GPU (CI has none). The other test files run the same generated kernels in
Triton's interpreter at small shapes; this file runs them compiled, at shapes whose dims make
``tl.dot`` legal on the tensor cores (>= 16), over the correctness matrix of the lowering
issue: every built-in and form, odd lengths, initial and final state, varlen, extreme gates,
half inputs, gradients; the tiled ops (logic layers, the shift-add kernels) too.

    python -m pytest tests/test_gpu.py -n 8     # on a machine with a GPU
"""
import functools
import os

import pytest
import torch

import recurkit as rk
import loops
from cases import CASES, VECTOR_CASES, call_loop
from test_adjoint import draw
from recurkit.ir.tiled import bind_tiled, pack_signs
from recurkit.lowering.lut import lower_lut

# RECURKIT_GPU_TEST_DEVICE=cpu dry-runs this file's checks in Triton's interpreter (slow)
DEV = os.environ.get("RECURKIT_GPU_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEV == "cuda" and not torch.cuda.is_available(),
                                reason="needs a CUDA GPU")

H, K, V, D = 2, 64, 32, 64
ALL = [*CASES, *VECTOR_CASES]
EXACT = {"precision": "ieee"}   # fp32 dots: the 1e-5 checks; tf32 (the default) checked apart


def rel(a, b):
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def decl_of(name):
    return getattr(rk.ops, name).decl


def inputs(name, T, Bn=1, gate=(-0.5, -0.01), seed=0):
    return draw(decl_of(name), T, B=Bn, H=H, seed=seed, gate=gate,
                sizes={"K": K, "V": V, "D": D})


def state(name, N):
    dims = (D,) if name in VECTOR_CASES else (K, V)
    return torch.randn(N, H, *dims, generator=torch.Generator().manual_seed(3)) * 0.5


@functools.lru_cache(maxsize=None)
def reference(name, T, Bn, init, cu=None, gate=(-0.5, -0.01)):
    xs = inputs(name, T, Bn, gate)
    S0 = state(name, Bn if cu is None else len(cu) - 1) if init else None
    kw = dict(initial_state=S0, output_final_state=True)
    if cu is not None:
        kw["cu_seqlens"] = torch.tensor(cu)
    return xs, kw, rk.compile(decl_of(name), backend="reference")(**xs, **kw)


def on_gpu(xs: dict, kw: dict):
    move = lambda t: t.to(DEV) if torch.is_tensor(t) else t   # noqa: E731
    return {n: move(x) for n, x in xs.items()}, {n: move(x) for n, x in kw.items()}


def check(name, form, chunk, T, Bn=1, init=True, cu=None, gate=(-0.5, -0.01), knobs=EXACT,
          tol=1e-5, dtype=torch.float32, state_tol=1e-5):
    xs, kw, (o_ref, S_ref) = reference(name, T, Bn, init, cu, gate)
    if dtype != torch.float32:   # the reference reads the same rounded inputs (in fp32)
        xs = {n: x.to(dtype) for n, x in xs.items()}
        o_ref, S_ref = rk.compile(decl_of(name), backend="reference")(**xs, **kw)
    gx, gkw = on_gpu(xs, kw)
    op = rk.compile(decl_of(name), backend="triton", form=form, chunk=chunk, knobs=knobs)
    o, S = op(**gx, **gkw)
    assert o.device.type == DEV and o.dtype == dtype and S.dtype == torch.float32
    assert torch.isfinite(o).all() and torch.isfinite(S).all()
    assert rel(o, o_ref) < tol, ("output", rel(o, o_ref))
    assert rel(S, S_ref) < state_tol, ("state", rel(S, S_ref))


def forms(name):
    return rk.analyze(decl_of(name)).forms


MATRIX = [pytest.param(n, f, c, id=f"{n}-{f}-C{c}") for n in ALL for f in forms(n)
          for c in ((16, 64) if f.startswith("chunk") else (None,))]


@pytest.mark.parametrize("name,form,chunk", MATRIX)
def test_every_form_and_chunk(name, form, chunk):
    check(name, form, chunk, 100, Bn=2)


@pytest.mark.parametrize("T", [1, 63, 1000])
@pytest.mark.parametrize("name", ALL)
def test_default_form_odd_lengths_without_initial_state(name, T):
    check(name, None, None, T, init=False)


@pytest.mark.parametrize("name,form,chunk", [p for p in MATRIX if p.values[2] in (None, 64)])
def test_varlen_with_segments_shorter_than_a_chunk(name, form, chunk):
    check(name, form, chunk, 200, cu=(0, 1, 4, 4, 70, 71, 200))


@pytest.mark.parametrize("segments", [3, 8])
@pytest.mark.parametrize("name", ["gla", "gated_delta_rule", "kda", "dplr_delta_rule"])
def test_segments_of_the_state_pass(name, segments):
    """The state pass split along T (``backends/triton/segments.py``), compiled: at K != V
    (a WY form's maps from the transition declaration), in varlen, and at K = V (M made by
    the local kernel)."""
    form = forms(name)[0]
    knobs = {**EXACT, "segments": segments}
    check(name, form, 32, 1000, Bn=2, knobs=knobs)
    check(name, form, 32, 1000, cu=(0, 1, 4, 4, 700, 701, 1000), knobs=knobs)
    xs = draw(decl_of(name), 1000, B=2, H=H, sizes={"K": 64, "V": 64})
    kw = dict(initial_state=torch.randn(2, H, 64, 64) * 0.5, output_final_state=True)
    o_ref, S_ref = rk.compile(decl_of(name), backend="reference")(**xs, **kw)
    gx, gkw = on_gpu(xs, kw)
    o, S = rk.compile(decl_of(name), backend="triton", form=form, chunk=32,
                      knobs=knobs)(**gx, **gkw)
    assert rel(o, o_ref) < 1e-5 and rel(S, S_ref) < 1e-5


@pytest.mark.parametrize("gate", [(-69.0, -69.0), (-1e-6, -1e-6)], ids=["decay1e-30",
                                                                       "decay1-1e-6"])
@pytest.mark.parametrize("name", ["simple_gla", "gla", "gated_delta_rule", "kda", "hgrn"])
def test_extreme_gates_long(name, gate):
    """Against a float64 loop (tests/loops.py), as on the CPU: at decay 1 - 1e-6 over 4096
    steps the fp32 reference itself drifts by ~4e-5. The log-space forms must match float64;
    the sequential form multiplies by exp(g) rounded to fp32 every step (as the fp32 reference
    does; GPU exp rounds differently): up to an ulp of 1 per step, T ulps over T steps."""
    T = 4096
    xs, kw, (o32, S32) = reference(name, T, 1, False, None, gate)
    loops.DTYPE = torch.float64
    try:
        o64, S64 = call_loop(name, list(xs.values()))
    finally:
        loops.DTYPE = torch.float32
    gx, gkw = on_gpu(xs, kw)
    for form in forms(name):
        o, S = rk.compile(decl_of(name), backend="triton", form=form, knobs=EXACT)(**gx, **gkw)
        assert torch.isfinite(o).all() and torch.isfinite(S).all()
        if form == "sequential":
            bound = max(T * 2.0 ** -23, 1e-5)
            assert rel(o32, o64) <= bound   # the bound holds for the reference too
            assert rel(o, o64) <= bound and rel(S, S64) <= bound, (form, rel(o, o64))
        else:
            assert rel(o, o64) < 1e-5 and rel(S, S64) < 1e-5, (form, rel(o, o64))


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2)],
                         ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", ["gla", "gated_delta_rule", "kda", "hgrn"])
def test_half_inputs(name, dtype, tol):
    """Chunk forms keep values crossing kernels in the call's dtype and take 16-bit dot
    operands (fp32 accumulation), as FLA does: the state within the dtype's tolerance; with
    fp32 intermediates and exact dots, as exact as from fp32 inputs."""
    for form in forms(name):
        chunk = form.startswith("chunk")
        check(name, form, None, 100, dtype=dtype, tol=tol, knobs=None,
              state_tol=tol if chunk else 1e-5)
        if chunk:
            check(name, form, None, 100, dtype=dtype, tol=tol,
                  knobs={**EXACT, "intermediates": "fp32"})


@pytest.mark.parametrize("name", ["gated_delta_rule", "gla", "kda", "delta_rule"])
def test_default_tf32_dots(name):
    """The default precision (tf32 dots): within tf32's rounding of the exact result."""
    check(name, None, None, 1000, knobs=None, tol=5e-3, state_tol=5e-3)


@pytest.mark.parametrize("name", ["gated_delta_rule", "gla", "hgrn"])
def test_gradients_on_gpu(name):
    xs, kw, _ = reference(name, 100, 1, True)
    leaves = {n: x.clone().requires_grad_() for n, x in xs.items()}
    S0 = kw["initial_state"].clone().requires_grad_()
    o, S = rk.compile(decl_of(name), backend="reference")(**leaves, initial_state=S0,
                                                         output_final_state=True)
    wo, wS = torch.randn_like(o), torch.randn_like(S)
    want = torch.autograd.grad((o * wo).sum() + (S * wS).sum(), [*leaves.values(), S0])
    gl = {n: x.detach().to(DEV).requires_grad_() for n, x in xs.items()}
    gS0 = S0.detach().to(DEV).requires_grad_()
    op = rk.compile(decl_of(name), backend="triton", knobs=EXACT)
    o, S = op(**gl, initial_state=gS0, output_final_state=True)
    got = torch.autograd.grad((o * wo.to(DEV)).sum() + (S * wS.to(DEV)).sum(), [*gl.values(), gS0])
    for n, g, w in zip([*leaves, "initial_state"], got, want):
        assert g.device.type == DEV and rel(g, w) < 1e-4, (n, rel(g, w))


def test_custom_op_opcheck_on_gpu():
    xs, kw, _ = reference("gated_delta_rule", 40, 1, True)
    gx, gkw = on_gpu(xs, kw)
    op = rk.compile(decl_of("gated_delta_rule"), backend="triton")
    o, _ = op(**gx, **gkw)
    assert o.device.type == DEV
    args = [gx[s.name] for s in decl_of("gated_delta_rule").program.call_inputs
            if s.role != "scalar"]
    torch.library.opcheck(op.torch_op.op.default, (*args, None, gkw["initial_state"], None))


# ---- tiled ops ----

def shift_add_inputs(G, E, O, Q, N, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, G, E, generator=g)
    signs = torch.randint(0, 2, (G, O, Q, E), generator=g).float() * 2 - 1
    alpha = torch.rand(G, O, Q, generator=g) + 0.1
    W = torch.einsum("goq,goqe->oge", alpha, signs).reshape(O, G * E)
    return x, pack_signs(signs), alpha, W


@pytest.mark.parametrize("kernel", ["lut", "dot"])
@pytest.mark.parametrize("shape", [(32, 128, 4096, 3, 1), (3, 128, 70, 2, 5),
                                   (2, 24, 33, 4, 17), (8, 128, 1000, 3, 64)], ids=str)
def test_shift_add_kernels(kernel, shape):
    from recurkit.backends.triton.lut import run_lut_triton
    G, E, O, Q, N = shape
    x, codes, alpha, W = shift_add_inputs(*shape)
    plan = lower_lut(rk.ops.shift_add.program)
    tc = bind_tiled(rk.ops.shift_add.program, (x.to(DEV), codes.to(DEV), alpha.to(DEV)), {})
    y = run_lut_triton(plan, tc, kernel=kernel)
    want = x.double().reshape(N, -1) @ W.double().T
    assert y.device.type == DEV and y.shape == (N, O)
    assert rel(y, want) < 1e-5


def test_shift_add_linear_on_gpu():
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 96)
    layer = rk.nn.ShiftAddLinear.from_linear(lin, bits=3, group_size=128).to(DEV)
    x = torch.randn(3, 256, device=DEV, requires_grad=True)
    y = layer(x)
    W = layer.dequantized_weight()
    want = x.detach() @ W.T + (layer.bias if layer.bias is not None else 0)
    assert rel(y, want) < 1e-5
    y.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_logic_layers_on_gpu():
    torch.manual_seed(0)
    layer = rk.nn.LogicLayer(40, 300, "unique", backend="triton").to(DEV)
    x = torch.rand(77, 40, device=DEV, requires_grad=True)
    y = layer(x)
    ref = rk.nn.LogicLayer(40, 300, "unique", backend="torch")
    ref.load_state_dict(layer.state_dict())   # weights and connections
    xc = x.detach().cpu().requires_grad_()
    want = ref(xc)
    assert rel(y, want) < 1e-5
    dy = torch.randn_like(want)
    (gx,) = torch.autograd.grad(y, [x], dy.to(DEV))
    (wx,) = torch.autograd.grad(want, [xc], dy)
    assert rel(gx, wx) < 1e-4
    model = torch.nn.Sequential(layer, rk.nn.LogicLayer(300, 60, backend="triton"),
                                rk.nn.GroupSum(3, 1.0)).to(DEV).eval()
    xb = torch.rand(1000, 40, device=DEV) < 0.5
    with torch.no_grad():
        want = model(xb.float())   # the eval-mode float model, on the device
    got = rk.nn.compile_hard(model, backend="triton")(xb)
    assert got.device.type == DEV and torch.equal(got, want)


def test_hard_logic_kernel_blocks_and_launches_on_gpu():
    """The hard kernel's block configurations and a call of several launches (a small scratch)
    count what the eval-mode model does, for a batch that is not a multiple of 64."""
    from recurkit.backends.triton import packed as tp
    torch.manual_seed(1)
    model = torch.nn.Sequential(rk.nn.LogicLayer(64, 2000), rk.nn.LogicLayer(2000, 2000),
                                rk.nn.GroupSum(5, 2.0)).to(DEV).eval()
    x = torch.rand(70001, 64, device=DEV) < 0.5
    with torch.no_grad():
        want = model(x.float())
    hard = rk.nn.compile_hard(model, backend="triton")
    assert torch.equal(hard(x), want)
    prog = hard.program
    bufs = tp.program_buffers(prog, DEV)
    for cfg in ((4, 32, 2, 2), (32, 128, 8, 8)):
        got = tp.run_packed_triton(prog, x, bufs, *cfg, scratch_bytes=8 * prog.slots * 256)
        assert torch.equal(got[:x.shape[0]].float() / 2.0, want), cfg


def test_hard_scores_divide_exactly_on_gpu():
    """Scores are count / tau correctly rounded, as the eval model's GroupSum (tau 3 and 10:
    a multiplication by 1 / tau differs in the last bit for many counts)."""
    torch.manual_seed(2)
    for tau in (3.0, 10.0):
        model = torch.nn.Sequential(rk.nn.LogicLayer(32, 3000), rk.nn.GroupSum(2, tau)
                                    ).to(DEV).eval()
        x = torch.rand(4000, 32, device=DEV) < 0.5
        with torch.no_grad():
            want = model(x.float())
        assert torch.equal(rk.nn.compile_hard(model, backend="triton")(x), want), tau
