"""SCOP (otofx.scop, otofx.passes.scop): the selection pass, knockoffs, scores and prune_lowest.

Tiny nets and few steps: a residual conv net (rows tied across two convs by an add) for the pass and
the pruning path; a small conv net trained for a few dozen steps on a synthetic task for the planted
redundancy check.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import otofx
from otofx.errors import InputError
from otofx.passes.scop import SelectionLayer, insert_selection
from otofx.scop import GaussianKnockoffs, choose_rows, finetune, scores, train_betas

from helpers import n_params, randomize, snapshot

pytestmark = pytest.mark.usefixtures("single_thread")


class ResNetish(nn.Module):
    """stem conv -> block (two convs, BN) added back to the stem's output -> conv -> GAP -> linear."""

    def __init__(self, c=6, d=5, classes=3):
        super().__init__()
        self.stem = nn.Conv2d(2, c, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(c)
        self.conv1 = nn.Conv2d(c, d, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(d)
        self.conv2 = nn.Conv2d(d, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, 4, 1)
        self.head = nn.Linear(4, classes)

    def forward(self, x):
        s = torch.relu(self.bn0(self.stem(x)))
        h = torch.relu(self.bn1(self.conv1(s)))
        s = torch.relu(s + self.bn2(self.conv2(h)))
        return self.head(torch.relu(self.conv3(s)).mean((2, 3)))


def _model(seed=0):
    torch.manual_seed(seed)
    return randomize(ResNetish(), seed).eval()


def _loader(n=48, batch=8, seed=0, shape=(2, 6, 6), classes=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]


def test_selection_pass_is_identity_at_beta_one_and_knockoff_at_zero():
    model = _model()
    before = snapshot(model)
    x = torch.randn(4, 2, 6, 6)
    xk = torch.randn(4, 2, 6, 6)
    oto = otofx.OTO(model, x[:1])
    sel = insert_selection(oto.graph_module, oto.zigset)
    layers = [m for m in sel.gm.modules() if isinstance(m, SelectionLayer)]
    assert len(layers) == 4  # stem, conv1, conv2, conv3: every producer of a group
    # the residual group's rows have one beta, used at both of its producers (stem and conv2)
    by_name = dict(sel.producers)
    assert by_name["stem"] == by_name["conv2"]
    assert sel.gm.scop_beta.numel() == sum(z.rows for z in oto.groups)
    # row r of group z scales the channel that z.params lists for row r, at each of its producers
    mods = dict(sel.gm.named_modules())
    checked = 0
    for node in sel.gm.graph.nodes:
        if node.op == "call_module" and isinstance(mods[node.target], SelectionLayer):
            for zi, z in enumerate(oto.groups):
                for name, dim, index in z.params:
                    if name == f"{node.args[0].target}.weight" and dim == 0:
                        want = sel.offsets[zi] + torch.arange(z.rows)
                        assert torch.equal(mods[node.target].gather[index[:, 0]], want)
                        checked += 1
    assert checked == 4
    with torch.no_grad():
        ref, ref_k = model(x), model(xk)
        sel.gm.scop_beta.fill_(1.0)
        out = sel.gm(torch.cat([x, xk]))
        assert torch.allclose(out[:4], ref, atol=1e-5) and torch.allclose(out[4:], ref_k, atol=1e-5)
        sel.gm.scop_beta.fill_(0.0)
        out = sel.gm(torch.cat([x, xk]))
        assert torch.allclose(out[:4], ref_k, atol=1e-5)  # every channel of the real half replaced
        sel.gm.scop_beta.fill_(0.5)
        assert not torch.allclose(sel.gm(torch.cat([x, xk]))[:4], ref, atol=1e-3)
    assert snapshot(model) == before


class MatmulNet(nn.Module):
    """A producer written as ``x @ w.t()``: the transpose of a parameter is no producer, the matmul is."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(6, 4))
        self.bn = nn.BatchNorm1d(6)
        self.l2 = nn.Linear(6, 3)

    def forward(self, x):
        return self.l2(torch.relu(self.bn(x @ self.w1.t())))


def test_selection_pass_finds_a_producer_behind_a_transposed_parameter():
    model = randomize(MatmulNet()).eval()
    x, xk = torch.randn(3, 4), torch.randn(3, 4)
    oto = otofx.OTO(model, x)
    sel = insert_selection(oto.graph_module, oto.zigset)
    assert [name for name, _ in sel.producers] == ["matmul"]
    with torch.no_grad():
        sel.gm.scop_beta.fill_(1.0)
        assert torch.allclose(sel.gm(torch.cat([x, xk]))[:3], model(x), atol=1e-5)
    with pytest.raises(InputError, match="no prunable groups"):
        train_betas(otofx.OTO(nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 2)).eval(), x), [(x, torch.zeros(3).long())])


def test_scores_have_one_value_per_row_and_model_is_untouched():
    model = _model()
    before = snapshot(model)
    oto = otofx.OTO(model, torch.randn(1, 2, 6, 6))
    loader = _loader()
    result = train_betas(oto, loader, knockoff="permute", epochs=2, max_steps=4)
    for got in (result.scores, result.betas, result.gammas, oto.scop(loader, knockoff="gaussian", max_steps=2),
                scores.l1(oto), scores.bn_gamma(oto), scores.random(oto, 1)):
        assert [tuple(s.shape) for s in got] == [(z.rows,) for z in oto.groups]
    b = torch.cat(result.betas)
    assert bool(((b >= 0) & (b <= 1)).all()) and not bool((b == 0.5).all())  # trained and clamped
    for s, g, bt in zip(result.scores, result.gammas, result.betas):
        assert torch.allclose(s, g * (2 * bt - 1), atol=1e-6)
    # the user's callable knockoff is used as given
    calls = []
    oto.scop(loader, knockoff=lambda x: calls.append(x.shape) or -x, max_steps=2)
    assert calls == [(8, 2, 6, 6)] * 2
    assert snapshot(model) == before


def test_gaussian_knockoffs_have_the_exchangeability_covariance():
    g = torch.Generator().manual_seed(0)
    d = 5
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    sigma = a @ a.T / d + 0.5 * torch.eye(d, dtype=torch.float64)
    scale = torch.linspace(0.5, 3, d, dtype=torch.float64)
    x = (torch.randn(60000, d, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(sigma).T) * scale + 2.0
    loader = [(x[i:i + 5000].float(), None) for i in range(0, len(x), 5000)]
    ko = GaussianKnockoffs.fit(loader, group="feature", max_samples=60000, shrinkage=0.0)
    (blk,) = ko.blocks
    corr = torch.corrcoef(x.T)
    assert blk.s == pytest.approx(min(1.0, 2 * float(torch.linalg.eigvalsh(corr)[0])), rel=1e-2)
    xk = ko(x.float(), generator=g).double()
    z = (x - x.mean(0)) / x.std(0)
    zk = (xk - x.mean(0)) / x.std(0)
    joint = torch.cov(torch.cat([z, zk], 1).T)
    s_mat = blk.s * torch.eye(d, dtype=torch.float64)
    want = torch.cat([torch.cat([corr, corr - s_mat], 1), torch.cat([corr - s_mat, corr], 1)])
    assert (joint - want).abs().max() < 0.03
    # without the (Sigma - D) off-diagonal the check fails: the knockoff is not just a fresh sample
    assert (torch.cov(torch.cat([z, zk], 1).T)[:d, d:] - corr).abs().max() > 0.1


def _correlated(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    sigma = a @ a.T / d + 0.3 * torch.eye(d, dtype=torch.float64)
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(sigma).T, g


def _joint(ko, x, g):
    xk = ko(x.float(), generator=g).double()
    z, zk = (x - x.mean(0)) / x.std(0), (xk - x.mean(0)) / x.std(0)
    return torch.cov(torch.cat([z, zk], 1).T), torch.corrcoef(x.T)


def test_group_knockoffs_have_the_group_exchangeability_covariance():
    """group="input" is an independent draw (S = Sigma); patch groups: S = gamma * blockdiag(Sigma_gg)."""
    d = 6
    x, g = _correlated(60000, d, 2)
    loader = [(x[i:i + 6000].float(), None) for i in range(0, len(x), 6000)]
    whole = GaussianKnockoffs.fit(loader, max_samples=60000, shrinkage=0.0)  # the default: group="input"
    assert whole.s == (1.0,)
    joint, corr = _joint(whole, x, g)
    assert joint[:d, d:].abs().max() < 0.03 and (joint[d:, d:] - corr).abs().max() < 0.03  # independent, same law
    pairs = GaussianKnockoffs.fit(loader, group=2, max_samples=60000, shrinkage=0.0)  # features (0,1), (2,3), (4,5)
    (blk,) = pairs.blocks
    assert [g_.tolist() for g_ in blk.groups] == [[0, 1], [2, 3], [4, 5]]
    b = torch.block_diag(*[corr[2 * i:2 * i + 2, 2 * i:2 * i + 2] for i in range(3)])
    w, u = torch.linalg.eigh(b)
    bmh = (u * w.rsqrt()) @ u.T
    gamma = min(1.0, 2 * float(torch.linalg.eigvalsh(bmh @ corr @ bmh)[0]))
    assert 0.05 < blk.s < 1 and blk.s == pytest.approx(gamma, rel=2e-2)
    joint, corr = _joint(pairs, x, g)
    s_mat = blk.s * b
    want = torch.cat([torch.cat([corr, corr - s_mat], 1), torch.cat([corr - s_mat, corr], 1)])
    assert (joint - want).abs().max() < 0.03
    # the within-group cross-covariance is not the per-feature one: the groups are used
    assert (joint[:d, d:] - (corr - blk.s * torch.eye(d, dtype=torch.float64))).abs().max() > 0.05
    with pytest.raises(InputError, match="group"):
        GaussianKnockoffs.fit(loader, group="pixels")


def _one_step_gradient(oto, x, y, xk):
    sel = insert_selection(oto._sync(), oto.zigset, init=0.5)
    for m in sel.gm.modules():
        m.training = True
    loss = torch.nn.functional.cross_entropy(sel.gm(torch.cat([x, xk]))[: len(x)], y)
    (grad,) = torch.autograd.grad(loss, [sel.gm.scop_beta])
    return grad


def test_beta_optimizers_sgd_moves_by_the_gradient_adam_by_its_sign(caplog):
    model = _model()
    oto = otofx.OTO(model, torch.randn(1, 2, 6, 6))
    loader = _loader()
    x, y = loader[0]
    grad = _one_step_gradient(oto, x, y, -x)
    assert bool((grad != 0).all())
    sgd = train_betas(oto, loader, knockoff=lambda t: -t, lr=0.01, max_steps=1)  # the default: optimizer="sgd"
    assert torch.allclose(torch.cat(sgd.betas), 0.5 - 0.01 * grad, atol=1e-6)
    assert sgd.saturated == 0
    adam = train_betas(oto, loader, knockoff=lambda t: -t, lr=0.01, optimizer="adam", max_steps=1)
    assert torch.allclose(torch.cat(adam.betas), 0.5 - 0.01 * grad.sign(), atol=1e-4)
    with caplog.at_level("WARNING", logger="otofx"):
        big = train_betas(oto, loader, knockoff=lambda t: -t, lr=1.0, optimizer="adam", max_steps=1)
    assert big.saturated == grad.numel() and "ended at 0 or 1" in caplog.text
    with pytest.raises(InputError, match="optimizer"):
        train_betas(oto, loader, optimizer="lbfgs")


def test_sgd_lr_is_a_cosine_over_the_steps():
    """SGD's learning rate follows lr * (1 + cos(pi t / T)) / 2 over T = epochs x batches, whatever the
    losses are (a running loss sum once stood in for T)."""
    from otofx.scop import select

    oto = otofx.OTO(_model(), torch.randn(1, 2, 6, 6))
    loader = _loader()  # 6 batches
    seen = []
    real = select._set_lr

    def record(opt, lr, t, total):
        seen.append((t, total))
        real(opt, lr, t, total)

    import unittest.mock as mock

    with mock.patch.object(select, "_set_lr", record):
        train_betas(oto, loader, knockoff=lambda t: -t, lr=0.01, epochs=2)
    assert seen == [(t, 12) for t in range(12)]


def _doubled_outputs_model():
    class TwoHeads(nn.Module):  # a dict and a tuple out, as a language model's outputs
        def __init__(self):
            super().__init__()
            self.body, self.a, self.b = nn.Linear(5, 8), nn.Linear(8, 3), nn.Linear(8, 2)

        def forward(self, x):
            h = torch.relu(self.body(x))
            return {"logits": self.a(h), "extra": (self.b(h), 7)}

    torch.manual_seed(0)
    return TwoHeads().eval()


def test_outputs_of_any_structure_are_cut_to_the_real_half():
    """The real and knockoff halves run as one batch; every tensor of the outputs (a dict, a tuple)
    is cut to the real half before loss_fn sees it."""
    m = _doubled_outputs_model()
    oto = otofx.OTO(m, torch.randn(2, 5))
    g = torch.Generator().manual_seed(0)
    loader = [(torch.randn(4, 5, generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(2)]
    shapes = []

    def loss_fn(out, y):
        shapes.append((tuple(out["logits"].shape), tuple(out["extra"][0].shape), out["extra"][1]))
        return torch.nn.functional.cross_entropy(out["logits"], y)

    res = train_betas(oto, loader, knockoff="permute", lr=0.01, epochs=1, loss_fn=loss_fn)
    assert shapes == [((4, 3), (4, 2), 7)] * 2 and len(res.scores) == len(oto.groups)


def test_gaussian_knockoffs_of_large_inputs_use_tiles_and_keep_constants():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3000, 2, 4, 4, generator=g)
    x[:, :, 0, 0] = 0.25  # constant pixels are their own knockoff
    loader = [(x[i:i + 500], None) for i in range(0, 3000, 500)]
    ko = GaussianKnockoffs.fit(loader, max_dim=16, block_dim=8)
    assert len(ko.blocks) == 4 and max(len(b.index) for b in ko.blocks) <= 8
    xk = ko(x[:100], generator=g)
    assert xk.shape == (100, 2, 4, 4)
    assert torch.equal(xk[:, :, 0, 0], x[:100, :, 0, 0])
    assert not torch.allclose(xk, x[:100])


def test_prune_lowest_keeps_the_requested_rows_and_runs():
    model = _model()
    before = snapshot(model)
    x = torch.randn(1, 2, 6, 6)
    oto = otofx.OTO(model, x)
    rows = [z.rows for z in oto.groups]
    # scores = row index: the lowest floor(rows / 2) rows of every group go
    small = oto.prune_lowest([torch.arange(r, dtype=torch.float32) for r in rows], ratio=0.5)
    widths = {m: getattr(small, m).out_channels for m in ("stem", "conv1", "conv2", "conv3")}
    want = {z.layers[0]: r - math.floor(r / 2) for z, r in zip(oto.groups, rows)}
    assert widths["stem"] == widths["conv2"] == want["stem"]
    assert widths["conv1"] == want["conv1"] and widths["conv3"] == want["conv3"]
    assert torch.equal(small.conv1.weight, model.conv1.weight[math.floor(model.conv1.out_channels / 2):][:, 3:])
    assert n_params(small) < n_params(model)
    assert small(torch.randn(3, 2, 6, 6)).shape == (3, 3)
    # globally: floor(ratio * all rows) rows, from whichever groups score lowest
    sc = [torch.full((r,), float(i)) for i, r in enumerate(rows)]
    picked = choose_rows(oto, sc, 0.4, per_group=False)
    assert sum(len(p) for p in picked) == math.floor(0.4 * sum(rows))
    assert len(picked[0]) == rows[0] and len(picked[-1]) == 0
    # BN re-estimation on a loader changes the pruned model's statistics, not the user's
    small2 = oto.prune_lowest(scores.random(oto, 0), ratio=0.5, loader=_loader(), bn_batches=3)
    assert not torch.allclose(small2.bn1.running_mean, model.bn1.running_mean[: small2.bn1.num_features])
    assert snapshot(model) == before


def test_prune_lowest_rejects_bad_scores():
    oto = otofx.OTO(_model(), torch.randn(1, 2, 6, 6))
    with pytest.raises(InputError, match="score tensors"):
        oto.prune_lowest([torch.zeros(3)])
    with pytest.raises(InputError, match=r"scores\[0\]"):
        oto.prune_lowest([torch.zeros(z.rows + 1) for z in oto.groups])
    with pytest.raises(InputError, match="ratio"):
        oto.prune_lowest(scores.l1(oto), ratio=1.0)
    with pytest.raises(InputError, match="knockoff"):
        oto.scop(_loader(), knockoff="gan")


class Small(nn.Module):
    def __init__(self, c=8, classes=4):
        super().__init__()
        self.conv1 = nn.Conv2d(1, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.head(x.mean((2, 3)))


def _quadrants(n, g):
    x = torch.randn(n, 1, 8, 8, generator=g)
    q = torch.stack([x[:, 0, :4, :4].sum((1, 2)), x[:, 0, :4, 4:].sum((1, 2)), x[:, 0, 4:, :4].sum((1, 2)),
                     x[:, 0, 4:, 4:].sum((1, 2))], 1)
    return x, q.argmax(1)


def test_planted_copies_score_lowest():
    """Channels that copy others' filters (plus noise) but feed nothing score lowest; L1 and |gamma| miss them."""
    g = torch.Generator().manual_seed(0)
    x, y = _quadrants(1024, g)
    loader = [(x[i:i + 64], y[i:i + 64]) for i in range(0, len(x), 64)]
    torch.manual_seed(0)
    net = Small()
    finetune(net, loader, epochs=6, lr=0.05)
    k = 4
    planted = Small(c=8 + k)
    with torch.no_grad():
        src = torch.arange(k)
        planted.conv1.weight.copy_(torch.cat([net.conv1.weight, net.conv1.weight[src] * 1.5
                                              + 0.05 * torch.randn(k, 1, 3, 3, generator=g)]))
        for name in ("weight", "bias", "running_mean", "running_var"):
            t = getattr(net.bn1, name)
            getattr(planted.bn1, name).copy_(torch.cat([t, t[src]]))
        planted.conv2.weight.copy_(torch.cat([net.conv2.weight, torch.zeros(8, k, 3, 3)], 1))
        planted.bn2.load_state_dict(net.bn2.state_dict())
        planted.head.load_state_dict(net.head.state_dict())
    planted.eval()
    with torch.no_grad():
        assert torch.allclose(planted(x[:64]), net.eval()(x[:64]), atol=1e-5)  # same function
    oto = otofx.OTO(planted, x[:1])
    (zi,) = [i for i, z in enumerate(oto.groups) if z.rows == 8 + k]
    want = set(range(8, 8 + k))

    def precision(sc):
        return len(set(torch.argsort(sc[zi], stable=True)[:k].tolist()) & want) / k

    scop = oto.scop(loader, knockoff="permute", epochs=3)
    assert precision(scop) >= 0.75
    assert precision(scores.l1(oto)) <= 0.25 and precision(scores.bn_gamma(oto)) <= 0.25


def test_cli_demo_scop_prints_the_comparison(capsys):
    pytest.importorskip("sklearn")
    from otofx import cli

    rc = cli.main(["demo", "--method", "scop", "--epochs", "1", "--max-steps", "3", "--scop-epochs", "1",
                   "--finetune-epochs", "1", "--latency-runs", "2", "--knockoff", "permute", "-q"])
    out = capsys.readouterr().out
    assert rc == 0
    for name in ("dense", "SCOP (permute)", "L1", "random", "acc fine-tuned"):
        assert name in out


def test_scop_on_a_language_model_keeps_its_class_and_generates():
    """SCOP on a causal LM (Qwen3, tiny): token batches with permuted knockoffs (the other sequences of
    the batch), a loss on the logits of the real half; prune_lowest gives the model's own class,
    checked against the full model with those rows zeroed, and it generates."""
    tr = pytest.importorskip("transformers")
    torch.manual_seed(0)
    m = tr.Qwen3ForCausalLM(tr.Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                           max_position_embeddings=32)).eval()
    g = torch.Generator().manual_seed(0)
    loader = [(torch.randint(1, 64, (4, 10), generator=g), torch.randint(1, 64, (4, 10), generator=g)) for _ in range(2)]
    oto = otofx.OTO(m, loader[0][0][:2])

    def loss_fn(out, y):
        return torch.nn.functional.cross_entropy(out["logits"].flatten(0, 1), y.flatten())

    with pytest.raises(InputError, match="permute"):
        oto.scop(loader, knockoff="gaussian", epochs=1, loss_fn=loss_fn)  # token ids: no Gaussian model
    s = oto.scop(loader, knockoff="permute", epochs=1, loss_fn=loss_fn)
    small = oto.prune_lowest(s, ratio=0.5)
    assert type(small) is type(m) and n_params(small) < n_params(m)
    out = small.generate(loader[0][0][:1, :4], max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 7)


class SeqFirst(nn.Module):
    """Batch-first at the interface, sequence-first inside (torch's nn.Transformer* default)."""

    def __init__(self, flatten=False, per_token=False):
        super().__init__()
        self.flatten, self.per_token = flatten, per_token
        self.inp = nn.Linear(6, 16)
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):  # x: [B, T, 6]
        h = self.inp(x).transpose(0, 1)  # [T, B, 16]
        if self.flatten:  # [T * B, 16]: the halves of axis 0 mix the samples
            t, b = h.shape[0], h.shape[1]
            h = h + self.fc2(torch.relu(self.fc1(h.reshape(t * b, 16)))).reshape(t, b, 16)
        else:
            h = h + self.fc2(torch.relu(self.fc1(h)))
        return self.head(h) if self.per_token else self.head(h.mean(0))


def test_selection_layers_split_a_sequence_first_output_on_its_batch_axis(caplog):
    """The halves are taken along each producer's batch axis (axis 1 of a [T, B, C] output), so at
    beta = 0 the real half is exactly the model on the knockoff; a [T * B, C] output has no such axis
    and gets no selection layer (a warning names it); a [T, B, classes] output is cut on axis 1."""
    torch.manual_seed(0)
    m = SeqFirst().eval()
    oto = otofx.OTO(m, torch.randn(2, 4, 6))
    sel = insert_selection(oto._sync(), oto.zigset, init=0.0)
    layers = {n: mod for n, mod in sel.gm.named_modules() if isinstance(mod, SelectionLayer)}
    assert sorted(lay.batch for lay in layers.values()) == [0, 1, 1]  # inp (before the transpose), fc1, fc2
    x, xk = torch.randn(3, 4, 6), torch.randn(3, 4, 6)
    with torch.no_grad():
        # NB: the old split on axis 0 (the sequence) gave 0.056 here
        assert torch.allclose(sel.gm(torch.cat([x, xk]))[:3], m(xk), atol=1e-6)
        sel.gm.scop_beta.fill_(1.0)
        assert torch.allclose(sel.gm(torch.cat([x, xk]))[:3], m(x), atol=1e-6)
    flat = SeqFirst(flatten=True).eval()
    oto_f = otofx.OTO(flat, torch.randn(2, 4, 6))
    with caplog.at_level("WARNING", logger="otofx"):
        sel_f = insert_selection(oto_f._sync(), oto_f.zigset, init=0.0)
    assert set(sel_f.refused) == {"fc1", "fc2"} and "no batch axis" in caplog.text
    (mid,) = [i for i, z in enumerate(oto_f.groups) if z.layers == ("fc1", "fc2")]
    assert mid in sel_f.uncovered
    with torch.no_grad():  # the residual rows are still mixed at inp, before the flattening
        assert torch.allclose(sel_f.gm(torch.cat([x, xk]))[:3], flat(xk), atol=1e-6)
    g = torch.Generator().manual_seed(0)
    loader = [(torch.randn(3, 4, 6, generator=g), torch.randint(0, 3, (4, 3), generator=g)) for _ in range(2)]
    seen = []

    def loss_fn(out, y):  # out: [T, B, classes]
        seen.append(tuple(out.shape))
        return torch.nn.functional.cross_entropy(out.flatten(0, 1), y.flatten())

    with caplog.at_level("WARNING", logger="otofx"):
        res = train_betas(otofx.OTO(SeqFirst(flatten=True, per_token=True).eval(), torch.randn(2, 4, 6)), loader,
                          knockoff="permute", epochs=1, loss_fn=loss_fn)
    assert seen == [(4, 3, 3)] * 2 and res.unscored == (mid,) and "score them another way" in caplog.text


class InOut(nn.Module):
    """nn.Linear next to a parameter stored [in, out] and read as ``x @ W``."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.W = nn.Parameter(torch.randn(16, 12) / 4)
        self.fc3 = nn.Linear(12, 3)

    def forward(self, x):
        return self.fc3(torch.relu(torch.relu(self.fc1(x)) @ self.W))


def test_weights_stored_in_out_are_producers_along_their_output_dim():
    """``x @ W`` with W [in, out] creates W's dim-1 channels: that group gets a selection layer and
    trained betas (its scores were exactly 0 before, with no warning)."""
    torch.manual_seed(0)
    m = InOut().eval()
    oto = otofx.OTO(m, torch.randn(2, 8))
    sel = insert_selection(oto._sync(), oto.zigset, init=0.0)
    assert sorted(name for name, _ in sel.producers) == ["fc1", "matmul"] and sel.uncovered == ()
    x, xk = torch.randn(3, 8), torch.randn(3, 8)
    with torch.no_grad():
        assert torch.allclose(sel.gm(torch.cat([x, xk]))[:3], m(xk), atol=1e-6)
    g = torch.Generator().manual_seed(0)
    loader = [(torch.randn(16, 8, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(2)]
    res = train_betas(oto, loader, knockoff="permute", epochs=2, lr=0.05)
    assert res.unscored == () and all(bool((b != 0.5).any()) for b in res.betas)


def test_scop_runs_on_gpt2_conv1d_weights():
    """transformers' Conv1D (GPT-2) stores [in, out] and is read by addmm: every group is scored."""
    tr = pytest.importorskip("transformers")
    torch.manual_seed(0)
    m = tr.GPT2LMHeadModel(tr.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16)).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 32, (4, 6), generator=g)
    oto = otofx.OTO(m, ids[:2])

    def loss_fn(out, y):
        return torch.nn.functional.cross_entropy(out["logits"].flatten(0, 1), y.flatten())

    res = train_betas(oto, [(ids, ids)], knockoff="permute", epochs=2, lr=0.05, loss_fn=loss_fn)
    assert res.unscored == () and all(bool((b != 0.5).any()) for b in res.betas)


def test_loaders_read_once_or_empty_and_zero_steps_are_refused():
    """A generator / iter(DataLoader) would be used up by the knockoff fit, an empty loader or
    max_steps=0 runs no step: each left every score 0 (prune_lowest then cut the first rows)."""
    oto = otofx.OTO(_model(), torch.randn(1, 2, 6, 6))
    loader = _loader(n=16)
    with pytest.raises(InputError, match="one-shot iterator"):
        oto.scop((b for b in loader), max_steps=2)
    with pytest.raises(InputError, match="one-shot iterator"):
        oto.scop(iter(loader), knockoff="permute")
    with pytest.raises(InputError, match="no batch"):
        oto.scop([], knockoff="permute")
    for bad in (0, -1, 1.5, True):
        with pytest.raises(InputError, match="max_steps"):
            oto.scop(loader, knockoff="permute", max_steps=bad)
    with pytest.raises(InputError, match="epochs"):
        oto.scop(loader, knockoff="permute", epochs=2.5)
    with pytest.raises(InputError, match="no beta step"):
        oto.scop(_Empty(loader), knockoff="permute")  # the first read has a batch, the epochs none
    data = torch.utils.data.TensorDataset(*(torch.cat(t) for t in zip(*loader)))
    dl = torch.utils.data.DataLoader(data, batch_size=8)
    assert [tuple(s.shape) for s in oto.scop(dl, max_steps=2)] == [(z.rows,) for z in oto.groups]


class _Empty:
    """A loader whose first pass gives a batch and every later pass none."""

    def __init__(self, batches):
        self.batches, self.reads = batches, 0

    def __iter__(self):
        self.reads += 1
        return iter(self.batches if self.reads == 1 else [])


def test_bad_arguments_are_input_errors_naming_them():
    oto = otofx.OTO(_model(), torch.randn(1, 2, 6, 6))
    loader = _loader(n=16)
    with pytest.raises(InputError, match="scores"):
        oto.prune_lowest(None)
    with pytest.raises(InputError, match="scores"):
        oto.prune_lowest(torch.zeros(6))
    with pytest.raises(InputError, match=r"scores\[0\]"):
        oto.prune_lowest(["x"] + list(scores.l1(oto))[1:])
    with pytest.raises(InputError, match="ratio"):
        oto.prune_lowest(scores.l1(oto), ratio="0.5")
    with pytest.raises(InputError, match="bn_batches"):
        oto.prune_lowest(scores.l1(oto), loader=loader, bn_batches=-1)
    with pytest.raises(InputError, match="'bogus'.*group"):
        oto.scop(loader, knockoff_kwargs={"bogus": 1})
    with pytest.raises(InputError, match="only apply to knockoff='gaussian'"):
        oto.scop(loader, knockoff="permute", knockoff_kwargs={"group": 2})
    with pytest.raises(InputError, match="lr"):
        oto.scop(loader, lr="0.1")
    with pytest.raises(InputError, match="knockoff"):
        oto.scop(loader, knockoff=lambda x: x[:1])
    with pytest.raises(InputError, match="unknown keyword.*bogus"):
        oto.scop(loader, bogus=1)
    with pytest.raises(InputError, match="epochs=2.5"):
        finetune(_model(), loader, epochs=2.5)
    with pytest.raises(InputError, match="lr="):
        finetune(_model(), loader, lr="0.1")


def test_tiles_of_large_inputs_keep_patch_groups_whole():
    """With group=p the blocks are cut on patch (run) boundaries: no group spans two blocks."""
    from otofx.scop.knockoffs import _group_ids

    g = torch.Generator().manual_seed(0)
    for shape, group in (((2, 12, 12), 3), ((50,), 4)):
        loader = [(torch.randn(64, *shape, generator=g), None)]
        ko = GaussianKnockoffs.fit(loader, group=group, max_dim=32, block_dim=40)
        gid = _group_ids(shape, group)[ko.active]
        blocks_of = {}
        for bi, b in enumerate(ko.blocks):
            for v in torch.unique(gid[b.index]).tolist():
                blocks_of.setdefault(v, set()).add(bi)
        assert len(ko.blocks) > 1 and all(len(s) == 1 for s in blocks_of.values())
        assert max(len(b.index) for b in ko.blocks) <= 40
        assert ko(loader[0][0][:2], generator=g).shape == (2, *shape)


def test_the_batch_axis_probe_leaves_a_shuffling_loaders_order_alone():
    # the probe reads the loader's first batch; a DataLoader with its own generator draws an epoch's
    # order on every iter(), so the probe moved every epoch's order (bench/scop.py's scores changed)
    x, y = torch.cat([b[0] for b in _loader()]), torch.cat([b[1] for b in _loader()])

    def loader():
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8, shuffle=True,
                                           generator=torch.Generator().manual_seed(3))

    used = loader()
    train_betas(otofx.OTO(_model(), x[:1]), used, knockoff="permute", epochs=2)
    ref = loader()
    for _ in range(2):  # the epochs' draws, nothing more
        list(ref)
    assert torch.equal(used.generator.get_state(), ref.generator.get_state())
