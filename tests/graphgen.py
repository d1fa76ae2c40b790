"""Random small CNN-like DAGs, with transformer blocks among them, for property tests of otofx.

One builder, two sources of choices:

* :func:`graphs` -- a hypothesis strategy; every choice is a hypothesis draw, so a failing example
  shrinks to a short graph with the simplest op kinds (the first entry of every choice list);
* :func:`random_spec` -- the same builder driven by ``random.Random(seed)``, for plain seeded fuzzing.

Both give a :class:`GraphSpec`: the input shape, a list of :class:`Op` records and a weight seed. Its
repr is one line per op (``v3 = conv(v1, out=6, k=3, stride=2, groups=2) -> 6x4x4``), which is what a
hypothesis failure report prints. ``spec.build()`` returns ``(model, x)``: a :class:`GenModel` (an
``nn.Module`` whose ``forward`` walks the records; it traces with ``torch.fx.symbolic_trace``) with
random weights and non-trivial BN statistics / biases (``helpers.randomize``), and an input
``[2, C, H, W]``.

Shapes are tracked as ``(C, H, W)`` per value (batch 2 throughout). Inputs of merging ops (add,
cat) are picked among all earlier values of matching shape; when none matches, an adapter
(``resize`` to the spatial size, then a 1x1 ``conv`` to the channel count) is emitted first, so
branches that merge later are common.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import randomize

B = 2
MAX_C = 8  # channels a conv/linear produces
MAX_CAT_C = 16  # channels a concat may produce
MAX_HW = 16
MAX_LAYERS = 25

ACTIVATIONS = ("ReLU", "ReLU6", "GELU", "SiLU", "Hardswish", "Hardsigmoid", "Sigmoid", "Tanh", "LeakyReLU",
               "PReLU", "ELU", "Mish")
# activations with an ``inplace`` flag (never applied to the model input or a view of it: that would
# mutate the caller's x; applied to a split piece of anything else, it writes through to the base)
_INPLACE = ("ReLU", "ReLU6", "SiLU", "Hardswish", "Hardsigmoid", "LeakyReLU", "ELU", "Mish")
# functional spellings (so the function/method forms of the rules are exercised too)
_FUNCTIONAL = {
    "ReLU": ("F.relu", F.relu), "GELU": ("F.gelu", F.gelu), "SiLU": ("F.silu", F.silu),
    "Sigmoid": ("torch.sigmoid", torch.sigmoid), "Tanh": ("torch.tanh", torch.tanh),
    "Hardswish": ("F.hardswish", F.hardswish), "LeakyReLU": ("F.leaky_relu", F.leaky_relu),
    "Mish": ("F.mish", F.mish), "ReLU6": ("F.relu6", F.relu6),
}


# ---------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------


def _fmt_shape(s) -> str:
    if s is None:
        return "tuple"
    return "x".join(str(d) for d in s)


@dataclass(frozen=True)
class Op:
    """One value of the graph: ``v{id} = kind(inputs..., **args)`` with output shape ``shape`` (C, H, W)."""

    id: int
    kind: str
    inputs: tuple
    args: tuple = ()  # ((key, value), ...), ordered, hashable
    shape: tuple | None = None  # (C, H, W) of a 4-D output, (F,) of a 2-D one, None for a tuple

    @property
    def a(self) -> dict:
        return dict(self.args)

    def __repr__(self) -> str:
        parts = [f"v{i}" for i in self.inputs] + [f"{k}={v!r}" for k, v in self.args]
        return f"v{self.id} = {self.kind}({', '.join(parts)}) -> {_fmt_shape(self.shape)}"


@dataclass(frozen=True)
class GraphSpec:
    in_shape: tuple  # (C, H, W)
    ops: tuple
    seed: int = 0
    out: int = field(default=-1)

    @property
    def n_layers(self) -> int:
        return sum(_n_modules(op) for op in self.ops)

    def __repr__(self) -> str:
        lines = [f"GraphSpec(seed={self.seed}, input v0: {B}x{_fmt_shape(self.in_shape)}, {self.n_layers} layers,"]
        lines += [f"    {op!r}" for op in self.ops]
        lines.append(f"    return v{self.output})")
        return "\n".join(lines)

    def _repr_pretty_(self, p, cycle) -> None:  # hypothesis' failure report uses this
        p.text(repr(self))

    @property
    def output(self) -> int:
        return self.out if self.out >= 0 else self.ops[-1].id

    def build(self, seed: int | None = None):
        """``(model, x)``: random weights from ``seed`` (default ``self.seed``), randomised BN/bias, eval mode."""
        seed = self.seed if seed is None else seed
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = GenModel(self)
        randomize(model, seed)
        model.eval()
        g = torch.Generator().manual_seed(seed + 1)
        x = torch.randn((B, *self.in_shape), generator=g)
        return model, x


# ---------------------------------------------------------------------------------------------
# The module
# ---------------------------------------------------------------------------------------------


def _act_module(name: str, c: int, prelu: int = 1, inplace: bool = False) -> nn.Module:
    if name == "PReLU":
        return nn.PReLU(prelu if prelu == 1 else c)
    return getattr(nn, name)(inplace=True) if inplace else getattr(nn, name)()


def _n_modules(op: Op) -> int:
    a = op.a
    k = op.kind
    if k in ("conv", "convT", "bn", "gn", "linear_cl", "ln_cl", "pool"):
        return 1
    if k == "act":
        return 1 if a.get("form", "module") == "module" else 0
    if k == "interp":
        return 1 if a.get("form") == "module" else 0
    if k == "se":
        return 4
    if k == "head_mlp":
        return 3
    if k == "head_gap":
        return 1
    if k == "attn":
        return (1 if a["form"] == "mha" else 4) + (2 if a["mlp"] else 0) + (1 if a["ln"] else 0) + (1 if a["form"] == "mha" else 0)
    return 0


class WrittenRMSNorm(nn.Module):
    """An RMS norm as transformers writes it (``w * h * rsqrt(mean(h ** 2) + eps)`` in float32)."""

    def __init__(self, c: int, eps: float = 1e-2):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(c))
        self.variance_epsilon = eps

    def forward(self, h):
        v = h.to(torch.float32).pow(2).mean(-1, keepdim=True)
        return self.weight * (h * torch.rsqrt(v + self.variance_epsilon)).to(h.dtype)


# the attention block's pre-norm: LayerNorm pins the tokens' width; the RMS norms leave it free
_PRE_NORMS = {"layer": nn.LayerNorm, "rms": lambda c: nn.RMSNorm(c, eps=1e-2), "written": WrittenRMSNorm}


class GenModel(nn.Module):
    """A DAG of ``spec.ops``: ``forward`` walks the records (no branching on tensor values)."""

    def __init__(self, spec: GraphSpec):
        super().__init__()
        self.spec = spec
        self.layers = nn.ModuleDict()
        shapes = {0: spec.in_shape}
        for op in spec.ops:
            self._make(op, shapes)
            shapes[op.id] = op.shape

    def __repr__(self) -> str:  # the records say more than the module tree
        return f"GenModel({self.spec!r})"

    def _make(self, op: Op, shapes: dict) -> None:
        a, k, n = op.a, op.kind, f"n{op.id}"
        cin = shapes[op.inputs[0]][0] if op.inputs and shapes.get(op.inputs[0]) is not None else None
        L = self.layers
        if k == "conv":
            L[n] = nn.Conv2d(cin, a["out"], a["k"], a["stride"], a["k"] // 2, groups=a["groups"], bias=a["bias"])
        elif k == "convT":
            L[n] = nn.ConvTranspose2d(cin, a["out"], a["k"], a["stride"], a["pad"], a["out_pad"], groups=a["groups"],
                                      bias=a["bias"])
        elif k == "bn":
            L[n] = nn.BatchNorm2d(cin, affine=a["affine"])
        elif k == "gn":
            L[n] = nn.GroupNorm(a["groups"], cin, affine=a["affine"])
        elif k == "act" and a["form"] == "module":
            L[n] = _act_module(a["fn"], cin, a.get("prelu", 1), a.get("inplace", False))
        elif k == "pool":
            cls = nn.MaxPool2d if a["type"] == "max" else nn.AvgPool2d
            L[n] = cls(a["k"], a["stride"], a["pad"])
        elif k == "interp" and a["form"] == "module":
            L[n] = nn.Upsample(scale_factor=2, mode=a["mode"])
        elif k == "linear_cl":
            L[n] = nn.Linear(cin, a["out"], bias=a["bias"])
        elif k == "ln_cl":
            L[n] = nn.LayerNorm(cin, elementwise_affine=a["affine"])
        elif k == "se":
            L[n + "_fc1"] = nn.Conv2d(cin, a["hidden"], 1)
            L[n + "_act"] = nn.ReLU()
            L[n + "_fc2"] = nn.Conv2d(a["hidden"], cin, 1)
            L[n + "_gate"] = getattr(nn, a["gate"])()
        elif k == "head_mlp":
            c, h, w = shapes[op.inputs[0]]
            L[n + "_fc1"] = nn.Linear(c * h * w, a["hidden"])
            L[n + "_act"] = _act_module(a["act"], a["hidden"])
            L[n + "_fc2"] = nn.Linear(a["hidden"], a["classes"])
        elif k == "head_gap":
            L[n] = nn.Linear(cin, a["classes"])
        elif k == "attn":
            inner = a["heads"] * a["hd"]
            if a["ln"]:
                L[n + "_ln"] = _PRE_NORMS[a["ln"]](cin)
            if a["form"] == "mha":
                L[n + "_mha"] = nn.MultiheadAttention(cin, a["heads"], batch_first=a["batch_first"])
                L[n + "_o"] = nn.Linear(cin, cin)
            else:
                for p in ("q", "k", "v"):
                    L[n + "_" + p] = nn.Linear(cin, inner)
                L[n + "_o"] = nn.Linear(inner, cin)
            if a["mlp"]:
                L[n + "_fc1"] = nn.Linear(cin, a["mlp"])
                L[n + "_fc2"] = nn.Linear(a["mlp"], cin)

    def forward(self, x):
        v = {0: x}
        L = self.layers
        for op in self.spec.ops:
            a, k, n = op.a, op.kind, f"n{op.id}"
            ins = [v[i] for i in op.inputs]
            if k in ("conv", "convT", "bn", "gn", "pool", "linear_cl", "ln_cl") or (k in ("act", "interp") and a["form"] == "module"):
                t = ins[0]
                if k in ("linear_cl", "ln_cl"):
                    y = L[n](t.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
                else:
                    y = L[n](t)
            elif k == "act":
                y = _FUNCTIONAL[a["fn"]][1](ins[0])
            elif k == "interp":
                y = F.interpolate(ins[0], scale_factor=2, mode=a["mode"])
            elif k == "add":
                y = ins[0] + ins[1] if a["form"] == "op" else torch.add(ins[0], ins[1])
            elif k == "cat":
                y = torch.cat(ins, dim=1)
            elif k == "split":
                t = ins[0]
                if a["form"] == "chunk":
                    y = torch.chunk(t, a["n"], dim=1)
                elif a["form"] == "split_int":
                    y = t.split(a["size"], dim=1)
                else:
                    y = torch.split(t, list(a["sizes"]), dim=1)
            elif k == "item":
                y = ins[0][a["i"]]
            elif k == "resize":
                t, hw = ins[0], a["hw"]
                y = F.adaptive_avg_pool2d(t, hw) if a["how"] == "pool" else F.interpolate(t, size=(hw, hw), mode="nearest")
            elif k == "se":
                t = ins[0]
                s = t.mean((2, 3), keepdim=True) if a["pool"] == "mean" else F.adaptive_avg_pool2d(t, 1)
                s = L[n + "_gate"](L[n + "_fc2"](L[n + "_act"](L[n + "_fc1"](s))))
                y = t * s
            elif k == "head_mlp":
                y = L[n + "_fc2"](L[n + "_act"](L[n + "_fc1"](torch.flatten(ins[0], 1))))
            elif k == "head_gap":
                t = ins[0]
                s = t.mean((2, 3)) if a["pool"] == "mean" else F.adaptive_avg_pool2d(t, 1).flatten(1)
                y = L[n](s)
            elif k == "attn":
                y = self._attn(op, ins[0])
            else:  # pragma: no cover
                raise ValueError(f"unknown op kind {k!r}")
            v[op.id] = y
        return v[self.spec.output]

    def _attn(self, op: Op, t):
        """A transformer block over the H*W tokens of ``t`` [B, C, H, W]; returns the same shape."""
        a, n, L = op.a, f"n{op.id}", self.layers
        b, c, h, w = t.shape
        x = t.flatten(2).transpose(1, 2)  # [B, T, C]
        z = L[n + "_ln"](x) if a["ln"] else x
        heads, hd = a["heads"], a["hd"]
        if a["form"] == "mha":
            zz = z if a["batch_first"] else z.transpose(0, 1)
            o, _ = L[n + "_mha"](zz, zz, zz, need_weights=a["need_weights"])
            o = o if a["batch_first"] else o.transpose(0, 1)
        else:
            q, k_, v_ = (L[n + "_" + p](z).view(b, h * w, heads, hd).transpose(1, 2) for p in ("q", "k", "v"))
            if a["form"] == "sdpa":
                o = F.scaled_dot_product_attention(q, k_, v_, is_causal=a["causal"])
            elif a["form"] == "einsum":
                s = torch.einsum("bhid,bhjd->bhij", q, k_) * hd ** -0.5
                o = torch.einsum("bhij,bhjd->bhid", s.softmax(-1), v_)
            else:
                o = torch.softmax(q @ k_.transpose(-2, -1) / hd ** 0.5, dim=-1) @ v_
            o = o.transpose(1, 2).reshape(b, h * w, heads * hd)
        y = L[n + "_o"](o)
        y = x + y if a["residual"] else y
        if a["mlp"]:
            y = y + L[n + "_fc2"](F.gelu(L[n + "_fc1"](y)))
        return y.transpose(1, 2).reshape(b, c, h, w)


# ---------------------------------------------------------------------------------------------
# Choices: hypothesis draws or random.Random
# ---------------------------------------------------------------------------------------------


class RandomChooser:
    """Choices from ``random.Random(seed)``."""

    def __init__(self, seed: int):
        self.r = random.Random(seed)

    def int(self, lo: int, hi: int) -> int:
        return self.r.randint(lo, hi)

    def choice(self, seq):
        return self.r.choice(list(seq))

    def bool(self) -> bool:
        return self.r.random() < 0.5

    def recent(self, n: int) -> int:
        """An offset from the end of ``n`` values, favouring the most recent (deeper graphs)."""
        return min(n - 1, int(self.r.expovariate(0.6)))


class DrawChooser:
    """Choices from hypothesis ``draw``: integers shrink to ``lo``, choices to their first entry."""

    def __init__(self, draw):
        from hypothesis import strategies as st

        self.draw, self.st = draw, st

    def int(self, lo: int, hi: int) -> int:
        return self.draw(self.st.integers(lo, hi))

    def choice(self, seq):
        return self.draw(self.st.sampled_from(list(seq)))

    def bool(self) -> bool:
        return self.draw(self.st.booleans())

    def recent(self, n: int) -> int:
        return self.int(0, n - 1)


# ---------------------------------------------------------------------------------------------
# The builder
# ---------------------------------------------------------------------------------------------

# op kinds, simplest first (hypothesis shrinks towards the first); repeats weight the random draws
KINDS = ("act", "conv", "bn", "conv", "add", "cat", "act", "pool", "conv", "split", "se", "gn", "convT",
         "linear_cl", "ln_cl", "interp", "add", "conv", "cat", "bn", "attn", "attn")


def _divisors(n: int) -> list:
    return [d for d in range(1, n + 1) if n % d == 0]


def _conv_out(h: int, k: int, s: int, p: int) -> int:
    return (h + 2 * p - k) // s + 1


class _Builder:
    def __init__(self, c, in_shape, seed):
        self.c = c
        self.in_shape = in_shape
        self.seed = seed
        self.ops: list[Op] = []
        self.shapes = {0: in_shape}  # id -> (C, H, W) for selectable 4-D values
        self.uses = {0: 0}
        self.layers = 0
        self.input_views = {0}  # values that alias the model input (split pieces of it): never in place

    # -- bookkeeping ----------------------------------------------------------------------------
    def emit(self, kind, inputs, shape, **args) -> int:
        op = Op(len(self.ops) + 1, kind, tuple(inputs), tuple(args.items()), shape)
        self.ops.append(op)
        self.layers += _n_modules(op)
        for i in inputs:
            self.uses[i] = self.uses.get(i, 0) + 1
        if shape is not None and len(shape) == 3:
            self.shapes[op.id] = shape
            self.uses[op.id] = 0
        return op.id

    def values(self) -> list:
        return sorted(self.shapes)

    def pick(self, pred=lambda s: True):
        """A selectable value (most recent first: shrinks towards the latest value), or None."""
        ids = [i for i in self.values() if pred(self.shapes[i])]
        if not ids:
            return None
        return ids[len(ids) - 1 - self.c.recent(len(ids))]

    # -- adapters -------------------------------------------------------------------------------
    def adapt(self, v: int, shape) -> int:
        """Emit ops turning value ``v`` into ``shape`` (C, H, W): resize, then a 1x1 conv."""
        c, h, w = self.shapes[v]
        if (h, w) != tuple(shape[1:]):
            how = "pool" if h > shape[1] else "nearest"
            v = self.emit("resize", [v], (c, shape[1], shape[2]), hw=shape[1], how=how)
        if c != shape[0]:
            v = self.emit("conv", [v], tuple(shape), out=shape[0], k=1, stride=1, groups=1, bias=self.c.bool())
        return v

    # -- op kinds -------------------------------------------------------------------------------
    def conv(self, v):
        c, h, w = self.shapes[v]
        ch = self.c
        k = ch.choice((1, 3))
        stride = ch.choice((1, 2)) if h >= 2 else 1
        mode = ch.choice(("dense", "depthwise", "grouped"))
        if mode == "depthwise":
            groups = c
            out = c * ch.choice((1, 2)) if c * 2 <= MAX_CAT_C else c
        elif mode == "grouped" and len(_divisors(c)) > 2:
            groups = ch.choice([d for d in _divisors(c) if 1 < d < c])
            out = groups * ch.int(1, max(1, MAX_C // groups))
        else:
            groups, out = 1, ch.int(2, MAX_C)
        hh = _conv_out(h, k, stride, k // 2)
        return self.emit("conv", [v], (out, hh, hh), out=out, k=k, stride=stride, groups=groups, bias=ch.bool())

    def convT(self, v):
        c, h, w = self.shapes[v]
        ch = self.c
        configs = [(3, 1, 1, 0), (1, 1, 0, 0)]
        if 2 * h <= MAX_HW:
            configs += [(2, 2, 0, 0), (3, 2, 1, 1)]
        k, s, p, op_ = ch.choice(configs)
        mode = ch.choice(("dense", "depthwise", "grouped"))
        if mode == "depthwise":
            groups, out = c, c
        elif mode == "grouped" and len(_divisors(c)) > 2:
            groups = ch.choice([d for d in _divisors(c) if 1 < d < c])
            out = groups * ch.int(1, max(1, MAX_C // groups))
        else:
            groups, out = 1, ch.int(2, MAX_C)
        hh = (h - 1) * s - 2 * p + k + op_
        return self.emit("convT", [v], (out, hh, hh), out=out, k=k, stride=s, pad=p, out_pad=op_, groups=groups,
                         bias=ch.bool())

    def act(self, v):
        c, h, w = self.shapes[v]
        ch = self.c
        fn = ch.choice(ACTIVATIONS)
        args = {"fn": fn, "form": "module"}
        if fn in _FUNCTIONAL and ch.bool():
            args["form"] = "function"
        elif fn in _INPLACE and v not in self.input_views and ch.bool():
            args["inplace"] = True
        if fn == "PReLU":
            args["prelu"] = ch.choice((1, c))
        return self.emit("act", [v], (c, h, w), **args)

    def bn(self, v):
        return self.emit("bn", [v], self.shapes[v], affine=self.c.choice((True, False)))

    def gn(self, v):
        c = self.shapes[v][0]
        return self.emit("gn", [v], self.shapes[v], groups=self.c.choice(_divisors(c)), affine=self.c.choice((True, False)))

    def pool(self, v):
        c, h, w = self.shapes[v]
        configs = [(3, 1, 1)] + ([(2, 2, 0), (3, 2, 1)] if h >= 2 else [])
        k, s, p = self.c.choice(configs)
        hh = _conv_out(h, k, s, p)
        return self.emit("pool", [v], (c, hh, hh), type=self.c.choice(("max", "avg")), k=k, stride=s, pad=p)

    def add(self, v):
        shape = self.shapes[v]
        same = [i for i in self.values() if i != v and self.shapes[i] == shape]
        if same and self.c.bool():
            other = same[len(same) - 1 - self.c.recent(len(same))]
        else:
            other = self.pick(lambda s: True)
            if other == v and len(self.shapes) > 1:
                other = self.pick(lambda s: s != shape) or other
            other = self.adapt(other, shape)
        return self.emit("add", [v, other], shape, form=self.c.choice(("op", "torch.add")))

    def cat(self, v):
        c, h, w = self.shapes[v]
        parts, total = [v], c
        for _ in range(self.c.int(1, 2)):
            same_hw = [i for i in self.values() if self.shapes[i][1:] == (h, w) and total + self.shapes[i][0] <= MAX_CAT_C]
            if same_hw and self.c.bool():
                o = same_hw[len(same_hw) - 1 - self.c.recent(len(same_hw))]
            else:
                o = self.pick(lambda s: total + s[0] <= MAX_CAT_C)
                if o is None:
                    break
                o = self.adapt(o, (self.shapes[o][0], h, w))
            parts.append(o)
            total += self.shapes[o][0]
        if len(parts) == 1:
            return self.act(v)
        return self.emit("cat", parts, (total, h, w))

    def split(self, v):
        c, h, w = self.shapes[v]
        ch = self.c
        if c < 2:
            return self.act(v)
        form = ch.choice(("chunk", "split_sizes", "split_int"))
        if form == "chunk":
            n = ch.int(2, min(4, c))
            sizes = [t.shape[1] for t in torch.zeros(1, c).chunk(n, 1)]
            sid = self.emit("split", [v], None, form=form, n=n)
        elif form == "split_int":
            size = ch.int(1, c - 1)
            sizes = [t.shape[1] for t in torch.zeros(1, c).split(size, 1)]
            sid = self.emit("split", [v], None, form=form, size=size)
        else:
            first = ch.int(1, c - 1)
            sizes = [first, c - first]
            sid = self.emit("split", [v], None, form=form, sizes=tuple(sizes))
        picks = [ch.int(0, len(sizes) - 1)]
        if ch.bool():
            picks.append(ch.int(0, len(sizes) - 1))
        out = None
        for i in dict.fromkeys(picks):
            out = self.emit("item", [sid], (sizes[i], h, w), i=i)
            if v in self.input_views:
                self.input_views.add(out)
        return out

    def se(self, v):
        c, h, w = self.shapes[v]
        ch = self.c
        return self.emit("se", [v], (c, h, w), hidden=ch.int(1, max(1, c // 2)), gate=ch.choice(("Sigmoid", "Hardsigmoid")),
                         pool=ch.choice(("mean", "adaptive")))

    def linear_cl(self, v):
        c, h, w = self.shapes[v]
        out = self.c.int(2, MAX_C)
        return self.emit("linear_cl", [v], (out, h, w), out=out, bias=self.c.bool())

    def ln_cl(self, v):
        return self.emit("ln_cl", [v], self.shapes[v], affine=self.c.choice((True, False)))

    def attn(self, v):
        c, h, w = self.shapes[v]
        ch = self.c
        form = ch.choice(("sdpa", "eager", "mha", "einsum"))
        if form == "mha":
            heads, hd = ch.choice([d for d in _divisors(c) if d <= 8]), 0
            hd = c // heads
            extra = dict(batch_first=ch.bool(), need_weights=ch.bool())
        else:
            heads, hd = ch.int(1, 8), ch.int(1, 4)
            extra = dict(causal=ch.bool()) if form == "sdpa" else {}
        return self.emit("attn", [v], (c, h, w), form=form, heads=heads, hd=hd, ln=ch.choice((False, *_PRE_NORMS)),
                         residual=ch.bool(),
                         mlp=ch.choice((0, ch.int(2, 8))), **extra)

    def interp(self, v):
        c, h, w = self.shapes[v]
        if 2 * h > MAX_HW:
            return self.pool(v)
        return self.emit("interp", [v], (c, 2 * h, 2 * w), mode=self.c.choice(("nearest", "bilinear")),
                         form=self.c.choice(("function", "module")))

    # -- the whole graph ------------------------------------------------------------------------
    def run(self) -> GraphSpec:
        ch = self.c
        steps = ch.int(1, 16)
        for _ in range(steps):
            if self.layers >= MAX_LAYERS - 6:
                break
            kind = ch.choice(KINDS)
            v = self.pick()
            getattr(self, kind)(v)
        # merge (most) dangling values into the last one, so few branches are dead code
        last = self.ops[-1].id if self.ops and self.ops[-1].id in self.shapes else self.pick()
        dangling = [i for i in self.values() if self.uses.get(i, 0) == 0 and i != last and i != 0]
        for d in dangling[-3:]:
            if self.layers >= MAX_LAYERS - 3 or not ch.choice((True, True, False)):
                continue
            c, h, w = self.shapes[last]
            if ch.bool() and c + self.shapes[d][0] <= MAX_CAT_C:
                d2 = self.adapt(d, (self.shapes[d][0], h, w))
                last = self.emit("cat", [last, d2], (c + self.shapes[d][0], h, w))
            else:
                d2 = self.adapt(d, (c, h, w))
                last = self.emit("add", [last, d2], (c, h, w), form="op")
        c, h, w = self.shapes[last]
        classes = ch.int(2, 5)
        if ch.bool() and c * h * w <= 2048:
            out = self.emit("head_mlp", [last], (classes,), hidden=ch.int(2, 8), act=ch.choice(ACTIVATIONS[:8]),
                            classes=classes)
        else:
            out = self.emit("head_gap", [last], (classes,), pool=ch.choice(("mean", "adaptive")), classes=classes)
        return GraphSpec(self.in_shape, tuple(self.ops), self.seed, out)


def build_spec(c) -> GraphSpec:
    """A :class:`GraphSpec` from a chooser (:class:`RandomChooser` or :class:`DrawChooser`)."""
    cin = c.int(2, MAX_C)
    hw = c.int(4, 8)
    seed = c.int(0, 2**16)
    return _Builder(c, (cin, hw, hw), seed).run()


def random_spec(seed: int) -> GraphSpec:
    """The graph of fuzz seed ``seed`` (deterministic)."""
    return build_spec(RandomChooser(seed))


def graphs():
    """Hypothesis strategy of :class:`GraphSpec`."""
    from hypothesis import strategies as st

    @st.composite
    def _graphs(draw):
        return build_spec(DrawChooser(draw))

    return _graphs()
