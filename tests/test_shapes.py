"""propagate_shapes' fast paths agree with torch's own meta kernels (shape, dtype, layout).

Strides are compared on axes of size > 1 only: a size-1 axis's stride never changes what a later
view or reshape may do.
"""
from __future__ import annotations

import operator

import torch
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st

import otofx
from otofx.capture import LeafTracer
from otofx.passes.shapes import _conv_shape, _fast_binary, _fast_cat, _fast_inplace, annotate_shapes
from otofx.capture import capture
from helpers import zero_rows


def _layout(t: torch.Tensor) -> tuple:
    return tuple(s for s, n in zip(t.stride(), t.shape) if n > 1)


@st.composite
def _meta_operand(draw, shape):
    """A meta tensor of ``shape`` (or a broadcastable part of it) stored in a random axis order."""
    if draw(st.booleans()):
        k = draw(st.integers(0, len(shape)))
        shape = [draw(st.sampled_from([1, d])) for d in shape[k:]]
    perm = draw(st.permutations(range(len(shape))))
    base = torch.empty([shape[i] for i in perm], device="meta")
    return base.permute([perm.index(i) for i in range(len(shape))])


@st.composite
def _binary_case(draw):
    shape = draw(st.lists(st.integers(1, 3), min_size=1, max_size=4))
    a = draw(_meta_operand(shape))
    b = draw(st.one_of(_meta_operand(shape), st.sampled_from([2, 1.5])))
    if draw(st.booleans()):
        a, b = b, a
    return draw(st.sampled_from([operator.add, operator.mul, operator.truediv, torch.sub])), a, b


@given(_binary_case())
def test_fast_binary_matches_torch(case):
    op, a, b = case
    fast = _fast_binary(op, (a, b), {})
    if fast is None:
        return
    ref = op(a, b)
    assert fast.shape == ref.shape and fast.dtype == ref.dtype
    assert _layout(fast) == _layout(ref), (a.stride(), getattr(b, "stride", lambda: b)(), fast.stride(), ref.stride())


def test_fast_binary_takes_the_common_layouts():
    nhwc = torch.empty(1, 5, 6, 8, device="meta").permute(0, 3, 1, 2)
    scale = torch.empty(8, 1, 1, device="meta")
    assert _fast_binary(operator.mul, (scale, nhwc), {}) is not None  # convnext's layer scale
    assert _fast_binary(operator.add, (nhwc, nhwc), {}) is not None
    assert _fast_binary(operator.add, (nhwc, torch.empty(1, 8, 5, 6, device="meta")), {}) is None  # mixed: torch decides


@given(st.integers(1, 3), st.sampled_from([0, 1, 2, "same", "valid"]), st.integers(1, 3), st.integers(1, 2),
       st.integers(1, 3), st.booleans(), st.lists(st.integers(1, 9), min_size=3, max_size=3), st.booleans())
def test_conv_shape_matches_meta_kernel(k, padding, stride, dilation, kernel, depthwise, sizes, channels_last):
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[k - 1]
    stride = 1 if padding == "same" else stride
    m = conv(4, 4 if depthwise else 6, kernel, stride=stride, padding=padding, dilation=dilation,
             groups=4 if depthwise else 1).to("meta")
    x = torch.empty(2, 4, *sizes[:k], device="meta")
    if k == 2 and channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    shape = _conv_shape(m, x)
    try:
        ref = m(x)
    except RuntimeError:
        assert shape is None
        return
    if shape is not None:
        assert tuple(ref.shape) == shape and ref.is_contiguous()


@given(st.sampled_from([operator.iadd, operator.isub, operator.imul, operator.itruediv]),
       st.sampled_from([torch.float32, torch.int64]), st.sampled_from([torch.float32, torch.int64]),
       st.sampled_from([(2, 3), (3,), (1, 3), (2, 1), ()]), st.booleans())
def test_fast_inplace_matches_torch(op, da, db, bshape, scalar):
    a = torch.empty(2, 3, dtype=da, device="meta").t().contiguous().t()  # a non-contiguous target
    b = (2 if da == torch.int64 else 1.5) if scalar else torch.empty(bshape, dtype=db, device="meta")
    fast = _fast_inplace(op, (a, b), {})
    try:
        ref = op(a.clone(), b)
    except RuntimeError:
        assert fast is None
        return
    if fast is not None:
        assert fast is a and ref.shape == a.shape and ref.dtype == a.dtype


def test_layer_scale_parameter_is_one_get_attr():
    """A parameter read outside a leaf module (convnext's layer scale) is traced as one get_attr."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 1)
            self.gamma = nn.Parameter(torch.ones(4, 1, 1))
            self.register_buffer("shift", torch.zeros(4, 1, 1))

        def forward(self, x):
            return self.gamma * self.conv(x) + self.shift + self.gamma

    model = nn.Sequential(Block(), Block())
    gm = LeafTracer().trace(model)
    attrs = sorted(n.target for n in gm.nodes if n.op == "get_attr")
    assert attrs == ["0.gamma", "0.shift", "1.gamma", "1.shift"]


def test_linear_on_permuted_input_and_convnext_shapes():
    """Shapes on a LayerNorm2d-style block (permute, Linear, permute back, layer scale) equal a real run."""

    class CN(nn.Module):
        def __init__(self):
            super().__init__()
            self.dw = nn.Conv2d(8, 8, 7, padding=3, groups=8)
            self.norm = nn.LayerNorm(8)
            self.fc1 = nn.Linear(8, 16)
            self.fc2 = nn.Linear(16, 8)
            self.gamma = nn.Parameter(torch.ones(8, 1, 1))

        def forward(self, x):
            y = self.dw(x).permute(0, 2, 3, 1)
            y = self.fc2(torch.relu(self.fc1(self.norm(y)))).permute(0, 3, 1, 2)
            return (x + self.gamma * y).flatten(1).view(2, -1)

    model, x = CN(), torch.randn(2, 8, 5, 5)
    cap = capture(model, x)
    annotate_shapes(cap.gm, cap.args, cap.kwargs)
    real = {}
    interp = torch.fx.Interpreter(cap.gm)
    orig = interp.run_node

    def record(n):
        real[n.name] = out = orig(n)
        return out

    interp.run_node = record
    interp.run(x)
    for n in cap.gm.graph.nodes:
        if isinstance(real.get(n.name), torch.Tensor):
            v = n.meta["val"]
            assert v.shape == real[n.name].shape and _layout(v) == _layout(real[n.name]), n.name
    otofx.OTO(model, x)  # and the analysis runs on it


@st.composite
def _cat_case(draw):
    nd = draw(st.integers(1, 4))
    dim = draw(st.integers(-nd, nd - 1))
    base = draw(st.lists(st.integers(1, 3), min_size=nd, max_size=nd))
    tensors = []
    shared = draw(st.permutations(range(nd)))  # one storage order for all (channels_last, say), or each its own
    own = draw(st.booleans())
    for _ in range(draw(st.integers(1, 4))):
        shape = list(base)
        shape[dim] = draw(st.integers(0, 3))
        perm = draw(st.permutations(range(nd))) if own else shared
        t = torch.empty([shape[i] for i in perm], device="meta").permute([perm.index(i) for i in range(nd)])
        if draw(st.integers(0, 4)) == 0:
            t = t.to(torch.float64)
        tensors.append(t)
    target = draw(st.sampled_from([torch.cat, torch.ops.aten.cat.default]))
    return target, tensors, dim, draw(st.booleans())


@given(_cat_case())
def test_fast_cat_matches_torch(case):
    target, tensors, dim, as_kwarg = case
    args, kwargs = ((tensors,), {"dim": dim}) if as_kwarg else ((tensors, dim), {})
    fast = _fast_cat(target, args, kwargs)
    try:
        ref = target(*args, **kwargs)
    except (RuntimeError, IndexError):
        assert fast is None  # torch refuses it: the fast path must leave it to torch's error
        return
    if fast is not None:
        assert fast.shape == ref.shape and fast.dtype == ref.dtype
        # NB: the stride of a size-1 dim is free (torch 2.11 and 2.14 give it differently); no view reads it
        assert [s for s, n in zip(fast.stride(), fast.shape) if n > 1] == [s for s, n in zip(ref.stride(), ref.shape) if n > 1]


def test_fast_cat_takes_densenet_concats():
    a, b = torch.empty(1, 64, 7, 7, device="meta"), torch.empty(1, 32, 7, 7, device="meta")
    out = _fast_cat(torch.cat, ([a, b], 1), {})
    assert out is not None and tuple(out.shape) == (1, 96, 7, 7)
    cl = [t.to(memory_format=torch.channels_last) for t in (a, b)]  # torch keeps this layout
    out = _fast_cat(torch.cat, (cl, 1), {})
    assert out is None or out.stride() == torch.cat(cl, 1).stride()


class _ChecksValues(nn.Module):
    """Reads a value of its input (``.item()``: torch.export keeps it for the check) before the layers; a
    batch norm in training mode would update its statistics on any real run."""

    def __init__(self):
        super().__init__()
        self.a, self.bn, self.b = nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 2)

    def forward(self, x):
        n = (x[:, 0] > -1e9).sum().item()
        torch._check(n >= 1)
        return self.b(torch.relu(self.bn(self.a(x))))


def test_values_read_fall_back_to_a_real_run_that_changes_nothing():
    """``.item()`` cannot run on meta tensors: the shapes come from one run on the real inputs and
    weights, and the model's buffers (batch statistics in training mode) stay as they were."""
    torch.manual_seed(0)
    m = _ChecksValues().train()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-1, 1)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(8, 4)
    oto = otofx.OTO(m, x)
    assert [z.rows for z in oto.groups] == [6]
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    zero_rows(m, oto, [torch.arange(3)])
    small = oto.compress()
    m.eval(), small.eval()
    with torch.no_grad():
        torch.testing.assert_close(small(x), m(x), rtol=1e-5, atol=1e-6)
    assert small.get_parameter("b.weight").shape == (2, 3)


def test_values_read_on_meta_weights_name_the_node():
    """Without weights (the meta device) there is nothing to run for real: the error names the node."""
    with torch.device("meta"):
        m = _ChecksValues()
    try:
        otofx.OTO(m, torch.randn(8, 4))
    except Exception as e:  # noqa: BLE001
        assert "item" in str(e), e
    else:
        raise AssertionError("a graph reading a value analysed on the meta device")
