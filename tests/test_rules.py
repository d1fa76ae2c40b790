"""Every operator rule, on small models, end to end: analysis, zero rows, compress, exact.

(a) every registered rule has examples (``rule_examples.EXAMPLES``) and a one-line doc;
(b) every example: the analysis leaves the model untouched, groups exist (or the expected pin is
    reported), and for two seeds a random half of every group's rows is zeroed, ``compress()`` runs
    (with its own verification) and equals the zeroed full model on a fresh input, with fewer
    parameters;
(c) targeted checks of group structure (which slices land in one row, at which offsets);
(d) regressions for bugs this suite found, each a minimal repro;
(e) the registry: op identity beside the algebra, schema-bound ATen arguments, user rules,
    declining versus crashing.
"""
from __future__ import annotations

import operator
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import otofx
from helpers import (assert_exact, build, fresh_like, max_rel_diff, n_params, randomize, snapshot, zero_random_rows,
                     zero_rows)
from rule_examples import EXAMPLES, HW, Net, conv, img
import rule_examples as R

pytestmark = pytest.mark.usefixtures("single_thread")

# one entry per example factory (a factory may be listed under several rules)
_FACTORIES: dict = {}
for _rule, _fns in EXAMPLES.items():
    for _fn in _fns:
        _FACTORIES.setdefault(_fn, []).append(_rule)
FACTORIES = list(_FACTORIES)


def param_ids(factories):
    return [pytest.param(f, id=f.__name__) for f in factories]


# =============================================================================================
# (a) registry coverage
# =============================================================================================


def test_every_rule_has_examples():
    missing = sorted(set(otofx.passes.RULES) - set(EXAMPLES))
    assert not missing, f"rules without examples in tests/rule_examples/ (the rule's family file): {missing}"
    unknown = sorted(set(EXAMPLES) - set(otofx.passes.RULES))
    assert not unknown, f"examples filed under rules that do not exist: {unknown}"


def test_every_rule_has_examples_with_groups():
    """Each rule is exercised at least once between prunable producers and consumers."""
    without = sorted(r for r, fns in EXAMPLES.items() if all(f.pinned for f in fns))
    assert not without, f"rules whose examples are all 'all pinned expected': {without}"


@pytest.mark.parametrize("name", sorted(otofx.passes.RULES))
def test_rule_doc_is_one_nonempty_line(name):
    rule = otofx.passes.RULES[name]
    assert rule.name == name
    doc = rule.doc
    assert doc and doc.strip() == doc and "\n" not in doc, f"rule {name!r} has no one-line channel algebra"
    assert len(doc) > 20


# =============================================================================================
# (b) every example, end to end
# =============================================================================================


@pytest.mark.parametrize("factory", param_ids(FACTORIES))
def test_analysis_does_not_mutate(factory):
    model, x = build(factory)
    model.train()
    before = snapshot(model)
    oto = otofx.OTO(model, x)
    assert snapshot(model) == before, "OTO() mutated the model (state_dict or training flags)"
    model.eval()
    before = snapshot(model)
    otofx.OTO(model, x)
    assert snapshot(model) == before, "OTO() mutated the model in eval mode"
    assert oto.frontend == factory.frontend


PAIRS = [pytest.param(r, f, id=f"{r}-{f.__name__}") for r, fns in EXAMPLES.items() for f in fns]


@pytest.mark.parametrize("rule,factory", PAIRS)
def test_example_exercises_its_rule(rule, factory):
    """The captured graph really has a node bound to the rule the example is filed under."""
    from otofx.passes.registry import form_of

    model, x = build(factory)
    oto = otofx.OTO(model, x)
    gm = oto.graph_module
    used = {form_of(n, gm).rule for n in gm.graph.nodes
            if n.op in ("call_module", "call_function", "call_method") and form_of(n, gm) is not None}
    if rule == "size":  # x.shape is a getattr node that the analysis hands to the size rule
        used |= {"size"} if any(n.op == "call_function" and n.target is getattr and n.args[1] == "shape"
                                for n in gm.graph.nodes) else set()
    assert rule in used, f"{factory.__name__} never reaches rule {rule!r}; rules reached: {sorted(used)}"


@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("factory", param_ids(FACTORIES))
def test_zero_half_compress_exact(factory, seed):
    model, x = build(factory)
    oto = otofx.OTO(model, x)
    if factory.pinned:
        assert not oto.groups, f"expected everything pinned, got groups of {[z.rows for z in oto.groups]} rows"
        reasons = [p.reason for p in oto.pinned]
        assert any(factory.pinned in r for r in reasons), f"expected a pin '{factory.pinned}', got {reasons}"
        small = oto.compress()
        assert n_params(small) == n_params(model)
        assert_exact(model, oto, fresh_like(x, seed), smaller=False, small=small)
        return
    assert oto.groups, "example has no prunable group"
    if factory.expect_pin:
        reasons = [p.reason for p in oto.pinned]
        assert any(factory.expect_pin in r for r in reasons), f"expected a pin '{factory.expect_pin}', got {reasons}"
    rows = zero_random_rows(model, oto, seed=seed)
    zeroed = sum(len(r) for r in rows)
    assert zeroed > 0, f"no group has 2+ rows: {[z.rows for z in oto.groups]}"
    after_zero = snapshot(model)
    # NB: an exported GraphModule refuses eval(), which compress()'s own verification calls (see
    # test_export_compress_verifies below); export examples are checked without it
    small = oto.compress(verify=factory.frontend != "export")
    assert snapshot(model) == after_zero, "compress() mutated the model"
    assert_exact(model, oto, fresh_like(x, seed), small=small)
    assert_exact(model, oto, x, small=small)


@pytest.mark.parametrize("factory", param_ids([f for f in FACTORIES if not f.pinned]))
def test_zero_nothing_is_identity(factory):
    """No zero row: compress() keeps every parameter and the same function."""
    model, x = build(factory)
    oto = otofx.OTO(model, x)
    small = oto.compress(verify=factory.frontend != "export")
    assert n_params(small) == n_params(model)
    assert_exact(model, oto, fresh_like(x), smaller=False, small=small)


# =============================================================================================
# (c) group structure
# =============================================================================================


def zig_with(oto, name: str, dim: int):
    """The one group holding parameter ``name`` along ``dim`` (asserts there is exactly one)."""
    hits = [z for z in oto.groups if any(n == name and d == dim for n, d, _ in z.params)]
    assert len(hits) == 1, f"{name} dim {dim} is in {len(hits)} groups"
    return hits[0]


def index(zig, name: str, dim: int) -> torch.Tensor:
    idx = [i for n, d, i in zig.params if n == name and d == dim]
    assert len(idx) == 1, f"{name} dim {dim} listed {len(idx)} times"
    return idx[0]


def test_residual_add_ties_both_branches():
    model, x = build(R.residual_block)
    oto = otofx.OTO(model, x)
    z = zig_with(oto, "conv2.weight", 0)
    names = {(n, d) for n, d, _ in z.params}
    assert {("conv2.weight", 0), ("conv2.bias", 0), ("bn2.weight", 0), ("bn2.bias", 0), ("down.weight", 0),
            ("down.bias", 0), ("bnd.weight", 0), ("bnd.bias", 0), ("head.weight", 1)} <= names
    assert z.rows == 8
    for n in ("down.weight", "bn2.weight", "bnd.bias"):
        assert torch.equal(index(z, n, 0), index(z, "conv2.weight", 0)), f"{n} not aligned with conv2"
    assert torch.equal(index(z, "head.weight", 1), index(z, "conv2.weight", 0))
    # conv1's channels are a different group: they end at conv2's input
    z1 = zig_with(oto, "conv1.weight", 0)
    assert z1 is not z and {("bn1.weight", 0), ("conv2.weight", 1)} <= {(n, d) for n, d, _ in z1.params}


def test_depthwise_ties_input_and_output_channel():
    model, x = build(R.conv_depthwise)
    oto = otofx.OTO(model, x)
    z = zig_with(oto, "dw.weight", 0)
    assert z is zig_with(oto, "c1.weight", 0) and z.rows == 8
    c = index(z, "c1.weight", 0)
    assert c.shape == (8, 1)
    for n, d in (("bn1.weight", 0), ("dw.weight", 0), ("dw.bias", 0), ("bn2.bias", 0), ("pw.weight", 1)):
        assert torch.equal(index(z, n, d), c), f"{n} dim {d} not aligned with c1's channel"
    assert not any(n == "dw.weight" and d == 1 for n, d, _ in z.params), "depthwise dim 1 has size 1"


def test_depthwise_multiplier_row_has_two_outputs():
    model, x = build(R.conv_depthwise_multiplier)
    oto = otofx.OTO(model, x)
    z = zig_with(oto, "dw.weight", 0)
    assert z.rows == 4
    c = index(z, "c1.weight", 0).reshape(-1)
    out = index(z, "dw.weight", 0)
    assert out.shape == (4, 2)
    assert torch.equal(out, torch.stack([2 * c, 2 * c + 1], 1))
    assert torch.equal(index(z, "pw.weight", 1), out)


def test_flatten_linear_has_hw_columns_per_channel():
    model, x = build(R.view_literal)
    oto = otofx.OTO(model, x)
    z = zig_with(oto, "c1.weight", 0)
    c = index(z, "c1.weight", 0).reshape(-1)
    cols = index(z, "fc.weight", 1)
    assert cols.shape == (4, HW * HW)
    expect = c[:, None] * HW * HW + torch.arange(HW * HW)[None, :]
    assert torch.equal(cols, expect)


def test_cat_places_channels_at_offsets():
    model, x = build(R.cat_two_branches)
    oto = otofx.OTO(model, x)
    za, zb = zig_with(oto, "a.weight", 0), zig_with(oto, "b.weight", 0)
    assert za is not zb and (za.rows, zb.rows) == (4, 6)
    assert torch.equal(index(za, "c3.weight", 1), index(za, "a.weight", 0))
    assert torch.equal(index(zb, "c3.weight", 1), index(zb, "b.weight", 0) + 4)


def test_strided_slices_keep_aligned_blocks_as_rows():
    """y[:, r::3]: each aligned block of 3 channels is one row (its r-th channel goes to the r-th
    reader), so removing rows keeps the residues; a partial last block (8 channels) is a row too."""
    model, x = build(R.strided_slices_export)
    oto = otofx.OTO(model, x)
    z = zig_with(oto, "c1.weight", 0)
    assert z.rows == 4 and torch.equal(index(z, "c1.weight", 0), torch.arange(12).reshape(4, 3))
    for n, r in (("ca.weight", 0), ("cb.weight", 1), ("cc.weight", 2)):
        assert torch.equal(index(z, n, 1).reshape(-1), torch.arange(4)), n
    z2 = [zz for zz in oto.groups if any(n == "c2.weight" for n, _, _ in zz.params)]
    assert sorted(index(zz, "c2.weight", 0).tolist() for zz in z2) == [[[0, 1, 2], [3, 4, 5]], [[6, 7]]]
    rows = {id(z): torch.tensor([1])}  # c1's channels 3-5; c2's first block and its partial last one
    rows.update({id(zz): torch.tensor([0]) for zz in z2})
    zero_rows(model, oto, [rows.get(id(zz), torch.tensor([], dtype=torch.long)) for zz in oto.groups])
    small = assert_exact(model, oto, x)
    assert small.get_parameter("c1.weight").shape[0] == 9 and small.get_parameter("c2.weight").shape[0] == 3


def test_cat_with_model_input_pins_only_its_slice():
    model, x = build(R.cat_with_input_and_concat_spelling)
    oto = otofx.OTO(model, x)
    za, zb = zig_with(oto, "a.weight", 0), zig_with(oto, "b.weight", 0)
    assert torch.equal(index(za, "c.weight", 1), index(za, "a.weight", 0) + 3)
    assert torch.equal(index(zb, "c.weight", 1), index(zb, "b.weight", 0) + 9)
    listed = torch.cat([index(za, "c.weight", 1).reshape(-1), index(zb, "c.weight", 1).reshape(-1)])
    assert not (listed < 3).any(), "the input's channels (0..2) must not be in a row"


def test_grouped_conv_rows_span_whole_conv_groups():
    model, x = build(R.conv_grouped)
    oto = otofx.OTO(model, x)
    z = zig_with(oto, "c2.weight", 0)
    assert z is zig_with(oto, "c1.weight", 0) and z.rows == 2
    blocks = torch.arange(8).reshape(2, 4)
    order = index(z, "c2.weight", 0)[:, 0].argsort()
    for n, d in (("c1.weight", 0), ("c1.bias", 0), ("c2.weight", 0), ("c2.bias", 0), ("c3.weight", 1)):
        idx = index(z, n, d)[order].sort(1).values
        assert torch.equal(idx, blocks), f"{n} dim {d}: {idx.tolist()}"
    assert not any(n == "c2.weight" and d == 1 for n, d, _ in z.params), "grouped conv dim 1 is pinned"


def test_grouped_conv_compress_updates_groups():
    model, x = build(R.conv_grouped)
    oto = otofx.OTO(model, x)
    zero_rows(model, oto, [torch.tensor([1])])
    small = assert_exact(model, oto, fresh_like(x))
    assert (small.c2.in_channels, small.c2.out_channels, small.c2.groups) == (4, 4, 1)
    assert small.c1.out_channels == 4 and small.c3.in_channels == 4


def test_conv_transpose_weight_dim1_owns_output():
    model, x = build(R.conv_transpose)
    oto = otofx.OTO(model, x)
    z = zig_with(oto, "up.weight", 1)
    assert z.rows == 6 and torch.equal(index(z, "bn.weight", 0), index(z, "up.weight", 1))
    zin = zig_with(oto, "up.weight", 0)
    assert zin is zig_with(oto, "c1.weight", 0)
    zero_rows(model, oto, [torch.tensor([0, 5]) if g is zin else torch.tensor([2]) for g in oto.groups])
    small = assert_exact(model, oto, fresh_like(x))
    assert (small.up.in_channels, small.up.out_channels) == (6, 5)


def test_group_norm_rows_are_norm_groups():
    model, x = build(R.group_norm_module)
    oto = otofx.OTO(model, x)
    z = zig_with(oto, "gn.weight", 0)
    assert z.rows == 4
    idx = index(z, "gn.weight", 0).sort(1).values
    assert sorted(map(tuple, idx.tolist())) == [(0, 1), (2, 3), (4, 5), (6, 7)]
    zero_rows(model, oto, [torch.tensor([0, 3])])
    small = assert_exact(model, oto, fresh_like(x))
    assert (small.gn.num_groups, small.gn.num_channels) == (2, 4)


def test_channel_shuffle_rows_take_one_channel_per_group():
    model, x = build(R.channel_shuffle_module)
    oto = otofx.OTO(model, x)
    z = zig_with(oto, "c1.weight", 0)
    assert z.rows == 4
    idx = index(z, "c1.weight", 0).sort(1).values
    assert sorted(map(tuple, idx.tolist())) == [(0, 4), (1, 5), (2, 6), (3, 7)]
    # after the shuffle, input channel i*4 + j sits at j*2 + i
    shuffled = index(z, "c2.weight", 1).sort(1).values
    assert sorted(map(tuple, shuffled.tolist())) == [(0, 1), (2, 3), (4, 5), (6, 7)]


def test_head_split_rows_form_a_grid():
    """[N, L, 8] -> [N, L, 2, 4]: one factor is the row axis, the other is tied, so rows are either
    whole heads ({0..3}, {4..7}) or feature j of every head ({j, j + 4}); either way the rewritten
    literal view sizes must match."""
    model, x = build(R.head_split_literal)
    oto = otofx.OTO(model, x)
    z = zig_with(oto, "l1.weight", 0)
    rows = sorted(map(tuple, index(z, "l1.weight", 0).sort(1).values.tolist()))
    assert rows in ([(0, 1, 2, 3), (4, 5, 6, 7)], [(0, 4), (1, 5), (2, 6), (3, 7)]), rows
    assert torch.equal(index(z, "l2.weight", 1), index(z, "l1.weight", 0))
    zero_rows(model, oto, [torch.tensor([1])])
    small = assert_exact(model, oto, fresh_like(x))
    left = 8 - len(rows[0])
    assert small.l1.out_features == left and small.l2.in_features == left
    assert f"reshape(2, 5, {left})" in small.code


def test_stack_then_flatten_interleaves():
    model, x = build(R.stack_then_flatten)
    oto = otofx.OTO(model, x)
    z = zig_with(oto, "a.weight", 0)
    assert z is zig_with(oto, "b.weight", 0)
    c = index(z, "a.weight", 0).reshape(-1)
    assert torch.equal(index(z, "b.weight", 0).reshape(-1), c)
    assert torch.equal(index(z, "c.weight", 1), torch.stack([2 * c, 2 * c + 1], 1))


def test_attention_ties_query_and_key_features():
    model, x = build(R.attention_matmul)
    oto = otofx.OTO(model, x)
    zq = zig_with(oto, "q.weight", 0)
    assert zq is zig_with(oto, "k.weight", 0) and zq.rows == 8
    assert torch.equal(index(zq, "q.weight", 0), index(zq, "k.weight", 0))
    zv = zig_with(oto, "v.weight", 0)
    assert zv.rows == 4 and torch.equal(index(zv, "o.weight", 1), index(zv, "v.weight", 0))


def test_squeeze_excitation_gate_joins_the_gated_channels():
    model, x = build(R.squeeze_excitation)
    oto = otofx.OTO(model, x)
    z = zig_with(oto, "c1.weight", 0)
    assert z is zig_with(oto, "fc2.weight", 0)
    for n, d in (("fc1.weight", 1), ("fc2.bias", 0), ("c2.weight", 1)):
        assert torch.equal(index(z, n, d), index(z, "c1.weight", 0))
    assert zig_with(oto, "fc1.weight", 0).rows == 4


def test_layer_scale_gamma_is_in_the_row():
    model, x = build(R.layer_scale)
    oto = otofx.OTO(model, x)
    z = zig_with(oto, "gamma", 0)
    assert z is zig_with(oto, "c1.weight", 0)
    assert torch.equal(index(z, "gamma", 0), index(z, "c1.weight", 0))


def test_embedding_owns_feature_columns():
    model, x = build(R.embedding_module)
    oto = otofx.OTO(model, x)
    z = zig_with(oto, "emb.weight", 1)
    assert z.rows == 8 and torch.equal(index(z, "l1.weight", 1), index(z, "emb.weight", 1))
    assert not any(n == "emb.weight" and d == 0 for g in oto.groups for n, d, _ in g.params), "vocabulary is pinned"


def test_split_pieces_are_separate_groups():
    model, x = build(R.split_function_sizes)
    oto = otofx.OTO(model, x)
    sizes = sorted((index(z, "c1.weight", 0).reshape(-1).min().item(), z.rows) for z in oto.groups)
    assert sizes == [(0, 2), (2, 4), (6, 2)]
    zero_rows(model, oto, [torch.tensor([0])] * len(oto.groups))
    small = assert_exact(model, oto, fresh_like(x))
    assert small.c1.out_channels == 5
    assert [small.ca.in_channels, small.cb.in_channels, small.cc.in_channels] == [1, 3, 1]


def test_output_is_pinned_and_reported():
    model, x = build(R.mlp)
    oto = otofx.OTO(model, x)
    assert not any(n == "l2.weight" and d == 0 for z in oto.groups for n, d, _ in z.params)
    assert any(p.reason == "model output" for p in oto.pinned)


def test_softmax_over_channels_is_reported():
    model, x = build(R.softmax_over_channels)
    oto = otofx.OTO(model, x)
    pins = [p for p in oto.pinned if "softmax" in p.reason]
    assert pins and pins[0].op == "softmax" and pins[0].channels >= 1


def test_channel_dropouts_pin_nothing_in_an_export_graph():
    """Dropout2d exports to aten.feature_dropout: its channels stay in their group (not pinned as unknown)."""
    model, x = build(R.unary_channel_dropouts_exported)
    oto = otofx.OTO(model, x)
    assert [p.reason for p in oto.pinned] == ["model output"]
    assert sorted(z.rows for z in oto.groups) == [6, 8]


def test_size_used_as_a_value_is_pinned():
    """x.sum(1) / x.size(1) is a mean over channels written by hand: the divisor changes if pruned."""

    def fwd(s, x):
        y = torch.relu(s.c1(x))
        return s.c2(x) + y.sum(1, keepdim=True) / y.size(1)

    model = randomize(Net(fwd, c1=conv(3, 8), c2=conv(3, 1)))
    oto = otofx.OTO(model, img())
    assert not oto.groups
    assert any("size" in p.reason for p in oto.pinned)


def test_user_pin():
    model, x = build(R.residual_block)
    oto = otofx.OTO(model, x, pin=["down"])
    listed = {(n, d) for z in oto.groups for n, d, _ in z.params}
    assert not any(n.startswith("down.") for n, _ in listed)
    assert ("conv2.weight", 0) not in listed and ("conv2.weight", 1) in listed
    assert any(p.op == "user" for p in oto.pinned)
    with pytest.raises(otofx.InputError):
        otofx.OTO(model, x, pin=["nope"])


# =============================================================================================
# (d) regressions: bugs this suite found in the rules, each with its minimal repro
# =============================================================================================


def _zero_and_check(model, x, seed=1):
    """The expected behaviour of a sound analysis: compress() after zeroing half the rows is exact."""
    randomize(model)
    oto = otofx.OTO(model, x)
    rows = zero_random_rows(model, oto, seed=seed)
    assert_exact(model, oto, fresh_like(x), smaller=sum(len(r) for r in rows) > 0)
    return oto


@pytest.mark.parametrize("factory", param_ids([f for f in FACTORIES if f.frontend == "export"]))
def test_export_compress_verifies(factory):
    model, x = build(factory)
    oto = otofx.OTO(model, x)
    assert oto.frontend == "export"
    zero_random_rows(model, oto, seed=1)
    assert_exact(model, oto, fresh_like(x), small=oto.compress())


@pytest.mark.parametrize("form", ["module", "functional"])
def test_bug_softmax_implicit_dim(form):
    sm = (lambda s, y: s.sm(y)) if form == "module" else (lambda s, y: F.softmax(y))
    model = Net(lambda s, x: s.c2(sm(s, s.c1(x))), c1=conv(3, 8), sm=nn.Softmax(), c2=conv(8, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Implicit dimension choice for softmax"
        _zero_and_check(model, img())


@pytest.mark.parametrize("op", ["cat", "stack"])
def test_bug_cat_stack_zero_mask(op):
    def fwd(s, x):
        y = s.c1(x)
        both = torch.cat([y, torch.sigmoid(y)], 0) if op == "cat" else torch.stack([y, torch.sigmoid(y)], 2)
        return both.sum(1)  # a contraction over the channels, with no weight to absorb a non-zero channel

    _zero_and_check(Net(fwd, c1=conv(3, 8)), img())


@pytest.mark.parametrize("form", ["module", "functional"])
def test_bug_hardtanh_nonzero_at_zero(form):
    ht = (lambda s, y: s.ht(y)) if form == "module" else (lambda s, y: F.hardtanh(y, 0.5, 2.0))
    model = Net(lambda s, x: s.c2(x) + ht(s, s.c1(x)).sum(1, keepdim=True), c1=conv(3, 8),
                ht=nn.Hardtanh(0.5, 2.0), c2=conv(3, 1))
    _zero_and_check(model, img())


def test_bug_buffer_is_not_zero_with_its_row():
    model = Net(lambda s, x: s.c2(x) + (s.c1(x) + s.offset).sum(1, keepdim=True), c1=conv(3, 8), c2=conv(3, 1))
    model.register_buffer("offset", torch.randn(8, 1, 1))
    _zero_and_check(model, img())


@pytest.mark.parametrize("spelling", ["method", "function"])
def test_bug_movedim_is_understood(spelling):
    mv = (lambda y, a, b: y.movedim(a, b)) if spelling == "method" else (lambda y, a, b: torch.moveaxis(y, a, b))

    def fwd(s, x):
        y = mv(torch.relu(s.c1(x)), 1, -1)  # channels last
        return s.c2(mv(torch.relu(s.fc(y)), -1, 1))

    model = randomize(Net(fwd, c1=conv(3, 8), fc=nn.Linear(8, 6), c2=conv(6, 4)))
    oto = otofx.OTO(model, img())
    assert not [p for p in oto.pinned if "cannot handle" in p.reason], [p.reason for p in oto.pinned]
    assert sorted(z.rows for z in oto.groups) == [6, 8]


@pytest.mark.parametrize("op", ["neg", "pow", "floordiv", "mod"])
def test_bug_tensor_operator_arith(op):
    f = {"neg": lambda y: -y, "pow": lambda y: y ** 2, "floordiv": lambda y: y // 0.5, "mod": lambda y: y % 0.5}[op]
    model = Net(lambda s, x: s.c2(f(s.c1(x))), c1=conv(3, 8), c2=conv(8, 4))
    oto = _zero_and_check(model, img())
    assert any(n == "c2.weight" and d == 1 for z in oto.groups for n, d, _ in z.params)


@pytest.mark.parametrize("op", ["add_", "sigmoid_"])
def test_bug_inplace_op_stale_zero_mask(op):
    def fwd(s, x):
        y = torch.relu(s.c1(x))
        y.add_(1.0) if op == "add_" else y.sigmoid_()
        return s.c2(x) + y.sum(1, keepdim=True)

    _zero_and_check(Net(fwd, c1=conv(3, 8), c2=conv(3, 1)), img())


@pytest.mark.parametrize("export", [False, True])
@pytest.mark.parametrize("view", ["slice", "select", "transpose"])
def test_bug_inplace_op_on_a_view_writes_its_base(view, export):
    """``y[..., 1:].add_(1)`` writes y through a view: a channel of y is no longer zero with its row, and
    the sum over channels after it must keep them (the view's base takes the written zeros)."""
    from rule_examples.common import _force_export

    def fwd(s, x):
        if export:
            _force_export(x)
        y = torch.relu(s.c1(x))
        v = {"slice": lambda: y[:, :, 1:], "select": lambda: y[:, :, 2], "transpose": lambda: y.transpose(1, 3)}[view]()
        v.add_(1.0)
        return s.c2(x) + y.sum(1, keepdim=True)

    oto = _zero_and_check(Net(fwd, c1=conv(3, 8), c2=conv(3, 1)), img())
    assert not any(n == "c1.weight" and d == 0 for z in oto.groups for n, d, _ in z.params)


@pytest.mark.parametrize("export", [False, True])
def test_bug_inplace_op_on_a_view_writes_other_views_of_its_base(export):
    """``t = y.transpose(1, 3)`` taken before ``y[:, :, 1:].add_(1)`` shares y's memory: read after the
    write, its channels are no longer zero with their rows, so the sum over them must keep them."""
    from rule_examples.common import _force_export

    def fwd(s, x):
        if export:
            _force_export(x)
        y = torch.relu(s.c1(x))
        t = y.transpose(1, 3)
        y[:, :, 1:].add_(1.0)
        return s.c2(x) + t.sum(3, keepdim=True).transpose(1, 3)

    oto = _zero_and_check(Net(fwd, c1=conv(3, 8), c2=conv(3, 1)), img())
    assert not any(n == "c1.weight" and d == 0 for z in oto.groups for n, d, _ in z.params)


@pytest.mark.parametrize("op", ["crop", "tail", "narrow"])
def test_bug_negative_bounds_on_unpruned_axes_are_specialised(op):
    f = {"crop": lambda y: y[:, :, 1:-1, 1:-1], "tail": lambda y: y[..., -3:],
         "narrow": lambda y: y.narrow(-1, -3, 2)}[op]
    model = randomize(Net(lambda s, x: s.c2(f(torch.relu(s.c1(x)))), c1=conv(3, 8), c2=conv(8, 4)))
    oto = otofx.OTO(model, img(hw=5))
    zero_random_rows(model, oto, seed=1)
    assert_exact(model, oto, img(hw=7))  # a fully convolutional model: any resolution is a valid input


# =============================================================================================
# (e) the registry
# =============================================================================================


def test_forms_say_what_the_op_is_beside_its_algebra():
    from otofx.passes.registry import FUNCTION_FORMS, METHOD_FORMS, MODULE_FORMS

    assert (MODULE_FORMS[nn.InstanceNorm2d].rule, MODULE_FORMS[nn.InstanceNorm2d].op) == ("batch_norm", "instance_norm")
    assert (MODULE_FORMS[nn.BatchNorm2d].rule, MODULE_FORMS[nn.BatchNorm2d].op) == ("batch_norm", "batch_norm")
    assert [MODULE_FORMS[c].op for c in (nn.ReLU, nn.Dropout, nn.LeakyReLU, nn.Conv2d)] == [
        "relu", "dropout", "leaky_relu", "conv2d"]
    assert METHOD_FORMS["to"].rule == "unary" and METHOD_FORMS["to"].op == "to"
    assert METHOD_FORMS["__iadd__"].op == FUNCTION_FORMS[torch.ops.aten.add_.Tensor].op == "add"


def test_aten_argument_names_come_from_the_schema():
    from otofx.passes.registry import FUNCTION_FORMS

    aten = torch.ops.aten
    assert FUNCTION_FORMS[aten.embedding.default].spec[:2] == ("weight", "input")  # ATen's order, not F's
    assert FUNCTION_FORMS[F.embedding].spec[:2] == ("input", "weight")
    assert "eps" in FUNCTION_FORMS[F.batch_norm].spec  # no longer lost in the unnamed rest
    assert FUNCTION_FORMS[aten.var.dim].spec == ("input", "dim", "unbiased", "keepdim")


def test_a_target_bound_twice_raises():
    from otofx.passes.registry import functions

    with pytest.raises(ValueError, match="already bound"):
        functions("unary", [torch.relu], ("input",))
    with pytest.raises(ValueError, match="already bound"):
        otofx.register_rule(nn.ReLU, "unary")


def _glu(ctx, input, dim=-1, meta=None, **_):
    """glu(x, dim) = a * sigmoid(b) for the halves a, b of dim: channels j and j + C/2 are one row; zero where a is."""
    d = dim % input.ndim
    a, b = np.split(input.ids[d], 2)
    ctx.tie(a, b)
    return input.with_axis(d, a, input.zero[d][: len(a)])


class GatedConv(nn.Module):
    """A user layer symbolic_trace cannot see into (a Python branch on a size)."""

    def __init__(self, cin, cout):
        super().__init__()
        self.conv = conv(cin, 2 * cout)
        self.dim = 1

    def forward(self, x):
        y = self.conv(x)
        if y.shape[self.dim] % 2:  # a traced size is a Proxy: no Python branch on it
            raise ValueError("GatedConv needs an even number of channels")
        return F.glu(y, self.dim)


@pytest.fixture
def glu_rule():
    """Registers the test's glu rule for F.glu, and forgets every registration afterwards."""
    from otofx.passes import registry

    made = []

    def register(target, rule, **kw):
        form = otofx.register_rule(target, rule, **kw)
        made.append(target)
        return form

    try:
        yield register
    finally:
        for t in made:
            registry.unregister(t)
        registry.RULES.pop("glu", None)


def test_register_rule_for_a_function(glu_rule):
    """F.glu has no built-in rule: its producer is pinned; with a rule, each pair of halves is one row."""
    model = randomize(Net(lambda s, x: s.c2(F.glu(s.c1(x), 1)), c1=conv(3, 8), c2=conv(4, 4)))
    assert not otofx.OTO(model, img()).groups
    form = glu_rule(F.glu, _glu, name="glu", keeps_axes=True)
    assert (form.rule, form.op, form.spec) == ("glu", "glu", ("input", "dim"))
    oto = otofx.OTO(model, img())
    assert [z.rows for z in oto.groups] == [4]
    idx = index(oto.groups[0], "c1.weight", 0)
    assert torch.equal(idx[:, 1] - idx[:, 0], torch.full((4,), 4))  # channel j with channel j + 4
    zero_random_rows(model, oto, seed=1)
    assert_exact(model, oto, fresh_like(img()))


def test_register_rule_for_a_layer(glu_rule):
    """A user layer bound to a rule becomes a graph leaf; its own parameters are bound by object."""

    from otofx.passes.channels import OWN, PINNED

    def gated(ctx, input, weight, bias, meta=None, **_):
        """conv then glu over channels: out channel j reads conv rows j and j + C/2, one row per pair."""
        w = ctx.param(weight, {0: OWN, 1: input.ids[1], 2: PINNED, 3: PINNED})
        a, b = np.split(w.ids[0], 2)
        ctx.tie(a, b)
        ctx.param(bias, {0: w.ids[0]})
        return input.with_axis(1, a, np.ones(len(a), dtype=bool))

    model = randomize(Net(lambda s, x: s.c2(s.g(torch.relu(s.c1(x)))), c1=conv(3, 6), g=GatedConv(6, 4),
                          c2=conv(4, 4)))
    glu_rule(GatedConv, gated, name="glu", reads_params=True,
             bind=lambda m, x: dict(input=x, weight=m.conv.weight, bias=m.conv.bias))
    oto = otofx.OTO(model, img())
    assert oto.frontend == "symbolic_trace"
    assert sorted(z.rows for z in oto.groups) == [4, 6]
    zero_random_rows(model, oto, seed=1)
    assert_exact(model, oto, fresh_like(img()))


@pytest.mark.parametrize("kind", ["declined", "crash-strict", "crash-lenient"])
def test_declining_is_not_crashing(kind, glu_rule, monkeypatch, caplog):
    from otofx.passes import RuleDeclined

    def picky(ctx, input, dim=-1, meta=None, **_):
        """a rule that declines (or crashes on) every call: its channels are pinned."""
        if kind == "declined":
            raise RuleDeclined("only the last axis")
        return 1 / 0

    glu_rule(F.glu, picky, name="glu")
    model = randomize(Net(lambda s, x: s.c2(F.glu(s.c1(x), 1)), c1=conv(3, 8), c2=conv(4, 4)))
    if kind == "crash-strict":
        with pytest.raises(ZeroDivisionError):
            otofx.OTO(model, img())
        return
    monkeypatch.setenv("OTOFX_STRICT_RULES", "0")
    with caplog.at_level("WARNING", logger="otofx"):
        oto = otofx.OTO(model, img())
    assert not oto.groups
    reasons = [p.reason for p in oto.pinned]
    if kind == "declined":
        assert any("declines this call: only the last axis" in r for r in reasons), reasons
        assert not [r for r in caplog.records if r.levelname == "WARNING"]
    else:
        assert any("cannot handle this call (ZeroDivisionError" in r for r in reasons), reasons
        assert any("rule 'glu' failed" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")


def test_a_rule_states_its_algebra():
    def mute(ctx, input, meta=None, **_):
        return input

    with pytest.raises(ValueError, match="channel algebra"):
        otofx.register_rule(F.glu, mute)
    from otofx.passes.registry import FUNCTION_FORMS, RULES

    assert "mute" not in RULES and F.glu not in FUNCTION_FORMS


@pytest.mark.parametrize("factory", ["pool_one_token_per_sample", "pool_one_token_per_sample_exported"])
def test_tokens_picked_by_index_tensors_keep_their_features(factory):
    """x[arange(B), idx] gathers the batch and token axes together; the stream's width stays one group."""
    model, x = build(getattr(R, factory))
    oto = otofx.OTO(model, x)
    assert sorted(z.rows for z in oto.groups) == [8], [p.reason for p in oto.pinned]
    assert not any("indexed by" in p.reason or "advanced indexing" in p.reason for p in oto.pinned)


@pytest.mark.parametrize("factory", ["pool_end_of_text_token", "pool_end_of_text_token_exported"])
def test_end_of_text_token_taken_along_the_tokens_keeps_its_features(factory):
    """take_along_dim with an index of size 1 off the token axis: the features pass, one group of 8."""
    model, x = build(getattr(R, factory))
    oto = otofx.OTO(model, x)
    assert sorted(z.rows for z in oto.groups) == [8], [p.reason for p in oto.pinned]


@pytest.mark.parametrize("factory", ["attention_pool_function", "attention_pool_function_packed"])
def test_functional_attention_pool_rows_are_heads_with_their_stream_block(factory):
    """F.multi_head_attention_forward splits the query's width into heads: each row is one head with its block
    of the pooled stream's channels; removing one leaves the model's own class with one head, exact."""
    model, x = build(getattr(R, factory))
    oto = otofx.OTO(model, x)
    assert sorted(z.rows for z in oto.groups) == [2], [(z.rows, [n for n, _, _ in z.params]) for z in oto.groups]
    (zig,) = oto.groups
    c1 = [i for n, d, i in zig.params if n == "c1.weight"][0]
    assert [sorted(r.tolist()) for r in c1] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    zero_rows(model, oto, [torch.tensor([1])])
    small = oto.compress(form="module")
    assert small.pool.heads == 1 and small.c1.out_channels == 4
    assert_exact(model, oto, fresh_like(x, 3), small=small)


@pytest.mark.parametrize("factory", ["expert_dispatch_by_setitem_exported", "expert_dispatch_by_index_put",
                                     "expert_dispatch_by_index_add", "expert_dispatch_by_index_add_exported",
                                     "expert_dispatch_by_index_copy"])
def test_tokens_written_back_by_index_keep_their_features(factory):
    """An MoE writes each expert's tokens back by index (``y[idx] += e(x[idx])``, index_put, index_add,
    index_copy): the token axis is written at data-given positions, the features are one group with the
    stream and both experts' outputs (8 rows; each expert's 8 output rows join it)."""
    model, x = build(getattr(R, factory))
    oto = otofx.OTO(model, x)
    assert sorted(z.rows for z in oto.groups) == [8], [p.reason for p in oto.pinned]
    (zig,) = oto.groups
    assert {n for n, _, _ in zig.params} >= {"inp.weight", "ea.weight", "eb.weight", "out.weight"}
    assert not any(p.op in ("index_put", "index_add") for p in oto.pinned if p.channels > 8), oto.pinned


def test_expert_dispatch_by_setitem_in_a_dynamo_graph():
    """dynamo records ``y[idx] += v`` as getitem, iadd and ``operator.setitem`` (which returns None and writes
    y): the backend removes the stream's zero rows through it."""
    import torch._dynamo

    import otofx.backend as B

    model, x = build(R.indexing.expert_dispatch_by_setitem_exported)
    model = randomize(model.eval())
    oto = otofx.OTO(model, x)
    zero_random_rows(model, oto, seed=1)
    with torch.no_grad():
        ref = model(x)
    torch._dynamo.reset()
    B.clear_results()
    graphs = []

    def inner(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    try:
        with torch.no_grad():
            y = torch.compile(model, backend="otofx", options={"inner": inner})(x)
        (res,) = B.results()
    finally:
        torch._dynamo.reset()
    assert any(n.target is operator.setitem for g in graphs for n in g.graph.nodes)
    assert res.pruned and res.rows_removed == 4, res.reason
    assert max_rel_diff(ref, y) < 1e-4


def test_rms_norm_of_a_self_product_per_head_keeps_heads_as_rows():
    """rsqrt(mean(x * x) + eps) over each head's width cannot blow up on a removed head (x * x >= 0)."""
    model, x = build(R.elementwise.per_head_rms_norm_of_a_self_product_keeps_heads)
    oto = otofx.OTO(model, x)
    assert sorted(z.rows for z in oto.groups) == [2], [p.reason for p in oto.pinned]
    assert not any(p.op == "singular" for p in oto.pinned)
