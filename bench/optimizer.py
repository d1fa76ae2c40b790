"""Time one DHSPG step over every parameter of a torchvision model against torch SGD.

    python bench/optimizer.py [--model resnet50] [--repeats 15] [--threads N] [--clock wall|cpu]

Random gradients (fixed for the whole run); every optimizer steps the same parameters in the same
run, interleaved, and the table reports medians. Rows:

* ``SGD`` -- ``torch.optim.SGD(momentum=0.9, foreach=True)``, the baseline;
* ``DHSPG plain`` -- before ``start_pruning_steps``: the base step alone (momentum 0.9, same as SGD);
* ``DHSPG pruning (auto: ...)`` -- after the partition, penalty and projection active on the
  redundant rows, with the backend ``auto`` picks (named): the C kernel on CPU, Triton on CUDA;
* the pruning step with each other backend: the torch reference, and on CUDA also Triton.

Every DHSPG step includes the NaN/inf gradient check (``check_finite=True``, the default).
``--clock cpu`` times process CPU time instead of wall time: on a shared machine, with
``--threads 1``, it is not inflated by time spent waiting for a core (with several threads it would
count the threads' spin-waits too).
"""
from __future__ import annotations

import argparse
import copy
import logging
import os
import time

import torch
from _common import build, example_input, machine, median_of
from tabulate import tabulate

import otofx


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _timer(opt, dev, clock):
    def sample():
        _sync(dev)
        t0 = clock()
        opt.step()
        _sync(dev)
        return clock() - t0
    return sample


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall time, or process CPU time (use with --threads 1 on a shared machine)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)

    model = build(args.model)
    oto = otofx.OTO(model, example_input(args.model, 64))
    model.to(dev)
    g = torch.Generator().manual_seed(0)
    grads = {n: (torch.randn(p.shape, generator=g) * 1e-2).to(dev) for n, p in model.named_parameters()}

    def clone():
        m = copy.deepcopy(model)
        for n, p in m.named_parameters():
            p.grad = grads[n].clone()
        return m

    # lmbda and target high enough that the penalty stays active for every timed step
    hp = dict(lr=0.01, first_momentum=0.9, lmbda=1e-3, epsilon=0.0, target_group_sparsity=0.9)
    runs = {}
    m = clone()
    runs["SGD (momentum 0.9, foreach)"] = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, foreach=True)
    m = clone()
    runs["DHSPG plain (base step)"] = otofx.DHSPG(m.named_parameters(), oto.groups, start_pruning_steps=10 ** 9, **hp)
    backends = ["auto"] + (["triton", "torch"] if dev.type == "cuda" else ["torch"])
    for b in backends:
        m = clone()
        opt = otofx.DHSPG(m.named_parameters(), oto.groups, backend=None if b == "auto" else b, **hp)
        opt.step()  # the partition happens here; the timed steps are penalty + projection steps
        if b == "auto":
            xs = [p.detach() for p in opt._row_params]
            b = "auto: " + otofx.kernels.choose_backend(xs, [p.grad for p in opt._row_params], None, opt.layout)
        runs[f"DHSPG pruning ({b})"] = opt
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    samplers = {k: _timer(o, dev, clock) for k, o in runs.items()}
    for s in samplers.values():  # warm-up (Triton compiles here)
        s()
    times = {k: [] for k in runs}
    for _ in range(args.repeats):  # interleaved, so machine noise hits every row alike
        for k, s in samplers.items():
            times[k].append(median_of(s, 1, warmup=0))
    import statistics

    base = statistics.median(times["SGD (momentum 0.9, foreach)"])
    rows = [[k, statistics.median(v) * 1e3, statistics.median(v) / base] for k, v in times.items()]
    n_params = sum(p.numel() for p in model.parameters())
    n_rows = sum(z.rows for z in oto.groups)
    dev_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.model}: {n_params / 1e6:.1f}M parameters, {len(oto.groups)} groups, {n_rows} rows; device: {dev_name}")
    load = f"; load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    print(f"{machine()}; median of {args.repeats} steps each, interleaved; {args.clock} clock{load}")
    print(tabulate(rows, headers=["optimizer step", "median ms", "x SGD"], tablefmt="github", floatfmt=".2f"))


if __name__ == "__main__":
    main()
