"""torchtune's model builders (Llama 2/3/3.2, Mistral and its classifier, Gemma 1/2, Phi-3, Qwen 2, CLIP's text
and vision encoders, T5's encoder): captured, analysed, compressed, exact?

Each model comes from torchtune's component builder at a small size (2 layers, width 32, 4 heads; random
weights, no download) and is given a token sequence (the vision encoder: tiles of an image and their aspect
ratio). Then, as ``bench/diffusers_models.py`` does (``_common.compressed_row``): groups, half (floor) of every
group's rows zeroed, ``compress()`` / ``form="module"`` (torchtune's own ``TransformerDecoder``...) /
``form="graph"``, the parameters kept, the own class against the zeroed model on a batch of 2 of another
length (the CLIP and T5 encoders take one length), and where the own class keeps zero rows.

``pip install torchtune`` with what it imports (torchtune 0.6 needs a torchao that still has
``torchao.dtypes.nf4tensor``, 0.16 or older, and ``datasets``); it is not in otofx's extras. Each model runs
in its own process (``--timeout``); ``--only llama3,gemma`` picks models.
"""
from __future__ import annotations


def _models() -> dict:
    """``{name: (build, inputs)}``."""
    import torch
    from torchtune.models.clip._component_builders import clip_text_encoder, clip_vision_encoder
    from torchtune.models.gemma._component_builders import gemma
    from torchtune.models.gemma2._component_builders import gemma2
    from torchtune.models.llama2._component_builders import llama2
    from torchtune.models.llama3._component_builders import llama3
    from torchtune.models.llama3_2._component_builders import llama3_2
    from torchtune.models.mistral._component_builders import mistral, mistral_classifier
    from torchtune.models.phi3._component_builders import phi3
    from torchtune.models.qwen2._component_builders import qwen2
    from torchtune.models.t5._component_builders import t5_encoder

    def tokens(b, n):
        return dict(tokens=torch.randint(0, 100, (b, n)))

    def fixed(n):
        return lambda b, _: tokens(b, n)

    size = dict(vocab_size=100, num_layers=2, num_heads=4, embed_dim=32, max_seq_len=64)
    return {
        "llama3 (gqa)": (lambda: llama3(num_kv_heads=2, intermediate_dim=48, **size), tokens),
        "llama3_2 (tied)": (lambda: llama3_2(num_kv_heads=2, intermediate_dim=48, **size), tokens),
        "llama2 (mha)": (lambda: llama2(num_kv_heads=4, intermediate_dim=48, **size), tokens),
        "mistral": (lambda: mistral(num_kv_heads=2, intermediate_dim=48, **size), tokens),
        "mistral classifier": (lambda: mistral_classifier(3, num_kv_heads=2, intermediate_dim=48, **size), tokens),
        "gemma (mqa)": (lambda: gemma(head_dim=12, num_kv_heads=1, intermediate_dim=48, **size), tokens),
        "gemma2": (lambda: gemma2(head_dim=12, num_kv_heads=2, intermediate_dim=48, sliding_window_size=6, **size),
                   tokens),
        "phi3": (lambda: phi3(num_kv_heads=4, intermediate_dim=48, **size), tokens),
        "qwen2": (lambda: qwen2(num_kv_heads=2, intermediate_dim=48, **size), tokens),
        "clip text": (lambda: clip_text_encoder(embed_dim=32, num_heads=4, num_layers=2, vocab_size=100,
                                                max_seq_len=16), fixed(16)),
        "t5 encoder": (lambda: t5_encoder(embed_dim=32, mlp_dim=48, num_heads=4, head_dim=8, num_layers=2,
                                          rel_pos_num_buckets=8, rel_pos_max_dist=16, vocab_size=100, norm_eps=1e-6,
                                          max_seq_len=16), fixed(16)),
        "clip vision": (lambda: clip_vision_encoder(tile_size=32, patch_size=8, embed_dim=32, num_layers=2,
                                                    num_heads=4, cls_output_dim=16, max_num_tiles=2),
                        lambda b, _: dict(images=torch.randn(b, 1, 2, 3, 32, 32),
                                          aspect_ratio=torch.tensor([[[1, 2]]] * b))),
    }


def main() -> None:
    from _common import library_sweep

    library_sweep(__file__, __doc__, _models, 16, 24, "torchtune")


if __name__ == "__main__":
    main()
