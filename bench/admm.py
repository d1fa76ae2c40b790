"""Micro-structured pruning and unification by ADMM on scikit-learn's digits (seed 002, issue 20).

Models: a 64-256-256-10 BN-MLP with 4x4 blocks, and the demo CNN (``otofx.demo.DigitsNet``) on the
8x8 images with 1x9 blocks (one 3x3 kernel slice per block). Block settings (prune, unify):
(0.5, 0), (0.75, 0), (0.5, 0.25). For every model, seed and setting, from the same dense model
(SGD, ``--dense-epochs``):

* ``one-shot``: ``otofx.admm.finish`` (hard projection, structure kept by the re-parametrisation),
  then retraining for ``--admm-epochs + --retrain-epochs`` epochs (the same step budget as the others);
* ``ADMM``: ``otofx.admm.ADMM`` around SGD for ``--admm-epochs`` (``--rounds`` Z/U rounds, rho from
  ``--rho`` to ``--rho-max``, the dual rescaled as rho grows, the lr restarted every round by
  ``ADMM.round_lr``), then ``finish`` and ``--retrain-epochs`` of retraining;
* ``HESSO-blocks``: ``otofx.admm.BlockHESSO`` (HESSO's schedule with blocks as groups) pruning
  ``prune`` of the blocks over the same epochs, then ``finish`` (which also unifies) and retraining.

Every method sees the same number of SGD steps after the dense phase. The ADMM settings (rounds, rho
range, dual rescaling, schedule) were chosen with ``--val``, which scores on a stratified 20% of
the training images and never reads the test set (RESULTS.md section 8 gives the sweep).

Reported: test accuracy (mean ± std over seeds, and each seed), its change from the dense model of
the same seed, bits per weight of the blocked layers, the storage ratio against float32
(``otofx.admm.storage``) and the held-out cross-entropy. Targets (issue 20): at most 1 point below
dense at 4x block compression (prune 0.75); ADMM at least as good as one-shot. No speed is claimed
for 4x4 and 1x9 blocks, a storage result (METHODS.md section 5: torch's and torchao's block-sparse
kernels need blocks of 16 or more, on CUDA). The last table times torch's BSR product against dense
on the CPU (float32, a 1024x1024 Linear, blocks 16/32/64, block sparsity 0.5/0.75/0.9, the outputs
checked against the masked dense ones); :func:`gpu_rows` is the same on CUDA in bf16/fp16 with
torchao's kernel beside torch's, called by ``bench/gpu.py`` (section ``admm``).

Run::

    python bench/admm.py                 # 3 seeds, both models, the three settings, then the CPU kernel rows
    python bench/admm.py --val           # the same on the validation split (for choosing settings)
    python bench/admm.py --kernels only  # just the CPU BSR-vs-dense rows
    python bench/admm.py --quick         # 1 seed, shorter budgets
    python bench/gpu.py --only admm      # on a GPU: the block-sparse kernel rows

Internals:
    * The data split and the lr schedule of dense training and retraining are the demo's
      (``load_digits_split``, ``lr_factor``: constant, then a cosine over the last 40%); the loop is
      a seeded copy of ``otofx.demo.train`` without its per-epoch test evaluation; one thread.
    * NNI's ADMMPruner (the maintained ADMM reference) is not run: see RESULTS.md for why.
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
import torch.nn as nn
import torch.nn.functional as F
from tabulate import tabulate

import otofx.admm as A
from otofx.demo import DigitsNet, Split, load_digits_split, logits, lr_factor, num_threads

SETTINGS = ((0.5, 0.0), (0.75, 0.0), (0.5, 0.25))
METHODS = ("one-shot", "ADMM", "HESSO-blocks")
log = logging.getLogger("otofx.bench.admm")
BATCH = 64


class DigitsMLP(nn.Module):
    """64-256-256-10 with BatchNorm and ReLU."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.BatchNorm1d(256), nn.ReLU(),
                                 nn.Linear(256, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, 10))

    def forward(self, x):
        return self.net(x)


MODELS = {"mlp": (DigitsMLP, (4, 4)), "cnn": (lambda: DigitsNet(), (1, 9))}


def sgd(model, lr):
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)


def fit(model, opt, data, epochs, seed, schedule=None):
    """``epochs`` of SGD steps (seeded batch order, last partial batch dropped); accuracy on ``data``'s held-out set.

    The lr schedule is the demo's (constant, then a cosine over the last 40%) unless ``schedule``
    (a scheduler built on ``opt``) is given.
    """
    spe = len(data.y_train) // BATCH
    steps = epochs * spe
    sched = schedule or torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(data.y_train), generator=gen)
        for b in range(spe):
            idx = perm[b * BATCH:(b + 1) * BATCH]
            loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    out = logits(model, data.x_test)
    return float((out.argmax(1) == data.y_test).float().mean()), float(F.cross_entropy(out, data.y_test))


def validation_split(data, fraction=0.2, seed=1):
    """A stratified ``fraction`` of the training images as the held-out set (the test set is dropped)."""
    from sklearn.model_selection import train_test_split

    tr, va = train_test_split(torch.arange(len(data.y_train)).numpy(), test_size=fraction, random_state=seed,
                              stratify=data.y_train.numpy())
    tr, va = torch.from_numpy(tr), torch.from_numpy(va)
    return Split(data.x_train[tr], data.y_train[tr], data.x_train[va], data.y_train[va])


def run_one(kind, seed, data, args):
    build, block = MODELS[kind]
    torch.manual_seed(seed)
    dense = build()
    dense_acc, _ = fit(dense, sgd(dense, args.lr), data, args.dense_epochs, seed)
    spe = len(data.y_train) // BATCH
    out = []
    for prune, unify in args.settings:
        res = {}
        if "one-shot" in args.methods:
            m = A.finish(dense, prune=prune, unify=unify, block=block)
            res["one-shot"] = (fit(m, sgd(m, args.retrain_lr), data, args.admm_epochs + args.retrain_epochs, seed + 1),
                               m, None)
        if "ADMM" in args.methods:
            m = copy.deepcopy(dense)
            steps_per_round = max(1, args.admm_epochs * spe // args.rounds)
            opt = A.ADMM(m, sgd(m, args.admm_lr), block=block, prune=prune, unify=unify, rho=args.rho,
                         rho_max=args.rho_max, rounds=args.rounds, steps_per_round=steps_per_round,
                         rescale_dual=args.rescale_dual)
            fit(m, opt, data, args.admm_epochs, seed + 1, opt.round_lr() if args.admm_schedule == "round" else None)
            residual = opt.primal_residual()
            f = A.finish(m, opt)
            res["ADMM"] = (fit(f, sgd(f, args.retrain_lr), data, args.retrain_epochs, seed + 2), f, residual)
        if "HESSO-blocks" in args.methods:
            m = copy.deepcopy(dense)
            total = args.admm_epochs * spe
            opt = A.BlockHESSO(m, sgd(m, args.retrain_lr), block=block, prune=prune,
                               pruning_steps=int(total * 0.6), pruning_periods=args.hesso_periods)
            fit(m, opt, data, args.admm_epochs, seed + 1)
            f = A.finish(m, prune=prune, unify=unify, block=block)
            res["HESSO-blocks"] = (fit(f, sgd(f, args.retrain_lr), data, args.retrain_epochs, seed + 2), f, None)
        for method, ((acc, loss), model, residual) in res.items():
            total_row = A.storage(model)[-1]
            out.append(dict(model=kind, prune=prune, unify=unify, method=method, seed=seed, acc=acc, loss=loss,
                            dense=dense_acc, bpw=total_row.bits_per_weight, x32=total_row.vs_float32,
                            residual=residual))
            log.warning("%s seed %d (%.2f, %.2f) %s: %.2f%% (dense %.2f%%)%s", kind, seed, prune, unify, method,
                        100 * acc, 100 * dense_acc, "" if residual is None else f", primal residual {residual:.3f}")
    return out


def summarise(rows):
    table = []
    keys = sorted({(r["model"], r["prune"], r["unify"], r["method"]) for r in rows},
                  key=lambda k: (k[0], k[1], k[2], METHODS.index(k[3])))
    for model, p, q, method in keys:
        sel = sorted((r for r in rows if (r["model"], r["prune"], r["unify"], r["method"]) == (model, p, q, method)),
                     key=lambda r: r["seed"])
        acc = [100 * r["acc"] for r in sel]
        drop = [100 * (r["acc"] - r["dense"]) for r in sel]
        dense = [100 * r["dense"] for r in sel]
        sd = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0  # noqa: E731
        table.append([model, f"{p:.2f}", f"{q:.2f}", method, f"{statistics.mean(dense):.2f}",
                      f"{statistics.mean(acc):.2f} ± {sd(acc):.2f}", f"{statistics.mean(drop):+.2f}",
                      f"{min(drop):+.2f}", " / ".join(f"{a:.2f}" for a in acc), f"{sel[0]['bpw']:.2f}",
                      f"{sel[0]['x32']:.2f}x", f"{statistics.mean(r['loss'] for r in sel):.4f}"])
    return tabulate(table, headers=["model", "prune", "unify", "method", "dense %", "acc % (mean ± std)",
                                    "vs dense", "worst seed", "per seed", "bits/weight", "vs float32",
                                    "held-out loss"],
                    tablefmt="github")


# ---------------------------------------------------------------------------------------------
# Block-sparse kernels: dense matmul against torch's BSR (and torchao's BlockSparseTensor)
# ---------------------------------------------------------------------------------------------

BSR_BLOCKS = (16, 32, 64)
BSR_SPARSITIES = (0.5, 0.75, 0.9)


def _block_masked(shape, block, sparsity, dtype, device, seed=0):
    """A random ``shape`` weight (std 0.02) with exactly ``round(sparsity * n)`` of its square blocks zero."""
    gen = torch.Generator().manual_seed(seed)
    nr, nc = shape[0] // block, shape[1] // block
    keep = torch.ones(nr * nc)
    keep[torch.randperm(nr * nc, generator=gen)[:round(sparsity * nr * nc)]] = 0
    mask = keep.reshape(nr, nc).to(device).repeat_interleave(block, 0).repeat_interleave(block, 1)
    w = torch.randn(shape, generator=torch.Generator(device).manual_seed(seed), device=device) * 0.02 * mask
    return w.to(dtype)


def _compare(device, fa, fb, runs, warmup, rounds=5):
    """``(ms of fa, ms of fb)`` per call: ``rounds`` alternating batches of ``runs`` calls each, the median
    batch mean; CUDA events on a GPU, the wall clock on the CPU. Alternating spreads a loaded host's
    noise over both."""
    cuda = str(device).startswith("cuda")

    def batch(fn):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(runs):
                fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / runs
        t0 = time.perf_counter()
        for _ in range(runs):
            fn()
        return (time.perf_counter() - t0) * 1e3 / runs

    for fn in (fa, fb):
        for _ in range(warmup):
            fn()
    if cuda:
        torch.cuda.synchronize()
    ta, tb = [], []
    for _ in range(rounds):
        ta.append(batch(fa))
        tb.append(batch(fb))
    return statistics.median(ta), statistics.median(tb)


def _torchao_linear(w, block):
    """``x -> y`` through torchao's BlockSparseTensor (``sparsify_`` with ``BlockSparseWeightConfig``), or None."""
    try:
        from torchao.sparsity import BlockSparseWeightConfig, sparsify_
    except ImportError:
        return None
    lin = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        lin.weight.copy_(w)
    sparsify_(lin, BlockSparseWeightConfig(blocksize=block))
    return lin


def bsr_rows(device="cuda", dtypes=(torch.bfloat16, torch.float16), shape=(4096, 4096), tokens=2048,
             blocks=BSR_BLOCKS, sparsities=BSR_SPARSITIES, runs=10, warmup=3, budget_s=35.0) -> list[dict]:
    """Dense ``F.linear`` against the block-sparse paths on one ``[out, in]`` weight, as table rows.

    For each dtype, block size b (square b x b blocks) and block sparsity, a random weight with
    exactly that fraction of its blocks zero is multiplied by ``tokens`` random activations:

    * ``dense``: ``F.linear(x, W)`` with the zeros in place (the masked dense model);
    * ``torch BSR``: ``W.to_sparse_bsr((b, b)) @ x^T`` (otofx.admm.BSRLinear's product);
    * ``torchao``: ``sparsify_(Linear, BlockSparseWeightConfig(blocksize=b))``, torchao's Triton
      BSR kernel (CUDA, half precision), when torchao is installed.

    Each sparse output is checked against the masked dense output in the same dtype with otofx's
    exactness (``outputs_close``: 1e-4 relative in float32, 2 u in half precision). The dense time
    is measured beside every sparse one. A path that raises gets a row with its error; once
    ``budget_s`` has passed, the remaining cases are skipped (a row says so).
    """
    import warnings

    from otofx.pipeline import outputs_close

    rows, t0 = [], time.perf_counter()
    for dtype in dtypes:
        x = torch.randn(tokens, shape[1], generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)
        for block in blocks:
            for sparsity in sparsities:
                base = dict(device=str(device), dtype=str(dtype).replace("torch.", ""), shape=f"{shape[0]}x{shape[1]}",
                            tokens=tokens, block=block, sparsity=sparsity)
                if time.perf_counter() - t0 > budget_s:
                    rows.append(base | {"path": "-", "note": f"skipped: past the {budget_s:.0f} s budget"})
                    continue
                w = _block_masked(shape, block, sparsity, dtype, device)
                with torch.no_grad():
                    ref = F.linear(x, w)
                    paths = {}
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        try:
                            wb = w.to_sparse_bsr((block, block))
                            paths["torch BSR"] = lambda wb=wb: (wb @ x.t()).t()
                        except Exception as e:  # noqa: BLE001  (a row says what failed)
                            paths["torch BSR"] = e
                        if str(device).startswith("cuda"):
                            try:
                                lin = _torchao_linear(w, block)
                                if lin is not None:
                                    paths["torchao"] = lambda lin=lin: lin(x)
                            except Exception as e:  # noqa: BLE001
                                paths["torchao"] = e
                        for path, fn in paths.items():
                            row = base | {"path": path}
                            try:
                                if isinstance(fn, Exception):
                                    raise fn
                                out = fn()
                                ok, err = outputs_close(ref, out, dtype=dtype)
                                dense_ms, sparse_ms = _compare(device, lambda: F.linear(x, w), fn, runs, warmup)
                                row |= {"dense ms": round(dense_ms, 4), "sparse ms": round(sparse_ms, 4),
                                        "speedup": round(dense_ms / sparse_ms, 2), "exact": ok, "max rel err": err}
                            except Exception as e:  # noqa: BLE001
                                row |= {"note": f"{type(e).__name__}: {str(e).splitlines()[0][:90]}"}
                            rows.append(row)
    return rows


def gpu_rows(device="cuda", runs=None) -> list[dict]:
    """bench/gpu.py's ``admm`` section: :func:`bsr_rows` on a 4096x4096 Linear (a 7B LLM's attention
    projection), 2048 tokens, bfloat16 and float16, blocks 16/32/64, sparsity 0.5/0.75/0.9, torch's
    BSR and torchao's; about 40 s at most (``budget_s``). On the CPU (a smoke run) float32 only,
    1024x1024 and 64 tokens, as torch's CPU BSR product (MKL) has no half precision.
    """
    if str(device).startswith("cuda"):
        return bsr_rows(device, runs=runs or 10)
    return cpu_rows(runs=runs or 3)


def cpu_rows(runs=3) -> list[dict]:
    """:func:`bsr_rows` on the CPU with one thread: float32, a 1024x1024 Linear, 64 tokens (the bench's timing row)."""
    with num_threads(1):
        return bsr_rows("cpu", dtypes=(torch.float32,), shape=(1024, 1024), tokens=64, runs=runs, warmup=2,
                        budget_s=60.0)


def kernel_table() -> str:
    t0 = time.time()
    rows = cpu_rows()
    return (f"\ntorch BSR against dense on the CPU (float32, one thread, measured in this run; load average "
            f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs, so the times are under load), {time.time() - t0:.0f} s:\n"
            + tabulate(rows, headers="keys", tablefmt="github", floatfmt=".3g"))


def _setting(text):
    p, q = (float(x) for x in text.split(","))
    return p, q


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--settings", type=_setting, nargs="+", default=list(SETTINGS), help="prune,unify pairs")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--val", action="store_true",
                    help="score on a validation split carved from the training images (for choosing settings); "
                         "the test set is not used")
    ap.add_argument("--dense-epochs", type=int, default=20)
    ap.add_argument("--admm-epochs", type=int, default=20, help="epochs of ADMM / HESSO training (W-steps)")
    ap.add_argument("--rounds", type=int, default=20, help="ADMM Z/U rounds")
    ap.add_argument("--hesso-periods", type=int, default=10, help="HESSO's pruning periods")
    ap.add_argument("--retrain-epochs", type=int, default=10)
    ap.add_argument("--lr", type=float, default=0.1, help="dense training lr")
    ap.add_argument("--retrain-lr", type=float, default=0.02, help="lr of HESSO and of every retraining")
    ap.add_argument("--admm-lr", type=float, default=None, help="lr of the ADMM W-steps (default: --retrain-lr)")
    ap.add_argument("--admm-schedule", choices=["round", "phase"], default="round",
                    help="round: the lr restarts every ADMM round (ADMM.round_lr); phase: the demo's schedule over "
                         "the whole ADMM phase")
    ap.add_argument("--rescale-dual", action=argparse.BooleanOptionalAction, default=True,
                    help="rescale U by rho_old/rho_new when rho grows (ADMM(rescale_dual=))")
    ap.add_argument("--rho", type=float, default=1e-2)
    ap.add_argument("--rho-max", type=float, default=10.0)
    ap.add_argument("--quick", action="store_true", help="1 seed, 10/10/5 epochs")
    ap.add_argument("--kernels", choices=["yes", "no", "only"], default="yes",
                    help="also time torch's BSR product against dense on the CPU (cpu_rows); 'only': just that")
    ap.add_argument("-v", action="store_true", help="log every method's result as it comes")
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.dense_epochs, args.admm_epochs, args.retrain_epochs = [0], 10, 10, 5
    args.admm_lr = args.retrain_lr if args.admm_lr is None else args.admm_lr
    logging.basicConfig(level=logging.WARNING if args.v else logging.ERROR, format="%(name)s: %(message)s")
    torch.set_num_threads(1)
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; torch {torch.__version__}; "
          f"python {sys.version.split()[0]}")
    print(f"dense {args.dense_epochs} ep (lr {args.lr}); ADMM {args.admm_epochs} ep (lr {args.admm_lr}, "
          f"{args.admm_schedule} schedule), {args.rounds} rounds, rho {args.rho} -> {args.rho_max}, dual "
          f"{'rescaled' if args.rescale_dual else 'not rescaled'}; HESSO {args.admm_epochs} ep ({args.hesso_periods} periods); retrain "
          f"{args.retrain_epochs} ep (lr {args.retrain_lr}); one-shot retrains {args.admm_epochs + args.retrain_epochs} "
          f"ep; SGD momentum 0.9, wd 1e-4, batch {BATCH}")
    if args.kernels == "only":
        print(kernel_table())
        return 0
    data = load_digits_split(side=8)
    if args.val:
        data = validation_split(data)
        print(f"VALIDATION: {len(data.y_train)} training images, {len(data.y_test)} validation images carved from "
              f"the training split; the test set is not used")
    t0 = time.time()
    rows = []
    for kind in args.models:
        for seed in args.seeds:
            rows += run_one(kind, seed, data, args)
    print(summarise(rows))
    if args.kernels == "yes" and not args.val:
        print(kernel_table())
    print(f"took {time.time() - t0:.0f} s; load average now: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
