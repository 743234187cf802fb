"""VEQ (edgevlm/export/veq.py) on the tiny random Qwen3-VL-MoE (tests/hf_tiny_qwen3vlmoe.py: 8
experts, top-2): the modality weights and hooks against their definitions, the properties that
hold by construction or by GPTQ's objective (VEQ-ME's S-weighted expert error <= AWQ-uniform's on
the same grid; VEQ-MA's C-weighted output error below plain GPTQ's, summed over the experts),
and exports that change the packed experts, save the routing statistics, and round-trip: the
runtime with reference kernels equals transformers running the file's own weights."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("skimage.data")

import hf_tiny_qwen3vlmoe as h3  # noqa: E402
from test_qwen3vlmoe import _cases, _hf  # noqa: E402  (prompts with 1, 2 and 0 images; processor inputs)

from edgevlm import format as fmt  # noqa: E402
from edgevlm.export import ExportConfig  # noqa: E402
from edgevlm.export.awq import MOE_LAYOUTS, ScaleSearch, route_capture  # noqa: E402
from edgevlm.export.calibrate import Batch  # noqa: E402
from edgevlm.export.evaluate import load_into_model  # noqa: E402
from edgevlm.export.pipeline import run_export  # noqa: E402
from edgevlm.export.quantize import Hessian, gptq, output_error, rtn  # noqa: E402
from edgevlm.export.veq import VeqMA, VeqME, modality_weights  # noqa: E402

pytestmark = [pytest.mark.torch, pytest.mark.usefixtures("quiet_torch_one_thread")]


def _fq(canonical: str, w: torch.Tensor) -> torch.Tensor:
    return rtn(w, "q3", 32).deq


# --------------------------------------------------------------------------------- hooks
def test_modality_weights_and_hooks_follow_their_definitions():
    assert modality_weights((20, 60)) == (3.0, 1.0)               # text weighs T_img / T_txt
    assert modality_weights((1, 1000)) == (10.0, 1.0)             # clipped to [1, 10]
    assert modality_weights((300, 100)) == (1.0, 1.0)             # text never weighs less than image
    assert modality_weights((50, 0)) == (1.0, 1.0) and modality_weights((5, 9), 2.5) == (2.5, 1.0)
    aff = torch.tensor([0.9, 0.5, 0.2, 0.7])
    img = torch.tensor([True, False, True, False])
    c = VeqMA()("w", torch.zeros(4, 8), aff, img, (20, 60))       # mu(text) = 3
    want = aff.double() * torch.tensor([1.0, 3.0, 1.0, 3.0], dtype=torch.float64)
    torch.testing.assert_close(c.double(), want / want.mean())
    idx = torch.tensor([[0, 1], [1, 2], [0, 3], [1, 0]])          # 4 tokens, top-2 of 4 experts
    me = VeqME(n_experts=5)
    S = me("layer", idx, torch.full((4, 2), 0.5), img)            # 2 image, 2 text tokens: mu = (1, 1)
    counts = torch.tensor([3.0, 3.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(S, counts / counts.mean())
    assert me.importance["layer"] == [round(float(v), 6) for v in S]
    # equal affinities and modality weights: C = I exactly (float32 ones), so H̃ is GPTQ's H
    c1 = VeqMA(text_weight=1.0)("w", torch.zeros(7, 8), torch.full((7,), 0.3), torch.arange(7) % 2 == 0, (3, 4))
    assert torch.equal(c1, torch.ones(7))


class _MoeOnly(torch.nn.Module):
    """A decoder layer's sparse MoE block as a "block" whose modules carry the layer's names."""

    def __init__(self, mlp: torch.nn.Module) -> None:
        super().__init__()
        self.mlp = mlp

    def forward(self, x):
        return self.mlp(x)


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    """(HF folder, fp32 model, MoE block of layer 0, batches [2 x [2, 24, 64]], image masks)."""
    src = h3.make_qwen3vlmoe(tmp_path_factory.mktemp("veq") / "hf", mlp_only_layers=(2,))
    model = transformers.Qwen3VLMoeForConditionalGeneration.from_pretrained(str(src), dtype=torch.float32).eval()
    blk = _MoeOnly(model.model.language_model.layers[0].mlp)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 24, 64, generator=g) * torch.linspace(0.2, 3.0, 64)   # uneven channels
    image = torch.zeros(4, 24, dtype=torch.bool)
    image[:, 2:18] = True                                                   # 16 image, 8 text tokens
    batches = [Batch(x[:2], (), {}, None), Batch(x[2:], (), {}, None)]
    return src, model, blk, batches, [image[:2], image[2:]]


def test_moe_folds_are_exact(moe):
    """Folding random scales s in [0.5, 2] into every foldable group of every decoder layer (MoE:
    post-attention norm / s, router columns and every expert's gate/up columns * s) leaves the
    logits unchanged up to float32 rounding: the router sees the same logits, so routing holds."""
    import copy

    from edgevlm.export.awq import fold, foldable, layout_for

    src, model, *_ = moe
    m2 = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    folded = []
    for layer in m2.model.language_model.layers:
        lay = layout_for(layer)
        for grp in lay.groups:
            if foldable(layer, grp):
                c = layer.get_submodule(grp.prev).weight.shape[0] if grp.prev_kind.value == "norm" else \
                    layer.get_submodule(grp.prev).out_features
                fold(layer, grp, torch.exp(torch.empty(c).uniform_(np.log(0.5), np.log(2.0), generator=g)))
                folded.append(grp.name)
    assert folded.count("experts") == 2 and "o" not in folded     # 2 MoE layers; GQA: v -> o skipped
    ids = torch.randint(5, 200, (1, 12), generator=g)
    with torch.no_grad():
        want, got = model(input_ids=ids).logits, m2(input_ids=ids).logits
    assert float((got - want).abs().max()) <= 1e-4 * float(want.abs().max())


def test_veq_me_weighted_expert_error_is_at_most_awq_uniform(moe):
    """VEQ-ME's r minimises the S-weighted expert-output error over the grid, so that error is <=
    the one at AWQ-uniform's r (same grid, same data)."""
    _, _, blk, batches, images = moe
    g = MOE_LAYOUTS[0].groups[2]
    me = VeqME(text_weight=10.0, n_experts=8)
    ss_me, ss_u = ScaleSearch(_fq, expert_weight=me), ScaleSearch(_fq)
    ss_me.image_masks = ss_u.image_masks = images
    a = ss_u._act_stats(blk, g, batches)[0]
    obj_me = ss_me.expert_objective("blk", blk, g, batches)
    obj_u = ss_u.expert_objective("blk", blk, g, batches)
    grid = [(r, s) for _, r, s in ss_u._grid(a)]
    r_u, s_u = min(grid, key=lambda rs: obj_u(rs[1]))
    r_me, s_me = min(grid, key=lambda rs: obj_me(rs[1]))
    assert obj_me(s_me) <= obj_me(s_u) and obj_u(s_u) <= obj_u(s_me)
    assert 0 < r_u and 0 < r_me                      # both beat plain quantization (r = 0)
    S = torch.tensor(me.importance["blk"])
    assert abs(float(S.mean()) - 1.0) < 1e-5 and float(S.max() / S.min().clamp(min=1e-9)) > 1.5


def test_veq_ma_hessian_lowers_the_affinity_modality_weighted_error(moe):
    """Per expert, GPTQ with H̃ = 2XᵀCX (C = routing weight x modality weight) against plain GPTQ
    on the same routed tokens: different codes, and a lower C-weighted output error
    tr(ΔW H̃ ΔWᵀ) summed over the experts (GPTQ greedily minimises its own Hessian's error, so
    per expert it can lose by a little; the sum is the claim)."""
    _, _, blk, batches, images = moe
    x, idx, w, img = route_capture(blk, batches, images)
    counts = (int((~img).sum()), int(img.sum()))
    gu = blk.mlp.experts.gate_up_proj.data
    err_veq = err_gptq = 0.0
    changed = 0
    for e in range(gu.shape[0]):
        rows, slot = torch.nonzero(idx == e, as_tuple=True)
        if len(rows) < 8:
            continue
        c = VeqMA(text_weight=10.0)("w", x[rows], w[rows, slot], img[rows], counts)
        h, ht = Hessian(64), Hessian(64)
        h.add(x[rows])
        ht.add(x[rows], c)
        H, Ht = h.matrix(), ht.matrix()
        W = gu[e, :96]                                                   # expert e's gate [96, 64]
        plain, veq = gptq(W, H, "q3", 32), gptq(W, Ht, "q3", 32)
        changed += int(not np.array_equal(plain.codes, veq.codes))
        err_gptq += output_error(W, plain.deq, Ht)[0]
        err_veq += output_error(W, veq.deq, Ht)[0]
    assert changed >= 4
    assert err_veq < err_gptq, (err_veq, err_gptq)


# -------------------------------------------------------------------------------- exports
def _export(src, out, **cfg):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return run_export(src, out, ExportConfig(**{"n_calib": 4, "progress": False, "bits": 4, **cfg}),
                          log=lambda s: None).path


@pytest.fixture(scope="module")
def exports(moe, tmp_path_factory):
    src = moe[0]
    d = tmp_path_factory.mktemp("veq-exports")
    # veq-me with an explicit text weight 0.35 (image tokens weigh more; explicit weights are not
    # clipped): these 4 samples hold 2.6 text tokens per image token, so the default weighs both
    # modalities 1, S_i is then each expert's routed-token share, and that (like text weight 2,
    # measured) picks AWQ's scales here; 0.35 moves them. awq and veq-me at 3 bits: the scale
    # search scores the stored quantizer (RTN + clip search, awq.ClipQuant), and at 4 bits on this
    # random model both methods then settle on the same choice (0 of 48 expert matrices differ;
    # at 3 bits 48 of 48 do).
    cfg = {"veq-me": {"veq_text_weight": 0.35, "bits": 3}, "awq": {"bits": 3}}
    return {m: _export(src, d / f"{m}.evlm", method=m, **cfg.get(m, {})) for m in ("gptq", "awq", "veq-ma", "veq-me")}


def _experts(path) -> dict[str, bytes]:
    with fmt.open(path) as f:
        return {k: np.asarray(f[k]).tobytes() for k in f.records if ".moe.experts." in k}


@pytest.mark.parametrize("method,baseline", [("veq-ma", "gptq"), ("veq-me", "awq")])
def test_export_changes_experts_saves_stats_and_runtime_equals_fake_quant_model(moe, exports, method, baseline):
    """Logits of the runtime (reference kernels) and of transformers on the file's dequantized
    weights (experts fused back by evaluate.load_into_model) within 1e-5, as
    tests/test_qwen3vlmoe.py bounds the same comparison, and identical greedy tokens."""
    from edgevlm.runtime.vlm import Runtime

    src, model, *_ = moe
    ours, base = _experts(exports[method]), _experts(exports[baseline])
    assert ours.keys() == base.keys() and sum(ours[k] != base[k] for k in ours) >= len(ours) // 4
    with fmt.open(exports[method]) as f:
        q = f.metadata["quantization"]
        labels = {k.rsplit(".", 2)[1]: r.extra.get("method") for k, r in f.records.items() if ".moe.experts." in k}
    assert q["method"] == method and [s["layer"] for s in q["moe_stats"]] == [0, 1]
    for s in q["moe_stats"]:
        t = np.asarray(s["tokens_text_image"])
        assert t.shape == (8, 2) and t[:, 1].sum() > 0 and t[:, 0].sum() > 0
        if method == "veq-me":
            assert abs(np.mean(s["veq_me_importance"]) - 1.0) < 1e-5
    # veq-me folds the shared scale into every expert's gate/up (down reads act(gate) * up: none)
    assert labels == ({"gate": "gptq+clip", "up": "gptq+clip", "down": "gptq+clip"} if method == "veq-ma" else
                      {"gate": "veq-me+rtn+clip", "up": "veq-me+rtn+clip", "down": "rtn+clip"})
    same = load_into_model(exports[method], src).eval()
    rt = Runtime.load(exports[method], isa="ref")
    proc = h3.processor(src)
    for msgs, images in _cases()[:2]:
        text, enc = _hf(same, proc, msgs, images)
        with torch.no_grad():
            want = same(**enc).logits[0].numpy()
            gen = same.generate(**enc, do_sample=False, max_new_tokens=8)[0, enc["input_ids"].shape[1]:]
        p = rt.prepare(text, images)
        assert np.abs(rt.logits(p) - want).max() < 1e-5
        assert rt.generate_ids(p, max_tokens=8) == gen.tolist()


def test_veq_ma_with_uniform_affinities_and_modality_weights_is_gptq(tmp_path):
    """Top-1 routing makes every routing weight exactly 1 (the router renormalises over one expert)
    and ``veq_text_weight`` 1 gives text and image tokens the same weight, so C = I and each
    expert's H̃ = 2XᵀCX/ΣC is GPTQ's H: the veq-ma file holds the gptq file's bytes, tensor for
    tensor (what differs is only the method in the metadata)."""
    src = h3.make_qwen3vlmoe(tmp_path / "hf", top_k=1, mlp_only_layers=(2,))
    paths = {m: _export(src, tmp_path / f"{m}.evlm", method=m, **kw)
             for m, kw in (("gptq", {}), ("veq-ma", {"veq_text_weight": 1.0}))}
    with fmt.open(paths["gptq"]) as a, fmt.open(paths["veq-ma"]) as b:
        assert a.records.keys() == b.records.keys()
        assert sum(".moe.experts." in k for k in a.records) > 0
        for k in a.records:
            assert np.asarray(a[k]).tobytes() == np.asarray(b[k]).tobytes(), k
        assert b.metadata["quantization"]["method"] == "veq-ma"


def test_config_and_cli(moe, tmp_path, capsys):
    from edgevlm.cli import main as cli_main

    assert ExportConfig(method="veq-me").effective_awq and not ExportConfig(method="veq-ma").effective_awq
    with pytest.raises(ValueError, match="veq_text_weight"):
        ExportConfig(method="gptq", veq_text_weight=2.0)
    with pytest.raises(ValueError, match="veq_text_weight"):
        ExportConfig(method="veq", veq_text_weight=-1.0)
    out = tmp_path / "veq.evlm"
    assert cli_main(["export", str(moe[0]), "-o", str(out), "--method", "veq", "--bits", "4", "--n-calib", "2",
                     "--veq-text-weight", "2", "--quiet"]) == 0
    with fmt.open(out) as f:
        q = f.metadata["quantization"]
        assert q["method"] == "veq" and q["veq_text_weight"] == 2.0 and len(q["moe_stats"]) == 2
