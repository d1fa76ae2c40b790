"""SLB low-bit weights on scikit-learn's digits: FP vs SLB W1/W2/W4 vs the STE baseline, ablations.

Two models, both from ``otofx.demo``'s data (fixed stratified 1437/360 split):

* ``cnn``: the demo's ``DigitsNet(32, 32, 64, 64)`` on 16x16 images;
* ``mlp``: a 64-256-256-10 MLP (Linear-BatchNorm-ReLU twice, linear head) on the 8x8 images flattened.

For every seed and model (same initialisation and batch order in every row of a seed):

* ``FP``: float training;
* ``SLB Wb``: ``otofx.slb.quantize(model, x, bits=b)`` (default layers: every Conv/Linear but the
  first and the last; the layers named in the header), ``otofx.slb.Schedule`` (t_start 0.2, t_end
  0.6 (``--t-start``, ``--t-end``), start 1.0, state BN over the training set after each epoch past
  t_start; the ramp reaches ``--t-end-val``, by default ``otofx.slb.REFERENCE_T_END`` = 1.2**40,
  the temperature golden-stick's factor 1.2 reaches at t_end of its 100 epochs; ``--t-end-val
  none`` keeps the factor 1.2 per epoch, which reaches only 4.3 at 20 epochs), then
  ``otofx.slb.freeze`` and ``otofx.slb.to_torchao``;
* ``STE Wb``: ``otofx.slb.ste.ste_quantize`` on the same layers (torchao's QAT fake quantiser for
  Linear at b >= 2, ours for conv and one bit);
* ablations (``--ablation-bits``): ``no anneal`` (the temperature stays 1; the hard phase
  still starts at t_end) and ``no SBN`` (no calibration loader: BatchNorm statistics are those of
  training).

Every run: ``--epochs`` epochs of batch 64, SGD momentum 0.9 (lr ``--lr``, constant then cosine to 0
over the last 40%, ``otofx.demo.lr_factor``), weight decay 1e-4 on float parameters, ``--logit-wd``
(0) on SLB's logits, whose lr is ``--logit-lr-mult`` (1) times the float parameters'. Reported per
(model, method): test accuracy mean ± sample std over seeds, per seed, the mean test cross-entropy
(a finer measure than accuracy on 360 images); the change vs FP
of the same seed (mean, worst); for SLB, the largest |frozen - last eval| over seeds (the eval-mode
accuracy after the last epoch vs ``freeze(q)``), the largest |torchao - frozen|, the most distinct
values in any frozen layer (per output channel where the layer has a scale), the bits per
quantised weight and the model's packed size against float32 (``otofx.slb.size_report``). A second
table pairs SLB and STE by seed (same initialisation and batch order): the accuracy difference per
seed, its mean, and the mean loss difference.

Tuning options (all off by default; what they do is the same for SLB and STE unless named so):
``--q-opt adam --q-lr LR`` trains the quantised layers' own tensors (SLB's logits, STE's latent float
weights: ``latent_weights``) with Adam at LR (the reference's ImageNet recipe is Adam 1e-3) beside the
float parameters' SGD, on the same lr schedule; ``--ste-q-opt``/``--ste-q-lr`` set STE's apart.
``--warm-start TAU0`` starts SLB and STE from the FP model of the same seed (SLB's logits
``A_j = -(W/s - v_j)^2 / TAU0``, our addition) and trains them ``--epochs`` more (``--warm-lr``):
twice the epochs of a from-scratch run. ``--calibration-batches`` limits state BN. ``--no-slb``
runs FP and STE only.

``--val`` sets the test set aside and trains on three quarters of the training set, reporting on the
remaining quarter (stratified, fixed): the split on which the default settings were chosen
(``bench/RESULTS.md`` section 9).

Run (README)::

    python bench/slb.py            # 3 seeds, both models
    python bench/slb.py --quick    # 1 seed, 10 epochs: a smoke run
    python bench/slb.py --models mlp --layers all --bits 1 2 --ablation-bits   # every layer low-bit
    python bench/slb.py --val --models cnn --bits 1 2 --ablation-bits         # selection on validation data
    python bench/slb.py --models cnn --q-opt adam --q-lr 1e-3 --t-end 0.8 --ste-q-opt sgd --ste-q-lr 0.03
        # the CNN's settings chosen on validation data for each method (RESULTS section 9)

Internals:
    * One intra-op thread; seeds change initialisation and batch order, not the split.
    * The logits are trained by the same SGD as the float weights (the reference uses SGD on CIFAR).
"""
from __future__ import annotations

import argparse
import copy
import logging
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from tabulate import tabulate
from torch import nn
from torch.nn.utils import parametrize

import otofx
import otofx.slb as slb
from otofx.demo import DigitsNet, evaluate, load_digits_split, lr_factor
from otofx.demo import logits as logits_of
from otofx.slb.ste import STEWeight, ste_quantize

log = logging.getLogger("bench.slb")


class BNMLP(nn.Module):
    """64-256-256-10: Linear-BN-ReLU, Linear-BN-ReLU, Linear."""

    def __init__(self, widths=(64, 256, 256), classes: int = 10):
        super().__init__()
        layers = []
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(a, b), nn.BatchNorm1d(b), nn.ReLU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(widths[-1], classes)

    def forward(self, x):
        return self.head(self.body(x))


def data_for(model: str, val: bool = False):
    """The model's split; with ``val`` the test set is set aside and a stratified quarter of the
    training set (fixed, ``random_state=1``) plays its part: the split used to choose settings."""
    d = load_digits_split(side=16 if model == "cnn" else 8)
    if model == "mlp":
        d = type(d)(d.x_train.flatten(1), d.y_train, d.x_test.flatten(1), d.y_test)
    if val:
        from sklearn.model_selection import train_test_split

        tr, va = train_test_split(torch.arange(len(d.y_train)).numpy(), test_size=0.25, random_state=1,
                                  stratify=d.y_train.numpy())
        tr, va = torch.from_numpy(tr), torch.from_numpy(va)
        d = type(d)(d.x_train[tr], d.y_train[tr], d.x_train[va], d.y_train[va])
    return d, (DigitsNet if model == "cnn" else BNMLP)


def batches(x, y, size: int):
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]


def latent_weights(m: nn.Module) -> list[nn.Parameter]:
    """The trainable tensors that stand for the quantised weights: SLB's logits, or STE's latent float
    weights (under an ``STEWeight`` parametrisation, or the ``weight`` of torchao's fake-quantised Linear)."""
    out = [layer.logits for layer in slb.slb_layers(m)]
    for mod in m.modules():
        if parametrize.is_parametrized(mod):
            out += [mod.parametrizations[a].original for a, pl in mod.parametrizations.items()
                    if any(isinstance(p, STEWeight) for p in pl)]
        elif type(mod).__name__ == "FakeQuantizedLinear":
            out.append(mod.weight)
    return out


def run(model: str, method: str, bits: int | None, seed: int, args, anneal: bool = True, sbn: bool = True,
        init: nn.Module | None = None) -> dict:
    """One training; ``init``: start from this (FP-trained) model instead of a fresh one (``--warm-start``)."""
    data, cls = data_for(model, args.val)
    torch.manual_seed(seed)
    net = cls() if init is None else copy.deepcopy(init)
    example = data.x_train[:2]
    net.train()
    lr = args.lr if init is None or args.warm_lr is None else args.warm_lr
    if method == "slb":
        m = slb.quantize(net, example, bits=bits, layers=args.layers,
                         warm_start=args.warm_start if init is not None else None)
        t_end_val = (args.t_end_val if anneal else 1.0) if args.t_end_val is not None or not anneal else None
        sched = slb.Schedule(m, args.epochs, batches(data.x_train, data.y_train, 64) if sbn else None,
                             t_factor=1.2 if anneal else 1.0, t_end_val=t_end_val, t_start=args.t_start,
                             t_end=args.t_end, calibration_batches=args.calibration_batches)
    elif method == "ste":
        m, sched = ste_quantize(net, example, bits, layers=args.layers), None
    else:
        m, sched = net, None
    latent = {id(p) for p in latent_weights(m)}
    rest = [p for p in m.parameters() if id(p) not in latent]
    qparams = [p for p in m.parameters() if id(p) in latent]
    # SLB's logits: --logit-wd, lr x --logit-lr-mult (SGD); STE's latent weights: those of the float layers
    q_wd, q_lr = (args.logit_wd, lr * args.logit_lr_mult) if method == "slb" else (1e-4, lr)
    q_opt, given_lr = args.q_opt, args.q_lr
    if method == "ste":
        q_opt, given_lr = args.ste_q_opt or q_opt, args.ste_q_lr if args.ste_q_lr is not None else given_lr
    if given_lr is not None:
        q_lr = given_lr
    groups = [{"params": rest, "weight_decay": 1e-4}]
    opts = []
    if qparams and q_opt == "adam":
        opts.append(torch.optim.Adam(qparams, lr=q_lr, weight_decay=q_wd))
    elif qparams:
        groups.append({"params": qparams, "weight_decay": q_wd, "lr": q_lr})
    opts.insert(0, torch.optim.SGD(groups, lr=lr, momentum=0.9))
    spe = len(data.y_train) // 64
    total = args.epochs * spe
    lr_scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: lr_factor(s, total, 0.6)) for o in opts]
    gen = torch.Generator().manual_seed(seed)
    m.train()
    for epoch in range(args.epochs):
        perm = torch.randperm(len(data.y_train), generator=gen)
        for b in range(spe):
            idx = perm[b * 64:(b + 1) * 64]
            loss = F.cross_entropy(m(data.x_train[idx]), data.y_train[idx])
            for o in opts:
                o.zero_grad(set_to_none=True)
            loss.backward()
            for o, ls in zip(opts, lr_scheds):
                o.step()
                ls.step()
        if sched is not None:
            sched.step()
    acc = evaluate(m, data.x_test, data.y_test)
    out = {"acc": acc, "loss": float(F.cross_entropy(logits_of(m, data.x_test), data.y_test))}
    if method == "fp":
        out["model"] = m
    if method == "slb":
        frozen = slb.freeze(m)
        out["frozen"] = evaluate(frozen, data.x_test, data.y_test)
        out["torchao"] = evaluate(slb.to_torchao(frozen), data.x_test, data.y_test)
        rep = slb.size_report(frozen)
        out["distinct"] = max(ls.distinct for ls in rep.layers)
        out["bpw"], out["ratio"] = rep.bits_per_weight, rep.ratio
        out["layers"] = [ls.name for ls in rep.layers]
    log.info("%s %s W%s seed %d%s%s: test acc %.4f%s", model, method, bits, seed, "" if anneal else " no-anneal",
             "" if sbn else " no-SBN", acc, f" frozen {out['frozen']:.4f}" if "frozen" in out else "")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["cnn", "mlp"], choices=["cnn", "mlp"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--bits", nargs="+", type=int, default=[1, 2, 4])
    ap.add_argument("--ablation-bits", nargs="*", type=int, default=[1])
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--logit-lr-mult", type=float, default=1.0, help="lr of SLB's logits / lr")
    ap.add_argument("--logit-wd", type=float, default=0.0, help="weight decay on SLB's logits (golden-stick: 1e-4)")
    ap.add_argument("--t-end-val", type=lambda v: None if v == "none" else float(v), default=slb.REFERENCE_T_END,
                    help="temperature at t_end ('none': the per-epoch factor 1.2 whatever the budget)")
    ap.add_argument("--t-start", type=float, default=0.2, help="ramp start, a fraction of the epochs (0.2)")
    ap.add_argument("--t-end", type=float, default=0.6, help="ramp end and hard phase, a fraction of the epochs (0.6)")
    ap.add_argument("--q-opt", choices=["sgd", "adam"], default="sgd",
                    help="optimizer of SLB's logits and of STE's latent weights, the same for both (sgd: the "
                         "float parameters' SGD; adam: Adam, the reference's ImageNet recipe)")
    ap.add_argument("--q-lr", type=float, default=None,
                    help="lr of SLB's logits and of STE's latent weights (default: as the float parameters, "
                         "the logits times --logit-lr-mult)")
    ap.add_argument("--ste-q-opt", choices=["sgd", "adam"], default=None, help="STE's own --q-opt (default: --q-opt)")
    ap.add_argument("--ste-q-lr", type=float, default=None, help="STE's own --q-lr (default: --q-lr)")
    ap.add_argument("--warm-start", type=float, default=None, metavar="TAU0",
                    help="start SLB and STE from the FP model of the same seed (trained --epochs first), "
                         "SLB's logits A_j = -(W/s - v_j)^2/TAU0; both then train --epochs more")
    ap.add_argument("--warm-lr", type=float, default=None, help="lr after a warm start (default --lr)")
    ap.add_argument("--calibration-batches", type=int, default=None,
                    help="state BN batches (of 64) after each epoch (default: the whole training set)")
    ap.add_argument("--val", action="store_true",
                    help="choose settings: train on 3/4 of the training set, report on the other 1/4 (no test data)")
    ap.add_argument("--layers", default=None, choices=["all"],
                    help="quantise every Conv/Linear (default: all but the first and the last)")
    ap.add_argument("--no-ste", action="store_true")
    ap.add_argument("--no-slb", action="store_true", help="FP and STE only (STE's settings on the validation split)")
    ap.add_argument("--quick", action="store_true", help="1 seed, 10 epochs, W1 and W2")
    ap.add_argument("-q", "--quiet", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs, args.bits = args.seeds[:1], 10, [1, 2]
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(name)s: %(message)s")
    torch.set_num_threads(1)
    t0 = time.time()
    t_end_val = "none" if args.t_end_val is None else f"{args.t_end_val:.4g}"
    print(f"bench/slb.py: otofx {otofx.__version__}, torch {torch.__version__}, seeds {args.seeds}, "
          f"epochs {args.epochs}, lr {args.lr} (logits x{args.logit_lr_mult:g}, logit wd {args.logit_wd:g}), "
          f"t_end_val {t_end_val} (ramp {args.t_start:g}-{args.t_end:g}), "
          f"{'validation split' if args.val else 'test split'}, layers {args.layers or 'default'}, bits {args.bits}, "
          f"ablations at {args.ablation_bits}; latent weights {args.q_opt}"
          f"{'' if args.q_lr is None else f' lr {args.q_lr:g}'}"
          f"{'' if args.ste_q_opt is None and args.ste_q_lr is None else f' (STE: {args.ste_q_opt or args.q_opt} lr {args.ste_q_lr if args.ste_q_lr is not None else args.q_lr})'}"
          f"{'' if args.warm_start is None else f', warm start from FP tau0 {args.warm_start:g} (lr {args.warm_lr or args.lr:g})'}"
          f"{'' if args.calibration_batches is None else f', state BN {args.calibration_batches} batches'}"
          f"; load average before {' '.join(f'{v:.2f}' for v in os.getloadavg())}",
          flush=True)
    rows, paired = [], []
    split = "val" if args.val else "test"
    for model in args.models:
        fp = {s: run(model, "fp", None, s, args) for s in args.seeds}
        trained = {s: fp[s].pop("model") for s in args.seeds}
        init = {s: trained[s] if args.warm_start is not None else None for s in args.seeds}
        configs = [("FP", "fp", None, True, True)]
        for b in args.bits:
            if not args.no_slb:
                configs.append((f"SLB W{b}", "slb", b, True, True))
            if not args.no_ste:
                configs.append((f"STE W{b}", "ste", b, True, True))
        for b in args.ablation_bits:
            configs += [(f"SLB W{b} no anneal", "slb", b, False, True), (f"SLB W{b} no SBN", "slb", b, True, False)]
        qlayers, by_name = None, {}
        for name, method, bits, anneal, sbn in configs:
            res = {s: (fp[s] if method == "fp" else run(model, method, bits, s, args, anneal, sbn, init[s])) for s in args.seeds}
            by_name[name] = res
            accs = [100 * res[s]["acc"] for s in args.seeds]
            deltas = [100 * (res[s]["acc"] - fp[s]["acc"]) for s in args.seeds]
            row = [model, name, f"{statistics.mean(accs):.2f} ± {statistics.stdev(accs) if len(accs) > 1 else 0:.2f}",
                   " ".join(f"{a:.2f}" for a in accs), f"{statistics.mean(res[s]['loss'] for s in args.seeds):.4f}",
                   "" if method == "fp" else f"{statistics.mean(deltas):+.2f}",
                   "" if method == "fp" else f"{min(deltas):+.2f}"]
            if method == "slb":
                r = [res[s] for s in args.seeds]
                qlayers = r[0]["layers"]
                row += [f"{max(abs(100 * (x['frozen'] - x['acc'])) for x in r):.2f}",
                        f"{max(abs(100 * (x['torchao'] - x['frozen'])) for x in r):.2f}",
                        f"{max(x['distinct'] for x in r)} / {2 ** bits}", f"{r[0]['bpw']:.2f}", f"{r[0]['ratio']:.3f}"]
            else:
                row += [""] * 5
            rows.append(row)
        for b in args.bits:
            a, z = by_name.get(f"SLB W{b}"), by_name.get(f"STE W{b}")
            if a is None or z is None:
                continue
            d = [100 * (a[s]["acc"] - z[s]["acc"]) for s in args.seeds]
            paired.append([model, f"W{b}", " ".join(f"{x:+.2f}" for x in d), f"{statistics.mean(d):+.2f}",
                           f"{sum(x > 0 for x in d)}/{sum(x == 0 for x in d)}/{sum(x < 0 for x in d)}",
                           f"{statistics.mean(a[s]['loss'] - z[s]['loss'] for s in args.seeds):+.4f}"])
        if qlayers is not None:
            print(f"{model}: quantised layers {qlayers}" + ("" if args.layers else " (first and last stay float)"),
                  flush=True)
    print(tabulate(rows, headers=["model", "method", f"{split} acc %", "per seed", f"{split} loss", "Δ vs FP",
                                  "worst Δ", "|frozen-eval|", "|torchao-frozen|", "distinct", "bits/w",
                                  "size vs fp32"], tablefmt="github"))
    if paired:
        print(f"\nSLB - STE, paired by seed (same initialisation and batch order); one {split} image is "
              f"{100 / len(data_for(args.models[0], args.val)[0].y_test):.2f} points:")
        print(tabulate(paired, headers=["model", "bits", "Δ acc per seed", "mean Δ acc", "SLB ahead/tie/behind",
                                        f"mean Δ {split} loss"], tablefmt="github"))
    print(f"took {time.time() - t0:.0f} s; load average after {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
