"""The seed methods on every Hugging Face architecture from a tiny config: SLB and ADMM, class by class.

    python bench/hf_methods.py --jobs 2 --timeout 150 --save rows.jsonl     # every class hf_sweep builds
    python bench/hf_methods.py --rows bench/hf_methods_rows.jsonl            # the table again

Each class is built as ``bench/hf_sweep.py`` builds it (its tiny config, random weights, its example
input), in a forked child, and then:

* **SLB**: ``otofx.slb.quantize(model, x, bits=2, act_bits=8, warm_start=0.1)`` (the default form:
  the model's own class where it can, else the graph), one training step on the sum of the first
  output, ``freeze``; the frozen copy must compute what the quantised model computes in eval mode,
  bit for bit. The row gives the form, the layers quantised and the weights the warning names as
  staying float.
* **ADMM**: ``otofx.admm.ADMM(model, SGD, block=(4, 4), prune=0.5, unify=0.25)``, two steps on the
  mean square of the first output, ``finish``, BatchNorm statistics re-estimated on the example; the
  plain copy (``plain``) and the block-sparse copy (``to_bsr``) must compute what the finished model
  computes (1e-4 relative). The row gives the
  block groups and how many Linears ``to_bsr`` converted.

Internals:
    * Children and time-outs are ``hf_sweep.sweep``'s; a class is one row whatever fails.
    * "The first output": the logits of a model output, else its first floating tensor.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hf_sweep as H  # noqa: E402


@dataclass
class MethodRow:
    task: str
    model_type: str
    cls: str
    built: bool = False
    slb: str = ""  # "ok", or the failure
    slb_form: str = ""
    slb_layers: int = 0
    slb_float: int = 0  # weights the warning names as staying float
    admm: str = ""
    admm_groups: int = 0
    admm_bsr: int = 0  # Linears to_bsr converted
    why: str = ""  # build failure
    seconds: float = 0.0


def _first(out) -> torch.Tensor:
    from torch.utils._pytree import tree_flatten

    if hasattr(out, "logits") and isinstance(out.logits, torch.Tensor):
        return out.logits
    return next(t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.is_floating_point())


def _run(m, x: dict, kw: dict):
    return _first(m(**x, **({} if isinstance(m, torch.fx.GraphModule) else kw)))


class _Names(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.text = []

    def emit(self, record):
        self.text.append(record.getMessage())


def _slb(row: MethodRow, model, x: dict, kw: dict) -> None:
    import otofx.slb as slb

    seen = _Names()
    logging.getLogger("otofx").addHandler(seen)
    try:
        q = slb.quantize(model, x, bits=2, act_bits=8, warm_start=0.1)
    finally:
        logging.getLogger("otofx").removeHandler(seen)
    row.slb_form = "graph" if isinstance(q, torch.fx.GraphModule) else "module"
    row.slb_layers = len(slb.slb_layers(q))
    floats = [t for t in seen.text if "stay float" in t]
    row.slb_float = sum(len(t.rsplit(": ", 1)[-1].split(", ")) for t in floats)
    q.train()
    _run(q, x, kw).float().sum().backward()
    q.eval()
    fr = slb.freeze(q)
    with torch.no_grad():
        a, b = _run(q, x, kw), _run(fr, x, kw)
    row.slb = "ok" if torch.equal(a, b) else f"freeze differs by {(a - b).abs().max().item():.2g}"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return (a - b).abs().max().item() / max(1.0, a.abs().max().item())


def _admm(row: MethodRow, model, x: dict, kw: dict) -> None:
    import otofx.admm as A
    from otofx.calibrate import reestimate_bn

    model.train()
    opt = A.ADMM(model, torch.optim.SGD(model.parameters(), lr=1e-3), block=(4, 4), prune=0.5, unify=0.25, rounds=2,
                 steps_per_round=1)
    row.admm_groups = len(list(opt.blocks))
    for _ in range(2):
        loss = _run(model, x, kw).float().square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    small = A.finish(model, opt).eval()
    # NB: batch statistics gathered with the unprojected weights can overflow a deep net projected to
    # blocks (HGNet V2): they are re-estimated with the finished weights, as after any structural change
    reestimate_bn(small, [x])
    with torch.no_grad():
        ref = _run(small, x, kw)
        plain = _run(A.plain(small), x, kw)
        fast, converted = A.to_bsr(small)
        bsr = _run(fast, x, kw)
    row.admm_bsr = len(converted)
    errs = {"plain": _rel(ref, plain), "to_bsr": _rel(ref, bsr)}
    bad = {k: v for k, v in errs.items() if not v <= 1e-4}
    row.admm = "ok" if not bad else "; ".join(f"{k} differs by {v:.2g}" for k, v in bad.items())


def run_methods(task: str, model_type: str, cls_name: str, peers: bool = False) -> MethodRow:
    import copy

    logging.getLogger("otofx").setLevel(logging.WARNING)
    row = MethodRow(task, model_type, cls_name)
    t0 = time.perf_counter()
    try:
        _, model, x, kw = H.build(task, model_type, cls_name)
    except Exception as e:  # noqa: BLE001 -- a failure is a row of the table
        row.why = "build: " + H._err(e)
        return row
    row.built = True
    for name, fn in (("slb", _slb), ("admm", _admm)):
        try:
            fn(row, copy.deepcopy(model), x, kw)
        except Exception as e:  # noqa: BLE001
            setattr(row, name, H._err(e))
    row.seconds = time.perf_counter() - t0
    return row


def table(rows: list) -> str:
    from tabulate import tabulate

    head = ["task", "family", "class", "SLB", "form", "layers", "stay float", "ADMM", "block groups", "to_bsr Linears", "s"]
    body = [[r.task, r.model_type, r.cls, r.slb[:70], r.slb_form, r.slb_layers, r.slb_float, r.admm[:70], r.admm_groups,
             r.admm_bsr, f"{r.seconds:.1f}"] for r in rows if r.built]
    return tabulate(body, head, tablefmt="github")


def summary(rows: list) -> str:
    built = [r for r in rows if r.built]
    slb_ok = [r for r in built if r.slb == "ok"]
    admm_ok = [r for r in built if r.admm == "ok"]
    own = [r for r in slb_ok if r.slb_form == "module"]
    floats = [r for r in slb_ok if r.slb_float]
    pct = lambda a, b: f"{100 * a / b:.1f}%" if b else "n/a"  # noqa: E731
    return "\n".join([
        f"classes built from a tiny config: {len(built)} of {len(rows)}",
        f"SLB quantize -> train step -> freeze, frozen == quantised: {len(slb_ok)} / {len(built)} ({pct(len(slb_ok), len(built))}); "
        f"in the model's own class: {len(own)}; with weights left float (named): {len(floats)}",
        f"ADMM 2 steps -> finish, plain and to_bsr == finished: {len(admm_ok)} / {len(built)} ({pct(len(admm_ok), len(built))})",
    ])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default="causal-lm,masked-lm,seq-cls,image-cls")
    ap.add_argument("--only", default="", help="comma-separated model types (default: all)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=150.0)
    ap.add_argument("--save", default="", help="append each finished row to this JSON-lines file (resumes)")
    ap.add_argument("--rows", default="", help="print the table of saved rows instead of running")
    a = ap.parse_args(argv)
    t0 = time.time()
    if a.rows:
        rows = H.read_rows(a.rows, MethodRow)
    else:
        items = H.entries(tuple(filter(None, a.tasks.split(","))), set(filter(None, a.only.split(","))) or None)
        before = H.read_rows(a.save, MethodRow) if a.save and os.path.exists(a.save) else []
        have = {(r.task, r.model_type, r.cls) for r in before}

        def progress(r):
            print(f"{r.task} {r.cls}: slb {r.slb[:60] or '-'} | admm {r.admm[:60] or '-'} {r.why[:60]}", file=sys.stderr,
                  flush=True)
            if a.save:
                H.save_row(a.save, r)

        rows = before + H.sweep([it for it in items if it not in have], a.jobs, a.timeout, False, progress,
                                fn=run_methods, row_cls=MethodRow)
    fails = [r for r in rows if r.built and (r.slb != "ok" or r.admm != "ok")]
    out = [table(rows), "", "Failures:"] + [f"- {r.task} {r.cls}: SLB {r.slb}; ADMM {r.admm}" for r in fails]
    load = os.getloadavg()
    took = "rows read from " + a.rows if a.rows else f"took {time.time() - t0:.0f} s with {a.jobs} jobs"
    out += ["", summary(rows), f"{took}; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"]
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
