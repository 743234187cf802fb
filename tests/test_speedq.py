"""SPEED-Q (export/speedq*.py) on tiny LLaVA models.

- The bilevel fake quantization of the QAT forward (torch, float32) is the q2b file's
  dequantization bit for bit (2-bit), and the q4 file's (4-bit recipe, fp16 scale/min storage).
- The embedding/head quantizer (4-bit symmetric) is stored exactly as q4; rounding error <= s/2.
- AdaRound lowers a vision block's output error below its round-to-nearest init.
- GPTQ on the recipe grid (the stage-3 init): with H = I it is the recipe's min-max rounding
  bit for bit; with correlated inputs it lowers the output error below it; its grid stores
  exactly as q2b / q4; the frozen-grid STE's forward is that grid's rounding.
- QAT lowers the distillation loss of the 2-bit model against the fp teacher; with a
  held-out split the kept weights score no worse on it than the GPTQ start.
- The self-distillation samples continue the calibration prompts' text, never with image tokens.
- export -> file: q2b LM linears equal the QAT forward's weights bit for bit; the runtime
  (reference kernels) matches transformers running the file's weights within 1e-4 (the
  tolerance test_generate.py establishes for quantized exports: float32 rounding only).
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest

import hf_tiny

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from edgevlm import format as fmt  # noqa: E402
from edgevlm import qtypes  # noqa: E402
from edgevlm.export import ExportConfig  # noqa: E402
from edgevlm.export.pipeline import run_export  # noqa: E402
from edgevlm.export.speedq_quant import BilevelSTE, RECIPES, bilevel_params, bilevel_qdq, bilevel_result, \
    sym4_result  # noqa: E402

FAST = dict(n_calib=8, batch_size=4, speedq_adaround_iters=30, speedq_stage2_steps=4, progress=False)


def _weights(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    w[0, :16] = 0.0                         # a constant group (min == max)
    w[1, 5] = 0.5                           # an outlier
    return w


@pytest.mark.parametrize("n,k", [(64, 64), (40, 96), (16, 32), (130, 256)])
def test_bilevel_fake_quant_is_q2b_dequant_bit_for_bit(n, k):
    w = _weights(n, k, n + k)
    q2b = qtypes.get("q2b")
    ref = q2b.dequantize(q2b.pack(w.numpy()), n, k)              # numpy twin of the C++ type
    np.testing.assert_array_equal(bilevel_qdq(w, 2).numpy(), ref)
    res = bilevel_result(w, 2)
    assert res.qtype == "q2b" and res.group == 16
    np.testing.assert_array_equal(q2b.dequantize(res.pack(), n, k), res.deq.numpy())
    # the STE forward is the same value; its gradient is 1 inside [-S z, S (3 - z)], 0 outside
    wp = w.clone().requires_grad_(True)
    y = BilevelSTE(2)(wp)
    assert torch.equal(y.detach(), res.deq)
    y.sum().backward()
    q, z, _, _, _, S = bilevel_params(w, 2, 16, 16)
    wg = w.reshape(n, -1, 16)
    inside = ((wg >= (-S * z)[..., None]) & (wg <= (S * (3 - z))[..., None])).reshape(n, k)
    assert torch.equal(wp.grad, inside.float())
    assert 0 < int((~inside).sum()) < n * k // 2   # the rounded zero clips some group extremes


@pytest.mark.parametrize("n,k", [(64, 64), (130, 256)])
def test_4bit_recipe_is_an_exact_q4_tensor(n, k):
    w = _weights(n, k, 7)
    res = bilevel_result(w, 4)
    assert (res.qtype, res.group) == ("q4", 32)
    np.testing.assert_array_equal(qtypes.get("q4").dequantize(res.pack(), n, k, 32), res.deq.numpy())
    np.testing.assert_array_equal(bilevel_qdq(w, 4).numpy(), res.deq.numpy())
    # vs SPEED-Q's float32 4-bit dequantization S (q - z): only the fp16 storage of S and of
    # -S z differs (relative 2^-11 each, times |q - z| <= 15), plus a code re-rounded against
    # fp16(S) where w sits on a rounding boundary (one step S); bound both.
    q, z, _, _, _, S = bilevel_params(w, 4, *RECIPES[4])
    exact = (S[..., None] * (q - z[..., None])).reshape(n, k)
    step = S.repeat_interleave(32, dim=1)
    diff = (res.deq - exact).abs()
    assert float((diff <= 16 * 2.0 ** -11 * step + 1e-12).float().mean()) > 0.999
    assert bool((diff <= step * (1 + 2.0 ** -8)).all())


def _correlated_h(k: int, seed: int) -> torch.Tensor:
    """H = 2 XᵀX / T of inputs with strongly correlated channels (mixing matrix), float32 [K, K]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * k, k, generator=g) @ (torch.eye(k) + 0.5 * torch.randn(k, k, generator=g) / k ** 0.5)
    return 2 * x.T @ x / x.shape[0]


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("n,k", [(48, 64), (40, 96)])
def test_gptq_on_the_recipe_grid(bits, n, k):
    from edgevlm.export.quantize import output_error
    from edgevlm.export.speedq_gptq import GridSTE, gptq_grid

    w = _weights(n, k, n * k + bits)
    # H = I: no error feedback, grid from the original weights -> the recipe's rounding bit for bit
    wi = w.clone()
    gptq_grid(wi, torch.eye(k), bits, clip=False)
    assert torch.equal(wi, bilevel_qdq(w, bits))
    # correlated inputs: GPTQ's error feedback lowers the output error below that rounding
    H = _correlated_h(k, k)
    wq = w.clone()
    grid = gptq_grid(wq, H, bits, clip=True)
    e_gptq = output_error(w, wq, H)[0]
    e_rtn = output_error(w, bilevel_qdq(w, bits), H)[0]
    assert e_gptq < 0.9 * e_rtn, (e_gptq, e_rtn)
    # wq holds grid values: its codes dequantize back to it, and the file tensor is that value
    assert torch.equal(grid.deq(grid.codes(wq)), wq)
    res = grid.result(wq)
    assert (res.qtype, res.group) == (("q2b", 16) if bits == 2 else ("q4", 32))
    deq = qtypes.get(res.qtype).dequantize(res.pack(), n, k, *(() if bits == 2 else (32,)))
    np.testing.assert_array_equal(deq, wq.numpy())
    # the frozen-grid STE: forward = the grid's rounding of the latent weight, gradient inside its range
    lat = (wq + 0.3 * grid.scale.repeat_interleave(grid.group, 1) * torch.randn(n, k)).requires_grad_(True)
    y = GridSTE(grid)(lat)
    assert torch.equal(y.detach(), grid.result(lat.detach()).deq)
    y.sum().backward()
    lo, hi = (t.repeat_interleave(grid.group, 1) for t in grid.range())
    assert torch.equal(lat.grad, ((lat >= lo) & (lat <= hi)).float().detach())


def test_embedding_head_quantizer_is_symmetric_4bit_and_exact_in_q4():
    w = _weights(96, 64, 3)
    res = sym4_result(w, 32)
    np.testing.assert_array_equal(qtypes.get("q4").dequantize(res.pack(), 96, 64, 32), res.deq.numpy())
    s = np.repeat(res.scales.astype(np.float32), 32, axis=1)
    k = res.deq.numpy() / np.where(s > 0, s, 1)
    np.testing.assert_array_equal(k, np.round(k))                 # levels k s, k in [-8, 7]
    assert k.min() >= -8 and k.max() <= 7
    assert bool((np.abs(res.deq.numpy() - w.numpy()) <= s / 2).all())


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("speedq")
    return hf_tiny.make_llava(d / "hf", vision="clip", text="llama", vision_layers=2), d


def test_adaround_lowers_the_block_output_error(llava):
    import transformers

    from edgevlm.export.calib_data import load_calib
    from edgevlm.export.lazy import capture_block_inputs
    from edgevlm.export.source import open_source
    from edgevlm.export.speedq import _call
    from edgevlm.export.speedq_adaround import AdaRoundConfig, adaround_block
    from edgevlm.export.speedq_llava import adapter_for

    src, _ = llava
    source = open_source(src)
    model = transformers.LlavaForConditionalGeneration.from_pretrained(src, dtype=torch.float32).eval()
    ad = adapter_for(model, source)
    pv = ad.pixels(load_calib(None, n_images=8, n_texts=1))
    (_, block), = ad.vision_blocks()[:1]
    xs = [capture_block_inputs(lambda s=s: ad.vision_tower(pixel_values=pv[s:s + 4]), block) for s in (0, 4)]
    w0 = {n: m.weight.detach().clone() for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    with torch.no_grad():
        targets = [_call(block, x) for x in xs]
    res, e_rtn, e_ada = adaround_block(block, _call, xs, targets, lambda n, w: ("q2", 32),
                                       AdaRoundConfig(iters=150, batch=4))
    assert e_ada < 0.9 * e_rtn, (e_rtn, e_ada)
    for name, r in res.items():
        lin = block.get_submodule(name)
        assert torch.equal(lin.weight.data, r.deq)              # the block now holds the file's values
        np.testing.assert_array_equal(qtypes.get("q2").dequantize(r.pack(), *r.codes.shape, 32), r.deq.numpy())
        rtn_codes = qtypes.get("q2").quantize(w0[name].numpy(), 32).codes
        assert (r.codes != rtn_codes).any()                      # the rounding was learned, not RTN's


def _export(src, out, **kw):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return run_export(src, out, ExportConfig(method="speedq", **{**FAST, **kw}), keep_fake_quant=True)


def _stage3_loss(path, src, n_calib: int = 8) -> float:
    """The stage-3 objective (CAKLD with the teacher's gamma + label-smoothed CE) of the file's
    model against the fp model, summed over the training batches of the export's calibration set."""
    import transformers

    from edgevlm.export.calib_data import load_calib
    from edgevlm.export.evaluate import load_into_model
    from edgevlm.export.source import open_source
    from edgevlm.export.speedq import LABEL_SMOOTHING, SpeedQConfig, _ce, cakld, teacher_confidence
    from edgevlm.export.speedq_llava import adapter_for

    source = open_source(src)
    calib = load_calib(None, n_images=n_calib, n_texts=n_calib)
    fp = adapter_for(transformers.LlavaForConditionalGeneration.from_pretrained(src, dtype=torch.float32).eval(),
                     source)
    qm = adapter_for(load_into_model(path, src).eval(), source)
    total = 0.0
    with torch.no_grad():
        pv = fp.pixels(calib)
        f_fp, f_q = fp.features(pv), qm.features(pv)
        batches = fp.batches(calib, 4)
        gamma = teacher_confidence(fp, batches, f_fp, SpeedQConfig())
        for b in batches:
            sel = (lambda f: f[b.images] if b.images else None)
            s = qm.logits(b, sel(f_q))
            total += float(cakld(s, fp.logits(b, sel(f_fp)), b.labels, gamma) + _ce(s, b.labels, LABEL_SMOOTHING))
    return total


def test_export_writes_q2b_equal_to_the_qat_model_and_qat_lowers_the_loss(llava):
    from edgevlm.export.evaluate import dequantized_state_dict, load_into_model
    from edgevlm.export.golden import synthetic_images
    from edgevlm.runtime.vlm import Runtime

    src, d = llava
    paper = dict(speedq_init="rtn", speedq_val=0.0, speedq_gen=0)   # SPEED-Q's own recipe
    rep0 = _export(src, d / "s0.evlm", bits=2, speedq_steps=0, **paper)
    rep = _export(src, d / "s2.evlm", bits=2, speedq_steps=60, speedq_lr=1e-3, **paper)
    path = rep.path
    with fmt.open(path) as f:
        recs = f.records
        lm = [r for n, r in recs.items() if n.startswith("text.blocks.") and r.quantized]
        assert lm and all(r.qtype == "q2b" and r.group_size == 16 for r in lm)
        assert recs["lm_head.weight"].qtype == "q4" and recs["text.embed.tok"].qtype == "q4"
        assert recs["projector.fc1.weight"].qtype == "f16"
        assert {recs[n].qtype for n in recs if n.startswith("vision.blocks.") and recs[n].quantized} == {"q2"}
        assert f.metadata["quantization"]["speedq"]["steps"] == 60
        for r in lm:   # the file dequantizes to the QAT forward's fake-quantized weights, bit for bit
            deq = qtypes.get("q2b").dequantize(np.asarray(f[r.name]).reshape(-1), *r.shape)
            np.testing.assert_array_equal(deq, rep.fake_quant[r.name])
    # QAT lowered its objective on the training data (steps=0: the same pipeline without QAT steps)
    assert _stage3_loss(path, src) < _stage3_loss(rep0.path, src)
    # runtime (reference kernels) == transformers running the file's weights
    sd = dequantized_state_dict(path)
    model = load_into_model(path, src).eval()
    assert torch.equal(model.model.language_model.layers[0].mlp.down_proj.weight,
                       torch.from_numpy(sd["model.language_model.layers.0.mlp.down_proj.weight"]))
    rt = Runtime.load(path, isa="ref")
    img = synthetic_images()[0]
    p = rt.prepare("<image>\nDescribe the image.", [img])
    ids = torch.from_numpy(p.input_ids)[None]
    with torch.no_grad():
        ref = model(input_ids=ids, pixel_values=torch.from_numpy(rt.vision.preprocessor([img]))).logits[0].numpy()
    assert np.abs(rt.logits(p) - ref).max() < 1e-4


def test_qat_from_the_gptq_start_keeps_its_grid_and_lowers_the_loss(llava):
    """Default init: GPTQ on the q2b grid (0 steps), then QAT on that frozen grid with teacher
    samples: the file keeps the start's grid (zeros, scale codes, level-2 params) and changes
    only codes, equals the QAT forward bit for bit, and lowers the stage-3 objective."""
    src, d = llava
    g0 = _export(src, d / "g0.evlm", bits=2, speedq_steps=0, speedq_lr=1e-3, speedq_val=0.0)   # same stage 2
    g1 = _export(src, d / "g1.evlm", bits=2, speedq_steps=40, speedq_lr=1e-3, speedq_val=0.0, speedq_gen=1)
    q2b = qtypes.q2b
    moved = 0
    with fmt.open(g0.path) as f0, fmt.open(g1.path) as f1:
        lm = [r for n, r in f1.records.items() if n.startswith("text.blocks.") and r.quantized]
        assert lm and all(r.qtype == "q2b" for r in lm)
        assert f1.metadata["quantization"]["speedq"]["init"] == "gptq"
        for r in lm:
            n, k = r.shape
            p0, p1 = (q2b.unpack(np.asarray(f[r.name]).reshape(-1), n, k) for f in (f0, f1))
            for a, b in zip(p0[1:], p1[1:]):          # zeros, scale codes, d, m: the frozen grid
                np.testing.assert_array_equal(a, b)
            moved += int((p0.codes != p1.codes).sum())
            np.testing.assert_array_equal(q2b.dequantize(np.asarray(f1[r.name]).reshape(-1), n, k),
                                          g1.fake_quant[r.name])
    assert moved > 0
    assert _stage3_loss(g1.path, src) < _stage3_loss(g0.path, src)


def test_early_stopping_keeps_the_best_held_out_weights():
    """_loop restores the params with the lowest held-out score (step 0 included)."""
    from edgevlm.export.speedq import SpeedQConfig, _loop

    cfg = SpeedQConfig(lr=0.05, warmup=0.0, grad_clip=0.0, eval_every=5, progress=False)
    p = torch.nn.Parameter(torch.zeros(3))
    target = torch.tensor([1.0, -1.0, 2.0])
    train = lambda b: ((p - target) ** 2).sum()   # noqa: E731 - pulls p to target
    # held-out optimum at 0 (the start): training only makes it worse -> step 0 kept exactly
    _loop(40, [torch.zeros(1)], train, [p], cfg, "t", lambda s: None, val_fn=lambda: float((p.detach() ** 2).sum()))
    assert torch.equal(p.detach(), torch.zeros(3))
    # held-out optimum half-way: the kept value is an evaluated point nearer to it than start or end
    half = target / 2
    seen = []

    def val():
        seen.append(p.detach().clone())
        return float(((p.detach() - half) ** 2).sum())
    _loop(40, [torch.zeros(1)], train, [p], cfg, "t", lambda s: None, val_fn=val)
    best = min(seen, key=lambda v: float(((v - half) ** 2).sum()))
    assert torch.equal(p.detach(), best) and len(seen) == 9       # steps 0, 5, ..., 40
    assert float(((best - half) ** 2).sum()) < min(float((half ** 2).sum()), float(((seen[-1] - half) ** 2).sum()))


def test_calibration_split_and_teacher_samples(llava):
    import transformers

    from edgevlm.export.calib_data import load_calib
    from edgevlm.export.source import open_source
    from edgevlm.export.speedq import split_calib
    from edgevlm.export.speedq_llava import adapter_for

    calib = load_calib(None, n_images=8, n_texts=8)
    tr, va = split_calib(calib, 0.25, seed=0)
    assert (len(tr.images), len(va.images), len(tr.texts), len(va.texts)) == (6, 2, 6, 2)
    assert not set(tr.texts) & set(va.texts) and not {id(i) for i in tr.images} & {id(i) for i in va.images}
    assert split_calib(calib, 0.0, 0) == (calib, None)
    src, _ = llava
    source = open_source(src)
    ad = adapter_for(transformers.LlavaForConditionalGeneration.from_pretrained(src, dtype=torch.float32).eval(),
                     source)
    with torch.no_grad():
        feats = ad.features(ad.pixels(tr))
        for b in ad.batches(tr, 4):
            s = ad.sample(b, feats[b.images] if b.images else None, torch.Generator().manual_seed(0))
            assert s.images == b.images
            for r in range(len(b.ids)):
                n0, n1 = int(b.mask[r].sum()), int(s.mask[r].sum())
                orig, new = b.ids[r, :n0].tolist(), s.ids[r, :n1].tolist()
                assert new.count(ad.image_id) == orig.count(ad.image_id)   # no sampled image tokens
                first = max((i + 1 for i, t in enumerate(orig) if t == ad.image_id), default=1)
                keep = next(i for i in range(n1 + 1) if i == n1 or i >= n0 or new[i] != orig[i])
                assert keep >= first and n1 <= n0 and n1 >= keep   # a kept prefix, then samples
            assert torch.equal(s.labels == -100, (s.mask == 0) | (s.ids == ad.image_id))


def test_4bit_export_is_q4_everywhere_but_the_projector(tmp_path):
    """The 4-bit recipe on SigLIP + Qwen2 with a tied head: one q4 table serves as both."""
    src = hf_tiny.make_llava(tmp_path / "hf", vision="siglip", text="qwen2", tie=True)
    rep = _export(src, tmp_path / "s4.evlm", bits=4, speedq_steps=3)
    with fmt.open(rep.path) as f:
        for name, r in f.records.items():
            if r.quantized:
                assert (r.qtype, r.group_size) == ("q4", 32), name
                deq = qtypes.get("q4").dequantize(np.asarray(f[name]).reshape(-1), *r.shape, 32)
                np.testing.assert_array_equal(deq, rep.fake_quant[name])
        assert "lm_head.weight" not in f.records and f.records["text.embed.tok"].qtype == "q4"
        assert {f.records[n].qtype for n in f.records if n.startswith("projector.") and n.endswith("weight")} == {"f16"}


@pytest.mark.parametrize("kw,match", [
    (dict(bits=3), "bits must be 2 or 4"),
    (dict(bits=8), "bits must be 2 or 4"),
    (dict(bits=2, text_bits=4), "text_bits must be unset or 2"),
    (dict(bits=2, speedq_steps=-1), "speedq_steps must be a non-negative integer"),
    (dict(bits=2, speedq_lr=0.0), r"speedq_lr must be in \(0, 1\]"),
    (dict(bits=2, speedq_device=""), "speedq_device must be a torch device string"),
    (dict(bits=2, speedq_init="awq"), "speedq_init must be one of gptq, rtn"),
    (dict(bits=2, speedq_val=0.75), r"speedq_val must be a fraction in \[0, 0.5\]"),
    (dict(bits=2, speedq_eval_every=0), "speedq_eval_every must be an integer >= 1"),
    (dict(bits=2, speedq_gen=-1), "speedq_gen must be an integer >= 0"),
])
def test_bad_settings_are_value_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        ExportConfig(method="speedq", **kw)


def test_unsupported_family_is_a_clear_error(tmp_path):
    src = hf_tiny.make_clip(tmp_path / "clip")
    with pytest.raises(ValueError, match="speedq supports LlavaForConditionalGeneration"):
        _export(src, tmp_path / "c.evlm", bits=2)
