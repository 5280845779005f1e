"""Context parallelism (``op(..., cp_group=group)``): a sequence split along T over 2 and 3
gloo ranks on CPU, spawned by the test, gives every rank its output slice, the whole final
state and its inputs' gradients equal to one process's (fp32 < 1e-5), with uneven slices,
an initial state, and varlen sequences that cross the slices' boundaries."""
import datetime
import os
import tempfile

import pytest
import torch
import torch.multiprocessing as mp

import recurkit as rk
from cases import matrix_inputs, vector_inputs


@rk.recurrence
def value_gated(S: rk.State["K", "V"], q: rk.Token["K"], k: rk.Token["K"],
                v: rk.Token["V"], gv: rk.Token["V"], gk: rk.Token["K"]):
    S = rk.exp(gk) * (rk.exp(gv) * S) + rk.outer(k, v)   # gates on both sides
    return S, 0.5 * (q @ S)


@rk.recurrence
def gated_erase(S: rk.State["K", "V"], q: rk.Token["K"], k: rk.Token["K"],
                v: rk.Token["V"], b: rk.Token[()], gk: rk.Token["K"], z: rk.Token["V"]):
    S = rk.exp(gk) * S
    S = S - rk.sigmoid(b) * rk.outer(rk.l2norm(k), rk.l2norm(k) @ S) + rk.outer(k, v)
    return S, rk.silu(z) * (q @ S)


B, H, K, V = 2, 2, 6, 5


def inputs(name, T, batch):
    gen = torch.Generator().manual_seed(1)
    if name == "hgrn":
        return rk.ops.hgrn.decl, vector_inputs("hgrn", batch, T, H, K), (H, K)
    if name in ("gated_delta_rule", "gla", "kda"):
        return (getattr(rk.ops, name).decl, matrix_inputs(name, batch, T, H, K, V),
                (H, K, V))
    if name in ("delta_product", "mimo"):   # sub-steps
        import test_substeps as m
        decl = m.DECLS[name]
        xs = m.inputs(decl, batch, T, H)
        return decl, [xs[s.name] for s in decl.program.call_inputs], (
            H, *(m.SIZES[d] for d in decl.program.state.dims))
    if name in ("rot_gdn", "rot_gla", "complex_lru", "rot_product", "rope_gla"):
        import test_rotation as m
        decl = getattr(m, name)
        xs = m.draw(decl, batch, T, H)
        return decl, [xs[s.name] for s in decl.program.call_inputs], (
            H, *(m.SIZES[d] for d in decl.program.state.dims))
    decl = {"value_gated": value_gated, "gated_erase": gated_erase}[name]
    xs = []
    for s in decl.program.call_inputs:
        x = torch.randn(batch, T, H, *({"K": K, "V": V}[d] for d in s.dims), generator=gen)
        if s.name.startswith("g"):
            x = -0.02 - 0.4 * torch.rand(x.shape, generator=gen)
        xs.append(x)
    return decl, xs, (H, K, V)


def _losses(o, S, rank, T0, T1, gen_seed=3):
    gen = torch.Generator().manual_seed(gen_seed)
    Wo = torch.randn(o.shape[0], T1, *o.shape[2:], generator=gen)[:, T0:] if o is not None \
        else None
    return Wo, torch.randn(S.shape, generator=gen)


def _worker(rank, world, path, name, lens, varlen, backend, final_loss=True):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank,
                           world_size=world, timeout=datetime.timedelta(seconds=300))
    try:
        T = sum(lens)
        decl, xs, sd = inputs(name, T, 1 if varlen else B)
        cu = torch.tensor([0, 3, 3, T // 2, T - 1, T]) if varlen else None
        N = len(cu) - 1 if cu is not None else B
        S0 = 0.5 * torch.randn(N, *sd, generator=torch.Generator().manual_seed(2))
        op = rk.compile(decl, backend=backend) if backend != "builtin" else (
            lambda *a, **kw: getattr(rk.ops, name)(*a, **kw))   # FLA's signature
        gen = torch.Generator().manual_seed(3)
        # one process: the whole sequence
        full = [x.clone().requires_grad_() for x in xs]
        s0 = S0.clone().requires_grad_()
        o, S = op(*full, initial_state=s0, output_final_state=True, cu_seqlens=cu)
        Wo, WS = torch.randn(o.shape, generator=gen), torch.randn(S.shape, generator=gen)
        ((o * Wo).sum() + (S * WS).sum()).backward()
        # the ranks: each its slice, the final state's loss counted once (rank 0)
        t0, t1 = sum(lens[:rank]), sum(lens[:rank + 1])
        part = [x[:, t0:t1].clone().requires_grad_() for x in xs]
        s0p = S0.clone().requires_grad_()
        o_r, S_r = op(*part, initial_state=s0p, output_final_state=True, cu_seqlens=cu,
                      cp_group=dist.group.WORLD)
        if not final_loss:   # the output's loss alone (the one process's too)
            full = [x.clone().requires_grad_() for x in xs]
            s0 = S0.clone().requires_grad_()
            o, S = op(*full, initial_state=s0, output_final_state=True, cu_seqlens=cu)
            (o * Wo).sum().backward()
        loss = (o_r * Wo[:, t0:t1]).sum() + (
            (S_r * WS).sum() if rank == 0 and final_loss else 0.0)
        loss.backward()

        def rel(a, b):
            return ((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item()
        assert rel(o_r, o[:, t0:t1]) < 1e-5, ("output", rel(o_r, o[:, t0:t1]))
        assert rel(S_r, S) < 1e-5, ("final state", rel(S_r, S))
        scale = max(x.grad.abs().max().item() for x in full)
        for x, xp in zip(full, part):
            err = (xp.grad - x.grad[:, t0:t1]).abs().max().item() / scale
            assert err < 1e-5, ("gradient", err)
        g0 = s0p.grad.clone()
        dist.all_reduce(g0)   # each rank's share of the replicated initial state's
        assert rel(g0, s0.grad) < 1e-5, ("initial state gradient", rel(g0, s0.grad))
    finally:
        dist.barrier()   # no rank leaves (and drops the store) while another still talks
        dist.destroy_process_group()
    os._exit(0)   # skip the C++ teardown: a gloo / torch thread aborted it now and then


def spawn(name, lens, varlen=False, backend="torch", final_loss=True):
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(len(lens), os.path.join(d, "rendezvous"), name, lens, varlen,
                                backend, final_loss), nprocs=len(lens))


@pytest.mark.parametrize("name", ["gated_delta_rule", "gla", "kda", "hgrn", "value_gated",
                                  "gated_erase"])
def test_two_ranks_equal_one_process(name):
    spawn(name, [9, 20])


@pytest.mark.parametrize("name", ["gated_delta_rule", "gated_erase", "hgrn"] + [
    pytest.param(n, marks=pytest.mark.slow) for n in ("gla", "kda")])
def test_three_uneven_ranks_with_varlen_crossing_the_slices(name):
    spawn(name, [7, 1, 16], varlen=True)


@pytest.mark.parametrize("name", ["delta_product", "rot_gdn"] + [
    pytest.param(n, marks=pytest.mark.slow) for n in ("mimo", "rot_gla", "complex_lru",
                                                      "rot_product")])
def test_sub_steps_and_rotating_states(name):
    spawn(name, [6, 11], varlen=name in ("rot_gdn", "delta_product"))


def test_a_loss_of_the_output_alone():
    """The first rank's output reads nothing gathered; its backward still joins the
    all-gather's (else the others wait for it) and gets the later ranks' gradients."""
    spawn("gla", [5, 6], final_loss=False)


def test_rotations_of_state_free_values_alone():
    spawn("rope_gla", [7, 5])


def test_a_refused_slice_is_refused_on_every_rank():
    with pytest.raises(Exception, match="rank 0 of the group was refused: .*empty"):
        spawn("gla", [0, 6])


def test_a_builtin_takes_cp_group():
    spawn("gated_delta_rule", [12, 4], backend="builtin")


def test_the_compiled_kernels_on_three_ranks():
    spawn("kda", [5, 11, 8], backend="tvm")


def test_sequential_only_declarations_are_refused():
    @rk.recurrence
    def nonlinear(h: rk.State["D"], x: rk.Token["D"]):
        h = rk.tanh(h + x)
        return h, h
    op = rk.compile(nonlinear, backend="torch")
    with pytest.raises(ValueError, match="cp_group.*only sequentially"):
        op(torch.randn(1, 4, 1, 3), cp_group=object())


def _tuning_worker(rank, world, path, cache):
    import torch.distributed as dist
    from recurkit.autotune import search as search_mod
    import recurkit.autotune as at
    os.environ["RECURKIT_CACHE_DIR"] = cache   # a shared path
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank,
                           world_size=world, timeout=datetime.timedelta(seconds=300))
    try:
        search_mod.EFFORT["quick"] = {**search_mod.EFFORT["quick"], "exhaustive": 3,
                                      "budget": 60}
        if rank:
            def refuse(*a, **kw):
                raise AssertionError("only the first rank tunes")
            at.tune = refuse
        decl, xs, sd = inputs("gated_delta_rule", 24, B)
        op = rk.compile(decl, autotune=True)
        t0, t1 = (0, 10) if rank == 0 else (10, 24)
        with torch.no_grad():
            o, S = op(*[x[:, t0:t1] for x in xs], output_final_state=True,
                      cp_group=dist.group.WORLD)
        ref = rk.compile(decl, backend="reference")(*xs, output_final_state=True)
        assert (o - ref[0][:, t0:t1]).abs().max() < 1e-5 and (S - ref[1]).abs().max() < 1e-5
        got = [None] * world
        dist.all_gather_object(got, op.tuned_candidate)
        assert got[0] is not None and all(g == got[0] for g in got), got
    finally:
        dist.barrier()
        dist.destroy_process_group()
    os._exit(0)   # skip the C++ teardown: a gloo / torch thread aborted it now and then


def test_one_rank_tunes_and_the_others_receive_its_winner():
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_tuning_worker, args=(2, os.path.join(d, "rendezvous"), d), nprocs=2)
