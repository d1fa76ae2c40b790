"""CPU latency of ``torch.compile(model, backend="otofx")`` next to eager and inductor on the dense model.

For each model (random weights, randomised norm statistics, eval mode, batch 1, 3x224x224,
``torch.set_num_threads(1)``), a random half (floor) of every otofx group's rows is zeroed, as
DHSPG training would leave them, and the *same* model is run as:

* ``eager dense``: the model itself;
* ``inductor dense``: ``torch.compile(model)`` (inductor, default mode);
* ``otofx compress``: ``otofx.OTO(model, x).compress()`` run eagerly (the explicit route);
* ``otofx backend``: ``torch.compile(model, backend="otofx")`` (zero rows removed, inductor inside).

``--freezing`` compiles both inductor variants under ``torch._inductor.config.freezing``.
Latency is the median of ``--runs`` calls after ``--warmup`` calls, under ``torch.inference_mode``,
taken in rounds of one call per variant (interleaved: load from other processes falls on all
variants alike); the first call (the compile) is timed separately. FLOPs come from
``torch.utils.flop_counter.FlopCounterMode`` on the dense model and on the GraphModule the otofx
backend handed to inductor. ``x inductor`` is inductor dense ms / this row's ms; the target is
``x inductor >= (dense FLOPs / pruned FLOPs) / 1.5``.

``bytes ratio`` is the memory traffic of the convolutions and matrix products (every tensor they
read or write: activations in and out, weights), pruned over dense, counted per aten call like the
FLOPs. At batch 1 on one CPU core a depthwise-separable network is memory-bound (a few FLOPs per
byte), so ``1 / bytes ratio`` (``bound x``) is about the most that removing rows can buy with one
kernel per layer, whatever the FLOPs ratio says.

Run (about 7 min on the shared 2-core machine; inductor compiles dominate)::

    /work/venv/bin/python bench/compile.py
    /work/venv/bin/python bench/compile.py --models mobilenet_v2 --runs 10
    /work/venv/bin/python bench/compile.py --freezing
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch._dynamo
import torch._inductor.config as inductor_config
from tabulate import tabulate
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import otofx
import otofx.backend as otofx_backend
from _common import build, flops, machine, model_arg, randomise_norms, timing_args, zero_half_rows

MODELS = ["resnet50", "mobilenet_v2"]


class _Traffic(TorchDispatchMode):
    """Bytes read and written by convolutions and matrix products."""

    # NB: under inference_mode the mode sees composite ops (conv2d, linear) undecomposed; inside
    # __torch_dispatch__ the mode is off, so nothing is counted twice
    OPS = {getattr(torch.ops.aten, n).default for n in ("conv1d", "conv2d", "conv3d", "convolution", "linear",
                                                         "addmm", "mm", "bmm", "matmul")}

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in self.OPS:
            tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
            self.bytes += sum(t.numel() * t.element_size() for t in tensors)
        return out


def traffic(model: nn.Module, x: torch.Tensor) -> int:
    mode = _Traffic()
    with torch.inference_mode(), mode:
        model(x)
    return mode.bytes


class Keep:
    """inductor, keeping the GraphModule it was given (to count the FLOPs of what otofx handed on)."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return torch._dynamo.lookup_backend("inductor")(gm, example_inputs)


def rows_for(name: str, runs: int, warmup: int, freezing: bool) -> list[dict]:
    model, x = build(name), torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    randomise_norms(model, torch.Generator().manual_seed(0))
    oto = otofx.OTO(model, x)
    zero_half_rows(model, oto.groups)
    small = oto.compress().eval()
    keep = Keep()
    otofx_backend.clear_results()
    fns = {"eager dense": model, "inductor dense": torch.compile(model),
           "otofx compress": small, "otofx backend": torch.compile(model, backend="otofx", options={"inner": keep})}
    compile_s = {}
    with inductor_config.patch(freezing=freezing), torch.inference_mode():
        for label, fn in fns.items():  # the first call compiles
            t0 = time.perf_counter()
            fn(x)
            compile_s[label] = time.perf_counter() - t0
        # NB: interleaved, one call of each variant per round, so that load from other processes
        # on a shared machine falls on every variant alike
        samples = {label: [] for label in fns}
        for i in range(warmup + runs):
            for label, fn in fns.items():
                t0 = time.perf_counter()
                fn(x)
                if i >= warmup:
                    samples[label].append(time.perf_counter() - t0)
    (res,) = otofx_backend.results()
    assert res.pruned, res.reason
    dense_flops, dense_bytes = flops(model, x), traffic(model, x)
    graphs = {"otofx compress": small, "otofx backend": keep.graphs[-1]}
    ms = {label: 1e3 * statistics.median(v) for label, v in samples.items()}
    rows = []
    for label in fns:
        g = graphs.get(label)
        rows.append({"model": name, "variant": label, "ms": ms[label], "x inductor": ms["inductor dense"] / ms[label],
                     "FLOPs ratio": 1.0 if g is None else flops(g, x) / dense_flops,
                     "bytes ratio": 1.0 if g is None else traffic(g, x) / dense_bytes,
                     "compile s": compile_s[label] if label in ("inductor dense", "otofx backend") else None})
    backend = rows[-1]
    backend["target x"] = (1 / backend["FLOPs ratio"]) / 1.5
    backend["met"] = "yes" if backend["x inductor"] >= backend["target x"] else "no"
    backend["bound x"] = 1 / backend["bytes ratio"]
    backend["rows removed"] = res.rows_removed
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model_arg(ap, MODELS)
    timing_args(ap)
    ap.add_argument("--freezing", action="store_true", help="torch._inductor.config.freezing for both inductors")
    args = ap.parse_args()
    torch.set_num_threads(1)

    t0 = time.perf_counter()
    rows = [r for name in args.models for r in rows_for(name, args.runs, args.warmup, args.freezing)]
    print(f"{machine()}; batch 1, 3x224x224, median of {args.runs} after {args.warmup} warm-up; "
          f"inductor freezing {'on' if args.freezing else 'off'}; took {time.perf_counter() - t0:.0f} s\n")
    headers = ["model", "variant", "ms", "x inductor", "FLOPs ratio", "target x", "met", "bytes ratio", "bound x",
               "compile s", "rows removed"]
    table = [[r.get(h) for h in headers] for r in rows]
    print(tabulate(table, headers=headers, tablefmt=args.format, floatfmt=".2f", missingval=""))


if __name__ == "__main__":
    main()
