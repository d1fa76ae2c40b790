"""Does DHSPG land on its target group sparsity? Before and after otofx.sparsity's control (issue 16).

Two models over scikit-learn's digits, trained by the demo's loop (``otofx.demo.train``: batch 64, SGD
momentum 0.9, weight decay 1e-4, lr 0.1 constant then cosine to 0 over the second half, 30 epochs of
22 steps = 660 steps, pruning from step 0):

* ``mlp``: 8x8 digits flattened, Linear 64-128-128-10 with ReLU (256 prunable rows);
* ``cnn``: the demo's ``DigitsNet(32, 32, 64, 64)`` on 16x16 digits (192 prunable rows).

Optimizers, at every target (default 0.3, 0.5, 0.7):

* ``before: defaults`` -- ``DHSPG(control=False)`` with the library's defaults (lmbda 1e-3, epsilon 0):
  OTO.md section 2's rule alone, as otofx shipped it;
* ``before: demo hp`` -- ``control=False`` with the demo's former lmbda 0.1, epsilon 0.97;
* ``after: defaults`` -- ``DHSPG()`` with the library's defaults, control on, no ``pruning_steps``
  (the optimizer picks the budget and logs it);
* ``HESSO`` -- ``oto.hesso`` over the same budget (10 periods), for the trajectory plot.

Per run: the final group sparsity, the largest one seen at an epoch end (overshoot), the first epoch at
which the target was reached, and the test accuracy; accuracy against the dense model of the same seed
(plain SGD, same loop) for ``--seeds`` (the "after" rows; the "before" rows and HESSO run on the first
seed only). ``--plot FILE.png`` (matplotlib, the bench extra) draws the sparsity per epoch of every
optimizer at every target.

Run (about 15 min on the shared 2-core container; the cnn is most of it)::

    .venv/bin/python bench/sparsity.py --plot bench/sparsity.png
    .venv/bin/python bench/sparsity.py --models mlp --seeds 0      # one minute

Internals:
    * One intra-op thread, seeded initialisation and batch order: two runs print the same table.
    * "reached" is the first epoch end with at least ceil(target * N) zero rows (the optimizer's own
      rounding); "max" is the largest sparsity at any epoch end (zero rows stay zero: the final one).
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import statistics
import sys
import time

import torch
from tabulate import tabulate
from torch import nn

import otofx
from otofx.demo import DemoConfig, DigitsNet, evaluate, group_sparsity, load_digits_split, train

log = logging.getLogger("bench.sparsity")


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))


MODELS = {"mlp": (mlp, 8), "cnn": (lambda: DigitsNet((32, 32, 64, 64)), 16)}
BASE = dict(lr=0.1, variant="sgd", first_momentum=0.9, weight_decay=1e-4)
METHODS = {
    "before: defaults": lambda oto, t: oto.dhspg(**BASE, target_group_sparsity=t, control=False),
    "before: demo hp": lambda oto, t: oto.dhspg(**BASE, target_group_sparsity=t, control=False, lmbda=0.1,
                                                 epsilon=0.97),
    "after: defaults": lambda oto, t: oto.dhspg(**BASE, target_group_sparsity=t),
}


class Bench:
    def __init__(self, args):
        self.args = args
        self.cfg = DemoConfig(epochs=args.epochs)
        self.data = {s: load_digits_split(s) for s in {side for _, side in MODELS.values()}}

    def run(self, model_name, seed, method, target):
        build, side = MODELS[model_name]
        data = self.data[side]
        n = len(data.y_train)
        spe = self.cfg.steps_per_epoch(n)
        steps = self.cfg.total_steps(n)
        torch.manual_seed(seed)
        model = build()
        torch.manual_seed(seed)
        if method == "dense":
            opt = torch.optim.SGD(model.parameters(), lr=BASE["lr"], momentum=BASE["first_momentum"],
                                  weight_decay=BASE["weight_decay"])
            oto = None
        else:
            oto = otofx.OTO(model, data.x_test[:1])
            if method == "HESSO":
                opt = oto.hesso(**BASE, target_group_sparsity=target, pruning_steps=self.args.hesso_steps,
                                pruning_periods=10)
            else:
                opt = METHODS[method](oto, target)
        t0 = time.perf_counter()
        hist = train(model, opt, data, steps=steps, steps_per_epoch=spe, batch_size=self.cfg.batch_size, seed=seed,
                     decay_from=self.cfg.decay_from, name=f"{model_name} {method} t{target} s{seed}",
                     sparsity=None if oto is None else (lambda: group_sparsity(oto, model)))
        dt = time.perf_counter() - t0
        model.eval()
        acc = evaluate(model, data.x_test, data.y_test)
        out = {"model": model_name, "seed": seed, "method": method, "target": target, "acc": acc, "time": dt}
        if oto is not None:
            traj = [r.group_sparsity for r in hist]
            n_rows = sum(z.rows for z in oto.groups)
            need = math.ceil(target * n_rows - 1e-9) / n_rows
            out.update(traj=traj, final=traj[-1], max=max(traj),
                       reached=next((i + 1 for i, s in enumerate(traj) if s >= need - 1e-12), None))
            if method.startswith("after"):
                small = oto.compress()  # verified against the trained model (exactness)
                out["compressed_params"] = sum(p.numel() for p in small.parameters())
        return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--targets", nargs="+", type=float, default=[0.3, 0.5, 0.7])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--hesso-steps", type=int, default=100, help="HESSO's pruning_steps (the DHSPG auto budget)")
    p.add_argument("--plot", help="write the sparsity trajectories to this PNG (needs matplotlib)")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    torch.set_num_threads(1)
    t_start = time.time()
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; torch {torch.__version__}; "
          f"{args.epochs} epochs; base {BASE}")
    b = Bench(args)
    runs = []
    for m in args.models:
        for seed in args.seeds:
            runs.append(b.run(m, seed, "dense", None))
            for t in args.targets:
                methods = ["after: defaults"] + ([*list(METHODS)[:2], "HESSO"] if seed == args.seeds[0] else [])
                for meth in methods:
                    runs.append(b.run(m, seed, meth, t))
    dense = {(r["model"], r["seed"]): r["acc"] for r in runs if r["method"] == "dense"}
    rows = []
    for m in args.models:
        for t in args.targets:
            for meth in [*METHODS, "HESSO"]:
                rs = [r for r in runs if r["model"] == m and r["target"] == t and r["method"] == meth]
                if not rs:
                    continue
                d = [100 * (r["acc"] - dense[(m, r["seed"])]) for r in rs]
                rows.append([m, t, meth, len(rs), " ".join(f"{r['final']:.3f}" for r in rs),
                             f"{max(r['max'] for r in rs):.3f}",
                             " ".join(str(r["reached"]) if r["reached"] else "-" for r in rs),
                             f"{100 * statistics.mean(r['acc'] for r in rs):.2f}",
                             f"{statistics.mean(d):+.2f}", f"{min(d):+.2f}"])
    print(tabulate(rows, headers=["model", "target", "optimizer", "seeds", "final sparsity (per seed)", "max",
                                  "reached at epoch", "test acc %", "vs dense (mean)", "vs dense (worst)"],
                   tablefmt="github"))
    print("dense test acc % per seed: " + ", ".join(f"{m} s{s} {100 * a:.2f}" for (m, s), a in dense.items()))
    if args.plot:
        plot(runs, args, args.plot)
        print(f"trajectories written to {args.plot}")
    print(f"took {time.time() - t_start:.0f} s; load average now: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


def plot(runs, args, path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("the plot needs matplotlib: pip install -e '.[bench]'", file=sys.stderr)
        return
    seed = args.seeds[0]
    fig, axes = plt.subplots(1, len(args.models), figsize=(6 * len(args.models), 4), squeeze=False)
    styles = {"before: defaults": ":", "before: demo hp": "--", "after: defaults": "-", "HESSO": "-."}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, m in zip(axes[0], args.models):
        for ci, t in enumerate(args.targets):
            for meth, ls in styles.items():
                r = next((r for r in runs if r["model"] == m and r["seed"] == seed and r["target"] == t
                          and r["method"] == meth), None)
                if r is None:
                    continue
                ax.plot(range(1, len(r["traj"]) + 1), r["traj"], ls, color=colors[ci % len(colors)],
                        label=f"{meth}, target {t}")
            ax.axhline(t, color=colors[ci % len(colors)], lw=0.5, alpha=0.5)
        ax.set_title(f"{m}: group sparsity per epoch (seed {seed})")
        ax.set_xlabel("epoch")
        ax.set_ylabel("group sparsity")
        ax.set_ylim(0, 1)
    axes[0][-1].legend(fontsize=6, loc="lower right", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
