"""JointRD: shortcut removal, Dirac fold, hybrid-path training, OTO on the plain student, memory."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from helpers import randomize, snapshot
from torch import nn

import otofx
import otofx.jointrd as J
from otofx.errors import InputError
from otofx.passes.jointrd import Dirac, StageError, find_residual_adds

X32 = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------------------------------
# Small models: a timm-style ResNet (in-place add, avg-pool downsample) and a residual MLP
# ---------------------------------------------------------------------------------------------


class TimmBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.act2 = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:  # timm's avg_down: pool -> 1x1 conv -> bn
            self.downsample = nn.Sequential(nn.AvgPool2d(stride, stride) if stride > 1 else nn.Identity(),
                                            nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        shortcut = x
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(x))
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        x += shortcut
        return self.act2(x)


class TimmLikeResNet(nn.Module):
    def __init__(self, widths=(8, 16, 32), blocks=2, num_classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        layers, cin = [], widths[0]
        for i, w in enumerate(widths):
            for b in range(blocks):
                layers.append(TimmBlock(cin, w, 2 if (b == 0 and i > 0) else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1), 1))


class ResMLP(nn.Module):
    """x = x + relu(bn(linear(x))) blocks: adds with no activation after them."""

    def __init__(self, width=16, depth=6, num_classes=5):
        super().__init__()
        self.inp = nn.Linear(8, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU())
                                    for _ in range(depth))
        self.out = nn.Linear(width, num_classes)

    def forward(self, x):
        x = self.inp(x)
        for b in self.blocks:
            x = x + b(x)
        return self.out(x)


def _kinds(model, x):
    # a remove_shortcuts output still has its shapes: read its graph instead of capturing it again
    adds = find_residual_adds(model) if "jointrd" in getattr(model, "meta", {}) else J.residual_adds(model, x)
    return sum(a.kind == "identity" for a in adds), sum(a.kind == "projection" for a in adds)


# ---------------------------------------------------------------------------------------------
# remove_shortcuts
# ---------------------------------------------------------------------------------------------


def _timm_resnet():
    timm = pytest.importorskip("timm")
    return timm.create_model("resnet26d", pretrained=False, num_classes=10)


@pytest.mark.parametrize("build, identity, projections", [
    (lambda: torchvision.models.resnet18(num_classes=10), 5, 3),
    (lambda: torchvision.models.resnet50(num_classes=10), 12, 4),
    (TimmLikeResNet, 4, 2),
    (_timm_resnet, 4, 4),
], ids=["resnet18", "resnet50", "timm_like", "timm_resnet26d"])
def test_remove_shortcuts(build, identity, projections):
    model = randomize(build().eval())
    before = snapshot(model)
    assert _kinds(model, X32) == (identity, projections)
    student = J.remove_shortcuts(model, X32)
    assert isinstance(student, torch.fx.GraphModule)
    assert _kinds(student, X32) == (0, projections)  # the projection adds stay by default
    assert len(student.meta["jointrd"].removed) == identity
    bare = J.remove_shortcuts(model, X32, keep_projections=False)
    assert _kinds(bare, X32) == (0, 0)
    assert not any("downsample" in n for n, _ in bare.named_parameters())  # the projections' modules are gone
    for s in (student, bare):
        y = s(X32)
        assert y.shape == (2, 10) and torch.isfinite(y).all()
        assert not torch.allclose(y, model(X32))  # the function did change
    assert snapshot(model) == before  # the user's model is untouched
    y = model(X32)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    assert torch.equal(model(X32), y)  # the student's weights are copies


def test_identity_add_is_the_branch():
    """Removing x + f(x) leaves exactly f(x): the plain net equals the ResNet with skips zeroed."""
    model = randomize(ResMLP().eval())
    x = torch.randn(4, 8)
    student = J.remove_shortcuts(model, x)
    h = model.inp(x)
    for b in model.blocks:
        h = b(h)
    torch.testing.assert_close(student(x), model.out(h))


def test_non_residual_adds_stay():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
            self.bias = nn.Parameter(torch.randn(4))

        def forward(self, x, y):
            # alpha 2, a broadcast bias, two branches of different inputs
            return torch.add(self.a(x), self.b(x), alpha=2) + self.bias + self.a(y)

    x, y = torch.randn(2, 4), torch.randn(2, 4)
    assert J.residual_adds(Net(), (x, y)) == ()


# ---------------------------------------------------------------------------------------------
# Dirac
# ---------------------------------------------------------------------------------------------


def test_dirac_fold_is_exact():
    model = randomize(TimmLikeResNet().eval())
    student = J.remove_shortcuts(model, X32, dirac=True)
    names = student.meta["jointrd"].dirac
    # the 3x3 convs with equal widths: 2 per stage-1 block, then the second conv of each block and
    # both convs of the stages' second blocks
    assert len(names) == 4 + 3 + 3 and "layers.0.conv1.weight" in names
    with torch.no_grad():
        for m in student.modules():
            if isinstance(m, Dirac):
                m.alpha.uniform_(0.5, 1.5)
                m.beta.uniform_(-0.5, 0.5)
    student.eval()
    y = student(X32)
    folded = J.fold_dirac(student)
    assert not any(torch.nn.utils.parametrize.is_parametrized(m) for m in folded.modules())
    assert type(folded.get_submodule("layers.0.conv1")) is nn.Conv2d
    assert (folded(X32) - y).abs().max().item() < 1e-5
    assert torch.equal(student(X32), y)  # folding a copy leaves the parametrised student working
    # the parametrisation is alpha * delta + beta * V
    conv = student.get_submodule("layers.0.conv1")
    d = conv.parametrizations.weight[0]
    v = conv.parametrizations.weight.original
    expect = d.alpha.view(-1, 1, 1, 1) * nn.init.dirac_(torch.empty_like(v)) + d.beta.view(-1, 1, 1, 1) * v
    torch.testing.assert_close(folded.get_submodule("layers.0.conv1").weight, expect)


def test_dirac_on_square_linear():
    student = J.remove_shortcuts(ResMLP().eval(), torch.randn(4, 8), dirac=True)
    assert len(student.meta["jointrd"].dirac) == 6  # the block linears (width -> width), not inp/out


# ---------------------------------------------------------------------------------------------
# JointRD training
# ---------------------------------------------------------------------------------------------


def _pair(seed=0):
    torch.manual_seed(seed)
    teacher = randomize(TimmLikeResNet().eval())
    student = J.remove_shortcuts(teacher, X32, dirac=True)
    return teacher, student


def test_boundaries_and_hybrid_gradients():
    teacher, student = _pair()
    jrd = J.JointRD(student, teacher)
    # the stream widens after stage 1 and stage 2: the inputs of the blocks that widen it
    assert jrd.boundaries == ("layers_1_act2", "layers_3_act2")
    assert jrd.student_boundaries == jrd.boundaries
    y = torch.tensor([1, 2])
    terms = jrd(X32, y)
    assert len(terms.hybrid_ce) == 2 and terms.feature is not None
    sum(terms.hybrid_ce).backward()
    stem = student.get_submodule("stem.0").weight.grad
    assert stem is not None and stem.abs().sum() > 0  # the hybrid paths reach the student's first stage
    late = student.get_submodule("layers.5.conv2").parametrizations.weight.original.grad
    assert late is None or late.abs().sum() == 0  # ... and not its last stage (after every boundary)
    assert all(p.grad is None for p in jrd.teacher.parameters())


def test_teacher_frozen_and_user_models_untouched():
    teacher, student = _pair()
    t_before = snapshot(teacher)
    jrd = J.JointRD(student, teacher, decay_steps=4).train()
    jt_before = snapshot(jrd.teacher)
    s_before = snapshot(student)
    opt = torch.optim.SGD(jrd.parameters(), lr=0.05, momentum=0.9)
    y = torch.tensor([1, 2])
    ms = []
    for _ in range(3):
        terms = jrd(X32, y)
        ms.append(terms.m)
        opt.zero_grad()
        terms.total.backward()
        opt.step()
    assert snapshot(teacher) == t_before
    assert snapshot(jrd.teacher) == jt_before  # frozen: weights, BN statistics and eval mode
    assert snapshot(student) != s_before  # the student trains in place
    assert ms[0] == 1.0 and ms[0] > ms[1] > ms[2] >= 0.5  # cosine decay of the hybrid weight


def test_modes():
    teacher, student = _pair()
    y = torch.tensor([1, 2])
    released = J.JointRD(student, teacher, mode="released")
    t = released(X32, y)
    assert t.hybrid_ce == () and t.teacher_ce is None
    torch.testing.assert_close(t.total, t.student_ce + 1e-3 * t.feature)
    joint = J.JointRD(student, teacher, mode="joint").train()
    before = snapshot(joint.teacher)
    t = joint(X32, y)
    assert len(t.hybrid_ce) == 2 and t.teacher_ce is not None
    torch.testing.assert_close(t.total, (t.student_ce + sum(t.hybrid_ce) + 1e-3 * t.feature) / 3 + t.teacher_ce)
    opt = torch.optim.SGD(joint.parameters(), lr=0.05)
    opt.zero_grad()
    sum(t.hybrid_ce).backward(retain_graph=True)
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in joint.teacher.parameters())  # hybrids: student only
    opt.zero_grad()
    t.total.backward()
    opt.step()
    assert snapshot(joint.teacher) != before  # trained jointly
    assert snapshot(teacher) != () and snapshot(teacher) == snapshot(_pair()[0])  # the user's teacher is not


def test_residual_mlp_boundaries_fall_back_to_equal_runs():
    torch.manual_seed(0)
    teacher = ResMLP(depth=8).eval()
    x = torch.randn(4, 8)
    student = J.remove_shortcuts(teacher, x)
    jrd = J.JointRD(student, teacher, decay_steps=10)
    assert len(jrd.boundaries) == 3  # a constant-width stream: 4 equal runs of blocks
    # the boundaries are adds the student no longer has: matched through the removal record
    assert all(b.startswith("add") for b in jrd.boundaries)
    assert all(not s.startswith("add") for s in jrd.student_boundaries)
    terms = jrd(x, torch.tensor([0, 1, 2, 3]))
    assert len(terms.hybrid_ce) == 3
    terms.total.backward()


def test_dirac_mlp_student_trains_in_jointrd_and_exports_folded():
    # the bench's MLP setting: a Dirac-parametrised plain residual MLP, paper loss
    torch.manual_seed(0)
    teacher = randomize(ResMLP(depth=8)).eval()
    x, y = torch.randn(16, 8), torch.randint(0, 5, (16,))
    student = J.remove_shortcuts(teacher, x, dirac=True)
    jrd = J.JointRD(student, teacher, decay_steps=4).train()
    terms = jrd(x, y)
    assert len(terms.hybrid_ce) == 3
    sum(terms.hybrid_ce).backward()
    first = student.get_submodule("blocks.0.0").parametrizations.weight
    assert first.original.grad.abs().sum() > 0  # the hybrid paths reach the first block's V ...
    assert first[0].alpha.grad.abs().sum() > 0 and first[0].beta.grad.abs().sum() > 0  # ... and alpha, beta
    opt = torch.optim.SGD([p for p in jrd.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    for _ in range(3):
        opt.zero_grad()
        jrd.loss(x, y).backward()
        opt.step()
    assert (first[0].alpha != 1).any()  # alpha trains
    plain = jrd.export().eval()
    student.eval()
    assert not any(torch.nn.utils.parametrize.is_parametrized(m) for m in plain.modules())
    assert type(plain.get_submodule("blocks.0.0")) is nn.Linear
    assert _kinds(plain, x) == (0, 0)
    assert (plain(x) - student(x)).abs().max().item() < 1e-5


def test_bad_arguments():
    teacher, student = _pair()
    with pytest.raises(InputError, match="mode="):
        J.JointRD(student, teacher, mode="nope")
    with pytest.raises(StageError, match="not_a_node"):
        J.JointRD(student, teacher, boundaries=["not_a_node"])
    with pytest.raises(InputError, match="example_inputs"):
        J.JointRD(TimmLikeResNet(), teacher)


# ---------------------------------------------------------------------------------------------
# The exported student: plain, an OTO input, less activation memory
# ---------------------------------------------------------------------------------------------


def test_export_is_plain_and_prunes_in_smaller_groups():
    teacher, student = _pair()
    jrd = J.JointRD(student, teacher)
    plain = jrd.export()
    assert _kinds(plain, X32)[0] == 0
    assert not any(torch.nn.utils.parametrize.is_parametrized(m) for m in plain.modules())
    assert "jointrd" not in plain.meta
    res, pl = otofx.OTO(teacher, X32[:1]), otofx.OTO(plain, X32[:1])
    assert len(pl.groups) > len(res.groups)
    assert max(len(z.layers) for z in pl.groups) < max(len(z.layers) for z in res.groups)
    # and it compresses exactly like any model
    zeroed = randomize(plain).eval()
    params = dict(zeroed.named_parameters())
    with torch.no_grad():
        for zig in pl.groups:
            for name, dim, index in zig.params:
                params[name].movedim(dim, 0)[index[: zig.rows // 2].reshape(-1)] = 0
    small = pl.compress()
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in zeroed.parameters())


def test_plain_student_needs_less_activation_memory():
    teacher = TimmLikeResNet().eval()
    plain = J.remove_shortcuts(teacher, X32)
    x = torch.randn(1, 3, 32, 32)
    r, p = J.peak_activation_memory(teacher, x), J.peak_activation_memory(plain, x)
    assert r.method == p.method == "dispatch"
    # stage 1 (8 x 32 x 32 floats = 32 KiB a tensor): the ResNet holds the block input, conv1's and
    # bn1's outputs; the plain net two of those
    assert r.peak_bytes == 3 * 8 * 32 * 32 * 4
    assert p.peak_bytes == 2 * 8 * 32 * 32 * 4
    assert r.output_bytes == p.output_bytes == 10 * 4


# ---------------------------------------------------------------------------------------------
# Audit fixes: arithmetic adds, modes, drop-path, measurement mode, dtype, tails, arguments
# ---------------------------------------------------------------------------------------------


class TanhGELU(nn.Module):
    """GPT-2's ``gelu_new``: its ``x + 0.044715 * x**3`` is x + f(x) with no layer in f."""

    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(0.7978845608 * (x + 0.044715 * torch.pow(x, 3.0))))


class GeluNet(nn.Module):
    def __init__(self, residual: bool):
        super().__init__()
        self.residual = residual
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.act, self.fc = TanhGELU(), nn.Linear(8, 4)

    def forward(self, x):
        h = self.act(self.c1(x))
        h = h + self.act(self.c2(h)) if self.residual else self.act(self.c2(h))
        return self.fc(h.mean((2, 3)))


def test_arithmetic_add_is_not_a_residual_add():
    x = torch.randn(2, 3, 8, 8)
    plain = GeluNet(residual=False).eval()
    assert J.residual_adds(plain, x) == ()
    student = J.remove_shortcuts(plain, x).eval()
    with torch.no_grad():
        assert torch.equal(student(x), plain(x))  # nothing to remove: the function is the model's
    # the one real block is still found, and only it (its branch holds a conv)
    adds = J.residual_adds(GeluNet(residual=True).eval(), x)
    assert [a.kind for a in adds] == ["identity"]


def test_student_trains_whatever_mode_it_was_made_in():
    teacher, student = _pair()  # an eval-mode teacher gives an eval-mode student
    assert not student.training
    jrd = J.JointRD(student, teacher)
    assert jrd.training and all(m.training for m in jrd.student.modules())
    assert not any(m.training for m in jrd.teacher.modules())  # frozen: eval
    bn = student.get_submodule("stem.1")
    before = bn.running_mean.clone()
    jrd(X32, torch.tensor([1, 2]))
    assert not torch.equal(bn.running_mean, before)  # batch statistics, as in training
    joint = J.JointRD(J.remove_shortcuts(teacher, X32), teacher, mode="joint")
    assert all(m.training for m in joint.student.modules()) and all(m.training for m in joint.teacher.modules())
    jrd.eval()
    assert not any(m.training for m in jrd.student.modules())


class DropPath(nn.Module):
    """A hand-written drop-path (timm's, traced through: ``x * bernoulli mask / keep``)."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class DropMLP(nn.Module):
    """Residual blocks ending in stochastic depth: torchvision's module (a graph node), its function and
    a hand-written module (traced into ``x * mask`` ops)."""

    def __init__(self, width=8, p=0.9):
        super().__init__()
        self.inp, self.out = nn.Linear(8, width), nn.Linear(width, 3)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(3))
        self.drops = nn.ModuleList([torchvision.ops.StochasticDepth(p, "row"), nn.Identity(), DropPath(p)])
        self.p = p

    def forward(self, x):
        x = self.inp(x)
        for i, (b, d) in enumerate(zip(self.blocks, self.drops)):
            h = torchvision.ops.stochastic_depth(b(x), self.p, "row", self.training) if i == 1 else d(b(x))
            x = x + h
        return self.out(x)


def test_drop_path_leaves_the_plain_student():
    torch.manual_seed(0)
    model = DropMLP().train()
    x = torch.randn(16, 8)
    student = J.remove_shortcuts(model, x)
    record = student.meta["jointrd"]
    assert len(record.removed) == 3 and len(record.dropped) == 3
    assert not any(type(m).__name__ in ("StochasticDepth", "DropPath") for m in student.modules())
    assert not any("bernoulli" in str(n.target) for n in student.graph.nodes)  # the masks are gone too
    student.train()
    h = model.inp(x)
    for b in model.blocks:
        h = b(h)
    # in training too, every sample's logits are the plain stack's (no block, so no stream, dropped)
    torch.testing.assert_close(student(x), model.out(h))
    # NB: an eval-mode trace drops the functional forms itself; the module stays a node, and goes
    model.eval()
    student = J.remove_shortcuts(model, x)
    assert student.meta["jointrd"].dropped == ("drops_0",)
    jrd = J.JointRD(student, model, stages=3, feature_loss="mse")  # boundaries resolve past it
    assert len(jrd(x, torch.zeros(16, dtype=torch.long)).hybrid_ce) == 2


def test_peak_memory_is_measured_in_eval_mode_with_plain_weights():
    torch.manual_seed(0)
    x = torch.randn(4, 8)
    model = ResMLP().train()
    for b in model.blocks:
        b.append(nn.Dropout(0.5))
    ref = J.peak_activation_memory(model.eval(), x)
    model.train()
    stats = snapshot(model)
    assert J.peak_activation_memory(model, x) == ref  # no batch statistics nor dropout masks
    assert model.training and all(m.training for m in model.modules())  # flags restored
    assert snapshot(model) == stats  # running statistics untouched
    student = J.remove_shortcuts(model, x, dirac=True)
    assert J.peak_activation_memory(student, x) == J.peak_activation_memory(J.fold_dirac(student), x)


def test_connector_follows_the_students_dtype():
    teacher = TimmLikeResNet(widths=(4, 8), blocks=1).eval().to(torch.bfloat16)
    x = X32.to(torch.bfloat16)
    jrd = J.JointRD(J.remove_shortcuts(teacher, x), teacher)
    assert {p.dtype for p in jrd.connector.parameters()} == {torch.bfloat16}
    assert jrd(x, torch.tensor([1, 2])).total.dtype == torch.bfloat16


def test_tail_carries_inputs_that_do_not_feed_the_cut():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    teacher = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=32, patch_size=8,
                                depth=4, embed_dim=32, num_heads=2).eval()
    student = J.remove_shortcuts(teacher, X32)
    # attn_mask=None and is_causal=False are graph inputs every block reads
    assert [n.name for n in student.graph.nodes if n.op == "placeholder"] == ["x", "attn_mask", "is_causal"]
    jrd = J.JointRD(student, teacher)
    assert len(jrd.boundaries) == 3
    terms = jrd(X32, torch.tensor([1, 2]))
    assert len(terms.hybrid_ce) == 3
    terms.total.backward()


def test_tail_reads_sizes_of_the_input_not_its_values():
    from otofx.passes.jointrd import tail

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    net = Net()
    g = torch.fx.Graph()
    x = g.placeholder("x")
    h = g.call_module("a", (x,))
    n = g.call_function(torch.ops.aten.sym_size.int, (x, 0))  # torch.export's batch size, as in a Swin
    out = g.call_function(torch.reshape, (g.call_module("b", (h,)), (n, -1)))
    g.output(out)
    gm = torch.fx.GraphModule(net, g)
    t = tail(gm, h.name)
    assert t.meta["tail_inputs"] == ("x",)
    xv = torch.randn(3, 4)
    torch.testing.assert_close(t(net.a(xv), x=xv), gm(xv))
    # reading x's values past the cut is no cut: the error says what to do
    g2 = torch.fx.Graph()
    x2 = g2.placeholder("x")
    h2 = g2.call_module("a", (x2,))
    g2.output(g2.call_function(torch.add, (g2.call_module("b", (h2,)), x2)))
    with pytest.raises(StageError, match="boundaries=.*hybrid=False"):
        tail(torch.fx.GraphModule(net, g2), h2.name)


@pytest.mark.parametrize("kwargs, match", [
    (dict(teacher=None), "teacher must be a torch.nn.Module"),
    (dict(student=None), "student must be a torch.nn.Module"),
    (dict(dc=2.0), "dc=2.0: .*from 0 to 1"),
    (dict(dis_weight=-1), "dis_weight=-1: .*>= 0"),
    (dict(stages=0), "stages=0: .*>= 1"),
    (dict(boundaries=0), "boundaries=0: .*integer >= 1"),
    (dict(boundaries="layers_1_act2"), "boundaries='layers_1_act2': .*list of str"),
    (dict(decay_steps=0), "decay_steps=0"),
], ids=["teacher", "student", "dc", "dis_weight", "stages", "boundaries_int", "boundaries_str", "decay_steps"])
def test_bad_jointrd_arguments(kwargs, match):
    teacher, student = _pair()
    args = dict(student=student, teacher=teacher)
    args.update(kwargs)
    with pytest.raises(InputError, match=match):
        J.JointRD(**args)
