"""Tiny random Hugging Face models, built from configs and saved as ordinary HF model folders.

Every ``make_*`` function writes exactly what ``save_pretrained`` writes (config.json,
model.safetensors, generation_config.json for generative models), the tokenizer files
(tokenizer.json, tokenizer_config.json, chat_template.jinja for generative models) and, for models
that see images, preprocessor_config.json from the PIL image processor (torchvision is not
installed).  Weights are random but deterministic (``torch.manual_seed(seed)``).

Sizes are chosen for the quantizer: every linear layer's in-features (hidden, intermediate,
heads x head_dim, projector) is a multiple of 32, and the text vocabulary is a multiple of 32.
Each builder runs in a fraction of a second.

    import hf_tiny                    # from a test module (pytest puts tests/ on sys.path)
    from tests.hf_tiny import make_llava   # from the repository root
    d = hf_tiny.make_llava(tmp_path / "llava", vision="siglip", text="qwen2")
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = [
    "IMAGE_TOKEN",
    "LLAMA_CHAT_TEMPLATE",
    "QWEN2_CHAT_TEMPLATE",
    "SPECIAL_TOKENS",
    "TRAIN_TEXTS",
    "make_bert",
    "make_clip",
    "make_llava",
    "make_siglip",
    "num_image_tokens",
    "tokenizer",
]

# Fixed special tokens, in id order: pad=0, bos=1, unk=2, eos=3, image=4, ...  (eos is deliberately
# not 2: a CLIP text config with eos_token_id == 2 takes transformers' legacy argmax pooling path.)
PAD, BOS, UNK, EOS = "<pad>", "<s>", "<unk>", "</s>"
IMAGE_TOKEN = "<image>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, BOS, UNK, EOS, IMAGE_TOKEN, IM_START, IM_END]

VOCAB_MULTIPLE = 32
DEFAULT_VOCAB = 320  # 256 byte-level symbols + specials + merges, a multiple of 32

TRAIN_TEXTS = [
    "a photo of a cat sitting on a red sofa",
    "a photo of a dog running in the green park",
    "a diagram of a neural network with many layers",
    "What is shown in this image? Describe it briefly.",
    "The quick brown fox jumps over the lazy dog.",
    "USER: ASSISTANT: system user assistant",
    "There is a small house next to a tall tree and a blue car.",
    "Two people are walking along the beach at sunset.",
    "An image of the number seven written in black ink.",
    "Quantized vision language models run on edge devices with little memory.",
    "hello world, this is a tiny tokenizer for tests 0123456789",
]

# A llava-hf style template (llava-1.5): images first as "<image>\n", then the text.
# Content may be a plain string or a list of {"type": "image"|"text", ...} parts.
LLAMA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}{% endfor %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# ChatML (llava-onevision-qwen2 style).
QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


_TOKENIZER_CACHE: dict = {}


def _backend_tokenizer(vocab_extra: tuple[str, ...], vocab_size: int):
    """Train (once per argument set) a byte-level BPE whose total size is exactly ``vocab_size``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    key = (vocab_extra, vocab_size)
    if key not in _TOKENIZER_CACHE:
        specials = SPECIAL_TOKENS + [t for t in vocab_extra if t not in SPECIAL_TOKENS]
        tok = Tokenizer(models.BPE(unk_token=UNK))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(TRAIN_TEXTS * 4, trainer=trainer)
        # If the training texts run out of merges before ``vocab_size`` (a large vocab_size), fill
        # the rest with reserved tokens so the size is exact.
        n = tok.get_vocab_size()
        if n < vocab_size:
            tok.add_special_tokens([f"<|reserved_{i}|>" for i in range(vocab_size - n)])
        assert tok.get_vocab_size() == vocab_size, (tok.get_vocab_size(), vocab_size)
        _TOKENIZER_CACHE[key] = tok.to_str()
    return Tokenizer.from_str(_TOKENIZER_CACHE[key])


def tokenizer(vocab_extra: list[str] = (), *, add_bos: bool = False, add_eos: bool = False,
              vocab_size: int = DEFAULT_VOCAB, model_max_length: int = 128, chat_template: str | None = None,
              padding_side: str = "right"):
    """The shared tiny tokenizer: a byte-level BPE trained on :data:`TRAIN_TEXTS`.

    Special tokens (ids): ``<pad>`` 0, ``<s>`` 1, ``<unk>`` 2, ``</s>`` 3, ``<image>`` 4,
    ``<|im_start|>`` 5, ``<|im_end|>`` 6, then ``vocab_extra`` (as special tokens).  The total size is
    exactly ``vocab_size`` (a multiple of 32 by default).  ``add_bos`` / ``add_eos`` make the
    tokenizer wrap every sequence in ``<s>`` ... ``</s>`` (a TemplateProcessing post-processor).
    """
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    vocab_extra = tuple(vocab_extra)
    tok = _backend_tokenizer(vocab_extra, vocab_size)
    bos_id, eos_id = tok.token_to_id(BOS), tok.token_to_id(EOS)
    single = ([f"{BOS}:0"] if add_bos else []) + ["$A:0"] + ([f"{EOS}:0"] if add_eos else [])
    pair = single + ["$B:1"] + ([f"{EOS}:1"] if add_eos else [])
    tok.post_processor = processors.TemplateProcessing(single=single, pair=pair,
                                                       special_tokens=[(BOS, bos_id), (EOS, eos_id)])
    extra = [t for t in vocab_extra if t not in SPECIAL_TOKENS]
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD,
        extra_special_tokens=[IMAGE_TOKEN, IM_START, IM_END] + extra,
        model_max_length=model_max_length, padding_side=padding_side, clean_up_tokenization_spaces=False,
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    assert len(fast) == vocab_size, (len(fast), vocab_size)
    return fast


def _ids(tok) -> dict:
    return {"pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}


def _save(model, tok, dir, image_processor=None) -> Path:
    out = Path(dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    if image_processor is not None:
        image_processor.save_pretrained(out)
    return out


# ----------------------------------------------------------------------------------------- CLIP


def _clip_configs(*, layers, hidden, heads, intermediate, image_size, patch_size, tok, max_positions):
    from transformers import CLIPTextConfig, CLIPVisionConfig

    text = CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate,
                          num_hidden_layers=layers, num_attention_heads=heads,
                          max_position_embeddings=max_positions, projection_dim=hidden, **_ids(tok))
    vision = CLIPVisionConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                              num_attention_heads=heads, image_size=image_size, patch_size=patch_size,
                              projection_dim=hidden)
    return text, vision


def clip_image_processor(image_size: int = 32):
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                 crop_size={"height": image_size, "width": image_size})


def siglip_image_processor(image_size: int = 32):
    from transformers import SiglipImageProcessorPil

    return SiglipImageProcessorPil(size={"height": image_size, "width": image_size})


def make_clip(dir, *, seed: int = 0, layers: int = 2, hidden: int = 64, heads: int = 2, intermediate: int = 128,
              projection_dim: int = 64, image_size: int = 32, patch_size: int = 8, max_positions: int = 32) -> Path:
    """A ``CLIPModel`` (text + vision towers, projections) with a ``CLIPImageProcessorPil``.

    The tokenizer wraps texts in ``<s>`` ... ``</s>`` like CLIP's; the text config's eos id (3) is
    not 2, so pooling takes the first eos position (the modern path).
    """
    import torch
    from transformers import CLIPConfig, CLIPModel

    tok = tokenizer(add_bos=True, add_eos=True, model_max_length=max_positions)
    text, vision = _clip_configs(layers=layers, hidden=hidden, heads=heads, intermediate=intermediate,
                                 image_size=image_size, patch_size=patch_size, tok=tok,
                                 max_positions=max_positions)
    cfg = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=projection_dim)
    torch.manual_seed(seed)
    model = CLIPModel(cfg).eval()
    return _save(model, tok, dir, clip_image_processor(image_size))


# --------------------------------------------------------------------------------------- SigLIP


def _siglip_vision_config(*, layers, hidden, heads, intermediate, image_size, patch_size, use_head=True):
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                              num_attention_heads=heads, image_size=image_size, patch_size=patch_size,
                              vision_use_head=use_head)


def make_siglip(dir, *, seed: int = 0, layers: int = 2, hidden: int = 64, heads: int = 2, intermediate: int = 128,
                image_size: int = 32, patch_size: int = 8, max_positions: int = 32) -> Path:
    """A ``SiglipModel`` with a ``SiglipImageProcessorPil``.

    Like google/siglip-*: the tokenizer appends ``</s>`` only, texts are padded to
    ``max_length`` (= ``model_max_length`` = the text tower's ``max_position_embeddings``) and no
    attention mask is used; the text tower pools the last position.
    """
    import torch
    from transformers import SiglipConfig, SiglipModel, SiglipTextConfig

    tok = tokenizer(add_eos=True, model_max_length=max_positions)
    text = SiglipTextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate,
                            num_hidden_layers=layers, num_attention_heads=heads,
                            max_position_embeddings=max_positions, projection_size=hidden, **_ids(tok))
    vision = _siglip_vision_config(layers=layers, hidden=hidden, heads=heads, intermediate=intermediate,
                                   image_size=image_size, patch_size=patch_size)
    cfg = SiglipConfig(text_config=text.to_dict(), vision_config=vision.to_dict())
    torch.manual_seed(seed)
    model = SiglipModel(cfg).eval()
    return _save(model, tok, dir, siglip_image_processor(image_size))


# ---------------------------------------------------------------------------------------- LLaVA


def num_image_tokens(vision: str, image_size: int = 32, patch_size: int = 8) -> int:
    """Image tokens per image in :func:`make_llava`: patches² for both towers (CLIP's CLS is
    dropped by ``vision_feature_select_strategy="default"``; SigLIP has none, ``"full"``)."""
    if vision not in ("clip", "siglip"):
        raise ValueError(f"vision must be 'clip' or 'siglip', not {vision!r}")
    return (image_size // patch_size) ** 2


def _text_config(text: str, *, tok, layers, hidden, heads, kv_heads, intermediate, max_positions, tie):
    from transformers import LlamaConfig, Qwen2Config

    common = dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate,
                  num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                  max_position_embeddings=max_positions, tie_word_embeddings=tie, rms_norm_eps=1e-6, **_ids(tok))
    if text == "llama":
        return LlamaConfig(**common)
    if text == "qwen2":
        return Qwen2Config(**common)  # q/k/v projections carry biases
    raise ValueError(f"text must be 'llama' or 'qwen2', not {text!r}")


def make_llava(dir, *, vision: str = "clip", text: str = "llama", seed: int = 0, vision_layers: int = 2,
               text_layers: int = 2, vision_hidden: int = 64, vision_heads: int = 2, vision_intermediate: int = 128,
               hidden: int = 64, heads: int = 4, kv_heads: int = 2, intermediate: int = 128,
               image_size: int = 32, patch_size: int = 8, max_positions: int = 256, tie: bool = False,
               hub_layout: bool = False) -> Path:
    """A ``LlavaForConditionalGeneration`` (CLIP or SigLIP vision tower, Llama or Qwen2 text model).

    CLIP: ``vision_feature_select_strategy="default"`` (drops CLS), ``vision_feature_layer=-2``.
    SigLIP: ``"full"``, ``vision_feature_layer=-1``, no pooling head.  Either way an image becomes
    ``(image_size // patch_size) ** 2`` tokens (``config.image_seq_length``).  Llama tokenizes
    with a leading ``<s>``; Qwen2 adds nothing.  The processor equivalent is saved too:
    preprocessor_config.json (PIL image processor), the tokenizer with a chat template, and
    processor_config.json (LlavaProcessor: patch_size, strategy, num_additional_image_tokens).

    transformers 5 saves the checkpoint as ``language_model.model.*``, ``language_model.lm_head.weight``,
    ``vision_tower.*`` and ``multi_modal_projector.*`` (module names: ``model.language_model.*``,
    ``lm_head.weight``, ``model.vision_tower.*``, ``model.multi_modal_projector.*``).  Hub
    checkpoints (llava-hf/*) spell the tower ``vision_tower.vision_model.*``; ``hub_layout=True``
    rewrites the saved keys that way (transformers loads both).
    """
    import torch
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    template = {"llama": LLAMA_CHAT_TEMPLATE, "qwen2": QWEN2_CHAT_TEMPLATE}.get(text)
    if template is None:
        raise ValueError(f"text must be 'llama' or 'qwen2', not {text!r}")
    tok = tokenizer(add_bos=(text == "llama"), model_max_length=max_positions, chat_template=template,
                    padding_side="left")
    tcfg = _text_config(text, tok=tok, layers=text_layers, hidden=hidden, heads=heads, kv_heads=kv_heads,
                        intermediate=intermediate, max_positions=max_positions, tie=tie)
    if vision == "clip":
        vcfg = CLIPVisionConfig(hidden_size=vision_hidden, intermediate_size=vision_intermediate,
                                num_hidden_layers=vision_layers, num_attention_heads=vision_heads,
                                image_size=image_size, patch_size=patch_size, projection_dim=vision_hidden)
        strategy, layer, extra = "default", -2, 1
        improc = clip_image_processor(image_size)
    elif vision == "siglip":
        vcfg = _siglip_vision_config(layers=vision_layers, hidden=vision_hidden, heads=vision_heads,
                                     intermediate=vision_intermediate, image_size=image_size,
                                     patch_size=patch_size, use_head=False)
        strategy, layer, extra = "full", -1, 0
        improc = siglip_image_processor(image_size)
    else:
        raise ValueError(f"vision must be 'clip' or 'siglip', not {vision!r}")
    n_img = num_image_tokens(vision, image_size, patch_size)
    cfg = LlavaConfig(vision_config=vcfg.to_dict(), text_config=tcfg.to_dict(),
                      image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN), image_seq_length=n_img,
                      vision_feature_select_strategy=strategy, vision_feature_layer=layer,
                      tie_word_embeddings=tie)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).eval()
    gc = model.generation_config
    gc.bos_token_id, gc.eos_token_id, gc.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    out = _save(model, tok, dir, improc)
    proc = LlavaProcessor(image_processor=improc, tokenizer=tok, patch_size=patch_size,
                          vision_feature_select_strategy=strategy, chat_template=template,
                          image_token=IMAGE_TOKEN, num_additional_image_tokens=extra)
    proc.save_pretrained(out)
    if hub_layout:
        _rename_keys(out / "model.safetensors", r"^vision_tower\.", "vision_tower.vision_model.")
    return out


def _rename_keys(path: Path, pattern: str, replacement: str) -> None:
    import re

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    save_file({re.sub(pattern, replacement, k): v for k, v in tensors.items()}, str(path), metadata=metadata)


# ----------------------------------------------------------------------------------------- BERT


def make_bert(dir, *, seed: int = 0, layers: int = 2, hidden: int = 64, heads: int = 2, intermediate: int = 128,
              max_positions: int = 64) -> Path:
    """A ``BertModel`` (with its pooler, as hub checkpoints have it: a folder saved without one
    reloads with a freshly initialised pooler) and a tokenizer that wraps texts as ``<s>`` ...
    ``</s>`` (the [CLS] ... [SEP] roles), for text-encoder export tests."""
    import torch
    from transformers import BertConfig, BertModel

    tok = tokenizer(add_bos=True, add_eos=True, model_max_length=max_positions)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=intermediate, max_position_embeddings=max_positions,
                     pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = BertModel(cfg).eval()
    return _save(model, tok, dir)


def _main() -> None:  # pragma: no cover - a manual look at what gets written
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        for name, fn in [("clip", make_clip), ("siglip", make_siglip), ("bert", make_bert),
                         ("llava", make_llava)]:
            p = fn(Path(d) / name)
            print(name, sorted(x.name for x in p.iterdir()))
            print(json.dumps(json.loads((p / "config.json").read_text()), indent=1)[:400], file=sys.stderr)


if __name__ == "__main__":  # pragma: no cover
    _main()
