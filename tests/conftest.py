import os

# One OpenMP thread for the whole suite, set before torch starts its pool: the fault-tolerance trials fork the test
# process, and a child forked from a process with a live multi-threaded OpenMP pool can hang (seen in CI without
# OMP_NUM_THREADS). Equal thread counts also give equal floating-point sums. A value set by the caller is kept.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import dsnet


def perturb(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give BN affine, BN statistics and the gate head non-trivial values.

    Fresh models have unit scales and zero/one statistics that do not match
    their activations, which would let a wrong statistics slot or a wrong prefix
    go unnoticed, and a gate that routes every sample the same way. So: random
    affine, then statistics measured per sub-network on random images (each
    slot different), then a strong random gate head (and exit head).
    """
    g = torch.Generator().manual_seed(seed)
    bns = model.sliced_batchnorms()
    with torch.no_grad():
        for bn in bns:
            bn.weight.copy_(torch.rand(bn.weight.shape, generator=g) + 0.5)
            bn.bias.copy_(torch.randn(bn.bias.shape, generator=g) * 0.1)
            bn.reset_running_stats()
            bn.momentum = None
        model.train()
        for k in range(len(model.subnets)):
            model(small_input(model, batch=16, seed=seed + 100 + k), subnet=k)
        for bn in bns:
            bn.momentum = 0.1
        heads = [model.gate.slim_head.weight]
        exit_head = getattr(model, "exit_head", None)
        if exit_head is not None:  # the default early-exit gate routes with this one: its input statistics too
            model.eval()
            h, z = model.forward_pre(small_input(model, batch=16, seed=seed + 99), model.routing_space[0])
            f = exit_head.features(z, model.forward_post(h, model.routing_space[0]))
            exit_head.norm.running_mean.copy_(f.mean(0))
            exit_head.norm.running_var.copy_(f.var(0) + 1e-3)
            heads += [exit_head.out.weight]
        for head in heads:
            head.copy_(torch.randn(head.shape, generator=g) * 30.0 / head.shape[1] ** 0.5)
    return model.eval()


@pytest.fixture(params=dsnet.list_models(kind="supernet"))
def model_name(request) -> str:
    return request.param


def small_input(model, batch: int = 4, size: int | None = None, seed: int = 0) -> torch.Tensor:
    """Images that differ in brightness and contrast, so pooled features (and the gate) tell them apart.

    32 px for the small-image models, 64 px for the 224 px ones (their last
    stages would be 1x1 at 32 px, where a training-mode BN has one value).
    """
    size = size or (32 if model.default_input_size[-1] <= 32 else 64)
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(batch, 1, 1, 1, generator=g) * 2.5 + 0.25
    shift = torch.randn(batch, 1, 1, 1, generator=g)
    return torch.randn(batch, model.in_chans, size, size, generator=g) * scale + shift


def sliced(model, x: torch.Tensor, subnet: int) -> torch.Tensor:
    """Sub-network ``subnet`` through the sliced layers themselves.

    At plain inference ``model(x, subnet=k)`` runs the model's cached ``extract(k)`` (its static plan), so an
    equivalence test against ``extract`` that called it would compare the extracted network with itself.
    """
    h, _ = model.forward_pre(x, subnet)
    return model.forward_post(h, subnet)
