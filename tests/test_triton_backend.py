"""The Triton backend: generated kernels run in Triton's interpreter (CPU tensors) against the
reference interpreter, and compile ahead of time for sm_80, sm_90 and gfx942 with no GPU.

The interpreter runs one program at a time (~ms per launch), so shapes are small and chunks
are 16 or 32; the correctness matrix at full size runs on the torch and TVM backends.
"""
import os
from pathlib import Path

import pytest
import torch

import recurkit as rk
from cases import CASES, VECTOR_CASES
from recurkit.backends.triton import runtime as tb
from recurkit.lowering.forms import lower
from test_custom_recurrences import EXPECTED, draw
from test_lowering import decl_of, inputs, rel, state

GOLDEN = Path(__file__).parent / "golden"
ALL = [*CASES, *VECTOR_CASES]


def forms_of(name):
    return rk.analyze(decl_of(name)).forms


# the interpreter takes 10-45 s per case of these WY forms with per-channel or extra rank-1
# terms; the default run keeps one case of each test for them, `-m slow` runs the rest
HEAVY_WY = {"dplr_delta_rule", "kda", "gdn2", "kla", "delta_rule"}


def cases(chunks, slow=lambda name, form: False):
    return [pytest.param(name, form, chunk, id=f"{name}-{form}" + (f"-C{chunk}" if chunk else ""),
                         marks=[pytest.mark.slow] if slow(name, form) else [])
            for name in ALL for form in forms_of(name)
            for chunk in (chunks if form.startswith("chunk") else [None])]


def heavy_wy(name, form):
    return name in HEAVY_WY and form == "chunk_wy"


def check(name, form, chunk, T, init, Bn=2, tol=1e-5):
    x = inputs(name, T, Bn)
    S0 = state(name, Bn) if init else None
    kw = dict(initial_state=S0, output_final_state=True)
    o_ref, S_ref = rk.compile(decl_of(name), backend="reference")(*x, **kw)
    op = rk.compile(decl_of(name), backend="triton", form=form, chunk=chunk)
    assert op.form == form
    o, S = op(*x, **kw)
    assert o.shape == o_ref.shape and S.shape == S_ref.shape
    assert rel(o, o_ref) < tol, rel(o, o_ref)
    assert rel(S, S_ref) < tol, rel(S, S_ref)


@pytest.mark.parametrize("name,form,chunk", cases([16]))
def test_forms_match_reference(name, form, chunk):
    # T = 37: not a multiple of the chunk; two sequences; an initial state
    check(name, form, chunk, 37, True)


@pytest.mark.parametrize("name,form,chunk", [
    c for c in cases([32], slow=lambda n, f: f == "chunk_wy" and n != "gated_delta_rule")
    if c.values[2]])
def test_forms_match_reference_chunk32(name, form, chunk):
    # T = 40: one full chunk and a partial one (a chunk-64 WY prep takes the interpreter
    # minutes, so 64 is covered on the torch and TVM backends)
    check(name, form, chunk, 40, True, Bn=1)


PER_CHANNEL = [c for c in cases([16]) if c.values[0] in ("gla", "kda", "dplr_delta_rule", "gdn2")
               and c.values[1].startswith("chunk")]


@pytest.mark.parametrize("name,form,chunk", PER_CHANNEL)
def test_per_channel_contractions_blocked_over_k(name, form, chunk, monkeypatch):
    """Per-channel [i, j, K] contractions are rendered as a loop over blocks of K (so they fit
    in registers at K = 128); with a tiny block budget the small test shapes take that path
    too (blocks of one channel), and still match the reference."""
    from recurkit.backends.triton import chunk as triton_tile
    monkeypatch.setattr(triton_tile._StageGen, "KBLOCK_ELEMS", 64)
    src = rk.codegen(decl_of(name), "triton", form=form, chunk=chunk, sizes={
        d: 8 for d in decl_of(name).program.dims})
    assert "for kb in range(0, 8, 1):" in src
    check(name, form, chunk, 37, True)


@pytest.mark.parametrize("T", [1, 63, 100])
@pytest.mark.parametrize("name", ["gated_delta_rule", "gla", "hgrn"])
def test_odd_lengths_default_form(name, T):
    check(name, forms_of(name)[0], 16, T, False, Bn=1)


@pytest.mark.parametrize("name,form,chunk",
                         cases([16], slow=heavy_wy))
def test_varlen_with_short_and_empty_segments(name, form, chunk):
    lens = [1, 3, 0, 16, 17, 2]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    x = [t[:1] for t in inputs(name, sum(lens))]
    kw = dict(initial_state=state(name, len(lens)), output_final_state=True, cu_seqlens=cu)
    o_ref, S_ref = rk.compile(decl_of(name), backend="reference")(*x, **kw)
    o, S = rk.compile(decl_of(name), backend="triton", form=form, chunk=chunk)(*x, **kw)
    assert rel(o, o_ref) < 1e-5 and rel(S, S_ref) < 1e-5


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("name", ["gla", "gated_delta_rule",
                                  pytest.param("kda", marks=pytest.mark.slow), "hgrn"])
def test_low_precision_inputs(name, dtype, tol):
    x = inputs(name, 40, dtype=dtype)
    o_ref, S_ref = rk.compile(decl_of(name), backend="reference")(*x, output_final_state=True)
    for form in forms_of(name):
        o, S = rk.compile(decl_of(name), backend="triton", form=form, chunk=16)(
            *x, output_final_state=True)
        assert o.dtype == dtype and S.dtype == torch.float32
        # chunk forms keep values crossing kernels in the call's dtype (the state and every
        # accumulation fp32): the state is then within the dtype's tolerance
        # Triton's interpreter truncates on every conversion to bf16 (measured: 1 ulp where a
        # GPU and torch round to nearest, within half), so bf16 chunk forms get twice the
        # tolerance here; tests/test_gpu.py holds them to it on a GPU
        exact = not form.startswith("chunk")
        tol = tol * 2 if dtype == torch.bfloat16 and not exact else tol
        assert rel(o, o_ref) < tol and rel(S, S_ref) < (1e-5 if exact else tol), form
        if not exact:   # fp32 intermediates: the state as exact as from fp32 inputs
            o, S = rk.compile(decl_of(name), backend="triton", form=form, chunk=16,
                              knobs={"intermediates": "fp32", "precision": "ieee"})(
                *x, output_final_state=True)
            assert o.dtype == dtype and rel(o, o_ref) < tol and rel(S, S_ref) < 1e-5, form


@pytest.mark.parametrize("gate", [(-69.0, -69.0), (-1e-6, -1e-6)], ids=["decay1e-30",
                                                                       "decay1-1e-6"])
@pytest.mark.parametrize("name", ["simple_gla", "gla", "gated_delta_rule", "kda", "hgrn"])
def test_extreme_gates(name, gate):
    x = inputs(name, 64, Bn=1, gate=gate)
    o_ref, S_ref = rk.compile(decl_of(name), backend="reference")(*x, output_final_state=True)
    for form in forms_of(name):
        o, S = rk.compile(decl_of(name), backend="triton", form=form, chunk=16)(
            *x, output_final_state=True)
        assert torch.isfinite(o).all() and torch.isfinite(S).all()
        assert rel(o, o_ref) < 1e-5 and rel(S, S_ref) < 1e-5, form


@pytest.mark.parametrize("decl", list(EXPECTED), ids=lambda d: d.name)
def test_declarations_not_in_the_library(decl):
    x = draw(decl, 21)
    sizes = {"K": 5, "V": 4, "D": 6, "R": 3}
    S0 = torch.randn(2, 2, *(sizes[d] for d in decl.program.state.dims)) * 0.5
    kw = dict(initial_state=S0, output_final_state=True)
    o_ref, S_ref = rk.compile(decl, backend="reference")(*x, **kw)
    for form in rk.analyze(decl).forms:
        o, S = rk.compile(decl, backend="triton", form=form, chunk=16)(*x, **kw)
        assert rel(o, o_ref) < 1e-5 and rel(S, S_ref) < 1e-5, form


def test_non_positive_decay_runs_sequentially_not_wrong():
    from test_custom_recurrences import raw_decay
    x = draw(raw_decay, 30, positive_d=False)
    o_ref, S_ref = rk.compile(raw_decay, backend="reference")(*x, output_final_state=True)
    op = rk.compile(raw_decay, backend="triton")
    assert op.form == "chunk_gated"
    o, S = op(*x, output_final_state=True)
    assert rel(o, o_ref) < 1e-5 and rel(S, S_ref) < 1e-5


def test_default_form_and_chunk():
    op = rk.compile(rk.ops.gated_delta_rule, backend="triton")
    assert (op.form, op.tile_program.chunk) == ("chunk_wy", tb.MAX_DEFAULT_CHUNK)
    assert rk.compile(rk.ops.kda, backend="triton").tile_program.chunk == 16
    assert rk.compile(rk.ops.hgrn, backend="triton").form == "scan"


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="unknown Triton config key 'warps'"):
        rk.compile(rk.ops.gla, backend="triton", knobs={"warps": 4})
    with pytest.raises(ValueError, match="'num_warps' must be a power of two"):
        rk.compile(rk.ops.gla, backend="triton", knobs={"num_warps": 3})
    with pytest.raises(ValueError, match="'precision' must be 'auto', 'ieee' or 'tf32'"):
        rk.compile(rk.ops.gla, backend="triton", knobs={"precision": "bf16"})


def test_config_changes_the_source_and_still_computes():
    a = rk.codegen(rk.ops.gated_delta_rule, sizes={"K": 16, "V": 32}, H=2)
    b = rk.codegen(rk.ops.gated_delta_rule, sizes={"K": 16, "V": 32}, H=2,
                   knobs={"block_v": 16, "num_warps": 2})
    assert "num_warps=8" in a and "num_warps=2" in b and "(pv * 16 +" in b
    check("gated_delta_rule", "chunk_wy", 16, 20, True)


def test_codegen_errors_name_the_problem():
    with pytest.raises(ValueError, match="does not have"):
        rk.codegen(rk.ops.gla, sizes={"Q": 3})
    with pytest.raises(ValueError, match="'triton' or 'tvm'"):
        rk.codegen(rk.ops.gla, "torch")


def test_module_cache_rewrites_a_damaged_file(tmp_path, monkeypatch):
    monkeypatch.setenv("RECURKIT_CACHE_DIR", str(tmp_path))
    src = rk.codegen(rk.ops.hgrn, sizes={"D": 8}, H=1)
    tb.load_module(src, interpret=True)
    (path,) = list((tmp_path / "triton").glob("rk_*.py"))
    path.write_text(src[:100])          # truncated, as by a crash mid-write
    tb._MODULES.clear()
    tb.load_module(src, interpret=True)
    assert path.read_text() == src


GOLDEN_CASES = [("gated_delta_rule", "chunk_wy", 32), ("gla", "chunk_gated", 16)]


@pytest.mark.parametrize("name,form,chunk", GOLDEN_CASES, ids=[c[0] for c in GOLDEN_CASES])
def test_generated_source_matches_golden(name, form, chunk):
    text = rk.codegen(getattr(rk.ops, name), form=form, chunk=chunk,
                      sizes={"K": 128, "V": 128}, H=16)
    path = GOLDEN / f"{name}.{form}.triton.py.txt"
    if os.environ.get("RECURKIT_UPDATE_GOLDEN"):
        path.write_text(text)
    assert path.exists(), f"missing golden file {path}; run with RECURKIT_UPDATE_GOLDEN=1"
    assert text == path.read_text()


# --- ahead of time: every kernel of every built-in at its default config -------------------
def sources(name):
    p = decl_of(name).program
    sizes = {d: (512 if d == "D" else 128) for d in p.dims}
    out = []
    for form in forms_of(name):
        out.append((form, rk.codegen(decl_of(name), form=form, sizes=sizes, H=16)))
    return out


@pytest.mark.parametrize("arch", ["sm_90", "sm_80", "gfx942"])
@pytest.mark.parametrize("name", ALL)
def test_aot_compiles_every_kernel(name, arch):
    for form, src in sources(name):
        report = tb.aot_compile(src, arch)
        assert report, (form, "no kernels")
        for r in report:
            assert 0 <= r["shared"] <= tb.SHARED_LIMIT[arch], r
            if arch.startswith("sm_"):
                assert r["registers"] is not None, r
                assert r["spill_bytes"] == 0, (form, r)


@pytest.mark.parametrize("name", ["gated_delta_rule", "gla", "kda"])
def test_chunk_kernels_use_tensor_cores_on_sm90_for_bf16(name):
    """bf16 calls at the default config (16-bit intermediates and dot operands): every chunk
    kernel compiles for sm_90 with no spills, within shared memory, and its SASS has
    tensor-core instructions (warpgroup HGMMA or warp HMMA)."""
    p = decl_of(name).program
    form = next(f for f in forms_of(name) if f.startswith("chunk"))
    tp = lower(p, form, tb.default_chunk(p))
    report = tb.aot_compile(tb.module_source(p, tp, {"K": 128, "V": 128}, 16, None, "bf16"),
                            "sm_90", io="bf16")
    assert {r["kernel"] for r in report} == {"prep_kernel", "state_pass_kernel"}
    for r in report:
        assert r["spill_bytes"] == 0 and r["shared"] <= tb.SHARED_LIMIT["sm_90"], r
        assert r["mma"] is not None and r["mma"]["HGMMA"] + r["mma"]["HMMA"] > 0, r


def test_shipped_configs_match_by_declaration_device_and_call(tmp_path, monkeypatch):
    """A config file for a GPU model gives its knobs to calls of the same declaration (by
    content hash), form, chunk, sizes and dtype on a device of that name and capability;
    anything else, or a damaged file, gives None (the defaults)."""
    import json
    from recurkit.backends.triton import configs
    p = decl_of("gated_delta_rule").program
    entry = {"program": p.content_hash(), "name": "gated_delta_rule", "form": "chunk_wy",
             "chunk": 32, "sizes": {"K": 128, "V": 128}, "dtype": "bfloat16",
             "knobs": {"block_v": 32, "num_warps": 4}}
    path = tmp_path / "h.json"
    path.write_text(json.dumps({"device": "NVIDIA H100 80GB HBM3", "capability": "sm_90",
                                "entries": [entry]}))
    monkeypatch.setenv("RECURKIT_TRITON_CONFIGS", str(path))
    args = ("chunk_wy", 32, {"K": 128, "V": 128}, "bfloat16", "NVIDIA H100 80GB HBM3")
    assert configs.lookup(p, *args, "sm_90") == {"block_v": 32, "num_warps": 4}
    assert configs.lookup(p, *args[:-1], "NVIDIA H200", "sm_90") is None
    assert configs.lookup(p, *args, "sm_80") is None
    assert configs.lookup(p, "chunk_wy", 16, *args[2:], "sm_90") is None
    assert configs.lookup(p, "chunk_wy", 32, {"K": 64, "V": 128}, *args[3:], "sm_90") is None
    assert configs.lookup(decl_of("gla").program, *args, "sm_90") is None
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    monkeypatch.setenv("RECURKIT_TRITON_CONFIGS", str(bad))
    assert configs.lookup(p, *args, "sm_90") is None
    assert configs.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


@rk.recurrence
def _v_normalised(S: rk.State["K", "V"], q: rk.Token["K"], k: rk.Token["K"],
                  v: rk.Token["V"]):
    S = S + rk.outer(k, rk.l2norm(v))   # a sum over V: the dim the state pass splits
    return S, q @ S


def test_prologue_reductions_in_the_kernels_except_over_the_split_dim():
    """Norms over K (FLA's use_qk_l2norm_in_kernel) are computed in the kernels; a norm over
    V, which a state-pass program holds only a block of, is evaluated on the host."""
    from recurkit.backends.triton.prologue import ChunkIO
    from recurkit.ops.delta import gated_delta_rule_l2_decl
    l2 = gated_delta_rule_l2_decl.program
    assert ChunkIO(l2, lower(l2, "chunk_wy", 16).prologue).feeds == []
    vn = _v_normalised.program
    assert [n.op for n in ChunkIO(vn, lower(vn, "chunk_gated", 16).prologue).feeds] == ["sum"]
    x = [t[:1] for t in inputs("gated_delta_rule", 19)]
    kw = dict(initial_state=state("gated_delta_rule", 1), output_final_state=True,
              use_qk_l2norm_in_kernel=True)
    o_ref, S_ref = rk.ops.gated_delta_rule(*x, **kw, backend="reference")
    o, S = rk.ops.gated_delta_rule(*x, **kw, backend="triton")
    assert rel(o, o_ref) < 1e-5 and rel(S, S_ref) < 1e-5
    q, k, v = x[:3]
    o_ref, S_ref = rk.compile(_v_normalised, backend="reference")(q, k, v,
                                                                 output_final_state=True)
    o, S = rk.compile(_v_normalised, backend="triton", knobs={"block_v": 16})(
        q, k, v, output_final_state=True)
    assert rel(o, o_ref) < 1e-5 and rel(S, S_ref) < 1e-5
