"""DHSPG and HESSO: the fused step equals a slow per-row oracle of OTO.md; training behaviour and API."""
from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from helpers import assert_exact, randomize
from torch import nn

import otofx
from otofx.optim import DHSPG, HESSO, NonFiniteGradError, OptimizerError

pytestmark = pytest.mark.usefixtures("single_thread")


# ---------------------------------------------------------------------------------------------
# A slow, obvious per-row implementation of OTO.md section 2 (and the Jacobi rule for shared elements)
# ---------------------------------------------------------------------------------------------


def _row_elements(params, groups):
    """rows[r] = (group, [(name, flat index), ...]) by brute force over every element."""
    rows = []
    for g, (n_rows, entries) in enumerate(groups):
        for i in range(n_rows):
            elems = []
            for name, dim, idx in entries:
                shape = params[name].shape
                for flat in range(params[name].numel()):
                    multi = torch.unravel_index(torch.tensor(flat), shape)
                    if int(multi[dim]) in idx[i].tolist():
                        elems.append((name, flat))
            rows.append((g, elems))
    return rows


class Oracle:
    def __init__(self, params, groups, hp):
        self.x = {n: p.detach().clone().double() for n, p in params.items()}
        self.groups, self.hp = groups, hp
        self.rows = _row_elements(self.x, groups)
        self.state, self.t, self.redundant = {}, 0, None

    def direction(self, name, g):
        hp, x = self.hp, self.x[name]
        v = hp["variant"]
        st = self.state.setdefault(name, {})
        if v == "sgd":
            g = g + hp["weight_decay"] * x
            if not hp["first_momentum"]:
                return g
            if "buf" not in st:
                st["buf"] = g.clone()
            else:
                st["buf"] = hp["first_momentum"] * st["buf"] + (1 - hp["dampening"]) * g
            return st["buf"]
        if v == "adam":
            g = g + hp["weight_decay"] * x
        b1, b2, t = hp["first_momentum"], hp["second_momentum"], self.t + 1
        st["m"] = b1 * st.get("m", torch.zeros_like(x)) + (1 - b1) * g
        st["v"] = b2 * st.get("v", torch.zeros_like(x)) + (1 - b2) * g * g
        d = (st["m"] / (1 - b1 ** t)) / ((st["v"] / (1 - b2 ** t)).sqrt() + 1e-8)
        return d + hp["weight_decay"] * x if v == "adamw" else d

    def partition(self, xr, dr):
        hp, n = self.hp, len(self.rows)
        cos, inv = [], []
        for xi, di in zip(xr, dr):
            nx, nd = xi.norm().item(), di.norm().item()
            cos.append(xi.dot(di).item() / (nx * nd) if nx * nd > 0 else 0.0)
            inv.append(1.0 / (nx / len(xi) + 1e-6))
        nc, ni = math.sqrt(sum(c * c for c in cos)), math.sqrt(sum(v * v for v in inv))
        score = [0.5 * (c / nc if nc else c) + 0.5 * v / ni for c, v in zip(cos, inv)]
        k = math.floor(n * min(hp["target_group_sparsity"] + hp["tolerance_group_sparsity"], 0.999))
        chosen = set(sorted(range(n), key=lambda r: (-score[r], r))[:k])
        redundant = [False] * n
        gd = hp["group_divisible"]
        units = []  # (mean score, group, unit) of whole multiples of gd that a group can still give
        for g, (ng, _) in enumerate(self.groups):
            members = sorted((r for r in range(n) if self.rows[r][0] == g), key=lambda r: (-score[r], r))
            kept = ng - sum(r in chosen for r in members)
            kept = min(ng, max(gd, -(-kept // gd) * gd))
            for r in members[: ng - kept]:
                redundant[r] = True
            rest = members[ng - kept:]
            for u in range(max(kept - gd, 0) // gd):
                unit = rest[u * gd:(u + 1) * gd]
                units.append((sum(score[r] for r in unit) / gd, g, u, unit))
        # the rows the rounding gave back go on, a whole unit at a time, best mean score first
        short = k - sum(redundant)
        if short >= gd:
            for *_, unit in sorted(units, key=lambda e: (-e[0], e[1], e[2]))[: short // gd]:
                for r in unit:
                    redundant[r] = True
        return redundant

    def step(self, grads):
        hp, lr = self.hp, self.hp["lr"]
        d = {n: self.direction(n, grads[n]) for n in self.x}
        t, self.t = self.t, self.t + 1
        if t < hp["start_pruning_steps"]:
            for n in self.x:
                self.x[n] = self.x[n] - lr * d[n]
            return
        xr = [torch.stack([self.x[n].reshape(-1)[i] for n, i in e]) for _, e in self.rows]
        dr = [torch.stack([d[n].reshape(-1)[i] for n, i in e]) for _, e in self.rows]
        if self.redundant is None:
            self.redundant = self.partition(xr, dr)
        warm = t < hp["start_pruning_steps"] + hp["warm_up_steps"]
        zeros = sum(bool(xi.norm() == 0) for xi in xr)
        active = zeros < math.ceil(hp["target_group_sparsity"] * len(self.rows) - 1e-9)
        coef, drop = [0.0] * len(xr), [False] * len(xr)
        for r, (xi, di) in enumerate(zip(xr, dr)):
            nx = xi.norm().item()
            if nx == 0:
                drop[r] = hp["fixed_zero_groups"]
                continue
            if not (self.redundant[r] and active):
                continue
            xd, dd = xi.dot(di).item(), di.dot(di).item()
            lam = hp["lmbda"]
            if not warm and xd < 0:
                lb, ub = -xd / nx, -dd * nx / xd
                lam = min(max(hp["lmbda_amplify"] * lb, hp["lmbda"]), hp["lmbda"] * hp["hat_lmbda_coeff"])
                if lam >= ub:
                    lam = (lb + ub) / 2
            coef[r] = lam / nx
            if not warm and nx * nx - lr * xd - lr * lam * nx < hp["epsilon"] * nx * nx:
                drop[r] = True
        new = {n: self.x[n] - lr * d[n] for n in self.x}
        for r, (_, elems) in enumerate(self.rows):
            for n, i in elems:
                new[n].view(-1)[i] -= lr * coef[r] * self.x[n].reshape(-1)[i]
        for r, (_, elems) in enumerate(self.rows):
            if drop[r]:
                for n, i in elems:
                    new[n].view(-1)[i] = 0.0
        self.x = new


# three tensors; rows span tensors and dims; w2 elements are shared between groups 0 and 1,
# and w1 elements between groups 0 and 2
def _toy():
    g = torch.Generator().manual_seed(0)
    params = {"w1": torch.randn(4, 3, 2, generator=g, dtype=torch.float64),
              "b1": torch.randn(4, generator=g, dtype=torch.float64),
              "w2": torch.randn(5, 4, generator=g, dtype=torch.float64),
              "free": torch.randn(3, generator=g, dtype=torch.float64)}
    ar = lambda n: torch.arange(n)[:, None]  # noqa: E731
    groups = [(4, [("w1", 0, ar(4)), ("b1", 0, ar(4)), ("w2", 1, ar(4))]),
              (5, [("w2", 0, ar(5))]),
              (1, [("w1", 1, torch.tensor([[0, 2]]))]),
              (0, [])]
    return params, groups


HP = dict(lr=0.2, variant="sgd", first_momentum=0.0, second_momentum=0.0, dampening=0.0, weight_decay=0.0,
          lmbda=3.0, lmbda_amplify=2.0, hat_lmbda_coeff=10.0, epsilon=0.5, target_group_sparsity=0.5,
          tolerance_group_sparsity=0.2, start_pruning_steps=0, warm_up_steps=0, group_divisible=1,
          fixed_zero_groups=True)

CASES = {
    "sgd-plain": {},
    "sgd-momentum-wd-start-warmup": dict(first_momentum=0.5, dampening=0.1, weight_decay=1e-2, start_pruning_steps=2,
                                         warm_up_steps=2, lmbda=6.0),
    "adam-divisible": dict(variant="adam", group_divisible=2, hat_lmbda_coeff=1e3, lmbda_amplify=20.0),
    "adamw-no-fixed-zero": dict(variant="adamw", weight_decay=1e-2, fixed_zero_groups=False, target_group_sparsity=0.3),
    # at most 7 of the 10 rows can be redundant: every group keeps one row
    "sgd-eps0-high-target": dict(epsilon=0.0, target_group_sparsity=0.7, tolerance_group_sparsity=0.2, lr=0.3),
}


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("case", list(CASES))
def test_fused_step_equals_per_row_oracle(case, backend):
    """Step by step; on "cpu" (the C kernel) the SGD momentum of the row tensors is fused into it."""
    if backend == "cpu" and not otofx.kernels.cpu_available():
        pytest.skip("the C kernel cannot be built (no C compiler)")
    hp = {**HP, **CASES[case]}
    params, groups = _toy()
    oracle = Oracle(params, groups, hp)
    ps = {n: nn.Parameter(t.clone()) for n, t in params.items()}
    opt = DHSPG(list(ps.items()), groups, backend=backend, control=False,  # OTO.md's rule alone
                **{k: v for k, v in hp.items()})
    g = torch.Generator().manual_seed(1)
    sparsities, fixed_zero_seen = [], False
    for _ in range(16):
        grads = {n: 0.3 * torch.randn(p.shape, generator=g, dtype=torch.float64) for n, p in ps.items()}
        if hp["fixed_zero_groups"] and 0 < opt.group_sparsity:
            fixed_zero_seen = True
        for n, p in ps.items():
            p.grad = grads[n].clone()
        opt.step()
        oracle.step(grads)
        for n, p in ps.items():
            torch.testing.assert_close(p.detach(), oracle.x[n], rtol=1e-10, atol=1e-12, msg=f"{case}: {n}")
            assert torch.equal(p.detach() == 0, oracle.x[n] == 0)
        sparsities.append(opt.group_sparsity)
        if oracle.redundant is not None:
            assert opt.redundant.tolist() == oracle.redundant
    # the case is not vacuous: rows were projected, and the penalty stopped at the target
    assert max(sparsities) >= hp["target_group_sparsity"], sparsities
    if hp["fixed_zero_groups"]:
        assert fixed_zero_seen and sparsities == sorted(sparsities)  # zero rows stay zero
    if hp["group_divisible"] > 1:
        kept0 = int((~opt.redundant[:4]).sum())
        assert kept0 % hp["group_divisible"] == 0


@pytest.mark.parametrize("gd", [1, 2])
def test_partition_hands_on_rows_the_rounding_gives_back(gd):
    """Four one-row groups hold the best scores (the smallest rows): each must keep its row, so the
    partition hands their places in the top K to the big group instead of dropping them."""
    g = torch.Generator().manual_seed(0)
    params = {"small": 1e-3 * torch.randn(4, 3, generator=g, dtype=torch.float64),
              "big": torch.randn(8, 3, generator=g, dtype=torch.float64)}
    groups = [(1, [("small", 0, torch.tensor([[i]]))]) for i in range(4)] + [(8, [("big", 0, torch.arange(8)[:, None])])]
    hp = dict(HP, target_group_sparsity=0.5, tolerance_group_sparsity=0.05, group_divisible=gd)
    ps = {n: nn.Parameter(t.clone()) for n, t in params.items()}
    opt = DHSPG(list(ps.items()), groups, control=False, **hp)
    oracle = Oracle(params, groups, hp)
    grads = {n: torch.randn(t.shape, generator=g, dtype=torch.float64) for n, t in params.items()}
    for n, p in ps.items():
        p.grad = grads[n].clone()
    opt.step()
    oracle.step(grads)
    k = math.floor(12 * 0.55)  # 6: the four one-row groups are among them, and keep their rows
    assert opt.redundant[:4].sum() == 0
    assert int(opt.redundant.sum()) == k // gd * gd  # all six places (in whole multiples of gd) went on
    assert opt.redundant.tolist() == oracle.redundant


def test_partition_waits_for_start_and_warm_up_does_not_project():
    params, groups = _toy()
    ps = {n: nn.Parameter(t.clone()) for n, t in params.items()}
    opt = DHSPG(list(ps.items()), groups, lr=0.3, lmbda=5.0, epsilon=0.9, start_pruning_steps=2, warm_up_steps=3)
    g = torch.Generator().manual_seed(2)
    for step in range(5):
        for p in ps.values():
            p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64)
        opt.step()
        assert (opt.redundant is None) == (step < 2)
        assert opt.group_sparsity == 0.0  # no projection before start + warm-up
    for p in ps.values():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert opt.group_sparsity > 0


# ---------------------------------------------------------------------------------------------
# Plain phase equals torch's optimizers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant,torch_opt", [
    ("sgd", lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, dampening=0.1, weight_decay=1e-3)),
    ("adam", lambda ps: torch.optim.Adam(ps, lr=0.01, weight_decay=1e-3)),
    ("adamw", lambda ps: torch.optim.AdamW(ps, lr=0.01)),
])
def test_base_step_matches_torch(variant, torch_opt):
    kw = {"sgd": dict(lr=0.1, first_momentum=0.9, dampening=0.1, weight_decay=1e-3),
          "adam": dict(lr=0.01, weight_decay=1e-3), "adamw": dict(lr=0.01)}[variant]
    _steps_as_torch(lambda a, groups: DHSPG(list(a.items()), groups, variant=variant, start_pruning_steps=100, **kw),
                    torch_opt, steps=5, seed=3)


def _steps_as_torch(make_ours, make_ref, steps: int, seed: int) -> None:
    """Ours and a torch optimizer on copies of the toy parameters, fed the same float64 gradients for
    ``steps`` steps, end with the same parameters."""
    params, groups = _toy()
    a = {n: nn.Parameter(t.clone()) for n, t in params.items()}
    b = [nn.Parameter(t.clone()) for t in params.values()]
    ours, ref = make_ours(a, groups), make_ref(b)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p, q in zip(a.values(), b):
            p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64)
            q.grad = p.grad.clone()
        ours.step()
        ref.step()
    for p, q in zip(a.values(), b):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("variant", ["sgd", "adam"])
def test_hesso_without_rows_to_prune_steps_as_torch(variant, backend):
    """Inside HESSO's pruning window with a zero target nothing is scaled: the steps are torch's."""
    if backend == "cpu" and not otofx.kernels.cpu_available():
        pytest.skip("the C kernel cannot be built (no C compiler)")
    _steps_as_torch(
        lambda a, groups: HESSO(list(a.items()), groups, variant=variant, lr=0.05, first_momentum=0.9,
                                target_group_sparsity=0.0, start_pruning_step=0, pruning_steps=4, backend=backend),
        lambda b: torch.optim.SGD(b, lr=0.05, momentum=0.9) if variant == "sgd" else torch.optim.Adam(b, lr=0.05),
        steps=6, seed=6)


# ---------------------------------------------------------------------------------------------
# Training a small CNN through otofx.OTO
# ---------------------------------------------------------------------------------------------


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c3 = nn.Conv2d(8, 12, 1)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        y = torch.relu(self.b1(self.c1(x)))
        y = torch.relu(self.b2(self.c2(y)) + y)  # residual: c1 and c2 rows tied
        y = torch.relu(self.c3(y))
        return self.fc(y.mean((2, 3)))


def _data(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 6, 6, generator=g), torch.randint(0, 5, (n,), generator=g)


def _train(model, opt, steps, x, y, check=None):
    for i in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if check:
            check(i)


def _zero_rows(oto):
    return [torch.nonzero(n == 0).reshape(-1) for n in oto.row_norms()]


def test_dhspg_reaches_target_then_compress_is_exact():
    model = randomize(SmallCNN())
    x, y = _data()
    oto = otofx.OTO(model, x[:2])
    opt = oto.dhspg(lr=0.1, lmbda=0.5, epsilon=0.9, start_pruning_steps=3, target_group_sparsity=0.5, pruning_steps=60)
    assert opt.n_rows == sum(z.rows for z in oto.groups)
    seen = []

    def check(i):
        zeros = _zero_rows(oto)
        for before, now in zip(seen[-1] if seen else [], zeros):
            assert set(before.tolist()) <= set(now.tolist()), "a zero row came back"
        seen.append(zeros)

    _train(model, opt, 80, x, y, check)
    assert opt.group_sparsity >= 0.5
    assert opt.group_sparsity <= 0.5 + 0.05 + 1e-9 + 1 / opt.n_rows
    small = assert_exact(model, oto, x[:4])
    # the small model trains further
    out = small(x[:4])
    out.sum().backward()


def test_hesso_reaches_exactly_the_target():
    model = randomize(SmallCNN())
    x, y = _data()
    oto = otofx.OTO(model, x[:2])
    opt = oto.hesso(lr=0.05, first_momentum=0.9, target_group_sparsity=0.4, start_pruning_step=2,
                    pruning_steps=6, pruning_periods=2)
    n = opt.n_rows
    total = math.floor(n * 0.4)
    counts = []
    _train(model, opt, 12, x, y, lambda i: counts.append(round(opt.group_sparsity * n)))
    # period 1 (steps 2..4) ends with half the rows zero, period 2 (5..7) with all of them
    assert counts[4] == total // 2 and counts[7] == total, counts
    assert counts[2:4] == [0, 0]
    assert counts[-1] == total
    assert_exact(model, oto, x[:4])


def test_hesso_per_group_targets_each_land():
    """HESSO with one target per group: each group loses exactly floor(rows * its target) rows, half
    in each period, and compresses exactly."""
    model = randomize(SmallCNN())
    x, y = _data()
    oto = otofx.OTO(model, x[:2])
    targets = [0.25 if i % 2 else 0.6 for i in range(len(oto.groups))]
    opt = oto.hesso(lr=0.05, first_momentum=0.9, target_group_sparsity=targets, start_pruning_step=2,
                    pruning_steps=6, pruning_periods=2)
    want = [math.floor(z.rows * t) for z, t in zip(oto.groups, targets)]
    assert opt.target_group_sparsity == pytest.approx(sum(want) / opt.n_rows)
    per_group = []
    _train(model, opt, 12, x, y, lambda i: per_group.append([len(r) for r in _zero_rows(oto)]))
    assert per_group[4] == [w // 2 for w in want] and per_group[-1] == want, per_group
    assert_exact(model, oto, x[:4])


# ---------------------------------------------------------------------------------------------
# state_dict, schedulers, GradScaler
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["sgd", "adam"])
@pytest.mark.parametrize("kind", ["dhspg", "hesso"])
def test_state_dict_round_trip_resumes_identically(variant, kind):
    kw = dict(lr=0.05, variant=variant, first_momentum=0.9)
    kw.update(dict(lmbda=0.05, epsilon=0.9, start_pruning_steps=2) if kind == "dhspg"
              else dict(start_pruning_step=2, pruning_steps=4, pruning_periods=2))
    model = randomize(SmallCNN())
    x, y = _data()
    oto = otofx.OTO(model, x[:2])
    opt = getattr(oto, kind)(**kw)
    _train(model, opt, 4, x, y)  # the partition / first selection is in the saved state
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    _train(model, opt, 5, x, y)
    want = copy.deepcopy(model.state_dict())

    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    model2 = SmallCNN()
    model2.load_state_dict(saved["model"])
    oto2 = otofx.OTO(model2, x[:2])
    opt2 = getattr(oto2, kind)(**kw)
    opt2.load_state_dict(saved["opt"])
    assert opt2.step_count == 4
    _train(model2, opt2, 5, x, y)
    for k, v in want.items():
        assert torch.equal(model2.state_dict()[k], v), k


def test_load_state_dict_rejects_other_layout():
    x, _ = _data()
    opt = otofx.OTO(SmallCNN(), x[:2]).dhspg()
    other = DHSPG(nn.Linear(3, 2).named_parameters(), ())
    with pytest.raises(OptimizerError, match="different row layout"):
        other.load_state_dict(opt.state_dict())


def test_scheduler_lr_is_read_each_step():
    params, groups = _toy()
    ps = {n: nn.Parameter(t.clone()) for n, t in params.items()}
    opt = DHSPG(list(ps.items()), groups, lr=1.0, start_pruning_steps=100)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for lr in (1.0, 0.5, 0.25):
        before = {n: p.detach().clone() for n, p in ps.items()}
        for p in ps.values():
            p.grad = torch.ones_like(p)
        opt.step()
        sched.step()
        for n, p in ps.items():
            torch.testing.assert_close(p.detach(), before[n] - lr)


def test_grad_scaler_skips_non_finite_steps():
    model = SmallCNN()
    x, y = _data()
    oto = otofx.OTO(model, x[:2])
    opt = oto.dhspg(lr=0.05, lmbda=0.05, epsilon=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    for i in range(4):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        before = copy.deepcopy(model.state_dict())
        steps = opt.step_count
        if i == 2:
            model.c1.weight.grad[0, 0, 0, 0] = float("inf")
        scale = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        if i == 2:  # skipped: nothing changed, the scale backed off
            assert opt.step_count == steps and scaler.get_scale() < scale
            for k, v in model.state_dict().items():
                if k.endswith("weight") or k.endswith("bias"):
                    assert torch.equal(v, before[k]), k
        else:
            assert opt.step_count == steps + 1
    assert opt.redundant is not None


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def _snapshot(model, opt):
    return ({k: v.detach().clone() for k, v in model.named_parameters()},
            {i: {k: v.clone() for k, v in st.items() if isinstance(v, torch.Tensor)}
             for i, st in opt.state_dict()["state"].items()})


def _assert_unchanged(model, opt, snap):
    params, state = snap
    for k, v in model.named_parameters():
        assert torch.equal(v, params[k]), k
    after = opt.state_dict()["state"]
    for i, st in state.items():
        for k, v in st.items():
            assert torch.equal(after[i][k], v), (i, k)


def test_nan_gradient_raises_and_changes_nothing():
    """check_finite="raise": the opt-in mode that reads the check on the host and names the parameter."""
    model = SmallCNN()
    x, y = _data()
    opt = otofx.OTO(model, x[:2]).dhspg(lr=0.05, first_momentum=0.9, check_finite="raise")
    _train(model, opt, 2, x, y)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    snap = _snapshot(model, opt)
    model.b2.bias.grad[1] = float("nan")
    with pytest.raises(NonFiniteGradError, match="'b2.bias'"):
        opt.step()
    _assert_unchanged(model, opt, snap)
    assert opt.step_count == 2


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("kind,variant", [("dhspg", "sgd"), ("dhspg", "adamw"), ("hesso", "sgd"), ("hesso", "adam")])
def test_non_finite_step_is_skipped_on_the_device(kind, variant, backend):
    """The default: a NaN/inf gradient in a steady step changes no parameter or state, counts as skipped,
    and training goes on (also an event step, the partition, is skipped and retried)."""
    if backend == "cpu" and not otofx.kernels.cpu_available():
        pytest.skip("the C kernel cannot be built (no C compiler)")
    model = randomize(SmallCNN())
    x, y = _data()
    oto = otofx.OTO(model, x[:2])
    kw = dict(lr=0.05, variant=variant, first_momentum=0.9, weight_decay=1e-3, backend=backend)
    kw.update(dict(lmbda=0.05, epsilon=0.9, start_pruning_steps=2) if kind == "dhspg"
              else dict(start_pruning_step=2, pruning_steps=6, pruning_periods=2))
    opt = getattr(oto, kind)(**kw)
    _train(model, opt, 2, x, y)
    for poison in ("nan", "inf"):  # step 2 is the partition / first selection (an event), then a steady step
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        snap = _snapshot(model, opt)
        model.c2.weight.grad[0, 0, 0, 0] = float(poison)
        opt.step()
        _assert_unchanged(model, opt, snap)
        _train(model, opt, 1, x, y)
    assert opt.skipped_steps == 2 and opt.step_count == 4
    _train(model, opt, 3, x, y)
    assert opt.step_count == 7 and all(torch.isfinite(p).all() for p in model.parameters())


def test_c_kernel_checks_row_gradients_in_its_pass_and_the_rest_apart(monkeypatch):
    """DHSPG (SGD momentum) on the C kernel: steady steps check the row tensors' gradients in the
    kernel's reduction pass and the other gradients apart; a NaN in either kind changes nothing."""
    if not otofx.kernels.cpu_available():
        pytest.skip("the C kernel cannot be built (no C compiler)")
    from otofx.kernels import cpu_rows

    checked = []
    real = cpu_rows.rows_step
    monkeypatch.setattr(cpu_rows, "rows_step", lambda *a: checked.append(a[-1]) or real(*a))
    model = randomize(SmallCNN())
    x, y = _data()
    oto = otofx.OTO(model, x[:2])
    opt = oto.dhspg(lr=0.05, first_momentum=0.9, weight_decay=1e-3, lmbda=0.05, epsilon=0.9, backend="cpu")
    _train(model, opt, 3, x, y)
    assert checked[1:] and all(checked[1:])  # every steady step (not the partition) checked in the kernel
    rows = {n for n, p in model.named_parameters() if id(p) in opt._row_index}
    assert "fc.bias" not in rows and "c2.weight" in rows
    for name in ("fc.bias", "c2.weight"):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        snap = _snapshot(model, opt)
        dict(model.named_parameters())[name].grad.view(-1)[-1] = float("nan")
        opt.step()
        _assert_unchanged(model, opt, snap)
    assert opt.skipped_steps == 2
    _train(model, opt, 1, x, y)
    assert opt.step_count == 4 and all(torch.isfinite(p).all() for p in model.parameters())


def test_unknown_parameter_and_unnamed_params():
    params, groups = _toy()
    ps = {n: nn.Parameter(t.clone()) for n, t in params.items()}
    with pytest.raises(OptimizerError, match="'w2'.*does not hold"):
        DHSPG([(n, p) for n, p in ps.items() if n != "w2"], groups)
    with pytest.raises(OptimizerError, match="named_parameters"):
        DHSPG(list(ps.values()), groups)
    with pytest.raises(OptimizerError, match="variant"):
        DHSPG(list(ps.items()), groups, variant="rmsprop")
    with pytest.raises(OptimizerError, match="pruning_steps"):
        HESSO(list(ps.items()), groups)
    for eps in (1.0, 1.5, -0.1):
        with pytest.raises(OptimizerError, match="epsilon"):
            DHSPG(list(ps.items()), groups, epsilon=eps)
    DHSPG(list(ps.items()), groups, epsilon=0.95)


def test_unsupported_dtype():
    p = nn.Parameter(torch.zeros(3, dtype=torch.complex64))
    with pytest.raises(OptimizerError, match="dtype"):
        DHSPG([("p", p)], ())
    assert issubclass(OptimizerError, otofx.OTOError)


# ---------------------------------------------------------------------------------------------
# No host round trips in steady steps
# ---------------------------------------------------------------------------------------------

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

_aten = torch.ops.aten
# ops that read a device value on the host, or whose output shape depends on the data
_SYNCING = {_aten._local_scalar_dense, _aten.item, _aten.is_nonzero, _aten.nonzero, _aten.nonzero_static,
            _aten.equal, _aten.allclose, _aten.masked_select, _aten.bincount, _aten._unique2, _aten.unique_dim,
            _aten.unique_consecutive, _aten.argwhere, _aten.repeat_interleave, _aten.histc}


class SyncCounter(TorchDispatchMode):
    """Counts synchronising ops (and ``Tensor.tolist``, which reads memory without an aten op)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket in _SYNCING:
            self.seen.append(str(func))
        elif func.overloadpacket in (_aten.index, _aten.index_put, _aten.index_put_):
            idx = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in idx):
                self.seen.append(f"{func} with a boolean mask")
        return func(*args, **kwargs)

    def __enter__(self):
        counter, tolist = self, torch.Tensor.tolist

        def counted(t, *a, **k):
            counter.seen.append("Tensor.tolist")
            return tolist(t, *a, **k)
        self._tolist, torch.Tensor.tolist = tolist, counted
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)


SYNC_CASES = [
    ("dhspg", "sgd", dict(first_momentum=0.9, weight_decay=1e-3, start_pruning_steps=2, lmbda=0.05, epsilon=0.9)),
    ("dhspg", "sgd", dict(first_momentum=0.0, dampening=0.0, start_pruning_steps=1, warm_up_steps=1)),
    ("dhspg", "adam", dict(weight_decay=1e-3, start_pruning_steps=2, epsilon=0.9)),
    # the sparsity controller on the device clock (capturable: the schedule a CUDA graph replays)
    ("dhspg", "sgd", dict(first_momentum=0.9, start_pruning_steps=2, lmbda=0.05, epsilon=0.9, capturable=True)),
    ("dhspg", "adamw", dict(start_pruning_steps=2, epsilon=0.9)),
    ("hesso", "sgd", dict(first_momentum=0.9, start_pruning_step=2, pruning_steps=4, pruning_periods=1)),
    ("hesso", "adam", dict(start_pruning_step=2, pruning_steps=4, pruning_periods=2)),
    ("hesso", "adamw", dict(start_pruning_step=1, pruning_steps=2, pruning_periods=1)),
]


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("kind,variant,kw", SYNC_CASES, ids=[f"{k}-{v}-{i}" for i, (k, v, _) in enumerate(SYNC_CASES)])
def test_steady_steps_make_no_host_sync(kind, variant, kw, backend):
    """After the first step and the partition (a HESSO selection), no step reads a device value on the
    host: the finite check, the sparsity gate and the schedule stay on the device (also with GradScaler's
    grad_scale / found_inf handed over). The CUDA path shares this control flow."""
    if backend == "cpu" and not otofx.kernels.cpu_available():
        pytest.skip("the C kernel cannot be built (no C compiler)")
    params, groups = _toy()
    ps = {n: nn.Parameter(t.clone()) for n, t in params.items()}
    opt = (DHSPG if kind == "dhspg" else HESSO)(list(ps.items()), groups, lr=0.1, variant=variant, backend=backend, **kw)
    g = torch.Generator().manual_seed(5)
    counted = 0
    for step in range(8):
        for p in ps.values():
            p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64)
        if step == 6:  # GradScaler's protocol: the scale and the flag are handed to step()
            opt.grad_scale, opt.found_inf = torch.tensor(2.0), torch.tensor(0.0)
        if opt._event():
            opt.step()
        else:
            with SyncCounter() as sc:
                opt.step()
            assert sc.seen == [], f"step {step}: {sc.seen}"
            counted += 1
        if step == 6:
            del opt.grad_scale, opt.found_inf
    assert counted >= 4 and opt.skipped_steps == 0
    if kind == "dhspg":
        assert opt.redundant is not None


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("kind", ["dhspg", "hesso"])
def test_learning_rate_as_a_tensor(kind, backend):
    """A 0-dim tensor lr (read on the device: CUDA-graph replays with a scheduler) gives the float lr's steps."""
    if backend == "cpu" and not otofx.kernels.cpu_available():
        pytest.skip("the C kernel cannot be built (no C compiler)")
    params, groups = _toy()
    runs = []
    for lr in (0.2, torch.tensor(0.2, dtype=torch.float64)):
        ps = {n: nn.Parameter(t.clone()) for n, t in params.items()}
        kw = dict(lmbda=3.0, epsilon=0.5) if kind == "dhspg" else dict(start_pruning_step=1, pruning_steps=4)
        cls = DHSPG if kind == "dhspg" else HESSO
        runs.append((ps, cls(list(ps.items()), groups, lr=lr, first_momentum=0.5, backend=backend, capturable=True, **kw)))
    g = torch.Generator().manual_seed(4)
    for _ in range(6):
        grads = {n: torch.randn(t.shape, generator=g, dtype=torch.float64) for n, t in params.items()}
        for ps, opt in runs:
            for n, p in ps.items():
                p.grad = grads[n].clone()
            opt.step()
    (a, oa), (b, ob) = runs
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-12, atol=1e-12)
    assert oa.group_sparsity == ob.group_sparsity > 0


def test_check_finite_and_capturable_arguments():
    params, groups = _toy()
    ps = list({n: nn.Parameter(t.clone()) for n, t in params.items()}.items())
    with pytest.raises(OptimizerError, match="check_finite"):
        DHSPG(ps, groups, check_finite="sometimes")
    with pytest.raises(OptimizerError, match="capturable=True cannot be combined"):
        HESSO(ps, groups, pruning_steps=2, capturable=True, check_finite="raise")
    assert DHSPG(ps, groups, check_finite=False).skipped_steps == 0


# ---------------------------------------------------------------------------------------------
# Adam's per-parameter steps, frozen groups, the C kernel's version counters
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [DHSPG, HESSO])
@pytest.mark.parametrize("variant,ref_cls", [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)])
def test_adam_counts_each_parameters_own_steps(cls, variant, ref_cls):
    """A parameter whose first gradient comes at step 3 gets torch's bias correction for step 1 (a
    shared count used to give it step 3's); its step count also survives a state_dict round trip."""
    a, b = nn.Parameter(torch.ones(3, dtype=torch.float64)), nn.Parameter(torch.ones(3, dtype=torch.float64))
    a2, b2 = nn.Parameter(a.detach().clone()), nn.Parameter(b.detach().clone())
    kw = dict(pruning_steps=1) if cls is HESSO else {}
    ours = cls([("a", a), ("b", b)], (), variant=variant, lr=0.1, weight_decay=0.01, **kw)
    ref = ref_cls([a2, b2], lr=0.1, weight_decay=0.01, foreach=False)
    for step in range(5):
        if step == 3:  # resume from a checkpoint
            sd = ours.state_dict()
            ours = cls([("a", a), ("b", b)], (), variant=variant, lr=0.1, weight_decay=0.01, **kw)
            ours.load_state_dict(sd)
        a.grad, a2.grad = torch.full((3,), 0.5, dtype=torch.float64), torch.full((3,), 0.5, dtype=torch.float64)
        b.grad = b2.grad = None
        if step >= 2:
            b.grad, b2.grad = torch.full((3,), -0.3, dtype=torch.float64), torch.full((3,), -0.3, dtype=torch.float64)
        ours.step()
        ref.step()
        torch.testing.assert_close((a, b), (a2, b2), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["dhspg", "hesso"])
def test_groups_holding_a_frozen_parameter_are_left_out(kind, caplog):
    """torch's optimizers never write a parameter without gradient; neither do otofx's: oto.dhspg()
    leaves a group with a frozen parameter out (a warning names it), the class refuses it."""
    torch.manual_seed(0)
    model = randomize(SmallCNN())
    oto = otofx.OTO(model, torch.randn(1, 3, 6, 6))
    model.b1.weight.requires_grad_(False)
    frozen = [z for z in oto.groups if z.frozen(model)]
    assert len(frozen) == 1 and frozen[0].frozen(model) == ("b1.weight",)
    before = model.b1.weight.detach().clone()
    kw = dict(pruning_steps=4) if kind == "hesso" else dict(pruning_steps=4, lmbda=0.1)
    with caplog.at_level("WARNING", logger="otofx"):
        opt = getattr(oto, kind)(lr=0.05, target_group_sparsity=0.5, **kw)
    assert "b1.weight" in caplog.text
    assert opt.n_rows == sum(z.rows for z in oto.groups) - frozen[0].rows
    x, y = _data()
    _train(model, opt, 8, x, y)
    assert torch.equal(model.b1.weight, before)
    with pytest.raises(OptimizerError, match="frozen"):
        (DHSPG if kind == "dhspg" else HESSO)(model.named_parameters(), oto.groups, pruning_steps=4)


def test_c_kernel_step_moves_the_version_counters():
    """The C kernel writes through raw pointers; the version counters still move, so the compile
    backend (which watches them) rebuilds its pruned graph after a step."""
    if not otofx.kernels.cpu_available():
        pytest.skip("the C kernel cannot be built (no C compiler)")
    params, groups = _toy()
    ps = {n: nn.Parameter(t.clone()) for n, t in params.items()}
    opt = DHSPG(list(ps.items()), groups, lr=0.1, backend="cpu", start_pruning_steps=0, lmbda=0.05)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        for p in ps.values():
            p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
        versions = {n: p._version for n, p in ps.items()}
        opt.step()
        assert all(ps[n]._version > v for n, v in versions.items() if id(ps[n]) in opt._row_index)
