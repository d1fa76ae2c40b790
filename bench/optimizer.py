"""Time one DHSPG step over every parameter of a torchvision model against torch SGD.

    python bench/optimizer.py [--model resnet50] [--repeats 15] [--threads N] [--clock wall|cpu] [--device cpu|cuda]

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

``--device cuda`` prints the GPU tables instead: :func:`gpu_rows` (step times from CUDA events for
resnet50 and vit_b_16 against torch's fused SGD and AdamW, including a DHSPG step replayed from a
CUDA graph) and :func:`exactness_rows` (Triton against the torch reference on the device). Both
return lists of dicts, for ``bench/gpu.py``; with ``device="cpu"`` they run on the CPU (the C
kernel stands in for Triton), which is how they are checked without a GPU.
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
    ap.add_argument("--device", default="cpu", help="cpu (this table), or cuda (the GPU tables, see gpu_rows)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall time, or process CPU time (use with --threads 1 on a shared machine)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    if dev.type == "cuda":
        print_gpu_tables(dev)
        return

    model, oto = _analysed(args.model)
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
    dev_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else (
        f"CPU, {torch.get_num_threads()} threads (the C kernel's: {otofx.kernels.cpu_rows.thread_pool()})")
    print(f"{args.model}: {n_params / 1e6:.1f}M parameters, {len(oto.groups)} groups, {n_rows} rows; device: {dev_name}")
    load = f"; load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    print(f"{machine()}; median of {args.repeats} steps each, interleaved; {args.clock} clock{load}")
    print(tabulate(rows, headers=["optimizer step", "median ms", "x SGD"], tablefmt="github", floatfmt=".2f"))


# -- the GPU tables -------------------------------------------------------------------------------

GPU_MODELS = ("resnet50", "vit_b_16")
# a strong penalty and a high target: projections happen and the penalty stays active for every timed step
_DHSPG_HP = dict(lr=0.01, lmbda=1e-3, epsilon=0.0, target_group_sparsity=0.9)


def _analysed(name: str):
    model = build(name)
    oto = otofx.OTO(model, example_input(name, 224 if name.startswith(("vit_", "swin_")) else 64))
    return model, oto


def _with_grads(model, dev, seed: int = 0):
    """A copy of ``model`` on ``dev`` whose parameters carry fixed random gradients."""
    m = copy.deepcopy(model).to(dev)
    g = torch.Generator().manual_seed(seed)
    for p in m.parameters():
        p.grad = (torch.randn(p.shape, generator=g) * 1e-2).to(dev)
    return m


def _make(kind: str, variant: str, m, oto, **kw):
    """One optimizer of the tables, past its first step and its partition/selection (the timed steps
    are steady ones). kind: sgd/adamw (torch fused), dhspg, hesso."""
    if kind == "sgd":
        opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, fused=True)
    elif kind == "adamw":
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3, fused=True)
    elif kind == "dhspg":
        hp = dict(_DHSPG_HP, first_momentum=0.9) if variant == "sgd" else dict(lr=1e-3, lmbda=1e-2, epsilon=0.0,
                                                                                target_group_sparsity=0.9)
        opt = otofx.DHSPG(m.named_parameters(), oto.groups, variant=variant, **hp, **kw)
    else:
        lr = 0.01 if variant == "sgd" else 1e-3
        opt = otofx.HESSO(m.named_parameters(), oto.groups, variant=variant, lr=lr, first_momentum=0.9 if variant == "sgd"
                          else None, target_group_sparsity=0.5, start_pruning_step=0, pruning_steps=10 ** 6, **kw)
    opt.step()
    opt.step()
    return opt


def _median_ms(step, dev, steps: int) -> float:
    import statistics

    for _ in range(3):
        step()
    out = []
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        for _ in range(steps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            step()
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b))
    else:
        for _ in range(steps):
            t0 = time.perf_counter()
            step()
            out.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(out)


def _graphed(opt, dev):
    """``opt.step`` captured in a CUDA graph (the optimizer needs capturable=True): a replay."""
    s = torch.cuda.Stream(dev)
    s.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(s):
        for _ in range(3):
            opt.step()
    torch.cuda.current_stream(dev).wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    return graph.replay


def gpu_rows(device="cuda", models=GPU_MODELS, steps: int = 20) -> list[dict]:
    """Step times on ``device`` (median of ``steps``, CUDA events), one dict per (model, optimizer):
    ``model``, ``optimizer``, ``ms``, ``baseline`` (the fused torch optimizer it is compared with) and
    ``x_baseline`` (ms / the baseline's ms). Rows: torch SGD fused and AdamW fused (the baselines),
    DHSPG sgd and adamw pruning steps, HESSO sgd and adamw steps inside the pruning window, and on CUDA
    the DHSPG sgd pruning step replayed from a CUDA graph (``capturable=True``), with the sparsity
    controller and without. Parameters are
    float32, gradients fixed random ones."""
    dev = torch.device(device)
    rows = []
    for name in models:
        model, oto = _analysed(name)
        runs = [("SGD fused", "sgd", "sgd", "SGD fused"), ("AdamW fused", "adamw", "adamw", "AdamW fused"),
                ("DHSPG sgd pruning", "dhspg", "sgd", "SGD fused"), ("DHSPG adamw pruning", "dhspg", "adamw", "AdamW fused"),
                ("HESSO sgd", "hesso", "sgd", "SGD fused"), ("HESSO adamw", "hesso", "adamw", "AdamW fused")]
        ms = {}
        for label, kind, variant, base in runs:
            opt = _make(kind, variant, _with_grads(model, dev), oto)
            ms[label] = _median_ms(opt.step, dev, steps)
            rows.append(dict(model=name, optimizer=label, ms=ms[label], baseline=base))
            del opt
        if dev.type == "cuda":  # replayed from a CUDA graph, with the sparsity controller (as above) and without
            for label, control in (("DHSPG sgd pruning, CUDA graph", True),
                                   ("DHSPG sgd pruning, control off, CUDA graph", False)):
                opt = _make("dhspg", "sgd", _with_grads(model, dev), oto, capturable=True, control=control)
                rows.append(dict(model=name, optimizer=label, ms=_median_ms(_graphed(opt, dev), dev, steps),
                                 baseline="SGD fused"))
                del opt
        for r in rows:
            if r["model"] == name:
                r["x_baseline"] = r["ms"] / ms[r["baseline"]]
    return rows


_SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "aten::_local_scalar_dense",
          "aten::item", "aten::is_nonzero")


def profile_rows(device="cuda", model: str = "resnet50", steps: int = 5, top: int = 10) -> list[dict]:
    """Where one step's time goes (``torch.profiler`` over ``steps`` steps): for torch's fused SGD, the
    DHSPG sgd pruning step, and on CUDA that step replayed from a CUDA graph, one ``total`` row
    (wall ms per step, device-busy ms per step, kernels launched per step, synchronising calls per step)
    and the ``top`` kernels by device time (on the CPU: aten ops by self CPU time), per step."""
    from torch.profiler import ProfilerActivity, profile

    dev = torch.device(device)
    cuda = dev.type == "cuda"
    m, oto = _analysed(model)
    runs = [("SGD fused", lambda: _make("sgd", "sgd", _with_grads(m, dev), oto).step),
            ("DHSPG sgd pruning", lambda: _make("dhspg", "sgd", _with_grads(m, dev), oto).step)]
    if cuda:
        runs.append(("DHSPG sgd pruning, CUDA graph",
                     lambda: _graphed(_make("dhspg", "sgd", _with_grads(m, dev), oto, capturable=True), dev)))
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    rows = []
    for label, make in runs:
        step = make()
        for _ in range(3):
            step()
        _sync(dev)
        with profile(activities=acts) as prof:
            t0 = time.perf_counter()
            for _ in range(steps):
                step()
            _sync(dev)
            wall = (time.perf_counter() - t0) / steps
        evs = prof.key_averages()

        def dev_us(e):
            return (getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0) or 0)

        if cuda:
            kern = [e for e in evs if dev_us(e) > 0 and str(getattr(e, "device_type", "")).endswith("CUDA")]
            key = dev_us
        else:
            kern = [e for e in evs if e.self_cpu_time_total > 0]
            key = lambda e: e.self_cpu_time_total  # noqa: E731
        syncs = sum(e.count for e in evs if e.key in _SYNCS)
        rows.append(dict(model=model, run=label, what="total", per_step_ms=wall * 1e3,
                         busy_ms=sum(key(e) for e in kern) / 1e3 / steps,
                         calls=sum(e.count for e in kern) / steps, syncs=syncs / steps))
        for e in sorted(kern, key=key, reverse=True)[:top]:
            rows.append(dict(model=model, run=label, what=e.key[:60], per_step_ms=None, busy_ms=key(e) / 1e3 / steps,
                             calls=e.count / steps, syncs=None))
        del step
    return rows


def _zero_rows(opt) -> torch.Tensor:
    return (opt.row_stats().xx == 0).cpu()


def exactness_rows(device="cuda", model: str = "resnet50", steps: int = 20) -> list[dict]:
    """The fast kernel of ``device`` (Triton on CUDA, the C kernel on CPU) against the torch reference,
    over ``steps`` steps of DHSPG (sgd, adamw) and HESSO (sgd) from the same weights and gradients.
    One dict per optimizer: ``model``, ``optimizer``, ``backend``, ``steps``, ``max_rel_diff`` (over
    parameters, max |a - b| / max |b|), ``zero_rows`` (of the reference) and ``zero_rows_identical``."""
    dev = torch.device(device)
    fast = "triton" if dev.type == "cuda" else "cpu"
    m0, oto = _analysed(model)
    out = []
    for label, kind, variant, kw in (
            ("DHSPG sgd", "dhspg", "sgd", dict(lr=0.1, first_momentum=0.9, lmbda=0.5, epsilon=0.95)),
            ("DHSPG adamw", "dhspg", "adamw", dict(lr=1e-2, lmbda=0.5, epsilon=0.95)),
            ("HESSO sgd", "hesso", "sgd", dict(lr=0.1, first_momentum=0.9, start_pruning_step=2,
                                               pruning_steps=steps - 4, pruning_periods=2))):
        pair = []
        for backend in (fast, "torch"):
            m = copy.deepcopy(m0).to(dev)
            cls = otofx.DHSPG if kind == "dhspg" else otofx.HESSO
            pair.append((m, cls(m.named_parameters(), oto.groups, variant=variant, backend=backend, **kw)))
        g = torch.Generator().manual_seed(1)
        for _ in range(steps):
            grads = [(torch.randn(p.shape, generator=g) * 1e-2).to(dev) for p in m0.parameters()]
            for m, opt in pair:
                for p, q in zip(m.parameters(), grads):
                    p.grad = q.clone()
                opt.step()
        (ma, oa), (mb, ob) = pair
        rel = max(float(((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).detach())
                  for a, b in zip(ma.parameters(), mb.parameters()))
        za, zb = _zero_rows(oa), _zero_rows(ob)
        out.append(dict(model=model, optimizer=label, backend=fast, steps=steps, max_rel_diff=rel,
                        zero_rows=int(zb.sum()), zero_rows_identical=bool(torch.equal(za, zb))))
    return out


def print_gpu_tables(device="cuda") -> None:
    dev = torch.device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    print(f"device: {name}; {machine()}")
    rows = gpu_rows(dev)
    print(tabulate([[r["model"], r["optimizer"], r["ms"], r["baseline"], r["x_baseline"]] for r in rows],
                   headers=["model", "optimizer step", "median ms", "baseline", "x baseline"], tablefmt="github",
                   floatfmt=".2f"))
    ex = exactness_rows(dev)
    print(tabulate([[r["model"], r["optimizer"], r["backend"], r["steps"], f"{r['max_rel_diff']:.1e}", r["zero_rows"],
                     r["zero_rows_identical"]] for r in ex],
                   headers=["model", "optimizer", "backend vs torch", "steps", "max rel diff", "zero rows",
                            "identical zero rows"], tablefmt="github"))


if __name__ == "__main__":
    main()
