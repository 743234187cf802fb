"""Activation-aware scaling (edgevlm/export/awq.py): every declared fold is exact on the real
transformers layers of each family, the search lowers the block-output quantization error, and an
awq export round-trips through the file, the evaluate path and the numpy runtime."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import hf_tiny  # noqa: E402

from edgevlm import format as fmt  # noqa: E402
from edgevlm.export import ExportConfig  # noqa: E402
from edgevlm.export.awq import LAYOUTS, ScaleSearch, fold, foldable, layout_for  # noqa: E402
from edgevlm.export.calibrate import Batch  # noqa: E402
from edgevlm.export.evaluate import load_into_model, record_f32  # noqa: E402
from edgevlm.export.lazy import call_block  # noqa: E402
from edgevlm.export.pipeline import run_export  # noqa: E402
from edgevlm.export.quantize import rtn  # noqa: E402

pytestmark = pytest.mark.torch


@pytest.fixture(autouse=True)
def _one_thread(torch_one_thread):
    yield


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Random norm weights/biases and linear biases: folds into identity norms would prove little."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if name.endswith("weight") else 0.0))


def _models():
    """(family, model, inputs) for a tiny model of each declared layout, as transformers builds it."""
    T = transformers
    ids = torch.randint(5, 90, (2, 11), generator=torch.Generator().manual_seed(0))
    am = torch.ones_like(ids)
    am[1, 7:] = 0
    px = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    out = [("bert", T.BertModel(T.BertConfig(vocab_size=96, **common)), dict(input_ids=ids, attention_mask=am)),
           ("clip", T.CLIPVisionModel(T.CLIPVisionConfig(image_size=32, patch_size=8, **common)),
            dict(pixel_values=px)),
           ("siglip", T.SiglipVisionModel(T.SiglipVisionConfig(image_size=32, patch_size=8, **common)),
            dict(pixel_values=px))]
    for fam, cls, cfg_cls in (("llama", T.LlamaModel, T.LlamaConfig), ("qwen2", T.Qwen2Model, T.Qwen2Config)):
        for kv in (4, 2):   # kv 2 < 4 heads: GQA, where v -> o is not foldable
            cfg = cfg_cls(vocab_size=96, num_key_value_heads=kv, **common)
            out.append((f"{fam}-kv{kv}", cls(cfg), dict(input_ids=ids, attention_mask=am)))
    return out


def _hidden(model, kw) -> torch.Tensor:
    with torch.no_grad():
        return model(**kw).last_hidden_state


def _blocks(model) -> list[torch.nn.Module]:
    for path in ("encoder.layer", "encoder.layers", "vision_model.encoder.layers", "layers"):
        try:
            return list(model.get_submodule(path))
        except AttributeError:
            continue
    raise AssertionError(f"no blocks in {type(model).__name__}")


@pytest.mark.parametrize("i", range(7))
def test_folds_are_exact(i):
    """Folding random scales s in [0.1, 10] into every foldable group of every block leaves the
    model's output unchanged up to float32 rounding (each element goes through a few extra
    multiplications by s and 1/s: relative error a few ulp, times the depth)."""
    fam, model, kw = _models()[i]
    torch.manual_seed(0)
    _perturb(model, i)
    model.eval()
    ref = _hidden(model, kw)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(2)
    n_folds = 0
    for blk in _blocks(model):
        lay = layout_for(blk)
        assert lay is not None and fam.split("-")[0] in lay.families, (fam, lay)
        for grp in lay.groups:
            if not foldable(blk, grp):
                assert fam.endswith("kv2") and grp.name == "o", (fam, grp.name)
                continue
            c = blk.get_submodule(grp.linears[0]).in_features
            s = torch.exp(torch.empty(c).uniform_(np.log(0.1), np.log(10.0), generator=g))
            fold(blk, grp, s)
            n_folds += 1
    want = {"bert": 1, "clip": 3, "siglip": 3}.get(fam, 3 if fam.endswith("kv2") else 4)
    assert n_folds == want * len(_blocks(model))
    got = _hidden(model, kw)
    scale = float(ref.abs().max())
    assert float((got - ref).abs().max()) <= 1e-4 * scale, (fam, float((got - ref).abs().max()), scale)
    # The folds did change the weights (a no-op fold would also pass the check above).
    changed = [n for n, p in model.named_parameters() if not torch.allclose(p.detach(), before[n], rtol=0.1)]
    assert len(changed) >= 2 * n_folds, changed


def test_every_layout_declares_its_families():
    fams = [f for lay in LAYOUTS for f in lay.families]
    assert len(fams) == len(set(fams)) and {"bert", "clip", "siglip", "llama", "qwen2"} <= set(fams)


def _clip_block_with_outliers(seed: int = 0):
    """A CLIP encoder layer and calibration inputs [4, 16, 64] with a few large channels (the
    activation outliers AWQ protects)."""
    T = transformers
    cfg = T.CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=1)
    torch.manual_seed(seed)
    blk = T.models.clip.modeling_clip.CLIPEncoderLayer(cfg).eval()
    _perturb(blk, seed)
    with torch.no_grad():   # outlier channels in what layer_norm1 / layer_norm2 emit
        blk.layer_norm1.weight[:4] *= 20.0
        blk.layer_norm2.weight[60:] *= 20.0
    x = torch.randn(4, 16, 64, generator=torch.Generator().manual_seed(seed))
    return blk, [Batch(x[:2], (None,), {}, None), Batch(x[2:], (None,), {}, None)]


def _fq(canonical: str, w: torch.Tensor) -> torch.Tensor:
    return rtn(w, "q3", 32).deq


def _rtn_block_error(blk, batches, ref) -> float:
    """Block output MSE with every linear plain-RTN q3 g32 (all at once), weights restored after."""
    lin = [m for m in blk.modules() if isinstance(m, torch.nn.Linear)]
    keep = [m.weight.data for m in lin]
    try:
        for m in lin:
            m.weight.data = rtn(m.weight.data, "q3", 32).deq
        return sum(float(((call_block(blk, b.hidden, b.args, b.kwargs) - r) ** 2).sum())
                   for b, r in zip(batches, ref))
    finally:
        for m, w in zip(lin, keep):
            m.weight.data = w


def test_scale_search_lowers_block_output_error():
    blk, batches = _clip_block_with_outliers()
    ref = [call_block(blk, b.hidden, b.args, b.kwargs) for b in batches]
    before = _rtn_block_error(blk, batches, ref)
    folded = ScaleSearch(_fq).run("blk", blk, batches)
    assert {f.group for f in folded} >= {"qkv", "fc1"}, folded
    for f in folded:
        assert 0 < f.ratio < 1 and f.loss < f.loss_plain
    # exact folds: the fp block still computes the same outputs
    for b, r in zip(batches, ref):
        torch.testing.assert_close(call_block(blk, b.hidden, b.args, b.kwargs), r, atol=1e-4, rtol=1e-4)
    after = _rtn_block_error(blk, batches, ref)
    assert after < 0.8 * before, (after, before)


def test_token_weights_reach_the_loss():
    """Zero weight on every token but one: the search optimises that token's error only."""
    blk, batches = _clip_block_with_outliers(1)
    seen = []

    def tw(group, b):
        seen.append(group)
        w = torch.zeros(b.hidden.shape[:2])
        w[0, 3] = 1.0
        return w

    folded = ScaleSearch(_fq, token_weight=tw).run("blk", blk, batches)
    assert set(seen) == {"qkv", "o", "fc1"}
    plain = ScaleSearch(_fq).run("blk", _clip_block_with_outliers(1)[0], batches)
    assert [f.ratio for f in folded] != [f.ratio for f in plain] or not folded
    with pytest.raises(ValueError, match="token weights"):
        ScaleSearch(_fq, token_weight=lambda g, b: torch.ones(3)).run("blk", _clip_block_with_outliers(1)[0], batches)


def test_moe_search_scores_the_quantizer_that_stores_the_experts(tmp_path):
    """With ``clip_quant`` (the exporter's RTN + clip search, which stores the RTN methods'
    weights) the MoE experts' search picks (r, clip) by its own objective, the expert-output error:
    what is stored then scores the least of all candidates, in particular <= plain RTN (r = 0),
    <= RTN with the clip search alone and <= the old pipeline (best r for plain RTN, then stored
    with the unchecked clip search: on trained-moe W3 that doubled the experts' output error)."""
    import copy

    import hf_tiny_qwen3vlmoe as h3

    from edgevlm.export.awq import MOE_LAYOUTS

    src = h3.make_qwen3vlmoe(tmp_path / "hf", mlp_only_layers=(2,))
    model = transformers.Qwen3VLMoeForConditionalGeneration.from_pretrained(str(src), dtype=torch.float32).eval()
    blk = model.model.language_model.layers[0]
    x = torch.randn(4, 24, 64, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.2, 3.0, 64)
    emb = model.model.language_model.rotary_emb(x[:2], torch.arange(24)[None].expand(2, 24))
    batches = [Batch(x[i:i + 2], (), {"position_embeddings": emb, "attention_mask": None}, None) for i in (0, 2)]

    def clip_q(c: str, w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return rtn(w, "q3", 32, clip_search=True, h_diag=h).deq

    grp = MOE_LAYOUTS[0].groups[2]
    ss = ScaleSearch(_fq, clip_quant=clip_q)
    unscaled = copy.deepcopy(blk)   # run() folds the exact qkv scales first: the MoE input is unchanged
    obj = ss.expert_objective("blk", unscaled, grp, batches)
    grid = {r: s for _, r, s in ss._grid(ss._act_stats(unscaled, grp, batches)[0])}
    folded = {f.group: f for f in ss.run("blk", blk, batches)}
    assert {"qkv", "experts"} <= set(folded) and all(f.clip is not None for f in folded.values())
    f = folded["experts"]
    stored = obj(grid[f.ratio], f.clip)
    best = min(obj(s, clip) for s in grid.values() for clip in (False, True))
    s_old = min(grid.values(), key=lambda s: obj(s))                # the old search: plain RTN only
    # float32 RTN of inputs equal up to rounding (the exact qkv fold): relative 1e-6 slack
    assert stored <= best * (1 + 1e-6) and abs(stored - f.loss) <= 1e-6 * f.loss
    assert stored <= min(obj(grid[0.0], False), obj(grid[0.0], True), obj(s_old, True)) * (1 + 1e-6)


def test_config_validation():
    assert ExportConfig(method="awq").effective_awq and ExportConfig(method="awq").effective_clip_search
    assert not ExportConfig(method="gptq").effective_awq and ExportConfig(method="gptq", awq=True).effective_awq
    with pytest.raises(ValueError, match="awq=False"):
        ExportConfig(method="awq", awq=False)
    with pytest.raises(ValueError, match="awq_grid"):
        ExportConfig(awq_grid=1)
    with pytest.raises(ValueError, match="awq must be"):
        ExportConfig(awq="yes")
    with pytest.raises(ValueError, match="refit must be"):
        ExportConfig(refit=True)
    with pytest.raises(ValueError, match="refit must be"):
        ExportConfig(refit=-1)


@pytest.mark.parametrize("kind,method,bits", [("bert", "awq", 4), ("clip", "gptq", 3)])
def test_export_round_trip(kind, method, bits, tmp_path):
    """The file holds exactly the fake-quant weights (folded vectors included), the records say
    awq, and the model loaded back from the file computes (close to) the fp32 model: a fold
    missing from the file (e.g. a divided norm not re-stored) would break that."""
    src = getattr(hf_tiny, f"make_{kind}")(tmp_path / "m")
    refit = int(method == "gptq")   # also the GPTQ group-param refit: still exactly what the file holds
    cfg = ExportConfig(method=method, awq=True, bits=bits, n_calib=8, progress=False, refit=refit)
    rep = run_export(src, tmp_path / "m.evlm", cfg, keep_fake_quant=True, log=lambda s: None)
    scaled = [r.key for r in rep.rows if r.method.startswith("awq+")]
    assert scaled, [r.method for r in rep.rows]
    want = {"awq+gptq+clip+refit"} if refit else {"awq+rtn+clip", "awq+rtn"}   # rtn: the search picks the clip
    assert {r.method for r in rep.rows if r.key in scaled} <= want
    with fmt.open(rep.path) as f:
        assert f.metadata["quantization"]["awq"] is True
        for name, rec in f.records.items():
            if name == "tokenizer.json":
                continue
            assert np.array_equal(record_f32(f, name), rep.fake_quant[name]), name
            if name in scaled:   # ratio 0: searched, not scaled (its clip choice is recorded)
                assert 0 <= rec.extra["awq"]["ratio"] < 1
                if "clip" in rec.extra["awq"]:
                    assert rec.extra["awq"]["clip"] == rec.extra["method"].endswith("+clip")
    model = load_into_model(rep.path, src)
    ref = getattr(transformers, "BertModel" if kind == "bert" else "CLIPModel").from_pretrained(src).eval()
    if kind == "bert":
        ids = torch.randint(5, 90, (3, 9), generator=torch.Generator().manual_seed(0))
        kw = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        with torch.no_grad():
            got, want = model(**kw).last_hidden_state, ref(**kw).last_hidden_state
    else:
        px = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            got, want = model.get_image_features(pixel_values=px), ref.get_image_features(pixel_values=px)
        got = getattr(got, "pooler_output", got)
        want = getattr(want, "pooler_output", want)
        from edgevlm.runtime import load_dual

        rt = load_dual(rep.path, isa="ref").encode_pixels(px.numpy())
        hf = torch.nn.functional.normalize(got, dim=-1).numpy()
        assert np.abs(rt - hf).max() <= 1e-4, np.abs(rt - hf).max()   # runtime == the file's weights in HF
    cos = torch.nn.functional.cosine_similarity(got.flatten(1), want.flatten(1)).min()
    assert cos >= 0.9, float(cos)


def test_cli_method_awq(tmp_path, capsys):
    from edgevlm.cli import main as cli_main

    src = hf_tiny.make_clip(tmp_path / "m")
    out = tmp_path / "a.evlm"
    assert cli_main(["export", str(src), "-o", str(out), "--method", "awq", "--bits", "4", "--n-calib", "4",
                     "--awq-grid", "4", "--quiet"]) == 0
    assert "awq+rtn+clip" in capsys.readouterr().err
    with fmt.open(out) as f:
        q = f.metadata["quantization"]
        assert q["method"] == "awq" and q["awq"] is True and q["awq_grid"] == 4
    assert cli_main(["export", str(src), "-o", str(out), "--method", "awq", "--no-awq", "--quiet"]) == 2
    assert "awq=False" in capsys.readouterr().err
