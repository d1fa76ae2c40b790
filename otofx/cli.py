"""The ``otofx`` command line.

    otofx analyze torchvision:resnet50 --input 1,3,224,224
    otofx analyze my_pkg.models:build_net --input 1,3,32,32 --pin fc
    otofx rules
    otofx demo                    # DHSPG on scikit-learn's digits: train, compress, compare (< 3 min)
    otofx demo --method scop      # SCOP: prune a trained CNN by knockoff scores, vs L1 and random

A model spec is ``torchvision:NAME`` (random weights, nothing downloaded) or ``module:attr``, where
attr is an nn.Module instance or a callable returning one.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
import time

import torch

from otofx.errors import OTOError

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "int64": torch.long, "long": torch.long}


def load_model(spec: str) -> torch.nn.Module:
    if ":" not in spec:
        raise OTOError(f"model spec {spec!r}: expected 'torchvision:NAME' or 'module:attr'")
    mod_name, _, attr = spec.partition(":")
    if mod_name == "torchvision":
        try:
            import torchvision
        except ImportError as e:
            raise OTOError("torchvision is not installed: pip install torchvision") from e
        if attr not in torchvision.models.list_models():
            raise OTOError(f"torchvision has no model {attr!r}; see torchvision.models.list_models()")
        kwargs = {"aux_logits": False, "init_weights": True} if attr in ("googlenet", "inception_v3") else {}
        return torchvision.models.get_model(attr, weights=None, **kwargs).eval()
    try:
        module = importlib.import_module(mod_name)
    except ImportError as e:
        raise OTOError(f"cannot import {mod_name!r} from model spec {spec!r}: {e}") from e
    obj = getattr(module, attr, None)
    if obj is None:
        raise OTOError(f"module {mod_name!r} has no attribute {attr!r}")
    model = obj if isinstance(obj, torch.nn.Module) else obj()
    if not isinstance(model, torch.nn.Module):
        raise OTOError(f"{spec!r} did not give an nn.Module (got {type(model).__name__})")
    return model


def parse_shape(text: str) -> tuple:
    try:
        shape = tuple(int(s) for s in text.split(","))
    except ValueError as e:
        raise OTOError(f"--input {text!r}: expected comma-separated sizes such as 1,3,224,224") from e
    if not shape or any(s <= 0 for s in shape):
        raise OTOError(f"--input {text!r}: sizes must be positive")
    return shape


def _analyze(args) -> int:
    from otofx import OTO

    model = load_model(args.model)
    dtype = _DTYPES[args.dtype]
    inputs = []
    for text in args.input:
        shape = parse_shape(text)
        inputs.append(torch.randn(shape) if dtype.is_floating_point else torch.randint(0, args.vocab, shape))
    t0 = time.perf_counter()
    # NB: a tuple output's keys are its indices
    free = "auto" if args.free_output is None else tuple(int(k) if k.isdigit() else k for k in args.free_output if k)
    oto = OTO(model, tuple(inputs), pin=tuple(args.pin), free_outputs=free)
    dt = time.perf_counter() - t0
    print(oto.report())
    print(f"\nanalysis took {dt:.3f} s")
    if args.svg:
        print(f"groups drawn in {oto.visualize(args.svg)}")
    return 0


def _rule_file(rule) -> str:
    """Where a rule is written: ``passes/rules/<family>.py`` (installed as ``otofx.passes.rules.<family>``),
    or the module of a rule registered with ``otofx.register_rule``."""
    mod, prefix = rule.analyze.__module__, "otofx.passes.rules."
    return f"passes/rules/{mod[len(prefix):]}.py" if mod.startswith(prefix) else mod


def _rules(args) -> int:
    from tabulate import tabulate

    from otofx.passes import RULES
    from otofx.passes.registry import FUNCTION_FORMS, METHOD_FORMS, MODULE_FORMS

    counts = {}
    for table in (MODULE_FORMS, FUNCTION_FORMS, METHOD_FORMS):
        for form in table.values():
            counts[form.rule] = counts.get(form.rule, 0) + 1
    rows = [[name, _rule_file(r), counts.get(name, 0), r.doc] for name, r in sorted(RULES.items())]
    print(tabulate(rows, headers=["rule", "file", "forms", "channel algebra"], tablefmt="github"))
    return 0


def _demo(args) -> int:
    from tabulate import tabulate

    from otofx import demo

    if args.method == "scop":
        return _demo_scop(args)
    overrides = {k: v for k, v in (("epochs", args.epochs), ("max_steps", args.max_steps), ("seed", args.seed),
                                   ("target_group_sparsity", args.target), ("latency_runs", args.latency_runs))
                 if v is not None}
    config = demo.DemoConfig(**overrides)
    progress = logging.getLogger("otofx.demo")
    old_level = progress.level
    if not args.quiet:
        progress.setLevel(logging.INFO)  # the per-epoch progress lines are the demo's point
    t0 = time.perf_counter()
    try:
        result = demo.run_demo(config)
    finally:
        progress.setLevel(old_level)
    dt = time.perf_counter() - t0
    dense = result.rows[0]
    rows = []
    for r in result.rows:
        rows.append([r["model"], f"{100 * r['test acc']:.2f}%", f"{r['params']:,}",
                     f"{r['params'] / dense['params']:.3f}", f"{r['FLOPs'] / 1e6:.2f}",
                     f"{r['FLOPs'] / dense['FLOPs']:.3f}", f"{r['latency ms']:.3f}",
                     "" if r["group sparsity"] is None else f"{r['group sparsity']:.3f}"])
    print(tabulate(rows, headers=["model", "test acc", "params", "x dense", "MFLOPs", "x dense", "latency ms",
                                  "group sparsity"], tablefmt="github", colalign=("left",) + ("right",) * 7,
                   disable_numparse=True))
    print(f"\ncompressed vs DHSPG-trained full model on the {result.n_test} test images: "
          f"max |logit diff| {result.max_test_diff:.1e}, same predictions: {result.same_predictions}")
    print(f"latency: batch 1, one thread, median of {config.latency_runs}; FLOPs: FlopCounterMode, one image; "
          f"took {dt:.0f} s")
    return 0


def _demo_scop(args) -> int:
    from tabulate import tabulate

    from otofx import demo

    overrides = {k: v for k, v in (("epochs", args.epochs), ("max_steps", args.max_steps), ("seed", args.seed),
                                   ("ratio", args.target), ("latency_runs", args.latency_runs),
                                   ("knockoff", args.knockoff), ("scop_epochs", args.scop_epochs),
                                   ("finetune_epochs", args.finetune_epochs)) if v is not None}
    config = demo.ScopDemoConfig(**overrides)
    loggers = [logging.getLogger("otofx.demo"), logging.getLogger("otofx")]
    old_levels = [lg.level for lg in loggers]
    if not args.quiet:
        for lg in loggers:
            lg.setLevel(logging.INFO)
    t0 = time.perf_counter()
    try:
        result = demo.run_scop_demo(config)
    finally:
        for lg, lvl in zip(loggers, old_levels):
            lg.setLevel(lvl)
    dt = time.perf_counter() - t0
    dense = result.rows[0]
    rows = [[r["model"], f"{100 * r['acc before ft']:.2f}%", f"{100 * r['test acc']:.2f}%", f"{r['params']:,}",
             f"{r['params'] / dense['params']:.3f}", f"{r['FLOPs'] / 1e6:.2f}", f"{r['FLOPs'] / dense['FLOPs']:.3f}",
             f"{r['latency ms']:.3f}"] for r in result.rows]
    print(tabulate(rows, headers=["model", "acc pruned", "acc fine-tuned", "params", "x dense", "MFLOPs", "x dense",
                                  "latency ms"], tablefmt="github", colalign=("left",) + ("right",) * 7,
                   disable_numparse=True))
    print(f"\n{100 * config.ratio:.0f}% of every group's rows removed; BN re-estimated on {config.bn_batches} batches; "
          f"fine-tuned {config.finetune_epochs} epochs (lr {config.finetune_lr}, cosine); SCOP: {config.knockoff} "
          f"knockoffs, {config.scop_epochs} epochs")
    print(f"latency: batch 1, one thread, median of {config.latency_runs}; FLOPs: FlopCounterMode, one image; "
          f"took {dt:.0f} s")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="otofx", description="Only-Train-Once structured pruning on torch.fx")
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("analyze", help="find the zero-invariant groups of a model and print them")
    a.add_argument("model", help="torchvision:NAME or module:attr")
    a.add_argument("--input", action="append", required=True, help="example input shape, e.g. 1,3,224,224 (repeatable)")
    a.add_argument("--dtype", default="float32", choices=sorted(_DTYPES))
    a.add_argument("--vocab", type=int, default=100, help="upper bound for integer inputs")
    a.add_argument("--pin", action="append", default=[], help="module or parameter name to keep whole (repeatable)")
    a.add_argument("--free-output", action="append", metavar="KEY",
                   help="output key that may come back narrower (repeatable; default: a Hugging Face "
                        "encoder-decoder's encoder_last_hidden_state; --free-output '' frees none)")
    a.add_argument("--svg", metavar="FILE", help="draw the graph with its groups to FILE (.svg, .html or .dot; "
                                                 "needs Graphviz: pip install 'otofx[viz]')")
    a.add_argument("-v", "--verbose", action="store_true")
    a.set_defaults(fn=_analyze)
    r = sub.add_parser("rules", help="list the operator rules and their channel algebra")
    r.set_defaults(fn=_rules)
    demo_help = ("train a small CNN on scikit-learn's digits with DHSPG, compress it, and compare it with the "
                 "same CNN trained by plain SGD (needs scikit-learn: pip install -e '.[demo]')")
    d = sub.add_parser("demo", help=demo_help, description=demo_help)
    d.add_argument("--epochs", type=int, help="training epochs for each model (default: the README's run)")
    d.add_argument("--max-steps", type=int, help="cap on optimizer steps per model (quick smoke runs)")
    d.add_argument("--target", type=float, help="DHSPG target group sparsity (default 0.7); scop: share of every "
                                                  "group's rows removed (default 0.5)")
    d.add_argument("--seed", type=int, help="training seed (the train/test split is fixed)")
    d.add_argument("--latency-runs", type=int, help="timed forward calls per model")
    d.add_argument("--method", choices=("dhspg", "scop"), default="dhspg",
                   help="dhspg: train sparse with DHSPG and compress (default); scop: prune a trained model by "
                        "SCOP's knockoff scores, next to L1 and random, then fine-tune")
    d.add_argument("--knockoff", choices=("gaussian", "permute"), help="scop: knockoff inputs (default gaussian)")
    d.add_argument("--scop-epochs", type=int, help="scop: epochs of the knockoff stage (default 10)")
    d.add_argument("--finetune-epochs", type=int, help="scop: fine-tuning epochs after pruning (default 10)")
    d.add_argument("-q", "--quiet", action="store_true", help="no per-epoch progress lines")
    d.set_defaults(fn=_demo)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
                        format="%(name)s: %(message)s")
    try:
        return args.fn(args)
    except OTOError as e:
        print(f"otofx: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
