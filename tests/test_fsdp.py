"""watch() under FSDP2 (``torch.distributed.fsdp.fully_shard``): two gloo CPU ranks hold one
shard of every parameter and gradient (DTensor); gradient / parameter norms and update ratios
per group and in total must be the global ones, equal to the same model trained unsharded in one
process (ParamTracker sums the shards' square sums with one all_reduce per step, on the device;
no ``full_tensor()``)."""

from __future__ import annotations

import datetime
import os
import tempfile
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

WORLD = 2
STEPS = 3

fsdp = pytest.importorskip("torch.distributed.fsdp")
if not hasattr(fsdp, "fully_shard"):
    pytest.skip("torch.distributed.fsdp.fully_shard is not in the installed torch", allow_module_level=True)


def _model() -> nn.Module:
    torch.manual_seed(0)
    # odd sizes: shards of unequal length (7 rows over 2 ranks), a bias, a frozen tensor
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3), nn.Tanh(), nn.Linear(3, 2, bias=False))
    return model


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(10 + step)
    return torch.randn(8, 5, generator=g), torch.randn(8, 2, generator=g)


def _train(model: nn.Module, rank: int | None) -> dict[str, float]:
    import fastdiag

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no attention module
        handle = fastdiag.watch(model, optimizer=opt, group="parameter")
    for step in range(STEPS):
        x, y = _batch(step)
        if rank is not None:  # each rank its half of the batch; FSDP averages the gradients
            x, y = x[rank * 4 : rank * 4 + 4], y[rank * 4 : rank * 4 + 4]
        loss = (model(x) - y).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    stats = handle.get_epoch_stats()
    handle.remove()
    return stats


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (WORLD,))
        model = _model()
        for layer in model:
            if isinstance(layer, nn.Linear):
                fsdp.fully_shard(layer, mesh=mesh)
        fsdp.fully_shard(model, mesh=mesh)
        sharded = any(type(p).__name__ == "DTensor" for p in model.parameters())
        torch.save({"stats": _train(model, rank), "sharded": sharded}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks():
    with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as env:
        env.setenv("FASTDIAG_BACKEND", "torch")  # no C++ build in the children
        env.setenv("OMP_NUM_THREADS", "1")
        mp.spawn(_worker, args=(os.path.join(tmp, "init"), tmp), nprocs=WORLD, join=True)
        yield [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(WORLD)]


def test_fully_shard_norms_equal_the_unsharded_model(ranks, backend):
    backend("torch")
    want = _train(_model(), None)
    keys = [k for k in want if k.split("/")[0] in ("grad_norm", "param_norm", "update_ratio", "grad_norm_total")]
    assert "grad_norm_total" in keys and "grad_norm/0.weight" in keys and "update_ratio/2.bias" in keys
    for out in ranks:
        assert out["sharded"]  # the parameters really are DTensor shards
        got = out["stats"]
        assert sorted(got) == sorted(want)
        for k in keys:
            assert got[k] == pytest.approx(want[k], rel=1e-5), k
        assert got["health/nan_infs"] == 0.0
