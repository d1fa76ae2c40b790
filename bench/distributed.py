"""DHSPG on sharded parameters (FSDP2): step time on 1, 2 and 4 CPU processes, and what crosses ranks.

    python bench/distributed.py [--layers 12] [--width 1024] [--batch 16] [--steps 4] [--procs 1 2 4]

A ~100M-parameter residual MLP stack (``layers`` blocks of Linear(w, 4w) -> ReLU -> Linear(4w, w);
the 4w hidden rows of every block are the prunable groups) is built on the meta device, analysed by
``otofx.OTO`` there (no weights), then per process count P: P gloo processes (one torch thread each)
``fully_shard`` every block and the root, materialise their shards and train with DHSPG (SGD
momentum 0.9, pruning from step 0: partition, controller, penalty and projection active) on random
data; P = 1 is the single-process path (no sharding). Per P the table reports the median over
``--steps`` steps (after two warm-up steps) of the whole training step (forward, backward with
FSDP's reduce-scatter, optimizer) and of ``opt.step()`` alone, against torch's ``SGD`` (momentum
0.9, foreach) stepping the same shards in the same processes, and the bytes the optimizer
all-reduces per step (counted by wrapping ``torch.distributed.all_reduce``): the per-row sums
(``3 * n_rows`` floats) plus the one-element finite-gradient flag, against the weights' bytes.

The machine line gives the load average before and after: on a shared machine the timings are
under load (and P processes share its cores).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tabulate import tabulate
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import machine  # noqa: E402


class Block(nn.Module):
    def __init__(self, w: int):
        super().__init__()
        self.up, self.down = nn.Linear(w, 4 * w), nn.Linear(4 * w, w)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


class Stack(nn.Module):
    def __init__(self, layers: int, w: int):
        super().__init__()
        self.blocks = nn.ModuleList(Block(w) for _ in range(layers))
        self.head = nn.Linear(w, 16)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def _worker(rank: int, world: int, init: str, args, out: str) -> None:
    import otofx
    from otofx.distributed import local

    torch.set_num_threads(1)
    sharded = world > 1
    if sharded:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        with torch.device("meta"):
            model = Stack(args.layers, args.width)
        oto = otofx.OTO(model, torch.randn(2, args.width, device="meta"))  # analysis on the meta model
        if sharded:
            from torch.distributed.fsdp import fully_shard

            for b in model.blocks:
                fully_shard(b)
            fully_shard(model)
        model.to_empty(device="cpu")
        g = torch.Generator().manual_seed(rank)
        with torch.no_grad():
            for p in model.parameters():
                loc = local(p)
                loc.copy_(torch.randn(loc.shape, generator=g) * 0.02)
        n_params = sum(p.numel() for p in model.parameters())
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        counted = {"calls": 0, "bytes": 0}
        real = dist.all_reduce

        def counting(t, *a, **k):
            counted["calls"] += 1
            counted["bytes"] += t.numel() * t.element_size()
            return real(t, *a, **k)

        import otofx.distributed as od

        od.dist.all_reduce = counting  # od.dist is torch.distributed: every all_reduce is counted
        opts = {"DHSPG": oto.dhspg(lr=1e-3, first_momentum=0.9, start_pruning_steps=0, pruning_steps=1000),
                "SGD": torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, foreach=True)}
        gen = torch.Generator().manual_seed(100 + rank)
        res = {}
        for name, opt in opts.items():
            steps, stepper = [], []
            for i in range(2 + args.steps):
                x = torch.randn(args.batch, args.width, generator=gen)
                y = torch.randint(0, 16, (args.batch,), generator=gen)
                if sharded:
                    dist.barrier()
                t0 = time.perf_counter()
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                t1 = time.perf_counter()
                counted["calls"] = counted["bytes"] = 0
                opt.step()
                t2 = time.perf_counter()
                if i >= 2:
                    steps.append(t2 - t0)
                    stepper.append(t2 - t1)
            res[name] = {"step": statistics.median(steps), "opt": statistics.median(stepper),
                         "calls": counted["calls"], "bytes": counted["bytes"]}
            if name == "DHSPG":
                res["sparsity"] = opt.group_sparsity  # an all-reduce too: every rank calls it
        res["n_rows"] = opts["DHSPG"].n_rows
        res["n_params"], res["weight_bytes"] = n_params, weight_bytes
        if rank == 0:
            torch.save(res, out)
    finally:
        if sharded:
            dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per optimizer (after 2 warm-up steps)")
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--format", default="github")
    args = ap.parse_args()
    load0 = os.getloadavg()
    t_all = time.perf_counter()
    rows, base = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for world in args.procs:
            out = os.path.join(tmp, f"{world}.pt")
            init = f"file://{os.path.join(tmp, f'rdv{world}')}"
            if world == 1:
                _worker(0, 1, init, args, out)
            else:
                mp.spawn(_worker, args=(world, init, args, out), nprocs=world, join=True)
            r = torch.load(out)
            d, s = r["DHSPG"], r["SGD"]
            if base is None:
                base = d["step"]
            rows.append({
                "processes": world, "params (M)": r["n_params"] / 1e6, "rows": r["n_rows"],
                "train step s": d["step"], "x 1 process": d["step"] / base, "SGD train step s": s["step"],
                "DHSPG opt.step ms": 1e3 * d["opt"], "SGD opt.step ms": 1e3 * s["opt"],
                "x SGD": d["opt"] / s["opt"], "all-reduces/step": d["calls"],
                "all-reduce bytes/step": d["bytes"], "weights bytes": r["weight_bytes"],
                "bytes / weights": d["bytes"] / r["weight_bytes"], "group sparsity": r["sparsity"]})
    print(f"machine: {machine()}, {os.cpu_count()} cores")
    print(f"load average before: {' '.join(f'{v:.2f}' for v in load0)}, after: "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())} (timings under this load)")
    print(f"model: {args.layers} blocks of Linear({args.width}, {4 * args.width}) -> ReLU -> Linear({4 * args.width}, "
          f"{args.width}) + head, batch {args.batch}, median of {args.steps} steps after 2 warm-up, float32, "
          f"1 torch thread per process; {time.perf_counter() - t_all:.0f} s in all")
    print(tabulate(rows, headers="keys", tablefmt=args.format, floatfmt=".3g"))


if __name__ == "__main__":
    main()
