"""Analysis and rewrite algorithms (installed as ``otofx.passes``).

The pipeline's passes (``otofx.pipeline``: capture -> propagate_shapes -> find_zigs ->
plan_zero_rows -> prune) run these on a State: ``annotate_shapes(gm, args, kwargs)``,
``zero_invariant_groups(gm, pin)``, ``zero_row_plan(zigset, module)``, ``prune_graph(gm, plan)``;
each pass has one name, and the functions it runs have their own. Importing this package registers
every operator rule.
"""
from . import rules  # noqa: F401  (registers the operator rules: passes/rules/)
from .prune import Plan, plan_rows, prune_graph, row_norms, zero_row_plan
from .registry import RULES, RuleDeclined, register_rule, unregister
from .shapes import annotate_shapes
from .unionfind import UnionFind
from .zigs import ZIG, ZigSet, zero_invariant_groups

__all__ = ["zero_invariant_groups", "prune_graph", "zero_row_plan", "plan_rows", "row_norms", "annotate_shapes", "Plan", "ZIG",
           "ZigSet", "UnionFind", "RULES", "RuleDeclined", "register_rule", "unregister"]
