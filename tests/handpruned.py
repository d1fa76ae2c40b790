"""Models made narrower by hand, as a compressed model in module form is: the model's own class
with fewer channels, heads or MLP units (weights sliced, layer attributes updated).

Used by ``test_io.py`` and ``test_onnx.py``; each builder returns ``(model, example_input)`` in eval
mode with non-trivial weights (``helpers.randomize``).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from helpers import randomize


def _rows(p: nn.Parameter | torch.Tensor, keep, dim=0):
    out = p.detach().index_select(dim, torch.as_tensor(keep, dtype=torch.long)).clone()
    return nn.Parameter(out, requires_grad=p.requires_grad) if isinstance(p, nn.Parameter) else out


def _narrow_linear(lin: nn.Linear, keep, dim: int) -> None:
    """Keep output rows (dim 0) or input columns (dim 1) ``keep`` of a Linear."""
    lin.weight = _rows(lin.weight, keep, dim)
    if dim == 0:
        if lin.bias is not None:
            lin.bias = _rows(lin.bias, keep)
        lin.out_features = len(keep)
    else:
        lin.in_features = len(keep)


def resnet18():
    """torchvision resnet18 (10 classes) whose every BasicBlock's inner width is cut to a random subset."""
    import torchvision

    torch.manual_seed(0)
    model = randomize(torchvision.models.resnet18(num_classes=10))
    g = torch.Generator().manual_seed(0)
    blocks = [b for layer in (model.layer1, model.layer2, model.layer3, model.layer4) for b in layer]
    for i, block in enumerate(blocks):
        c = block.conv1.out_channels
        keep = torch.randperm(c, generator=g)[: c // 2 + i].sort().values
        block.conv1.weight = _rows(block.conv1.weight, keep)
        block.conv1.out_channels = len(keep)
        bn = block.bn1
        bn.weight, bn.bias = _rows(bn.weight, keep), _rows(bn.bias, keep)
        bn.running_mean, bn.running_var = _rows(bn.running_mean, keep), _rows(bn.running_var, keep)
        bn.num_features = len(keep)
        block.conv2.weight = _rows(block.conv2.weight, keep, 1)
        block.conv2.in_channels = len(keep)
    return model.eval(), torch.randn(2, 3, 32, 32)


def bert_config(**kw):
    import transformers

    return transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=37, max_position_embeddings=16, **kw)


def bert(cls_name: str = "BertModel"):
    """Tiny BERT: layer 0 without heads 1 and 3 (of 4), layer 1 with 20 of its 37 MLP units."""
    import transformers

    torch.manual_seed(0)
    model = randomize(getattr(transformers, cls_name)(bert_config()))
    base = model.bert if hasattr(model, "bert") else model
    att = base.encoder.layer[0].attention
    rows = torch.cat([torch.arange(h * 8, h * 8 + 8) for h in (0, 2)])
    for lin in (att.self.query, att.self.key, att.self.value):
        _narrow_linear(lin, rows, 0)
    _narrow_linear(att.output.dense, rows, 1)
    att.self.num_attention_heads, att.self.all_head_size = 2, 16
    layer = base.encoder.layer[1]
    keep = torch.tensor(sorted(torch.randperm(37)[:20].tolist()))
    _narrow_linear(layer.intermediate.dense, keep, 0)
    _narrow_linear(layer.output.dense, keep, 1)
    ids = torch.randint(0, 100, (2, 8))
    return model.eval(), ids


def llama_config(**kw):
    import transformers

    return transformers.LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, intermediate_size=40, max_position_embeddings=32, **kw)


def llama():
    """Tiny LLaMA (grouped-query attention, 4 query heads over 2 key/value heads): layer 0 without its
    second key/value head and the two query heads that read it; layer 1 with 25 of its 40 MLP units."""
    import transformers

    torch.manual_seed(0)
    model = randomize(transformers.LlamaForCausalLM(llama_config()))
    att = model.model.layers[0].self_attn
    _narrow_linear(att.q_proj, torch.arange(0, 16), 0)
    _narrow_linear(att.k_proj, torch.arange(0, 8), 0)
    _narrow_linear(att.v_proj, torch.arange(0, 8), 0)
    _narrow_linear(att.o_proj, torch.arange(0, 16), 1)
    mlp = model.model.layers[1].mlp
    keep = torch.tensor(sorted(torch.randperm(40)[:25].tolist()))
    _narrow_linear(mlp.gate_proj, keep, 0)
    _narrow_linear(mlp.up_proj, keep, 0)
    _narrow_linear(mlp.down_proj, keep, 1)
    mlp.intermediate_size = 25
    return model.eval(), torch.randint(0, 100, (2, 8))


def gpt2_config():
    import transformers

    return transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=16,
                                   bos_token_id=0, eos_token_id=0)


def gpt2():
    """Tiny GPT-2 language model (lm_head tied to wte) with 50 of layer 0's 128 MLP units."""
    import transformers

    torch.manual_seed(0)
    model = randomize(transformers.GPT2LMHeadModel(gpt2_config()))
    mlp = model.transformer.h[0].mlp
    keep = torch.tensor(sorted(torch.randperm(128)[:50].tolist()))
    # Conv1D stores its weight [in, out]
    mlp.c_fc.weight = _rows(mlp.c_fc.weight, keep, 1)
    mlp.c_fc.bias = _rows(mlp.c_fc.bias, keep)
    mlp.c_fc.nf = 50
    mlp.c_proj.weight = _rows(mlp.c_proj.weight, keep, 0)
    return model.eval(), torch.randint(0, 100, (2, 8))


class AttnNet(nn.Module):
    """Embedding -> nn.MultiheadAttention (4 heads of 4) -> head; importable, so rebuildable by class."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h = self.proj(x)
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.head(a + h)


def attn_net():
    """:class:`AttnNet` whose attention keeps heads 0 and 3 (a PrunedMultiheadAttention)."""
    from otofx.passes.modules import PrunedMultiheadAttention

    torch.manual_seed(0)
    model = randomize(AttnNet())
    mha = model.attn
    keep = torch.tensor([0, 3])
    rows = torch.cat([torch.arange(h * 4, h * 4 + 4) for h in keep.tolist()])
    packed_rows = torch.cat([rows + 16 * part for part in range(3)])
    mha.in_proj_weight = _rows(mha.in_proj_weight, packed_rows)
    mha.in_proj_bias = _rows(mha.in_proj_bias, packed_rows)
    mha.out_proj.weight = _rows(mha.out_proj.weight, rows, 1)
    model.attn = PrunedMultiheadAttention(mha, 2, 4, keep, 4)
    return model.eval(), torch.randn(2, 5, 6)
