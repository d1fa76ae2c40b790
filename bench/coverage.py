"""Coverage and exactness of otofx vs only-train-once 3.0.1 and torch-pruning 1.6.1 on torchvision CNNs.

For every torchvision classification CNN (``list_models(module=torchvision.models)`` minus ViT, Swin
and MaxViT; regnet_y_16gf/32gf/128gf only with ``--include-large``), random weights, input 1x3x64x64
(inception_v3: 1x3x96x96), googlenet/inception_v3 with ``aux_logits=False, init_weights=True``:

* ``conv/lin ch``: output channels of every conv/linear layer that runs, except the classifier (the
  last conv/linear to run, whose output is the model output: ``fc``/``classifier.N``, a conv in
  SqueezeNet).
* ``otofx ch`` / ``share``: distinct (producer weight, output index) pairs that appear as
  ``(weight, 0, idx)`` in some otofx group, and their share of ``conv/lin ch``; ``otofx rows``: rows
  over all groups (a residual stage's tied convs share one row per channel).
* ``exact``: norm statistics, affines and biases randomised, a random half of every group's rows
  zeroed, ``oto.compress()``; exact when max|diff| <= 1e-4*max(1, max|y|) in eval mode on a batch
  of the example input and a fresh one, and the compressed model has strictly fewer parameters.
  ``rel err`` is max|diff| / max(1, max|y|); ``max|y|`` shows the check is not vacuous (a wrong
  compression moves the output by a sizeable fraction of it).
* ``OTO ch`` / ``OTO rows``: only-train-once's prunable groups (``_peers.oto_coverage``: prunable,
  non-auxiliary, non-classifier): the output channels of the conv/linear weights they hold, counted
  as for otofx, and their rows; then whether its ``construct_subnet`` model runs and is exact after
  its own ``random_set_zero_groups``. ``vs OTO``: otofx ch - OTO ch, ``FEWER`` when negative.
  Channels, not rows, are compared: a row ties several channels (a residual stage, a shuffle, a
  whole conv group in otofx's grouped convs), so row counts depend on granularity.
* ``TP ch``: torch-pruning's prunable channels (``_peers.tp_groups``, classifier ignored): one
  root layer's out channels per group, so comparable to rows.

Run (about 20 min on 2 cores)::

    /work/venv/bin/python bench/coverage.py                 # every CNN
    /work/venv/bin/python bench/coverage.py --quick         # 8 representative models
    /work/venv/bin/python bench/coverage.py --models resnet18 googlenet --no-peers
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tabulate import tabulate
from torch import nn

import otofx
from _common import build, cnn_names, error_line, example_input, machine, model_arg, nparams, randomise_norms, zero_half_rows
from _peers import oto_coverage, tp_groups

QUICK = ["resnet18", "mobilenet_v3_small", "densenet121", "convnext_tiny", "regnet_x_400mf",
         "shufflenet_v2_x0_5", "googlenet", "squeezenet1_0"]
TOL = 1e-4


def producers(model: nn.Module, x: torch.Tensor) -> tuple[dict[str, int], str]:
    """Conv/linear modules that run on ``x`` (name -> out channels) and the last one (classifier)."""
    order: dict[str, int] = {}

    def hook(name: str):
        def record(m: nn.Module, inputs, output) -> None:
            order.setdefault(name, m.weight.shape[0])
        return record

    hooks = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()
             if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    classifier = list(order)[-1]
    del order[classifier]
    return order, classifier


def otofx_row(model: nn.Module, x: torch.Tensor, prods: dict[str, int]) -> dict:
    """Analyse, count prunable channels, zero half the rows (in place!), compress and compare."""
    res = {"ch": 0, "rows": 0, "exact": "no", "err": float("nan"), "ymax": float("nan"), "note": ""}
    try:
        oto = otofx.OTO(model, x)
    except Exception as e:  # noqa: BLE001 -- failures are data here
        res["note"] = f"otofx: {error_line(e)}"
        return res
    weights = {f"{n}.weight" for n in prods}
    pairs = {(name, int(i)) for z in oto.groups for name, dim, idx in z.params
             if dim == 0 and name in weights for i in idx.unique()}
    res["ch"], res["rows"] = len(pairs), sum(z.rows for z in oto.groups)
    zero_half_rows(model, oto.groups)
    xb = torch.cat([x, torch.randn(x.shape, generator=torch.Generator().manual_seed(1))])
    try:
        small = oto.compress(verify=False)
        with torch.no_grad():
            y, yc = model(xb), small.eval()(xb)
        ok, res["err"] = otofx.outputs_close(y, yc, TOL)
        res["ymax"] = float(y.abs().max())
        fewer = nparams(small) < nparams(model)
        res["exact"] = "yes" if ok and fewer else ("no" if not ok else "no (params)")
    except Exception as e:  # noqa: BLE001
        res["note"] = f"otofx compress: {error_line(e)}"
    return res


def yn(b: bool) -> str:
    return "yes" if b else "no"


def versus(ours: int, theirs: int) -> str:
    d = ours - theirs
    return "=" if d == 0 else (f"FEWER ({d})" if d < 0 else f"+{d}")


def run(name: str, side: int, peers: bool) -> dict:
    model, x = build(name), example_input(name, side)
    randomise_norms(model, torch.Generator().manual_seed(0))
    prods, classifier = producers(model, x)
    total = sum(prods.values())
    oc = oto_coverage(model, x, (classifier,)) if peers else None  # deep-copies: run before zeroing
    tg = tp_groups(model, x, (classifier,)) if peers else None
    o = otofx_row(model, x, prods)
    row = {"model": name, "conv/lin ch": total, "otofx ch": o["ch"], "share": f"{o['ch'] / total:.0%}",
           "otofx rows": o["rows"], "exact": o["exact"], "rel err": f"{o['err']:.1e}",
           "max|y|": f"{o['ymax']:.2f}"}
    notes = [o["note"]] if o["note"] else []
    if oc is not None:
        shapes = {n: p.shape[0] for n, p in model.named_parameters()}
        oto_ch = sum(shapes[n] for n in oc.prunable_params if n.removesuffix(".weight") in prods)
        row.update({"OTO ch": oto_ch if oc.ok else "fail", "OTO rows": oc.prunable_rows if oc.ok else "fail",
                    "vs OTO": versus(o["ch"], oto_ch) if oc.ok else "n/a",
                    "OTO runs": yn(oc.runs), "OTO exact": yn(oc.exact)})
        notes += [f"OTO {oc.error}"] if oc.error else []
    if tg is not None:
        row["TP ch"] = tg.channels if tg.ok else "fail"
        notes += [f"TP {tg.error}"] if tg.error else []
    row["notes"] = "; ".join(n[:110] for n in notes)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model_arg(ap, [])
    ap.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    ap.add_argument("--include-large", action="store_true", help="also regnet_y_16gf/32gf/128gf")
    ap.add_argument("--size", type=int, default=64, help="input side (inception_v3: at least 96)")
    ap.add_argument("--no-peers", action="store_true", help="otofx columns only")
    ap.add_argument("--format", default="github", help="tabulate table format")
    ap.add_argument("--transformers", action="store_true",
                    help="the transformer models instead (ViT/Swin/MaxViT, Hugging Face): bench/transformers.py's "
                         "coverage table, with its peers unless --no-peers")
    args = ap.parse_args()
    if args.transformers:
        import runpy
        import sys

        sys.argv = [sys.argv[0], "--no-latency", "--format", args.format] + (["--no-peers"] if args.no_peers else [])
        runpy.run_path(str(Path(__file__).with_name("transformers.py")), run_name="__main__")
        return
    names = args.models or (QUICK if args.quick else cnn_names(args.include_large))
    peers = not args.no_peers

    rows = []
    for name in names:
        rows.append(run(name, args.size, peers))
        print(f"[{len(rows)}/{len(names)}] {name}", flush=True)
    print(f"\n{machine()}; input 1x3x{args.size}x{args.size} (inception_v3 >= 96)\n")
    print(tabulate(rows, headers="keys", tablefmt=args.format))
    n = len(rows)
    count = lambda key, pred: sum(pred(r[key]) for r in rows)  # noqa: E731
    summary = [f"otofx exact on {count('exact', lambda v: v == 'yes')}/{n}"]
    if peers:
        summary += [f"only-train-once builds on {count('OTO ch', lambda v: v != 'fail')}/{n}, its compressed model "
                    f"runs on {count('OTO runs', lambda v: v == 'yes')}/{n} and is exact on "
                    f"{count('OTO exact', lambda v: v == 'yes')}/{n}",
                    f"torch-pruning finds groups on {count('TP ch', lambda v: v != 'fail')}/{n} (magnitude pruning, "
                    "not zero-invariant: no exactness column)",
                    f"otofx finds fewer prunable channels than only-train-once on "
                    f"{count('vs OTO', lambda v: v.startswith('FEWER'))}/{n}"]
    print("\n" + "\n".join(f"* {s}" for s in summary))


if __name__ == "__main__":
    main()
