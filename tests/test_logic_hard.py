"""The hard logic kernel: the gate program (folding, sharing, dead gates, slots) against the
gate-by-gate reference, and the TVM kernel against both, over nets that fold to nothing,
nets that fold nothing, negated and constant class members, odd batch sizes and block sizes,
and AVX2 code on any x86 machine."""
import pytest
import torch

import recurkit as rk
from recurkit.backends.tvm.packed import (choose_words, pack_bits, program_tables, run_hard_tvm,
                                          run_packed_tvm, vector_words)
from recurkit.lowering.gates import COUNT_CHUNK, OPS, NOT, eval_program_reference, optimize
from recurkit.lowering.packed import PackedLayer, PackedNet, eval_packed_reference
from recurkit.nn.logic import HardLogicNet

BINARY = torch.tensor([1, 2, 4, 6, 7, 8, 9, 11, 13, 14])   # the truly two-input gates
FOLDING = torch.tensor([0, 3, 5, 10, 12, 15])             # constants and one-input gates


def net_of(widths, classes, gates="all", seed=0, tau=1.0):
    g = torch.Generator().manual_seed(seed)
    layers, w = [], widths[0]
    for O in widths[1:]:
        if gates == "all":
            gs = torch.randint(0, 16, (O,), generator=g)
        else:
            pool = BINARY if gates == "binary" else FOLDING
            gs = pool[torch.randint(0, len(pool), (O,), generator=g)]
        layers.append(PackedLayer(torch.randint(0, w, (O,), generator=g),
                                  torch.randint(0, w, (O,), generator=g), gs))
        w = O
    return PackedNet(widths[0], tuple(layers), classes, tau)


NETS = {
    "all gates": net_of([30, 64, 48, 40], 4),
    "two-input gates": net_of([30, 64, 48, 40], 4, "binary", seed=1),
    "folds to constants": net_of([12, 20, 20, 6], 2, "folding", seed=2),
    "one layer": net_of([9, 30], 3, "binary", seed=3),
    "deep and narrow": net_of([6] + [8] * 10, 2, seed=4),
    "wide": net_of([100, 600, 600, 500], 10, seed=5),
}


def bits(N, F, seed):
    return torch.rand(N, F, generator=torch.Generator().manual_seed(seed)) < 0.5


@pytest.mark.parametrize("name", list(NETS))
def test_gate_program_equals_the_network(name):
    net = NETS[name]
    prog = optimize(net)
    x = bits(257, net.in_dim, 0)
    assert torch.equal(eval_program_reference(prog, x), eval_packed_reference(net, x))
    s = prog.stats
    assert s["removed"] == s["gates"] - s["ops"] == net.gate_count() - prog.gate_count()
    for r in prog.runs:
        assert r.op in OPS or r.op == NOT
        assert r.dst.numel() == r.a.numel() == r.b.numel() > 0
    for m in prog.members:
        assert m.numel() % COUNT_CHUNK == 0


def test_folding_removes_what_it_can_and_nothing_else():
    assert all(r.op == NOT for r in optimize(NETS["folds to constants"]).runs)
    layer = PackedLayer(torch.tensor([0, 1, 0]), torch.tensor([1, 0, 1]),
                        torch.tensor([1, 1, 6]))   # a & b twice (once mirrored), a ^ b
    prog = optimize(PackedNet(2, (layer,), 1, 1.0))
    assert prog.stats["shared"] == 1 and prog.gate_count() == 2
    # not(a) & b, fed by a NOT: one ANDN-type op, no NOT run
    l1 = PackedLayer(torch.tensor([0, 1]), torch.tensor([0, 1]), torch.tensor([12, 3]))
    l2 = PackedLayer(torch.tensor([0]), torch.tensor([1]), torch.tensor([1]))
    prog = optimize(PackedNet(2, (l1, l2), 1, 1.0))
    assert [r.op for r in prog.runs] == [2]
    x = bits(64, 2, 1)
    assert torch.equal(eval_program_reference(prog, x),
                       eval_packed_reference(PackedNet(2, (l1, l2), 1, 1.0), x))


def test_unread_gates_are_dropped():
    l1 = PackedLayer(torch.tensor([0, 1, 2, 0]), torch.tensor([1, 2, 0, 2]),
                     torch.tensor([1, 6, 7, 14]))
    l2 = PackedLayer(torch.tensor([0, 1]), torch.tensor([1, 0]), torch.tensor([6, 8]))
    prog = optimize(PackedNet(3, (l1, l2), 1, 1.0))
    assert prog.stats["dead"] == 2 and prog.gate_count() == 4


@pytest.mark.parametrize("name", list(NETS))
@pytest.mark.parametrize("N, words", [(1, None), (65, 3), (1000, None)])
def test_tvm_kernel_equals_the_network(name, N, words):
    net = NETS[name]
    x = bits(N, net.in_dim, N)
    got = HardLogicNet(net, "tvm", words).counts(x)
    assert got.shape == (N, net.classes)
    assert torch.equal(got.long(), eval_packed_reference(net, x))


def test_negated_and_constant_members_are_counted():
    # outputs: not x0 (a NOT member), const 1, x1 (an input as a member), x0 nand x1
    layer = PackedLayer(torch.tensor([0, 0, 1, 0]), torch.tensor([0, 1, 1, 1]),
                        torch.tensor([12, 15, 3, 14]))
    net = PackedNet(2, (layer,), 2, 0.5)
    prog = optimize(net)
    assert prog.const == (1, 0) and any(r.op == NOT for r in prog.runs)
    x = bits(130, 2, 7)
    want = eval_packed_reference(net, x)
    assert torch.equal(HardLogicNet(net, "tvm").counts(x).long(), want)
    assert torch.equal(HardLogicNet(net, "tvm")(x), want.float() / 0.5)


def test_avx2_code_on_any_x86_machine(monkeypatch):
    from recurkit.backends.tvm import build
    monkeypatch.setenv("RECURKIT_TVM_MCPU", "haswell")
    assert vector_words() == 4
    net = NETS["all gates"]
    prog = optimize(net)
    words = choose_words(prog)
    assert words % 4 == 0
    x = bits(300, net.in_dim, 3)
    got = run_packed_tvm(prog, pack_bits(x, words), words, program_tables(prog, words))
    assert torch.equal(got[:300].long(), eval_packed_reference(net, x))
    got = run_hard_tvm(prog, x, words, None, scores=False)
    assert torch.equal(got[:300].long(), eval_packed_reference(net, x))
    assert build._LANES.get("haswell") == 8


def test_hard_net_reports_what_it_removed_and_refuses_bad_words():
    hard = HardLogicNet(NETS["all gates"], "tvm")
    assert {"gates", "ops", "removed", "folded", "shared", "dead", "optimize_s"} <= set(hard.stats)
    assert "gates ->" in repr(hard)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="words must be"):
            HardLogicNet(NETS["all gates"], "tvm", bad)


def test_compiled_model_equals_eval_model_for_every_block_size():
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(rk.nn.LogicLayer(24, 64, generator=g),
                                rk.nn.LogicLayer(64, 60, generator=g),
                                rk.nn.GroupSum(3, tau=2.5)).eval()
    x = bits(333, 24, 9)
    with torch.no_grad():
        want = model(x.float())
    for words in (None, 2, vector_words()):
        assert torch.equal(rk.nn.compile_hard(model, words=words)(x), want)


@pytest.mark.parametrize("name", ["all gates", "folds to constants", "one layer"])
def test_triton_kernel_runs_the_program(name):
    net = NETS[name]   # in Triton's interpreter on CPU tensors
    x = bits(130, net.in_dim, 11)
    hard = HardLogicNet(net, "triton")
    assert torch.equal(hard.counts(x).long(), eval_packed_reference(net, x))
    assert torch.equal(hard(x), eval_packed_reference(net, x).float() / net.tau)


@pytest.mark.parametrize("arch", ["sm_90", "gfx942"])
def test_triton_hard_kernel_compiles_ahead_of_time(arch):
    from recurkit.backends.triton.packed import aot_report
    r = aot_report(optimize(NETS["wide"]), arch)
    if arch.startswith("sm_"):   # (ROCm's compile reports no spills: it compiles, that is all)
        assert r["spill_bytes"] == 0 and r["registers"] <= 128, r


def test_triton_kernel_blocks_and_launches():
    """Other block shapes and a call of several launches (the interpreter's launch covers
    ``INTERPRET_WORDS`` words) count the same."""
    from recurkit.backends.triton import packed as tp
    net = NETS["one layer"]
    prog = optimize(net)
    x = bits(tp.INTERPRET_WORDS * 64 + 77, net.in_dim, 12)
    want = eval_packed_reference(net, x)
    bufs = tp.program_buffers(prog, x.device)
    got = tp.run_packed_triton(prog, x, bufs, block_w=4, block_o=32, block_m=8)
    assert got.shape == (-(-x.shape[0] // 64) * 64, net.classes)
    assert torch.equal(got[:x.shape[0]].long(), want)
    with pytest.raises(ValueError, match="block_m"):
        tp.run_packed_triton(prog, x[:5], bufs, block_m=3)
    assert tp.launch_words(prog, "cuda", 16, 8 * prog.slots * 100) == 96


@pytest.mark.parametrize("backend", ["tvm", "triton", "torch"])
def test_every_class_count_constant(backend):
    """Every member folds to a constant: no member slot is left for the kernel to read."""
    net = PackedNet(2, (PackedLayer(torch.tensor([0, 1, 0, 1]), torch.tensor([1, 0, 1, 0]),
                                    torch.tensor([15, 0, 15, 15])),), 2, 3.0)
    x = bits(70, 2, 13)
    hard = HardLogicNet(net, backend)
    assert torch.equal(hard.counts(x).long(), eval_packed_reference(net, x))
    assert torch.equal(hard(x), torch.tensor([[1 / 3, 2 / 3]]).expand(70, 2))
