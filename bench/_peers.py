"""Adapters that run the two peer pruning libraries beside otofx in bench/.

Peers (install into the bench venv without touching torch/torchvision; both import with no other
dependency -- only-train-once declares graphviz, pydot, onnx and numpy, but imports graphviz only in
``OTO.visualize``, sklearn only in ``cluster_node_groups(num_clusters>1)`` and never imports pydot
or onnx on the paths used here)::

    /work/venv/bin/pip install --no-deps only-train-once==3.0.1 torch-pruning==1.6.1 packaging

only-train-once 3.0.1 targets torch 1.13-2.1; on torch >= 2.9 two private names it imports moved, so
``import_oto`` re-exposes them (``torch.onnx._globals`` and ``torch.onnx._optimize_graph``) before
importing. torch-pruning 1.6.1 reports ``tp.__version__ == "1.6.0"``.

Every public function deep-copies the caller's model, silences the peers' own prints and warnings,
and reports a peer failure as a short string (``"<ExceptionType>: <message>"``) instead of raising.
``*_build`` return a :class:`Built` whose ``seconds`` times the peer call alone (no deep copy).

Quirks a caller must know:
  * ``OTO(model, x)`` calls ``model.eval()`` and keeps a reference to the (copied) model;
    ``construct_subnet`` prunes that model *in place* and ``torch.save``-pickles the full and the
    compressed model into ``out_dir`` (``oto_coverage`` uses a temporary directory).
  * ``random_set_zero_groups`` draws from NumPy's global RNG; ``oto_coverage`` seeds it and restores
    the global state afterwards. It never zeroes the last row of a group.
  * importing only_train_once (a) appends ``site-packages/only_train_once`` to ``sys.path`` and
    registers top-level modules ``graph`` and ``operation`` (so a later ``import graph``,
    ``operation``, ``transform``, ``flops``, ``optimizer``, ``assets`` finds OTO's subpackage unless an
    earlier path entry has one), (b) sets the TorchScript ONNX exporter's global opset to 16, and
    (c) needs Python <= 3.11 (it does ``import imp``).
  * OTO prints ("OTO graph constructor", "graph build") and torch-pruning warns; both are silenced
    here. Neither changes ``torch.get_num_threads()``; set threads in the caller before timing.
  * torch-pruning traces with autograd (asserts grad is enabled); ``tp_build`` re-enables it.
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import io
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Iterator, Sequence

import torch
from torch import nn

__all__ = [
    "Built", "OtoCoverage", "TpGroups", "import_oto", "import_tp", "find_classifier",
    "oto_build", "oto_coverage", "randomise_norms", "tp_build", "tp_groups", "tp_prune",
]

_MOVED = {  # name only-train-once imports -> (module that now holds it, attribute or None)
    "_globals": ("torch.onnx._internal.torchscript_exporter._globals", None),
    "_optimize_graph": ("torch.onnx._internal.torchscript_exporter.utils", "_optimize_graph"),
}


@dataclass
class Built:
    """A peer build: ``obj`` is the OTO object / DependencyGraph, or None with ``error`` set."""
    obj: Any = None
    error: str | None = None
    seconds: float = float("nan")

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class OtoCoverage:
    ok: bool = False                # OTO(model, x) built
    error: str | None = None        # first failure, build or subnet stage
    prunable_rows: int = 0          # rows (channels) over prunable, non-auxiliary, non-classifier groups
    groups: int = 0                 # number of such groups
    prunable_params: tuple = ()     # names of the parameters in those groups (output-side slices)
    runs: bool = False              # compressed model loads and runs, output shape as the full model
    exact: bool = False             # compressed(x) == zeroed full(x) within 1e-4 * max(1, max|y|)
    max_diff: float = float("nan")
    max_abs_y: float = float("nan")  # scale of the reference output (to judge vacuity)
    params_full: int = 0
    params_compressed: int = 0


@dataclass
class TpGroups:
    ok: bool = False
    error: str | None = None
    channels: int = 0               # sum over groups of the root layer's out channels
    groups: int = 0
    build_seconds: float = float("nan")   # build_dependency alone
    search_seconds: float = float("nan")  # get_all_groups enumeration alone


def _err(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:160] if msg else ''}".rstrip(": ")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Swallow the peers' prints (OTO prints "OTO graph constructor") and warnings."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _install_onnx_shim() -> None:
    import torch.onnx as tonnx
    for name, (modname, attr) in _MOVED.items():
        if hasattr(tonnx, name):
            continue
        try:
            mod = importlib.import_module(modname)
        except ImportError:
            continue  # neither place: let the peer's import fail with its own message
        if attr is None:
            sys.modules.setdefault(f"torch.onnx.{name}", mod)
            setattr(tonnx, name, mod)
        else:
            setattr(tonnx, name, getattr(mod, attr))


def import_oto() -> ModuleType:
    """Return the ``only_train_once`` module, importing it behind the torch.onnx shim."""
    _install_onnx_shim()
    try:
        with _quiet():
            return importlib.import_module("only_train_once")
    except ModuleNotFoundError as e:
        raise ImportError(
            f"only-train-once is not importable ({e}); install it with "
            "`pip install --no-deps only-train-once==3.0.1 packaging`") from e


def import_tp() -> ModuleType:
    try:
        return importlib.import_module("torch_pruning")
    except ModuleNotFoundError as e:
        raise ImportError(
            f"torch-pruning is not importable ({e}); install it with "
            "`pip install --no-deps torch-pruning==1.6.1`") from e


def find_classifier(model: nn.Module) -> tuple[str, ...]:
    """Name of the last ``nn.Linear`` in registration order (the head of every torchvision CNN)."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return (names[-1],) if names else ()


def oto_build(model: nn.Module, x: torch.Tensor) -> Built:
    """``OTO(copy_of_model, x)``; the copy is put in eval mode by OTO itself."""
    try:
        oto_cls = import_oto().OTO
    except ImportError as e:
        return Built(error=_err(e))
    model = copy.deepcopy(model)
    t0 = time.perf_counter()
    try:
        with _quiet():
            oto = oto_cls(model, x)
    except Exception as e:  # noqa: BLE001 -- peer failures are data here
        return Built(error=_err(e), seconds=time.perf_counter() - t0)
    return Built(obj=oto, seconds=time.perf_counter() - t0)


def _oto_prunable_groups(oto: Any, classifier_names: Sequence[str]) -> list[dict]:
    """The groups OTO actually prunes, as its own param-group dicts.

    only-train-once 3.0.1 partitions the traced graph into node groups (``oto._graph.node_groups``).
    ``build_pruning_dependency_graph`` marks a group unprunable when it has no parameters, touches a
    graph output node (so the classifier's own group is already pinned), has no stem op
    (conv/linear/...) and is not auxiliary, shares a parameter with an unprunable group, or holds an
    unprunable op; ``set_trainable`` then pins groups whose parameters all have requires_grad=False.
    *Auxiliary* groups are those containing a channel concat (DenseNet, Inception): they own no rows
    of their own -- their slices are indexed by the rows of the groups feeding the concat
    (``auxiliary_ngs``/offsets), so counting them would count those rows twice.

    We take exactly the set ``oto.random_set_zero_groups`` / the optimizers iterate:
    ``oto._graph.get_param_groups()`` (trainable groups with parameters), keeping those with
    ``is_prunable and not is_auxiliary``, minus any group holding a parameter of a classifier
    module. Each such group has ``num_groups`` rows = max over its parameters of ``shape[0]``
    (the stem convs' out channels; a conv/linear weight, a BN weight/bias each own one slice of
    every row), so rows = sum of ``num_groups``.
    """
    prefixes = tuple(f"{n}." for n in classifier_names)
    out = []
    for pg in oto._graph.get_param_groups():
        if not pg["is_prunable"] or pg["is_auxiliary"]:
            continue
        if prefixes and any(p.startswith(prefixes) for p in pg["p_names"]):
            continue
        out.append(pg)
    return out


def randomise_norms(model: nn.Module, gen: torch.Generator) -> None:
    """Non-trivial norm statistics/affines, biases and layer scales, so an exactness check is not vacuous.

    ConvNeXt initialises ``layer_scale`` to 1e-6: left alone, its blocks barely reach the output and
    a wrong compression of them would still pass a 1e-4 check.
    """
    def u(t: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
        return torch.rand(t.shape, generator=gen, dtype=t.dtype) * (hi - lo) + lo

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._NormBase):
                if m.running_mean is not None:
                    m.running_mean.copy_(u(m.running_mean, -0.2, 0.2))
                    m.running_var.copy_(u(m.running_var, 0.5, 1.5))
            if isinstance(m, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)):
                if getattr(m, "weight", None) is not None:
                    m.weight.copy_(u(m.weight, 0.5, 1.5))
                if getattr(m, "bias", None) is not None:
                    m.bias.copy_(u(m.bias, -0.2, 0.2))
            elif isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
                m.bias.copy_(u(m.bias, -0.1, 0.1))
            if isinstance(getattr(m, "layer_scale", None), nn.Parameter):
                m.layer_scale.copy_(u(m.layer_scale, 0.5, 1.5))


def _nparams(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def oto_coverage(model: nn.Module, x: torch.Tensor, classifier_names: Sequence[str] = (),
                 seed: int = 0) -> OtoCoverage:
    """Build OTO on a randomised eval copy, zero random rows, compress, and compare outputs."""
    import numpy as np

    res = OtoCoverage()
    model = copy.deepcopy(model).eval()
    randomise_norms(model, torch.Generator().manual_seed(seed))
    built = oto_build(model, x)  # copies again; OTO prunes its own copy in place
    if not built.ok:
        res.error = built.error
        return res
    oto, res.ok = built.obj, True
    try:
        pgs = _oto_prunable_groups(oto, classifier_names)
        res.groups, res.prunable_rows = len(pgs), sum(int(pg["num_groups"]) for pg in pgs)
        res.prunable_params = tuple(dict.fromkeys(n for pg in pgs for n in pg["p_names"]))
    except Exception as e:  # noqa: BLE001
        res.error = f"groups: {_err(e)}"
        return res
    np_state = np.random.get_state()
    stage = "zero"
    try:
        with _quiet(), tempfile.TemporaryDirectory(prefix="oto_peer_") as tmp, torch.no_grad():
            np.random.seed(seed)
            oto.random_set_zero_groups()
            full = oto._model
            y = full(x)
            res.params_full = _nparams(full)
            stage = "construct_subnet"
            oto.construct_subnet(out_dir=tmp)
            stage = "load"
            small = torch.load(oto.compressed_model_path, weights_only=False).eval()
            res.params_compressed = _nparams(small)
            stage = "run"
            yc = small(x)
            res.runs = yc.shape == y.shape
            if not res.runs:
                res.error = f"run: output shape {tuple(yc.shape)} != {tuple(y.shape)}"
                return res
            res.max_abs_y = float(y.abs().max())
            res.max_diff = float((yc - y).abs().max())
            res.exact = res.max_diff <= 1e-4 * max(1.0, res.max_abs_y)
    except Exception as e:  # noqa: BLE001
        res.error = f"{stage}: {_err(e)}"
    finally:
        np.random.set_state(np_state)
    return res


def tp_build(model: nn.Module, x: torch.Tensor) -> Built:
    """``tp.DependencyGraph().build_dependency(copy_of_model, example_inputs=x)`` (grad enabled)."""
    try:
        tp = import_tp()
    except ImportError as e:
        return Built(error=_err(e))
    model = copy.deepcopy(model)
    t0 = time.perf_counter()
    try:
        with _quiet(), torch.enable_grad():
            dg = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    except Exception as e:  # noqa: BLE001
        return Built(error=_err(e), seconds=time.perf_counter() - t0)
    return Built(obj=dg, seconds=time.perf_counter() - t0)


def tp_groups(model: nn.Module, x: torch.Tensor,
              classifier_names: Sequence[str] | None = None) -> TpGroups:
    """Prunable channels torch-pruning 1.6.1 finds.

    ``DG.get_all_groups(ignored_layers=[classifier], root_module_types=[nn.Conv2d, nn.Linear])``
    yields one group per root layer whose out channels are prunable (layers already swept into an
    earlier group's out-channel pruning, e.g. a depthwise conv coupled to its producer, are not
    roots again; groups that would prune an ignored layer's out channels are dropped). Each group
    starts with the root's out-channel dependency holding ``range(out_channels)``, so
    channels = sum of ``len(group[0].idxs)``. Grouped convs are counted by out channels; torch-pruning
    only enforces per-group equal sizes later, in its pruner. ``classifier_names=None`` uses
    :func:`find_classifier`.
    """
    built = tp_build(model, x)
    res = TpGroups(build_seconds=built.seconds)
    if not built.ok:
        res.error = built.error
        return res
    dg = built.obj
    names = find_classifier(dg.model) if classifier_names is None else classifier_names
    mods = dict(dg.model.named_modules())
    try:
        ignored = [mods[n] for n in names]
        t0 = time.perf_counter()
        with _quiet():
            for g in dg.get_all_groups(ignored_layers=ignored,
                                       root_module_types=[nn.Conv2d, nn.Linear]):
                res.groups += 1
                res.channels += len(g[0].idxs)
        res.search_seconds, res.ok = time.perf_counter() - t0, True
    except Exception as e:  # noqa: BLE001
        res.error = f"groups: {_err(e)}"
    return res


def tp_prune(model: nn.Module, x: torch.Tensor, pruning_ratio: float = 0.5,
             classifier_names: Sequence[str] | None = None) -> Built:
    """A copy of ``model`` pruned by ``tp.pruner.MagnitudePruner`` (L2 magnitude, one step).

    ``obj`` is the pruned copy; ``seconds`` times pruner construction and ``step()``. The classifier
    (``find_classifier`` when None) is ignored, so the output size is kept.
    """
    try:
        tp = import_tp()
    except ImportError as e:
        return Built(error=_err(e))
    model = copy.deepcopy(model)
    mods = dict(model.named_modules())
    names = find_classifier(model) if classifier_names is None else classifier_names
    t0 = time.perf_counter()
    try:
        with _quiet(), torch.enable_grad():
            pruner = tp.pruner.MagnitudePruner(
                model, x, importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=pruning_ratio,
                ignored_layers=[mods[n] for n in names])
            pruner.step()
    except Exception as e:  # noqa: BLE001
        return Built(error=_err(e), seconds=time.perf_counter() - t0)
    return Built(obj=model, seconds=time.perf_counter() - t0)


if __name__ == "__main__":
    import statistics

    import torchvision

    torch.manual_seed(0)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    cases: list[tuple[str, dict[str, Any]]] = [
        ("resnet18", {}), ("mobilenet_v2", {}), ("densenet121", {}), ("convnext_tiny", {}),
        ("regnet_x_400mf", {}), ("shufflenet_v2_x0_5", {}),
        ("googlenet", {"aux_logits": False, "init_weights": True}),
    ]
    x = torch.randn(1, 3, 64, 64)
    hdr = (f"{'model':20} {'oto':4} {'groups':>6} {'rows':>6} {'runs':5} {'exact':5} "
           f"{'max_diff':>9} {'max|y|':>7} {'params c/f':>10} {'tp':3} {'tp_ch':>6}  error")
    print(hdr)
    print("-" * len(hdr))
    for name, kw in cases:
        m = torchvision.models.get_model(name, weights=None, **kw)
        cov = oto_coverage(m, x, classifier_names=find_classifier(m))
        tg = tp_groups(m, x)
        ratio = f"{cov.params_compressed / cov.params_full:.2f}" if cov.params_compressed else "-"
        print(f"{name:20} {'ok' if cov.ok else 'FAIL':4} {cov.groups:6d} {cov.prunable_rows:6d} "
              f"{str(cov.runs):5} {str(cov.exact):5} {cov.max_diff:9.2e} {cov.max_abs_y:7.2f} "
              f"{ratio:>10} {'ok' if tg.ok else 'NO':3} {tg.channels:6d}  "
              f"{cov.error or ''}{' | tp: ' + tg.error if tg.error else ''}")

    m50, x224 = torchvision.models.get_model("resnet50", weights=None).eval(), torch.randn(1, 3, 224, 224)
    timed = (("OTO(model, x)", lambda: oto_build(m50, x224).seconds),
             ("tp build_dependency", lambda: tp_build(m50, x224).seconds),
             ("tp get_all_groups", lambda: tp_groups(m50, x224).search_seconds))
    for label, fn in timed:
        ts = [fn() for _ in range(5)]
        print(f"resnet50 1x3x224x224 {label:22} median {statistics.median(ts):.3f} s "
              f"(min {min(ts):.3f}, max {max(ts):.3f})")
