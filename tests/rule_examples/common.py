"""What every family of rule examples shares: the registry ``EXAMPLES``, ``example``, ``Net``, small
inputs and layers, and the attention helpers several families use."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
from torch import Tensor

EXAMPLES: dict[str, list[Callable[[], tuple[nn.Module, Tensor]]]] = {}

N, CIN, HW = 2, 3, 5


class Net(nn.Module):
    """A module whose forward is ``fwd(self, x)``; keyword arguments become submodules/parameters."""

    def __init__(self, fwd, **members):
        super().__init__()
        self._fwd = fwd
        for k, v in members.items():
            setattr(self, k, v)

    def forward(self, x):
        return self._fwd(self, x)


def _force_export(x: Tensor) -> None:
    """A shape test that ``torch.fx.symbolic_trace`` cannot take but ``torch.export`` can."""
    if x.shape[-1] < 0:
        raise ValueError("negative size")


def example(*rules: str, pinned: str | None = None, expect_pin: str | None = None, frontend: str = "symbolic_trace"):
    """Register the decorated factory under every rule in ``rules``."""

    def deco(fn):
        fn.pinned = pinned
        fn.expect_pin = expect_pin
        fn.frontend = frontend
        for r in rules:
            EXAMPLES.setdefault(r, []).append(fn)
        return fn

    return deco


def img(c: int = CIN, hw: int = HW) -> Tensor:
    return torch.randn(N, c, hw, hw)


def conv(cin: int, cout: int, k: int = 3, **kw) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, padding=k // 2, **kw)


H_, HD_ = 2, 4  # heads, head width


E_ = H_ * HD_


def _heads(s, t, x):
    """[N, L, E] -> [N, H, L, hd]"""
    return t.view(x.shape[0], x.shape[1], H_, HD_).transpose(1, 2)


def _merge(o, x):
    return o.transpose(1, 2).reshape(x.shape[0], x.shape[1], E_)


def _qkvo():
    return dict(q=nn.Linear(6, E_), k=nn.Linear(6, E_), v=nn.Linear(6, E_), o=nn.Linear(E_, 3))


def _mha(batch_first=True, need_weights=False, average=True, kdim=None, bias_kv=False, mask=False, use_weights=False,
         force_export=False):
    def fwd(s, x):
        if force_export:
            _force_export(x)
        h = s.inp(x)  # [N, L, E] (or [L, N, E])
        kv = s.kv(x) if kdim else h
        o, w = s.mha(h, kv, kv, need_weights=need_weights, average_attn_weights=average,
                     key_padding_mask=s.pad if mask else None)
        y = s.out(o)
        if use_weights:
            # per-head weights are summed over heads through a per-head gate (zero with its head's row)
            y = y + s.wl(w.transpose(-1, -2) if average else (w * s.g).sum(1))[..., :1].sum(-1, keepdim=True)
        return y

    x = torch.randn(N, 5, 6) if batch_first else torch.randn(5, N, 6)
    members = dict(inp=nn.Linear(6, E_), mha=nn.MultiheadAttention(E_, H_, batch_first=batch_first, kdim=kdim,
                                                                   vdim=kdim, add_bias_kv=bias_kv),
                   out=nn.Linear(E_, 3))
    if kdim:
        members["kv"] = nn.Linear(6, kdim)
    if use_weights:
        members["wl"] = nn.Linear(5, 5)
        if not average:
            members["g"] = nn.Parameter(torch.rand(H_, 1, 1) + 0.5)
    m = Net(fwd, **members)
    m.register_buffer("pad", torch.tensor([[False, False, False, False, True]] * N))
    return m, x
