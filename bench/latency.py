"""CPU latency of dense vs otofx-compressed models, with torch-pruning's MagnitudePruner as the peer.

For each model (random weights, eval mode, batch 1, 3x224x224, ``torch.set_num_threads(1)``):

* ``dense``: the torchvision model after a random half (floor) of every otofx group's rows is zeroed;
* ``otofx``: ``oto.compress()`` of that model (the zero rows removed; verified equal by compress);
* ``torch-pruning``: ``MagnitudePruner(pruning_ratio=0.5, importance=L2, classifier ignored)`` then
  ``step()`` on a copy of the dense model (not zero-invariant: outputs change).

Latency is the median of ``--runs`` forward calls after ``--warmup`` calls, under
``torch.inference_mode``. FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` (one
multiply-add = 2 FLOPs; convolutions and matmuls only). Ratios are pruned / dense.

Run (about 2 min)::

    /work/venv/bin/python bench/latency.py
    /work/venv/bin/python bench/latency.py --quick                 # 5 runs
    /work/venv/bin/python bench/latency.py --models resnet18 --runs 50
"""
from __future__ import annotations

import argparse

import torch
from tabulate import tabulate
from torch import nn

import otofx
from _common import (build, flops, machine, median_of, model_arg, nparams, timing_args, randomise_norms, wall,
                     zero_half_rows)
from _peers import tp_prune

MODELS = ["resnet50", "mobilenet_v2"]


def latency_ms(model: nn.Module, x: torch.Tensor, runs: int, warmup: int) -> float:
    with torch.inference_mode():
        return 1e3 * median_of(wall(lambda: model(x)), runs, warmup)


def rows_for(name: str, runs: int, warmup: int) -> list[dict]:
    dense, x = build(name), torch.randn(1, 3, 224, 224)
    randomise_norms(dense, torch.Generator().manual_seed(0))
    oto = otofx.OTO(dense, x)
    zero_half_rows(dense, oto.groups)
    pruned = {"otofx": oto.compress().eval()}
    tp = tp_prune(dense, x, 0.5)
    pruned["torch-pruning"] = tp.obj.eval() if tp.ok else tp.error
    base_ms, base_flops, base_params = latency_ms(dense, x, runs, warmup), flops(dense, x), nparams(dense)
    out = []
    for tool, small in pruned.items():
        if isinstance(small, str):
            out.append({"model": name, "pruned by": tool, "dense ms": base_ms, "pruned ms": small})
            continue
        ms = latency_ms(small, x, runs, warmup)
        out.append({"model": name, "pruned by": tool, "dense ms": base_ms, "pruned ms": ms,
                    "speedup": base_ms / ms, "FLOPs ratio": flops(small, x) / base_flops,
                    "params ratio": nparams(small) / base_params, "dense GFLOPs": base_flops / 1e9})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model_arg(ap, MODELS)
    timing_args(ap)
    ap.add_argument("--quick", action="store_true", help="5 runs after 1 warm-up")
    args = ap.parse_args()
    if args.quick:
        args.runs, args.warmup = 5, 1
    torch.set_num_threads(1)

    rows = [r for name in args.models for r in rows_for(name, args.runs, args.warmup)]
    print(f"{machine()}; batch 1, 3x224x224, median of {args.runs} after {args.warmup} warm-up\n")
    print(tabulate(rows, headers="keys", tablefmt=args.format, floatfmt=".2f"))


if __name__ == "__main__":
    main()
