"""Random-weight Hugging Face folders with the shapes of real edge VLMs (no hub access here).

``smolvlm_256m``: HuggingFaceTB/SmolVLM-256M-Instruct's configuration (SigLIP vision 768 x 12 layers
at 512 px with patch 16, pixel-shuffle scale 4 -> 64 tokens per 512-px tile, Llama text 576 x 30
layers, 9 heads / 3 KV heads, vocabulary 49280).  The image processor resizes the longest edge to
1024 (the hub default is 2048), so a 512-px photo becomes 2 x 2 tiles + the global image.
``qwen2vl_2b``: Qwen/Qwen2-VL-2B-Instruct's configuration (ViT 1280 x 32 layers, patch 14, 2 x 2
merge to 1536; Qwen2 text 1536 x 28 layers, 12 heads / 2 KV heads, vocabulary 151936, tied
embeddings, mrope sections 16/24/24), default min/max pixels.

The tokenizers are the tests' small byte-level BPE (tests/hf_tiny.py) with each family's special
tokens; the model vocabularies keep their real sizes (the LM head and embedding cost is real).
"""

from __future__ import annotations

import json
from pathlib import Path

QWEN2VL_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

SMOLVLM_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def _finish(model, tok, improc, out: Path, processor_config: dict | None = None) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    gc = model.generation_config
    gc.bos_token_id, gc.eos_token_id, gc.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    improc.save_pretrained(out)
    if processor_config:
        (out / "processor_config.json").write_text(json.dumps(processor_config, indent=2))
    (out / ".complete").write_text("ok")
    return out


def smolvlm_256m(out: Path) -> Path:
    import torch
    from transformers import LlamaConfig, SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMImageProcessorPil

    import hf_tiny

    rows = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
    tok = hf_tiny.tokenizer(["<fake_token_around_image>", "<global-img>", "<end_of_utterance>", *rows],
                            vocab_size=512, model_max_length=8192, chat_template=SMOLVLM_TEMPLATE)
    text = LlamaConfig(vocab_size=49280, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                       num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                       rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
                       tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id)
    cfg = SmolVLMConfig(vision_config={"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                                       "num_attention_heads": 12, "patch_size": 16, "image_size": 512},
                        text_config=text.to_dict(), scale_factor=4, image_token_id=tok.convert_tokens_to_ids("<image>"),
                        tie_word_embeddings=False)
    torch.manual_seed(0)
    model = SmolVLMForConditionalGeneration(cfg).eval()
    improc = SmolVLMImageProcessorPil(size={"longest_edge": 1024}, max_image_size={"longest_edge": 512},
                                      do_image_splitting=True)
    return _finish(model, tok, improc, out, {"image_seq_len": 64, "processor_class": "SmolVLMProcessor"})


def qwen2vl_2b(out: Path) -> Path:
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil

    import hf_tiny

    tok = hf_tiny.tokenizer(["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"],
                            vocab_size=512, model_max_length=32768, chat_template=QWEN2VL_TEMPLATE)
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                                                      "<|video_pad|>")}
    text = {"vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
            "num_attention_heads": 12, "num_key_value_heads": 2, "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
            "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    vision = {"depth": 32, "embed_dim": 1280, "hidden_size": 1536, "mlp_ratio": 4, "num_heads": 16,
              "in_channels": 3, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2}
    cfg = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=True)
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(cfg).eval()
    improc = Qwen2VLImageProcessorPil()
    return _finish(model, tok, improc, out)
