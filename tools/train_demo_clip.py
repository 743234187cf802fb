"""Train the bundled demo model: a small CLIP (``CLIPModel``) for handwritten digits.

No pretrained CLIP can be downloaded where edgevlm is developed, so the demo ships its own:
a tiny CLIP-style dual encoder trained contrastively (InfoNCE, learnable logit scale) on
scikit-learn's handwritten digits (1797 8x8 images, 16 gray levels, bundled with scikit-learn)
paired with captions such as "a photo of the digit seven" / "a handwritten 7".  The result is an
ordinary Hugging Face model folder (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json, preprocessor_config.json) that the exporter treats like any hub model,
plus demo_split.json (the held-out test indices and how images are rendered) and a README.md.

Exact command (from the repository root; about 2 minutes on 2 idle CPU threads, 5 or more on a
busy machine):

    HF_HUB_OFFLINE=1 .venv/bin/python tools/train_demo_clip.py --out models/demo-clip

Deterministic: fixed seeds (numpy for the split and augmentation, torch for initialisation and
batch order), ``torch.use_deterministic_algorithms(True)``, one process, 2 torch threads; two
runs on the same machine and torch build write byte-identical model.safetensors.

Images: a digit's 8x8 gray levels v in 0..16 become dark ink on white paper
(255 - round(v * 255 / 16)), are upscaled to 32x32 with PIL bicubic and converted to RGB
(:func:`render`).  Training adds small random affine jitter (rotation, scale, shift, shear) and
ink/paper intensity jitter, but no noise, blur, JPEG or contrast augmentation, so that the
demo's synthetic corruptions are a real distribution shift.  Pixel values always come from the
saved ``CLIPImageProcessorPil`` itself, so the exporter and runtime preprocess identically.

Text: a word-level tokenizer (lowercase, whitespace/punctuation split) trained on the captions,
every sequence wrapped in ``<s>`` ... ``</s>``; ids pad 0, bos 1, unk 2, eos 3 (eos is not 2:
a CLIP text config with eos_token_id 2 takes transformers' legacy argmax pooling path).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

SEED = 0
IMAGE_SIZE = 32
PATCH = 4
N_TEST = 597  # 1797 - 1200
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
# The demo's prompt; {} is a label word (zero..nine) or a numeral (0..9).
PROMPT = "a photo of the digit {}"

# Caption templates used for training; {} is filled with the label word or its numeral.
TEMPLATES = [
    "a photo of the digit {}",
    "a photo of the number {}",
    "a photo of a handwritten {}",
    "a handwritten {}",
    "a handwritten digit {}",
    "the digit {}",
    "the number {}",
    "an image of the digit {}",
    "a picture of the number {}",
    "a drawing of a {}",
    "a scan of a handwritten {}",
    "{}",
]

PAD, BOS, UNK, EOS = "<pad>", "<s>", "<unk>", "</s>"


# ------------------------------------------------------------------------------------------ data
def render(digit8: np.ndarray, size: int = IMAGE_SIZE):
    """One sklearn digit (8x8, gray levels 0..16) -> a size x size RGB PIL image, dark ink on white."""
    from PIL import Image

    g = 255 - np.rint(np.asarray(digit8, dtype=np.float64) * (255.0 / 16.0)).astype(np.uint8)
    return Image.fromarray(g, mode="L").resize((size, size), Image.Resampling.BICUBIC).convert("RGB")


def split_indices(n: int, n_test: int = N_TEST, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """Stratified fixed split of load_digits(): (train indices, test indices), both sorted."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    y = load_digits().target
    tr, te = train_test_split(np.arange(n), test_size=n_test, random_state=seed, stratify=y)
    return np.sort(tr), np.sort(te)


def augment(img, rng: np.random.Generator):
    """Small random affine jitter + ink/paper intensity jitter (PIL, bicubic)."""
    from PIL import Image

    s = IMAGE_SIZE
    ang = np.deg2rad(rng.uniform(-12, 12))
    scale = rng.uniform(0.85, 1.12)
    shear = rng.uniform(-0.15, 0.15)
    tx, ty = rng.uniform(-2.5, 2.5, size=2)
    # forward map: x' = A (x - c) + c + t ; PIL wants the inverse (output -> input) coefficients
    a = scale * np.array([[np.cos(ang), -np.sin(ang) + shear], [np.sin(ang), np.cos(ang)]])
    inv = np.linalg.inv(a)
    c = np.array([(s - 1) / 2, (s - 1) / 2])
    off = c - inv @ (c + np.array([tx, ty]))
    coeffs = (inv[0, 0], inv[0, 1], off[0], inv[1, 0], inv[1, 1], off[1])
    out = img.transform((s, s), Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BICUBIC,
                        fillcolor=(255, 255, 255))
    x = np.asarray(out, dtype=np.float32)
    paper = rng.uniform(215, 255)
    ink = rng.uniform(0, 60)
    x = ink + (paper - ink) * (x / 255.0)
    return Image.fromarray(np.clip(np.rint(x), 0, 255).astype(np.uint8), mode="RGB")


def captions(label: int) -> list[str]:
    return [t.format(v) for t in TEMPLATES for v in (WORDS[label], str(label))]


# ------------------------------------------------------------------------------------ tokenizer
def build_tokenizer(max_len: int):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [c for lab in range(10) for c in captions(lab)]
    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=[PAD, BOS, UNK, EOS], min_frequency=1, show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    assert (tok.token_to_id(PAD), bos, tok.token_to_id(UNK), eos) == (0, 1, 2, 3)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS}:0 $A:0 {EOS}:0",
                                                       pair=f"{BOS}:0 $A:0 {EOS}:0 $B:1 {EOS}:1",
                                                       special_tokens=[(BOS, bos), (EOS, eos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK,
                                   pad_token=PAD, model_max_length=max_len, padding_side="right",
                                   clean_up_tokenization_spaces=False)


# ---------------------------------------------------------------------------------------- model
def build_model(tok, max_len: int):
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    text = CLIPTextConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=max_len, projection_dim=128,
                          hidden_act="quick_gelu", pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id)
    vision = CLIPVisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=3,
                              num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=PATCH, num_channels=3,
                              projection_dim=128, hidden_act="quick_gelu")
    cfg = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=128)
    assert cfg.text_config.eos_token_id == tok.eos_token_id != 2
    return CLIPModel(cfg)


def image_processor():
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                                 crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})


def pixels(proc, images) -> "torch.Tensor":
    import torch

    return torch.from_numpy(np.ascontiguousarray(proc(images=images, return_tensors="np")["pixel_values"]))


def text_embeds(model, tok, texts: list[str]):
    import torch

    enc = tok(texts, padding="longest", return_tensors="pt")
    f = model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    f = f.pooler_output if not isinstance(f, torch.Tensor) else f
    return torch.nn.functional.normalize(f, dim=-1)


def image_embeds(model, pv):
    import torch

    f = model.get_image_features(pixel_values=pv)
    f = f.pooler_output if not isinstance(f, torch.Tensor) else f
    return torch.nn.functional.normalize(f, dim=-1)


def zero_shot(model, tok, pv, y: np.ndarray, templates=(PROMPT,), numerals: bool = False) -> float:
    """Accuracy of zero-shot classification with the mean class embedding over ``templates``."""
    import torch

    with torch.no_grad():
        cls = []
        for lab in range(10):
            v = str(lab) if numerals else WORDS[lab]
            cls.append(torch.nn.functional.normalize(text_embeds(model, tok, [t.format(v) for t in templates])
                                                     .mean(0), dim=0))
        t = torch.stack(cls)
        pred = torch.cat([(image_embeds(model, pv[i:i + 256]) @ t.T).argmax(1) for i in range(0, len(pv), 256)])
    return float((pred.numpy() == y).mean())


README = """\
# demo-clip: a tiny CLIP for handwritten digits

The model behind `make demo`.  No pretrained CLIP can be downloaded where edgevlm is developed,
so this is a small CLIP-style dual encoder trained from scratch, in a few minutes on a CPU, by
`tools/train_demo_clip.py`.  It is an ordinary Hugging Face `CLIPModel` folder: load it with
`CLIPModel.from_pretrained`, `AutoTokenizer` and `CLIPImageProcessorPil`, or export it with
`edgevlm export models/demo-clip -o demo.evlm`.

**It is a demo model.**  It knows ten things, the digits 0-9 drawn like scikit-learn's 8x8
handwritten digits, and is useless for anything else.

## How it was made

    HF_HUB_OFFLINE=1 .venv/bin/python tools/train_demo_clip.py --out models/demo-clip

- Data: `sklearn.datasets.load_digits()` (1797 images, 8x8, 16 gray levels), a fixed stratified
  split of {n_train} train / {n_test} test images (seed {seed}); the test indices are in
  `demo_split.json`.  Images: dark ink on white (255 - round(v * 255 / 16)), PIL bicubic upscale
  to {size}x{size} RGB (`render` in the script).  Training adds small random affine jitter and
  ink/paper intensity jitter, no noise, blur, JPEG or contrast changes, so those corruptions are
  a real distribution shift at test time.
- Captions: {n_templates} templates per label, with the word and the numeral ("a photo of the
  digit seven", "a handwritten 7", "the number seven", ...).  Tokenizer: word level, lowercase,
  `<s>` ... `</s>` (pad 0, bos 1, unk 2, eos 3), vocabulary {vocab}.
- Model: `CLIPModel`, {params:.2f} M parameters, float32.  Vision: {size}x{size} input, patch
  {patch} ({n_patches} patches + class token), hidden {vh}, {vl} layers, {vheads} heads, MLP {vi}.
  Text: hidden {th}, {tl} layers, {theads} heads, MLP {ti}, {tpos} positions.  Projection {proj},
  quick_gelu, learnable logit scale (final {scale:.1f}).
- Training: contrastive InfoNCE in both directions (every caption of the image's digit counts
  as a positive), AdamW (lr {lr}, weight decay 0.05, warmup + cosine), batch {bs}, {epochs} epochs,
  2 CPU threads, fixed seeds and `torch.use_deterministic_algorithms(True)`: a rerun writes the
  same model.safetensors.

## Zero-shot accuracy (float32, clean images)

| prompt | train | held-out test |
|---|---|---|
| "{prompt}", labels zero..nine | {train:.2%} | {test:.2%} |
| "{prompt}", labels 0..9 | | {test_numerals:.2%} |
| ensemble of the {n_templates} training templates | | {test_ensemble:.2%} |

Accuracy drops under corruptions the training never saw (see the demo): strong Gaussian noise,
low contrast, darkening and coarse pixelation hurt it most; blur and JPEG much less.
"""


def readme(model, n_params, acc, n_train, n_test, args) -> str:
    v, t = model.config.vision_config, model.config.text_config
    return README.format(
        n_train=n_train, n_test=n_test, seed=SEED, size=IMAGE_SIZE, n_templates=len(TEMPLATES),
        vocab=t.vocab_size, params=n_params / 1e6, patch=v.patch_size, n_patches=(IMAGE_SIZE // v.patch_size) ** 2,
        vh=v.hidden_size, vl=v.num_hidden_layers, vheads=v.num_attention_heads, vi=v.intermediate_size,
        th=t.hidden_size, tl=t.num_hidden_layers, theads=t.num_attention_heads, ti=t.intermediate_size,
        tpos=t.max_position_embeddings, proj=model.config.projection_dim, scale=model.logit_scale.exp().item(),
        lr=args.lr, bs=args.batch_size, epochs=args.epochs, prompt=PROMPT, **acc)


# ---------------------------------------------------------------------------------------- train
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="models/demo-clip", help="output model folder")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=60)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch
    from sklearn.datasets import load_digits

    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    rng = np.random.default_rng(SEED)

    digits = load_digits()
    X, y = digits.images, digits.target.astype(np.int64)
    tr, te = split_indices(len(y))
    clean = [render(X[i]) for i in range(len(y))]
    proc = image_processor()
    pv_tr_clean, pv_te = pixels(proc, [clean[i] for i in tr]), pixels(proc, [clean[i] for i in te])
    y_tr, y_te = y[tr], y[te]

    max_len = 32
    tok = build_tokenizer(max_len)
    model = build_model(tok, max_len)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"train_demo_clip: {len(tr)} train / {len(te)} test digits, {IMAGE_SIZE}x{IMAGE_SIZE}, "
          f"{n_params / 1e6:.2f} M parameters, vocab {len(tok)}, {args.epochs} epochs, "
          f"torch {torch.__version__} {torch.get_num_threads()} threads", flush=True)

    # every caption of every class, tokenised once
    caps = [captions(lab) for lab in range(10)]
    enc = {lab: tok(caps[lab], padding="max_length", max_length=16, return_tensors="pt") for lab in range(10)}

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    other = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": other, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    bs = args.batch_size
    steps_per_epoch = len(tr) // bs
    total = steps_per_epoch * args.epochs
    warm = max(1, total // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + np.cos(np.pi * (s - warm) / max(1, total - warm))))

    step = 0
    for ep in range(args.epochs):
        model.train()
        t0 = time.perf_counter()
        pv_ep = pixels(proc, [augment(clean[i], rng) for i in tr])
        order = rng.permutation(len(tr))
        cap_pick = rng.integers(0, len(caps[0]), size=len(tr))
        tot = 0.0
        for b in range(steps_per_epoch):
            idx = order[b * bs:(b + 1) * bs]
            lab = torch.from_numpy(y_tr[idx])
            ids = torch.stack([enc[int(y_tr[i])]["input_ids"][cap_pick[i]] for i in idx])
            am = torch.stack([enc[int(y_tr[i])]["attention_mask"][cap_pick[i]] for i in idx])
            img = image_embeds(model, pv_ep[idx])
            f = model.get_text_features(input_ids=ids, attention_mask=am)
            f = f.pooler_output if not isinstance(f, torch.Tensor) else f
            txt = torch.nn.functional.normalize(f, dim=-1)
            logits = model.logit_scale.exp() * img @ txt.T
            # InfoNCE where every caption of the image's class counts as a positive (a batch holds
            # ~12 images of each digit, so the plain diagonal target would punish true matches)
            pos = (lab[:, None] == lab[None, :]).float()
            tgt = pos / pos.sum(1, keepdim=True)
            loss = 0.5 * (torch.nn.functional.cross_entropy(logits, tgt)
                          + torch.nn.functional.cross_entropy(logits.T, tgt))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            with torch.no_grad():
                model.logit_scale.clamp_(0, np.log(100.0))
            tot += float(loss.detach())
        msg = (f"epoch {ep + 1:3d}/{args.epochs}  loss {tot / steps_per_epoch:.4f}  "
               f"scale {model.logit_scale.exp().item():.1f}  {time.perf_counter() - t0:.1f}s")
        if (ep + 1) % 5 == 0 or ep + 1 == args.epochs:
            model.eval()
            msg += f"  test zero-shot {zero_shot(model, tok, pv_te, y_te):.4f}"
        print(msg, flush=True)

    model.eval()
    acc = {
        "train": zero_shot(model, tok, pv_tr_clean, y_tr),
        "test": zero_shot(model, tok, pv_te, y_te),
        "test_numerals": zero_shot(model, tok, pv_te, y_te, numerals=True),
        "test_ensemble": zero_shot(model, tok, pv_te, y_te, templates=TEMPLATES),
    }
    train_s = time.perf_counter() - t_start
    print(f'zero-shot accuracy with "{PROMPT}" (labels zero..nine): train {acc["train"]:.4f}  test {acc["test"]:.4f}; '
          f'labels 0..9: test {acc["test_numerals"]:.4f}; {len(TEMPLATES)}-template ensemble: '
          f'test {acc["test_ensemble"]:.4f}', flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    proc.save_pretrained(out)
    split = {
        "dataset": "sklearn.datasets.load_digits()",
        "render": "255 - round(v * 255 / 16) for the 8x8 gray levels v (dark ink on white), PIL bicubic "
                  f"resize to {IMAGE_SIZE}x{IMAGE_SIZE}, RGB (tools/train_demo_clip.py: render)",
        "image_size": IMAGE_SIZE,
        "prompt": PROMPT,
        "labels": WORDS,
        "numerals": [str(i) for i in range(10)],
        "templates": TEMPLATES,
        "seed": SEED,
        "n_train": int(len(tr)),
        "n_test": int(len(te)),
        "accuracy": {k: round(v, 4) for k, v in acc.items()},
        "test_indices": [int(i) for i in te],
    }
    (out / "demo_split.json").write_text(json.dumps(split, indent=1) + "\n")
    (out / "README.md").write_text(readme(model, n_params, acc, len(tr), len(te), args))
    h = hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    print(f"saved {out} ({size / 1e6:.2f} MB); model.safetensors sha256 {h}; {train_s:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
