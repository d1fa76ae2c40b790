"""otofx: Only-Train-Once structured pruning as torch.fx passes.

``otofx.OTO(model, example_inputs)`` finds the zero-invariant groups of any traceable model;
``oto.compress()`` returns a smaller copy of the model (its own class; ``form="graph"`` gives a
GraphModule) equal to the model with its zero rows removed.
"""
from otofx import passes  # noqa: F401  (registers the operator rules)
from otofx.api import OTO, eval_mode, outputs_close
from otofx.backend import register as _register_backend
from otofx.errors import CaptureError, InputError, OTOError, ShapeError, VerificationError
from otofx.optim import DHSPG, HESSO, NonFiniteGradError, OptimizerError
from otofx.passes.registry import RuleDeclined, register_rule
from otofx.passes.zigs import ZIG, ZigSet
from otofx.saveload import load, save

_register_backend()  # torch.compile(model, backend="otofx")

# the seed methods and the other subpackages, imported on first use: ``import otofx`` then
# ``otofx.admm.ADMM(...)`` works without ``import otofx.admm`` (and without loading them up front)
_LAZY = ("admm", "scop", "slb", "jointrd", "distributed", "sparsity", "kernels", "demo", "visualize")


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return importlib.import_module(f"otofx.{name}")
    raise AttributeError(f"module 'otofx' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__version__ = "0.1.0"
__all__ = ["OTO", "ZIG", "ZigSet", "OTOError", "CaptureError", "InputError", "ShapeError", "VerificationError",
           "eval_mode", "outputs_close", "DHSPG", "HESSO", "OptimizerError", "NonFiniteGradError", "register_rule",
           "RuleDeclined", "save", "load"]
