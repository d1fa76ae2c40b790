"""Residual adds, found from the graph, and their removal (JointRD's student, METHODS.md section 2).

``find_residual_adds(gm) -> tuple[ResidualAdd, ...]`` lists every add that closes a residual block;
``remove_residual_adds(gm, keep_projections) -> ShortcutRecord`` rewrites ``gm`` in place so that
each such add becomes its branch.

A residual add is an add (``operator.add``/``iadd``, ``torch.add``, ``Tensor.add``/``add_``, ATen
``add.Tensor``/``add_.Tensor``, with no ``alpha`` other than 1) of two tensors of the same shape
and dtype (no broadcasting), where one operand, the *skip*, comes from a value that also feeds the
other operand, the *branch*:

* **identity**: the skip *is* that value (it is an ancestor of the branch): ``x + f(x)``;
* **projection**: the skip is a short chain (at most ``MAX_CHAIN`` nodes, each with one tensor
  input) from that value: ``bn(conv(x)) + f(x)``, timm's ``avg_pool -> conv -> bn`` included. When
  both operands are such chains, the longer path is the branch.

Nothing depends on class or module names, so torchvision's and timm's ResNets (basic and
bottleneck), MobileNet's inverted residuals and user models are found alike.

Internals:
    * Ancestry is one topological sweep with Python ints as bitsets (one bit per node), so a
      ResNet-152's ~500 nodes cost about a millisecond.
    * Removal rewires the add's users to the branch and erases the add; with
      ``keep_projections=False`` the projection chain is erased too once it has no users (only the
      chain's nodes: no graph-wide dead-code elimination, which would drop in-place ops), and
      ``delete_all_unused_submodules`` drops its modules.
    * ``# NB:`` an in-place add (``out += identity``) mutates its first operand; after removal that
      operand is simply the branch, which is what every later reader of it saw anyway.
"""
from __future__ import annotations

import logging
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

log = logging.getLogger("otofx")

MAX_CHAIN = 6  # longest projection shortcut, in nodes (timm's avg_down is pool -> conv -> bn)

_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add, torch.ops.aten.add.Tensor, torch.ops.aten.add_.Tensor}
_ADD_METHODS = {"add", "add_", "__add__", "__iadd__", "__radd__"}


@dataclass(frozen=True)
class ResidualAdd:
    """One residual add: node names in the graph it was found in."""

    add: str  # the add node
    branch: str  # the operand computed from the block input (the residual function's output)
    skip: str  # the other operand: the block input itself, or its projection
    source: str  # the block input (== skip for an identity shortcut)
    kind: str  # "identity" or "projection"
    chain: tuple = ()  # the projection's nodes, from the source (exclusive) to the skip (inclusive)


@dataclass(frozen=True)
class ShortcutRecord:
    """What :func:`remove_residual_adds` did; kept on the student as ``gm.meta["jointrd"]``."""

    removed: tuple  # ResidualAdd per removed add
    kept: tuple  # ResidualAdd per projection add left in place
    replaced: dict  # removed add name -> the node name that now stands for its value
    dirac: tuple = ()  # names of the Dirac-parametrised weights (set by apply_dirac)

    def resolve(self, name: str) -> str:
        """The node name that stands for ``name`` (an add that was removed, possibly several deep)."""
        seen = set()
        while name in self.replaced and name not in seen:
            seen.add(name)
            name = self.replaced[name]
        return name


def is_add(node: fx.Node) -> bool:
    """An add of two values with ``alpha`` 1 (``torch.add``'s alpha is keyword-only)."""
    if node.op == "call_function":
        ok = node.target in _ADD_FUNCTIONS
    elif node.op == "call_method":
        ok = node.target in _ADD_METHODS
    else:
        ok = False
    return ok and len(node.args) >= 2 and node.kwargs.get("alpha", 1) == 1


def _val(n):
    v = n.meta.get("val") if isinstance(n, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _tensor_inputs(n: fx.Node) -> list:
    """Tensor-valued node inputs of ``n`` (parameters read by get_attr are not inputs)."""
    out = []
    for a in n.all_input_nodes:
        if a.op == "get_attr" or a in out:
            continue
        if "val" in a.meta and _val(a) is None and not isinstance(a.meta["val"], (tuple, list)):
            continue  # a size or another python value
        out.append(a)
    return out


def ancestors(graph: fx.Graph) -> tuple[dict, dict]:
    """(node -> bit index, node -> int bitset of its strict ancestors)."""
    index, anc = {}, {}
    for i, n in enumerate(graph.nodes):
        index[n] = i
        bits = 0
        for a in n.all_input_nodes:
            bits |= anc[a] | (1 << index[a])
        anc[n] = bits
    return index, anc


def _chain(skip: fx.Node, branch: fx.Node, index: dict, anc: dict):
    """(source, chain) when ``skip`` is a short single-input chain from an ancestor of ``branch``."""
    chain, n = [], skip
    for _ in range(MAX_CHAIN):
        ins = _tensor_inputs(n)
        if len(ins) != 1:
            return None
        chain.append(n)
        n = ins[0]
        if anc[branch] >> index[n] & 1:
            return n, tuple(reversed(chain))
    return None


def _depth(a: fx.Node, b: fx.Node, index: dict, anc: dict) -> int:
    """Nodes between ``a`` and ``b`` (an ancestor of ``b``): the size of the set between them."""
    between = 0
    mask = anc[b] & ~(anc[a] | (1 << index[a]))
    while mask:
        mask &= mask - 1
        between += 1
    return between


def classify(node: fx.Node, index: dict, anc: dict) -> ResidualAdd | None:
    """The :class:`ResidualAdd` that ``node`` is, or None."""
    if not is_add(node):
        return None
    a, b = node.args[0], node.args[1]
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)) or a is b:
        return None
    va, vb = _val(a), _val(b)
    if va is None or vb is None or va.shape != vb.shape or va.dtype != vb.dtype:
        return None
    for skip, branch in ((a, b), (b, a)):
        if anc[branch] >> index[skip] & 1:
            return ResidualAdd(node.name, branch.name, skip.name, skip.name, "identity")
    found = []
    for skip, branch in ((b, a), (a, b)):  # the usual order, branch + shortcut, first
        c = _chain(skip, branch, index, anc)
        if c is not None:
            found.append((_depth(c[0], branch, index, anc), len(c[1]), skip, branch, c))
    if not found:
        return None
    # NB: both operands can be short chains from one value (RepVGG's 3x3 and 1x1 paths): the
    # branch is the operand with the longer path from the shared source
    found.sort(key=lambda f: (-f[0], f[1]))
    _, _, skip, branch, (source, chain) = found[0]
    return ResidualAdd(node.name, branch.name, skip.name, source.name, "projection", tuple(c.name for c in chain))


def find_residual_adds(gm: fx.GraphModule) -> tuple:
    """Every residual add of ``gm`` (needs ``node.meta['val']``: run propagate_shapes first)."""
    index, anc = ancestors(gm.graph)
    out = []
    for n in gm.graph.nodes:
        r = classify(n, index, anc)
        if r is not None:
            out.append(r)
    return tuple(out)


def remove_residual_adds(gm: fx.GraphModule, keep_projections: bool = True) -> ShortcutRecord:
    """Turn every identity residual add of ``gm`` (and, unless ``keep_projections``, every projection
    add) into its branch, in place; returns what was done."""
    found = find_residual_adds(gm)
    nodes = {n.name: n for n in gm.graph.nodes}
    removed, kept, replaced = [], [], {}
    for r in found:
        if r.kind == "projection" and keep_projections:
            kept.append(r)
            continue
        add, branch = nodes[r.add], nodes[r.branch]
        add.replace_all_uses_with(branch)
        gm.graph.erase_node(add)
        replaced[r.add] = r.branch
        removed.append(r)
        if r.kind == "projection":
            for name in reversed(r.chain):  # skip first, back towards the source
                n = nodes[name]
                if n.users:
                    break
                gm.graph.erase_node(n)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    log.info("otofx.jointrd: removed %d residual adds (%d identity), kept %d projection adds",
             len(removed), sum(r.kind == "identity" for r in removed), len(kept))
    return ShortcutRecord(tuple(removed), tuple(kept), replaced)
