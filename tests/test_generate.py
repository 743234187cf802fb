"""Generative runtime (decoder, KV cache, sampling, chat templates, LLaVA) against transformers.

Parity levels (tiny random LLaVA models, tests/hf_tiny.py):
- fp16 export, default kernels: prompt ids equal the LlavaProcessor's; first-step logits within
  2e-3 absolute of transformers fp32 (measured <= 4.6e-4; the f16 weight rounding); greedy
  generation token-for-token identical.
- 8-bit export, reference kernels: identical greedy tokens and logits within 1e-4 of
  transformers running the *same* dequantized weights (the runtime adds only float32 rounding).
- 8-bit / 4-bit against the fp32 model: logits cosine >= 0.999 / >= 0.98 (measured 0.9999 /
  0.995); the max logit error is ~1% / ~12% of the logit range on these random models, whose
  near-flat logits make greedy paths diverge after a few tokens, so tokens are not compared.
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest

import hf_tiny
from no_torch import generate_without_torch

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from edgevlm.export import ExportConfig, export  # noqa: E402
from edgevlm.export.golden import synthetic_images, write_golden  # noqa: E402
from edgevlm.runtime.decoder import rope_inv_freq  # noqa: E402
from edgevlm.runtime.sampling import Sampler, SamplingConfig  # noqa: E402
from edgevlm.runtime.vlm import Runtime  # noqa: E402

N_NEW = 16
CASES = {"clip-llama": dict(vision="clip", text="llama", tie=False),
         "siglip-qwen2-tied": dict(vision="siglip", text="qwen2", tie=True)}


def _export(src, out, **cfg):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        export(src, out, ExportConfig(**cfg))
    return out


@pytest.fixture(scope="module", params=sorted(CASES))
def llava(request, tmp_path_factory):
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp(request.param)
    src = hf_tiny.make_llava(d / "hf", **CASES[request.param])
    gold = np.load(write_golden(src, d / "golden.npz", max_new_tokens=N_NEW))
    return src, gold, d


def _cos(a, b):
    a, b = a.reshape(-1).astype(np.float64), b.reshape(-1).astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_fp16_export_matches_transformers_token_for_token(llava):
    src, gold, d = llava
    rt = Runtime.load(_export(src, d / "f16.evlm", method="rtn", bits=16))
    images = synthetic_images()
    for i in range(int(gold["num_pairs"])):
        p = rt.prepare(str(gold[f"prompt_{i}"]), [images[i]])
        np.testing.assert_array_equal(p.input_ids, gold[f"input_ids_{i}"][0])
        np.testing.assert_allclose(p.image_features, gold[f"image_features_{i}"], atol=2e-3)
        logits = rt.logits(p)
        assert np.abs(logits - gold[f"logits_{i}"]).max() < 2e-3
        assert rt.generate_ids(p, max_tokens=N_NEW) == gold[f"generated_ids_{i}"].tolist()


@pytest.mark.parametrize("isa", [None, "ref"])
def test_f16_kv_cache_keeps_fp16_parity_and_halves_the_cache(llava, isa):
    """kv_dtype="f16": K/V rounded to half (relative error <= 2^-11 per element) before every
    attention, prefill and decode alike. Same bars as the fp32 cache: logits within 2e-3 of
    transformers fp32 and greedy tokens identical; and within 1e-3 of the float32-cache runtime
    (measured ~1e-4 on this model)."""
    src, gold, d = llava
    path = _export(src, d / "f16.evlm", method="rtn", bits=16)
    rt = Runtime.load(path, kv_dtype="f16", isa=isa)
    rt32 = Runtime.load(path, isa=isa)
    assert rt.kv_bytes * 2 == rt32.kv_bytes and rt.cache.k[0].dtype == np.float16
    images = synthetic_images()
    for i in range(int(gold["num_pairs"])):
        p = rt.prepare(str(gold[f"prompt_{i}"]), [images[i]])
        logits = rt.logits(p)
        assert np.abs(logits - gold[f"logits_{i}"]).max() < 2e-3
        assert np.abs(logits - rt32.logits(p)).max() < 1e-3
        assert rt.generate_ids(p, max_tokens=N_NEW) == gold[f"generated_ids_{i}"].tolist()
    with pytest.raises(ValueError, match="kv_dtype must be one of f16, f32, got 'bf16'"):
        Runtime.load(path, kv_dtype="bf16")


def test_8bit_runtime_equals_transformers_on_the_same_weights(llava):
    from edgevlm.export.evaluate import load_into_model

    src, gold, d = llava
    path = _export(src, d / "q8.evlm", method="rtn", bits=8)
    model = load_into_model(path, src).eval()
    rt = Runtime.load(path, isa="ref")
    images = synthetic_images()
    for i in range(int(gold["num_pairs"])):
        p = rt.prepare(str(gold[f"prompt_{i}"]), [images[i]])
        ids = torch.from_numpy(p.input_ids)[None]
        pv = torch.from_numpy(rt.vision.preprocessor([images[i]]))
        with torch.no_grad():
            ref = model(input_ids=ids, pixel_values=pv).logits[0].numpy()
            gen = model.generate(input_ids=ids, pixel_values=pv, attention_mask=torch.ones_like(ids),
                                 do_sample=False, max_new_tokens=N_NEW)[0, ids.shape[1]:].tolist()
        assert np.abs(rt.logits(p) - ref).max() < 1e-4
        assert rt.generate_ids(p, max_tokens=N_NEW) == gen


def test_4bit_head_is_its_own_packed_matrix_even_when_tied(llava):
    """Below 8 bits the LM head is packed at the LM's width (>= 4) even when tied: the runtime
    streams it per token instead of the 8-bit embedding table, and still equals transformers
    running the file's weights (untied by evaluate.load_into_model)."""
    from edgevlm import format as fmt
    from edgevlm.export.evaluate import load_into_model

    src, gold, d = llava
    path = _export(src, d / "q4.evlm", method="rtn", bits=4)
    with fmt.open(path) as f:
        head, tok = f.records["lm_head.weight"], f.records["text.embed.tok"]
        assert (head.qtype, tok.qtype) == ("q4", "q8")
        tied = head.extra["src"] == tok.extra["src"]
        assert tied == ("tied" in d.name) and (head.extra.get("param") == "lm_head.weight") == tied
    model = load_into_model(path, src).eval()
    if tied:  # the untied copy holds the 4-bit head, the embeddings keep their 8-bit values
        assert model.lm_head.weight is not model.get_input_embeddings().weight
    rt = Runtime.load(path, isa="ref")
    assert rt.decoder.head.quant.qtype.name == "q4"
    p = rt.prepare(str(gold["prompt_0"]), [synthetic_images()[0]])
    ids = torch.from_numpy(p.input_ids)[None]
    with torch.no_grad():
        ref = model(input_ids=ids, pixel_values=torch.from_numpy(rt.vision.preprocessor([synthetic_images()[0]])))
    assert np.abs(rt.logits(p) - ref.logits[0].numpy()).max() < 1e-4


def test_head_bits_sets_the_lm_head_width(llava):
    """--head-bits overrides the head's 4-bit floor (a 2-bit file whose decode streams a 2-bit
    head) and its default (an 8-bit head on a 4-bit model); the runtime still equals
    transformers running the file's weights."""
    from edgevlm import format as fmt
    from edgevlm.export.evaluate import load_into_model

    src, gold, d = llava
    for bits, head_bits in ((2, 2), (4, 8)):
        path = _export(src, d / f"q{bits}-head{head_bits}.evlm", method="rtn", bits=bits, head_bits=head_bits)
        with fmt.open(path) as f:  # an 8-bit tied head is the 8-bit embedding table itself: not stored twice
            tied_8 = head_bits == 8 and "tied" in d.name
            assert ("lm_head.weight" not in f.records) if tied_8 else f.records["lm_head.weight"].qtype == f"q{head_bits}"
        model = load_into_model(path, src).eval()
        rt = Runtime.load(path, isa="ref")
        assert rt.decoder.head.quant.qtype.name == f"q{head_bits}"
        p = rt.prepare(str(gold["prompt_0"]), [synthetic_images()[0]])
        ids = torch.from_numpy(p.input_ids)[None]
        with torch.no_grad():
            ref = model(input_ids=ids, pixel_values=torch.from_numpy(rt.vision.preprocessor([synthetic_images()[0]])))
        assert np.abs(rt.logits(p) - ref.logits[0].numpy()).max() < 1e-4
    with pytest.raises(ValueError, match="head_bits"):
        ExportConfig(head_bits=5)


@pytest.mark.parametrize("bits,min_cos", [(8, 0.999), (4, 0.98)])
def test_quantized_logits_stay_within_documented_bounds(llava, bits, min_cos):
    src, gold, d = llava
    rt = Runtime.load(_export(src, d / f"q{bits}.evlm", method="gptq" if bits == 4 else "rtn", bits=bits))
    images = synthetic_images()
    for i in range(int(gold["num_pairs"])):
        p = rt.prepare(str(gold[f"prompt_{i}"]), [images[i]])
        assert _cos(rt.logits(p), gold[f"logits_{i}"]) >= min_cos


def _decode_both_ways(rt, p, switch: str):
    """Prefill p, then decode 4 tokens, with the decoder's boolean ``switch`` on and then off:
    [(cache, logits per step)] for each setting (the switch is left on)."""
    dec, runs = rt.decoder, []
    try:
        for on in (True, False):
            setattr(dec, switch, on)
            cache = dec.new_cache(p.input_ids.size + 8)
            dec.forward(rt._embed(p), cache, p.positions)
            runs.append((cache, [dec.forward(dec.embed([t]), cache) for t in (5, 9, 2, 7)]))
    finally:
        setattr(dec, switch, True)
    return runs


def test_c_decode_step_equals_numpy_loop(llava):
    """Decode steps run the C++ glue ops (Decoder._step); the numpy loop is their twin: same
    logits to float32 rounding over several cached positions, same greedy tokens."""
    src, gold, d = llava
    rt = Runtime.load(_export(src, d / "q4.evlm", method="rtn", bits=4), isa="ref")
    dec = rt.decoder
    assert dec.fast_decode
    p = rt.prepare(str(gold["prompt_0"]), [synthetic_images()[0]])
    (c_fast, fast), (c_np, ref) = _decode_both_ways(rt, p, "fast_decode")
    for a, b in zip(fast, ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    for a, b in zip(c_fast.k + c_fast.v, c_np.k + c_np.v):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    ids = rt.generate_ids(p, max_tokens=N_NEW)
    dec.fast_decode = False
    try:
        assert rt.generate_ids(p, max_tokens=N_NEW) == ids
    finally:
        dec.fast_decode = True


@pytest.mark.parametrize("isa", [None, "ref"])
def test_decode_plan_equals_the_per_op_loop_bit_for_bit(llava, isa):
    """A decode step as one DecodePlan call (csrc/ops/decode_step.cc) runs the same ops in the
    same order as _step's per-op loop: identical logits and caches, not merely close."""
    src, gold, d = llava
    rt = Runtime.load(_export(src, d / "q4.evlm", method="rtn", bits=4), isa=isa)
    dec = rt.decoder
    assert dec.use_plan
    p = rt.prepare(str(gold["prompt_0"]), [synthetic_images()[0]])
    (c_plan, a), (c_ops, b) = _decode_both_ways(rt, p, "use_plan")
    assert c_plan.plan is not None and c_plan.plan.n_layers == dec.n_layers and c_ops.plan is None
    for x, y in zip(a + c_plan.k + c_plan.v, b + c_ops.k + c_ops.v):
        np.testing.assert_array_equal(x, y)


def test_decode_plan_rejects_bad_arguments(llava):
    from edgevlm import _core

    src, gold, d = llava
    dec = Runtime.load(_export(src, d / "q4.evlm", method="rtn", bits=4)).decoder
    cache = dec.new_cache(16)
    plan = dec._make_plan(cache)
    x = np.zeros(dec.dim, np.float32)
    cos = np.ones(dec.rot, np.float32)
    with pytest.raises(ValueError, match=r"\[DecodePlan.step\] expected 0 <= pos < ctx=16"):
        plan.step(x, 16, cos, cos)
    with pytest.raises(ValueError, match=r"expected x with"):
        plan.step(np.zeros(dec.dim + 1, np.float32), 0, cos, cos)
    L = dec.layers[0]
    lin = lambda l: (l.quant.blob, l.quant.qtype.name, l.quant.group, l.quant.n, l.quant.k, l.quant.bias)  # noqa: E731
    lins = [lin(getattr(L, n)) for n in ("q", "k", "v", "o", "gate", "up", "down")]
    dims = (dec.dim, dec.n_heads, dec.n_kv, dec.head_dim, 16, L.gate.n)
    bad_cache = np.zeros((dec.n_kv, 15, dec.head_dim), np.float32)
    with pytest.raises(ValueError, match=r"expected kc of shape"):
        _core.DecodePlan([(lins, L.n1, L.n2, None, None, bad_cache, cache.v[0])], dec.norm, dims, 1e-6, 1.0)
    swapped = [lins[1]] + lins[1:]  # k's [Hkv*hd, D] where q's [Hq*hd, D] belongs
    with pytest.raises(ValueError, match=r"expected a linear of shape"):
        _core.DecodePlan([(swapped, L.n1, L.n2, None, None, cache.k[0], cache.v[0])], dec.norm, dims, 1e-6, 1.0)


def test_kv_cache_decode_equals_full_forward(llava):
    src, gold, d = llava
    rt = Runtime.load(_export(src, d / "f16.evlm", method="rtn", bits=16))
    p = rt.prepare(str(gold["prompt_0"]), [synthetic_images()[0]])
    full = rt.logits(p)                                                   # [T, V] in one pass
    dec = rt.decoder
    cache = dec.new_cache(p.input_ids.size)
    x = rt._embed(p)
    split = p.input_ids.size - 3
    dec.forward(x[:split], cache)                                         # prefill, then one at a time
    for t in range(split, p.input_ids.size):
        np.testing.assert_allclose(dec.forward(x[t:t + 1], cache), full[t], atol=2e-5, rtol=0)
    with pytest.raises(ValueError, match="context holds"):
        dec.forward(x[:1], cache)


def test_prompt_longer_than_ctx_is_a_clear_error(llava):
    src, gold, d = llava
    rt = Runtime.load(_export(src, d / "f16.evlm", method="rtn", bits=16), ctx=8)
    with pytest.raises(ValueError, match=r"raise ctx \(--ctx\)"):
        rt.generate("describe", images=[synthetic_images()[0]])


def test_chat_template_renders_like_transformers(llava):
    src, gold, d = llava
    rt = Runtime.load(_export(src, d / "f16.evlm", method="rtn", bits=16))
    tok = transformers.AutoTokenizer.from_pretrained(str(src))
    for msgs in ([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}],
                 [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
                  {"role": "assistant", "content": [{"type": "text", "text": "hello"}]},
                  {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and this?"}]}]):
        want = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        assert rt.chat.render(msgs) == want


def test_generate_streams_stops_and_counts(llava):
    src, gold, d = llava
    rt = Runtime.load(_export(src, d / "f16.evlm", method="rtn", bits=16))
    img = [synthetic_images()[1]]
    full = rt.generate("Describe the image.", images=img, max_tokens=12)
    assert full.finish_reason in ("length", "stop") and len(full.token_ids) <= 12
    assert full.usage["completion_tokens"] == len(full.token_ids)
    assert full.usage["prompt_tokens"] == full.prompt_tokens > 0
    pieces = list(rt.stream("Describe the image.", images=img, max_tokens=12))
    assert "".join(pieces) == full.text
    if len(full.text) > 2:  # a stop string cuts the text before it and ends the generation
        stop = full.text[1:3]
        cut = rt.generate("Describe the image.", images=img, max_tokens=12, stop=[stop])
        assert cut.finish_reason == "stop" and cut.text == full.text[:full.text.find(stop)]
    with pytest.raises(ValueError, match="image placeholder"):
        rt.generate("two images?", images=img * 2, raw=True)


def test_runtime_generates_without_torch(llava):
    src, gold, d = llava
    path = _export(src, d / "q4.evlm", method="rtn", bits=4)
    img = d / "img.png"
    synthetic_images()[0].save(img)
    r = generate_without_torch(path, img)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr


# ------------------------------------------------------------------------------------ units
def test_llama3_rope_frequencies_match_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rp = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    cfg = LlamaConfig(hidden_size=256, num_attention_heads=4, max_position_embeddings=131072, rope_parameters=rp)
    want, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    got = rope_inv_freq(cfg.to_dict(), 64)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="rope_type"):
        rope_inv_freq({"rope_parameters": {"rope_type": "yarn-x"}}, 64)


def test_sampling_matches_transformers_processors():
    from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    rng = np.random.default_rng(0)
    logits = rng.standard_normal(50).astype(np.float32) * 3
    seen = np.array([3, 7, 7, 11])
    # greedy with a repetition penalty = argmax of HF's penalised logits
    hf = RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor(seen)[None], torch.tensor(logits)[None])[0].numpy()
    assert Sampler(SamplingConfig(repetition_penalty=1.7))(logits, seen) == int(np.argmax(hf))
    # the support of top-k + top-p sampling = HF's unmasked set
    x = torch.tensor(logits)[None]
    for proc in (TemperatureLogitsWarper(0.7), TopKLogitsWarper(10), TopPLogitsWarper(0.8)):
        x = proc(None, x)
    allowed = set(np.flatnonzero(np.isfinite(x[0].numpy())).tolist())
    s = Sampler(SamplingConfig(temperature=0.7, top_k=10, top_p=0.8, seed=1))
    drawn = {s(logits) for _ in range(400)}
    assert drawn <= allowed and len(drawn) > 1
    # seeded runs repeat; top_k=1 is greedy
    a = [Sampler(SamplingConfig(temperature=1.0, seed=5))(logits) for _ in range(3)]
    assert a == [Sampler(SamplingConfig(temperature=1.0, seed=5))(logits) for _ in range(3)]
    assert Sampler(SamplingConfig(temperature=1.0, top_k=1, seed=2))(logits) == int(np.argmax(logits))
    for bad in (dict(temperature=-1), dict(top_p=0.0), dict(top_k=-2), dict(repetition_penalty=0)):
        with pytest.raises(ValueError):
            SamplingConfig(**bad)


def test_cli_run(llava, capsys):
    from edgevlm.cli import main

    src, gold, d = llava
    path = _export(src, d / "f16.evlm", method="rtn", bits=16)
    img = d / "cli.png"
    synthetic_images()[2].save(img)
    assert main(["run", str(path), "--image", str(img), "--prompt", "Describe it.", "--max-tokens", "5",
                 "--json"]) == 0
    out = __import__("json").loads(capsys.readouterr().out)
    assert out["usage"]["completion_tokens"] <= 5 and out["finish_reason"] in ("length", "stop")
    want = Runtime.load(path).generate("Describe it.", images=[str(img)], max_tokens=5).text
    assert out["text"] == want
    assert main(["run", str(path), "--image", str(img), "--prompt", "x", "--stream", "--max-tokens", "3"]) == 0
    assert "decode" in capsys.readouterr().err
    assert main(["run", str(path), "--image", str(d / "missing.png"), "--prompt", "x"]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["run", str(path), "--prompt", "x", "--ctx", "2"]) == 2
    assert "--ctx" in capsys.readouterr().err
