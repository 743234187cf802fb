"""Block reconstruction (export/blockrecon.py): after GPTQ fixes a block's codes, Adam tunes its
group scales/mins on the block-output error.  On a tiny random BERT: the codes stay GPTQ's, the
block's calibration error drops below plain GPTQ's, the file holds exactly the fake-quantized
weights, and bad settings are refused."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import hf_tiny  # noqa: E402

from edgevlm import format as fmt  # noqa: E402
from edgevlm import qtypes  # noqa: E402
from edgevlm.cli import main as cli_main  # noqa: E402
from edgevlm.export import ExportConfig  # noqa: E402
from edgevlm.export.calib_data import load_calib  # noqa: E402
from edgevlm.export.evaluate import dequantized_state_dict  # noqa: E402
from edgevlm.export.pipeline import run_export  # noqa: E402
from edgevlm.export.evaluate import record_f32  # noqa: E402

pytestmark = [pytest.mark.torch, pytest.mark.usefixtures("quiet_torch_one_thread")]
N_CALIB = 16
BASE = dict(method="gptq", bits=3, group=128, n_calib=N_CALIB, progress=False)
REFINE = dict(block_refine=True, block_refine_steps=40, block_refine_lr=3e-3)


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    # hidden 128 / intermediate 256: every linear has whole 128-groups (q3, one or two per row)
    return hf_tiny.make_bert(tmp_path_factory.mktemp("bert") / "m", layers=2, hidden=128, intermediate=256)


@pytest.fixture(scope="module")
def exports(bert, tmp_path_factory):
    d = tmp_path_factory.mktemp("out")
    plain = run_export(bert, d / "plain.evlm", ExportConfig(**BASE), keep_fake_quant=True, log=lambda s: None)
    tuned = run_export(bert, d / "tuned.evlm", ExportConfig(**BASE, **REFINE), keep_fake_quant=True,
                       log=lambda s: None)
    return plain, tuned


def _records(path) -> dict:
    """{record name: (record, raw blob)} of the linear weights."""
    with fmt.open(path) as f:
        return {n: (r, np.array(f[n])) for n, r in f.records.items()
                if isinstance(r.extra, dict) and r.extra.get("kind") == "linear"}


def _layer0_outputs(bert, sd: dict) -> torch.Tensor:
    """Output of encoder block 0 [B, T, D] on the export's calibration texts, for the fp32
    source model with every parameter in ``sd`` (name -> array) replaced."""
    from transformers import AutoTokenizer, BertModel

    model = BertModel.from_pretrained(bert, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in sd:
                p.copy_(torch.from_numpy(sd[name]))
    texts = list(load_calib(None, n_images=N_CALIB, n_texts=N_CALIB, seed=0).texts)
    enc = AutoTokenizer.from_pretrained(bert)(texts, padding="longest", truncation=True, max_length=64,
                                              return_tensors="pt")
    with torch.no_grad():
        h = model(**enc, output_hidden_states=True).hidden_states[1]
    return h * enc["attention_mask"].unsqueeze(-1)   # padding rows excluded, as in the refiner's loss


def test_codes_frozen_and_block_error_below_gptq(bert, exports):
    """Block 0 sees the same inputs in both exports, so GPTQ gives it the same codes; the refined
    export keeps those codes (only scales/mins move) and its block-0 output on the calibration
    texts is closer to the full-precision block's (same, file-held, embeddings) than GPTQ's."""
    plain, tuned = exports
    a, b = _records(plain.path), _records(tuned.path)
    assert a.keys() == b.keys() and a
    moved = 0
    for name, (ra, blob_a) in a.items():
        rb, blob_b = b[name]
        assert rb.extra["method"].endswith("+br") and 0 < rb.extra["block_refine"]["loss_ratio"] < 1, name
        if ".blocks.0." not in name:
            continue
        qt = qtypes.get(ra.qtype)
        ua, ub = (qt.unpack(x.reshape(-1), *ra.shape, ra.group_size) for x in (blob_a, blob_b))
        assert np.array_equal(ua.codes, ub.codes), name
        moved += int((ua.scales != ub.scales).sum() + (ua.mins != ub.mins).sum())
    assert moved > 0
    sd_plain, sd_tuned = dequantized_state_dict(plain.path), dequantized_state_dict(tuned.path)
    emb = {k: v for k, v in sd_plain.items() if k.startswith("embeddings.")}
    assert all(np.array_equal(v, sd_tuned[k]) for k, v in emb.items())
    ref = _layer0_outputs(bert, emb)
    block0 = lambda sd: {k: v for k, v in sd.items() if k.startswith(("embeddings.", "encoder.layer.0."))}  # noqa: E731
    err_plain = float(((_layer0_outputs(bert, block0(sd_plain)) - ref) ** 2).sum())
    err_tuned = float(((_layer0_outputs(bert, block0(sd_tuned)) - ref) ** 2).sum())
    assert err_tuned < err_plain, (err_tuned, err_plain)


def _assert_file_holds_fake_quant(rep) -> None:
    with fmt.open(rep.path) as f:
        for name in f.records:
            if name != "tokenizer.json":
                assert np.array_equal(record_f32(f, name), rep.fake_quant[name]), name


def test_file_holds_the_fake_quant_weights(exports):
    """Every record of the refined export dequantizes bit for bit to the value the calibration
    ran with (tuned params rounded to float16 before the final check)."""
    _, tuned = exports
    _assert_file_holds_fake_quant(tuned)
    with fmt.open(tuned.path) as f:
        assert f.metadata["quantization"]["block_refine"] == {"steps": 40, "lr": 3e-3, "vectors": False}


def test_vectors_are_tuned_and_stored_exactly(bert, tmp_path):
    """block_refine_vectors: block 0's norm/bias vectors move off the checkpoint's values, and the
    file holds exactly what the calibration ran with."""
    from safetensors.numpy import load_file

    rep = run_export(bert, tmp_path / "v.evlm", ExportConfig(**BASE, **REFINE, block_refine_vectors=True),
                     keep_fake_quant=True, log=lambda s: None)
    _assert_file_holds_fake_quant(rep)
    sd = dequantized_state_dict(rep.path)
    orig = load_file(str(bert / "model.safetensors"))
    vec = [k for k in sd if k.startswith("encoder.layer.0.") and k.endswith((".bias", "LayerNorm.weight"))]
    assert vec and all(k in orig for k in vec)
    assert sum(not np.array_equal(sd[k], orig[k]) for k in vec) == len(vec)


def test_bad_settings():
    with pytest.raises(ValueError, match="needs method=gptq or shq, got method=rtn"):
        ExportConfig(method="rtn", block_refine=True)
    with pytest.raises(ValueError, match="block_refine_steps must be an integer in"):
        ExportConfig(method="gptq", block_refine=True, block_refine_steps=0)
    with pytest.raises(ValueError, match=r"block_refine_lr must be in \(0, 0.1\]"):
        ExportConfig(method="gptq", block_refine=True, block_refine_lr=float("nan"))
    with pytest.raises(ValueError, match=r"block_refine_lr must be in \(0, 0.1\]"):
        ExportConfig(method="gptq", block_refine=True, block_refine_lr=0.5)
    with pytest.raises(ValueError, match="block_refine must be True or False, got 'yes'"):
        ExportConfig(method="gptq", block_refine="yes")
    with pytest.raises(ValueError, match="block_refine_vectors only apply with block_refine=True"):
        ExportConfig(method="gptq", block_refine_vectors=True)


def test_cli_refuses_refine_without_gptq(bert, tmp_path, capsys):
    assert cli_main(["export", str(bert), "-o", str(tmp_path / "x.evlm"), "--method", "rtn", "--block-refine",
                     "-q"]) == 2
    assert "block_refine tunes the group params of GPTQ codes" in capsys.readouterr().err


# ---- moving codes (block_refine_codes) -------------------------------------------------------
CODES = dict(block_refine=True, block_refine_steps=20, block_refine_lr=3e-3, block_refine_codes=20)


def _block0_ratio(path) -> dict[str, float]:
    """{record: loss_ratio} of block 0's refined linears (refined / GPTQ block-0 calibration error)."""
    return {n: r.extra["block_refine"]["loss_ratio"] for n, (r, _) in _records(path).items() if ".blocks.0." in n}


def test_moving_codes_lower_block_error_below_frozen_codes(bert, exports, tmp_path):
    """block_refine_codes: block 0 (same inputs and the same GPTQ solution in every export, so the
    recorded ratios share their denominator) ends with codes that differ from GPTQ's, and a lower
    block-output error than the frozen-code refinement with as many Adam steps (20 + 20 vs 40);
    the file still holds exactly what the calibration ran with."""
    plain, frozen = exports
    rep = run_export(bert, tmp_path / "c.evlm", ExportConfig(**BASE, **CODES), keep_fake_quant=True,
                     log=lambda s: None)
    _assert_file_holds_fake_quant(rep)
    with fmt.open(rep.path) as f:
        assert f.metadata["quantization"]["block_refine"]["codes_steps"] == 20
    a, c = _records(plain.path), _records(rep.path)
    moved = 0
    for name, (ra, blob_a) in a.items():
        if ".blocks.0." not in name:
            continue
        rc, blob_c = c[name]
        assert rc.extra["block_refine"]["kept"], name
        qt = qtypes.get(ra.qtype)
        ua, uc = (qt.unpack(x.reshape(-1), *ra.shape, ra.group_size) for x in (blob_a, blob_c))
        moved += int((ua.codes != uc.codes).sum())
        recorded = rc.extra["block_refine"]["codes_moved"]   # the block's total, on each of its linears
    assert moved > 0 and moved == recorded
    r_frozen, r_codes = _block0_ratio(frozen.path), _block0_ratio(rep.path)
    assert r_codes.keys() == r_frozen.keys() and r_codes
    # one ratio per block (every linear of the block records the block's ratio)
    assert max(r_codes.values()) < min(r_frozen.values()), (r_codes, r_frozen)


def test_sign_codes_start_at_gptq_and_stay_on_the_grid():
    """The learned rounding starts at the given codes whatever the fp position (inside, beyond or
    exactly on GPTQ's cell, a zero scale's nan), moves each code by at most one step toward where
    the gradient points, and never leaves [0, qmax]."""
    from edgevlm.export.signround import SignCodes

    codes = torch.tensor([[0.0, 7.0, 3.0, 3.0, 5.0, 2.0]])
    x = torch.tensor([[-2.0, 9.0, 3.49, 1.0, float("nan"), 2.0]])
    sc = SignCodes(codes, x, 7)
    assert torch.equal(sc.hard(), codes)
    for _ in range(200):   # a loss that wants every code as large as possible
        loss = -(sc.codes() * torch.arange(1.0, 7.0)).sum()
        loss.backward()
        sc.step(0.01)
    assert torch.equal(sc.hard(), torch.tensor([[1.0, 7.0, 4.0, 4.0, 6.0, 3.0]]))
    with pytest.raises(ValueError, match="same shape"):
        SignCodes(codes, x[:, :3], 7)


def test_bad_codes_settings():
    with pytest.raises(ValueError, match=r"block_refine_codes must be an integer in \[0, 100000\]"):
        ExportConfig(method="gptq", block_refine=True, block_refine_codes=-1)
    with pytest.raises(ValueError, match="block_refine_codes only apply with block_refine=True"):
        ExportConfig(method="gptq", block_refine_codes=10)
