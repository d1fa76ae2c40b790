"""Micro-structured blocks trained by ADMM (seed 002): block groups, projection, penalty, finish, storage."""
from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import otofx
import otofx.admm as A
from otofx.passes.admm import blocks as B

pytestmark = pytest.mark.usefixtures("single_thread")


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 20), nn.BatchNorm1d(20), nn.ReLU(), nn.Linear(20, 6))


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 4))


# -- block groups --------------------------------------------------------------------------------


@settings(max_examples=40)
@given(st.integers(1, 9), st.integers(1, 3), st.integers(1, 5), st.integers(1, 5), st.integers(1, 3))
def test_blocks_round_trip_and_counts(rows, k, bo, bi, extra):
    shape = (rows, extra, k)
    g = B._group("w", shape, (bo, bi))
    w = torch.randn(shape)
    b = B.blocks_of(w, g)
    assert b.shape == (g.n_blocks, g.block[0] * g.block[1])
    assert torch.equal(B.from_blocks(b, g), w)
    assert int(g.counts.sum()) == w.numel()
    # each block holds exactly the elements of its tile
    m = w.reshape(g.rows, g.cols)
    for r, c in itertools.product(range(g.grid[0]), range(g.grid[1])):
        tile = m[r * g.block[0]:(r + 1) * g.block[0], c * g.block[1]:(c + 1) * g.block[1]].reshape(-1)
        blk = b[r * g.grid[1] + c]
        assert torch.equal(blk[blk != 0].sort().values, tile[tile != 0].sort().values)
        assert int(g.counts[r * g.grid[1] + c]) == tile.numel()


def test_find_blocks_conv_is_out_by_in_times_kernel():
    bs = A.find_blocks(_cnn(), block=(1, 9))
    assert [g.name for g in bs] == ["0.weight", "3.weight", "7.weight"]
    g = bs.by_name()["3.weight"]
    assert (g.rows, g.cols, g.block, g.grid) == (8, 4 * 9, (1, 9), (8, 4))
    per_layer = A.find_blocks(_cnn(), block={"*": (2, 2), "7": (4, 8)})
    assert per_layer.by_name()["7.weight"].block == (4, 8)
    assert A.find_blocks(_cnn(), layers=[nn.Linear]).by_name().keys() == {"7.weight"}


def test_block_groups_in_the_report():
    model = _cnn().eval()
    oto = otofx.OTO(model, torch.randn(1, 3, 8, 8))
    text = oto.report(blocks=A.find_blocks(model, (1, 9)))
    assert "block groups" in text and "3.weight" in text and "8x36" in text


def test_bad_blocks_are_clear_errors():
    with pytest.raises(otofx.InputError, match="two positive ints"):
        A.find_blocks(_mlp(), block=(0, 4))
    with pytest.raises(otofx.InputError, match="prune \\+ unify <= 1"):
        A.project(torch.randn(4, 4), B._group("w", (4, 4), (2, 2)), 0.8, 0.5)
    m = _mlp()
    with pytest.raises(otofx.InputError, match="not in base_optimizer"):
        A.ADMM(m, torch.optim.SGD(m[0].parameters(), lr=0.1), steps_per_round=1)
    with pytest.raises(otofx.InputError, match="steps_per_round"):
        A.ADMM(m, torch.optim.SGD(m.parameters(), lr=0.1))


# -- the projection ------------------------------------------------------------------------------


@settings(max_examples=30)
@given(st.integers(0, 2 ** 16), st.sampled_from([(0.5, 0.0), (0.75, 0.0), (0.5, 0.25), (0.0, 0.6), (0.3, 0.3)]),
       st.sampled_from([(2, 2), (4, 4), (1, 3), (3, 2)]))
def test_projection_exact(seed, pq, block):
    prune, unify = pq
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(10, 7, generator=gen)
    g = B._group("w", (10, 7), block)
    p = A.project(w, g, prune, unify)
    n_p, n_u = B.counts_for(g.n_blocks, prune, unify)
    assert int((p.state == B.PRUNED).sum()) == n_p == math.floor(prune * g.n_blocks + 0.5)
    assert int((p.state == B.UNIFIED).sum()) == n_u
    zb = B.blocks_of(p.z, g)
    assert torch.all(zb[p.state == B.PRUNED] == 0)
    vb = B.blocks_of(w, g)
    for i in torch.nonzero(p.state == B.UNIFIED).reshape(-1).tolist():
        real = B.blocks_of(torch.ones(10, 7), g)[i] > 0
        mags = zb[i][real].abs()
        assert torch.allclose(mags, mags[0].expand_as(mags))
        assert torch.allclose(mags[0], vb[i][real].abs().mean())
        assert torch.equal(torch.sign(zb[i][real]), torch.sign(vb[i][real]))
    free = p.state == B.FREE
    assert torch.equal(zb[free], vb[free])
    again = A.project(p.z, g, prune, unify)
    assert torch.equal(again.z, p.z)  # idempotent


def test_pruning_projection_is_the_nearest_point():
    """With unify=0 the greedy choice is optimal: brute force over every choice of pruned blocks."""
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(4, 6, generator=gen)
    g = B._group("w", (4, 6), (2, 2))
    p = A.project(w, g, 0.5)
    vb = B.blocks_of(w, g)
    best = min(float(vb[list(c)].square().sum()) for c in itertools.combinations(range(g.n_blocks), 3))
    assert math.isclose(float((p.z - w).square().sum()), best, rel_tol=1e-6)


# -- ADMM ----------------------------------------------------------------------------------------


def test_penalty_gradient_is_that_of_the_augmented_term():
    m = _mlp()
    opt = A.ADMM(m, torch.optim.SGD(m.parameters(), lr=0.1), prune=0.5, unify=0.25, block=(2, 2), rho=0.3,
                 rho_max=0.3, steps_per_round=1)
    x, y = torch.randn(16, 12), torch.randint(0, 6, (16,))
    for name in opt.admm_state["u"]:  # a non-trivial dual
        opt.admm_state["u"][name].normal_()
    F.cross_entropy(m(x), y).backward()
    plain = {n: p.grad.clone() for n, p in m.named_parameters()}
    opt.add_penalty_grad()
    params = dict(m.named_parameters())
    for g in opt.blocks:
        w = params[g.name].detach().clone().requires_grad_()
        z, u = opt.admm_state["z"][g.name], opt.admm_state["u"][g.name]
        (0.3 / 2 * (w - z + u).square().sum()).backward()
        torch.testing.assert_close(params[g.name].grad, plain[g.name] + w.grad)
    assert torch.equal(params["0.bias"].grad, plain["0.bias"])


def _square_steps(model, opt, x, steps: int, out=lambda y: y) -> None:
    """``steps`` optimizer steps on the mean square of the model's output."""
    for _ in range(steps):
        loss = out(model(x)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def _train(model, opt, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 12, generator=gen)
    y = (x[:, :6].argmax(1))
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return x, y


def test_admm_rounds_converge_and_state_resumes():
    m = _mlp()
    opt = A.ADMM(m, torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9), prune=0.5, unify=0.25, block=(2, 2),
                 rounds=6, steps_per_round=10, rho=1e-2, rho_max=1.0)
    _train(m, opt, 30)
    assert opt.round == 3
    sd = copy.deepcopy(opt.state_dict())  # NB: torch's load_state_dict may alias the saved buffers
    m2 = _mlp()
    m2.load_state_dict(m.state_dict())
    opt2 = A.ADMM(m2, torch.optim.SGD(m2.parameters(), lr=0.05, momentum=0.9), prune=0.5, unify=0.25, block=(2, 2),
                  rounds=6, steps_per_round=10, rho=1e-2, rho_max=1.0)
    opt2.load_state_dict(sd)
    first = opt.primal_residual()
    _train(m, opt, 30, seed=1)
    _train(m2, opt2, 30, seed=1)
    for a, b in zip(m.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    assert opt.round == 6 and math.isclose(opt.rho, 1.0)
    assert opt.primal_residual() < first


@pytest.mark.parametrize("rescale", [True, False])
def test_dual_update_and_its_rescaling_when_rho_grows(rescale):
    m = _mlp()
    opt = A.ADMM(m, torch.optim.SGD(m.parameters(), lr=0.05), prune=0.5, block=(2, 2), rounds=3, steps_per_round=4,
                 rho=1e-2, rho_max=1.0, rescale_dual=rescale)
    _train(m, opt, 4)  # one round: u was 0, so U = W - Z_1 (scaled by rho_0 / rho_1 when rescaled)
    assert math.isclose(opt.rho, 0.1)
    _train(m, opt, 3)
    params = dict(m.named_parameters())
    before = {k: v.clone() for k, v in opt.admm_state["u"].items()}
    opt.zu_step()  # the second round by hand: rho 0.1 -> 1
    for g in opt.blocks:
        w, z = params[g.name].detach(), opt.admm_state["z"][g.name]
        assert torch.equal(z, A.project(w + before[g.name], g, 0.5).z)
        step = before[g.name] + (w - z)
        torch.testing.assert_close(opt.admm_state["u"][g.name], step * (0.1 if rescale else 1.0))


def test_round_lr_restarts_every_round():
    m = _mlp()
    base = torch.optim.SGD(m.parameters(), lr=0.2)
    opt = A.ADMM(m, base, steps_per_round=4, rounds=3)
    sched = opt.round_lr()
    lrs = []
    for _ in range(9):
        lrs.append(base.param_groups[0]["lr"])
        _train(m, opt, 1)
        sched.step()
    want = [0.2 * 0.5 * (1 + math.cos(math.pi * (s % 4) / 4)) for s in range(9)]
    assert lrs == pytest.approx(want) and lrs[4] == lrs[8] == pytest.approx(0.2)


def test_lr_scheduler_drives_the_base_optimizer():
    m = _mlp()
    base = torch.optim.SGD(m.parameters(), lr=0.1)
    opt = A.ADMM(m, base, steps_per_round=5)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    _train(m, opt, 1)
    sched.step()
    assert base.param_groups[0]["lr"] == pytest.approx(0.05)


# -- finish, storage -----------------------------------------------------------------------------


def test_finish_keeps_the_structure_through_retraining():
    m = _cnn()
    x = torch.randn(8, 3, 6, 6)
    small = A.finish(m, prune=0.5, unify=0.25, block=(1, 9))
    assert not any(torch.nn.utils.parametrize.is_parametrized(mod) for mod in m.modules())  # user model untouched
    opt = torch.optim.SGD(small.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    for _ in range(5):
        loss = small(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    for name, w, pm in A._finished(small):
        g = pm.group
        b = B.blocks_of(w.detach(), g)
        assert torch.all(b[pm.state == B.PRUNED] == 0), name
        real = B.blocks_of(torch.ones(g.shape), g) > 0
        for i in torch.nonzero(pm.state == B.UNIFIED).reshape(-1).tolist():
            mags = b[i][real[i]].abs()
            assert torch.allclose(mags, mags[0].expand_as(mags)), name
        n_p, n_u = B.counts_for(g.n_blocks, 0.5, 0.25)
        assert int((pm.state == B.PRUNED).sum()) == n_p and int((pm.state == B.UNIFIED).sum()) == n_u
    flat = A.plain(small)
    torch.testing.assert_close(flat.eval()(x), small.eval()(x))


class _TiedLM(nn.Module):
    """An embedding and an output head that share one weight (GPT-2, T5, most small LLMs)."""

    def __init__(self, vocab=24, dim=16):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mid = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.mid(self.emb(ids))))


def test_tied_weights_are_blocked_once_and_stay_tied():
    """A weight two modules share is one block group (named as named_parameters() names it), trained
    by ADMM once, finished with one parametrisation that both modules compute with, stored once, and
    still one tensor after plain()."""
    torch.manual_seed(0)
    m = _TiedLM()
    ids = torch.randint(0, 24, (4, 7))
    blocks = A.find_blocks(m, block=(4, 4))
    assert sorted(g.name for g in blocks) == ["emb.weight", "mid.weight"]
    pair = nn.ModuleDict(dict(a=nn.Linear(8, 8), b=nn.Linear(8, 8)))
    pair["b"].weight = pair["a"].weight  # a block given for the second holder alone still blocks it
    assert [(g.name, g.block) for g in A.find_blocks(pair, block={"b": (2, 4)})] == [("a.weight", (2, 4))]
    opt = A.ADMM(m, torch.optim.SGD(m.parameters(), lr=0.05), block=(4, 4), prune=0.5, unify=0.25, rounds=2,
                 steps_per_round=2)
    _square_steps(m, opt, ids, 4)
    small = A.finish(m, opt)
    torch.testing.assert_close(small.head.weight, small.emb.weight, rtol=0, atol=0)
    pm = small.emb.parametrizations.weight[0]
    assert small.head.parametrizations.weight[0] is pm
    assert small.head.parametrizations.weight.original is small.emb.parametrizations.weight.original
    # retraining keeps the structure in both uses (the head's gradient reaches the shared original)
    sgd = torch.optim.SGD(small.parameters(), lr=0.1)
    _square_steps(small, sgd, ids, 3)
    b = B.blocks_of(small.head.weight.detach(), pm.group)
    assert torch.all(b[pm.state == B.PRUNED] == 0)
    torch.testing.assert_close(small.head.weight, small.emb.weight, rtol=0, atol=0)
    rows = A.storage(small)
    assert [r.layer for r in rows] == ["emb.weight", "mid.weight", "total"]
    assert rows[-1].weights == 24 * 16 + 16 * 16
    flat = A.plain(small)
    assert flat.head.weight is flat.emb.weight
    torch.testing.assert_close(flat(ids), small(ids))
    fast, names = A.to_bsr(small)  # the head through BSR, the embedding dense: the same outputs
    assert "head.weight" in names and "emb.weight" not in names
    torch.testing.assert_close(fast(ids), small(ids), rtol=1e-5, atol=1e-6)


def test_finish_in_bfloat16_keeps_each_block_its_own_magnitude():
    lin = nn.Linear(64, 64, bias=False).to(torch.bfloat16)  # 1024 blocks of 2x2: past bfloat16's exact integers
    small = A.finish(nn.Sequential(lin), prune=0.25, unify=0.5, block=(2, 2))
    pm = small[0].parametrizations.weight[0]
    want = B.from_blocks(torch.arange(1024)[:, None].expand(-1, 4), pm.group)
    assert torch.equal(pm.block_index, want)
    b = B.blocks_of(small[0].weight.detach().float(), pm.group)
    uni = pm.state == B.UNIFIED
    torch.testing.assert_close(b[uni].abs().amax(1), pm.magnitude.detach().float()[uni])


def test_storage_hand_computed():
    w = torch.tensor([[0.1, -0.2, 3.0, 4.0],
                      [0.1, 0.1, -5.0, 6.0],
                      [1.0, -1.5, 7.0, 8.0],
                      [2.0, 2.5, 9.0, -9.5]])
    lin = nn.Linear(4, 4, bias=False)
    lin.weight.data.copy_(w)
    model = nn.Sequential(lin)
    # blocks (2x2): b0 = [[.1,-.2],[.1,.1]] smallest norm -> pruned; unification costs: b1 (3,4,-5,6) 5,
    # b2 (1,-1.5,2,2.5) 1.25, b3 (7,8,9,-9.5) 3.25 -> b2 unified (mean magnitude 1.75)
    small = A.finish(model, prune=0.25, unify=0.25, block=(2, 2))
    ex = A.export(small)
    s = ex["0.weight"]
    assert s.state.tolist() == [B.PRUNED, B.FREE, B.UNIFIED, B.FREE]
    assert s.magnitudes.tolist() == [1.75]
    # free: 8 float32; unified: 4 sign bits + one float32; state: 2 bits x 4 blocks
    assert s.bits() == 8 * 32 + 4 + 32 + 2 * 4 == 300
    assert s.pruning_only_bits() == 12 * 32 + 4
    row = A.storage(ex)[0]
    assert row.bits_per_weight == 300 / 16 and math.isclose(row.vs_float32, 512 / 300)
    expected = torch.tensor([[0, 0, 3.0, 4.0], [0, 0, -5.0, 6.0], [1.75, -1.75, 7.0, 8.0], [1.75, 1.75, 9.0, -9.5]])
    assert torch.equal(s.to_dense(), expected)
    assert torch.equal(s.bsr().to_dense(), expected)
    assert "vs float32" in A.format_storage(A.storage(small))


def test_bsr_export_computes_the_finished_model_on_cpu():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 6))
    with torch.no_grad():
        for lin in m[0], m[2], m[4]:
            lin.bias.normal_()
    small = A.finish(m, prune=0.5, unify=0.25, block=(4, 4)).eval()  # 6 % 4: the head keeps ragged blocks
    fast, converted = A.to_bsr(small)
    assert converted == ["0.weight", "2.weight"] and type(fast[4]) is nn.Linear
    assert not any(torch.nn.utils.parametrize.is_parametrized(mod) for mod in fast.modules())
    assert isinstance(small[0].parametrizations.weight[0], A.BlockParam)  # the finished model is untouched
    for i in (0, 2):
        w, g = fast[i].weight_bsr, A.find_blocks(m, (4, 4)).by_name()[f"{i}.weight"]
        assert w.layout == torch.sparse_bsr and tuple(w.values().shape[1:]) == (4, 4)
        assert w.values().shape[0] == g.n_blocks - B.counts_for(g.n_blocks, 0.5, 0.25)[0]
        assert torch.equal(w.to_dense(), small[i].weight.detach())
    x = torch.randn(3, 5, 24)  # leading dims are kept
    with torch.no_grad():
        ok, err = otofx.pipeline.outputs_close(small(x), fast(x))
    assert ok, err
    with pytest.raises(otofx.InputError, match="finish"):
        A.to_bsr(m)


class _Reader(nn.Module):
    """A parent that reads its child Linear's weight instead of calling it (torchvision's Swin attention)."""

    def __init__(self):
        super().__init__()
        self.qkv, self.out = nn.Linear(16, 16), nn.Linear(16, 8)

    def forward(self, x):
        return self.out(torch.relu(F.linear(x, self.qkv.weight, self.qkv.bias)))


def test_bsr_keeps_weights_read_by_their_parent_and_cpu_non_square_blocks_correct(caplog):
    import logging

    torch.manual_seed(0)
    m = _Reader()
    small = A.finish(m, prune=0.5, block=(4, 4)).eval()
    x = torch.randn(3, 16)
    with caplog.at_level(logging.WARNING, logger="otofx"):
        fast, converted = A.to_bsr(small)
        with torch.no_grad():
            torch.testing.assert_close(fast(x), small(x), rtol=1e-5, atol=1e-6)
    assert converted == ["out.weight", "qkv.weight"]
    said = [r.getMessage() for r in caplog.records if "read as a dense tensor" in r.getMessage()]
    assert len(said) == 1 and "'qkv.weight'" in said[0], said
    # MKL multiplies square blocks only: (4, 2) blocks stay dense on the CPU, the outputs unchanged
    rect = A.finish(m, prune=0.5, block=(4, 2)).eval()
    fast, converted = A.to_bsr(rect)
    assert converted == []
    with torch.no_grad():
        torch.testing.assert_close(fast(x), rect(x))


def test_export_round_trips_ragged_blocks():
    m = _mlp()
    small = A.finish(m, prune=0.5, unify=0.25, block=(3, 7))  # edges: 20 % 3, 12 % 7, 6 % 3 == 0
    for name, s in A.export(small).items():
        w = small.get_submodule(name.rpartition(".")[0]).weight
        torch.testing.assert_close(s.to_dense(), w.detach())


# -- HESSO on blocks -----------------------------------------------------------------------------


def test_block_hesso_reaches_exact_block_sparsity():
    m = _mlp()
    opt = A.BlockHESSO(m, torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9), prune=0.5, block=(2, 2),
                       pruning_steps=12, pruning_periods=3)
    _train(m, opt, 20)
    expected = sum(B.counts_for(g.n_blocks, 0.5, 0.0)[0] for g in opt.blocks) / opt.blocks.n_blocks
    assert opt.block_sparsity() == pytest.approx(expected)
    small = A.finish(m, opt)  # already-zero blocks are the ones the projection prunes
    for name, s in A.export(small).items():
        w = dict(m.named_parameters())[name].detach()
        torch.testing.assert_close(s.to_dense(), w)


@settings(max_examples=30)
@given(st.integers(1, 4), st.integers(1, 7), st.integers(1, 6), st.integers(1, 4), st.integers(1, 4))
def test_expert_blocks_round_trip_and_stay_in_their_expert(experts, rows, cols, bo, bi):
    """A fused experts tensor [E, rows, cols] is E matrices, each tiled on its own: every block holds
    the elements of one tile of one expert, edge blocks included."""
    g = B._group("w", (experts, rows, cols), (bo, bi), batch=True)
    w = torch.randn(experts, rows, cols)
    b = B.blocks_of(w, g)
    assert b.shape == (g.n_blocks, g.block[0] * g.block[1]) and g.n_blocks == experts * g.grid[0] * g.grid[1]
    assert torch.equal(B.from_blocks(b, g), w)
    assert int(g.counts.sum()) == w.numel() == g.numel
    per = g.grid[0] * g.grid[1]
    for e, r, c in itertools.product(range(experts), range(g.grid[0]), range(g.grid[1])):
        tile = w[e, r * g.block[0]:(r + 1) * g.block[0], c * g.block[1]:(c + 1) * g.block[1]].reshape(-1)
        blk = b[e * per + r * g.grid[1] + c]
        assert torch.equal(blk[blk != 0].sort().values, tile[tile != 0].sort().values)
        assert int(g.counts[e * per + r * g.grid[1] + c]) == tile.numel()
    p = B.project(w, g, 0.5, 0.25)
    assert torch.equal(B.project(p.z, g, 0.5, 0.25).z, p.z)
    assert int((p.state == B.PRUNED).sum()) == B.counts_for(g.n_blocks, 0.5, 0.25)[0]


def _moe(name):
    tr = pytest.importorskip("transformers")
    torch.manual_seed(0)
    common = dict(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=32)
    if name == "mixtral":  # experts stored [E, out, in]
        return tr.MixtralForCausalLM(tr.MixtralConfig(**common, intermediate_size=24, num_local_experts=4,
                                                      num_experts_per_tok=2))
    if name == "llama4":  # experts stored [E, in, out], read by torch.bmm; the module does not say so
        return tr.Llama4ForCausalLM(tr.Llama4TextConfig(**common, intermediate_size=24, intermediate_size_mlp=24,
                                                        num_local_experts=4, num_experts_per_tok=1, head_dim=8))
    # GPT-OSS: experts stored [E, in, out] (is_transposed), with biases
    return tr.GptOssForCausalLM(tr.GptOssConfig(**common, intermediate_size=24, num_local_experts=4,
                                                num_experts_per_tok=2, head_dim=8, layer_types=["full_attention"]))


@pytest.mark.parametrize("name", ["mixtral", "gpt_oss", "llama4"])
def test_fused_experts_are_block_groups(name, caplog):
    """transformers' fused experts (Mixtral [E, 2I, H] and [E, H, I]; GPT-OSS stored [E, in, out]) are
    block groups of E matrices, with (b_o, b_i) blocks in output x input terms; Llama 4's experts (read
    by bmm, with no layout flag) are tiled as stored, and a non-square block says so. ADMM trains them,
    finish keeps the exact pruned fraction, the finished model generates as its plain and BSR copies do
    (the experts stay dense there), and the storage report counts them."""
    import logging

    m = _moe(name)
    path = "model.layers.0.feed_forward.experts" if name == "llama4" else "model.layers.0.mlp.experts"
    e = m.get_submodule(path)
    with caplog.at_level(logging.WARNING, logger="otofx"):
        blocks = A.find_blocks(m, block=(4, 2)).by_name()
    up, down = f"{path}.gate_up_proj", f"{path}.down_proj"
    assert blocks[up].batch == blocks[down].batch == 4
    transposed = name == "gpt_oss"
    assert getattr(e, "is_transposed", False) == transposed
    assert ("does not say whether" in caplog.text and up in caplog.text) == (name == "llama4")
    assert blocks[up].block == ((2, 4) if transposed else (4, 2))
    assert (blocks[up].rows, blocks[up].cols) == tuple(e.gate_up_proj.shape[1:])
    assert "4 x " in A.report(A.find_blocks(m, block=(4, 2)))  # the matrix column: experts x rows x cols
    ids = torch.randint(0, 64, (2, 8))
    m.train()
    opt = A.ADMM(m, torch.optim.SGD(m.parameters(), lr=0.01), block=(4, 2), prune=0.5, unify=0.25, rounds=2,
                 steps_per_round=1)
    _square_steps(m, opt, ids, 2, out=lambda y: y.logits)
    small = A.finish(m, opt).eval()
    fin = {n: (w, pm) for n, w, pm in A._finished(small)}
    for name_ in (up, down):
        w, pm = fin[name_]
        assert int((pm.state == B.PRUNED).sum()) == B.counts_for(pm.group.n_blocks, 0.5, 0.25)[0]
        assert torch.all(B.blocks_of(w.detach(), pm.group)[pm.state == B.PRUNED] == 0)
    rows = {r.layer: r for r in A.storage(small)}
    assert rows[up].weights == e.gate_up_proj.numel() and rows[up].bits < 32 * rows[up].weights
    x = ids[:1, :4]
    with torch.no_grad():
        ref = small(ids).logits
        torch.testing.assert_close(A.plain(small)(ids).logits, ref)
        fast, converted = A.to_bsr(small)
        assert up not in converted
        torch.testing.assert_close(fast(ids).logits, ref, rtol=1e-4, atol=1e-5)
    assert torch.equal(fast.generate(x, max_new_tokens=4, do_sample=False),
                       small.generate(x, max_new_tokens=4, do_sample=False))


def test_gpt2_conv1d_weights_are_blocked_output_by_input():
    """transformers' Conv1D (GPT-2's attention and MLP projections) holds a Linear's weight as
    [in, out]: its blocks are (b_o, b_i) in output x input terms, i.e. (b_i, b_o) on the stored tensor;
    the tied head is the embedding's group. ADMM, finish and the storage report run on the model."""
    tr = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tr.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=40, n_positions=16, bos_token_id=0, eos_token_id=0)
    m = tr.GPT2LMHeadModel(cfg).eval()
    blocks = A.find_blocks(m, block=(2, 8)).by_name()
    assert blocks["transformer.h.0.attn.c_attn.weight"].shape == (16, 48)
    assert blocks["transformer.h.0.attn.c_attn.weight"].block == (8, 2)  # stored [in, out]
    assert blocks["transformer.h.0.mlp.c_proj.weight"].block == (8, 2)
    assert "lm_head.weight" not in blocks and blocks["transformer.wte.weight"].block == (2, 8)
    ids = torch.randint(0, 40, (2, 8))
    opt = A.ADMM(m, torch.optim.SGD(m.parameters(), lr=0.01), block=(2, 8), prune=0.5, unify=0.25, rounds=2,
                 steps_per_round=1)
    _square_steps(m, opt, ids, 2, out=lambda y: y.logits)
    small = A.finish(m, opt)
    for name, w, pm in A._finished(small):
        b = B.blocks_of(w.detach(), pm.group)
        assert torch.all(b[pm.state == B.PRUNED] == 0), name
    names = [r.layer for r in A.storage(small)]
    assert "transformer.h.0.attn.c_attn.weight" in names and names.count("transformer.wte.weight") == 1
    with torch.no_grad():
        torch.testing.assert_close(A.plain(small)(ids).logits, small(ids).logits)


@pytest.mark.parametrize("compressed", [False, True])
def test_multihead_attention_input_projections_are_blocked(compressed):
    """nn.MultiheadAttention (torchvision's ViT) keeps its input projections in ``in_proj_weight``, not
    in a Linear: they are block groups too, trained, finished and stored; the attention module reads
    them (and its out_proj's weight) itself, in training and on its eval fast path, so to_bsr keeps
    them dense. The same holds for otofx's PrunedMultiheadAttention (a compressed ViT)."""
    tv = pytest.importorskip("torchvision")
    import otofx

    torch.manual_seed(0)
    m = tv.models.VisionTransformer(image_size=16, patch_size=4, num_layers=2, num_heads=2, hidden_dim=16,
                                    mlp_dim=32, num_classes=5)
    x = torch.randn(3, 3, 16, 16)
    if compressed:
        from helpers import zero_random_rows

        oto = otofx.OTO(m.eval(), x)
        zero_random_rows(m, oto)  # half of every group's rows, heads included
        m = oto.compress()
    attn = [n for n, mod in m.named_modules() if isinstance(mod, B.ATTENTION)]
    assert len(attn) == 2
    assert compressed == all(type(m.get_submodule(a)).__name__ == "PrunedMultiheadAttention" for a in attn)
    names = {g.name for g in A.find_blocks(m, block=(4, 4))}
    assert {f"{a}.in_proj_weight" for a in attn} <= names and {f"{a}.out_proj.weight" for a in attn} <= names
    m.train()
    opt = A.ADMM(m, torch.optim.SGD(m.parameters(), lr=0.05), block=(4, 4), prune=0.5, unify=0.25, rounds=2,
                 steps_per_round=2)
    _square_steps(m, opt, x, 4)
    small = A.finish(m, opt)
    w = small.get_submodule(attn[0]).in_proj_weight
    pm = small.get_submodule(attn[0]).parametrizations.in_proj_weight[0]
    b = B.blocks_of(w.detach(), pm.group)
    assert int((pm.state == B.PRUNED).sum()) == round(0.5 * pm.group.n_blocks)
    assert torch.all(b[pm.state == B.PRUNED] == 0)
    small(x).sum().backward()  # training mode: the gradient reaches the block magnitudes
    assert pm.magnitude.grad is not None
    assert {f"{a}.in_proj_weight" for a in attn} <= {r.layer for r in A.storage(small)}
    small.eval()
    with torch.no_grad():
        ref = small(x)
        torch.testing.assert_close(A.plain(small)(x), ref)
        fast, converted = A.to_bsr(small)
        assert not [c for c in converted if "self_attention" in c]
        torch.testing.assert_close(fast(x), ref, rtol=1e-4, atol=1e-5)


def test_bsr_linear_output_is_contiguous():
    """A BSR Linear returns a contiguous output, as nn.Linear does (a caller may view it: Llama 4's
    rotary takes view_as_complex of a projection, which needs the last dim's stride to be 1)."""
    import warnings

    w = torch.randn(8, 4)
    w[:4, :2] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lin = A.BSRLinear(w.to_sparse_bsr((2, 2)), torch.randn(8))
    for x in (torch.randn(3, 4), torch.randn(2, 3, 4)):
        y = lin(x)
        assert y.is_contiguous()
        torch.view_as_complex(y.reshape(*y.shape[:-1], 4, 2))


# -- audit fixes ---------------------------------------------------------------------------------


def test_unified_blocks_keep_their_signs_and_export_is_the_weight_after_retraining():
    """Retraining toward the negated weight drives the learnable magnitudes below zero: the weight
    uses |magnitude|, so no unified weight changes sign, and export()/to_dense()/bsr() give exactly
    the weight the model computes with (magnitudes stored >= 0)."""
    torch.manual_seed(0)
    small = A.finish(nn.Sequential(nn.Linear(8, 8, bias=False)), prune=0.25, unify=0.5, block=(2, 2))
    pm = small[0].parametrizations.weight[0]
    w0 = small[0].weight.detach().clone()
    opt = torch.optim.SGD(small.parameters(), lr=0.05)
    uni, negative = pm.sign != 0, False
    for _ in range(6):
        loss = (small[0].weight + w0).square().sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        negative |= bool((pm.magnitude.detach()[pm.state == B.UNIFIED] < 0).any())
        w = small[0].weight.detach()
        assert torch.equal(torch.sign(w[uni]), torch.sign(w0[uni]))
        s = A.export(small)["0.weight"]
        assert (s.magnitudes >= 0).all()
        assert torch.equal(s.to_dense(), w) and torch.equal(s.bsr().to_dense(), w)
    assert negative  # the optimizer did take the learnable magnitudes below zero


def test_an_exact_zero_in_a_unified_block_gets_the_block_magnitude():
    """project([1, 0, 2, 3]) unifies to [1.5] * 4 (not [1.5, 0, 1.5, 1.5], outside the set and not
    idempotent), the finished weight round-trips through export, and a zero-initialised layer's
    unified blocks train their magnitudes."""
    g = B._group("w", (2, 4), (1, 4))
    v = torch.tensor([[1.0, 0.0, 2.0, 3.0], [5.0, -6.0, 7.0, 8.0]])
    p = A.project(v, g, 0.0, 0.5)
    assert p.z[0].tolist() == [1.5] * 4 and torch.equal(p.z[1], v[1])
    assert torch.equal(A.project(p.z, g, 0.0, 0.5).z, p.z)
    lin = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(v)
    small = A.finish(nn.Sequential(lin), prune=0.0, unify=0.5, block=(1, 4))
    assert torch.equal(A.export(small)["0.weight"].to_dense(), small[0].weight.detach())
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    nn.init.zeros_(m[2].weight)
    small = A.finish(m, prune=0.0, unify=0.5, block=(2, 2))
    pm = small[2].parametrizations.weight[0]
    assert torch.all(pm.sign.abs()[B.from_blocks((pm.state == B.UNIFIED)[:, None].expand(-1, 4), pm.group)] == 1)
    opt = torch.optim.SGD(small.parameters(), lr=0.5)
    x, y = torch.randn(16, 8), torch.randn(16, 8)
    for _ in range(3):
        opt.zero_grad()
        (small(x) - y).square().mean().backward()
        opt.step()
    assert bool((pm.block_magnitude().detach()[pm.state == B.UNIFIED] > 0).all())
    assert torch.equal(A.export(small)["2.weight"].to_dense(), small[2].weight.detach())


def test_load_state_dict_keeps_the_wrapper_on_the_base_param_groups():
    m = _mlp()
    base = torch.optim.SGD(m.parameters(), lr=0.1)
    opt = A.ADMM(m, base, block=(2, 2), prune=0.5, rounds=4, steps_per_round=3)
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert opt.param_groups is base.param_groups
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    _train(m, opt, 1)
    sched.step()
    assert base.param_groups[0]["lr"] == pytest.approx(0.05)


def test_block_hesso_state_dict_resumes_exactly():
    def make(model):
        return A.BlockHESSO(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), prune=0.5, block=(2, 2),
                            pruning_steps=8, pruning_periods=2)

    m = _mlp()
    opt = make(m)
    _train(m, opt, 5)
    sd = copy.deepcopy(opt.state_dict())
    m2 = _mlp()
    m2.load_state_dict(m.state_dict())
    opt2 = make(m2)
    opt2.load_state_dict(sd)
    assert opt2.param_groups is opt2.base.param_groups
    _train(m, opt, 6, seed=1)
    _train(m2, opt2, 6, seed=1)
    for a, b in zip(m.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    assert opt2.block_sparsity() == opt.block_sparsity() > 0.4
    with pytest.raises(otofx.OTOError, match="BlockHESSO.state_dict"):
        opt2.load_state_dict({"state": {}, "param_groups": []})


def test_conv_transpose_weights_are_blocked_output_by_input():
    """A ConvTranspose weight [in, out/groups, k...] is read as a conv's, [out, in/groups * k...]:
    the block's rows run along output channels; ADMM, finish, export, plain and HESSO handle it."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.ConvTranspose2d(4, 6, 3, groups=2), nn.ReLU(), nn.ConvTranspose1d(6, 2, 2))
    bs = A.find_blocks(m, block=(2, 3)).by_name()
    assert (bs["2.weight"].rows, bs["2.weight"].cols) == (2, 6 * 2)
    g = bs["0.weight"]
    assert (g.rows, g.cols, g.transposed_groups) == (6, 2 * 9, 2)
    w = torch.zeros(4, 3, 3, 3)
    for o in range(6):  # output channel o = group * 3 + j lives in weight[group * 2:(group + 1) * 2, j]
        w[(o // 3) * 2:(o // 3 + 1) * 2, o % 3] = o
    mat = B.matrices_of(w, g)[0]
    assert all(bool((mat[o] == o).all()) for o in range(6))
    assert torch.equal(B.from_blocks(B.blocks_of(w, g), g), w)
    dec = nn.Sequential(nn.ConvTranspose2d(4, 6, 3, groups=2), nn.ReLU(), nn.ConvTranspose2d(6, 2, 2))
    x = torch.randn(2, 4, 5, 5)
    opt = A.ADMM(dec, torch.optim.SGD(dec.parameters(), lr=0.05), block=(2, 3), prune=0.5, unify=0.25, rounds=2,
                 steps_per_round=2)
    _square_steps(dec, opt, x, 4)
    small = A.finish(dec, opt)
    for name, s in A.export(small).items():
        torch.testing.assert_close(s.to_dense(), small.get_submodule(name[:-7]).weight.detach(), rtol=0, atol=0)
    s = A.export(small)["0.weight"]
    assert torch.equal(s.bsr().to_dense(), B.matrices_of(small[0].weight.detach(), g)[0])
    assert int((s.state == B.PRUNED).sum()) == B.counts_for(g.n_blocks, 0.5, 0.25)[0]
    torch.testing.assert_close(A.plain(small)(x), small(x))
    hesso = A.BlockHESSO(dec, torch.optim.SGD(dec.parameters(), lr=0.05), block=(2, 3), prune=0.5, pruning_steps=2)
    _square_steps(dec, hesso, x, 3)
    assert hesso.block_sparsity() == pytest.approx(
        sum(B.counts_for(g.n_blocks, 0.5, 0.0)[0] for g in hesso.blocks) / hesso.blocks.n_blocks)


def test_parametrised_weights_are_skipped_and_finished_ones_refused(caplog):
    """A weight computed by a parametrisation (weight_norm: Wav2Vec2's positional conv) is no
    parameter: find_blocks skips it and says so, and ADMM and finish run on the rest. A weight
    finish() parametrised is an error that says so, for finish and ADMM alike."""
    import logging

    from torch.nn.utils.parametrizations import weight_norm

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), weight_norm(nn.Conv1d(8, 8, 3)))
    with caplog.at_level(logging.WARNING, logger="otofx"):
        assert [g.name for g in A.find_blocks(m, (2, 2))] == ["0.weight"]
    assert "'2.weight'" in caplog.text and "_WeightNorm" in caplog.text
    opt = A.ADMM(m, torch.optim.SGD(m.parameters(), lr=0.1), block=(2, 2), steps_per_round=1)
    small = A.finish(m, opt)
    assert [n for n, _, _ in A._finished(small)] == ["0.weight"]
    with pytest.raises(otofx.InputError, match="'2.weight'.*weight_norm|skipped: '2.weight'"):
        A.find_blocks(m, (2, 2), layers=["2"])
    for again in (lambda f: A.finish(f, prune=0.5, block=(2, 2)), lambda f: A.finish(f, opt),
                  lambda f: A.ADMM(f, torch.optim.SGD(f.parameters(), lr=0.1), block=(2, 2), steps_per_round=1)):
        with pytest.raises(otofx.InputError, match="'0.weight' is already parametrised by otofx.admm.finish"):
            again(small)


def test_layers_takes_one_name_or_type_and_weight_names():
    m = nn.Sequential(*[nn.Linear(4, 4) for _ in range(12)])
    assert [g.name for g in A.find_blocks(m, layers="10")] == ["10.weight"]
    assert [g.name for g in A.find_blocks(m, layers="10.weight")] == ["10.weight"]
    assert len(A.find_blocks(m, layers=nn.Linear)) == 12
    with pytest.raises(otofx.InputError, match="layers= names \\['12'\\] match no"):
        A.find_blocks(m, layers=["1", "12"])
    with pytest.raises(otofx.InputError, match="layers= holds 3"):
        A.find_blocks(m, layers=["1", 3])


@pytest.mark.parametrize("named", [False, True])
@pytest.mark.parametrize("block, says", [((0, 4), "two positive ints"), ((-1, 4), "two positive ints"),
                                         ((4.5, 4), "two positive ints"), ((4,), "two positive ints"),
                                         (None, "two positive ints"), ("44", "two positive ints"),
                                         (4, "ambiguous"), ({"*": 4}, "ambiguous"), ({3: (4, 4)}, "dict keys"),
                                         ({"*": (0, 4)}, "two positive ints")])
def test_bad_block_values_are_clear_errors(named, block, says):
    m = _mlp()
    with pytest.raises(otofx.InputError, match=f"block.*{says}|{says}.*block"):
        A.ADMM(m.named_parameters() if named else m, torch.optim.SGD(m.parameters(), lr=0.1), block=block,
               steps_per_round=1)


def test_bad_numbers_are_clear_errors():
    m = _mlp()

    def admm(**kw):
        return A.ADMM(m, torch.optim.SGD(m.parameters(), lr=0.1), **{"steps_per_round": 1, **kw})

    assert admm(block=(2.0, 2)).blocks.groups[0].block == (2, 2)  # a whole float is no truncation
    for kw, says in [({"prune": "0.5"}, "prune='0.5'"), ({"unify": None}, "unify=None"),
                     ({"rho_max": float("inf")}, "rho_max=inf"), ({"rho": 0}, "rho=0"), ({"rho": float("nan")}, "rho=nan"),
                     ({"rho": 1.0, "rho_max": 0.5}, "rho=1.0 must be <= rho_max"),
                     ({"steps_per_round": 2.5}, "steps_per_round=2.5"), ({"rounds": 0}, "rounds=0")]:
        with pytest.raises(otofx.InputError, match=says.replace("(", "\\(").replace("[", "\\[")):
            admm(**kw)
    with pytest.raises(otofx.InputError, match="prune='0.5'"):
        A.finish(m, prune="0.5")


def test_layers_and_block_dicts_on_named_parameters():
    m = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    sgd = torch.optim.SGD(m.parameters(), lr=0.1)
    for layers in ("0", ["0"], ["0.weight"]):
        assert [g.name for g in A.ADMM(m.named_parameters(), sgd, layers=layers, steps_per_round=1).blocks] == ["0.weight"]
    opt = A.ADMM(m.named_parameters(), sgd, block={"*": (2, 2), "2": (4, 8)}, steps_per_round=1)
    assert [g.block for g in opt.blocks] == [(2, 2), (4, 8)]
    with pytest.raises(otofx.InputError, match="needs the model"):
        A.ADMM(m.named_parameters(), sgd, layers=[nn.Linear], steps_per_round=1)
    with pytest.raises(otofx.InputError, match="needs the model"):
        A.ADMM(m.named_parameters(), sgd, block={nn.Linear: (2, 2)}, steps_per_round=1)


def test_step_hands_the_closure_to_the_base_optimizer():
    """LBFGS needs the closure; each of its evaluations includes the ADMM term (gradient and value).
    With SGD a closure step is the plain step."""
    torch.manual_seed(0)
    x, y = torch.randn(32, 12), torch.randint(0, 6, (32,))
    m = _mlp()
    opt = A.ADMM(m, torch.optim.LBFGS(m.parameters(), lr=0.5, max_iter=4), block=(2, 2), prune=0.5, rho=1.0,
                 rho_max=1.0, steps_per_round=2, rounds=2)
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = F.cross_entropy(m(x), y)
        loss.backward()
        return loss

    first = opt.step(closure)
    assert len(calls) > 1 and torch.is_tensor(first)
    opt.step(closure)
    assert opt.round == 1
    ms = [_mlp(), _mlp()]
    opts = [A.ADMM(k, torch.optim.SGD(k.parameters(), lr=0.1), block=(2, 2), prune=0.5, steps_per_round=2) for k in ms]
    for _ in range(3):
        opts[0].zero_grad()
        F.cross_entropy(ms[0](x), y).backward()
        opts[0].step()
        opts[1].step(lambda: (opts[1].zero_grad(), F.cross_entropy(ms[1](x), y).backward())[0])
    for a, b in zip(ms[0].parameters(), ms[1].parameters()):
        assert torch.equal(a, b)


def test_finish_keeps_a_frozen_layer_frozen():
    m = _mlp()
    m[0].requires_grad_(False)
    small = A.finish(m, prune=0.25, unify=0.5, block=(2, 2))
    assert not [n for n, p in small.named_parameters() if n.startswith("0.") and p.requires_grad]
    assert small[3].parametrizations.weight[0].magnitude.requires_grad
    w0 = small[0].weight.detach().clone()
    opt = torch.optim.SGD([p for p in small.parameters() if p.requires_grad], lr=0.1)
    _square_steps(small, opt, torch.randn(16, 12), 2)
    assert torch.equal(small[0].weight.detach(), w0)


def test_bsr_keeps_half_precision_dense_on_cpu(caplog):
    import logging

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 16, bias=False))
    small = A.finish(m, prune=0.5, unify=0.25, block=(16, 16)).eval().to(torch.bfloat16)
    with caplog.at_level(logging.WARNING, logger="otofx"):
        fast, converted = A.to_bsr(small)
    assert converted == [] and "torch.bfloat16 on the CPU" in caplog.text and "0.weight, 2.weight" in caplog.text
    x = torch.randn(5, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(fast(x), small(x))


def test_block_dict_keyed_by_type_matches_subclasses_most_specific_first():
    m = nn.Sequential(nn.Linear(8, 8), nn.MultiheadAttention(8, 2))  # out_proj: a Linear subclass
    assert [g.name for g in A.find_blocks(m, block={nn.Linear: (2, 2)})] == ["0.weight", "1.out_proj.weight"]
    out_proj = type(m[1].out_proj)
    assert out_proj is not nn.Linear
    got = {g.name: g.block for g in A.find_blocks(m, block={nn.Linear: (2, 2), out_proj: (1, 4)})}
    assert got == {"0.weight": (2, 2), "1.out_proj.weight": (1, 4)}


def test_a_layer_pruned_entirely_is_a_warning(caplog):
    import logging

    m = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 16))
    with caplog.at_level(logging.WARNING, logger="otofx"):
        small = A.finish(m, prune=0.5, block=(4, 4))  # '0' is one block: round(0.5) = 1 of 1
    said = [r.getMessage() for r in caplog.records if "zeroed entirely" in r.getMessage()]
    assert len(said) == 1 and "'0.weight'" in said[0]
    assert bool((small[0].weight == 0).all()) and not bool((small[2].weight == 0).all())
