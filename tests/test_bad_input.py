"""Unusual but valid models: each gives a correct result or a clear otofx error, never a wrong model."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import otofx
from helpers import assert_exact, randomize, snapshot, zero_random_rows


def _check(model, x, expect_rows=None):
    randomize(model)
    model.eval()
    before = snapshot(model)
    oto = otofx.OTO(model, x)
    assert snapshot(model) == before
    if expect_rows is not None:
        assert sorted(z.rows for z in oto.groups) == sorted(expect_rows)
    zero_random_rows(model, oto, seed=0)
    assert_exact(model, oto, x)
    return oto


def test_no_prunable_layer():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())  # its only channels are the model output
    oto = otofx.OTO(m, torch.randn(1, 3, 6, 6))
    assert oto.groups == ()
    assert any(p.reason == "model output" for p in oto.pinned)
    small = oto.compress()
    torch.testing.assert_close(small(torch.ones(1, 3, 6, 6)), m(torch.ones(1, 3, 6, 6)))


def test_tied_weights():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(6, 8)
            self.b = nn.Linear(8, 8)
            self.c = nn.Linear(8, 3)
            self.b2 = nn.Linear(8, 8)
            self.b2.weight = self.b.weight  # one Parameter, two layers

        def forward(self, x):
            h = torch.relu(self.a(x))
            return self.c(torch.relu(self.b(h)) + torch.relu(self.b2(h)))

    oto = _check(Tied(), torch.randn(4, 6))
    small = oto.compress()
    assert small.b.weight is small.b2.weight, "tied weights must stay tied"


def test_layer_called_twice():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.body = nn.Conv2d(8, 8, 3, padding=1)
            self.head = nn.Conv2d(8, 2, 1)

        def forward(self, x):
            h = torch.relu(self.stem(x))
            h = torch.relu(self.body(h))
            h = torch.relu(self.body(h))  # same layer again: its in and out channels are one space
            return self.head(h)

    _check(Twice(), torch.randn(2, 3, 6, 6), expect_rows=[8])


def test_integer_inputs_embedding():
    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(20, 12)
            self.fc = nn.Linear(12, 16)
            self.out = nn.Linear(16, 5)

        def forward(self, ids):
            return self.out(torch.relu(self.fc(self.emb(ids)))).mean(1)

    _check(Tokens(), torch.randint(0, 20, (3, 7)), expect_rows=[12, 16])


def test_buffers_that_are_not_bn_statistics():
    class Offsets(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(3, 8, 3, padding=1)
            self.c2 = nn.Conv2d(8, 4, 3, padding=1)
            self.register_buffer("shift", torch.randn(1, 8, 1, 1))
            self.register_buffer("scale", torch.rand(1, 8, 1, 1) + 0.5)

        def forward(self, x):
            return self.c2(torch.relu(self.c1(x) * self.scale + self.shift))

    oto = _check(Offsets(), torch.randn(2, 3, 6, 6), expect_rows=[8])
    small = oto.compress()
    assert small.shift.shape[1] == small.scale.shape[1] == small.c1.out_channels


def test_deprecated_spectral_norm_is_a_clear_error_and_parametrizations_are_reported():
    from otofx.errors import InputError

    """torch.nn.utils.spectral_norm recomputes the weight in a hook (no parameter to slice): a clear
    error naming the module and the fold; the parametrizations form is kept whole, and the pin report
    names every such module and its parametrisation (an unknown module used to go unreported once its
    input was pinned). Weight norm, in either form, is followed (tests/test_weight_norm.py)."""
    import warnings

    from torch.nn.utils import parametrizations

    def net(wrap):
        return nn.Sequential(wrap(nn.Conv1d(1, 8, 3, padding=1)), nn.ReLU(), wrap(nn.Conv1d(8, 1, 3, padding=1)))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        old = net(torch.nn.utils.spectral_norm)
    with pytest.raises(InputError, match=r"module '0' uses torch.nn.utils.spectral_norm.*remove_spectral_norm"):
        otofx.OTO(old, torch.randn(1, 1, 16))
    oto = otofx.OTO(net(parametrizations.spectral_norm), torch.randn(1, 1, 16))
    reason = ("'weight' by _SpectralNorm: a parametrisation otofx has no rule for (it knows "
              "torch.nn.utils.parametrizations.weight_norm and torch.nn.utils.weight_norm on conv and linear layers)")
    assert [(p.node, p.reason) for p in oto.pinned if p.node != "output"] == [("_0", reason), ("_2", reason)]


class _BranchOnData(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 4, 3)

    def forward(self, x):
        length = (x[0, 0] != 0).sum()
        if length <= 3:  # the data-dependent branch (EnCodec's _pad1d)
            return self.conv(torch.nn.functional.pad(x, (1, 1), mode="reflect"))
        return self.conv(x)


def test_capture_error_names_the_line_that_branches_on_data(monkeypatch):
    """EnCodec's encoder: neither front-end captures it (draft_export fails there too); the error
    names the user's line torch's guard was raised at, not only the symbolic condition."""
    import otofx.capture as capture

    monkeypatch.setattr(capture, "_draft", lambda *a, **k: None)  # NB: as on EnCodec's encoder
    with pytest.raises(otofx.CaptureError) as info:
        otofx.OTO(_BranchOnData(), torch.randn(2, 2, 8))
    msg = str(info.value)
    assert "could not capture _BranchOnData" in msg
    assert "test_bad_input.py:" in msg and "in forward: `if length <= 3:" in msg, msg
