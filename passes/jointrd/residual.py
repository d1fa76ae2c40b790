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

and the branch computes a *layer*: some node on the path from that value to the branch is a
``call_module`` holding parameters, or reads a parameter by ``get_attr``. # NB: without that rule a
hand-written tanh-GELU's ``x + 0.044715 * x**3`` (GPT-2's ``gelu_new``) is ``x + f(x)`` too.

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
    * Stochastic depth (torchvision's ``StochasticDepth``, timm's ``DropPath``, as modules or the
      ``stochastic_depth``/``drop_path`` functions, or traced through: ``branch * mask`` with the
      mask a ``bernoulli``/``rand`` draw scaled by numbers, then ``/ keep``) ending a removed add's
      branch is replaced by its input, and the mask's computation erased: in a plain network a
      dropped block would zero the whole stream. # NB: any other random draw left on such a branch
      is logged as a warning.
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
# stochastic depth, by class / function name (torchvision's StochasticDepth and stochastic_depth,
# timm's DropPath and drop_path): neither library needs to be installed
_DROP_PATH_MODULES = ("StochasticDepth", "DropPath")
_DROP_PATH_FUNCTIONS = ("stochastic_depth", "drop_path")


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
    replaced: dict  # removed add (or dropped drop-path) name -> the node name that now stands for its value
    dirac: tuple = ()  # names of the Dirac-parametrised weights (set by apply_dirac)
    dropped: tuple = ()  # names of the stochastic-depth nodes removed from the removed adds' branches

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


def _parametrised(n: fx.Node, gm) -> bool:
    """``n`` is a call_module holding parameters, or reads a parameter by ``get_attr``."""
    if n.op == "call_module":
        try:
            m = gm.get_submodule(n.target)
        except AttributeError:
            return True  # cannot tell: as before the rule existed
        if next(m.parameters(), None) is not None:
            return True
    for a in n.all_input_nodes:
        if a.op == "get_attr":
            owner, _, field = a.target.rpartition(".")
            try:
                t = getattr(gm.get_submodule(owner) if owner else gm, field)
            except AttributeError:
                continue
            if isinstance(t, torch.nn.Parameter):
                return True
    return False


def _on_branch(branch: fx.Node, source: fx.Node, index: dict, anc: dict, hit) -> fx.Node | None:
    """The first node found on the paths from ``source`` (exclusive) to ``branch`` (inclusive) for
    which ``hit(node)`` holds, or None."""
    bit = index[source]
    stack, seen = [branch], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if hit(n):
            return n
        stack.extend(a for a in n.all_input_nodes if a is not source and anc[a] >> bit & 1)
    return None


def _computes_layer(source: fx.Node, branch: fx.Node, index: dict, anc: dict) -> bool:
    """Some node on the paths from ``source`` (exclusive) to ``branch`` (inclusive) is parametrised."""
    gm = branch.graph.owning_module
    if gm is None:
        return True  # a bare Graph: no modules to look at
    return _on_branch(branch, source, index, anc, lambda n: _parametrised(n, gm)) is not None


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
            # NB: x + g(x) with no layer in g is arithmetic (a tanh-GELU's x + 0.044715 * x**3),
            # not a block; nor is it a projection (the "chain" would run through x itself)
            if not _computes_layer(skip, branch, index, anc):
                return None
            return ResidualAdd(node.name, branch.name, skip.name, skip.name, "identity")
    found = []
    for skip, branch in ((b, a), (a, b)):  # the usual order, branch + shortcut, first
        c = _chain(skip, branch, index, anc)
        if c is not None and _computes_layer(c[0], branch, index, anc):
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


def is_drop_path(node: fx.Node) -> bool:
    """A stochastic-depth call: ``StochasticDepth``/``DropPath`` module, ``stochastic_depth``/``drop_path``."""
    if node.op == "call_module":
        gm = node.graph.owning_module
        try:
            m = gm.get_submodule(node.target) if gm is not None else None
        except AttributeError:
            return False
        return type(m).__name__ in _DROP_PATH_MODULES
    if node.op == "call_function":
        return getattr(node.target, "__name__", None) in _DROP_PATH_FUNCTIONS and bool(node.args)
    return False


_RANDOM_DRAWS = ("bernoulli", "rand", "rand_like")
_MULS = {operator.mul, torch.mul, "mul", "mul_", "__mul__"}
_SCALINGS = {operator.mul, operator.truediv, torch.mul, torch.div, "mul", "div", "mul_", "div_", "__mul__",
             "__truediv__", "__div__"}


def _base(n: fx.Node) -> str:
    t = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")
    return t.split(".")[0].rstrip("_")


def _is_draw(n: fx.Node) -> bool:
    return n.op in ("call_function", "call_method") and _base(n) in _RANDOM_DRAWS


def _target_in(n: fx.Node, targets: set) -> bool:
    try:
        return n.op in ("call_function", "call_method") and n.target in targets
    except TypeError:  # an unhashable target
        return False


def _scaled_by_number(n: fx.Node) -> bool:
    return _target_in(n, _SCALINGS) and len(n.args) == 2 and isinstance(n.args[0], fx.Node) \
        and isinstance(n.args[1], (int, float))


def _is_mask(m) -> bool:
    """A random draw, scaled by numbers (``bernoulli_(keep) / keep``)."""
    while isinstance(m, fx.Node) and _scaled_by_number(m):
        m = m.args[0]
    return isinstance(m, fx.Node) and _is_draw(m)


def _unmasked(n: fx.Node):
    """(value, nodes to drop) when ``n`` is ``value * mask`` (scaled by numbers): a traced drop-path."""
    scaled = []
    while _scaled_by_number(n) and not _is_mask(n):
        scaled.append(n)
        n = n.args[0]
    if _target_in(n, _MULS) and len(n.args) == 2 and all(isinstance(a, fx.Node) for a in n.args):
        for value, mask in (n.args, reversed(n.args)):
            if _is_mask(mask) and not _is_mask(value):
                return value, [*scaled, n]
    return None


def _erase_mask(gm: fx.GraphModule, dropped: list, value: fx.Node, index: dict, anc: dict) -> None:
    """Erase a traced drop-path's product and the mask computation only it used (not ``value``'s ancestors)."""
    keep = anc[value] | (1 << index[value])
    region, stack = set(), list(dropped)
    while stack:
        n = stack.pop()
        if n in region or n.op not in ("call_function", "call_method") or keep >> index[n] & 1:
            continue
        region.add(n)
        stack.extend(n.all_input_nodes)
        # NB: in-place updates of the mask (torchvision's noise.div_(keep)) hang off it, unused
        stack.extend(u for u in n.users if not u.users and u.args and u.args[0] is n)
    for n in sorted(region, key=lambda n: -index[n]):  # users first: a node still used is kept
        if not n.users:
            gm.graph.erase_node(n)


def _random_on_branch(branch: fx.Node, source: fx.Node, index: dict, anc: dict) -> str | None:
    """The name of a random-draw node (``bernoulli``, ``rand``) on the paths from ``source`` to ``branch``."""
    n = _on_branch(branch, source, index, anc, _is_draw)
    return None if n is None else n.name


def _drop_paths(gm: fx.GraphModule, removed: list, nodes: dict, replaced: dict) -> tuple:
    """Replace the stochastic depth ending each removed add's branch by its input; returns the names."""
    dropped = []
    # NB: computed once: rewiring and erasing only remove edges, so these stay supersets of the
    # true ancestors, which keeps more of the graph (never less) and walks only real edges
    index, anc = ancestors(gm.graph)
    for r in removed:
        n = nodes[r.branch]
        while True:
            if is_drop_path(n) and isinstance(n.args[0], fx.Node):
                inp, gone = n.args[0], []
            else:  # traced through: branch * mask (/ keep)
                found = _unmasked(n)
                if found is None:
                    break
                inp, gone = found
            n.replace_all_uses_with(inp)
            _erase_mask(gm, gone, inp, index, anc)
            if not gone:
                gm.graph.erase_node(n)
            replaced[n.name] = inp.name
            dropped.append(n.name)
            n = inp
        if nodes[r.source] in gm.graph.nodes:
            rnd = _random_on_branch(n, nodes[r.source], index, anc)
            if rnd is not None:
                log.warning("otofx.jointrd: the branch of removed add '%s' draws random numbers ('%s'): if that "
                            "is stochastic depth in a form otofx does not recognise, the plain network drops "
                            "its whole stream in training; build the model without it "
                            "(drop_path_rate=0 / stochastic_depth_prob=0)", r.add, rnd)
    if dropped:
        log.info("otofx.jointrd: replaced %d stochastic-depth calls on removed shortcuts' branches by identity "
                 "(a plain network has no shortcut to keep when a block is dropped)", len(dropped))
    return tuple(dropped)


def remove_residual_adds(gm: fx.GraphModule, keep_projections: bool = True) -> ShortcutRecord:
    """Turn every identity residual add of ``gm`` (and, unless ``keep_projections``, every projection
    add) into its branch, in place, and drops the stochastic depth ending those branches; returns
    what was done."""
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
    # NB: after every add is rewired, so no later ResidualAdd names an erased node
    dropped = _drop_paths(gm, removed, nodes, replaced)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    log.info("otofx.jointrd: removed %d residual adds (%d identity), kept %d projection adds",
             len(removed), sum(r.kind == "identity" for r in removed), len(kept))
    return ShortcutRecord(tuple(removed), tuple(kept), replaced, dropped=dropped)
