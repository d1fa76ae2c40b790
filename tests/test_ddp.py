"""DHSPG under DistributedDataParallel: two gloo ranks stay bit-identical and partition alike."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.c2 = nn.Conv2d(6, 8, 1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = torch.relu(self.c2(torch.relu(self.b1(self.c1(x)))))
        return self.fc(y.mean((2, 3)))


def _worker(rank: int, world: int, init: str, out: str) -> None:
    import otofx

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # same initial weights on every rank
        model = Tiny()
        g = torch.Generator().manual_seed(100 + rank)  # different data on every rank
        x, y = torch.randn(8, 3, 5, 5, generator=g), torch.randint(0, 4, (8,), generator=g)
        oto = otofx.OTO(model, x[:2])
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = oto.dhspg(lr=0.1, lmbda=0.5, epsilon=0.9, first_momentum=0.5, start_pruning_steps=2)
        for _ in range(12):
            opt.zero_grad()
            nn.functional.cross_entropy(ddp(x), y).backward()
            opt.step()
        torch.save({"params": {k: v.detach().clone() for k, v in model.named_parameters()},
                    "redundant": opt.redundant.clone(), "sparsity": opt.group_sparsity}, os.path.join(out, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo unavailable")
def test_ddp_ranks_stay_identical(tmp_path):
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_worker, args=(2, init, str(tmp_path)), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"{r}.pt") for r in range(2))
    assert torch.equal(a["redundant"], b["redundant"]) and bool(a["redundant"].any())
    assert a["sparsity"] == b["sparsity"]
    for k in a["params"]:
        assert torch.equal(a["params"][k], b["params"][k]), k
