"""Sliced BatchNorm with statistics over DDP ranks: two gloo processes, each with half the batch, give what one
process gives on the whole batch (outputs, running statistics, input and parameter gradients)."""

from __future__ import annotations

import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dsnet.layers.sliced import SlicedBatchNorm2d

CH, SLOT, WIDTH = 6, 1, 4


def _setup(seed: int = 0) -> tuple[SlicedBatchNorm2d, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    bn = SlicedBatchNorm2d(CH, num_slots=3, momentum=0.3)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(CH, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(CH, generator=g))
    x = torch.randn(8, WIDTH, 5, 5, generator=g) * 3 + 2
    probe = torch.randn(8, WIDTH, 5, 5, generator=g)  # the loss: sum(out * probe)
    return bn.train(), x, probe


def _rank(rank: int, port: int, queue) -> None:  # noqa: ANN001
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        bn, x, probe = _setup()
        bn.sync = True
        part = x[rank * 4 : (rank + 1) * 4].clone().requires_grad_(True)
        out = bn(part, SLOT)
        (out * probe[rank * 4 : (rank + 1) * 4]).sum().backward()
        grads = torch.stack([bn.weight.grad, bn.bias.grad])
        dist.all_reduce(grads)  # the loss summed over ranks: parameter gradients add up
        tensors = (out.detach(), part.grad, grads, bn.running_mean, bn.running_var)
        queue.put((rank, *(t.numpy().copy() for t in tensors)))  # numpy: no shared-memory handles to outlive
    finally:
        dist.destroy_process_group()


def test_two_ranks_equal_one_process_on_the_whole_batch():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted((queue.get(timeout=120) for _ in procs), key=lambda r: r[0])
    results = [(r[0], *(torch.from_numpy(a) for a in r[1:])) for r in results]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0

    bn, x, probe = _setup()
    x = x.clone().requires_grad_(True)
    out = bn(x, SLOT)
    (out * probe).sum().backward()
    torch.testing.assert_close(torch.cat([r[1] for r in results]), out.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([r[2] for r in results]), x.grad, atol=1e-5, rtol=1e-5)
    for _, _, _, grads, mean, var in results:
        torch.testing.assert_close(grads, torch.stack([bn.weight.grad, bn.bias.grad]), atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(mean, bn.running_mean)
        torch.testing.assert_close(var, bn.running_var)
    assert not torch.equal(bn.running_mean[SLOT, :WIDTH], torch.zeros(WIDTH))  # the statistics moved
    assert torch.equal(bn.running_mean[0], torch.zeros(CH))  # other slots untouched
