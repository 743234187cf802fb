"""The contract between the generic generation runtime (:mod:`.vlm`) and one VLM family's
vision side (:mod:`.llava`, :mod:`.qwen2vl`, :mod:`.idefics3`).

A family module exposes a class (registered in :data:`FAMILY_CLASSES`, imported lazily) built as
``cls(f, config, isa)`` from an open :class:`edgevlm.format.EvlmFile`, the full config.json dict
of the export and the kernel ISA choice.  It owns everything the Hugging Face *processor* and the
model's vision path do, and nothing of the language model:

``prepare(text, images, tokenizer) -> Prepared``
    ``text`` is the already chat-formatted prompt (the chat template rendered by :mod:`.chat`),
    with one image placeholder per image exactly as the template emits it (``<image>`` for
    LLaVA / Idefics3, ``<|vision_start|><|image_pad|><|vision_end|>`` for Qwen2-VL).  The family
    expands the placeholders the way its HF processor's ``__call__`` does, tokenizes the result
    the way the processor does (``tokenizer.encode(text, padding="do_not_pad",
    truncation=False)``, special tokens as the processor adds them), preprocesses every image the
    way the HF image processor does, runs the vision tower + connector, and returns the merged
    token ids, the image features in order of occurrence and (Qwen2-VL) the multimodal RoPE
    positions.

The runtime then embeds ``input_ids``, writes ``image_features`` row by row over the positions
where ``input_ids == image_token_id`` (as ``masked_scatter`` does in transformers), and runs the
decoder with ``positions``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

__all__ = ["FAMILY_CLASSES", "Prepared", "VisionFamily", "family_class"]


@dataclass
class Prepared:
    """A prompt ready for the decoder.

    input_ids       int64 [T]: the full prompt, image placeholders expanded.
    image_features  float32 [n, D_text] or None: n == (input_ids == image_token_id).sum(), rows in
                    order of occurrence (image 0's tokens first).
    positions       None (positions are 0..T-1) or int64 [3, T] (Qwen2-VL multimodal RoPE: t, h, w).
    rope_delta      int: for a generated token at sequence index i (i >= T) the position is
                    i + rope_delta in all three sections (Qwen2-VL's ``rope_deltas``; 0 otherwise).
    deepstack       None or a decoder.DeepStack (Qwen3-VL): vision features the prompt's prefill
                    adds to the first decoder layers' outputs at the image-token rows.
    """

    input_ids: np.ndarray
    image_features: np.ndarray | None = None
    positions: np.ndarray | None = None
    rope_delta: int = 0
    deepstack: Any = None


class VisionFamily(Protocol):
    #: id of the token whose embedding rows the image features replace
    image_token_id: int
    #: the placeholder one image is written as in a chat-formatted prompt (for prompts given
    #: without a chat template, e.g. ``"<image>"``)
    image_placeholder: str

    def prepare(self, text: str, images: list[Any], tokenizer: Any) -> Prepared: ...


#: metadata["family"] of an export -> (module, class name) implementing VisionFamily
FAMILY_CLASSES: dict[str, tuple[str, str]] = {
    "llava": ("edgevlm.runtime.llava", "LlavaVision"),
    "qwen2_vl": ("edgevlm.runtime.qwen2vl", "Qwen2VLVision"),
    "qwen2_5_vl": ("edgevlm.runtime.qwen2vl", "Qwen2VLVision"),
    "idefics3": ("edgevlm.runtime.idefics3", "Idefics3Vision"),
    "smolvlm": ("edgevlm.runtime.idefics3", "Idefics3Vision"),
    "qwen3_vl_moe": ("edgevlm.runtime.qwen3vl", "Qwen3VLVision"),
}


def family_class(family: str) -> type:
    try:
        mod, name = FAMILY_CLASSES[family]
    except KeyError:
        raise ValueError(f"this .evlm holds a {family!r} model, not a generative VLM; `edgevlm run` supports "
                         f"{', '.join(sorted(FAMILY_CLASSES))} (use `edgevlm classify`/`embed` for CLIP/SigLIP)") \
            from None
    return getattr(importlib.import_module(mod), name)
