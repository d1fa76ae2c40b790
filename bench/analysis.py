"""Analysis time: otofx.OTO(model, x) vs torch-pruning and only-train-once, and how otofx scales.

Table 1, at 1x3x224x224 with torch's default thread count (printed), median of ``--repeats`` rounds
after one warm-up round; a round runs each of these once, in this order (interleaved, so that a
stall of a shared machine falls on every tool alike):

* ``otofx.OTO(model, x)`` (capture + propagate_shapes + find_zigs: the groups are ready to use),
  and each of those phases timed on its own;
* torch-pruning 1.6.1 ``DependencyGraph().build_dependency(model, example_inputs=x)`` and, apart,
  its group enumeration ``get_all_groups`` (which it needs before it can prune anything);
* only-train-once 3.0.1 ``OTO(model, x)`` (graph build and groups).

Ratios: otofx / TP build (target <= 1.0), otofx / (TP build + groups), OTO / otofx (target >= 10).

Table 2: otofx's phases on a chain of N blocks Conv2d(8, 8, 3, padding=1) + BatchNorm2d + ReLU
(one ``nn.Sequential``) on 1x8x8x8, in seconds and microseconds per fx node; per-node time should
stay within 2x across sizes.

Run (about 10 min on 2 cores)::

    /work/venv/bin/python bench/analysis.py
    /work/venv/bin/python bench/analysis.py --quick               # resnet50 only, chains 100 and 1,000
    /work/venv/bin/python bench/analysis.py --tables chain        # the chain table alone
    /work/venv/bin/python bench/analysis.py --models resnet50 --chains 100 1000 10000 --repeats 3
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from tabulate import tabulate
from torch import nn

import otofx
from _common import build, machine, model_arg, wall
from _peers import oto_build, tp_groups
from otofx.capture import capture
from otofx.passes import annotate_shapes, zero_invariant_groups

MODELS = ["resnet50", "densenet121", "convnext_tiny", "mobilenet_v3_large"]
PHASES = ("capture", "shapes", "zigs")


def phase_sample(model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Seconds of each otofx analysis phase, run back to back as ``OTO.__init__`` does."""
    t = {}
    t0 = time.perf_counter()
    cap = capture(model, x)
    t["capture"] = (t1 := time.perf_counter()) - t0
    annotate_shapes(cap.gm, cap.args, cap.kwargs)
    t["shapes"] = (t2 := time.perf_counter()) - t1
    zero_invariant_groups(cap.gm)
    t["zigs"] = time.perf_counter() - t2
    return t


def phase_times(model: nn.Module, x: torch.Tensor, repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds of each otofx analysis phase over ``repeats`` runs after ``warmup``."""
    samples = [phase_sample(model, x) for _ in range(warmup + repeats)][warmup:]
    return {p: statistics.median(s[p] for s in samples) for p in PHASES}


def peer_table(names: list[str], side: int, repeats: int) -> list[dict]:
    rows = []
    for name in names:
        model, x = build(name), torch.randn(1, 3, side, side)
        # NB: interleaved rounds (otofx, its phases, torch-pruning, only-train-once), the first a
        # warm-up: a stall of the machine falls on every tool of a round alike
        s: dict[str, list] = {k: [] for k in ("otofx", *PHASES, "tp build", "tp search", "oto")}
        for i in range(repeats + 1):
            ours = wall(lambda: otofx.OTO(model, x))()
            ph = phase_sample(model, x)
            tp = tp_groups(model, x)
            oto = oto_build(model, x).seconds
            if i == 0:
                continue
            for k, v in (("otofx", ours), *ph.items(), ("tp build", tp.build_seconds),
                         ("tp search", tp.search_seconds), ("oto", oto)):
                s[k].append(v)
        m = {k: statistics.median(v) for k, v in s.items()}
        rows.append({"model": name, "otofx s": m["otofx"], **{f"{p} s": m[p] for p in PHASES},
                     "TP build s": m["tp build"], "TP groups s": m["tp search"], "OTO s": m["oto"],
                     "otofx/TP build": m["otofx"] / m["tp build"],
                     "otofx/TP all": m["otofx"] / (m["tp build"] + m["tp search"]),
                     "OTO/otofx": m["oto"] / m["otofx"]})
        print(f"  {name} done", flush=True)
    return rows


def chain(n: int) -> nn.Sequential:
    return nn.Sequential(*[m for _ in range(n) for m in (nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())])


def chain_table(sizes: list[int], repeats: int) -> list[dict]:
    rows = []
    x = torch.randn(1, 8, 8, 8)
    for n in sizes:
        model = chain(n).eval()
        ph = phase_times(model, x, repeats)
        nodes = len(capture(model, x).gm.graph.nodes)
        total = sum(ph.values())
        rows.append({"blocks": n, "fx nodes": nodes, "total s": total,
                     "us/node": 1e6 * total / nodes,
                     **{f"{p} us/node": 1e6 * ph[p] / nodes for p in PHASES}})
        print(f"  chain {n} done ({total:.1f} s)", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model_arg(ap, MODELS)
    ap.add_argument("--chains", nargs="+", type=int, default=[100, 1000, 10_000], metavar="N",
                    help="chain lengths in blocks (default: 100 1000 10000)")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median; default 5)")
    ap.add_argument("--size", type=int, default=224, help="input side for table 1 (default 224)")
    ap.add_argument("--tables", nargs="+", choices=["peers", "chain"], default=["peers", "chain"],
                    help="which tables to measure (default: both)")
    ap.add_argument("--quick", action="store_true", help="resnet50 and chains of 100 and 1,000, 3 repeats")
    ap.add_argument("--format", default="github", help="tabulate table format")
    args = ap.parse_args()
    if args.quick:
        args.models, args.chains, args.repeats = ["resnet50"], [100, 1000], 3

    peers = peer_table(args.models, args.size, args.repeats) if "peers" in args.tables else []
    chains = chain_table(args.chains, args.repeats) if "chain" in args.tables else []
    print(f"\n{machine()}; median of {args.repeats} after 1 warm-up")
    if peers:
        print(f"\nAnalysis time at 1x3x{args.size}x{args.size} (seconds; phases are otofx's, timed apart)")
        print(tabulate(peers, headers="keys", tablefmt=args.format, floatfmt=".3f"))
    if chains:
        print("\notofx on a Conv2d+BatchNorm2d+ReLU chain, 1x8x8x8")
        print(tabulate(chains, headers="keys", tablefmt=args.format, floatfmt=("", "", ".2f", ".1f", ".1f", ".1f", ".1f", ".1f")))

if __name__ == "__main__":
    main()
