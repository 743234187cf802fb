"""The tiny random HF model folders (tests/hf_tiny.py) and the golden writer (edgevlm.export.golden)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import hf_tiny  # noqa: E402  (tests/ is on sys.path: pytest's rootdir-relative "prepend" import mode)
from edgevlm.export.golden import synthetic_images, write_golden  # noqa: E402

pytestmark = [pytest.mark.torch, pytest.mark.usefixtures("quiet_torch_one_thread")]

LLAVA_COMBOS = [("clip", "llama"), ("clip", "qwen2"), ("siglip", "llama"), ("siglip", "qwen2")]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_tiny")
    out = {"clip": hf_tiny.make_clip(root / "clip"), "siglip": hf_tiny.make_siglip(root / "siglip"),
           "bert": hf_tiny.make_bert(root / "bert")}
    for v, t in LLAVA_COMBOS:
        out[f"llava-{v}-{t}"] = hf_tiny.make_llava(root / f"llava-{v}-{t}", vision=v, text=t)
    return out


def _safetensors(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def _linear_in_features(model):
    ins = [m.in_features for m in model.modules() if isinstance(m, torch.nn.Linear)]
    ins += [m.embed_dim for m in model.modules() if isinstance(m, torch.nn.MultiheadAttention)]
    return ins


# ------------------------------------------------------------------------------------ tokenizer


def test_tokenizer_specials_and_size():
    tok = hf_tiny.tokenizer()
    assert len(tok) % 32 == 0 and len(tok) == hf_tiny.DEFAULT_VOCAB
    assert (tok.pad_token_id, tok.bos_token_id, tok.unk_token_id, tok.eos_token_id) == (0, 1, 2, 3)
    assert tok.convert_tokens_to_ids(hf_tiny.IMAGE_TOKEN) == 4
    ids = tok("a photo of a cat <image> here", add_special_tokens=False)["input_ids"]
    assert 4 in ids and max(ids) < len(tok)
    wrapped = hf_tiny.tokenizer(add_bos=True, add_eos=True)("a cat")["input_ids"]
    assert wrapped[0] == 1 and wrapped[-1] == 3
    extra = hf_tiny.tokenizer(["<|image_pad|>"])
    assert len(extra) == hf_tiny.DEFAULT_VOCAB and extra.convert_tokens_to_ids("<|image_pad|>") < len(extra)
    # deterministic: the same ids twice
    assert hf_tiny.tokenizer()("hello world")["input_ids"] == tok("hello world")["input_ids"]


# ---------------------------------------------------------------------------------- CLIP/SigLIP


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_dual_encoder_reloads_and_runs(folders, kind):
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    d = folders[kind]
    names = {p.name for p in d.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "preprocessor_config.json"} <= names
    model = AutoModel.from_pretrained(d).eval()
    assert type(model).__name__ == {"clip": "CLIPModel", "siglip": "SiglipModel"}[kind]
    pil_cls = {"clip": transformers.CLIPImageProcessorPil, "siglip": transformers.SiglipImageProcessorPil}[kind]
    improc = pil_cls.from_pretrained(d)
    assert type(AutoImageProcessor.from_pretrained(d)) is pil_cls  # no torchvision: the PIL one
    tok = AutoTokenizer.from_pretrained(d)
    pv = improc(images=synthetic_images(), return_tensors="pt")["pixel_values"]
    assert tuple(pv.shape) == (3, 3, 32, 32)
    enc = tok(["a photo of a cat", "a dog"], padding="max_length" if kind == "siglip" else True,
              max_length=tok.model_max_length, truncation=True, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=enc["input_ids"], pixel_values=pv)
    assert tuple(out.logits_per_image.shape) == (3, 2)
    assert torch.allclose(out.image_embeds.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert all(k % 32 == 0 for k in _linear_in_features(model))
    assert model.config.text_config.vocab_size % 32 == 0
    assert model.config.vision_config.num_attention_heads >= 2
    # the saved names are the module names for the dual encoders
    assert set(_safetensors(d)) == set(dict(model.named_parameters()))


def test_builders_are_deterministic(tmp_path):
    a = _safetensors(hf_tiny.make_clip(tmp_path / "a"))
    b = _safetensors(hf_tiny.make_clip(tmp_path / "b"))
    c = _safetensors(hf_tiny.make_clip(tmp_path / "c", seed=1))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["text_projection.weight"], c["text_projection.weight"])


# ----------------------------------------------------------------------------------------- LLaVA


@pytest.mark.parametrize("vision,text", LLAVA_COMBOS)
def test_llava_reloads_and_generates(folders, vision, text):
    from transformers import AutoProcessor, AutoTokenizer, LlavaForConditionalGeneration, LlavaProcessor

    d = folders[f"llava-{vision}-{text}"]
    names = {p.name for p in d.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja", "preprocessor_config.json", "processor_config.json"} <= names
    model = LlavaForConditionalGeneration.from_pretrained(d).eval()
    cfg = model.config
    tc = cfg.text_config
    assert tc.model_type == text and cfg.vision_config.model_type == f"{vision}_vision_model"
    assert tc.num_key_value_heads < tc.num_attention_heads and tc.num_attention_heads >= 2
    assert (cfg.vision_feature_select_strategy, cfg.vision_feature_layer) == \
        ({"clip": ("default", -2), "siglip": ("full", -1)}[vision])
    assert not cfg.tie_word_embeddings and not tc.tie_word_embeddings
    n_img = hf_tiny.num_image_tokens(vision)
    assert n_img == 16 and cfg.image_seq_length == n_img
    assert all(k % 32 == 0 for k in _linear_in_features(model)) and tc.vocab_size % 32 == 0
    q = model.model.language_model.layers[0].self_attn.q_proj
    assert (q.bias is not None) == (text == "qwen2")

    tok = AutoTokenizer.from_pretrained(d)
    assert cfg.image_token_id == tok.convert_tokens_to_ids("<image>") < tc.vocab_size
    proc = AutoProcessor.from_pretrained(d)
    assert isinstance(proc, LlavaProcessor)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt.count("<image>") == 1
    enc = proc(images=[synthetic_images()[2]], text=[prompt], return_tensors="pt")
    assert int((enc["input_ids"] == cfg.image_token_id).sum()) == n_img
    assert (enc["input_ids"][0, 0].item() == tok.bos_token_id) == (text == "llama")
    with torch.no_grad():
        gen = model.generate(**enc, do_sample=False, max_new_tokens=4)
    assert gen.shape[0] == 1 and enc["input_ids"].shape[1] < gen.shape[1] <= enc["input_ids"].shape[1] + 4
    assert torch.equal(gen[0, : enc["input_ids"].shape[1]], enc["input_ids"][0])


def test_llava_saved_names_tie_and_hub_layout(folders, tmp_path):
    from transformers import LlavaForConditionalGeneration

    base = folders["llava-clip-llama"]
    saved = _safetensors(base)
    assert "language_model.lm_head.weight" in saved and "vision_tower.encoder.layers.0.mlp.fc1.weight" in saved
    assert "language_model.model.layers.0.self_attn.q_proj.weight" in saved
    tied = hf_tiny.make_llava(tmp_path / "tied", tie=True)
    assert "language_model.lm_head.weight" not in _safetensors(tied)
    m = LlavaForConditionalGeneration.from_pretrained(tied)
    assert m.config.tie_word_embeddings and m.lm_head.weight.data_ptr() == \
        m.model.language_model.embed_tokens.weight.data_ptr()
    hub = hf_tiny.make_llava(tmp_path / "hub", hub_layout=True)
    hub_keys = _safetensors(hub)
    assert "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight" in hub_keys
    a = LlavaForConditionalGeneration.from_pretrained(base).state_dict()
    b = LlavaForConditionalGeneration.from_pretrained(hub).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------ BERT


def test_bert_reloads_and_runs(folders):
    from transformers import AutoModel, AutoTokenizer

    d = folders["bert"]
    model = AutoModel.from_pretrained(d).eval()
    assert type(model).__name__ == "BertModel"
    assert set(_safetensors(d)) == set(dict(model.named_parameters()))  # pooler saved: nothing re-initialised
    enc = AutoTokenizer.from_pretrained(d)(["a photo of a cat", "hello"], padding=True, return_tensors="pt")
    with torch.no_grad():
        h = model(**enc).last_hidden_state
    assert tuple(h.shape[::2]) == (2, 64)
    assert all(k % 32 == 0 for k in _linear_in_features(model))


# ---------------------------------------------------------------------------------------- golden

_DUAL_KEYS = {"pixel_values", "input_ids", "image_embeds", "text_embeds", "logits_per_image", "logits_per_text",
              "vision_last_hidden_state", "text_last_hidden_state", "vision_pooler_output", "text_pooler_output",
              "num_images", "meta"}
EXPECTED_KEYS = {
    "clip": _DUAL_KEYS | {"attention_mask"},
    "siglip": _DUAL_KEYS,
    "bert": {"input_ids", "attention_mask", "last_hidden_state", "sentence_embedding", "sentence_embedding_l2",
             "meta"},
    "llava-siglip-qwen2": {"num_pairs", "num_image_tokens", "num_images", "meta"}
    | {f"{k}_{i}" for i in range(3) for k in ("prompt", "input_ids", "pixel_values", "image_features", "logits",
                                               "generated_ids")},
}


def _load(path):
    with np.load(path) as z:  # allow_pickle defaults to False: everything is a plain array
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def goldens(folders, tmp_path_factory):
    root = tmp_path_factory.mktemp("golden")
    out = {}
    for kind in EXPECTED_KEYS:
        a = write_golden(folders[kind], root / f"{kind}.npz", max_new_tokens=5)
        b = write_golden(folders[kind], root / f"{kind}-again.npz", max_new_tokens=5)
        out[kind] = (_load(a), _load(b))
    return out


@pytest.mark.parametrize("kind", list(EXPECTED_KEYS))
def test_golden_keys_and_determinism(goldens, kind):
    g, again = goldens[kind]
    expected = EXPECTED_KEYS[kind] | ({f"image_{i}" for i in range(3)} if kind != "bert" else set())
    assert set(g) == expected
    assert set(again) == set(g)
    for k in g:
        assert g[k].dtype == again[k].dtype and np.array_equal(g[k], again[k]), k
    meta = json.loads(str(g["meta"]))
    assert meta["model_type"] == kind.split("-")[0]
    assert meta["transformers"] == transformers.__version__ and meta["torch"] == torch.__version__
    floats = [k for k in g if g[k].dtype.kind == "f"]
    assert floats and all(g[k].dtype == np.float32 and np.isfinite(g[k]).all() for k in floats)


def test_golden_clip_matches_transformers(folders, goldens):
    from transformers import AutoModel

    g = goldens["clip"][0]
    model = AutoModel.from_pretrained(folders["clip"]).eval()
    improc = transformers.CLIPImageProcessorPil.from_pretrained(folders["clip"])
    pv = improc(images=[_PIL(g[f"image_{i}"]) for i in range(3)], return_tensors="pt")["pixel_values"]
    assert np.array_equal(pv.numpy(), g["pixel_values"])  # preprocessing reproducible from the raw images
    with torch.no_grad():
        o = model(input_ids=torch.from_numpy(g["input_ids"]), attention_mask=torch.from_numpy(g["attention_mask"]),
                  pixel_values=torch.from_numpy(g["pixel_values"]))
    for k, v in (("image_embeds", o.image_embeds), ("text_embeds", o.text_embeds),
                 ("logits_per_image", o.logits_per_image), ("logits_per_text", o.logits_per_text),
                 ("vision_last_hidden_state", o.vision_model_output.last_hidden_state),
                 ("text_last_hidden_state", o.text_model_output.last_hidden_state)):
        np.testing.assert_allclose(g[k], v.numpy(), rtol=0, atol=1e-6, err_msg=k)
    np.testing.assert_allclose(np.linalg.norm(g["image_embeds"], axis=-1), 1.0, atol=1e-5)
    assert (g["input_ids"][:, 0] == 1).all()  # <s> ... </s>


def test_golden_siglip_matches_transformers(folders, goldens):
    from transformers import AutoModel, AutoTokenizer

    g = goldens["siglip"][0]
    meta = json.loads(str(g["meta"]))
    model = AutoModel.from_pretrained(folders["siglip"]).eval()
    tok = AutoTokenizer.from_pretrained(folders["siglip"])
    assert g["input_ids"].shape == (3, model.config.text_config.max_position_embeddings)  # padded to max_length
    ids = tok(meta["texts"], padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="np")["input_ids"]
    assert np.array_equal(ids, g["input_ids"])
    with torch.no_grad():
        o = model(input_ids=torch.from_numpy(g["input_ids"]), pixel_values=torch.from_numpy(g["pixel_values"]))
    np.testing.assert_allclose(g["logits_per_image"], o.logits_per_image.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(g["text_embeds"], o.text_embeds.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(g["vision_last_hidden_state"], o.vision_model_output.last_hidden_state.numpy(),
                               rtol=0, atol=1e-6)


def test_golden_llava_matches_transformers(folders, goldens):
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    d = folders["llava-siglip-qwen2"]
    g = goldens["llava-siglip-qwen2"][0]
    model = LlavaForConditionalGeneration.from_pretrained(d).eval()
    tok = AutoTokenizer.from_pretrained(d)
    assert list(g["num_image_tokens"]) == [hf_tiny.num_image_tokens("siglip")] * 3
    for i in range(int(g["num_pairs"])):
        ids, pv = torch.from_numpy(g[f"input_ids_{i}"]), torch.from_numpy(g[f"pixel_values_{i}"])
        # the expansion LlavaProcessor did, by hand: every <image> -> image_seq_length of them
        prompt = str(g[f"prompt_{i}"])
        by_hand = tok(prompt.replace("<image>", "<image>" * model.config.image_seq_length))["input_ids"]
        assert by_hand == ids[0].tolist()
        with torch.no_grad():
            logits = model(input_ids=ids, pixel_values=pv).logits[0]
            gen = model.generate(input_ids=ids, pixel_values=pv, attention_mask=torch.ones_like(ids),
                                 do_sample=False, max_new_tokens=5)
        np.testing.assert_allclose(g[f"logits_{i}"], logits.numpy(), rtol=0, atol=1e-6)
        assert g[f"logits_{i}"].shape == (ids.shape[1], model.config.text_config.vocab_size)
        assert g[f"generated_ids_{i}"].tolist() == gen[0, ids.shape[1]:].tolist()
        assert g[f"image_features_{i}"].shape == (16, model.config.text_config.hidden_size)


def test_golden_bert_matches_transformers(folders, goldens):
    from transformers import AutoModel

    g = goldens["bert"][0]
    model = AutoModel.from_pretrained(folders["bert"]).eval()
    with torch.no_grad():
        h = model(input_ids=torch.from_numpy(g["input_ids"]),
                  attention_mask=torch.from_numpy(g["attention_mask"])).last_hidden_state.numpy()
    np.testing.assert_allclose(g["last_hidden_state"], h, rtol=0, atol=1e-6)
    m = g["attention_mask"][..., None].astype(np.float32)
    mean = (h * m).sum(1) / m.sum(1)
    np.testing.assert_allclose(g["sentence_embedding"], mean, rtol=0, atol=1e-6)
    np.testing.assert_allclose(g["sentence_embedding_l2"], mean / np.linalg.norm(mean, axis=-1, keepdims=True),
                               rtol=0, atol=1e-6)


def test_golden_same_size_images_are_stacked(folders, tmp_path):
    from PIL import Image

    imgs = [Image.fromarray(np.full((20, 24, 3), v, np.uint8)) for v in (0, 128)]
    g = _load(write_golden(folders["clip"], tmp_path / "g.npz", images=imgs, texts=["a cat"]))
    assert g["images_uint8"].shape == (2, 20, 24, 3) and "image_0" not in g
    assert g["logits_per_image"].shape == (2, 1)


def test_golden_rejects_unsupported_model(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="unsupported model type 'gpt2'"):
        write_golden(tmp_path, tmp_path / "g.npz")


def _PIL(a):  # noqa: N802
    from PIL import Image

    return Image.fromarray(a)
