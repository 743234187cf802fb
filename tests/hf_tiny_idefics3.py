"""Tiny random Idefics3 / SmolVLM models saved as ordinary Hugging Face model folders.

``make_idefics3(dir, arch="idefics3"|"smolvlm")`` writes what ``save_pretrained`` writes for an
``Idefics3ForConditionalGeneration`` / ``SmolVLMForConditionalGeneration`` (config.json,
model.safetensors, generation_config.json), the tiny shared tokenizer (tests/hf_tiny.py) with the
Idefics3 image tokens, the chat template, preprocessor_config.json from the PIL image processor
and processor_config.json (``image_seq_len``, as the hub checkpoints have it).

Sizes: SigLIP-style vision tower (2 layers, hidden 64, 2 heads, intermediate 128, patch 4) whose
``image_size`` equals the processor's ``max_image_size`` (32 px), so every tile the processor
makes is exactly what the tower was built for: 8 x 8 = 64 patches, pixel-shuffled (scale 2) into
``image_seq_len`` = 16 image tokens per tile.  Images are first resized to a longest edge of 64 px,
so a square photo becomes 2 x 2 tiles + the 32-px global image; a 3:1 one 1 x 2 tiles + global.
Llama text model: hidden 64, 2 layers, 4 heads, 2 kv heads, intermediate 128.  Every linear
in-feature count is a multiple of 32 (the connector's is 64 * 2**2 = 256).

The processors: ``Idefics3Processor`` builds as shipped (images + tokenizer);
``SmolVLMProcessor`` needs torchvision (its video processor) and num2words, so
:class:`SmolVLMImageProcessor` subclasses it for images only.  :func:`hf_processor` returns the
right one for a folder.
"""

from __future__ import annotations

import json
from pathlib import Path

try:
    from hf_tiny import IMAGE_TOKEN, _ids, _save, tokenizer
except ImportError:  # imported from the repository root
    from tests.hf_tiny import IMAGE_TOKEN, _ids, _save, tokenizer

__all__ = ["IDEFICS3_CHAT_TEMPLATE", "IMAGE_TOKENS", "SMOLVLM_CHAT_TEMPLATE", "SmolVLMImageProcessor",
           "hf_processor", "image_seq_len", "make_idefics3"]

FAKE_TOKEN = "<fake_token_around_image>"
GLOBAL_TOKEN = "<global-img>"
END_OF_UTTERANCE = "<end_of_utterance>"
#: every token the Idefics3 processor can emit around images (rows/cols up to 6 x 6, as the
#: hub tokenizers have them)
IMAGE_TOKENS = [FAKE_TOKEN, GLOBAL_TOKEN, END_OF_UTTERANCE] + [f"<row_{i}_col_{j}>" for i in range(1, 7)
                                                                  for j in range(1, 7)]

# HuggingFaceM4/Idefics3-8B-Llama3's template without its literal "<|begin_of_text|>" (the tiny
# tokenizer adds "<s>" itself), plus plain-string content.
IDEFICS3_CHAT_TEMPLATE = (
    "{% for message in messages %}{{message['role'].capitalize()}}"
    "{% if message['content'] is string %}{{': ' + message['content']}}"
    "{% else %}{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
# transformers' SmolVLM DEFAULT_CHAT_TEMPLATE (HuggingFaceTB/SmolVLM-*-Instruct) without videos.
SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'] is string %}{{': ' + message['content']}}"
    "{% else %}{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

_ARCHS = {"idefics3": ("Idefics3Config", "Idefics3ForConditionalGeneration", "Idefics3ImageProcessorPil",
                       IDEFICS3_CHAT_TEMPLATE),
          "smolvlm": ("SmolVLMConfig", "SmolVLMForConditionalGeneration", "SmolVLMImageProcessorPil",
                      SMOLVLM_CHAT_TEMPLATE)}


def image_seq_len(tile: int = 32, patch_size: int = 4, scale_factor: int = 2) -> int:
    """Image tokens per tile: (tile / patch)^2 / scale_factor^2."""
    return (tile // patch_size) ** 2 // scale_factor ** 2


def make_idefics3(dir, *, arch: str = "idefics3", seed: int = 0, vision_layers: int = 2, vision_hidden: int = 64,
                  vision_heads: int = 2, vision_intermediate: int = 128, patch_size: int = 4, tile: int = 32,
                  longest_edge: int = 64, scale_factor: int = 2, text_layers: int = 2, hidden: int = 64,
                  heads: int = 4, kv_heads: int = 2, intermediate: int = 128, max_positions: int = 1024,
                  tie: bool | None = None, do_image_splitting: bool = True, text_init_std: float = 0.15) -> Path:
    """A tiny ``Idefics3ForConditionalGeneration`` (``arch="idefics3"``: tokenizer adds ``<s>``,
    untied LM head by default) or ``SmolVLMForConditionalGeneration`` (``arch="smolvlm"``: no BOS,
    the template starts with ``<|im_start|>``, tied LM head by default).

    The language model's matrices (embeddings, projections, LM head) are drawn from
    N(0, ``text_init_std``) instead of transformers' N(0, 0.02): at 0.02 a tied 2-layer model
    greedily repeats one token whatever the prompt, which would make token-for-token generation
    tests trivially true; at 0.15 the greedy continuations vary with the prompt and image while fp16
    weight rounding still leaves the greedy path unchanged."""
    import torch
    import transformers
    from transformers import LlamaConfig

    if arch not in _ARCHS:
        raise ValueError(f"arch must be one of {', '.join(_ARCHS)}, not {arch!r}")
    cfg_name, model_name, improc_name, template = _ARCHS[arch]
    tie = (arch == "smolvlm") if tie is None else tie
    tok = tokenizer(IMAGE_TOKENS, add_bos=(arch == "idefics3"), model_max_length=max_positions,
                    chat_template=template)
    tcfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate,
                       num_hidden_layers=text_layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       max_position_embeddings=max_positions, tie_word_embeddings=tie, rms_norm_eps=1e-5,
                       **_ids(tok))
    vcfg = dict(hidden_size=vision_hidden, intermediate_size=vision_intermediate, num_hidden_layers=vision_layers,
                num_attention_heads=vision_heads, image_size=tile, patch_size=patch_size)
    cfg = getattr(transformers, cfg_name)(vision_config=vcfg, text_config=tcfg.to_dict(), scale_factor=scale_factor,
                                          image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN),
                                          tie_word_embeddings=tie)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(cfg).eval()
    with torch.no_grad():
        for p in [*model.model.text_model.parameters(), *([] if tie else [model.lm_head.weight])]:
            if p.ndim == 2:
                p.normal_(0.0, text_init_std)
    gc = model.generation_config
    gc.bos_token_id, gc.eos_token_id, gc.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    improc = getattr(transformers, improc_name)(size={"longest_edge": longest_edge},
                                                max_image_size={"longest_edge": tile},
                                                do_image_splitting=do_image_splitting)
    out = _save(model, tok, dir, improc)
    processor_class = "Idefics3Processor" if arch == "idefics3" else "SmolVLMProcessor"
    (out / "processor_config.json").write_text(json.dumps(
        {"image_seq_len": image_seq_len(tile, patch_size, scale_factor), "processor_class": processor_class},
        indent=2) + "\n")
    return out


def _smolvlm_processor_class():
    from transformers import ProcessorMixin, SmolVLMProcessor

    class SmolVLMImageProcessor(SmolVLMProcessor):
        """``SmolVLMProcessor`` for images only: no video processor (torchvision) and no num2words
        (only the video prompts use it); everything images go through is the shipped code."""

        def __init__(self, image_processor, tokenizer, image_seq_len: int = 169, chat_template: str | None = None):
            self.fake_image_token = getattr(tokenizer, "fake_image_token", FAKE_TOKEN)
            self.image_token = getattr(tokenizer, "image_token", IMAGE_TOKEN)
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.end_of_utterance_token = getattr(tokenizer, "end_of_utterance_token", END_OF_UTTERANCE)
            self.global_image_token = getattr(tokenizer, "global_image_token", GLOBAL_TOKEN)
            self.image_seq_len = image_seq_len
            self.video_token = None  # no videos: validate_inputs skips the video placeholder count
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    return SmolVLMImageProcessor


def __getattr__(name: str):
    if name == "SmolVLMImageProcessor":  # built lazily: importing this module needs no transformers
        return _smolvlm_processor_class()
    raise AttributeError(name)


def hf_processor(model_dir):
    """The HF processor of a :func:`make_idefics3` folder (PIL image processor, image_seq_len
    from processor_config.json): ``Idefics3Processor`` or the images-only SmolVLM subclass."""
    import transformers
    from transformers import AutoTokenizer

    model_dir = Path(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    pcfg = json.loads((model_dir / "processor_config.json").read_text())
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    if cfg["model_type"] == "idefics3":
        improc = transformers.Idefics3ImageProcessorPil.from_pretrained(str(model_dir))
        return transformers.Idefics3Processor(improc, tok, image_seq_len=pcfg["image_seq_len"],
                                              chat_template=tok.chat_template)
    improc = transformers.SmolVLMImageProcessorPil.from_pretrained(str(model_dir))
    return _smolvlm_processor_class()(improc, tok, image_seq_len=pcfg["image_seq_len"],
                                      chat_template=tok.chat_template)
