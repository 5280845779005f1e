"""The fusion passes over tile programs (lowering.fuse): what they move, and that they leave
their input alone. Their results run in the Triton backend, checked against the reference
interpreter for every built-in and test declaration in tests/test_triton_backend.py."""
from __future__ import annotations

import pytest

import recurkit as rk
from recurkit.lowering.forms import lower
from recurkit.lowering.fuse import _chain, fuse_output, optimize, output_name, prune, rematerialize
from recurkit.lowering.tile import stage_inputs, verify_tile_program
from test_lowering import decl_of

CHUNKED = [(n, f) for n in rk.ops.ALL for f in rk.analyze(decl_of(n)).forms
           if f.startswith("chunk")]


@pytest.mark.parametrize("name,form", CHUNKED, ids=[f"{n}-{f}" for n, f in CHUNKED])
def test_optimize_leaves_two_stages_and_no_entering_states(name, form):
    tp = lower(decl_of(name).program, form, 16)
    before = [(len(s.ops), s.outputs) for s in tp.stages]
    opt = optimize(tp)
    assert [(len(s.ops), s.outputs) for s in tp.stages] == before   # input untouched
    verify_tile_program(opt)
    assert [s.kind for s in opt.stages] == ["chunk", "loop"]
    assert opt.meta["passes"][:2] == ("fuse_output", "rematerialize")
    loop = opt.stages[-1]
    S = loop.carried[0]
    assert set(loop.outputs) == {output_name(tp), S}   # nu, S_in: never stored
    # what crosses from the chunk stage is only what is not cheap to recompute
    known = {k: ("i", *n.dims) for k, n in tp.prologue.items()}
    known.update({op.out: op.axes for op in opt.stages[0].ops})
    crossing = set(stage_inputs(loop, known)) - set(tp.prologue)
    for x in crossing:
        assert _chain(opt.stages[0], x) is None, x
    assert not any(op.op == "invert_unit_lower" for op in loop.ops)


def test_gdn_crossing_values_are_the_solve_and_the_attention():
    opt = optimize(lower(decl_of("gated_delta_rule").program, "chunk_wy", 32))
    assert opt.stages[0].outputs == ("Yc", "bZ", "A_a")
    names = {op.out for op in opt.stages[1].ops}
    assert {"q_decayed", "a_end", "decay_end", "G"} <= names   # recomputed in the loop


def test_gla_chunk_write_is_recomputed_in_the_loop():
    opt = optimize(lower(decl_of("gla").program, "chunk_gated", 16))
    assert opt.stages[0].outputs == ("o_intra",)
    W = next(op for op in opt.stages[1].ops if op.out == "W")
    assert W.op == "contract" and W.attr("over") == ("i",)


def test_passes_return_their_input_when_nothing_applies():
    tp = optimize(lower(decl_of("gated_delta_rule").program, "chunk_wy", 16))
    assert fuse_output(tp) is tp and rematerialize(tp) is tp and prune(tp) is tp
    seq = lower(decl_of("gated_delta_rule").program, "sequential")
    assert optimize(seq) is seq
