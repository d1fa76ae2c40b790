"""Analysis and rewrite passes (installed as ``otofx.passes``).

capture -> propagate_shapes -> find_zigs -> plan_zero_rows -> prune. Importing this package
registers every operator rule.
"""
from . import rules  # noqa: F401  (registers the operator rules: passes/rules/)
from .prune import Plan, plan_rows, plan_zero_rows, prune, row_norms
from .registry import RULES, RuleDeclined, register_rule, unregister
from .shapes import propagate_shapes
from .unionfind import UnionFind
from .zigs import ZIG, ZigSet, find_zigs

__all__ = ["find_zigs", "prune", "plan_zero_rows", "plan_rows", "row_norms", "propagate_shapes", "Plan", "ZIG",
           "ZigSet", "UnionFind", "RULES", "RuleDeclined", "register_rule", "unregister"]
