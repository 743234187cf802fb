"""Tests for the .evlm container (edgevlm.format).

The byte layout is restated here on purpose (not imported) so the tests check
the documented format, not whatever the module happens to do.
"""

from __future__ import annotations

import json
import mmap
import struct
import zipfile
import zlib

import numpy as np
import pytest

from edgevlm import format as evf

PREFIX = struct.Struct("<8sIIQQQI20s")  # documented 64-byte prefix
MAGIC = b"EVLM\0\r\n\x1a"


def _blobs() -> list[evf.TensorBlob]:
    rng = np.random.default_rng(0)
    return [
        # Odd sizes (12 B, 3 B, 10 B...) so that without padding the next blob would be misaligned.
        evf.TensorBlob("tok.weight", "f32", 32, 0, (3,), np.array([1.5, -2.0, 3.25], np.float32)),
        evf.TensorBlob("q.packed", "q4", 4, 32, (2, 64), rng.integers(0, 256, 67, dtype=np.uint8),
                       extra={"max_abs_err": 0.01, "note": "ünïcode ✓"}),
        evf.TensorBlob("norm", "f16", 16, 0, (5,), np.arange(5, dtype=np.float16)),
        evf.TensorBlob("bf", "bf16", 16, 0, (2, 3), rng.integers(0, 2**16, (2, 3), dtype=np.uint16)),
        evf.TensorBlob("ids", "i32", 32, 0, (2, 2, 3), np.arange(-6, 6, dtype=np.int32).reshape(2, 2, 3)),
        evf.TensorBlob("bytes", "u8", 8, 0, (7,), np.arange(7, dtype=np.uint8)),
        evf.TensorBlob("scalar", "f32", 32, 0, (), np.array(42.0, np.float32)),
        evf.TensorBlob("empty", "f32", 32, 0, (0, 4), np.zeros((0, 4), np.float32)),
        evf.TensorBlob("q.empty", "q2", 2, 16, (0,), np.zeros(0, np.uint8)),
        evf.TensorBlob("big", "f32", 32, 0, (33, 17), rng.standard_normal((33, 17)).astype(np.float32)),
    ]


META = {"arch": "tiny-vlm", "layers": 2, "rope": {"theta": 1e4, "scaling": None},
        "vocab": ["a", "b"], "name": "模型 ✓", "flags": [True, False], "nested": {"a": {"b": [1, 2.5]}}}


@pytest.fixture
def model(tmp_path):
    path = tmp_path / "m.evlm"
    evf.write(path, META, _blobs())
    return path


def _prefix(path):
    return PREFIX.unpack(path.read_bytes()[:64])


def _set_raw_header(path, new: bytes):
    """Replace the JSON header bytes, moving the data region as needed; store a correct crc."""
    raw = path.read_bytes()
    magic, ver, flags, _, doff, _, _, res = PREFIX.unpack_from(raw)
    data = raw[doff:]
    new_doff = -(-(64 + len(new)) // 64) * 64
    prefix = PREFIX.pack(magic, ver, flags, len(new), new_doff, new_doff + len(data), zlib.crc32(new), res)
    path.write_bytes(prefix + new + bytes(new_doff - 64 - len(new)) + data)


def _rewrite_header(path, mutate):
    """Let mutate(doc) edit the parsed JSON header in place, then store it with a correct crc."""
    hlen = _prefix(path)[3]
    doc = json.loads(path.read_bytes()[64:64 + hlen])
    mutate(doc)
    _set_raw_header(path, json.dumps(doc, ensure_ascii=False).encode())


# --------------------------------------------------------------------------- round trip / layout


def test_round_trip(model):
    blobs = _blobs()
    with evf.open(model) as f:
        assert f.version == 1 and f.metadata == META
        assert list(f) == [b.name for b in blobs] and len(f) == len(blobs) == 10
        assert "norm" in f and "nope" not in f
        for b in blobs:
            arr, rec = f[b.name], f.records[b.name]
            assert (rec.qtype, rec.bits, rec.group_size, rec.shape) == (b.qtype, b.bits, b.group_size, b.shape)
            assert rec.nbytes == b.data.nbytes and rec.extra == b.extra
            assert rec.checksum == "crc32:%08x" % zlib.crc32(b.data.tobytes())
            if rec.quantized:
                assert arr.dtype == np.uint8 and arr.shape == (b.data.nbytes,)
            else:
                assert arr.dtype == b.data.dtype and arr.shape == b.shape
            np.testing.assert_array_equal(arr, b.data)
        assert f.records["q.packed"].extra["note"] == "ünïcode ✓"
        f.verify()
    evf.verify(model)


def test_prefix_layout(model):
    magic, ver, flags, hlen, doff, fsize, crc, res = _prefix(model)
    raw = model.read_bytes()
    assert magic == MAGIC and ver == evf.FORMAT_VERSION == 1 and flags == 0 and res == bytes(20)
    assert fsize == len(raw) and doff % 64 == 0 and 64 + hlen <= doff
    assert crc == zlib.crc32(raw[64:64 + hlen])
    doc = json.loads(raw[64:64 + hlen].decode("utf-8"))
    assert set(doc) == {"format_version", "metadata", "tensors"} and doc["format_version"] == 1
    assert raw[64 + hlen:doff] == bytes(doff - 64 - hlen)
    rec = doc["tensors"][0]
    assert set(rec) == {"name", "qtype", "bits", "group_size", "shape", "offset", "nbytes", "checksum", "extra"}
    # Offsets are relative to data_offset: the blob bytes sit exactly there.
    assert raw[doff + rec["offset"]:doff + rec["offset"] + 12] == np.array([1.5, -2.0, 3.25], np.float32).tobytes()


def test_every_blob_aligned(model):
    with evf.open(model) as f:
        sizes = [r.nbytes for r in f.records.values()]
        assert any(n % 64 for n in sizes), "need unaligned sizes or the test is vacuous"
        for name, rec in f.records.items():
            assert rec.offset % 64 == 0
            assert f[name].__array_interface__["data"][0] % 64 == 0, name


def test_zero_copy_read_only_views(model):
    with evf.open(model) as f:
        _, _, _, _, doff, _, _, _ = _prefix(model)
        for name, rec in f.records.items():
            arr = f[name]
            chain = [arr]
            while isinstance(chain[-1], np.ndarray) and chain[-1].base is not None:
                chain.append(chain[-1].base)
            root, base_arr = chain[-1], chain[-2]
            assert isinstance(root, memoryview) and isinstance(root.obj, mmap.mmap), name
            assert base_arr.shape == (model.stat().st_size,)  # the one whole-file view
            # Address arithmetic: the view points at data_offset + offset inside the mapping.
            start = base_arr.__array_interface__["data"][0]
            if rec.nbytes:  # numpy may not keep the address of an empty slice
                assert arr.__array_interface__["data"][0] - start == doff + rec.offset
            assert not arr.flags.writeable
            with pytest.raises(ValueError):
                arr.setflags(write=True)
        a, b = f["big"], f["big"]
        assert np.shares_memory(a, b)
        with pytest.raises(ValueError):
            a[0, 0] = 1.0
    assert model.read_bytes()[:8] == MAGIC


def test_views_survive_close(model):
    f = evf.open(model)
    big = f["big"]
    f.close()
    f.close()  # idempotent
    np.testing.assert_array_equal(big, _blobs()[-1].data)
    with pytest.raises(ValueError, match="closed"):
        f["big"]


def test_missing_name_keyerror_lists_names(model):
    with evf.open(model) as f:
        with pytest.raises(KeyError, match="nrom") as ei:
            f["nrom"]
        assert "norm" in str(ei.value)


def test_empty_tensor_list(tmp_path):
    p = tmp_path / "e.evlm"
    evf.write(p, {"x": 1}, [])
    with evf.open(p, verify=True) as f:
        assert len(f) == 0 and list(f) == [] and f.metadata == {"x": 1}
    assert _prefix(p)[5] == p.stat().st_size


def test_zero_size_tensors(tmp_path):
    p = tmp_path / "z.evlm"
    evf.write(p, {}, [evf.TensorBlob("e", "f32", 32, 0, (0, 3), np.zeros((0, 3), np.float32)),
                      evf.TensorBlob("q", "q4", 4, 32, (0,), np.zeros(0, np.uint8))])
    with evf.open(p, verify=True) as f:
        assert f["e"].shape == (0, 3) and f["e"].dtype == np.float32
        assert f["q"].shape == (0,) and f.records["q"].nbytes == 0


def test_noncontiguous_and_big_endian_inputs(tmp_path):
    p = tmp_path / "n.evlm"
    t = np.arange(12, dtype=np.float32).reshape(3, 4).T  # (4, 3) F-order view
    be = np.arange(5, dtype=">f4")
    q = np.arange(6, dtype=">u2")  # quantised blob with a multi-byte dtype: stored little-endian
    evf.write(p, {}, [evf.TensorBlob("t", "f32", 32, 0, (4, 3), t),
                      evf.TensorBlob("be", "f32", 32, 0, (5,), be),
                      evf.TensorBlob("q", "q8", 8, 0, (6,), q)])
    with evf.open(p, verify=True) as f:
        np.testing.assert_array_equal(f["t"], t)
        np.testing.assert_array_equal(f["be"], be)
        assert f["q"].tobytes() == np.arange(6, dtype="<u2").tobytes()


def test_chunked_streaming_checksums(tmp_path, monkeypatch):
    monkeypatch.setattr(evf, "_CHUNK", 7)  # many pieces per blob: crc must accumulate across them
    p = tmp_path / "c.evlm"
    evf.write(p, {}, _blobs())
    with evf.open(p, verify=True) as f:
        for b in _blobs():
            np.testing.assert_array_equal(f[b.name], b.data)


def test_progress_and_record_defaults(tmp_path):
    calls = []
    evf.write(tmp_path / "p.evlm", {}, _blobs(), progress=lambda d, t, n: calls.append((d, t, n)))
    total = sum(b.data.nbytes for b in _blobs())
    assert [c[2] for c in calls] == [b.name for b in _blobs()] and calls[-1][:2] == (total, total)
    r1 = evf.TensorRecord("a", "f32", 32, 0, [2], 0, 8, "crc32:00000000")
    r2 = evf.TensorRecord("b", "f32", 32, 0, (2,), 0, 8, "crc32:00000000")
    assert r1.extra == {} and r1.extra is not r2.extra and r1.shape == (2,)
    assert len({r1, r2}) == 2  # hashable despite the dict field
    with pytest.raises(Exception):
        r1.name = "x"


# --------------------------------------------------------------------------- write validation / atomicity


def _no_temp_files(d):
    return [p.name for p in d.iterdir() if p.name.endswith(".tmp")] == []


def test_duplicate_names_rejected(tmp_path):
    b = evf.TensorBlob("w", "u8", 8, 0, (1,), np.zeros(1, np.uint8))
    with pytest.raises(ValueError, match="duplicate.*'w'"):
        evf.write(tmp_path / "d.evlm", {}, [b, b])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("meta, where", [
    ({"a": {"b": [1, np.int64(2)]}}, "metadata['a']['b'][1]"),
    ({"x": float("nan")}, "metadata['x']"),
    ({"s": {1, 2}}, "metadata['s']"),
    ({"k": {3: "v"}}, "non-string key 3"),
])
def test_non_json_metadata_rejected(tmp_path, meta, where):
    with pytest.raises(ValueError, match="JSON") as ei:
        evf.write(tmp_path / "m.evlm", meta, _blobs())
    assert where in str(ei.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("blob, msg", [
    (evf.TensorBlob("w", "f32", 32, 0, (2,), np.zeros(2, np.float64)), "astype"),
    (evf.TensorBlob("w", "f32", 32, 0, (3,), np.zeros(2, np.float32)), "shape"),
    (evf.TensorBlob("w", "f32", 16, 0, (2,), np.zeros(2, np.float32)), "bits"),
    (evf.TensorBlob("w", "f16", 16, 64, (2,), np.zeros(2, np.float16)), "group_size"),
    (evf.TensorBlob("w", "q4", 4, 32, (2,), np.array([object()] * 2)), "object"),
    (evf.TensorBlob("w", "q4", 4, 32, (2,), np.zeros(1, np.uint8), extra={"e": np.float32(1)}), "extra"),
])
def test_bad_blobs_rejected(tmp_path, blob, msg):
    with pytest.raises((ValueError, TypeError), match=msg):
        evf.write(tmp_path / "b.evlm", {}, [blob])
    assert list(tmp_path.iterdir()) == []


def test_iterator_rejected(tmp_path):
    with pytest.raises(TypeError, match="Sequence"):
        evf.write(tmp_path / "i.evlm", {}, iter(_blobs()))


@pytest.mark.parametrize("exc", [OSError("disk full"), KeyboardInterrupt()])
def test_failure_mid_write_leaves_nothing(tmp_path, monkeypatch, exc):
    real, calls = evf._stream_blob, []

    def flaky(f, data):
        calls.append(1)
        if len(calls) == 3:  # fail after two blobs are already on disk
            raise exc
        return real(f, data)

    monkeypatch.setattr(evf, "_stream_blob", flaky)
    target = tmp_path / "m.evlm"
    with pytest.raises(type(exc)):
        evf.write(target, META, _blobs())
    assert len(calls) == 3
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_old_file(tmp_path, monkeypatch):
    target = tmp_path / "m.evlm"
    evf.write(target, {"v": "old"}, _blobs()[:2])
    before = target.read_bytes()

    def boom(f, data):
        f.write(b"garbage")
        raise OSError("disk full")

    monkeypatch.setattr(evf, "_stream_blob", boom)
    with pytest.raises(OSError, match="disk full"):
        evf.write(target, {"v": "new"}, _blobs())
    assert target.read_bytes() == before and _no_temp_files(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["m.evlm"]
    with evf.open(target, verify=True) as f:
        assert f.metadata == {"v": "old"}
    # And a failing metadata check also leaves it alone.
    with pytest.raises(ValueError):
        evf.write(target, {"v": object()}, _blobs())
    assert target.read_bytes() == before


def test_successful_overwrite_replaces(tmp_path):
    target = tmp_path / "m.evlm"
    evf.write(target, {"v": 1}, _blobs()[:1])
    evf.write(target, {"v": 2}, _blobs())
    with evf.open(target) as f:
        assert f.metadata == {"v": 2} and len(f) == 10
    assert _no_temp_files(tmp_path)


# --------------------------------------------------------------------------- corruption on open


def _open_err(path, *parts):
    with pytest.raises(evf.FormatError) as ei:
        evf.open(path)
    msg = str(ei.value)
    assert isinstance(ei.value, ValueError)
    for p in parts:
        assert p in msg, (p, msg)
    assert "fix" in msg.lower()
    return msg


@pytest.mark.parametrize("where", ["prefix", "magic", "header", "data_start", "data_last_byte"])
def test_truncated(model, where):
    raw = model.read_bytes()
    _, _, _, hlen, doff, fsize, _, _ = _prefix(model)
    cut = {"prefix": 30, "magic": 5, "header": 64 + hlen // 2, "data_start": doff + 10,
           "data_last_byte": fsize - 1}[where]
    assert 0 < cut < len(raw)
    model.write_bytes(raw[:cut])
    msg = _open_err(model, "truncated")
    if cut >= 64:
        assert f"{fsize - cut} bytes missing" in msg and "copy" in msg


def test_empty_file(tmp_path):
    p = tmp_path / "e.evlm"
    p.write_bytes(b"")
    _open_err(p, "empty")


def test_trailing_bytes(model):
    model.write_bytes(model.read_bytes() + b"xyz")
    _open_err(model, "3 trailing bytes")


@pytest.mark.parametrize("head, hint", [
    (b"GGUF\x03\x00\x00\x00" + bytes(100), "GGUF"),
    (struct.pack("<Q", 20) + b'{"__metadata__":{}} ' + bytes(64), "safetensors"),
    (b"\x80\x02}q\x00" + bytes(100), "pickle"),
    (b"hello, this is a text file\n" * 5, "not an .evlm file"),
    (b"EX", "not an .evlm file"),  # shorter than the magic, but already wrong
])
def test_bad_magic_hints(tmp_path, head, hint):
    p = tmp_path / "x.evlm"
    p.write_bytes(head)
    msg = _open_err(p, "bad magic", hint)
    assert "edgevlm export" in msg or "path" in msg


def test_bad_magic_zip(tmp_path):
    p = tmp_path / "model.pt"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("archive/data.pkl", b"\x80\x02")
    _open_err(p, "bad magic", "zip", "PyTorch", "edgevlm export")


def test_text_mode_transfer_detected(model):
    mangled = model.read_bytes().replace(b"\r\n", b"\n")
    assert mangled[:8] != MAGIC
    model.write_bytes(mangled)
    _open_err(model, "bad magic", "text-mode", "binary mode")


def _patch_prefix(path, **fields):
    raw = bytearray(path.read_bytes())
    names = ["magic", "version", "flags", "header_len", "data_offset", "file_size", "crc", "reserved"]
    vals = dict(zip(names, PREFIX.unpack_from(raw)))
    vals.update(fields)
    raw[:64] = PREFIX.pack(*[vals[n] for n in names])
    path.write_bytes(bytes(raw))


def test_future_version(model):
    _patch_prefix(model, version=3)
    _open_err(model, "newer edgevlm", "format version 3", "upgrade edgevlm")


def test_version_zero(model):
    _patch_prefix(model, version=0)
    _open_err(model, "format version 0", "edgevlm export")


def test_unknown_flags(model):
    _patch_prefix(model, flags=1)
    _open_err(model, "flags", "upgrade")


def test_misaligned_data_offset(model):
    doff = _prefix(model)[4]
    _patch_prefix(model, data_offset=doff - 1)
    _open_err(model, "data_offset", "multiple of 64")


def test_header_crc_mismatch(model):
    raw = bytearray(model.read_bytes())
    hlen = _prefix(model)[3]
    i = raw.index(b"tiny-vlm", 64, 64 + hlen)
    raw[i] ^= 0x01  # still valid JSON, so only the crc can catch it
    model.write_bytes(bytes(raw))
    _open_err(model, "header checksum mismatch", "expected crc32")


def test_header_not_json(model):
    _set_raw_header(model, b'{"format_version": 1, "metadata": {}, "tensors": [')
    _open_err(model, "not valid UTF-8 JSON")


def test_header_missing_keys(model):
    _rewrite_header(model, lambda d: d.pop("tensors"))
    _open_err(model, "tensors (list)")


@pytest.mark.parametrize("edit, parts", [
    (lambda r: r.update(offset=r["offset"] + 1), ["'tok.weight'", "not aligned"]),
    (lambda r: r.update(offset=1 << 40), ["'tok.weight'", "past the end"]),
    (lambda r: r.update(nbytes=r["nbytes"] + 10**9), ["'tok.weight'", "past the end"]),
    (lambda r: r.update(shape=[4]), ["'tok.weight'", "nbytes is 12"]),
    (lambda r: r.update(shape=[-3]), ["'tok.weight'", "non-negative"]),
    (lambda r: r.update(checksum="xxh64:0123456789abcdef"), ["'tok.weight'", "unsupported checksum"]),
    (lambda r: r.pop("checksum"), ["tensors[0]", "'checksum'"]),
    (lambda r: r.update(bits="32"), ["tensors[0]", "'bits'"]),
])
def test_bad_record(model, edit, parts):
    _rewrite_header(model, lambda d: edit(d["tensors"][0]))
    _open_err(model, *parts)


def test_duplicate_record_in_header(model):
    _rewrite_header(model, lambda d: d["tensors"].append(dict(d["tensors"][0])))
    _open_err(model, "duplicate tensor name 'tok.weight'")


def test_flipped_data_byte_caught_by_verify(model):
    raw = bytearray(model.read_bytes())
    doff = _prefix(model)[4]
    with evf.open(model) as f:
        rec = f.records["norm"]
    raw[doff + rec.offset + 3] ^= 0xFF
    model.write_bytes(bytes(raw))
    with evf.open(model) as f:  # open does not read the data...
        assert f["norm"].shape == (5,)
        np.testing.assert_array_equal(f["tok.weight"], [1.5, -2.0, 3.25])
        with pytest.raises(evf.FormatError, match="checksum mismatch") as ei:
            f.verify()
    msg = str(ei.value)
    assert "'norm'" in msg and "1 of 10" in msg and "tok.weight" not in msg
    with pytest.raises(evf.FormatError, match="'norm'"):
        evf.verify(model)
    with pytest.raises(evf.FormatError, match="'norm'"):
        evf.open(model, verify=True)

