"""The CLIP / SigLIP runtime (edgevlm.runtime.dual) against transformers fp32, on tiny random models.

Parity (exported at 16 bits: f16 matrices, no quantized linears): image and text embeddings of the
runtime (its own preprocessing and tokenizer on the golden's raw images and texts, and the
golden's pixel_values fed directly) have cosine >= 0.9999 with transformers fp32 (measured
>= 0.9999996).

Quantized files: the runtime is checked two ways.  "8-bit" is ``method="gptq", bits=8`` with the
default ``embed_bits`` (token table float16 in 8-bit exports; ``edgevlm export --bits 8``, whose
default method shq is GPTQ at 8 bits, writes the same weights); 4/3/2-bit are ``method="rtn"``.

* Against transformers running the *file's own* weights (the exporter's fake-quant values
  loaded into the HF model): with the reference kernels (``isa="ref"``, exact fp32 activations)
  cosine >= 0.99999 and max |diff| <= 1e-5 at every width (measured cosine 1.0, max |diff|
  <= 3e-7): the runtime computes exactly what the file holds.  With the default SIMD kernels,
  which quantize activations to int8 per group, cosine >= 0.9995 at 4/3/2 bits (measured
  >= 0.99980) and >= 0.99999 at 8 bits, whose q8 linears add the residual pass (measured
  1 - 1e-7, max |diff| <= 2.5e-5).
* Against transformers fp32 (quantization error included), documented bounds = the minimum
  over the golden's 3 images / 3 texts, default kernels, measured on x86-64 (avx512vnni; avx2
  the same to 5 digits):

      family  bits   image cos (bound / measured)   text cos (bound / measured)
      clip      8      0.9999 / 0.99997               0.9999 / 0.99994
      clip      4      0.98   / 0.9958                0.85  / 0.9567
      clip      3      0.95   / 0.9874                0.50  / 0.8058
      clip      2      0.60   / 0.8672                0.0   / 0.3184
      siglip    8      0.9999 / 0.99996               0.9999 / 0.99996
      siglip    4      0.95   / 0.9864                0.95  / 0.9894
      siglip    3      0.88   / 0.9629                0.80  / 0.9336
      siglip    2      0.50   / 0.7901                0.40  / 0.7570

  8-bit reaches the issue's 0.9999 through two changes (session 8; before: RTN, q8 table,
  one-pass kernels, CLIP text 0.99965, SigLIP text 0.99979).  (1) The kernels: int8 activations
  cost CLIP text 0.99977 -> 0.99965 and SigLIP 0.99994 -> 0.99979; for q8 weights linear.cc now
  adds a second pass over the activations' residual (csrc/kernels/kernels.h), so the default
  kernels equal the exact-activation reference to ~1e-6 (CLIP GPTQ-8 text 0.99975 one-pass ->
  0.99994).  (2) CLIP's weights: RTN-8 alone stops at 0.99977 (~0.5 % relative int8 absmax
  error per tensor, summed over the path; group 32 or 128 alike), GPTQ-8 at 0.99988, a float16
  token table with RTN-8 at 0.99979; GPTQ-8 and the float16 table together give 0.99994 (n_calib
  32: 0.99993; SigLIP 0.99996).  4/3/2-bit files hold no q8 linear (their q8 token table is a
  lookup), so their numbers did not move.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

import hf_tiny  # noqa: E402
from no_torch import run_without_torch  # noqa: E402

from edgevlm import format as fmt  # noqa: E402
from edgevlm import qtypes  # noqa: E402
from edgevlm.runtime import layers as L  # noqa: E402
from edgevlm.runtime import load_dual, set_num_threads  # noqa: E402
from edgevlm.runtime.dual import DualEncoder  # noqa: E402
from edgevlm.runtime.tokenizer import Tokenizer  # noqa: E402

BITS = (16, 8, 4, 3, 2)
FAMILIES = ("clip", "siglip")
# (family, bits) -> (image cosine bound, text cosine bound) vs transformers fp32: see the module docstring
BOUNDS = {
    ("clip", 8): (0.9999, 0.9999), ("clip", 4): (0.98, 0.85), ("clip", 3): (0.95, 0.50), ("clip", 2): (0.60, 0.0),
    ("siglip", 8): (0.9999, 0.9999), ("siglip", 4): (0.95, 0.95), ("siglip", 3): (0.88, 0.80),
    ("siglip", 2): (0.50, 0.40),
}


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def _raw_images(g) -> list[np.ndarray]:
    if "images_uint8" in g:
        return list(g["images_uint8"])
    return [g[f"image_{i}"] for i in range(int(g["num_images"]))]


class _Model:
    def __init__(self, family: str, src: Path, golden: dict, files: dict[int, Path], fake: dict[int, dict]):
        self.family, self.src, self.golden, self.files, self.fake = family, src, golden, files, fake
        self.texts = json.loads(str(golden["meta"]))["texts"]
        self.images = _raw_images(golden)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, _Model]:
    from edgevlm.export import ExportConfig
    from edgevlm.export.golden import write_golden
    from edgevlm.export.pipeline import run_export

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("dual")
    out = {}
    for fam in FAMILIES:
        src = getattr(hf_tiny, f"make_{fam}")(root / fam)
        gpath = write_golden(src, root / f"{fam}_golden.npz")
        with np.load(gpath) as z:
            golden = {k: z[k] for k in z.files}
        files, fake = {}, {}
        for bits in BITS:
            p = root / f"{fam}_{bits}.evlm"
            method = "gptq" if bits == 8 else "rtn"  # 8-bit: the 0.9999 parity export (module docstring)
            rep = run_export(src, p, ExportConfig(method=method, bits=bits, n_calib=8, progress=False),
                             keep_fake_quant=bits < 16, log=lambda s: None)
            files[bits], fake[bits] = p, rep.fake_quant
        out[fam] = _Model(fam, src, golden, files, fake)
    return out


# --------------------------------------------------------------------------------- layers

def test_erf_matches_math_erf():
    x = np.concatenate([np.linspace(-7, 7, 200_001), [0.0, -0.0, 1e-8, -1e-8, 1e30, -1e30]])
    ref = np.array([math.erf(v) for v in x])
    got = L.erf(x)
    assert got.dtype == np.float32
    assert np.abs(got.astype(np.float64) - ref).max() < 1e-7
    assert np.all(np.isfinite(L.erf(np.array([np.inf, -np.inf]))))


def test_activations_match_reference_formulas():
    x = np.linspace(-8, 8, 4001).astype(np.float32)
    xd = x.astype(np.float64)
    gelu_ref = np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in xd])
    tanh_ref = 0.5 * xd * (1 + np.tanh(math.sqrt(2 / math.pi) * (xd + 0.044715 * xd ** 3)))
    quick_ref = xd / (1 + np.exp(-1.702 * xd))
    np.testing.assert_allclose(L.gelu(x), gelu_ref, atol=1e-7, rtol=1e-7)  # float32 rounding
    np.testing.assert_allclose(L.gelu_tanh(x), tanh_ref, atol=2e-6, rtol=0)
    np.testing.assert_allclose(L.quick_gelu(x), quick_ref, atol=2e-6, rtol=0)
    # and against torch's own implementations, which transformers runs
    tx = torch.from_numpy(x)
    # (torch's float32 erf-GELU is itself ~1e-6 off near x = -3.5, where 1 + erf cancels)
    np.testing.assert_allclose(L.gelu(x), torch.nn.functional.gelu(tx).numpy(), atol=2e-6, rtol=0)
    np.testing.assert_allclose(L.gelu_tanh(x), torch.nn.functional.gelu(tx, approximate="tanh").numpy(),
                               atol=1e-6, rtol=0)
    assert L.get_activation("quick_gelu") is L.quick_gelu
    with pytest.raises(ValueError, match="unsupported hidden_act"):
        L.get_activation("nope")
    assert not np.any(np.isnan(L.sigmoid(np.array([-1e4, 1e4], np.float32))))


def test_norms_softmax(rng):
    x = rng.standard_normal((3, 5, 16)).astype(np.float32) * 3 + 1
    w, b = rng.standard_normal(16).astype(np.float32), rng.standard_normal(16).astype(np.float32)
    tx = torch.from_numpy(x)
    ref = torch.nn.functional.layer_norm(tx, (16,), torch.from_numpy(w), torch.from_numpy(b), 1e-5).numpy()
    np.testing.assert_allclose(L.layer_norm(x, w, b, 1e-5), ref, atol=2e-6, rtol=0)
    xd = x.astype(np.float64)
    rms = xd / np.sqrt((xd ** 2).mean(-1, keepdims=True) + 1e-6) * w
    np.testing.assert_allclose(L.rms_norm(x, w, 1e-6), rms, atol=2e-6, rtol=1e-6)
    s = L.softmax(x * 100)
    np.testing.assert_allclose(s.sum(-1), 1.0, atol=1e-6)
    assert s.dtype == np.float32


def _attention_ref(q, k, v, heads, causal, key_mask):
    b, tq, d = q.shape
    tk, hd = k.shape[1], d // heads
    out = np.zeros((b, tq, d))
    for bi in range(b):
        for h in range(heads):
            sl = slice(h * hd, (h + 1) * hd)
            s = q[bi, :, sl].astype(np.float64) @ k[bi, :, sl].T / math.sqrt(hd)
            for i in range(tq):
                for j in range(tk):
                    if (causal and j > i + tk - tq) or (key_mask is not None and not key_mask[bi, j]):
                        s[i, j] = -np.inf
            p = np.exp(s - s.max(-1, keepdims=True))
            out[bi, :, sl] = (p / p.sum(-1, keepdims=True)) @ v[bi, :, sl]
    return out


def test_attention_masks(rng):
    b, t, d, h = 2, 7, 16, 4
    q, k, v = (rng.standard_normal((b, t, d)).astype(np.float32) for _ in range(3))
    mask = np.ones((b, t), np.int64)
    mask[1, 5:] = 0
    for causal in (False, True):
        for km in (None, mask):
            np.testing.assert_allclose(L.attention(q, k, v, h, causal=causal, key_mask=km),
                                       _attention_ref(q, k, v, h, causal, km), atol=2e-6, rtol=0)
    # a subset of queries at explicit positions (what the last layer computes for pooling)
    pos = np.array([[3], [6]])
    full = L.attention(q, k, v, h, causal=True, key_mask=mask)
    sub = L.attention(q[np.arange(b), pos[:, 0]][:, None], k, v, h, causal=True, key_mask=mask, q_pos=pos)
    np.testing.assert_allclose(sub[:, 0], full[np.arange(b), pos[:, 0]], atol=1e-6, rtol=0)


@pytest.mark.parametrize("qt", ["q8", "q4", "q3", "q2"])
def test_embedding_rows_match_full_dequantization(rng, qt):
    v, d, g = 96, 64, 32
    w = rng.standard_normal((v, d)).astype(np.float32)
    blob = qtypes.get(qt).pack(w, g)
    full = qtypes.get(qt).dequantize(blob, v, d, g)
    emb = L.Embedding(blob, qt, (v, d), g)
    ids = np.array([[0, 5, 95, 5], [17, 3, 3, 64]])
    np.testing.assert_array_equal(emb(ids), full[ids])
    with pytest.raises(ValueError, match="out of range"):
        emb(np.array([96]))


def test_embedding_raw_tables_and_linear(rng):
    w = rng.standard_normal((40, 64)).astype(np.float32)
    np.testing.assert_array_equal(L.Embedding(w.astype(np.float16), "f16", w.shape)(np.array([3, 1])),
                                  w.astype(np.float16).astype(np.float32)[[3, 1]])
    bf = (w.view(np.uint32) >> 16).astype(np.uint16)  # bf16 bits (truncated)
    np.testing.assert_array_equal(L.Embedding(bf, "bf16", w.shape)(np.array([7])),
                                  (bf[[7]].astype(np.uint32) << 16).view(np.float32))
    x = rng.standard_normal((2, 3, 64)).astype(np.float32)
    bias = rng.standard_normal(40).astype(np.float32)
    dense = L.Linear(weight=w, bias=bias)
    np.testing.assert_allclose(dense(x), x @ w.T + bias, atol=1e-5, rtol=0)
    from edgevlm.runtime import QuantLinear

    blob = qtypes.get("q4").pack(w, 32)
    ql = L.Linear(quant=QuantLinear(blob, "q4", 40, 64, 32, bias), isa="ref")
    np.testing.assert_allclose(ql(x), x @ qtypes.get("q4").dequantize(blob, 40, 64, 32).T + bias, atol=1e-4)
    with pytest.raises(ValueError, match="exactly one"):
        L.Linear()


# ------------------------------------------------------------------------------ tokenizer

TOKENIZER_TEXTS = ["a photo of a cat", "", "The quick brown fox jumps over the lazy dog. " * 6,
                   "two <image> people, ünïcödé ✓ and 0123456789", "  leading and trailing  "]


@pytest.mark.parametrize("family", FAMILIES)
def test_tokenizer_matches_transformers(models, family):
    from transformers import AutoTokenizer

    m = models[family]
    hf = AutoTokenizer.from_pretrained(str(m.src))
    with fmt.open(m.files[4]) as f:
        ours = Tokenizer.from_evlm(f)
    assert ours.pad_token_id == hf.pad_token_id and ours.eos_token_id == hf.eos_token_id
    assert ours.model_max_length == hf.model_max_length
    for kwargs in ({"padding": "longest"}, {"padding": "max_length", "max_length": 32},
                   {"padding": "longest", "max_length": 7}, {"padding": "max_length", "max_length": 12}):
        hf_padding = True if kwargs["padding"] == "longest" else "max_length"
        ref = hf(TOKENIZER_TEXTS, padding=hf_padding, truncation=True, max_length=kwargs.get("max_length"),
                 return_tensors="np")
        ids, mask = ours.encode(TOKENIZER_TEXTS, **kwargs)
        assert ids.dtype == mask.dtype == np.int64
        np.testing.assert_array_equal(ids, ref["input_ids"])
        np.testing.assert_array_equal(mask, ref["attention_mask"])
    # single string, no padding
    ids, _ = ours.encode("a photo of a dog", padding=False)
    np.testing.assert_array_equal(ids[0], hf("a photo of a dog")["input_ids"])
    # the model's own choice (what encode_text uses) equals the golden ids
    model = load_dual(m.files[4])
    np.testing.assert_array_equal(model.tokenize(m.texts)[0], m.golden["input_ids"])


# ---------------------------------------------------------------------------------- parity

@pytest.mark.parametrize("family", FAMILIES)
def test_fp16_file_matches_transformers_fp32(models, family):
    m = models[family]
    g = m.golden
    model = load_dual(m.files[16])
    assert model.family == family and model.embed_dim == g["image_embeds"].shape[1]
    # own preprocessing is bit-exact with the HF processor; own tokenizer gives the same ids
    assert np.abs(model.preprocess(m.images) - g["pixel_values"]).max() <= 1e-6
    ids, mask = model.tokenize(m.texts)
    np.testing.assert_array_equal(ids, g["input_ids"])
    if family == "clip":
        np.testing.assert_array_equal(mask, g["attention_mask"])
    img_raw = model.encode_image(m.images)
    img_px = model.encode_image(g["pixel_values"])  # float [B, 3, H, W]: pixel values as they are
    txt = model.encode_text(m.texts)
    for got, ref in ((img_raw, g["image_embeds"]), (img_px, g["image_embeds"]), (txt, g["text_embeds"])):
        assert got.dtype == np.float32 and got.shape == ref.shape
        assert _cos(got, ref).min() >= 0.9999, _cos(got, ref)
        np.testing.assert_allclose(np.linalg.norm(got, axis=-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(model.logits(img_px, txt), g["logits_per_image"],
                               atol=2e-3 * max(1.0, np.abs(g["logits_per_image"]).max()), rtol=0)
    # token ids fed directly (SigLIP: no attention mask, as the golden was computed)
    txt_ids = model.encode_tokens(g["input_ids"], g.get("attention_mask"))
    assert _cos(txt_ids, g["text_embeds"]).min() >= 0.9999


def _hf_with_file_weights(m: _Model, bits: int):
    """transformers fp32 model holding exactly the file's (dequantized) weights -> (image_embeds, text_embeds)."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(m.src), dtype=torch.float32).eval()
    sd = model.state_dict()
    with fmt.open(m.files[bits]) as f:
        src = {r.name: r.extra["src"] for r in f.records.values() if "src" in r.extra}
    with torch.no_grad():
        for key, value in m.fake[bits].items():
            t = sd[src[key]]
            t.copy_(torch.from_numpy(np.asarray(value, np.float32).reshape(t.shape)))
        kw = {"input_ids": torch.from_numpy(m.golden["input_ids"])}
        if "attention_mask" in m.golden:
            kw["attention_mask"] = torch.from_numpy(m.golden["attention_mask"])
        o = model(pixel_values=torch.from_numpy(m.golden["pixel_values"]), **kw)
    return o.image_embeds.numpy(), o.text_embeds.numpy()


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
@pytest.mark.parametrize("family", FAMILIES)
def test_quantized_runtime_computes_what_the_file_holds(models, family, bits):
    m = models[family]
    ref_img, ref_txt = _hf_with_file_weights(m, bits)
    exact = load_dual(m.files[bits], isa="ref")
    img, txt = exact.encode_pixels(m.golden["pixel_values"]), exact.encode_text(m.texts)
    for got, ref in ((img, ref_img), (txt, ref_txt)):
        assert _cos(got, ref).min() >= 0.99999, _cos(got, ref)
        assert np.abs(got - ref).max() <= 1e-5
    fast = load_dual(m.files[bits])  # default ISA: int8 activations on SIMD kernels
    bound = 0.99999 if bits == 8 else 0.9995  # q8 linears: two passes, ~15-bit activations (kernels.h)
    assert _cos(fast.encode_pixels(m.golden["pixel_values"]), ref_img).min() >= bound
    assert _cos(fast.encode_text(m.texts), ref_txt).min() >= bound


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
@pytest.mark.parametrize("family", FAMILIES)
def test_quantized_vs_fp32_documented_bounds(models, family, bits):
    m = models[family]
    g = m.golden
    model = load_dual(m.files[bits])
    img_raw, img_px = model.encode_image(m.images), model.encode_pixels(g["pixel_values"])
    np.testing.assert_array_equal(img_raw, img_px)  # preprocessing is exact, so identical
    txt = model.encode_text(m.texts)
    img_bound, txt_bound = BOUNDS[(family, bits)]
    ci, ct = _cos(img_px, g["image_embeds"]), _cos(txt, g["text_embeds"])
    print(f"{family} {bits}-bit: image cos min {ci.min():.5f}, text cos min {ct.min():.5f}")
    assert ci.min() >= img_bound, ci
    assert ct.min() >= txt_bound, ct


def test_legacy_clip_eos_token_id_2_pools_argmax(models, tmp_path):
    """CLIP configs from before transformers PR #24773 have eos_token_id 2: pooling is argmax(input_ids)."""
    from edgevlm.export import ExportConfig
    from edgevlm.export.golden import write_golden
    from edgevlm.export.pipeline import run_export

    src = tmp_path / "clip_legacy"
    shutil.copytree(models["clip"].src, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["text_config"]["eos_token_id"] = 2
    (src / "config.json").write_text(json.dumps(cfg))
    with np.load(write_golden(src, tmp_path / "g.npz")) as z:
        g = {k: z[k] for k in z.files}
    run_export(src, tmp_path / "legacy.evlm", ExportConfig(method="rtn", bits=16, n_calib=8, progress=False),
               log=lambda s: None)
    model = load_dual(tmp_path / "legacy.evlm")
    np.testing.assert_array_equal(model.text.pool_index(g["input_ids"]), g["input_ids"].argmax(-1))
    texts = json.loads(str(g["meta"]))["texts"]
    assert _cos(model.encode_text(texts), g["text_embeds"]).min() >= 0.9999


# ------------------------------------------------------------------------------- API shapes

@pytest.mark.parametrize("family", FAMILIES)
def test_logits_and_classify_shapes(models, family, tmp_path):
    from PIL import Image

    m = models[family]
    model = load_dual(m.files[4])
    img = model.encode_image(m.images)
    txt = model.encode_text(["a", "b c", "d e f", "g"])
    lg = model.logits(img, txt)
    assert lg.shape == (3, 4) and lg.dtype == np.float32
    expect = np.exp(model.logit_scale) * (img @ txt.T) + (model.logit_bias if family == "siglip" else 0.0)
    np.testing.assert_allclose(lg, expect, rtol=1e-5, atol=1e-5)
    labels = ["cat", "dog", "car", "tree"]
    p = model.classify(m.images, labels)
    assert p.shape == (3, 4) and p.dtype == np.float32
    assert np.all((p >= 0) & (p <= 1))
    if family == "clip":
        np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-5)  # softmax over labels
    else:
        np.testing.assert_allclose(p, 1 / (1 + np.exp(-model.logits(img, model.encode_text(
            [f"a photo of a {x}" for x in labels])))), atol=1e-5)  # independent sigmoids
    # one image / one text: [1, E]; a path and a PIL image give the same embedding as the array
    path = tmp_path / "im.png"
    Image.fromarray(m.images[0]).save(path)
    one = model.encode_image(m.images[0])
    assert one.shape == (1, model.embed_dim)
    np.testing.assert_array_equal(model.encode_image(path), one)
    np.testing.assert_array_equal(model.encode_image(Image.fromarray(m.images[0])), one)
    assert model.encode_text("a photo").shape == (1, model.embed_dim)
    raw = model.encode_image(m.images, normalize=False)
    np.testing.assert_allclose(raw / np.linalg.norm(raw, axis=-1, keepdims=True), img, atol=1e-6)
    # batching does not change results
    np.testing.assert_allclose(model.encode_image(m.images, batch_size=1), img, atol=1e-6)
    np.testing.assert_allclose(model.encode_text(["a", "b c", "d e f", "g"], batch_size=3), txt, atol=1e-6)
    assert "DualEncoder" in repr(model)


def test_thread_count_does_not_change_results(models):
    from edgevlm import _core

    m = models["clip"]
    before = _core.get_num_threads()
    try:
        set_num_threads(1)
        one = load_dual(m.files[4]).encode_pixels(m.golden["pixel_values"])
        model = load_dual(m.files[4], threads=2)
        assert _core.get_num_threads() == 2
        np.testing.assert_allclose(model.encode_pixels(m.golden["pixel_values"]), one, atol=1e-6, rtol=0)
    finally:
        set_num_threads(before)


# ------------------------------------------------------------------------------------ errors

def test_non_dual_encoder_files_raise_value_error(models, tmp_path):
    bert = tmp_path / "bert.evlm"
    fmt.write(bert, {"architecture": "BertModel", "family": "bert", "config": {}},
              [fmt.TensorBlob("text.embed.pos", "f32", 32, 0, (2, 4), np.zeros((2, 4), np.float32))])
    with pytest.raises(ValueError, match="not a CLIP/SigLIP export"):
        DualEncoder.load(bert)
    junk = tmp_path / "junk.evlm"
    junk.write_bytes(b"hello, this is not a model" * 10)
    with pytest.raises(ValueError):
        load_dual(junk)
    # a CLIP header with tensors missing
    with fmt.open(models["clip"].files[16]) as f:
        meta = f.metadata
    partial = tmp_path / "partial.evlm"
    fmt.write(partial, meta, [fmt.TensorBlob("logit_scale", "f32", 32, 0, (), np.zeros((), np.float32))])
    with pytest.raises(ValueError, match="missing"):
        load_dual(partial)
    model = load_dual(models["clip"].files[16])
    with pytest.raises(ValueError, match="pixel_values must be"):
        model.encode_pixels(np.zeros((1, 3, 16, 16), np.float32))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.encode_tokens(np.ones((1, 99), np.int64))


# ---------------------------------------------------------------------- no torch in the runtime

PROBE = """  # runs after no_torch's import blocker (FORBIDDEN, sys defined there)
import numpy as np
import edgevlm.runtime.dual
from edgevlm.runtime import load_dual
m = load_dual(sys.argv[1])
img = m.encode_image([np.full((40, 48, 3), 128, np.uint8)])
txt = m.encode_text(["a photo of a cat"])
p = m.classify([np.zeros((20, 30, 3), np.uint8)], ["cat", "dog"])
assert img.shape == (1, m.embed_dim) and txt.shape == (1, m.embed_dim) and p.shape == (1, 2)
print('LOADED', sorted(x for x in sys.modules if x.split('.')[0] in FORBIDDEN))
"""


@pytest.mark.parametrize("family", FAMILIES)
def test_dual_runtime_imports_no_torch(models, family):
    out = run_without_torch(PROBE, str(models[family].files[4]))
    assert out.returncode == 0, out.stderr
    assert "LOADED []" in out.stdout, out.stdout
