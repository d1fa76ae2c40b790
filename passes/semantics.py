"""Compatibility shim: the operator rules moved to ``passes/rules/`` (one file per family).

Importing this module registers the rules (as importing ``otofx.passes`` does) and re-exports the
names code outside the package used to import from here.
"""
from .channels import AxisLabels, ParamRef  # noqa: F401
from .rules.linalg import _einsum_parse  # noqa: F401
from .rules.shape import _groups_of, _permute_dims, _reshape_lab  # noqa: F401
