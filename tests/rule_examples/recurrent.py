"""Examples for the recurrent rule (nn.LSTM, nn.GRU, nn.RNN): passes/rules/recurrent.py."""
from __future__ import annotations

import torch
import torch.nn as nn

from .common import N, Net, example


def _seq(rnn: nn.Module, read_state: bool = False):
    """Linear -> ReLU -> Linear -> recurrent layer -> Linear on its output (and on the last layer's final state)."""
    dirs = 2 if rnn.bidirectional else 1
    hidden = getattr(rnn, "proj_size", 0) or rnn.hidden_size

    def fwd(s, x):
        o, st = s.rnn(s.inp(x))
        y = s.out(o)
        if read_state:
            h = st[0] if isinstance(s.rnn, nn.LSTM) else st
            y = y + s.head(h[-1]).unsqueeze(1 if s.rnn.batch_first else 0)
        return y

    members = dict(inp=nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, rnn.input_size)), rnn=rnn, out=nn.Linear(hidden * dirs, 3))
    if read_state:
        members["head"] = nn.Linear(hidden, 3)
    x = torch.randn(N, 6, 5) if rnn.batch_first else torch.randn(6, N, 5)
    return Net(fwd, **members), x


@example("recurrent")
def lstm_bidirectional_two_layers():
    return _seq(nn.LSTM(6, 8, num_layers=2, bidirectional=True))


@example("recurrent")
def gru_batch_first_no_bias():
    return _seq(nn.GRU(6, 8, num_layers=2, batch_first=True, bias=False))


@example("recurrent")
def rnn_relu_bidirectional():
    return _seq(nn.RNN(6, 8, nonlinearity="relu", bidirectional=True))


@example("recurrent")
def lstm_state_read():
    """h_n is read: unit j of every layer and direction is one row."""
    return _seq(nn.LSTM(6, 8, num_layers=2, bidirectional=True), read_state=True)


@example("recurrent", expect_pin="proj_size > 0")
def lstm_projection_pinned():
    return _seq(nn.LSTM(6, 8, proj_size=4))
