"""Tiny random Qwen2-VL / Qwen2.5-VL model folders, saved exactly as ``save_pretrained`` does.

    import hf_tiny_qwen2vl
    d = hf_tiny_qwen2vl.make_qwen2vl(tmp_path / "q", version="2.5")
    proc = hf_tiny_qwen2vl.processor(d)          # images-only Qwen2VLProcessor (no torchvision)

Sizes are chosen for the quantizer and for speed: vision width 64 (4 heads of 16), MLP 128,
patch 4 x 4 x 2 frames (the patch conv reads 3*2*4*4 = 96 values), merge 2 (the merger reads
4*64 = 256), text width 64 (4 heads of 16, 2 KV heads), intermediate 128, 2 layers, vocabulary
320.  ``mrope_section`` [2, 3, 3] sums to head_dim / 2 = 8.  Images are resized to at most
``max_pixels`` = 48*48 and at least 16*16 pixels on multiples of 8 (patch x merge), so a photo
becomes at most 12 x 12 patches = 36 merged tokens.  Qwen2.5-VL: window 16 px = 2 x 2 merged
tokens per window, block 0 windowed, block 1 full attention (``fullatt_block_indexes=[1]``).

The folder holds config.json, model.safetensors, generation_config.json, the tokenizer (with a
Qwen-style chat template that writes ``<|vision_start|><|image_pad|><|vision_end|>`` per image)
and preprocessor_config.json from ``Qwen2VLImageProcessorPil``.
"""

from __future__ import annotations

from pathlib import Path

import hf_tiny

__all__ = ["QWEN2VL_CHAT_TEMPLATE", "VISION_TOKENS", "image_processor", "make_qwen2vl", "processor"]

VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"
VISION_TOKENS = [VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD]

# The Qwen2-VL-Instruct template (system prompt by default; an image part becomes
# <|vision_start|><|image_pad|><|vision_end|>, a text part its text), video parts left out.
QWEN2VL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
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
    from transformers import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(patch_size=patch_size, merge_size=merge_size, temporal_patch_size=2,
                                    min_pixels=min_pixels, max_pixels=max_pixels)


def make_qwen2vl(dir, *, version: str = "2", seed: int = 0, depth: int = 2, vision_hidden: int = 64,
                 vision_heads: int = 4, vision_intermediate: int = 128, patch_size: int = 4, merge_size: int = 2,
                 window_size: int = 16, fullatt_block_indexes: tuple[int, ...] = (1,), hidden: int = 64,
                 heads: int = 4, kv_heads: int = 2, intermediate: int = 128, layers: int = 2,
                 mrope_section: tuple[int, int, int] = (2, 3, 3), tie: bool = False, max_positions: int = 512,
                 min_pixels: int = 16 * 16, max_pixels: int = 48 * 48, hub_config: bool = False) -> Path:
    """A ``Qwen2VLForConditionalGeneration`` (version "2") or ``Qwen2_5_VLForConditionalGeneration``
    (version "2.5") with random weights (``torch.manual_seed(seed)``); returns the folder.

    ``hub_config=True`` rewrites config.json the way the Qwen hub repositories spell it (and
    transformers still reads): the text settings at the top level instead of ``text_config``,
    ``rope_theta`` + ``rope_scaling={"type": "mrope", "mrope_section": ...}``, and the vision
    tower's ``in_chans``."""
    import torch
    import transformers

    if version not in ("2", "2.5"):
        raise ValueError(f"version must be '2' or '2.5', not {version!r}")
    if version == "2" and vision_intermediate % vision_hidden:
        raise ValueError("Qwen2-VL sizes its vision MLP as embed_dim * mlp_ratio (an int): vision_intermediate "
                         f"{vision_intermediate} must be a multiple of vision_hidden {vision_hidden}")
    if sum(mrope_section) * 2 != hidden // heads:
        raise ValueError(f"mrope_section {mrope_section} must sum to head_dim / 2 = {hidden // heads // 2}")
    tok = hf_tiny.tokenizer(VISION_TOKENS, model_max_length=max_positions, chat_template=QWEN2VL_CHAT_TEMPLATE)
    ids = {t: tok.convert_tokens_to_ids(t) for t in VISION_TOKENS}
    im_end = tok.convert_tokens_to_ids(hf_tiny.IM_END)
    text = dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_positions,
                rms_norm_eps=1e-6, tie_word_embeddings=tie, pad_token_id=tok.pad_token_id,
                bos_token_id=tok.bos_token_id, eos_token_id=im_end,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                 "mrope_section": list(mrope_section)})
    if version == "2":
        vision = dict(depth=depth, embed_dim=vision_hidden, hidden_size=hidden, num_heads=vision_heads,
                      mlp_ratio=vision_intermediate // vision_hidden, patch_size=patch_size,
                      spatial_merge_size=merge_size, temporal_patch_size=2, hidden_act="quick_gelu")
        cfg_cls, model_cls = transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration
    else:
        vision = dict(depth=depth, hidden_size=vision_hidden, out_hidden_size=hidden, num_heads=vision_heads,
                      intermediate_size=vision_intermediate, patch_size=patch_size, spatial_merge_size=merge_size,
                      temporal_patch_size=2, hidden_act="silu", window_size=window_size,
                      fullatt_block_indexes=list(fullatt_block_indexes), tokens_per_second=2)
        cfg_cls, model_cls = transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration
    cfg = cfg_cls(text_config=text, vision_config=vision, image_token_id=ids[IMAGE_PAD],
                  video_token_id=ids[VIDEO_PAD], vision_start_token_id=ids[VISION_START],
                  vision_end_token_id=ids[VISION_END], tie_word_embeddings=tie)
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    gc = model.generation_config
    gc.bos_token_id, gc.pad_token_id = tok.bos_token_id, tok.pad_token_id
    gc.eos_token_id = [im_end, tok.eos_token_id]  # as Qwen2-VL-Instruct: <|im_end|> and <|endoftext|>
    improc = image_processor(patch_size=patch_size, merge_size=merge_size, min_pixels=min_pixels,
                             max_pixels=max_pixels)
    out = hf_tiny._save(model, tok, dir, improc)
    if hub_config:
        _to_hub_config(out / "config.json")
    return out


def _to_hub_config(path: Path) -> None:
    import json

    cfg = json.loads(path.read_text())
    text = cfg.pop("text_config")
    rope = text.pop("rope_parameters")
    for k in ("model_type", "layer_types"):
        text.pop(k, None)
    cfg.update(text)
    cfg["rope_theta"] = rope["rope_theta"]
    cfg["rope_scaling"] = {"type": "mrope", "mrope_section": rope["mrope_section"]}
    vision = cfg["vision_config"]
    vision["in_chans"] = vision.pop("in_channels")
    for k in ("rope_parameters", "model_type"):
        vision.pop(k, None)
    path.write_text(json.dumps(cfg, indent=2))


def processor(folder):
    """The HF processor of a :func:`make_qwen2vl` folder, images only: ``Qwen2VLProcessor`` as
    shipped needs a video processor (torchvision), so the image token attributes are set from
    the tokenizer here and ``ProcessorMixin.__init__`` gets the image processor and tokenizer."""
    from transformers import AutoTokenizer, ProcessorMixin, Qwen2VLImageProcessorPil, Qwen2VLProcessor

    class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
        def __init__(self, image_processor, tokenizer, chat_template=None):  # noqa: D401 - see above
            self.image_token, self.video_token = IMAGE_PAD, VIDEO_PAD
            self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
            self.video_token_id = tokenizer.convert_tokens_to_ids(VIDEO_PAD)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    tok = AutoTokenizer.from_pretrained(str(folder))
    return ImageOnlyQwen2VLProcessor(Qwen2VLImageProcessorPil.from_pretrained(str(folder)), tok,
                                     chat_template=tok.chat_template)
