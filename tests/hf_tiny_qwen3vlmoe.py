"""Tiny random Qwen3-VL-MoE model folders (``Qwen3VLMoeForConditionalGeneration``), saved exactly
as ``save_pretrained`` does.

    import hf_tiny_qwen3vlmoe as h3
    d = h3.make_qwen3vlmoe(tmp_path / "q3")
    proc = h3.processor(d)          # images-only Qwen3VLProcessor (no torchvision)

Sizes: vision width 64 (4 heads of 16), MLP 128, 3 blocks, patch 4 x 4 x 2 frames, merge 2 (the
mergers read 4*64 = 256), a learned 4 x 4 position table (``num_position_embeddings`` 16, a
perfect square) bilinearly resampled to each image's patch grid, DeepStack taps after vision
blocks 0 and 1 (added to the outputs of decoder layers 0 and 1).  Text width 64 (4 heads of 16,
2 KV heads, q/k RMSNorm per head), 3 layers, 8 experts of width 96 (top-2; 96 so that no expert
matrix is square and the hub layout, transposed, is told apart from the module layout), vocabulary 320;
``mlp_only_layers`` makes a layer a dense SwiGLU (intermediate 128) instead.  Interleaved mrope
with ``mrope_section`` [2, 3, 3] (sums to head_dim / 2 = 8).  Images are resized to at most
48 x 48 and at least 16 x 16 pixels on multiples of 8, so a photo is at most 36 merged tokens.

The router is re-drawn with std ``router_std`` (0.5; transformers initialises it at 0.02):
real routers are peaked, and near-uniform random routing puts top-k decisions within float16
rounding of a tie, which would make parity tests flaky for reasons no real model has.
"""

from __future__ import annotations

from pathlib import Path

import hf_tiny
from hf_tiny_qwen2vl import IMAGE_PAD, VIDEO_PAD, VISION_END, VISION_START, VISION_TOKENS

__all__ = ["QWEN3VL_CHAT_TEMPLATE", "image_processor", "make_qwen3vlmoe", "processor"]

# The Qwen3-VL-Instruct template's image/text parts (no default system prompt), video parts left out.
QWEN3VL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def image_processor(*, patch_size: int = 4, merge_size: int = 2, min_pixels: int = 16 * 16,
                    max_pixels: int = 48 * 48):
    """Qwen3-VL uses the Qwen2-VL image processor with mean = std = 0.5 (and patch 16 in the real
    models)."""
    from transformers import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(patch_size=patch_size, merge_size=merge_size, temporal_patch_size=2,
                                    min_pixels=min_pixels, max_pixels=max_pixels, image_mean=[0.5, 0.5, 0.5],
                                    image_std=[0.5, 0.5, 0.5])


def make_qwen3vlmoe(dir, *, seed: int = 0, depth: int = 3, vision_hidden: int = 64, vision_heads: int = 4,
                    vision_intermediate: int = 128, patch_size: int = 4, merge_size: int = 2,
                    num_position_embeddings: int = 16, deepstack: tuple[int, ...] = (0, 1), hidden: int = 64,
                    heads: int = 4, kv_heads: int = 2, layers: int = 3, experts: int = 8, top_k: int = 2,
                    moe_intermediate: int = 96, intermediate: int = 128, mlp_only_layers: tuple[int, ...] = (),
                    mrope_section: tuple[int, int, int] = (2, 3, 3), tie: bool = False, max_positions: int = 512,
                    router_std: float = 0.5, min_pixels: int = 16 * 16, max_pixels: int = 48 * 48) -> Path:
    """A ``Qwen3VLMoeForConditionalGeneration`` with random weights (``torch.manual_seed(seed)``);
    returns the folder."""
    import torch
    import transformers

    if sum(mrope_section) * 2 != hidden // heads:
        raise ValueError(f"mrope_section {mrope_section} must sum to head_dim / 2 = {hidden // heads // 2}")
    if int(num_position_embeddings ** 0.5) ** 2 != num_position_embeddings:
        raise ValueError(f"num_position_embeddings {num_position_embeddings} must be a perfect square")
    tok = hf_tiny.tokenizer(VISION_TOKENS, model_max_length=max_positions, chat_template=QWEN3VL_CHAT_TEMPLATE)
    ids = {t: tok.convert_tokens_to_ids(t) for t in VISION_TOKENS}
    im_end = tok.convert_tokens_to_ids(hf_tiny.IM_END)
    text = dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hidden // heads,
                max_position_embeddings=max_positions, rms_norm_eps=1e-6, tie_word_embeddings=tie,
                num_experts=experts, num_experts_per_tok=top_k, moe_intermediate_size=moe_intermediate,
                mlp_only_layers=list(mlp_only_layers), decoder_sparse_step=1, pad_token_id=tok.pad_token_id,
                bos_token_id=tok.bos_token_id, eos_token_id=im_end,
                rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_interleaved": True,
                                 "mrope_section": list(mrope_section)})
    vision = dict(depth=depth, hidden_size=vision_hidden, out_hidden_size=hidden, num_heads=vision_heads,
                  intermediate_size=vision_intermediate, patch_size=patch_size, spatial_merge_size=merge_size,
                  temporal_patch_size=2, hidden_act="gelu_pytorch_tanh",
                  num_position_embeddings=num_position_embeddings, deepstack_visual_indexes=list(deepstack))
    cfg = transformers.Qwen3VLMoeConfig(text_config=text, vision_config=vision, image_token_id=ids[IMAGE_PAD],
                                        video_token_id=ids[VIDEO_PAD], vision_start_token_id=ids[VISION_START],
                                        vision_end_token_id=ids[VISION_END], tie_word_embeddings=tie)
    torch.manual_seed(seed)
    model = transformers.Qwen3VLMoeForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            gate = getattr(layer.mlp, "gate", None)
            if gate is not None and not isinstance(gate, torch.nn.Linear):  # the MoE router
                gate.weight.normal_(0.0, router_std)
    gc = model.generation_config
    gc.bos_token_id, gc.pad_token_id = tok.bos_token_id, tok.pad_token_id
    gc.eos_token_id = [im_end, tok.eos_token_id]
    improc = image_processor(patch_size=patch_size, merge_size=merge_size, min_pixels=min_pixels,
                             max_pixels=max_pixels)
    return hf_tiny._save(model, tok, dir, improc)


def processor(folder):
    """The HF processor of a :func:`make_qwen3vlmoe` folder, images only: ``Qwen3VLProcessor`` as
    shipped needs a video processor (torchvision), so the token attributes are set from the
    tokenizer here and ``ProcessorMixin.__init__`` gets the image processor and tokenizer."""
    from transformers import AutoTokenizer, ProcessorMixin, Qwen2VLImageProcessorPil, Qwen3VLProcessor

    class ImageOnlyQwen3VLProcessor(Qwen3VLProcessor):
        def __init__(self, image_processor, tokenizer, chat_template=None):  # noqa: D401 - see above
            self.image_token, self.video_token = IMAGE_PAD, VIDEO_PAD
            self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
            self.video_token_id = tokenizer.convert_tokens_to_ids(VIDEO_PAD)
            self.vision_start_token, self.vision_end_token = VISION_START, VISION_END
            self.vision_start_token_id = tokenizer.convert_tokens_to_ids(VISION_START)
            self.vision_end_token_id = tokenizer.convert_tokens_to_ids(VISION_END)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    tok = AutoTokenizer.from_pretrained(str(folder))
    return ImageOnlyQwen3VLProcessor(Qwen2VLImageProcessorPil.from_pretrained(str(folder)), tok,
                                     chat_template=tok.chat_template)
