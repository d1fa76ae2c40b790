"""``otofx demo``: train a small CNN on scikit-learn's digits with DHSPG, compress it, compare.

The whole OTO story in one command, on data that ships with scikit-learn (no download):

1. ``load_digits_split`` loads the 1797 8x8 digits, upsamples them to ``side`` x ``side`` and makes
   a fixed, stratified 80/20 train/test split (seeded, independent of the training seed).
2. ``DigitsNet`` (four conv-bn-relu blocks 32-32-64-64 wide, max-pools after the first and the
   third, global average pool, linear head) is trained twice from the same initialisation with the
   same step budget and learning-rate schedule: once with plain SGD (the dense baseline), once with
   ``oto.dhspg`` (DHSPG, OTOv2), which drives whole zero-invariant rows to exactly zero while it
   trains.
3. ``oto.compress()`` removes the zero rows; the compressed model (a DigitsNet) is checked against the
   trained model on the whole test set, then both are measured: test accuracy, parameters, FLOPs
   and CPU latency (batch 1, one thread, median).

``otofx demo --method scop`` (:func:`run_scop_demo`) instead prunes a *trained* model: dense
training, SCOP's knockoff stage (``oto.scop``), then the lowest half of every group's rows removed by
SCOP's scores, by L1 norm and at random (``oto.prune_lowest``: the same widths), each fine-tuned
(``otofx.scop.finetune``) and measured before and after.

Everything here reports through ``logging`` (logger ``otofx.demo``) and returns plain data; the
CLI (``otofx demo``) turns :class:`DemoResult` into a table.

Internals:
    * Budgets are counted in optimizer steps (``epochs * steps_per_epoch``, or ``max_steps`` when a
      test wants a tiny run); DHSPG's ``start_pruning_steps`` / ``warm_up_steps`` are
      ``start_pruning_epochs`` / ``warm_up_epochs`` times the steps per epoch.
    * The learning rate follows :func:`lr_factor` (constant, then cosine to zero over the last part
      of the budget) through ``LambdaLR``, which works on any ``torch.optim.Optimizer``.
    * Determinism: training runs with ``threads`` (1) intra-op threads; the split uses
      ``split_seed``; model initialisation, batch order and the optimizer's state use ``seed``
      (``torch.manual_seed`` and a dedicated ``torch.Generator``). Two runs give the same numbers
      bit for bit (latency aside).
    * The per-epoch "train acc" is the running accuracy of the epoch's training batches (train-mode
      BN, weights changing during the epoch): free, unlike a second pass over the training set.
      "test acc" is a full eval-mode pass over the test set.
    * FLOPs are those of ``torch.utils.flop_counter.FlopCounterMode`` (conv and matmul only; one
      multiply-add = 2 FLOPs) for one 1-image forward pass.
"""
from __future__ import annotations

import logging
import math
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from otofx.errors import InputError, OTOError

log = logging.getLogger("otofx.demo")


# ---------------------------------------------------------------------------------------------
# Data and model
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Split:
    x_train: torch.Tensor  # [N, 1, side, side] float32, standardised
    y_train: torch.Tensor  # [N] int64
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits_split(side: int = 16, test_fraction: float = 0.2, split_seed: int = 0) -> Split:
    """scikit-learn's digits as image tensors, upsampled to ``side``, with a fixed stratified split."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise OTOError('the demo needs scikit-learn: pip install -e ".[demo]" (or pip install scikit-learn)') from e
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [1797, 1, 8, 8]
    labels = torch.tensor(digits.target, dtype=torch.long)
    if side != 8:
        images = F.interpolate(images, size=(side, side), mode="bilinear", align_corners=False)
    train_idx, test_idx = train_test_split(torch.arange(len(labels)).numpy(), test_size=test_fraction,
                                           random_state=split_seed, stratify=labels.numpy())
    train_idx, test_idx = torch.from_numpy(train_idx), torch.from_numpy(test_idx)
    # NB: standardise with the training set's statistics only (no test leakage).
    mean, std = images[train_idx].mean(), images[train_idx].std()
    images = (images - mean) / std
    return Split(images[train_idx], labels[train_idx], images[test_idx], labels[test_idx])


class DigitsNet(nn.Module):
    """Four conv-bn-relu blocks (max-pools after the first and the third), global average pool, linear head.

    Deliberately wider than digits needs: that slack is what DHSPG turns into zero rows. Pooling
    after the first block keeps the 16x16 input cheap (the first conv has a single input channel).
    """

    def __init__(self, widths: tuple = (32, 32, 64, 64), classes: int = 10, pool_after: tuple = (0, 2)):
        super().__init__()
        layers, cin = [], 1
        for i, w in enumerate(widths):
            layers += [nn.Conv2d(cin, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
            if i in pool_after:
                layers.append(nn.MaxPool2d(2))
            cin = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(cin, classes)

    def forward(self, x):
        x = self.features(x)
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# ---------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    """Accuracy of ``model`` (eval mode, restored afterwards) on ``x``, ``y``."""
    return float((predict(model, x, batch_size) == y).float().mean())


def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    return logits(model, x, batch_size).argmax(1)


def logits(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    from otofx.api import eval_mode

    with torch.no_grad(), eval_mode(model):
        return torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


def count_flops(model: nn.Module, x: torch.Tensor) -> int:
    """FLOPs of one forward pass on ``x`` (FlopCounterMode: conv/matmul, multiply-add = 2)."""
    from otofx.api import eval_mode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), eval_mode(model), counter:
        model(x)
    return int(counter.get_total_flops())


def nparams(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@contextmanager
def num_threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def latency_ms(model: nn.Module, x: torch.Tensor, runs: int = 200, warmup: int = 20) -> float:
    """Median wall time (ms) of ``runs`` forward calls on ``x`` with one intra-op thread."""
    from otofx.api import eval_mode

    times = []
    with num_threads(1), torch.inference_mode(), eval_mode(model):
        for i in range(warmup + runs):
            t0 = time.perf_counter()
            model(x)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def lr_factor(step: int, total: int, decay_from: float = 0.6) -> float:
    """1 for the first ``decay_from`` of the budget, then a cosine down to 0 at ``total``."""
    start = int(decay_from * total)
    if step < start or total <= start:
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * (step - start) / (total - start)))


def group_sparsity(oto, model: nn.Module | None = None) -> float:
    """Fraction of all rows of ``oto.groups`` whose parameters are all exactly zero."""
    from otofx.passes.prune import row_norms

    norms = row_norms(oto.zigset, model if model is not None else oto.model)
    total = sum(len(n) for n in norms)
    return float(sum(int((n == 0).sum()) for n in norms)) / max(total, 1)


@dataclass
class EpochRecord:
    epoch: int
    step: int
    loss: float
    train_acc: float
    test_acc: float
    group_sparsity: float | None = None
    lr: float = 0.0


def train(model: nn.Module, opt: torch.optim.Optimizer, data: Split, *, steps: int, steps_per_epoch: int,
          batch_size: int, seed: int, decay_from: float = 0.6, name: str = "model",
          sparsity: Callable[[], float] | None = None) -> list[EpochRecord]:
    """``steps`` optimizer steps of cross-entropy training; one :class:`EpochRecord` per epoch.

    Batches come from a seeded per-epoch permutation of the training set (the last partial batch is
    dropped). The learning rate is ``lr_factor`` times each param group's initial lr.
    """
    gen = torch.Generator().manual_seed(seed)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, steps, decay_from))
    n = len(data.y_train)
    history, step, epoch = [], 0, 0
    model.train()
    while step < steps:
        perm = torch.randperm(n, generator=gen)
        total_loss, correct, seen = 0.0, 0, 0
        for b in range(steps_per_epoch):
            if step >= steps:
                break
            idx = perm[b * batch_size:(b + 1) * batch_size]
            out = model(data.x_train[idx])
            loss = F.cross_entropy(out, data.y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            total_loss += float(loss.detach()) * len(idx)
            correct += int((out.detach().argmax(1) == data.y_train[idx]).sum())
            seen += len(idx)
        epoch += 1
        rec = EpochRecord(epoch, step, total_loss / max(seen, 1), correct / max(seen, 1),
                          evaluate(model, data.x_test, data.y_test),
                          sparsity() if sparsity is not None else None, opt.param_groups[0]["lr"])
        model.train()
        history.append(rec)
        log.info("%s epoch %2d (step %4d): loss %.4f  train acc %.4f  test acc %.4f%s", name, rec.epoch, rec.step,
                 rec.loss, rec.train_acc, rec.test_acc,
                 "" if rec.group_sparsity is None else f"  group sparsity {rec.group_sparsity:.3f}")
    return history


# ---------------------------------------------------------------------------------------------
# The demo
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoConfig:
    """Everything the demo's result depends on. Defaults: the README's run (< 3 min on 2 cores)."""

    epochs: int = 30
    max_steps: int | None = None        # cap on the step budget (tests)
    batch_size: int = 64
    side: int = 16                      # digits upsampled from 8x8 to side x side
    widths: tuple = (32, 32, 64, 64)
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    decay_from: float = 0.5             # lr constant, then cosine to 0 over the second half
    target_group_sparsity: float = 0.7
    # DHSPG with the library's defaults (lmbda 1e-3, epsilon 0): otofx.sparsity's control raises the
    # penalty as the schedule needs and caps projections at the target, so the sparsity rises to the
    # target over the first ``pruning_fraction`` of the steps and stays there (issue 16; the former
    # lmbda 0.1, epsilon 0.97 overshot 0.7 to 0.719, the bare defaults zeroed nothing). The rest of the
    # budget at full lr, then the cosine decay, trains the kept channels. Pruning starts at step 0
    # (OTO.md's default): partitioning after some dense training made the projections remove rows the
    # network already relied on (93.1-98.1% on 3 seeds). Runs: bench/RESULTS.md, "Sparsity you can dial".
    epsilon: float = 0.0
    lmbda: float | None = None          # group-lasso strength (None: the optimizer's default)
    lmbda_amplify: float | None = None  # adaptive-lambda knobs (None: the optimizer's defaults)
    hat_lmbda_coeff: float | None = None
    pruning_fraction: float | None = 0.3  # DHSPG's pruning_steps as a share of the budget (None: it picks)
    tolerance_group_sparsity: float | None = None  # extra rows in the redundant set (None: the optimizer's 0.05)
    start_pruning_epochs: float = 0.0   # plain training before the partition
    warm_up_epochs: float = 0.0         # after it: group-lasso penalty only, no projection yet
    seed: int = 0
    split_seed: int = 0
    latency_runs: int = 200
    threads: int = 1                    # intra-op threads while training and evaluating (latency: always 1)

    def __post_init__(self):
        checks = (("epochs", self.epochs >= 1), ("max_steps", self.max_steps is None or self.max_steps >= 1),
                  ("batch_size", self.batch_size >= 1), ("side", self.side >= 4),
                  ("widths", len(self.widths) >= 1 and all(int(w) >= 1 for w in self.widths)),
                  ("lr", self.lr > 0), ("decay_from", 0.0 <= self.decay_from <= 1.0),
                  ("target_group_sparsity", 0.0 <= self.target_group_sparsity < 1.0),
                  ("start_pruning_epochs", self.start_pruning_epochs >= 0),
                  ("warm_up_epochs", self.warm_up_epochs >= 0),
                  ("pruning_fraction", self.pruning_fraction is None or 0 < self.pruning_fraction <= 1),
                  ("tolerance_group_sparsity",
                   self.tolerance_group_sparsity is None or self.tolerance_group_sparsity >= 0),
                  ("latency_runs", self.latency_runs >= 1), ("threads", self.threads >= 1))
        for name, ok in checks:
            if not ok:
                raise InputError(f"demo: {name}={getattr(self, name)!r} is out of range (see DemoConfig)")

    def steps_per_epoch(self, n_train: int) -> int:
        return max(n_train // self.batch_size, 1)

    def total_steps(self, n_train: int) -> int:
        steps = self.epochs * self.steps_per_epoch(n_train)
        return steps if self.max_steps is None else min(steps, self.max_steps)

    def dhspg_kwargs(self, n_train: int) -> dict:
        spe = self.steps_per_epoch(n_train)
        budget = (None if self.pruning_fraction is None else
                  max(1, round(self.pruning_fraction * self.total_steps(n_train))))
        return dict(lr=self.lr, variant="sgd", pruning_steps=budget, first_momentum=self.momentum, weight_decay=self.weight_decay,
                    target_group_sparsity=self.target_group_sparsity, epsilon=self.epsilon,
                    start_pruning_steps=int(round(self.start_pruning_epochs * spe)),
                    warm_up_steps=int(round(self.warm_up_epochs * spe)),
                    **{k: v for k, v in (("lmbda", self.lmbda), ("lmbda_amplify", self.lmbda_amplify),
                                         ("hat_lmbda_coeff", self.hat_lmbda_coeff),
                                         ("tolerance_group_sparsity", self.tolerance_group_sparsity))
                       if v is not None})


@dataclass
class DemoResult:
    config: DemoConfig
    rows: list                     # table rows: dicts with the keys of ROW_KEYS
    dense_history: list
    dhspg_history: list
    dense: nn.Module = field(repr=False)
    trained: nn.Module = field(repr=False)      # the DHSPG-trained full model (zero rows still there)
    compressed: nn.Module = field(repr=False)   # oto.compress() of ``trained``
    max_test_diff: float = 0.0     # max |logit difference| trained vs compressed on the test set
    same_predictions: bool = True  # argmax identical on every test image
    n_test: int = 0


ROW_KEYS = ("model", "test acc", "params", "FLOPs", "latency ms", "group sparsity")


def dhspg_optimizer(oto, config: DemoConfig, n_train: int) -> torch.optim.Optimizer:
    """``oto.dhspg(**config.dhspg_kwargs(...))``, with a clear error when DHSPG is not available."""
    make = getattr(oto, "dhspg", None)
    if make is None:
        raise OTOError("this otofx has no DHSPG optimizer (OTO.dhspg); the demo needs it")
    return make(**config.dhspg_kwargs(n_train))


def run_demo(config: DemoConfig = DemoConfig(), data: Split | None = None) -> DemoResult:
    """Dense SGD vs DHSPG + compress on digits; returns the comparison and the models."""
    # NB: one thread by default: these convs are so small that a second thread costs more in hand-off
    # than it saves (and much more on shared cores), and the float results then do not depend on
    # the machine's core count, so a run is reproducible bit for bit.
    with num_threads(config.threads):
        return _run_demo(config, data)


def _run_demo(config: DemoConfig, data: Split | None) -> DemoResult:
    from otofx.api import OTO

    data = data if data is not None else load_digits_split(config.side, split_seed=config.split_seed)
    n_train = len(data.y_train)
    spe, steps = config.steps_per_epoch(n_train), config.total_steps(n_train)
    log.info("digits: %d train / %d test images at %dx%d; %d steps (%d per epoch), batch %d", n_train,
             len(data.y_test), config.side, config.side, steps, spe, config.batch_size)

    torch.manual_seed(config.seed)
    init = DigitsNet(config.widths)
    dense = _copy(init)
    torch.manual_seed(config.seed)
    opt = torch.optim.SGD(dense.parameters(), lr=config.lr, momentum=config.momentum,
                          weight_decay=config.weight_decay)
    t0 = time.perf_counter()
    dense_hist = train(dense, opt, data, steps=steps, steps_per_epoch=spe, batch_size=config.batch_size,
                       seed=config.seed, decay_from=config.decay_from, name="dense")
    log.info("dense training took %.1f s", time.perf_counter() - t0)

    model = _copy(init)
    example = data.x_test[:1]
    oto = OTO(model, example)
    torch.manual_seed(config.seed)
    opt = dhspg_optimizer(oto, config, n_train)
    t0 = time.perf_counter()
    hist = train(model, opt, data, steps=steps, steps_per_epoch=spe, batch_size=config.batch_size,
                 seed=config.seed, decay_from=config.decay_from, name="dhspg",
                 sparsity=lambda: group_sparsity(oto, model))
    log.info("DHSPG training took %.1f s", time.perf_counter() - t0)

    model.eval()
    small = oto.compress().eval()
    ref, got = logits(model, data.x_test), logits(small, data.x_test)
    diff = float((ref - got).abs().max())
    same = bool(torch.equal(ref.argmax(1), got.argmax(1)))
    log.info("compressed: max |logit diff| on the test set %.2e, same predictions: %s", diff, same)

    dense.eval()
    rows = [_row("dense (SGD)", dense, data, example, config.latency_runs, None),
            _row("DHSPG, full", model, data, example, config.latency_runs, group_sparsity(oto, model)),
            _row("DHSPG, compressed", small, data, example, config.latency_runs, None)]
    return DemoResult(config, rows, dense_hist, hist, dense, model, small, diff, same, len(data.y_test))


# ---------------------------------------------------------------------------------------------
# ``otofx demo --method scop``: prune a trained model by SCOP's scores, next to L1 and random
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScopDemoConfig:
    """The SCOP demo: train dense, score rows (SCOP, L1, random), prune ``ratio`` of every group, fine-tune."""

    epochs: int = 20                    # dense training
    max_steps: int | None = None        # cap on every stage's optimizer steps (tests)
    scop_epochs: int = 10               # SCOP's knockoff stage (the betas only)
    knockoff: str = "gaussian"          # "gaussian" or "permute"
    ratio: float = 0.5                  # share of every group's rows removed
    finetune_epochs: int = 10
    finetune_lr: float = 0.05
    bn_batches: int = 10                # BatchNorm re-estimation after pruning
    batch_size: int = 64
    side: int = 16
    widths: tuple = (32, 32, 64, 64)
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    decay_from: float = 0.5
    seed: int = 0
    split_seed: int = 0
    latency_runs: int = 200
    threads: int = 1

    def __post_init__(self):
        checks = (("epochs", self.epochs >= 1), ("scop_epochs", self.scop_epochs >= 1),
                  ("finetune_epochs", self.finetune_epochs >= 0), ("ratio", 0.0 <= self.ratio < 1.0),
                  ("knockoff", self.knockoff in ("gaussian", "permute")),
                  ("max_steps", self.max_steps is None or self.max_steps >= 1),
                  ("latency_runs", self.latency_runs >= 1), ("threads", self.threads >= 1))
        for name, ok in checks:
            if not ok:
                raise InputError(f"demo: {name}={getattr(self, name)!r} is out of range (see ScopDemoConfig)")


SCOP_ROW_KEYS = ("model", "acc before ft", "test acc", "params", "FLOPs", "latency ms")


@dataclass
class ScopDemoResult:
    config: ScopDemoConfig
    rows: list                     # dicts with the keys of SCOP_ROW_KEYS (first: the dense model)
    dense: nn.Module = field(repr=False)
    pruned: dict = field(repr=False)   # criterion -> fine-tuned pruned GraphModule


def batches(data: Split, batch_size: int, seed: int, max_batches: int | None = None):
    """A re-iterable, seeded, shuffled loader of ``(x, y)`` training batches (last partial batch dropped)."""
    ds = torch.utils.data.TensorDataset(data.x_train, data.y_train)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, drop_last=True,
                                         generator=torch.Generator().manual_seed(seed))
    if max_batches is None:
        return loader
    return [b for _, b in zip(range(max_batches), loader)]


def prune_and_finetune(oto, scores, data: Split, config, seed: int, name: str) -> tuple:
    """``oto.prune_lowest(scores)`` (BN re-estimated), then ``otofx.scop.finetune``; accuracy before and after."""
    from otofx.scop import finetune

    loader = batches(data, config.batch_size, seed, config.max_steps)
    small = oto.prune_lowest(scores, ratio=config.ratio, loader=loader, bn_batches=config.bn_batches)
    before = evaluate(small, data.x_test, data.y_test)
    if config.finetune_epochs:
        finetune(small, loader, config.finetune_epochs, config.finetune_lr, momentum=config.momentum,
                 weight_decay=config.weight_decay)
    after = evaluate(small, data.x_test, data.y_test)
    log.info("%s: test acc %.4f after pruning, %.4f after fine-tuning", name, before, after)
    return small.eval(), before, after


def run_scop_demo(config: ScopDemoConfig = ScopDemoConfig(), data: Split | None = None) -> ScopDemoResult:
    """Dense training, then SCOP / L1 / random pruning at the same widths, each fine-tuned; the comparison."""
    with num_threads(config.threads):
        return _run_scop_demo(config, data)


def _run_scop_demo(config: ScopDemoConfig, data: Split | None) -> ScopDemoResult:
    from otofx.api import OTO
    from otofx.scop import scores as S

    data = data if data is not None else load_digits_split(config.side, split_seed=config.split_seed)
    n_train = len(data.y_train)
    spe = max(n_train // config.batch_size, 1)
    steps = config.epochs * spe if config.max_steps is None else min(config.epochs * spe, config.max_steps)
    torch.manual_seed(config.seed)
    dense = DigitsNet(config.widths)
    opt = torch.optim.SGD(dense.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    t0 = time.perf_counter()
    train(dense, opt, data, steps=steps, steps_per_epoch=spe, batch_size=config.batch_size, seed=config.seed,
          decay_from=config.decay_from, name="dense")
    log.info("dense training took %.1f s", time.perf_counter() - t0)
    dense.eval()
    example = data.x_test[:1]
    oto = OTO(dense, example)
    t0 = time.perf_counter()
    scop_scores = oto.scop(batches(data, config.batch_size, config.seed + 1, config.max_steps),
                           knockoff=config.knockoff, epochs=config.scop_epochs, seed=config.seed)
    log.info("SCOP knockoff stage took %.1f s", time.perf_counter() - t0)
    acc = evaluate(dense, data.x_test, data.y_test)
    rows = [dict(zip(SCOP_ROW_KEYS, ("dense", acc, acc, nparams(dense), count_flops(dense, example),
                                     latency_ms(dense, example, config.latency_runs))))]
    pruned = {}
    for name, sc in ((f"SCOP ({config.knockoff})", scop_scores), ("L1", S.l1(oto)),
                     ("random", S.random(oto, config.seed))):
        small, before, after = prune_and_finetune(oto, sc, data, config, config.seed + 2, name)
        pruned[name] = small
        rows.append(dict(zip(SCOP_ROW_KEYS, (name, before, after, nparams(small), count_flops(small, example),
                                             latency_ms(small, example, config.latency_runs)))))
    return ScopDemoResult(config, rows, dense, pruned)


def _row(name, model, data, example, runs, sparsity) -> dict:
    return dict(zip(ROW_KEYS, (name, evaluate(model, data.x_test, data.y_test), nparams(model),
                               count_flops(model, example), latency_ms(model, example, runs), sparsity)))


def _copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


__all__ = ["ScopDemoConfig", "ScopDemoResult", "run_scop_demo", "batches", "prune_and_finetune",
           "DemoConfig", "DemoResult", "DigitsNet", "Split", "load_digits_split", "run_demo", "train",
           "evaluate", "count_flops", "latency_ms", "group_sparsity", "lr_factor"]
