"""Models of rk.nn layers train under DistributedDataParallel and FSDP2 (``fully_shard``)
with gloo on CPU, two processes spawned by the test: their gradients equal one process's
on the whole batch."""
import copy
import datetime
import os
import tempfile

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import recurkit as rk

T, D = 19, 16


def model():
    torch.manual_seed(0)
    return nn.Sequential(rk.nn.GatedDeltaNet(D, num_heads=2), nn.Linear(D, D),
                         rk.nn.GLA(D, num_heads=2))


def _worker(rank, world, path, wrap):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank,
                           world_size=world, timeout=datetime.timedelta(seconds=300))
    try:
        net = model()
        ref = copy.deepcopy(net)
        x = torch.randn(world, T, D, generator=torch.Generator().manual_seed(1))
        ref(x).square().mean().backward()   # one process: the whole batch
        if wrap == "ddp":
            from torch.nn.parallel import DistributedDataParallel
            dp = DistributedDataParallel(net)
        else:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard
            mesh = init_device_mesh("cpu", (world,))
            for layer in net:
                fully_shard(layer, mesh=mesh)
            dp = fully_shard(net, mesh=mesh)
        dp(x[rank:rank + 1]).square().mean().backward()   # each rank its share
        for (n, p), (_, q) in zip(net.named_parameters(), ref.named_parameters()):
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            err = (g - q.grad).abs().max().item() / q.grad.abs().max().clamp_min(1e-8).item()
            assert err < 1e-5, (wrap, n, err)
    finally:
        dist.barrier()
        dist.destroy_process_group()
    os._exit(0)   # skip the C++ teardown: a gloo / torch thread aborted it now and then


@pytest.mark.parametrize("wrap", ["ddp", "fsdp2"])
def test_layers_train_under_data_parallel_wrappers(wrap):
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(2, os.path.join(d, "rendezvous"), wrap), nprocs=2)
