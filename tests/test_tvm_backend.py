"""The TVM backend's compiled sequential kernels against the reference interpreter."""
import os

import pytest
import torch

import recurkit as rk
from cases import CASES, VECTOR_CASES, matrix_inputs, vector_inputs
from recurkit.backends.tvm import sequential as tvm_backend
from test_custom_recurrences import EXPECTED, draw

B, H, K, V, D = 2, 3, 6, 5, 7


def rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def inputs(name, T, **kw):
    if name in VECTOR_CASES:
        return vector_inputs(name, B, T, H, D, **kw)
    return matrix_inputs(name, B, T, H, K, V, **kw)


def state(name, N):
    return torch.randn(N, H, D) if name in VECTOR_CASES else torch.randn(N, H, K, V)


ALL_DECLS = [(n, d) for n, op in rk.ops.ALL.items() for d in [op.decl, *op.variants.values()]]


@pytest.mark.parametrize("name,decl", ALL_DECLS, ids=[d.name for _, d in ALL_DECLS])
def test_builtins_match_reference(name, decl):
    for T in (1, 37):
        x = inputs(name, T)
        S0 = state(name, B)
        if decl.name == "key_sum":   # linear attention's normaliser takes (q, k)
            x, S0 = x[:2], torch.randn(B, H, K)
        if decl.name == "simple_gla_gamma":
            x = [*x[:3], -torch.rand(H)]
        kw = dict(initial_state=S0, output_final_state=True)
        o_ref, S_ref = rk.compile(decl, backend="reference")(*x, **kw)
        o, S = rk.compile(decl, backend="tvm")(*x, **kw)
        assert rel(o, o_ref) < 1e-5 and rel(S, S_ref) < 1e-5


MATRIX_DECLS = [(n, d) for n, d in ALL_DECLS if n not in VECTOR_CASES and d.name != "key_sum"]


@pytest.mark.parametrize("name,decl", MATRIX_DECLS, ids=[d.name for _, d in MATRIX_DECLS])
def test_column_blocked_update_matches_reference(name, decl):
    """V = 24 with 8-wide blocks: the state updated in three column blocks, its reads
    accumulated per block (the blocked pass runs only where V exceeds the block)."""
    Vb = 24
    src = tvm_backend.sequential_source(decl.program, {"K": K, "V": Vb}, H, knobs={"block": 8})
    assert "for vb in T.serial(3):" in src
    for T in (1, 37):
        x = matrix_inputs(name, B, T, H, K, Vb)
        if decl.name == "simple_gla_gamma":
            x = [*x[:3], -torch.rand(H)]
        kw = dict(initial_state=torch.randn(B, H, K, Vb), output_final_state=True)
        o_ref, S_ref = rk.compile(decl, backend="reference")(*x, **kw)
        o, S = rk.compile(decl, backend="tvm", knobs={"block": 8})(*x, **kw)
        assert rel(o, o_ref) < 1e-5 and rel(S, S_ref) < 1e-5


@pytest.mark.parametrize("decl", [d for d in EXPECTED if len(d.program.state.dims) == 2],
                         ids=lambda d: d.name)
def test_column_blocked_custom_recurrences(decl):
    """Matrix-state declarations outside the library (another erase key, value-side and
    two-sided gates, a normalised beta, an output reading the old state, a raw decay), their
    state updated in three 8-wide column blocks."""
    assert "for vb in T.serial(3):" in tvm_backend.sequential_source(
        decl.program, {"K": 5, "V": 24, "R": 3}, 2, knobs={"block": 8})
    x = draw(decl, 23, sizes={"K": 5, "V": 24, "D": 6, "R": 3})
    o_ref, S_ref = rk.compile(decl, backend="reference")(*x, output_final_state=True)
    o, S = rk.compile(decl, backend="tvm", knobs={"block": 8})(*x, output_final_state=True)
    assert rel(o, o_ref) < 1e-5 and rel(S, S_ref) < 1e-5


def test_column_blocked_varlen_and_half_inputs():
    lens = [3, 0, 1, 20]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    decl = rk.ops.gated_delta_rule.decl
    for dtype, tol in [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)]:
        x = [t[:1] for t in matrix_inputs("gated_delta_rule", B, sum(lens), H, K, 24,
                                          dtype=dtype)]
        kw = dict(initial_state=torch.randn(len(lens), H, K, 24), output_final_state=True,
                  cu_seqlens=cu)
        o_ref, S_ref = rk.compile(decl, backend="reference")(*x, **kw)
        o, S = rk.compile(decl, backend="tvm", knobs={"block": 8})(*x, **kw)
        assert o.dtype == dtype and rel(o, o_ref) < tol and rel(S, S_ref) < 1e-5


def test_block_width_follows_the_state():
    """The default 32-wide block narrows to divide V, and is not used where V is no wider
    than a block or no width of 8 or more divides it."""
    p = rk.ops.gated_delta_rule.decl.program
    src = lambda V: tvm_backend.sequential_source(p, {"K": 8, "V": V}, 1)  # noqa: E731
    assert "for vb in T.serial(2):" in src(64) and "T.vectorized(32)" in src(64)
    assert "for vb in T.serial(3):" in src(48) and "T.vectorized(16)" in src(48)
    assert "for vb in" not in src(32) and "for vb in" not in src(36)
    off = tvm_backend.sequential_source(p, {"K": 8, "V": 64}, 1, knobs={"block": 0})
    assert "for vb in" not in off


@pytest.mark.parametrize("decl", list(EXPECTED), ids=lambda d: d.name)
def test_custom_recurrences_match_reference(decl):
    x = draw(decl, 23)
    o_ref, S_ref = rk.compile(decl, backend="reference")(*x, output_final_state=True)
    o, S = rk.compile(decl, backend="tvm")(*x, output_final_state=True)
    assert rel(o, o_ref) < 1e-5 and rel(S, S_ref) < 1e-5


@pytest.mark.parametrize("name", ["gated_delta_rule", "hgrn"])
def test_varlen_and_low_precision(name):
    lens = [3, 0, 1, 20]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    for dtype, tol in [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)]:
        x = [t[:1] for t in inputs(name, sum(lens), dtype=dtype)]
        kw = dict(initial_state=state(name, len(lens)), output_final_state=True, cu_seqlens=cu)
        o_ref, S_ref = rk.compile(getattr(rk.ops, name).decl, backend="reference")(*x, **kw)
        o, S = rk.compile(getattr(rk.ops, name).decl, backend="tvm")(*x, **kw)
        assert o.dtype == dtype and S.dtype == torch.float32
        assert rel(o, o_ref) < tol and rel(S, S_ref) < 1e-5


def test_kernels_are_cached_per_shape():
    decl = rk.ops.gla.decl
    x = inputs("gla", 5)
    op = rk.compile(decl, backend="tvm")
    op(*x)
    before = len(tvm_backend._CACHE)
    op(*inputs("gla", 9))          # another T: same kernel (T is symbolic)
    assert len(tvm_backend._CACHE) == before
    op(*matrix_inputs("gla", B, 5, H, K + 1, V))   # another K: a new kernel
    assert len(tvm_backend._CACHE) == before + 1


def test_generated_source_golden():
    src = tvm_backend.sequential_source(rk.ops.gated_delta_rule.decl.program,
                                        {"K": 4, "V": 64}, 2)   # two 32-wide column blocks
    path = os.path.join(os.path.dirname(__file__), "golden", "gated_delta_rule.tvm.py.txt")
    if os.environ.get("RECURKIT_UPDATE_GOLDEN"):
        with open(path, "w") as f:
            f.write(src)
    with open(path) as f:
        assert src == f.read()


def test_chunk_stage_sources_golden():
    from recurkit.backends.tvm.chunk import stage_sources
    tp = rk.lower(rk.ops.gla, chunk=16)
    src = "\n# ---- next stage ----\n".join(stage_sources(tp, {"K": 4, "V": 8}, 2))
    path = os.path.join(os.path.dirname(__file__), "golden", "gla.chunk_gated.tvm.py.txt")
    if os.environ.get("RECURKIT_UPDATE_GOLDEN"):
        with open(path, "w") as f:
            f.write(src)
    with open(path) as f:
        assert src == f.read()


def test_refusals():
    with pytest.raises(rk.LoweringError, match="form 'chunk_gated' does not apply to hgrn"):
        rk.compile(rk.ops.hgrn, backend="tvm", form="chunk_gated")
    x = [t.to("meta") for t in inputs("gla", 4)]
    with pytest.raises(rk.CallError, match="CPU tensors, got device meta"):
        rk.compile(rk.ops.gla, backend="tvm")(*x)


def test_disk_cache_round_trip_and_corrupt_file(tmp_path, monkeypatch):
    import tvm
    monkeypatch.setenv("RECURKIT_CACHE_DIR", str(tmp_path))
    decl = rk.ops.hgrn.decl
    x = inputs("hgrn", 7)
    o_ref, _ = rk.compile(decl, backend="reference")(*x)
    tvm_backend._CACHE.clear()
    tvm_backend._KERNELS.clear()
    o1, _ = rk.compile(decl, backend="tvm")(*x)
    files = list((tmp_path / "tvm").glob("*.so"))
    assert len(files) == 1 and rel(o1, o_ref) < 1e-5
    rk.compile(decl, backend="tvm", form="scan")(*x)          # every form's kernels are cached
    assert len(list((tmp_path / "tvm").glob("*.so"))) == 2
    # a new process (empty memory cache) loads the library instead of compiling
    tvm_backend._CACHE.clear()
    tvm_backend._KERNELS.clear()

    def no_compile(*a, **k):
        raise AssertionError("compiled although the kernel was on disk")
    monkeypatch.setattr(tvm, "compile", no_compile)
    o2, _ = rk.compile(decl, backend="tvm")(*x)
    assert torch.equal(o1, o2)
    monkeypatch.undo()
    monkeypatch.setenv("RECURKIT_CACHE_DIR", str(tmp_path))
    # a truncated library (in a fresh cache: the good one stays mapped in this process)
    # is reported, removed and rebuilt
    fresh = tmp_path / "fresh"
    (fresh / "tvm").mkdir(parents=True)
    (fresh / "tvm" / files[0].name).write_bytes(b"not a shared library")
    monkeypatch.setenv("RECURKIT_CACHE_DIR", str(fresh))
    tvm_backend._CACHE.clear()
    tvm_backend._KERNELS.clear()
    with pytest.warns(RuntimeWarning, match="discarding unreadable cached kernel"):
        o3, _ = rk.compile(decl, backend="tvm")(*x)
    assert torch.equal(o1, o3)
    assert (fresh / "tvm" / files[0].name).stat().st_size > 1000


GPU_DECLS = [d for _, d in ALL_DECLS if d.name != "key_sum"]


@pytest.mark.parametrize("decl", GPU_DECLS, ids=[d.name for d in GPU_DECLS])
def test_cuda_source_for_sm90(decl):
    sizes = {"K": 64, "V": 32, "D": 128}
    src = tvm_backend.cuda_source(decl.program, {d: sizes[d] for d in decl.program.dims}, 4)
    assert '__global__ void __launch_bounds__' in src and "threadIdx.x" in src


def test_cuda_refuses_reductions_across_threads():
    with pytest.raises(NotImplementedError, match="cross-thread reduction"):
        tvm_backend.cuda_source(rk.ops.linear_attn.variants["normalizer"].program, {"K": 64}, 2)


@pytest.mark.skipif(__import__("shutil").which("nvcc") is None, reason="needs nvcc")
@pytest.mark.parametrize("name", ["gated_delta_rule", "hgrn"])
def test_cuda_source_compiles_to_ptx(name):
    decl = getattr(rk.ops, name).decl
    sizes = {"K": 64, "V": 64, "D": 256}
    src = tvm_backend.cuda_source(decl.program, {d: sizes[d] for d in decl.program.dims}, 4)
    ptx = tvm_backend.cuda_ptx(src, "sm_90")
    assert ".target sm_90" in ptx and ".entry main_kernel" in ptx


def test_auto_runs_tvm_forward_and_differentiates_through_the_torch_backend(monkeypatch):
    """auto on CPU: the TVM kernel computes the forward with or without grad; the backward
    recomputes with the torch tile program (the custom op's autograd)."""
    import recurkit.backends.tvm.sequential as seq
    calls = []
    real = seq.run_tvm_sequential
    monkeypatch.setattr(seq, "run_tvm_sequential", lambda bc, knobs=None: calls.append(1) or
                        real(bc, knobs))
    x = inputs("gated_delta_rule", 9)
    op = rk.compile(rk.ops.gated_delta_rule)
    assert "backend=auto" in repr(op)
    o1, _ = op(*x)
    assert calls == [1]
    xg = [t.clone().requires_grad_() for t in x]
    o2, _ = op(*xg)
    assert calls == [1, 1] and o2.requires_grad
    o2.sum().backward()
    assert calls == [1, 1] and all(t.grad is not None for t in xg)
    xr = [t.clone().requires_grad_() for t in x]
    rk.compile(rk.ops.gated_delta_rule, backend="reference")(*xr)[0].sum().backward()
    assert all(rel(a.grad, b.grad) < 1e-4 for a, b in zip(xg, xr))
    assert rel(o1, o2.detach()) < 1e-5


CHUNK_CASES = [(n, f) for n in [*CASES, *VECTOR_CASES]
               for f in rk.analyze(getattr(rk.ops, n)).forms[:-1]]


@pytest.mark.parametrize("name,form", CHUNK_CASES, ids=[f"{n}-{f}" for n, f in CHUNK_CASES])
def test_chunk_forms_match_reference(name, form):
    """Each stage of the tile program (or the scan) as a TVM kernel: T not a multiple of the
    chunk, a length-1 sequence, initial and final state."""
    decl = getattr(rk.ops, name).decl
    op = rk.compile(decl, backend="tvm", form=form, chunk=16)
    ref = rk.compile(decl, backend="reference")
    for T in (1, 37):
        x = inputs(name, T)
        kw = dict(initial_state=state(name, B), output_final_state=True)
        o_ref, S_ref = ref(*x, **kw)
        o, S = op(*x, **kw)
        assert rel(o, o_ref) < 1e-5 and rel(S, S_ref) < 1e-5


@pytest.mark.parametrize("name", ["gla", "gated_delta_rule"])
def test_chunk_forms_varlen(name):
    lens = [1, 20, 0, 17]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    x = [t[:1] for t in inputs(name, sum(lens))]
    kw = dict(initial_state=state(name, len(lens)), output_final_state=True, cu_seqlens=cu)
    o_ref, S_ref = rk.compile(getattr(rk.ops, name).decl, backend="reference")(*x, **kw)
    o, S = rk.compile(getattr(rk.ops, name).decl, backend="tvm",
                      form=rk.analyze(getattr(rk.ops, name)).forms[0], chunk=16)(*x, **kw)
    assert rel(o, o_ref) < 1e-5 and rel(S, S_ref) < 1e-5


@pytest.mark.parametrize("knobs", [{"vectorize": 0}, {"unroll": 8, "vectorize": 4},
                                   {"parallel": False, "pipeline": False}])
def test_schedule_knobs_change_the_kernel_not_the_result(knobs):
    decl = rk.ops.gated_delta_rule.decl
    x = inputs("gated_delta_rule", 21)
    o_ref, S_ref = rk.compile(decl, backend="reference")(*x, output_final_state=True)
    o, S = rk.compile(decl, backend="tvm", knobs=knobs)(*x, output_final_state=True)
    assert rel(o, o_ref) < 1e-5 and rel(S, S_ref) < 1e-5
    src = tvm_backend.sequential_source(decl.program, {"K": K, "V": V}, H, knobs=knobs)
    assert src != tvm_backend.sequential_source(decl.program, {"K": K, "V": V}, H)


def test_bad_knobs():
    with pytest.raises(ValueError, match="unknown TVM knob 'tile'"):
        rk.compile(rk.ops.gla, backend="tvm", knobs={"tile": 4})
    with pytest.raises(ValueError, match="'unroll' must be an int >= 0"):
        rk.compile(rk.ops.gla, backend="tvm", knobs={"unroll": -1})
    with pytest.raises(ValueError, match="backends with knobs \(tvm, triton\); backend 'torch' takes none"):
        rk.compile(rk.ops.gla, backend="torch", knobs={"unroll": 4})


CHUNK_GPU = [(n, f) for n, f in CHUNK_CASES if f.startswith("chunk")]


@pytest.mark.parametrize("name,form", CHUNK_GPU, ids=[f"{n}-{f}" for n, f in CHUNK_GPU])
def test_chunk_gpu_kernels_semantics_on_cpu(name, form):
    """The GPU rendering of the chunk stages (a block per grid point, a thread per state
    column) with its block and thread loops run serially on the CPU matches the reference:
    T not a multiple of the chunk, initial and final state, varlen with a short segment."""
    from recurkit.backends.tvm import chunk as tvm_tile
    from recurkit.ir import bind_call
    decl = getattr(rk.ops, name).decl
    tp = rk.lower(decl, form=form, chunk=16)
    lens = [1, 20, 16]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    x = [t[:1] for t in inputs(name, sum(lens))]
    for kw in (dict(initial_state=state(name, 1), output_final_state=True),
               dict(initial_state=state(name, 3), output_final_state=True, cu_seqlens=cu)):
        args = x if "cu_seqlens" in kw else inputs(name, 37)[:len(x)]
        if "cu_seqlens" not in kw:
            kw = dict(kw, initial_state=state(name, B))
        o_ref, S_ref = rk.compile(decl, backend="reference")(*args, **kw)
        bc = bind_call(decl.program, args, kw)
        o, S = tvm_tile.run_tvm_chunked(tp, bc, emulate_gpu=True)
        assert rel(o, o_ref) < 1e-5 and rel(S, S_ref) < 1e-5


@pytest.mark.parametrize("name", ["gla", "gated_delta_rule", "kda", "dplr_delta_rule"])
def test_chunk_cuda_source_for_sm90(name):
    from recurkit.backends.tvm import chunk as tvm_tile
    decl = getattr(rk.ops, name).decl
    tp = rk.lower(decl, chunk=16)
    src = tvm_tile.chunk_cuda_source(tp, {d: 64 for d in decl.program.dims}, 4)
    for st in tp.stages:
        assert f"void __launch_bounds__(64) {st.name}_kernel(" in src, st.name   # per column
    if __import__("shutil").which("nvcc"):
        ptx = tvm_backend.cuda_ptx(src, "sm_90")
        assert ".target sm_90" in ptx


def test_cuda_check_launch_specs():
    """tests/tvm_cuda_check.py's prepare half (the GPU half ran on an H100): each recorded
    kernel's CUDA parameters name every buffer of its call once, the ints are the call's
    sizes, and the grid and block are (sequences x heads[, x chunks], state columns)."""
    import tvm_cuda_check as chk
    from recurkit.ir import bind_call
    from recurkit.backends.tvm import chunk as tvm_tile
    decl = rk.ops.gated_delta_rule.decl
    x = inputs("gated_delta_rule", 21)
    bc = bind_call(decl.program, x, dict(initial_state=state("gated_delta_rule", B)))
    sizes = {"K": K, "V": V}
    recs = chk._calls("gdn", "sequential",
                      tvm_backend.sequential_source(decl.program, sizes, H, gpu=True),
                      lambda: tvm_backend.run_tvm_sequential(bc))
    tp = rk.lower(decl, chunk=16)
    recs += chk._calls("gdn", "chunk_wy", tvm_tile.stage_sources(tp, sizes, H, gpu=True),
                       lambda: tvm_tile.run_tvm_chunked(tp, bc, emulate_gpu=True))
    assert [r["form"] for r in recs] == ["sequential"] + ["chunk_wy"] * len(tp.stages)
    nc = -(-21 // 16)
    for r in recs:
        bufs = sorted(v for kind, v in r["params"] if kind == "buf")
        assert bufs == list(range(len(r["before"]))), r["kernel"]
        assert f'void __launch_bounds__({r["block"]}) {r["kernel"]}(' in r["cuda"]
        assert r["block"] == V and r["grid"] in (B * H, B * H * nc)
        ints = [v for kind, v in r["params"] if kind == "int"]
        assert set(ints) <= {B, 21, nc}
        assert any(not torch.equal(a, b) for a, b in zip(r["before"], r["after"]))
    assert recs[0]["grid"] == B * H
    assert sorted(v for kind, v in recs[0]["params"] if kind == "int") == [B, 21]   # NS, TT


def _at_offset(t: torch.Tensor, k: int = 1) -> torch.Tensor:
    """A copy of ``t`` as a view k elements into a larger buffer (not 64-byte aligned)."""
    return torch.zeros(t.numel() + k, dtype=t.dtype)[k:].view(t.shape).copy_(t)


@pytest.mark.parametrize("name,form", [("gated_delta_rule", None), ("gated_delta_rule", "chunk_wy"),
                                       ("gla", "chunk_gated"), ("hgrn", None), ("hgrn", "scan")])
def test_kernels_take_views_at_any_offset(name, form):
    """Inputs and initial states that start 4 bytes past an aligned address (a slice such as
    x[:, 1:] of rows of 20 floats): TVM assumes 64-byte aligned arguments unless told, and its
    aligned vector loads crashed the process (tvm_build.unaligned_buffers). Backward too."""
    decl = getattr(rk.ops, name).decl
    op = rk.compile(decl, backend="tvm", form=form, chunk=16 if form else None)
    if name in VECTOR_CASES:    # sizes whose loops vectorise (the module's K, V, D do not)
        x, s0 = vector_inputs(name, 1, 21, 2, 64), torch.randn(1, 2, 64)
    else:
        x, s0 = matrix_inputs(name, 1, 21, 2, 64, 32), torch.randn(1, 2, 64, 32)
    o1, S1 = op(*x, initial_state=s0, output_final_state=True)
    xs = [_at_offset(t).requires_grad_() for t in x]
    o2, S2 = op(*xs, initial_state=_at_offset(s0), output_final_state=True)
    assert torch.equal(o1, o2.detach()) and torch.equal(S1, S2)
    (o2.square().sum() + S2.sum()).backward()
    xr = [t.clone().requires_grad_() for t in x]
    o3, S3 = rk.compile(decl, backend="reference")(*xr, initial_state=s0, output_final_state=True)
    (o3.square().sum() + S3.sum()).backward()
    assert all(rel(a.grad, b.grad) < 1e-4 for a, b in zip(xs, xr))


def test_target_cpu_from_the_environment(monkeypatch):
    """$RECURKIT_TVM_MCPU names the CPU kernels are compiled for (AVX2 code on an AVX-512
    machine, to measure the fallback); vectors follow its features; a name LLVM does not
    know is refused, naming the variable."""
    import platform
    from recurkit.backends.tvm.build import target, vector_lanes
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86 CPU names")
    monkeypatch.setenv("RECURKIT_TVM_MCPU", "haswell")
    assert target().attrs["mcpu"] == "haswell" and vector_lanes() == 8
    monkeypatch.setenv("RECURKIT_TVM_MCPU", "skylake-avx512")
    assert vector_lanes() == 16
    monkeypatch.setenv("RECURKIT_TVM_MCPU", "no-such-cpu")
    with pytest.raises(ValueError, match="RECURKIT_TVM_MCPU='no-such-cpu'"):
        target()
