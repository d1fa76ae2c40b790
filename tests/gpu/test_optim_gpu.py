"""DHSPG and HESSO on CUDA: the compiled Triton kernels equal the torch reference, AMP with GradScaler
skips inf steps on the device, and a capturable step replayed from a CUDA graph equals eager steps."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import otofx
from otofx.kernels import triton_available

DEV = torch.device("cuda")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c2, self.b2 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c3 = nn.Conv2d(16, 24, 1)
        self.fc = nn.Linear(24, 5)

    def forward(self, x):
        y = torch.relu(self.b1(self.c1(x)))
        y = torch.relu(self.b2(self.c2(y)) + y)
        y = torch.relu(self.c3(y))
        return self.fc(y.mean((2, 3)))


def _setup(seed=0):
    torch.manual_seed(seed)
    model = Net()
    x = torch.randn(8, 3, 8, 8)
    oto = otofx.OTO(model, x[:2])
    return model, oto, x


def _compiled_triton() -> bool:
    if not triton_available():
        return False
    from otofx.kernels import triton_rows

    return type(triton_rows._apply_kernel).__name__ != "InterpretedFunction"


def _grads(model, g):
    return [torch.randn(p.shape, generator=g).mul_(0.05).to(DEV) for p in model.parameters()]


def _zero_rows(opt):
    return (opt.row_stats().xx == 0).cpu()


@pytest.mark.skipif(not _compiled_triton(), reason="needs compiled Triton kernels (run with TRITON_INTERPRET=0)")
@pytest.mark.parametrize("kind,variant", [("dhspg", "sgd"), ("dhspg", "adamw"), ("hesso", "sgd"), ("hesso", "adam")])
def test_triton_equals_reference_on_cuda(kind, variant):
    model, oto, _ = _setup()
    kw = dict(lr=0.1 if variant == "sgd" else 0.01, variant=variant, first_momentum=0.9 if variant == "sgd" else None)
    # DHSPG: control=False (the sparsity controller's schedule follows the host step counter)
    kw.update(dict(lmbda=0.5, epsilon=0.9, target_group_sparsity=0.5, control=False) if kind == "dhspg"
              else dict(start_pruning_step=1, pruning_steps=6, pruning_periods=2, target_group_sparsity=0.5))
    pair = []
    for backend in ("triton", "torch"):
        m = copy.deepcopy(model).to(DEV)
        cls = otofx.DHSPG if kind == "dhspg" else otofx.HESSO
        pair.append((m, cls(m.named_parameters(), oto.groups, backend=backend, **kw)))
    g = torch.Generator().manual_seed(1)
    for _ in range(12):
        grads = _grads(model, g)
        for m, opt in pair:
            for p, q in zip(m.parameters(), grads):
                p.grad = q.clone()
            opt.step()
    (ma, oa), (mb, ob) = pair
    for a, b in zip(ma.parameters(), mb.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    za, zb = _zero_rows(oa), _zero_rows(ob)
    assert torch.equal(za, zb) and int(zb.sum()) > 0  # not vacuous: rows were zeroed


@pytest.mark.parametrize("variant", ["sgd", "adamw"])
def test_grad_scaler_amp_skips_inf_steps_on_the_device(variant):
    model, oto, x = _setup()
    model.to(DEV)
    x = x.to(DEV)
    y = torch.randint(0, 5, (x.shape[0],), generator=torch.Generator().manual_seed(2)).to(DEV)
    opt = oto.dhspg(lr=0.05 if variant == "sgd" else 1e-3, variant=variant, first_momentum=0.9 if variant == "sgd"
                    else None, lmbda=0.05, epsilon=0.9, start_pruning_steps=1)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 10)
    for i in range(6):
        opt.zero_grad()
        with torch.autocast("cuda", dtype=torch.float16):
            loss = nn.functional.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        if i == 3:  # a steady step (after the partition) with an inf gradient
            model.c2.weight.grad[0, 0, 0, 0] = float("inf")
            before = {k: v.detach().clone() for k, v in model.named_parameters()}
            state = {i: {k: v.clone() for k, v in st.items() if isinstance(v, torch.Tensor)}
                     for i, st in opt.state_dict()["state"].items()}
        scale = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        if i == 3:
            assert scaler.get_scale() < scale
            for k, v in model.named_parameters():
                assert torch.equal(v, before[k]), k
            after = opt.state_dict()["state"]
            for j, st in state.items():
                for k, v in st.items():
                    assert torch.equal(after[j][k], v), (j, k)
    assert opt.step_count == 5 and opt.skipped_steps == 1
    assert opt.redundant is not None
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("kind,variant,control", [("dhspg", "sgd", True), ("dhspg", "sgd", False),
                                                  ("dhspg", "adamw", True), ("hesso", "sgd", None)])
def test_capturable_step_replayed_from_a_cuda_graph_equals_eager(kind, variant, control):
    model, oto, _ = _setup()
    kw = dict(variant=variant, lr=0.05 if variant == "sgd" else 1e-3, capturable=True,
              first_momentum=0.9 if variant == "sgd" else None)
    # HESSO: captured after its pruning window (the window's per-step scale is set by the host)
    # DHSPG with control: the controller's schedule reads the device clock the replay advances
    kw.update(dict(lmbda=0.5, epsilon=0.9, target_group_sparsity=0.5, control=control, pruning_steps=6)
              if kind == "dhspg" else dict(start_pruning_step=0, pruning_steps=2, pruning_periods=1,
                                           target_group_sparsity=0.5))
    cls = otofx.DHSPG if kind == "dhspg" else otofx.HESSO
    runs = []
    for _ in range(2):
        m = copy.deepcopy(model).to(DEV)
        for p in m.parameters():
            p.grad = torch.zeros_like(p)
        runs.append((m, cls(m.named_parameters(), oto.groups, **kw)))
    g = torch.Generator().manual_seed(3)
    warm = [_grads(model, g) for _ in range(4)]
    later = [_grads(model, g) for _ in range(5)]

    def feed(m, grads):
        for p, q in zip(m.parameters(), grads):
            p.grad.copy_(q)

    (me, oe), (mg, og) = runs
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    for grads in warm:  # eager steps (first step, partition / window); the graphed run's on a side stream
        feed(me, grads)
        oe.step()
        with torch.cuda.stream(s):
            feed(mg, grads)
            og.step()
    torch.cuda.current_stream().wait_stream(s)
    # capture one step of the second run (Triton compiled and the kernel caches filled by the warm-up)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        og.step()
    # the capture did not run the step: replay it for every later step, eager steps on the first run
    for grads in later:
        feed(me, grads)
        oe.step()
        feed(mg, grads)
        graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(me.parameters(), mg.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert int((oe.row_stats().xx == 0).sum()) == int((og.row_stats().xx == 0).sum())
    assert float(og.steps_taken) == float(oe.steps_taken)
    if kind == "dhspg":  # the replays advanced the device clock the controller's schedule reads
        assert float(og._clock) == oe.step_count == len(warm) + len(later)


def test_capture_of_an_event_step_is_refused():
    model, oto, _ = _setup()
    m = copy.deepcopy(model).to(DEV)
    for p in m.parameters():
        p.grad = torch.ones_like(p)
    opt = otofx.DHSPG(m.named_parameters(), oto.groups, first_momentum=0.9, capturable=True)
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(otofx.OptimizerError, match="first step"):
        with torch.cuda.graph(graph):
            opt.step()


@pytest.mark.skipif(not _compiled_triton(), reason="needs compiled Triton kernels (run with TRITON_INTERPRET=0)")
@pytest.mark.parametrize("clock", [False, True])
def test_controller_kernels_decide_as_the_torch_ops_on_cuda(clock):
    """The sparsity controller's two Triton kernels (the CUDA path) against its torch ops on the same
    CUDA rows: the same mask and epsilon; the lambda scale to rounding (torch's CUDA division by a
    scalar multiplies by its reciprocal, the kernel divides)."""
    import otofx.sparsity as S

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 1200), nn.ReLU(), nn.Linear(1200, 900), nn.ReLU(), nn.Linear(900, 2)).to(DEV)
    oto = otofx.OTO(m, torch.randn(2, 3, device=DEV))
    opt = oto.dhspg(lr=0.1, target_group_sparsity=0.3, start_pruning_steps=1, pruning_steps=20)
    for _ in range(2):
        for p in m.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
    ctl = opt._control
    g = torch.Generator().manual_seed(3)
    xx = ((torch.randint(1, 200, (ctl.n,), generator=g) / 8.0) ** 2)
    pick = torch.rand(ctl.n, generator=g)
    xx[pick < 0.25] = 0.0
    xx[(pick > 0.5) & (pick < 0.52)] = float("nan")
    xx = xx.to(DEV)
    red = (torch.rand(ctl.n, generator=g) < 0.7).to(DEV)
    t = torch.tensor(9.0, dtype=torch.float64, device=DEV) if clock else 9
    out = []
    for fused in (False, True):
        c = copy.deepcopy(ctl)
        S._fused, saved = (lambda xx, n: fused), S._fused
        try:
            mask, scale, eps = c.decide(t, None, 0.05, red, xx=xx, step=9 if clock else None)
        finally:
            S._fused = saved
        out.append((mask.cpu(), float(scale), float(eps)))
    (ma, sa, ea), (mb, sb, eb) = out
    assert torch.equal(ma, mb) and int(ma.sum()) > 0
    assert ea == eb
    assert abs(sa - sb) <= 1e-5 * abs(sa)
