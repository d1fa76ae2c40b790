"""``JointRD``: residual distillation of a plain student from its ResNet teacher.

``JointRD(student, teacher, boundaries=None, mode="paper")`` is an ``nn.Module``; ``jrd(x, y)``
returns the loss terms (:class:`JointRDTerms`), ``jrd.loss(x, y)`` their total. Train with any
optimizer over ``jrd.parameters()`` (the student's, the connector's, and the teacher's when it
trains too); ``jrd.export()`` is the deployable plain student (Dirac folded).

Per step, with stage boundaries b_1..b_K (nodes of the teacher's graph, matched in the student by
name) and the student's values f_i at them:

* z_s = student(x); z_i = teacher_tail_i(f_i), the *hybrid* logits: the student's first i stages
  followed by the teacher's remaining ones (gradient reaches the student's early stages through
  the teacher's shortcuts; the teacher's weights get none from these terms);
* a feature term D(C(SF), TF) between the student's and the teacher's last-stage features, with
  C a 1x1 conv + BN connector (a linear + BN for 2-d features);
* m = dc + (1 - dc) * (1 + cos(pi * min(t, T) / T)) / 2 at step t (``decay_steps`` T; 1 without).

``mode`` picks the loss (METHODS.md section 2; each switch can be overridden by keyword):

| mode | loss | D | teacher |
|---|---|---|---|
| ``paper`` | CE(z_s) + m * sum_i CE(z_i) + dis_weight * D | MSE, dis_weight 1 | frozen |
| ``released`` (``TA``) | CE(z_s) + dis_weight * D, hybrids not computed | margin partial L2, 1e-3 | frozen |
| ``joint`` (``JOINT``) | [m * sum_i CE(z_i) + CE(z_s) + dis_weight * D] / (K+1) + CE(teacher) | margin, 1e-3 | trains |

The margin partial L2 (Heo et al. 2019) compares pre-activation features: the teacher's last
residual add and its replacement in the student; per-channel margins come from the BatchNorm that
closes the teacher's last branch, m_c = E[z | z < 0] for z ~ N(beta_c, gamma_c^2) (-3|gamma_c| when
that tail holds under 0.1% of the mass), and the sum is divided by the batch size.

Internals:
    * The teacher is a deep copy (``jrd.teacher``): the user's teacher is never touched. Frozen, it
      stays in eval mode whatever ``jrd.train()`` says, and its parameters do not require grad.
      In ``joint`` mode it trains on its own cross-entropy (train mode), and the hybrid tails run
      in eval mode on detached parameters, as the released code's separate optimisers do.
    * The student is trained in place: a GraphModule (``remove_shortcuts``'s output) is used as
      it is; another module is captured (symbolic_trace, sharing its modules).
    * Taps and tails (``otofx.passes.jointrd.tap``/``tail``) are GraphModules that share the
      student's and the teacher's modules; they are rebuilt after ``.to()``/``.cuda()``. A tail
      that reads graph inputs besides its feature (timm's ``attn_mask``/``is_causal``, the batch
      size of a Swin's input) gets them by name from the step's inputs.
    * ``__init__`` ends with ``self.train(self.training)``: the student (and a ``joint`` teacher)
      train from the first step whatever mode they were handed in; a frozen teacher stays in eval.
    * The connector is made on the student's device and in its dtype.
"""
from __future__ import annotations

import copy
import logging
import math
import numbers
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from otofx.capture import capture, normalize_inputs
from otofx.errors import InputError
from otofx.passes.jointrd import (StageError, equal_boundaries, find_boundaries, find_residual_adds, stream_output,
                                  tail, tap)
from otofx.passes.shapes import annotate_shapes
from otofx.verify import eval_mode

from .shortcuts import plain

log = logging.getLogger("otofx")

MODES = {
    "paper": dict(hybrid=True, feature_loss="mse", dis_weight=1.0, train_teacher=False, average=False),
    "released": dict(hybrid=False, feature_loss="margin", dis_weight=1e-3, train_teacher=False, average=False),
    "joint": dict(hybrid=True, feature_loss="margin", dis_weight=1e-3, train_teacher=True, average=True),
}
FEATURE_LOSSES = ("mse", "margin", None)
_DEFAULT = object()  # feature_loss not given (None is a choice: no feature term)


@dataclass(frozen=True)
class JointRDTerms:
    """One step's loss and its terms (tensors with grad; ``hybrid_ce`` empty when not computed)."""

    total: torch.Tensor
    student_ce: torch.Tensor
    hybrid_ce: tuple
    feature: torch.Tensor | None
    teacher_ce: torch.Tensor | None
    m: float
    logits: torch.Tensor
    hybrid_logits: tuple


def connector(shape: tuple, out_channels: int) -> nn.Sequential:
    """1x1 conv + BN (a linear + BN for [N, C] features), initialised as the released code's."""
    c = shape[1]
    if len(shape) == 2:
        layers = [nn.Linear(c, out_channels, bias=False), nn.BatchNorm1d(out_channels)]
    elif 3 <= len(shape) <= 5:
        conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[len(shape) - 3]
        bn = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[len(shape) - 3]
        layers = [conv(c, out_channels, 1, bias=False), bn(out_channels)]
    else:
        raise InputError(f"the distilled features have shape {list(shape)}: a connector needs 2 to 5 dims "
                         "([N, C] or [N, C, *spatial]); pass feature= another node or feature_loss=None")
    with torch.no_grad():
        w = layers[0].weight
        w.normal_(0, math.sqrt(2.0 / (w[0, 0].numel() * out_channels)))
    return nn.Sequential(*layers)


def margin_from_bn(bn: nn.Module) -> torch.Tensor:
    """Per-channel margin E[z | z < 0], z ~ N(bias, weight^2); -3|weight| where P(z < 0) <= 1e-3."""
    with torch.no_grad():
        s = bn.weight.detach().abs().double().clamp_min(1e-12)
        mu = bn.bias.detach().double()
        cdf = torch.special.ndtr(-mu / s)
        pdf = torch.exp(-0.5 * (mu / s) ** 2) / math.sqrt(2 * math.pi)
        m = torch.where(cdf > 1e-3, mu - s * pdf / cdf.clamp_min(1e-300), -3 * s)
    return m.to(bn.weight.dtype)


def margin_loss(source: torch.Tensor, target: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    """Heo et al.'s partial L2 (the released ``distillation_loss``), summed and divided by the batch."""
    margin = margin.view(1, -1, *([1] * (source.dim() - 2)))
    loss = ((source - margin) ** 2 * ((source > margin) & (target <= margin))
            + (source - target) ** 2 * ((source > target) & (target > margin) & (target <= 0))
            + (source - target) ** 2 * (target > 0))
    return loss.sum() / source.shape[0]


def _real(v) -> bool:
    """A real number (not a bool, not NaN)."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and v == v


def _count(v) -> bool:
    """An integer >= 1 (not a bool)."""
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _nodes(gm: fx.GraphModule) -> dict:
    return {n.name: n for n in gm.graph.nodes}


def _shape(n: fx.Node):
    v = n.meta.get("val")
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def _logits(out):
    """The logits tensor of a graph's output: a torch.export graph returns its outputs flat, ``(logits,)``."""
    while isinstance(out, (tuple, list)) and len(out) == 1:
        out = out[0]
    return out


def _set_mode(module: nn.Module, mode: bool) -> None:
    """``module.train(mode)``; every submodule's flag set directly where ``train()`` is refused.

    # NB: a torch.export GraphModule (the export front-end's student or teacher graph) raises
    # NotImplementedError on ``train()``/``eval()``; its ops read the modules' flags all the same
    """
    try:
        module.train(mode)
    except NotImplementedError:
        for m in module.modules():
            m.training = mode


def _placement(module: nn.Module, feature: fx.Node) -> dict:
    """``device``/``dtype`` of ``module``'s floating-point weights (else of the feature's value, if floating)."""
    p = next((p for p in module.parameters() if p.is_floating_point()), None)
    if p is not None:
        return dict(device=p.device, dtype=p.dtype)
    v = feature.meta.get("val")
    if isinstance(v, torch.Tensor) and v.is_floating_point():
        return dict(dtype=v.dtype) if v.device.type == "meta" else dict(device=v.device, dtype=v.dtype)
    return {}


def _bn_before(gm: fx.GraphModule, name: str, adds: tuple) -> nn.Module:
    """The BatchNorm that produces node ``name``'s value (through a residual add's branch, and
    through same-shape single-input ops)."""
    nodes, by_add = _nodes(gm), {a.add: a for a in adds}
    n = nodes[name]
    for _ in range(len(nodes)):
        if n.name in by_add:
            n = nodes[by_add[n.name].branch]
            continue
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.modules.batchnorm._BatchNorm):
            bn = gm.get_submodule(n.target)
            if bn.affine:
                return bn
        ins = [a for a in n.all_input_nodes if a.op != "get_attr"]
        if len(ins) != 1 or _shape(ins[0]) != _shape(n):
            break
        n = ins[0]
    raise InputError(f"feature_loss='margin' needs an affine BatchNorm module producing the teacher's feature "
                     f"'{name}' (its margins come from it); none found: use feature_loss='mse'")


class JointRD(nn.Module):
    """Residual distillation wrapper (see the module doc)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, boundaries=None, mode: str = "paper", *,
                 example_inputs=None, feature: str | None = None, hybrid: bool | None = None,
                 feature_loss=_DEFAULT, dis_weight: float | None = None, dc: float = 0.5,
                 decay_steps: int | None = None, train_teacher: bool | None = None, stages: int = 4,
                 frontend: str = "auto"):
        super().__init__()
        for what, m in (("student", student), ("teacher", teacher)):
            if not isinstance(m, nn.Module):
                raise InputError(f"{what} must be a torch.nn.Module (the {what} network), got {type(m).__name__}")
        if not _real(dc) or not 0.0 <= dc <= 1.0:
            raise InputError(f"dc={dc!r}: the hybrid terms' final weight m, a number from 0 to 1")
        if dis_weight is not None and (not _real(dis_weight) or not 0.0 <= dis_weight < math.inf):
            raise InputError(f"dis_weight={dis_weight!r}: the feature term's weight, a finite number >= 0 "
                             "(or None for the mode's default)")
        if not _count(stages):
            raise InputError(f"stages={stages!r}: the number of runs of blocks a constant-width stream is cut "
                             "into, an integer >= 1")
        if boundaries is not None and not _count(boundaries):
            names = tuple(boundaries) if not isinstance(boundaries, (str, bytes)) and hasattr(boundaries, "__iter__") \
                else None
            if names is None or not all(isinstance(b, str) for b in names):
                raise InputError(f"boundaries={boundaries!r}: give node names (a list of str), a number of stages "
                                 "(an integer >= 1), or None to find them")
            boundaries = names
        if decay_steps is not None and not (_real(decay_steps) and 0 < decay_steps < math.inf):
            raise InputError(f"decay_steps={decay_steps!r}: give a positive number of steps, or None for m = 1")
        if mode not in MODES:
            raise InputError(f"mode={mode!r}: choose one of {tuple(MODES)}")
        cfg = dict(MODES[mode])
        for k, v in (("hybrid", hybrid), ("dis_weight", dis_weight), ("train_teacher", train_teacher)):
            if v is not None:
                cfg[k] = v
        if feature_loss is not _DEFAULT:
            cfg["feature_loss"] = feature_loss
        if cfg["feature_loss"] not in FEATURE_LOSSES:
            raise InputError(f"feature_loss={cfg['feature_loss']!r}: choose one of {FEATURE_LOSSES}")
        self.mode, self.hybrid, self.feature_loss = mode, bool(cfg["hybrid"]), cfg["feature_loss"]
        self.dis_weight, self.train_teacher, self.average = float(cfg["dis_weight"]), bool(cfg["train_teacher"]), cfg["average"]
        self.dc, self.decay_steps = float(dc), decay_steps
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

        if example_inputs is None:
            saved = getattr(student, "meta", {}).get("jointrd_inputs") if isinstance(student, fx.GraphModule) else None
            if saved is None:
                raise InputError("JointRD needs example_inputs= (the student was not made by "
                                 "otofx.jointrd.remove_shortcuts, which records them)")
            args, kwargs = saved
        else:
            args, kwargs = normalize_inputs(example_inputs)
        if not isinstance(student, fx.GraphModule):
            student = capture(student, args if not kwargs else kwargs, "symbolic_trace").gm
        self.student = student
        self.teacher = copy.deepcopy(teacher)
        if not self.train_teacher:
            self.teacher.eval().requires_grad_(False)
        t_gm = capture(self.teacher, args if not kwargs else kwargs, frontend).gm
        annotate_shapes(t_gm, args, kwargs)
        annotate_shapes(self.student, args, kwargs)
        self._t_gm = t_gm

        adds = find_residual_adds(t_gm)
        if not adds and (boundaries is None or isinstance(boundaries, int) or feature is None):
            raise StageError(f"the teacher ({type(teacher).__name__}) has no residual adds to find stage boundaries "
                             "and features from: pass boundaries= and feature= as node names")
        if boundaries is None:
            boundaries = find_boundaries(t_gm, adds, stages)
        elif isinstance(boundaries, int):
            boundaries = equal_boundaries(adds, boundaries)
        self.boundaries = tuple(boundaries)
        t_feature = feature or stream_output(t_gm, adds)
        if self.feature_loss == "margin" and feature is None:
            t_feature = adds[-1].add  # pre-activation: the last residual add
        self.teacher_feature = t_feature

        record = self.student.meta.get("jointrd") if isinstance(self.student, fx.GraphModule) else None
        resolve = record.resolve if record is not None else (lambda n: n)
        t_nodes, s_nodes = _nodes(t_gm), _nodes(self.student)
        for name in (*self.boundaries, t_feature):
            if name not in t_nodes:
                raise StageError(f"'{name}' is not a node of the teacher's graph (nodes are named as in "
                                 f"otofx.capture: e.g. {list(t_nodes)[1:4]})")
        self.student_boundaries = tuple(resolve(b) for b in self.boundaries)
        self.student_feature = resolve(t_feature)
        for t_name, s_name in zip((*self.boundaries, t_feature), (*self.student_boundaries, self.student_feature)):
            if s_name not in s_nodes:
                raise StageError(f"teacher node '{t_name}' has no counterpart in the student's graph (looked for "
                                 f"'{s_name}'): make the student with otofx.jointrd.remove_shortcuts(teacher, ...) "
                                 "or pass boundaries= names present in both")
            if t_name in self.boundaries and _shape(s_nodes[s_name]) != _shape(t_nodes[t_name]):
                raise StageError(f"stage boundary '{t_name}': the student's value has shape "
                                 f"{list(_shape(s_nodes[s_name]))}, the teacher's {list(_shape(t_nodes[t_name]))}; "
                                 "a hybrid path needs them equal")
        s_shape, t_shape = _shape(s_nodes[self.student_feature]), _shape(t_nodes[t_feature])
        self.connector = None
        if self.feature_loss:
            # NB: on the student's device and dtype (a bf16 student on a GPU feeds it bf16 CUDA features)
            self.connector = connector(s_shape, t_shape[1]).to(**_placement(self.student, s_nodes[self.student_feature]))
        self._margin_bn = _bn_before(t_gm, t_feature, adds) if self.feature_loss == "margin" else None
        self._build()
        # NB: the student (and a 'joint' teacher) take this module's mode now: a student made from an
        # eval-mode teacher is in eval mode, and training it so would freeze its BatchNorm statistics
        self.train(self.training)
        log.info("otofx.jointrd: mode %s, boundaries %s, feature %s (student %s)", mode, self.boundaries,
                 t_feature, self.student_feature)

    # -- graph pieces ---------------------------------------------------------------------------
    def _build(self) -> None:
        # NB: plain attributes (a tuple), not submodules: they share the student's and teacher's modules
        pieces = (tap(self.student, (*self.student_boundaries, self.student_feature)),
                  tap(self._t_gm, (self.teacher_feature,)),
                  tuple(tail(self._t_gm, b) for b in self.boundaries) if self.hybrid else ())
        self.__dict__["_pieces"] = pieces
        self.__dict__["_t_inputs"] = tuple(n.target for n in self._t_gm.graph.nodes if n.op == "placeholder")
        self.__dict__["_tail_params"] = tuple(tuple(k for k, _ in tl.named_parameters()) for tl in pieces[2])

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        if "_pieces" in self.__dict__:
            self._build()
        return out

    def train(self, mode: bool = True):
        if not isinstance(mode, bool):
            raise InputError(f"train(mode={mode!r}): mode is True or False")
        self.training = mode
        for child in self.children():
            _set_mode(child, mode)
        if not self.train_teacher:
            # NB: the teacher's captured graph can hold modules of its own (an export capture's
            # mode flags); they follow the frozen teacher, not this module
            _set_mode(self.teacher, False)
            _set_mode(self._t_gm, False)
        return self

    @property
    def m(self) -> float:
        """The hybrid terms' weight now (cosine from 1 to ``dc`` over ``decay_steps``)."""
        if not self.decay_steps:
            return 1.0
        t = min(int(self.steps), self.decay_steps) / self.decay_steps
        return self.dc + (1.0 - self.dc) * (1 + math.cos(math.pi * t)) / 2

    # -- the loss -------------------------------------------------------------------------------
    def forward(self, x, y: torch.Tensor) -> JointRDTerms:
        s_tap, t_tap, tails = self._pieces
        m = self.m
        args = x if isinstance(x, tuple) else (x,)
        teacher_ce = None
        if self.train_teacher and self.training:
            t_logits, (t_feat,) = t_tap(*args)
            t_logits = _logits(t_logits)
            teacher_ce = F.cross_entropy(t_logits, y)
        else:
            with torch.no_grad():
                t_logits, (t_feat,) = t_tap(*args)
        t_feat = t_feat.detach()
        logits, feats = s_tap(*args)
        logits = _logits(logits)
        s_ce = F.cross_entropy(logits, y)
        hybrid_logits, hybrid_ce = [], []
        if tails:
            with eval_mode(self.teacher), eval_mode(self._t_gm):  # NB: the graph's own flag modules too
                frozen = {k: v.detach() for k, v in self.teacher.named_parameters()}
                given = dict(zip(self._t_inputs, args))  # the graph inputs a tail reads besides the feature
                for f, tl, names in zip(feats[:-1], tails, self._tail_params):
                    kw = {k: given[k] for k in tl.meta.get("tail_inputs", ()) if k in given}
                    z = torch.func.functional_call(tl, {k: frozen[k] for k in names}, (f,), kw) \
                        if self.train_teacher else tl(f, **kw)
                    z = _logits(z)
                    hybrid_logits.append(z)
                    hybrid_ce.append(F.cross_entropy(z, y))
        feature = None
        if self.feature_loss == "mse":
            feature = F.mse_loss(self.connector(feats[-1]), t_feat)
        elif self.feature_loss == "margin":
            feature = margin_loss(self.connector(feats[-1]), t_feat, margin_from_bn(self._margin_bn))
        total = s_ce + m * sum(hybrid_ce) if hybrid_ce else s_ce
        if feature is not None:
            total = total + self.dis_weight * feature
        if self.average:
            total = total / (len(tails) + 1)
        if teacher_ce is not None:
            total = total + teacher_ce
        if self.training:
            self.steps += 1
        return JointRDTerms(total, s_ce, tuple(hybrid_ce), feature, teacher_ce, m, logits, tuple(hybrid_logits))

    def loss(self, x, y: torch.Tensor) -> torch.Tensor:
        return self(x, y).total

    def export(self) -> fx.GraphModule:
        """The deployable student: a copy, Dirac folded, no JointRD bookkeeping."""
        return plain(self.student)

