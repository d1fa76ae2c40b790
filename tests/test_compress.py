"""compress(): all-zero groups, repeated calls, saving, state_dict, export, the user's model untouched."""
from __future__ import annotations

import io

import pytest
import torch
import torch.nn as nn

import otofx
from helpers import assert_exact, n_params, randomize, snapshot, zero_random_rows

torchvision = pytest.importorskip("torchvision")


def _model(name):
    kwargs = {"aux_logits": False, "init_weights": True} if name == "googlenet" else {}
    m = torchvision.models.get_model(name, weights=None, **kwargs).eval()
    randomize(m)
    return m


@pytest.mark.parametrize("name", ["resnet18", "shufflenet_v2_x0_5", "googlenet", "regnet_y_400mf", "convnext_tiny"])
def test_every_row_zero_keeps_a_working_model(name):
    m = _model(name)
    x = torch.randn(2, 3, 64, 64)
    oto = otofx.OTO(m, x)
    zero_random_rows(oto.model, oto, seed=0, fraction=1.0)
    small = assert_exact(m, oto, x)
    assert n_params(small) < n_params(m) // 2


def test_compress_twice_and_after_more_zeros():
    m = _model("resnet18")
    x = torch.randn(1, 3, 32, 32)
    oto = otofx.OTO(m, x)
    zero_random_rows(oto.model, oto, seed=0, fraction=0.25)
    first = assert_exact(m, oto, x)
    again = assert_exact(m, oto, x)
    assert n_params(first) == n_params(again)
    zero_random_rows(oto.model, oto, seed=1, fraction=0.25)
    third = assert_exact(m, oto, x)
    assert n_params(third) < n_params(first)


def test_no_zero_rows_is_identity():
    m = _model("mobilenet_v3_small")
    x = torch.randn(1, 3, 32, 32)
    small = otofx.OTO(m, x).compress()
    assert n_params(small) == n_params(m)
    with torch.no_grad():
        torch.testing.assert_close(small(x), m(x), rtol=1e-5, atol=1e-6)


def test_save_load_state_dict_and_export():
    m = _model("resnet18")
    x = torch.randn(1, 3, 32, 32)
    oto = otofx.OTO(m, x)
    zero_random_rows(oto.model, oto, seed=2, fraction=0.5)
    before = snapshot(m)
    small = oto.compress()
    assert snapshot(m) == before, "compress() mutated the model"
    with torch.no_grad():
        ref = small(x)
    buf = io.BytesIO()
    torch.save(small, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), ref)
    # the state_dict matches the module shapes: it loads into a fresh copy of itself
    loaded.load_state_dict(small.state_dict())
    conv = small.get_submodule("layer1.0.conv1")
    assert conv.weight.shape == (conv.out_channels, conv.in_channels // conv.groups, 3, 3)
    bn = small.get_submodule("layer1.0.bn1")
    assert bn.running_mean.shape == (bn.num_features,) == (conv.out_channels,)
    ep = torch.export.export(small, (x,))
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), ref)


def test_compressed_model_trains_further():
    m = _model("resnet18").train()
    x = torch.randn(4, 3, 32, 32)
    oto = otofx.OTO(m, x)
    zero_random_rows(oto.model, oto, seed=3, fraction=0.5)
    small = oto.compress()
    assert small.training
    opt = torch.optim.SGD(small.parameters(), lr=0.1)
    loss = small(x).logsumexp(1).mean()
    loss.backward()
    opt.step()


def test_graph_form_keeps_per_module_training_flags():
    """A BatchNorm the user froze in eval mode stays in eval mode in the compressed graph."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.BatchNorm2d(4))
    model.train()
    model[1].eval()
    oto = otofx.OTO(model, torch.randn(2, 3, 8, 8))
    with torch.no_grad():
        model[0].weight[:3] = 0
        model[1].weight[:3] = 0
        model[1].bias[:3] = 0
    small = oto.compress(form="graph", verify=False)
    flags = {n: m.training for n, m in small.named_modules()}
    assert small.training and flags["1"] is False and flags["4"] is True



class DictInput(nn.Module):
    """Reads its image out of a dict (a data loader's batch): the first conv's channels are a group
    like every other."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.fc = nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 4)

    def features(self, image):
        return torch.relu(self.c2(torch.relu(self.b1(self.c1(image))))).mean((2, 3))

    def forward(self, batch):
        return {"logits": self.fc(self.features(batch["image"])) * batch["scale"]}


class TupleInput(DictInput):
    def forward(self, batch):
        return self.fc(self.features(batch.image))


def test_container_inputs_leave_no_channel_pinned(caplog):
    from collections import namedtuple

    Pair = namedtuple("Pair", "image label")
    x = torch.randn(2, 3, 8, 8)
    for cls, batch in ((DictInput, {"image": x, "scale": torch.tensor(2.0)}), (TupleInput, Pair(x, torch.zeros(2)))):
        torch.manual_seed(0)
        m = randomize(cls().eval())
        with caplog.at_level("WARNING", logger="otofx"):
            oto = otofx.OTO(m, (batch,))
        assert "Please report" not in caplog.text
        assert sorted(z.rows for z in oto.groups) == [8, 8], oto.pinned
        zero_random_rows(oto.model, oto, seed=0)
        assert_exact(m, oto, (batch,))


class SharedDepthwise(nn.Module):
    """One depthwise conv called on two tensors (coat's shared conv_list): the rewrite fixes it at
    both call sites, and its groups were shrunk twice."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 16, 1), nn.Conv2d(3, 16, 1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.head(torch.relu(self.dw(self.a(x))) + torch.relu(self.dw(self.b(x)))).mean((2, 3))


class SizeOfAnother(nn.Module):
    """``q.reshape(B, N, heads, C // heads)`` with C read off another tensor (twins, volo): C's tensor
    loses rows, q does not, so the reshape needs the literal width."""

    def __init__(self):
        super().__init__()
        self.inp, self.out, self.q = nn.Linear(3, 16), nn.Linear(16, 5), nn.Linear(3, 16)

    def forward(self, x):
        h = torch.relu(self.inp(x))
        b, n, c = h.shape
        return self.out(h), self.q(x).reshape(b, n, 4, c // 4)


@pytest.mark.parametrize("cls, shape", [(SharedDepthwise, (2, 3, 8, 8)), (SizeOfAnother, (2, 6, 3))])
def test_rewrites_of_shared_modules_and_borrowed_sizes(cls, shape):
    torch.manual_seed(0)
    m = randomize(cls().eval())
    x = torch.randn(shape)
    oto = otofx.OTO(m, x)
    zero_random_rows(oto.model, oto, seed=0)
    for form in ("auto", "graph"):
        small = oto.compress(form=form)
        assert_exact(m, oto, x, small=small)
        assert_exact(m, oto, torch.randn(3, *shape[1:]), small=small)
