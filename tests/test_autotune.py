"""The autotuner: verified candidates only, crashes and hangs survived, a cache that is safe
with concurrent writers and rebuilt when corrupt, and cache hits that time nothing."""
import json
import subprocess
import sys
import textwrap
import time

import pytest

import recurkit as rk
from recurkit.autotune import Candidate, TuneCache, config_space, prune_static, tune
from recurkit.autotune import search as search_mod

P = rk.ops.gated_delta_rule.decl.program
SHAPE = {"B": 1, "T": 48, "H": 2, "N": 1, "sizes": {"K": 4, "V": 4}}


def py(name, **knobs):
    return Candidate(f"py:tune_runners:{name}", "sequential", None, tuple(sorted(knobs.items())))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RECURKIT_CACHE_DIR", str(tmp_path))
    return TuneCache()


def test_wrong_crashing_hanging_and_failing_candidates_are_never_chosen(cache):
    cands = [py("good", delay=0.02), py("wrong"), py("crash"), py("hang"), py("raises"),
             py("good", delay=0.0)]
    res = tune(P, SHAPE, candidates=cands, cache=cache, progress=False, timeout=8)
    why = {c.backend.split(":")[-1]: w for c, w in res.failures()}
    assert "wrong answer" in why["wrong"]
    assert "crashed the measuring process" in why["crash"]
    assert "hung" in why["hang"]
    assert "does not compile" in why["raises"]
    assert res.best == py("good", delay=0.0)          # the fast wrong one lost
    stored = json.loads(open(cache.path).read())["entries"]
    assert [Candidate.from_json(e["best"]) for e in stored.values()] == [res.best]


def test_second_tune_is_a_cache_hit_with_no_timing(cache, monkeypatch):
    cands = [py("good"), py("good", delay=0.01)]
    first = tune(P, SHAPE, candidates=cands, cache=cache, progress=False, isolate=False)
    assert not first.from_cache and len(first.tried) == 2

    def no_timing(*a, **k):
        raise AssertionError("a cache hit must not measure anything")
    monkeypatch.setattr(search_mod, "measure", no_timing)
    monkeypatch.setattr(search_mod.Worker, "run", no_timing)
    t = time.perf_counter()
    again = tune(P, SHAPE, candidates=cands, cache=cache, progress=False)
    assert again.from_cache and again.best == first.best and again.tried == []
    assert time.perf_counter() - t < 0.5
    other = dict(SHAPE, T=300)   # another shape bucket is not a hit
    with pytest.raises(RuntimeError, match="must not measure"):
        tune(P, other, candidates=cands, cache=cache, progress=False, isolate=False)


def test_corrupt_cache_is_reported_and_rebuilt(cache):
    import os
    os.makedirs(os.path.dirname(cache.path), exist_ok=True)
    with open(cache.path, "w") as f:
        f.write('{"version": 1, "entries": {"abc": ')     # truncated mid-write
    with pytest.warns(RuntimeWarning, match="unreadable"):
        res = tune(P, SHAPE, candidates=[py("good")], cache=cache, progress=False,
                   isolate=False)
    data = json.loads(open(cache.path).read())
    assert len(data["entries"]) == 1 and res.best == py("good")


def test_two_processes_tuning_at_once_leave_a_consistent_cache(tmp_path):
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(__file__.rsplit('/', 1)[0])!r})
        import recurkit as rk
        from recurkit.autotune import Candidate, tune
        P = rk.ops.gated_delta_rule.decl.program
        for T in range(int(sys.argv[1]), int(sys.argv[1]) + 4):
            shape = {{"B": 1, "T": 2 ** T, "H": 2, "N": 1, "sizes": {{"K": 4, "V": 4}}}}
            tune(P, shape, candidates=[Candidate("py:tune_runners:good", "sequential")],
                 progress=False, isolate=False)
    """)
    env = {**__import__("os").environ, "RECURKIT_CACHE_DIR": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", script, str(start)], env=env)
             for start in (3, 7)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    entries = json.loads((tmp_path / "autotune" / "tuning.json").read_text())["entries"]
    assert len(entries) == 8    # nothing lost to the other writer


def test_search_is_reproducible_with_a_seed(cache):
    cands = [py("good", delay=d / 1000) for d in range(30)]
    runs = [tune(P, SHAPE, candidates=cands, cache=cache, progress=False, isolate=False,
                 seed=s, use_cache=False) for s in (1, 1, 2)]
    orders = [[c for c, _ in r.tried] for r in runs]
    assert len(orders[0]) == search_mod.EFFORT["quick"]["exhaustive"] < len(cands)
    assert orders[0] == orders[1] and orders[0] != orders[2]


def test_config_space_follows_the_analysis():
    space = config_space(P)
    assert space[0] == Candidate("tvm", "sequential", None, space[0].knobs)
    assert {c.form for c in space} == {"chunk_wy", "sequential"}
    assert {c.chunk for c in space if c.form == "chunk_wy"} == {16, 32, 64, 128}
    assert {c.form for c in config_space(rk.ops.hgrn.decl.program)} == {"scan", "sequential"}
    gpu = config_space(P, "cuda", "quick")
    assert gpu[0].backend == "triton" and all(c.backend == "triton" for c in gpu)


def test_static_pruning_drops_kernels_that_spill():
    p = rk.ops.dplr_delta_rule.decl.program
    sizes = {"K": 128, "V": 128}
    spills = Candidate("triton", "chunk_wy", 16, (("num_warps", 16),))   # state pass spills
    fine = Candidate("triton", "sequential", None, (("num_warps", 4),))
    kept, dropped = prune_static(p, [spills, fine, Candidate("tvm", "sequential")], sizes, 16)
    assert kept == [fine, Candidate("tvm", "sequential")]
    assert "spilled" in dropped[spills]


def test_compile_autotune_runs_the_winner_and_checks_arguments(tmp_path, monkeypatch):
    monkeypatch.setenv("RECURKIT_CACHE_DIR", str(tmp_path))
    import torch
    x = [torch.randn(1, 40, 2, 4), torch.nn.functional.normalize(torch.randn(1, 40, 2, 4), dim=-1),
         torch.randn(1, 40, 2, 4), -torch.rand(1, 40, 2) * 0.1, torch.rand(1, 40, 2)]
    monkeypatch.setitem(search_mod.EFFORT, "quick", {**search_mod.EFFORT["quick"],
                                                     "exhaustive": 3, "budget": 60})
    op = rk.compile(rk.ops.gated_delta_rule, autotune=True)
    o, S = op(*x, output_final_state=True)
    o_ref, S_ref = rk.compile(rk.ops.gated_delta_rule, backend="reference")(
        *x, output_final_state=True)
    assert torch.allclose(o, o_ref, atol=1e-5) and torch.allclose(S, S_ref, atol=1e-5)
    assert op.tuned_candidate is not None
    # the same config compiled again shares the custom op, and what it tuned
    assert rk.compile(rk.ops.gated_delta_rule, autotune=True).tuned_candidate == \
        op.tuned_candidate
    with pytest.raises(ValueError, match="autotune must be"):
        rk.compile(rk.ops.gla, autotune="fast")
    with pytest.raises(ValueError, match="knobs with autotune: name the backend"):
        rk.compile(rk.ops.gla, autotune=True, knobs={"block": 0})(
            *[torch.randn(1, 8, 1, 4)] * 3, -torch.rand(1, 8, 1, 4))


def test_compile_autotune_within_a_chosen_backend(tmp_path, monkeypatch):
    """backend="tvm" with autotune tunes TVM's forms, chunks and knobs only, caches the
    winner under a key of its own, and a second op reuses it without measuring."""
    monkeypatch.setenv("RECURKIT_CACHE_DIR", str(tmp_path))
    import torch
    x = [torch.randn(1, 40, 2, 4), torch.nn.functional.normalize(torch.randn(1, 40, 2, 4), dim=-1),
         torch.randn(1, 40, 2, 4), -torch.rand(1, 40, 2) * 0.1, torch.rand(1, 40, 2)]
    monkeypatch.setitem(search_mod.EFFORT, "quick", {**search_mod.EFFORT["quick"],
                                                     "exhaustive": 4, "budget": 60})
    tried = []
    real = search_mod.Worker.run

    def spy(self, program, cand, *a, **k):
        tried.append(cand)
        return real(self, program, cand, *a, **k)
    monkeypatch.setattr(search_mod.Worker, "run", spy)
    op = rk.compile(rk.ops.gated_delta_rule, backend="tvm", autotune="quick")
    o, S = op(*x, output_final_state=True)
    o_ref, S_ref = rk.compile(rk.ops.gated_delta_rule, backend="reference")(
        *x, output_final_state=True)
    assert torch.allclose(o, o_ref, atol=1e-5) and torch.allclose(S, S_ref, atol=1e-5)
    assert tried and all(c.backend == "tvm" for c in tried)
    assert op.tuned_candidate.backend == "tvm"
    entries = TuneCache().entries()
    assert len(entries) == 1 and next(iter(entries.values()))["best"]["backend"] == "tvm"

    def no_timing(*a, **k):
        raise AssertionError("a cache hit must not measure anything")
    monkeypatch.setattr(search_mod.Worker, "run", no_timing)
    shape = {"B": 1, "T": 40, "H": 2, "N": 1, "sizes": {"K": 4, "V": 4}}
    hit = tune(P, shape, backend="tvm", progress=False)
    assert hit.from_cache and hit.best == op.tuned_candidate
    # form= narrows it further, and is another cache entry (so it tunes: measuring now fails)
    with pytest.raises(AssertionError, match="must not measure"):
        rk.compile(rk.ops.gated_delta_rule, backend="tvm", form="chunk_wy",
                   autotune="quick")(*x)


def test_config_space_order_by_form_then_backend():
    """The unnarrowed space: the default, then per exact form (fastest form first) each tuned
    backend's candidates in rank order (the seeded search samples from this order)."""
    space = config_space(P, effort="quick")
    seen = []
    for c in space[1:]:
        if not seen or seen[-1] != (c.form, c.backend):
            seen.append((c.form, c.backend))
    assert seen == [("chunk_wy", "tvm"), ("chunk_wy", "torch"), ("sequential", "tvm")]
    hgrn = config_space(rk.ops.hgrn.decl.program, effort="quick")
    assert [(c.backend, c.form) for c in hgrn[1:3]] == [("tvm", "scan"), ("torch", "scan")]
    with pytest.raises(ValueError, match="backend 'tvm' does not run on 'cuda'"):
        config_space(P, "cuda", backend="tvm")


def test_config_space_narrowed_by_backend_form_chunk_and_knobs():
    tvm = config_space(P, backend="tvm")
    assert tvm[0] == config_space(P)[0] and {c.backend for c in tvm} == {"tvm"}
    assert {c.form for c in tvm} == {"chunk_wy", "sequential"}
    wy = config_space(P, backend="tvm", form="chunk_wy", chunk=32)
    assert wy == [Candidate("tvm", "chunk_wy", 32)]
    torch_only = config_space(P, backend="torch", form="chunk_wy")
    assert {(c.backend, c.form) for c in torch_only} == {("torch", "chunk_wy")}
    assert {c.chunk for c in torch_only} == {16, 32, 64, 128}
    blocked = config_space(P, backend="tvm", form="sequential", knobs={"block": 0})
    assert len(blocked) > 1 and all(c.knob_dict["block"] == 0 for c in blocked)
    with pytest.raises(ValueError, match="unknown TVM knob 'tile'"):
        config_space(P, backend="tvm", knobs={"tile": 1})
    with pytest.raises(ValueError, match="form 'scan' is not exact"):
        config_space(P, backend="tvm", form="scan")


def test_cli_tune_and_cache(tmp_path):
    env = {**__import__("os").environ, "RECURKIT_CACHE_DIR": str(tmp_path)}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "recurkit.cli", *args], env=env,
                              capture_output=True, text=True, timeout=300)
    r = cli("tune", "recurkit.ops:hgrn", "--shape", "T=64,H=2,D=8")
    assert r.returncode == 0, r.stderr
    assert "hgrn: best" in r.stdout and "tuned in" in r.stdout
    assert "(cached)" in cli("tune", "recurkit.ops:hgrn", "--shape", "T=64,H=2,D=8").stdout
    assert "1 tuning results" in cli("cache", "list").stdout
    assert "removed 1" in cli("cache", "clear").stdout
    bad = cli("tune", "recurkit.ops:hgrn", "--shape", "T=64,D=8")
    assert bad.returncode != 0 and "missing H" in bad.stderr


def test_gpu_tuning_without_a_gpu_ranks_by_the_traffic_model(monkeypatch):
    """No GPU here: tune(device="cuda") drops what does not compile cleanly for the arch,
    ranks the chunk-form candidates by their modelled roofline time and caches nothing."""
    import torch
    from recurkit.autotune import tune
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: tuning measures")
    p = rk.ops.gated_delta_rule.decl.program
    shape = {"B": 1, "T": 4096, "H": 16, "N": 1, "sizes": {"K": 128, "V": 128}}
    cands = [Candidate("triton", "chunk_wy", 32, ()),
             Candidate("triton", "chunk_wy", 32, (("block_v", 16),)),
             Candidate("triton", "sequential", None, ())]
    res = tune(p, shape, device="cuda", dtype="bfloat16", candidates=cands, progress=False)
    secs = {c: r["seconds"] for c, r in res.tried}
    assert all(r["modelled"] == "h100" for _, r in res.tried)
    assert "no traffic model" in res.dropped[cands[2]]
    # block_v 16 reads the key-side inputs 4x as often as 64: more bytes, more time
    assert secs[cands[1]] > secs[cands[0]] > 0 and res.best == cands[0]
    assert res.default_seconds == secs[cands[0]] and not res.from_cache
