"""bench_methods.py's trained tiny models (split from it for size): built from the tests' tiny
builders, then pretrained by bench_speedq.pretrain on the built-in captions/sentences so that
their weights, activations and (MoE) routing have structure; their held-out inputs in the
training distribution; and the routing statistics of an MoE model on those inputs.

- trained-llava: tests/hf_tiny.make_llava (CLIP 2x64 vision, Qwen2 text), LM + projector trained.
- trained-moe: tests/hf_tiny_qwen3vlmoe.make_qwen3vlmoe (Qwen3-VL-MoE, every decoder layer MoE),
  LM (attention, routers, experts) + mergers trained with transformers' loss (CE + router
  load balancing), the vision blocks frozen; trained-moe-img: the same with 4x the image tokens.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np

#: per trained model: its size and pretraining steps (the cached folder is named by them)
TRAINED = {
    # bench_speedq's RESULTS model: Qwen2 text hidden 128, 4 layers, 300 steps
    "trained-llava": {"hidden": 128, "layers": 4, "steps": 300},
    # Qwen3-VL-MoE text hidden 128 (4 heads of 32, 2 KV heads), 4 MoE layers of 8 experts (width 192), top-2
    "trained-moe": {"hidden": 128, "layers": 4, "steps": 300, "experts": 8, "top_k": 2},
    # the same with images up to 96 x 96 px (144 merged tokens, not 36): image tokens outnumber the
    # text tokens of a calibration prompt, as in VEQ's setting (design.md 5.1: 200+ vs 6)
    "trained-moe-img": {"hidden": 128, "layers": 4, "steps": 300, "experts": 8, "top_k": 2, "max_px": 96},
}


def folder_name(name: str) -> str:
    t = TRAINED[name]
    moe = f"-e{t['experts']}k{t['top_k']}" if "experts" in t else ""
    px = f"-px{t['max_px']}" if "max_px" in t else ""
    return f"{name}-h{t['hidden']}x{t['layers']}{moe}{px}-s{t['steps']}"


def _make(name: str, out: Path) -> Path:
    """The untrained tiny model of ``name`` at :data:`TRAINED`'s size."""
    t = TRAINED[name]
    h = t["hidden"]
    if name == "trained-llava":
        import hf_tiny

        return hf_tiny.make_llava(out, vision="clip", text="qwen2", hidden=h, intermediate=2 * h,
                                  text_layers=t["layers"], heads=max(4, h // 32), kv_heads=max(2, h // 64))
    import hf_tiny_qwen3vlmoe

    heads = max(4, h // 32)
    half = h // heads // 2          # mrope_section sums to head_dim / 2 (tiny default (2, 3, 3) for 8)
    third = half // 3
    return hf_tiny_qwen3vlmoe.make_qwen3vlmoe(out, hidden=h, heads=heads, kv_heads=max(2, heads // 2),
                                              layers=t["layers"], experts=t["experts"], top_k=t["top_k"],
                                              moe_intermediate=3 * h // 2, intermediate=2 * h,
                                              mrope_section=(half - 2 * third, third, third),
                                              max_pixels=t.get("max_px", 48) ** 2)


def build_trained(name: str, root: Path) -> Path:
    """``name`` (a :data:`TRAINED` key) under ``root``, built once: the tiny builder, then
    bench_speedq.pretrain (deterministic, seed 0).  Built in a sibling folder and renamed when
    done, so an interrupted build is never taken for a cached one."""
    import bench_speedq

    if name not in TRAINED:
        raise ValueError(f"unknown trained model {name!r}; expected one of {', '.join(TRAINED)}")
    out = Path(root) / folder_name(name)
    if (out / "config.json").exists():
        return out
    part = out.with_name(out.name + ".part")
    shutil.rmtree(part, ignore_errors=True)
    _make(name, part)
    steps = TRAINED[name]["steps"]
    t0 = time.perf_counter()
    bench_speedq.pretrain(part, steps)
    print(f"{name}: pretrained {steps} steps in {time.perf_counter() - t0:.0f} s -> {out}", flush=True)
    part.rename(out)
    return out


def _processor(src: Path):
    import json

    if json.loads((Path(src) / "config.json").read_text())["architectures"][0].startswith("Qwen3VLMoe"):
        import hf_tiny_qwen3vlmoe

        return hf_tiny_qwen3vlmoe.processor(src)   # images only (no torchvision)
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(src))


def trained_inputs(src: Path, n: int, n_calib: int, seeds) -> list[dict]:
    """n held-out inputs in a trained model's training distribution (bench_speedq.heldout): n // 2
    chat prompts "Describe the image." (the calibration/training prompt, up to the assistant turn)
    over augmented views of the built-in photos from another seed, then n - n // 2 sentences.txt
    lines that no export's calibration draw (n_calib texts, each of ``seeds``) contains, each cut
    to its first half of tokens (at least 4) for the fp32 model to continue."""
    import bench_speedq
    import torch

    ho = bench_speedq.heldout(n_calib, seeds, n_texts=n - n // 2, n_images=n // 2)
    proc = _processor(src)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
    prompt = proc.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    out = [dict(proc(text=[prompt], images=[img], return_tensors="pt")) for img in ho.images]
    for t in ho.texts:
        ids = proc.tokenizer(t)["input_ids"]
        ids = torch.tensor([ids[:max(4, len(ids) // 2)]])
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return out


def _entropy(p: np.ndarray) -> float:
    """Entropy of the distributions in the last axis of ``p`` over log(size): 1 = uniform."""
    p = p / p.sum(-1, keepdims=True)
    return float((-(p * np.log(np.where(p > 0, p, 1.0))).sum(-1) / np.log(p.shape[-1])).mean())


def router_stats(model, inputs: list[dict], image_token_id: int) -> list[dict]:
    """Per MoE layer of a Qwen3-VL-MoE ``model`` over ``inputs`` (one sample each, no padding):
    top-k slots per expert by modality, ``load_entropy`` (entropy of the experts' share of all
    top-k slots / log E: 1 = balanced load), ``token_entropy`` (mean entropy of a token's router
    softmax / log E: 1 = uniform, i.e. no preference), ``top1`` (mean top-1 probability) and
    ``modality_tv`` (total-variation distance between the image tokens' and the text tokens'
    expert-load distributions: 0 = both modalities use the experts alike)."""
    import torch

    layers = {i: ly.mlp.gate for i, ly in enumerate(model.model.language_model.layers)   # dense MLPs have no gate
              if getattr(ly.mlp, "gate", None) is not None and not isinstance(ly.mlp.gate, torch.nn.Linear)}
    got: dict[int, list] = {i: [] for i in layers}
    hooks = [g.register_forward_hook(lambda mod, a, out, i=i: got[i].append(out)) for i, g in layers.items()]
    image = []
    try:
        with torch.no_grad():
            for enc in inputs:
                model(**enc, use_cache=False)
                image.append(enc["input_ids"][0] == image_token_id)
    finally:
        for h in hooks:
            h.remove()
    image = torch.cat(image).numpy()
    out = []
    for i in layers:
        logits = torch.cat([g[0] for g in got[i]]).double()         # [T, E]
        idx = torch.cat([g[2] for g in got[i]]).numpy()             # [T, k]
        probs = torch.softmax(logits, -1).numpy()
        e = probs.shape[1]
        cnt = np.stack([np.bincount(idx[~image].ravel(), minlength=e), np.bincount(idx[image].ravel(), minlength=e)],
                       1)                                            # [E, 2] (text, image)
        tv = (0.5 * float(np.abs(cnt[:, 0] / cnt[:, 0].sum() - cnt[:, 1] / cnt[:, 1].sum()).sum())
              if cnt[:, 1].sum() and cnt[:, 0].sum() else None)
        out.append({"layer": i, "tokens_text_image": cnt.tolist(), "load_entropy": _entropy(cnt.sum(1)[None]),
                    "token_entropy": _entropy(probs), "top1": float(probs.max(-1).mean()), "modality_tv": tv})
    return out


def router_lines(name: str, stats: list[dict]) -> list[str]:
    """Markdown lines for :func:`router_stats`."""
    lines = []
    for s in stats:
        cnt = np.asarray(s["tokens_text_image"])
        tv = "n/a" if s["modality_tv"] is None else f"{s['modality_tv']:.2f}"
        lines.append(f"- {name} layer {s['layer']}: top-k slots per expert, text {cnt[:, 0].tolist()}, image "
                     f"{cnt[:, 1].tolist()} ({cnt[:, 1].sum() / max(cnt.sum(), 1):.0%} image), "
                     f"load entropy {s['load_entropy']:.3f}, token routing entropy {s['token_entropy']:.3f}, "
                     f"mean top-1 prob {s['top1']:.3f}, image-vs-text load TV {tv}")
    return lines
