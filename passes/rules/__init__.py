"""The operator rules, one file per op family; importing this package registers them all.

=============== =====================================================================
file            rules
=============== =====================================================================
linalg.py       conv, linear, embedding, matmul, addmm, baddbmm, grouped_mm (fused experts), einsum
attention.py    attention (scaled_dot_product_attention), multihead_attention, multi_head_attention_forward
norm.py         batch_norm (and instance norm), group_norm, layer_norm (and RMSNorm)
elementwise.py  unary (activations, dropout, copies, clamp), singular (rsqrt, reciprocal, log), prelu,
                binary (arithmetic, comparisons), where, masked_fill
spatial.py      pool, resample (interpolation), grid_sample, pad, im2col (F.unfold), col2im (F.fold), windows (x.unfold)
shape.py        cat, stack, unbind, split, reshape, shape_merge, permute, expand, repeat,
                repeat_interleave, view_as, expand_as, channel_shuffle, pixel_shuffle (and unshuffle)
indexing.py     narrow, slice, getitem, index, select, roll, gather
reduction.py    reduce, normalize, softmax, select_k, scan (cumsum, cumprod, cummax, diff)
sizes.py        size, ndim, numel, arith, check
recurrent.py    recurrent (nn.LSTM, nn.GRU, nn.RNN and PrunedRNN)
=============== =====================================================================

Each rule sits with its binders and its ``fix``; its docstring's first line is its channel
algebra, and its properties (``passes/registry.py``, :class:`Rule`) are declared where it is
registered, so no pass keeps a list of rule names.

Internals:
    * Order matters only where one family calls another's rule (``addmm`` reuses ``binary``).
"""
from . import attention, elementwise, indexing, linalg, norm, recurrent, reduction, shape, sizes, spatial  # noqa: F401
