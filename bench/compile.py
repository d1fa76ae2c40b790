"""CPU latency of ``torch.compile(model, backend="otofx")`` next to eager and inductor on the dense model.

For each model (random weights, randomised norm statistics, eval mode, batch 1, 3x224x224,
``torch.set_num_threads(1)``), a random half (floor) of every otofx group's rows is zeroed, as
DHSPG training would leave them, and the *same* model is run as:

* ``eager dense``: the model itself;
* ``inductor dense``: ``torch.compile(model)`` (inductor, default mode);
* ``otofx compress``: ``otofx.OTO(model, x).compress()`` run eagerly (the explicit route);
* ``otofx backend``: ``torch.compile(model, backend="otofx")`` (zero rows removed, inductor inside).

``--freezing`` compiles both inductor variants under ``torch._inductor.config.freezing``;
``--cpp-wrapper`` under ``torch._inductor.config.cpp_wrapper`` (C++ instead of Python glue between
kernels, for both). ``--kernel-time`` (needs ``--freezing``, where inductor runs every convolution
through oneDNN) also reports, for the two inductor variants, the oneDNN primitives' own execution
time per call (oneDNN's verbose log, summed over ``--kernel-calls`` calls): ``kernel ms``,
``kernel x`` (inductor dense's over this row's) and ``other ms`` (``ms`` - ``kernel ms``: the
per-op setup, glue and guards around the kernels, which removing rows does not shrink).
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
    /work/venv/bin/python bench/compile.py --models mobilenet_v2 --freezing --cpp-wrapper --kernel-time

On a GPU, ``--device cuda`` (:func:`gpu_rows`) runs batch ``--batch`` (64) of 3x224x224 in float32
and bfloat16: for each model and dtype, inductor on the dense model against the otofx backend
(inductor inside), same model, half of every group's rows zeroed, ``mode`` default, latency the
median of ``--runs`` calls timed with CUDA events (each call synchronised), ``x inductor`` = inductor
dense ms / otofx ms next to the FLOPs ratio (otofx's graph over the dense model), and the same
for one replay of each call captured in a CUDA graph (``graph ms``: no launch gaps)::

    python3 bench/compile.py --device cuda             # about 2 min on one H200, compiles included
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import os
import statistics
import sys
import tempfile
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


def onednn_ms(fn, x: torch.Tensor, calls: int) -> tuple[float, int]:
    """Mean oneDNN execution time (ms) and primitive count per call of ``fn(x)``, from oneDNN's verbose log.

    # NB: oneDNN prints with C stdio, so the log is taken by pointing file descriptor 1 at a
    # temporary file (and flushing C's buffer) while the calls run
    """
    libc = ctypes.CDLL(None)
    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile(mode="w+") as log:
        os.dup2(log.fileno(), 1)
        try:
            with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                for _ in range(calls):
                    fn(x)
            libc.fflush(None)
        finally:
            os.dup2(saved, 1)
            os.close(saved)
        log.seek(0)
        lines = [ln.strip().split(",") for ln in log if ln.startswith("onednn_verbose") and ",exec," in ln]
    total = sum(float(p[-1]) for p in lines)
    return total / calls, len(lines) // calls


def rows_for(name: str, runs: int, warmup: int, freezing: bool, cpp_wrapper: bool = False,
             kernel_calls: int = 0) -> list[dict]:
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
    kernel = {}
    with inductor_config.patch(freezing=freezing, cpp_wrapper=cpp_wrapper), torch.inference_mode():
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
        if kernel_calls:
            kernel = {label: onednn_ms(fns[label], x, kernel_calls) for label in ("inductor dense", "otofx backend")}
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
        if label in kernel:
            k_ms, prims = kernel[label]
            rows[-1].update({"kernel ms": k_ms, "kernel x": kernel["inductor dense"][0] / k_ms,
                             "other ms": ms[label] - k_ms, "oneDNN calls": prims})
    backend = rows[-1]
    backend["target x"] = (1 / backend["FLOPs ratio"]) / 1.5
    backend["met"] = "yes" if backend["x inductor"] >= backend["target x"] else "no"
    backend["bound x"] = 1 / backend["bytes ratio"]
    backend["rows removed"] = res.rows_removed
    return rows


def _timed(fn, x, runs: int, warmup: int, device: torch.device) -> float:
    """Median ms of ``fn(x)`` over ``runs`` calls after ``warmup``: CUDA events on a GPU, wall clock elsewhere."""
    for _ in range(warmup):
        fn(x)
    samples = []
    for _ in range(runs):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(x)
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn(x)
            samples.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(samples)


def _graph_ms(fn, x, runs: int, device: torch.device):
    """Median ms of one replay of a CUDA graph captured from ``fn(x)``: the kernels' time without the
    host's launch gaps (None off CUDA, or when capture fails)."""
    if device.type != "cuda":
        return None
    try:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):
                fn(x)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn(x)
    except Exception as e:  # noqa: BLE001 - reported as a missing number
        print(f"CUDA graph capture failed: {type(e).__name__}: {e}", file=sys.stderr)
        return None
    return _timed(lambda _: graph.replay(), x, runs, 2, device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gpu_rows(device="cuda", batch: int = 64, models=tuple(MODELS), dtypes=(torch.float32, torch.bfloat16),
             runs: int = 10, warmup: int = 3, side: int = 224, progress=None) -> list[dict]:
    """torch.compile(backend="otofx") against inductor on the dense model, on ``device`` at ``batch``.

    Each model (random weights, random norm statistics, eval mode) has a random half of every
    group's rows zeroed, then is cast to each dtype and moved to ``device``. One dict per (model,
    dtype): latencies (ms), ``x inductor`` (dense inductor ms / otofx ms), ``FLOPs ratio`` (the
    graph otofx handed to inductor over the dense model), compile seconds (first call) of both.
    ``progress`` (a callable) gets each dict as soon as it is measured. TF32 stays as torch has it
    (cuDNN convolutions in TF32, matrix products not) for both variants.
    """
    device = torch.device(device)
    out = []
    for name in models:
        base = build(name)
        randomise_norms(base, torch.Generator().manual_seed(0))
        x0 = torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(0))
        oto = otofx.OTO(base, x0[:2])
        zero_half_rows(base, oto.groups)
        for dtype in dtypes:
            model = copy.deepcopy(base).to(device=device, dtype=dtype)
            x = x0.to(device=device, dtype=dtype)
            torch._dynamo.reset()
            otofx_backend.clear_results()
            keep = Keep()
            fns = {"inductor": torch.compile(model),
                   "otofx": torch.compile(model, backend="otofx", options={"inner": keep})}
            compile_s, ms = {}, {}
            with torch.inference_mode():
                for label, fn in fns.items():
                    _sync(device)
                    t0 = time.perf_counter()
                    fn(x)
                    _sync(device)
                    compile_s[label] = time.perf_counter() - t0
                for label, fn in fns.items():
                    ms[label] = _timed(fn, x, runs, warmup, device)
                graph_ms = {label: _graph_ms(fn, x, runs, device) for label, fn in fns.items()}
            res = otofx_backend.results()
            assert res and all(r.pruned for r in res), [r.reason for r in res]
            out.append({"model": name, "dtype": str(dtype).removeprefix("torch."), "batch": batch,
                        "inductor ms": ms["inductor"], "otofx ms": ms["otofx"],
                        "x inductor": ms["inductor"] / ms["otofx"],
                        "FLOPs ratio": flops(keep.graphs[-1], x) / flops(model, x),
                        "inductor graph ms": graph_ms["inductor"], "otofx graph ms": graph_ms["otofx"],
                        "graph x inductor": (graph_ms["inductor"] / graph_ms["otofx"]
                                             if graph_ms["otofx"] and graph_ms["inductor"] else None),
                        "inductor compile s": compile_s["inductor"], "otofx compile s": compile_s["otofx"],
                        "rows removed": sum(r.rows_removed for r in res)})
            if progress is not None:
                progress(out[-1])
            del fns, model, x, keep
            torch._dynamo.reset()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model_arg(ap, MODELS)
    timing_args(ap)
    ap.add_argument("--device", default="cpu", help="cpu (the table above) or cuda (gpu_rows: batch --batch, fp32 and bf16)")
    ap.add_argument("--batch", type=int, default=64, help="batch size for --device cuda (default 64)")
    ap.add_argument("--freezing", action="store_true", help="torch._inductor.config.freezing for both inductors")
    ap.add_argument("--cpp-wrapper", action="store_true", help="torch._inductor.config.cpp_wrapper for both inductors")
    ap.add_argument("--kernel-time", action="store_true",
                    help="oneDNN kernel time per call of the inductor variants (needs --freezing)")
    ap.add_argument("--kernel-calls", type=int, default=5, help="calls logged for --kernel-time (default 5)")
    args = ap.parse_args()
    if args.kernel_time and not args.freezing:
        ap.error("--kernel-time needs --freezing: without it inductor runs 1x1 convolutions outside oneDNN")
    if args.device != "cpu":
        t0 = time.perf_counter()
        rows = gpu_rows(args.device, args.batch, tuple(args.models), runs=args.runs, warmup=args.warmup,
                        progress=lambda r: print(r, file=sys.stderr, flush=True))
        gpu = torch.cuda.get_device_name(torch.device(args.device)) if torch.device(args.device).type == "cuda" else ""
        print(f"{machine()}; {gpu}; load average {os.getloadavg()[0]:.2f}; batch {args.batch}, 3x224x224, "
              f"median of {args.runs} after {args.warmup} warm-up; inductor mode default; cuDNN TF32 "
              f"{torch.backends.cudnn.allow_tf32}, matmul TF32 {torch.backends.cuda.matmul.allow_tf32}; "
              f"took {time.perf_counter() - t0:.0f} s\n")
        headers = list(rows[0])
        print(tabulate([[r[h] for h in headers] for r in rows], headers=headers, tablefmt=args.format, floatfmt=".3f",
                       missingval=""))
        return
    torch.set_num_threads(1)

    t0 = time.perf_counter()
    rows = [r for name in args.models for r in rows_for(name, args.runs, args.warmup, args.freezing, args.cpp_wrapper,
                                                          args.kernel_calls if args.kernel_time else 0)]
    print(f"{machine()}; batch 1, 3x224x224, median of {args.runs} after {args.warmup} warm-up; "
          f"inductor freezing {'on' if args.freezing else 'off'}, cpp_wrapper {'on' if args.cpp_wrapper else 'off'}; "
          f"took {time.perf_counter() - t0:.0f} s\n")
    headers = ["model", "variant", "ms", "x inductor", "FLOPs ratio", "target x", "met", "bytes ratio", "bound x",
               "compile s", "rows removed"]
    if args.kernel_time:
        headers[3:3] = ["kernel ms", "kernel x", "other ms", "oneDNN calls"]
    table = [[r.get(h) for h in headers] for r in rows]
    print(tabulate(table, headers=headers, tablefmt=args.format, floatfmt=".2f", missingval=""))


if __name__ == "__main__":
    main()
