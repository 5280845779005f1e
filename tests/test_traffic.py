"""Counted traffic (recurkit.backends.triton.traffic): Triton launches in the interpreter and
torch ops between them, with exact byte and FLOP counts on kernels whose traffic is known."""
import pytest
import torch

from recurkit.backends.triton.runtime import load_module
from recurkit.backends.triton.traffic import DEVICES, count_traffic

SRC = '''import triton
import triton.language as tl


@triton.jit
def scale_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    tl.store(y_ptr + i, tl.load(x_ptr + i, mask=m) * 2, mask=m)


@triton.jit
def dot_kernel(a_ptr, b_ptr, c_ptr, N: tl.constexpr):
    r = tl.arange(0, N)
    at = r[:, None] * N + r[None, :]
    tl.store(c_ptr + at, tl.dot(tl.load(a_ptr + at), tl.load(b_ptr + at)))
'''


def test_counts_masked_bytes_dot_flops_and_torch_ops():
    import triton
    mod = load_module(SRC, interpret=True)
    x, y = torch.randn(100), torch.empty(100)
    a, b, c = torch.randn(16, 16), torch.randn(16, 16), torch.empty(16, 16)
    h = torch.randn(100, dtype=torch.bfloat16)
    with count_traffic() as t:
        with triton.knobs.runtime.scope():
            triton.knobs.runtime.interpret = True
            mod.scale_kernel[(2,)](x, y, 100, BLOCK=64)   # 128 lanes, 100 masked in
            mod.dot_kernel[(1,)](a, b, c, N=16)
        z = h.float() + 1                                 # two torch ops
        v = z.view(10, 10).t()                            # views: no traffic
        torch.zeros(8)                                     # a fill: writes only
    assert torch.equal(y, 2 * x) and torch.allclose(c, a @ b, atol=1e-4)
    got = [(x.kind, x.name, x.read, x.written, x.flops) for x in t.launches]
    assert got == [("triton", "scale_kernel", 400, 400, 0),
                   ("triton", "dot_kernel", 2 * 1024, 1024, 2 * 16 ** 3),
                   ("torch", "_to_copy", 200, 400, 0),
                   ("torch", "add", 400, 400, 0),
                   ("torch", "zeros", 0, 32, 0)]
    assert v.shape == (10, 10) and t.count("triton") == 2 and t.count("torch") == 3
    bw, peak, launch = DEVICES["h100"]
    assert t.roofline("h100") == pytest.approx(
        sum(max((r + w) / bw, f / peak) + launch for _, _, r, w, f in got))
    merged = t.by_name()
    assert [m.name for m in merged] == ["scale_kernel", "dot_kernel", "_to_copy", "add", "zeros"]


def test_counting_stops_outside_the_block():
    with count_traffic() as t:
        pass
    torch.randn(4) + 1
    assert t.launches == []


# --- the model of the generated chunk kernels: the same counts, without running them --------
def _call(name, varlen):
    import torch.nn.functional as F
    torch.manual_seed(0)
    B, T, H, K = 2, 40, 1, 16
    q, v = torch.randn(B, T, H, K).bfloat16(), torch.randn(B, T, H, K).bfloat16()
    k = F.normalize(torch.randn(B, T, H, K), dim=-1).bfloat16()
    g = F.logsigmoid(torch.randn(B, T, H, *((K,) if name != "gated_delta_rule" else ())))
    x = [q, k, v, g] + ([torch.rand(B, T, H).bfloat16()] if name != "gla" else [])
    kw = {"output_final_state": True}   # what the custom op asks for
    if varlen:
        x = [t.reshape(1, B * T, *t.shape[2:]) for t in x]
        kw["cu_seqlens"] = torch.tensor([0, 1, 1, 50, 80])
    else:
        kw["initial_state"] = torch.randn(B, H, K, K)
    if name != "gated_delta_rule":   # fewer programs: the interpreter is slow on KDA's loops
        x = [t[:, :24] for t in x] if not varlen else x
    return x, kw


@pytest.mark.parametrize("name,varlen", [pytest.param("gated_delta_rule", False,
                                                      marks=pytest.mark.slow), ("gla", True),
                                         ("kda", True),   # blocked per-channel loops
                                         pytest.param("kda", False, marks=pytest.mark.slow)])
def test_model_of_the_chunk_kernels_matches_the_interpreter(name, varlen):
    import recurkit as rk
    from recurkit.backends.triton.chunk_module import model_traffic
    from recurkit.backends.triton.runtime import check_config
    from recurkit.ir.bind import bind_call
    decl = getattr(rk.ops, name).decl
    x, kw = _call(name, varlen)
    op = rk.compile(decl, backend="triton")
    with count_traffic() as t:
        op(*x, **kw)
    model = model_traffic(op.tile_program, bind_call(decl.program, tuple(x), kw),
                          check_config(None))
    counted = [(k.name, k.read, k.written, k.flops) for k in t.launches if k.kind == "triton"]
    assert counted == [(k.name, k.read, k.written, k.flops) for k in model.launches]
    others = [k for k in t.launches if k.kind == "torch" and not k.name.startswith(name)]
    assert len(counted) == 2 and not others   # no torch op besides the custom op itself
