"""Peak-memory structure of generation (issue 5's "peak RSS <= 1.2 x file + KV cache"):

- ``layers.encoder_layer_`` (in-place encoder layer, MLP in row blocks) equals ``dual._Block``
  for odd sizes, row blocks that do not divide the rows, padded keys, dense and packed weights;
- ``layers.silu_`` is bitwise ``silu``;
- ``Idefics3ImagePreprocessor.normalize`` (lookup table, written into the batch) is bitwise the
  float64-rescale + float32-normalize formula, into strided (padded) outputs too;
- ``memory.FilePages`` unmaps exactly the selected tensors' whole pages (the rest stays mapped, the
  data reads back unchanged) and never touches memory that is not a file mapping;
- ``Runtime(release_vision=True)`` (the default) gives the same image features, logits and
  tokens as ``release_vision=False`` while leaving no vision page mapped after ``prepare``, and
  ``Decoder.forward`` leaves the caller's embeddings unchanged (its residual stream is in place).
"""

from __future__ import annotations

import contextlib
import io
import os

import numpy as np
import pytest

from edgevlm import _core
from edgevlm import format as fmt
from edgevlm.runtime.dual import _Block
from edgevlm.runtime.idefics3_preprocess import Idefics3ImagePreprocessor
from edgevlm.runtime.layers import Linear, encoder_layer_, gelu_tanh, silu, silu_
from edgevlm.runtime.linear import QuantLinear
from edgevlm.runtime.memory import PAGE, FilePages, _mapping_of

F32 = np.float32
HAVE_PAGEMAP = os.path.exists("/proc/self/pagemap")


def _present_pages(a: np.ndarray) -> np.ndarray:
    """bool per page of array ``a``'s memory: mapped and present in this process (pagemap bit 63)."""
    addr = a.__array_interface__["data"][0]
    first, last = addr // PAGE, (addr + a.nbytes - 1) // PAGE
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(first * 8)
        e = np.frombuffer(f.read((last - first + 1) * 8), dtype="<u8")
    return (e >> np.uint64(63)).astype(bool)


def _mapped_pages(f, pages: FilePages) -> int:
    """How many pages of ``pages``' ranges are mapped and present in this process."""
    view = f[next(iter(f.records))]
    mm, off = _mapping_of(view)
    base = view.__array_interface__["data"][0] - off
    span = np.frombuffer(mm, dtype=np.uint8)                 # the whole mapping (no page touched)
    assert span.__array_interface__["data"][0] == base
    return sum(int(_present_pages(span[o:o + n]).sum()) for o, n in pages.ranges)


# ------------------------------------------------------------------------- encoder layer

def _block(rng, d: int, inner: int, heads: int, packed: bool) -> _Block:
    def lin(n, k):
        w = (rng.standard_normal((n, k)) / np.sqrt(k)).astype(F32)
        b = (0.1 * rng.standard_normal(n)).astype(F32)
        if packed:  # q8 blob through the C++ kernels (this CPU's ISA: int8 activations)
            return Linear(quant=QuantLinear(_core.quantize(w, "q8", 32), "q8", n, k, 32, b))
        return Linear(weight=w, bias=b)

    norm = lambda: (1 + 0.1 * rng.standard_normal(d)).astype(F32)  # noqa: E731
    return _Block(norm(), norm(), lin(d, d), lin(d, d), lin(d, d), lin(d, d), norm(), norm(),
                  lin(inner, d), lin(d, inner), heads, 1e-6, gelu_tanh)


@pytest.mark.parametrize("packed", [False, True])
def test_encoder_layer_in_place_equals_the_block(rng, packed):
    """Row blocks of 1, 5, 16 (none divides 2 x 37 = 74 rows), 74 and more: the same result as the
    unblocked layer.  Every op is row-wise except attention, which always sees all keys, so only
    the GEMMs' accumulation order may differ (gemm vs per-row gemv for a short tail block): a dot
    product of K <= 96 terms in fp32 moves by <= K * 2^-24 * sum|a b| ~ 6e-6 of its magnitude;
    two residual layers of such terms stay below 1e-5 of max|y| (measured: 0 for blocks of >= 5 rows;
    rows=1, the per-row GEMV, 2.8e-7 dense and 3.4e-6 packed)."""
    d, inner, heads, t = 64, 96, 4, 37
    blk = _block(rng, d, inner, heads, packed)
    x = rng.standard_normal((2, t, d)).astype(F32)
    km = np.ones((2, t), dtype=bool)
    km[1, 29:] = False                                       # frame 1: its last 8 patches are padding
    want = blk(x, key_mask=km)
    for rows in (1, 5, 16, 74, 1000):
        got = x.copy()
        out = encoder_layer_(blk, got, key_mask=km, rows=rows)
        assert out is got                                     # in place
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max(), err_msg=f"rows={rows}")


def test_encoder_layer_rejects_arrays_it_cannot_update(rng):
    blk = _block(rng, 64, 96, 4, packed=False)
    x = rng.standard_normal((1, 9, 64)).astype(F32)
    with pytest.raises(ValueError, match="writable C-contiguous float32"):
        encoder_layer_(blk, x.astype(np.float64))
    with pytest.raises(ValueError, match="writable C-contiguous float32"):
        encoder_layer_(blk, np.asfortranarray(x[0])[None])
    with pytest.raises(ValueError, match="rows must be >= 1"):
        encoder_layer_(blk, x, rows=0)


def test_silu_in_place_is_bitwise_silu(rng):
    x = (rng.standard_normal((7, 133)) * np.array([1e-3, 1, 30, 100, 1, 1, 1])[:, None]).astype(F32)
    want = silu(x)
    got = x.copy()
    assert silu_(got) is got
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


# ---------------------------------------------------------------------------- preprocessing

@pytest.mark.parametrize("cfg", [{}, {"do_rescale": False}, {"do_normalize": False},
                                 {"image_mean": [0.48, 0.46, 0.41], "image_std": [0.27, 0.26, 0.28],
                                  "rescale_factor": 1 / 255}])
def test_normalize_lookup_is_bitwise_the_formula(rng, cfg):
    pre = Idefics3ImagePreprocessor(cfg)
    frame = rng.integers(0, 256, (23, 41, 3), dtype=np.uint8)
    x = np.moveaxis(frame, -1, 0)                            # the formula the table replaces
    if pre.do_rescale:
        x = (x.astype(np.float64) * pre.rescale_factor).astype(np.float32)
    x = x.astype(np.float32)
    if pre.do_normalize:
        x = (x - pre.image_mean[:, None, None]) / pre.image_std[:, None, None]
    np.testing.assert_array_equal(pre.normalize(frame).view(np.uint32), x.view(np.uint32))
    batch = np.zeros((2, 3, 30, 50), F32)                    # padded slot: a strided output
    pre.normalize(frame, out=batch[1, :, :23, :41])
    np.testing.assert_array_equal(batch[1, :, :23, :41].view(np.uint32), x.view(np.uint32))
    assert not batch[1, :, 23:].any() and not batch[1, :, :, 41:].any() and not batch[0].any()


# ------------------------------------------------------------------------------ file pages

def _write(path, rng) -> dict[str, np.ndarray]:
    """An .evlm of raw tensors; sizes chosen so tensors start and end inside pages."""
    arrays = {"text.a": rng.standard_normal(3000).astype(F32),     # 12000 B
              "vision.b": rng.standard_normal(5000).astype(F32),   # 20000 B
              "vision.c": rng.standard_normal(777).astype(F32),
              "projector.d": rng.standard_normal(4321).astype(F32),
              "text.e": rng.standard_normal(4096).astype(F32)}
    fmt.write(path, {"family": "test"}, [fmt.TensorBlob(k, "f32", 32, 0, a.shape, a) for k, a in arrays.items()])
    return arrays


@pytest.mark.skipif(not HAVE_PAGEMAP, reason="needs /proc/self/pagemap (Linux)")
def test_file_pages_drop_exactly_the_selected_whole_pages(tmp_path, rng):
    arrays = _write(tmp_path / "m.evlm", rng)
    with fmt.open(tmp_path / "m.evlm") as f:
        pages = FilePages(f, lambda n: n.startswith(("vision.", "projector.")))
        assert pages.supported
        mm, start = _mapping_of(f["vision.b"])
        base = f["vision.b"].__array_interface__["data"][0] - start   # the mapping's address
        end = _mapping_of(f["projector.d"])[1] + f["projector.d"].nbytes
        # one range over the three adjacent tensors (64-byte padding between them), rounded inwards
        first = -(-start // PAGE) * PAGE
        assert pages.ranges == [(first, end // PAGE * PAGE - first)]
        for k in arrays:
            assert float(np.asarray(f[k]).sum()) == pytest.approx(float(arrays[k].sum()), rel=1e-5)  # touch all
        before = {k: _present_pages(f[k]) for k in arrays}
        assert all(p.all() for p in before.values())
        assert pages.release() == pages.nbytes > 0
        for k in arrays:
            a = f[k]
            addr = a.__array_interface__["data"][0]
            page_addr = (addr // PAGE + np.arange(before[k].size)) * PAGE
            inside = np.zeros(before[k].size, dtype=bool)
            for off, n in pages.ranges:
                inside |= (page_addr >= base + off) & (page_addr + PAGE <= base + off + n)
            np.testing.assert_array_equal(_present_pages(a), ~inside, err_msg=k)
        for k in arrays:  # after the checks above: a read maps its neighbours too (fault-around)
            np.testing.assert_array_equal(np.asarray(f[k]), arrays[k])  # back from the page cache
        assert _present_pages(f["vision.b"])[1:-1].all()          # mapped again by the read


def test_file_pages_never_advise_memory_that_is_not_a_file_mapping(rng):
    class InMemory:  # EvlmFile-like, tensors in ordinary (anonymous) memory
        def __init__(self):
            self.data = {"vision.w": rng.standard_normal(50_000).astype(F32)}
            self.records = dict.fromkeys(self.data)

        def __getitem__(self, k):
            return self.data[k]

    f = InMemory()
    keep = f.data["vision.w"].copy()
    pages = FilePages(f, lambda n: True)
    assert not pages.supported and pages.ranges == [] and pages.release() == 0
    np.testing.assert_array_equal(f.data["vision.w"], keep)   # MADV_DONTNEED would have zeroed it


# ----------------------------------------------------------------------------- the runtime

@pytest.mark.torch
@pytest.mark.skipif(not HAVE_PAGEMAP, reason="needs /proc/self/pagemap (Linux)")
def test_runtime_release_vision_changes_memory_not_results(tmp_path, rng):
    pytest.importorskip("torch")
    import hf_tiny_idefics3 as hti
    from PIL import Image

    from edgevlm.export import ExportConfig, export
    from edgevlm.runtime.vlm import Runtime

    src = hti.make_idefics3(tmp_path / "hf", arch="smolvlm")
    path = tmp_path / "q4.evlm"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        export(src, path, ExportConfig(method="rtn", bits=4, n_calib=2, progress=False))
    imgs = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((90, 130), (64, 40))]
    outs = {}
    for release in (False, True):
        with Runtime.load(path, release_vision=release) as rt:
            text = rt.format("What is it?", 1)
            got = []
            for img in imgs + imgs[:1]:                       # the third image re-faults the dropped pages
                p = rt.prepare(text, [img])
                mapped = _mapped_pages(rt.file, rt._vision_pages)
                assert rt._vision_pages.nbytes >= 4 * PAGE            # the check below has pages to see
                assert (mapped == 0) == release, f"release_vision={release}: {mapped} vision pages mapped"
                x = rt._embed(p)
                x0 = x.copy()
                logits = rt.decoder.forward(x, rt.decoder.new_cache(p.input_ids.size), all_logits=True)
                np.testing.assert_array_equal(x, x0)           # forward works on its own copy
                got.append((p.image_features, logits, rt.generate_ids(p, 6)))
            outs[release] = got
    for (f0, l0, t0), (f1, l1, t1) in zip(outs[False], outs[True]):
        np.testing.assert_array_equal(f0, f1)
        np.testing.assert_array_equal(l0, l1)
        assert t0 == t1
    np.testing.assert_array_equal(outs[True][0][0], outs[True][2][0])  # same image, after re-faulting
