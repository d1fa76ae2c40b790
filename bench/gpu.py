"""One command for a lent GPU: the optimizer step, compressed latency and the compile backend on CUDA.

    python bench/gpu.py                      # every section, on cuda, tables to stdout
    python bench/gpu.py --out DIR            # also DIR/gpu.json and DIR/gpu.md
    python bench/gpu.py --only optimizer     # one section (optimizer, latency, compile, admm)
    python bench/gpu.py --device cpu --batch 2   # a smoke run of the same code on the CPU

Sections, each owned by the bench script whose ``gpu_rows`` it calls (that script's docstring says
what it measures and how):
    * ``optimizer`` (bench/optimizer.py, ``exactness_rows`` then ``gpu_rows``): Triton against the torch reference on CUDA (exactness), and
      DHSPG/HESSO step times against torch's fused SGD and AdamW on resnet50 and vit_b_16, then
      ``profile_rows``: where a step's time goes (kernels, launches, synchronising calls per step);
    * ``latency`` (bench/latency.py): dense against compressed latency, half of every group's rows
      zeroed but the widths LayerNorms normalise (heads and MLP widths, as issue 15 states its target),
      resnet50, vit_b_16 and a BERT-base, float32 and bfloat16, batch 64;
    * ``compile`` (bench/compile.py): ``torch.compile(backend="otofx")`` against inductor on the dense
      model, resnet50 and mobilenet_v2, with the FLOPs ratio beside the latency ratio;
    * ``admm`` (bench/admm.py): a 4096x4096 Linear with 16/32/64-blocks pruned at 0.5/0.75/0.9, dense
      against torch's BSR and torchao's block-sparse kernel, bf16 and fp16, exactness checked (<= ~40 s).
A section that fails prints its traceback and the others still run: one command, one GPU lease.
The first lines give the machine: device, torch/triton versions, the host load average, and two
ceilings measured in the same run (device-to-device copy bandwidth, a bf16 matrix product's rate).

Internals:
    * each function gets only the keyword arguments its signature names (``device``, ``batch``, ``runs``);
    * # NB: rows are printed as they come, so a section killed at the command's time limit still
      leaves the earlier tables in the log.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import torch
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parent))

# section -> (bench script, its functions in order); each function returns a list of table rows
SECTIONS = {
    "optimizer": ("optimizer", ("exactness_rows", "gpu_rows", "profile_rows")),
    "latency": ("latency", ("gpu_rows",)),
    "compile": ("compile", ("gpu_rows",)),
    "admm": ("admm", ("gpu_rows",)),
}


def machine_line(device: str) -> dict:
    import triton  # noqa: F401  (torch brings it; its version is part of the machine line)

    name = torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu"
    return {"device": name, "torch": torch.__version__, "triton": sys.modules["triton"].__version__,
            "python": platform.python_version(), "load average": " ".join(f"{x:.2f}" for x in os.getloadavg())}


def ceilings(device: str) -> dict:
    """Copy bandwidth (bytes read + written) and a bf16 matrix product's rate, for the same run."""
    if not device.startswith("cuda"):
        return {}
    x = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn_like(a)

    def timed(fn, reps):
        for _ in range(3):
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / reps

    t_copy = timed(lambda: y.copy_(x), 20)
    t_mm = timed(lambda: a @ b, 10)
    del x, y, a, b
    torch.cuda.empty_cache()
    return {"copy TB/s": round(2 * (1 << 30) / t_copy / 1e12, 2), "bf16 matmul TFLOP/s": round(2 * 8192 ** 3 / t_mm / 1e12)}


def run_section(name: str, device: str, batch: int | None, runs: int | None = None) -> list[list[dict]]:
    script, functions = SECTIONS[name]
    module = importlib.import_module(script)
    tables = []
    for f in functions:
        fn = getattr(module, f)
        params = inspect.signature(fn).parameters
        kwargs = {"device": device, "batch": batch, "runs": runs}
        tables.append(list(fn(**{k: v for k, v in kwargs.items() if k in params and v is not None})))
    return tables


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=None, help="batch for the latency/compile sections (theirs by default)")
    ap.add_argument("--runs", type=int, default=None, help="timed calls per model in the latency section (its default otherwise)")
    ap.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections: " + ", ".join(SECTIONS))
    ap.add_argument("--out", default=None, help="folder for gpu.json and gpu.md")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA device here; use --device cpu for a smoke run", file=sys.stderr)
        return 2
    head = machine_line(args.device) | ceilings(args.device)
    print(tabulate([head], headers="keys", tablefmt="github"), flush=True)
    results, failed = {"machine": head}, []
    for name in [s.strip() for s in args.only.split(",") if s.strip()]:
        if name not in SECTIONS:
            ap.error(f"unknown section {name!r}; choose from {', '.join(SECTIONS)}")
        t0 = time.perf_counter()
        print(f"\n## {name}", flush=True)
        try:
            tables = run_section(name, args.device, args.batch, args.runs)
        except Exception:  # noqa: BLE001  (one broken section must not cost the others their lease time)
            traceback.print_exc()
            failed.append(name)
            results[name] = {"error": traceback.format_exc(limit=3)}
            continue
        for rows in tables:
            print(tabulate(rows, headers="keys", tablefmt="github", floatfmt=".3g"), flush=True)
        print(f"({name}: {time.perf_counter() - t0:.0f} s)", flush=True)
        results[name] = tables
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu.json").write_text(json.dumps(results, indent=1, default=str))
        md = [tabulate([head], headers="keys", tablefmt="github")]
        for name, tables in results.items():
            if name != "machine" and isinstance(tables, list):
                md += [f"\n### {name}\n"] + [tabulate(rows, headers="keys", tablefmt="github", floatfmt=".3g")
                                              for rows in tables]
        (out / "gpu.md").write_text("\n".join(md) + "\n")
    if failed:
        print(f"\nfailed sections: {', '.join(failed)}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
