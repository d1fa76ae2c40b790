"""Peak activation memory of one forward pass, measured.

``peak_activation_memory(model, example_inputs) -> MemoryPeak``: the largest number of bytes held,
at any moment of one inference forward (``torch.inference_mode``), by tensors the forward itself
allocated: activations, not parameters, buffers or the inputs. This is what removing shortcuts
saves: in a ResNet the block input stays alive while the block's branch is computed; in a plain
network each layer's input can be freed as soon as the layer has run.

* CPU (and any device without an allocator counter): a ``TorchDispatchMode`` sees every op's
  outputs; each new storage adds its ``nbytes`` to a live counter and a ``weakref.finalize`` on the
  storage subtracts them when the storage is freed. Views and in-place results share a storage
  and are counted once. The peak of the counter is the result.
* Both networks run as captured GraphModules by default (``as_graph``), so each value is freed
  right after its last use, the way a deployment runtime plans memory.
* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus what was
  allocated before the forward (the weights and inputs), over the same forward.
* The forward runs in eval mode (every module's ``training`` flag False, each restored after):
  inference, whatever mode the model was handed in (``jrd.export()`` keeps the training flag;
  train-mode dropout masks and batch statistics are not what a deployed network holds).
* Parametrised weights (``torch.nn.utils.parametrize``: a Dirac student before its fold) are
  computed once before the forward, under ``parametrize.cached()``, and count as weights: the
  network is measured as its folded, plain twin would be.

Internals:
    * ``# NB:`` the dispatch mode sees ATen ops, below autograd, so a module's forward and a fused
      ``torch.compile`` graph are both measured by what they really allocate; ops that allocate
      scratch space inside a kernel (oneDNN workspaces) are not seen, on either network alike.
    * Storages are keyed by ``id`` of their Python object, which PyTorch keeps for the storage's
      whole life; the finalizer runs synchronously when the last reference goes.
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import torch.fx as fx

from torch.nn.utils import parametrize

from otofx.capture import capture, normalize_inputs


@dataclass(frozen=True)
class MemoryPeak:
    """Peak bytes of live activations during one forward, and how they were measured."""

    peak_bytes: int
    output_bytes: int  # what is still alive when the forward returns (the outputs)
    method: str  # "dispatch" (live storages seen by a TorchDispatchMode) or "cuda" (allocator peak)


class _LiveStorages(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0
        self.seen: dict = {}

    def _free(self, key: int, nbytes: int) -> None:
        if self.seen.pop(key, None) is not None:
            self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            st = t.untyped_storage()
            key = id(st)
            if key in self.seen:
                continue
            nbytes = st.nbytes()
            self.seen[key] = weakref.finalize(st, self._free, key, nbytes)
            self.live += nbytes
            self.peak = max(self.peak, self.live)
        return out


@contextlib.contextmanager
def _eval_flags(model: torch.nn.Module):
    """Every module's ``training`` flag False; each one's own flag restored after."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        for m, _ in flags:
            m.training = False  # NB: flags, not eval(): a torch.export GraphModule refuses eval()
        yield
    finally:
        for m, f in flags:
            m.training = f


@contextlib.contextmanager
def _weights_computed(model: torch.nn.Module):
    """Parametrised weights computed now, outside the measurement, and read from the cache after."""
    with parametrize.cached():
        with torch.no_grad():
            for m in model.modules():
                if parametrize.is_parametrized(m):
                    for name in m.parametrizations:
                        getattr(m, name)
        yield


def peak_activation_memory(model: torch.nn.Module, example_inputs, as_graph: bool = True) -> MemoryPeak:
    """Peak bytes of activations during one inference forward of ``model`` on ``example_inputs``.

    The forward runs in eval mode, with parametrised weights computed beforehand (module doc);
    ``model``'s flags are restored after.

    ``as_graph``: run ``model`` as otofx captures it (a GraphModule, which drops every value after
    its last use) rather than eagerly. # NB: eager nn.Modules keep each call's arguments alive until
    the call returns (a Sequential's input while its last layer runs), which would charge a ResNet
    and its plain twin for the framework's bookkeeping rather than for their shortcuts.
    """
    args, kwargs = normalize_inputs(example_inputs)
    with _eval_flags(model):
        if as_graph and not isinstance(model, fx.GraphModule):
            model = capture(model, args if not kwargs else kwargs).gm
        # NB: the capture's own modules too (an export graph's mode flags)
        with _eval_flags(model), _weights_computed(model):
            return _measure(model, args, kwargs)


def _measure(model: torch.nn.Module, args: tuple, kwargs: dict) -> MemoryPeak:
    flat = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    device = flat[0].device if flat else next((p.device for p in model.parameters()), torch.device("cpu"))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        with torch.inference_mode():
            out = model(*args, **kwargs)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        after = torch.cuda.memory_allocated(device) - before
        del out
        return MemoryPeak(int(peak), int(after), "cuda")
    mode = _LiveStorages()
    with torch.inference_mode(), mode:
        out = model(*args, **kwargs)
    peak, live = mode.peak, mode.live
    del out
    for f in list(mode.seen.values()):
        f.detach()
    return MemoryPeak(int(peak), int(live), "dispatch")
