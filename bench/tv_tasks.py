"""torchvision's detection models: captured, analysed, compressed, exact?

Every model of ``torchvision.models.detection`` is built with random weights (no download: ``weights=None``,
``weights_backbone=None``; eval mode; batch-norm statistics, norm affines and biases randomised as in the
tests) and given one 3x128x128 image. Then:

* ``front-end``: what captured it: ``export`` (draft_export along the example's branches: the graph
  raises on an input that takes another), or ``parts`` (``otofx/capture_parts.py``: the forward is not
  captured as a whole, its backbone and heads are; ``parts`` names them);
* ``groups``: zero-invariant groups found;
* ``auto`` / ``module``: half (floor) of every group's rows zeroed, ``oto.compress()`` (what it returns)
  and ``oto.compress(form="module")`` (the model's own class), each verified by otofx on the example
  (where a top-k or NMS picks among tied scores, with the full model's decisions replayed: ``replayed``
  counts the compressions that needed it), and ``kept``: the own class's parameters over the model's;
* ``other input``: the own class against the zeroed model on a 3x160x96 image (``otofx.verify.compare``,
  the same check): ``exact`` or the error.

Each model runs in its own process with a time limit (``--timeout``). ``python bench/tv_detection.py``
runs them all and prints the table; ``--only retinanet_resnet50_fpn,fcos_resnet50_fpn`` picks some.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def one(name: str) -> dict:
    import torch
    import torchvision

    sys.path.insert(0, os.path.join(HERE, "..", "tests"))
    from helpers import randomize, zero_random_rows

    import otofx
    from otofx.capture_parts import PARTS
    from otofx.verify import compare

    said: list = []
    handler = logging.Handler()
    handler.emit = lambda r: said.append(r.getMessage())
    logging.getLogger("otofx").addHandler(handler)
    torch.manual_seed(0)
    m = torchvision.models.get_model(name, weights=None, weights_backbone=None).eval()
    randomize(m)
    x = [torch.randn(3, 128, 128)]
    row = {"model": name}
    t0 = time.perf_counter()
    oto = otofx.OTO(m, (x,))
    row["analysis s"] = round(time.perf_counter() - t0, 1)
    parts = oto.graph_module.meta.get(PARTS)
    row["front-end"] = oto.frontend + (f" ({', '.join(parts.paths)})" if parts else "")
    row["groups"] = len(oto.groups)
    zero_random_rows(m, oto, seed=1, fraction=0.5)
    n = sum(p.numel() for p in m.parameters())
    for form in ("auto", "module"):
        try:
            small = oto.compress(form=form)
            row[form] = type(small).__name__
        except Exception as e:  # noqa: BLE001 - the row says what failed
            row[form] = f"FAIL {type(e).__name__}: {str(e)[:120]}"
            small = None
    if small is not None:
        row["kept"] = round(sum(p.numel() for p in small.parameters()) / n, 3)
        try:
            compare(m, small, ([torch.randn(3, 160, 96)],), None, 1e-4, "the own class", "a 3x160x96 image")
            row["other input"] = "exact"
        except Exception as e:  # noqa: BLE001
            row["other input"] = f"{type(e).__name__}: {str(e)[:120]}"
    row["replayed"] = sum("decision(s) on float values" in s for s in said)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--one", default="", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print("ROW " + json.dumps(one(a.one)))
        return
    import torchvision
    from tabulate import tabulate

    names = a.only.split(",") if a.only else torchvision.models.list_models(module=torchvision.models.detection)
    print(f"torch {__import__('torch').__version__}, torchvision {torchvision.__version__}; "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    rows = []
    for name in names:
        try:
            p = subprocess.run([sys.executable, __file__, "--one", name], capture_output=True, text=True,
                               timeout=a.timeout)
            got = [ln[4:] for ln in p.stdout.splitlines() if ln.startswith("ROW ")]
            row = json.loads(got[-1]) if got else {"model": name, "front-end": "FAIL " + (p.stderr.strip().splitlines()
                                                                                       or ["?"])[-1][:160]}
        except subprocess.TimeoutExpired:
            row = {"model": name, "front-end": f"timeout ({a.timeout:.0f} s)"}
        print(json.dumps(row), flush=True)
        rows.append(row)
    keys = ["model", "front-end", "groups", "auto", "module", "kept", "other input", "replayed", "analysis s"]
    print(tabulate([[r.get(k, "") for k in keys] for r in rows], headers=keys, tablefmt="github"))


if __name__ == "__main__":
    main()
