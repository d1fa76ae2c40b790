"""Accuracy after pruning on scikit-learn's digits: DHSPG vs dense, the conventional pipeline, HESSO.

The model, data and training loop are the demo's (``otofx.demo``: ``DigitsNet(32, 32, 64, 64)``,
digits upsampled to 16x16, fixed stratified 1437/360 split, batch 64, SGD momentum 0.9, weight decay
1e-4, lr 0.1 constant then cosine to 0 over the last half of each run). One budget ``B = --epochs``
epochs of optimizer steps (30 x 22 = 660 by default); for every seed and every target group sparsity:

* ``dense``: plain SGD for B epochs (the reference; one per seed).
* ``DHSPG``: ``oto.dhspg`` for B epochs from the same initialisation, then ``oto.compress()``; no
  fine-tuning. The demo's settings, which are the library's defaults (lmbda 1e-3, epsilon 0, tolerance
  0.05, otofx.sparsity's control on) plus lr, momentum, weight decay, the target and the pruning
  budget ``pruning_steps`` = 0.3 B (``DemoConfig.pruning_fraction``).
* ``L1 + fine-tune`` (the conventional pipeline, same total number of steps): plain SGD for
  ``(1 - f) * B`` epochs (f = ``--finetune-fraction``), then in every group the rows with the
  lowest L1 norm (over all of the row's slices, as ``oto.groups`` lists them: filter, BN entries and
  the consumer's input slice) are zeroed, as many per group as DHSPG zeroed in that group for the
  same seed and target, so both compressed models have the same layer widths and exactly the same
  FLOPs; then ``oto.compress()`` and SGD fine-tuning of the compressed model for ``f * B`` epochs
  (lr ``--finetune-lr``, cosine to 0).
* ``HESSO``: ``oto.hesso`` for B epochs (plain training for ``--hesso-start-epochs``, then rows
  driven to zero in ``--pruning-periods`` periods until the lr starts to decay), then
  ``oto.compress()``. Its widths are its own, so its FLOPs differ.
* ``scratch`` (with ``--scratch``): a fresh ``DigitsNet`` with the widths of DHSPG's compressed model,
  initialised from the seed and trained by plain SGD for B epochs: what those widths reach without
  inheriting anything from the wide model (same FLOPs as DHSPG).

Reported per (target, method): test accuracy mean ± sample std over seeds, the change vs the dense
model of the same seed (mean ± std, and the worst seed), FLOPs and parameter ratios vs dense
(FlopCounterMode, one 1x1x16x16 image), and the group sparsity reached (also per seed, for DHSPG and
HESSO). Every compressed model is verified by ``compress()`` against its full model. ``--plot FILE``
(default ``bench/accuracy_sparsity.png``; matplotlib, the bench extra) draws DHSPG's group sparsity
after every optimizer step next to HESSO's, one panel per target, every seed.

Run (11 min with ``--scratch`` on the shared 2-core container, 3 seeds and targets 0.5 and 0.7 by
default; longer when other jobs load the machine)::

    .venv/bin/python bench/accuracy.py --scratch
    .venv/bin/python bench/accuracy.py --seeds 0 --targets 0.7 --no-hesso     # quick look (DHSPG, L1)

Internals:
    * Seeds change the model initialisation and the batch order, not the train/test split.
    * One intra-op thread (tiny convs on shared cores; results do not depend on the core count).
    * The trajectories come from a step post-hook reading ``opt.group_sparsity`` (a row reduction
      per step: it changes no parameter, so the accuracies equal those of a run without it).
    * NB: the optimizers differ in what hyper-parameters they accept; the ones used are printed in
      the header, so a table can be reproduced from it.
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
from tabulate import tabulate

import otofx
from otofx.demo import (DemoConfig, DigitsNet, count_flops, evaluate, group_sparsity, load_digits_split, nparams,
                        train)

log = logging.getLogger("bench.accuracy")


def rows_l1(oto, model) -> list:
    """L1 norm of every row of every group of ``oto`` (read from ``model``'s current parameters)."""
    params = dict(model.named_parameters())
    out = []
    with torch.no_grad():
        for z in oto.groups:
            acc = torch.zeros(z.rows, dtype=torch.float64)
            for name, dim, index in z.params:
                sl = params[name].detach().movedim(dim, 0)[index.reshape(-1)].double()
                acc += sl.reshape(z.rows, -1).abs().sum(1)
            out.append(acc)
    return out


def zero_rows(oto, model, rows_per_group) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for z, rows in zip(oto.groups, rows_per_group):
            for name, dim, index in z.params:
                params[name].movedim(dim, 0)[index[rows].reshape(-1)] = 0


def conv_widths(model) -> tuple:
    """Output channels of the model's convolutions, in module order (DigitsNet's block widths)."""
    return tuple(m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d))


def zero_counts(oto, model) -> list[int]:
    from otofx.passes.prune import row_norms

    return [int((n == 0).sum()) for n in row_norms(oto.zigset, model)]


class Runner:
    def __init__(self, args):
        self.args = args
        self.data = load_digits_split(16)
        self.cfg = DemoConfig(epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay,
                              epsilon=args.epsilon, lmbda=args.lmbda, decay_from=args.decay_from,
                              start_pruning_epochs=args.start_epochs, warm_up_epochs=args.warm_up_epochs,
                              tolerance_group_sparsity=args.tolerance)
        self.n = len(self.data.y_train)
        self.spe = self.cfg.steps_per_epoch(self.n)
        self.x1 = self.data.x_test[:1]

    def _train(self, model, opt, epochs, seed, name, decay_from=None, sparsity=None):
        steps = int(round(epochs * self.spe))
        return train(model, opt, self.data, steps=steps, steps_per_epoch=self.spe, batch_size=self.cfg.batch_size,
                     seed=seed, decay_from=self.cfg.decay_from if decay_from is None else decay_from, name=name,
                     sparsity=sparsity)

    @staticmethod
    def trace(opt) -> list:
        """The group sparsity after every step of ``opt`` (DHSPG or HESSO), appended as it trains."""
        traj = []
        opt.register_step_post_hook(lambda o, args, kwargs: traj.append(o.group_sparsity))
        return traj

    def sgd(self, model, lr=None):
        return torch.optim.SGD(model.parameters(), lr=self.cfg.lr if lr is None else lr,
                               momentum=self.cfg.momentum, weight_decay=self.cfg.weight_decay)

    def init(self, seed):
        torch.manual_seed(seed)
        return DigitsNet(self.cfg.widths)

    def measure(self, model, ref=None, sparsity=None) -> dict:
        out = {"acc": evaluate(model, self.data.x_test, self.data.y_test), "flops": count_flops(model, self.x1),
               "params": nparams(model), "sparsity": sparsity, "widths": conv_widths(model)}
        if ref is not None:
            out["flops"] /= ref["flops"]
            out["params"] /= ref["params"]
        return out

    def run_seed(self, seed) -> list[dict]:
        a, out = self.args, []
        init = self.init(seed)
        dense = copy.deepcopy(init)
        torch.manual_seed(seed)
        self._train(dense, self.sgd(dense), a.epochs, seed, f"dense s{seed}")
        ref = self.measure(dense)
        out.append({"seed": seed, "target": None, "method": "dense", **ref, "flops": 1.0, "params": 1.0})

        pre = copy.deepcopy(init)  # the conventional pipeline's dense phase: shared by the targets
        torch.manual_seed(seed)
        pre_epochs = (1 - a.finetune_fraction) * a.epochs
        self._train(pre, self.sgd(pre), pre_epochs, seed, f"pre-train s{seed}")

        for target in a.targets:
            # DHSPG
            model = copy.deepcopy(init)
            oto = otofx.OTO(model, self.x1)
            torch.manual_seed(seed)
            kw = {**self.cfg.dhspg_kwargs(self.n), "target_group_sparsity": target}
            opt = oto.dhspg(**kw)
            traj = self.trace(opt)
            self._train(model, opt, a.epochs, seed, f"dhspg t{target} s{seed}",
                        sparsity=lambda: group_sparsity(oto, model))
            counts = zero_counts(oto, model)
            sp = group_sparsity(oto, model)
            small = oto.compress().eval()
            out.append({"seed": seed, "target": target, "method": "DHSPG", **self.measure(small, ref, sp),
                        "traj": traj})
            if a.scratch:
                widths = conv_widths(small)
                torch.manual_seed(seed)
                fresh = DigitsNet(widths)
                torch.manual_seed(seed)
                self._train(fresh, self.sgd(fresh), a.epochs, seed, f"scratch {widths} s{seed}")
                out.append({"seed": seed, "target": target, "method": "scratch", **self.measure(fresh, ref, None)})

            # conventional: L1 rows of the pre-trained model, DHSPG's per-group counts, compress, fine-tune
            conv = copy.deepcopy(pre)
            oto_c = otofx.OTO(conv, self.x1)
            l1 = rows_l1(oto_c, conv)
            zero_rows(oto_c, conv, [n.argsort()[:k] for n, k in zip(l1, counts)])
            conv.eval()
            small_c = oto_c.compress().eval()
            acc_pruned = evaluate(small_c, self.data.x_test, self.data.y_test)
            torch.manual_seed(seed)
            self._train(small_c, self.sgd(small_c, a.finetune_lr), a.finetune_fraction * a.epochs, seed + 1000,
                        f"fine-tune t{target} s{seed}", decay_from=0.0)
            out.append({"seed": seed, "target": target, "method": "L1 + fine-tune",
                        **self.measure(small_c, ref, group_sparsity(oto_c, conv)), "acc before ft": acc_pruned})

            # HESSO
            if not a.no_hesso:
                model = copy.deepcopy(init)
                oto_h = otofx.OTO(model, self.x1)
                torch.manual_seed(seed)
                opt = oto_h.hesso(**self.hesso_kwargs(target))
                traj = self.trace(opt)
                self._train(model, opt, a.epochs, seed, f"hesso t{target} s{seed}",
                            sparsity=lambda: group_sparsity(oto_h, model))
                sp = group_sparsity(oto_h, model)
                small_h = oto_h.compress().eval()
                out.append({"seed": seed, "target": target, "method": "HESSO", **self.measure(small_h, ref, sp),
                            "traj": traj})
        return out

    def hesso_kwargs(self, target) -> dict:
        a, spe = self.args, self.spe
        return dict(lr=self.cfg.lr, variant="sgd", first_momentum=self.cfg.momentum,
                    weight_decay=self.cfg.weight_decay, target_group_sparsity=target,
                    start_pruning_step=int(round(a.hesso_start_epochs * spe)),
                    pruning_steps=max(int(round(a.pruning_epochs * spe)), a.pruning_periods),
                    pruning_periods=a.pruning_periods)


def fmt(values, scale=1.0, digits=2) -> str:
    vals = [v * scale for v in values]
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    return f"{statistics.mean(vals):.{digits}f} ± {statistics.stdev(vals):.{digits}f}"


def _keys(rows) -> list:
    keys = []
    for r in rows:
        k = (r["target"], r["method"])
        if k not in keys:
            keys.append(k)
    return keys


def summarise(rows: list[dict]) -> list[list]:
    dense = {r["seed"]: r["acc"] for r in rows if r["method"] == "dense"}
    table = []
    for target, method in _keys(rows):
        rs = [r for r in rows if (r["target"], r["method"]) == (target, method)]
        sp = [r["sparsity"] for r in rs if r["sparsity"] is not None]
        gaps = [r["acc"] - dense[r["seed"]] for r in rs]
        table.append(["-" if target is None else target, method, fmt([r["acc"] for r in rs], 100), fmt(gaps, 100),
                      f"{100 * min(gaps):+.2f}", fmt([r["flops"] for r in rs], digits=3),
                      fmt([r["params"] for r in rs], digits=3), fmt(sp, digits=3) if sp else "",
                      fmt([r["acc before ft"] for r in rs], 100) if "acc before ft" in rs[0] else ""])
    return table


def verdicts(rows: list[dict], targets) -> list[str]:
    """One line per target: the 1-point bar, the FLOPs cut, and DHSPG against the conventional pipeline."""
    dense = {r["seed"]: r["acc"] for r in rows if r["method"] == "dense"}
    out = []
    for t in targets:
        by = {m: {r["seed"]: r for r in rows if r["target"] == t and r["method"] == m}
              for m in ("DHSPG", "L1 + fine-tune", "HESSO", "scratch")}
        d = by["DHSPG"]
        gaps = [100 * (d[s]["acc"] - dense[s]) for s in d]
        vs_l1 = [100 * (d[s]["acc"] - by["L1 + fine-tune"][s]["acc"]) for s in d if s in by["L1 + fine-tune"]]
        vs_scratch = [100 * (d[s]["acc"] - by["scratch"][s]["acc"]) for s in d if s in by["scratch"]]
        reached = [d[s]["sparsity"] >= t - 1e-9 for s in d]
        flops = statistics.mean(r["flops"] for r in d.values())
        line = (f"target {t}: DHSPG vs dense {statistics.mean(gaps):+.2f} points on average, worst seed "
                f"{min(gaps):+.2f} -> {'within' if min(gaps) >= -1.0 else 'NOT within'} 1 point on every seed; "
                f"FLOPs x{flops:.3f}; target sparsity reached on {sum(reached)} of {len(reached)} seeds")
        if vs_l1:
            line += (f"; DHSPG - (L1 + fine-tune) at equal FLOPs: {statistics.mean(vs_l1):+.2f} points on average "
                     f"(per seed {', '.join(f'{v:+.2f}' for v in vs_l1)})")
        if vs_scratch:
            line += (f"; DHSPG - scratch at DHSPG's widths: {statistics.mean(vs_scratch):+.2f} points on average "
                     f"(per seed {', '.join(f'{v:+.2f}' for v in vs_scratch)})")
        out.append(line)
    return out


def sparsity_lines(rows: list[dict], targets) -> list[str]:
    """Per target and optimizer: the group sparsity each seed ended at, and the largest seen at any step."""
    out = []
    for t in targets:
        for m in ("DHSPG", "HESSO"):
            rs = [r for r in rows if r["target"] == t and r["method"] == m]
            if not rs:
                continue
            per = ", ".join(f"s{r['seed']} {r['sparsity']:.3f}" for r in rs)
            peak = max(max(r["traj"], default=0.0) for r in rs)
            out.append(f"group sparsity reached, target {t}, {m}: {per} (largest at any step {peak:.3f})")
    return out


def plot(rows: list[dict], targets, path: str, spe: int) -> bool:
    """DHSPG's sparsity after every step next to HESSO's: one panel per target, one line per seed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("the plot needs matplotlib: pip install -e '.[bench]'", file=sys.stderr)
        return False
    fig, axes = plt.subplots(1, len(targets), figsize=(5.5 * len(targets), 3.8), squeeze=False, sharey=True)
    colors = {"DHSPG": "tab:blue", "HESSO": "tab:orange"}
    styles = ["-", "--", ":", "-."]
    for ax, t in zip(axes[0], targets):
        for m, c in colors.items():
            rs = [r for r in rows if r["target"] == t and r["method"] == m]
            for k, r in enumerate(rs):
                x = [(i + 1) / spe for i in range(len(r["traj"]))]
                ax.plot(x, r["traj"], styles[k % len(styles)], color=c, lw=1.2, label=f"{m} seed {r['seed']}")
        ax.axhline(t, color="grey", lw=0.6)
        ax.set_title(f"target {t}: group sparsity per step")
        ax.set_xlabel("epoch")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("group sparsity")
    axes[0][-1].legend(fontsize=7, loc="lower right", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def _backend() -> str:
    """The row-kernel backend the optimizers pick on CPU (the C kernel, when built, rounds differently)."""
    choice = os.environ.get("OTOFX_KERNEL", "auto")
    try:
        from otofx import kernels
        return f"{choice} (C kernel available: {kernels.cpu_available()})"
    except (ImportError, AttributeError):
        return choice


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.7])
    ap.add_argument("--epochs", type=int, default=DemoConfig.epochs, help="the budget B, in epochs")
    ap.add_argument("--lr", type=float, default=DemoConfig.lr)
    ap.add_argument("--weight-decay", type=float, default=DemoConfig.weight_decay)
    ap.add_argument("--decay-from", type=float, default=DemoConfig.decay_from)
    ap.add_argument("--epsilon", type=float, default=DemoConfig.epsilon, help="DHSPG")
    ap.add_argument("--lmbda", type=float, default=DemoConfig.lmbda, help="DHSPG (default: the demo's)")
    ap.add_argument("--start-epochs", type=float, default=DemoConfig.start_pruning_epochs, help="DHSPG")
    ap.add_argument("--warm-up-epochs", type=float, default=DemoConfig.warm_up_epochs, help="DHSPG")
    ap.add_argument("--tolerance", type=float, default=DemoConfig.tolerance_group_sparsity,
                    help="DHSPG tolerance_group_sparsity (default: the demo's, else the optimizer's)")
    ap.add_argument("--hesso-start-epochs", type=float, default=1.0, help="HESSO: plain training before pruning")
    ap.add_argument("--pruning-epochs", type=float, default=None,
                    help="HESSO (default: from --hesso-start-epochs until the lr starts to decay)")
    ap.add_argument("--pruning-periods", type=int, default=3, help="HESSO")
    ap.add_argument("--finetune-fraction", type=float, default=0.4, help="conventional pipeline's fine-tuning share")
    ap.add_argument("--finetune-lr", type=float, default=0.05, help="conventional pipeline's fine-tuning lr")
    ap.add_argument("--no-hesso", action="store_true")
    ap.add_argument("--scratch", action="store_true",
                    help="also train DHSPG's widths from scratch (plain SGD, B epochs)")
    ap.add_argument("--plot", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "accuracy_sparsity.png"),
                    help="PNG of DHSPG's and HESSO's sparsity per step (matplotlib; '' for none)")
    ap.add_argument("--format", default="github", help="tabulate table format")
    ap.add_argument("-v", "--verbose", action="store_true", help="per-epoch progress")
    args = ap.parse_args()
    if args.pruning_epochs is None:
        args.pruning_epochs = args.decay_from * args.epochs - args.hesso_start_epochs
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    from _common import machine
    torch.set_num_threads(1)  # NB: as the demo: tiny convs, shared cores, core-count-independent floats

    t0 = time.perf_counter()
    load0 = os.getloadavg()
    runner = Runner(args)
    rows = []
    for seed in args.seeds:
        rows += runner.run_seed(seed)
        print(f"seed {seed} done at {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    dt = time.perf_counter() - t0
    print(f"$ python {' '.join(sys.argv)}")
    print(f"{machine()}; digits 16x16, {runner.n} train / {len(runner.data.y_test)} test, seeds {args.seeds}, "
          f"budget {args.epochs} epochs x {runner.spe} steps; took {dt:.0f} s; load average at the start "
          f"{' '.join(f'{x:.2f}' for x in load0)}")
    print(f"row-kernel backend: {_backend()}")
    print(f"DHSPG: {dict(runner.cfg.dhspg_kwargs(runner.n), target_group_sparsity='<target>')}")
    if not args.no_hesso:
        print(f"HESSO: {runner.hesso_kwargs('<target>')}")
    print(f"L1 + fine-tune: {(1 - args.finetune_fraction) * args.epochs:g} dense epochs, "
          f"{args.finetune_fraction * args.epochs:g} fine-tuning epochs at lr {args.finetune_lr}\n")
    print(tabulate(summarise(rows), headers=["target", "method", "test acc %", "vs dense (points)", "worst seed",
                                             "FLOPs ratio", "params ratio", "group sparsity", "acc % before fine-tune"],
                   tablefmt=args.format, disable_numparse=True))
    print()
    for line in verdicts(rows, args.targets):
        print(line)
    print()
    for line in sparsity_lines(rows, args.targets):
        print(line)
    if args.plot and plot(rows, args.targets, args.plot, runner.spe):
        print(f"sparsity trajectories written to {args.plot}")
    print()
    dense = {r["seed"]: r["acc"] for r in rows if r["method"] == "dense"}
    per_seed = [[r["seed"], "-" if r["target"] is None else r["target"], r["method"], f"{100 * r['acc']:.2f}",
                 f"{100 * (r['acc'] - dense[r['seed']]):+.2f}", f"{r['flops']:.3f}",
                 "" if r["sparsity"] is None else f"{r['sparsity']:.3f}",
                 "-".join(map(str, r["widths"]))] for r in rows]
    print(tabulate(per_seed, headers=["seed", "target", "method", "test acc %", "vs dense", "FLOPs ratio",
                                      "group sparsity", "widths"], tablefmt=args.format, disable_numparse=True))
    print(f"\nload average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
