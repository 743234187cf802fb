r"""The ``.evlm`` container: the only code in edgevlm that knows byte offsets.

A fixed binary prefix, a JSON header, then 64-byte aligned tensor blobs, read
through one read-only mmap (tensors are zero-copy views).  Little-endian::

                       +-------------------------------------------+
    offset 0           | magic b"EVLM\0\r\n\x1a"                8 B |
    offset 8           | u32 format_version (= 1)               4 B |
    offset 12          | u32 flags (0; reserved)                4 B |
    offset 16          | u64 header_len (bytes of JSON)         8 B |
    offset 24          | u64 data_offset (multiple of ALIGN)    8 B |
    offset 32          | u64 file_size (total expected size)    8 B |
    offset 40          | u32 header_crc32 (zlib.crc32 of JSON)  4 B |
    offset 44          | reserved, all zero                    20 B |
                       +-------------------------------------------+
    offset 64          | UTF-8 JSON header (header_len bytes)      |
                       | zero padding up to data_offset            |
                       +-------------------------------------------+
    data_offset + off0 | tensor 0 blob (nbytes0) | zero pad        |
    data_offset + off1 | tensor 1 blob (nbytes1) | ...             |
                       +-------------------------------------------+
    file_size          (end of file; off_i are multiples of ALIGN)

The magic's ``\r\n`` and ``\x1a`` (as in PNG) turn a newline-converting
text-mode transfer into "bad magic" rather than garbage weights; ``file_size``
reports truncation before anything else is parsed.  The JSON header is
``{"format_version": 1, "metadata": {...}, "tensors": [record, ...]}`` with
one :class:`TensorRecord` per tensor; record offsets are relative to
``data_offset``, checksums are ``"crc32:%08x"`` of the blob (algorithm as a
prefix so it can change).

Raw qtypes (``f32 f16 bf16 i32 u8``; bf16 stored as uint16) are the
little-endian array, viewed with that dtype and logical shape.  Any other
qtype is opaque here: a 1-D uint8 view of ``nbytes`` for the qtype module.

Nothing is ever unpickled (JSON + raw bytes only).  :func:`write` is atomic
(temp file in the same directory, fsync, ``os.replace``).  :func:`open`
validates prefix, header and records, raising :class:`FormatError` with what
is wrong and how to fix it; blob checksums are checked only by
:meth:`EvlmFile.verify` / ``open(..., verify=True)`` as that reads every byte.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import mmap
import operator
import os
import struct
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ALIGN", "FORMAT_VERSION", "MAGIC", "PREFIX_SIZE", "EvlmFile", "FormatError",
           "TensorBlob", "TensorRecord", "open", "verify", "write"]

MAGIC = b"EVLM\0\r\n\x1a"
FORMAT_VERSION = 1
# 64: a cache line and the widest SIMD load (AVX-512 = 64 B), so kernels never
# straddle a line at a tensor's start.  mmap maps from a page boundary (4096,
# a multiple of 64), so an aligned file offset is an aligned memory address.
ALIGN = 64
# The fixed prefix ("<": little-endian, no implicit padding).  64 B so the JSON
# header starts cache-line aligned; the 20 reserved bytes leave room for new
# fixed fields without moving the header.
_PREFIX = struct.Struct("<8sIIQQQI20s")
PREFIX_SIZE = _PREFIX.size
assert PREFIX_SIZE == 64
# Blobs are streamed in 16 MiB pieces: bounds each write() syscall (some
# platforms cap a single write at 2 GiB) and crc32s each piece while it is hot.
_CHUNK = 16 << 20
# Raw qtypes -> the dtype of their blob and view.  bf16 has no numpy dtype, so
# it is stored and returned as its uint16 bit pattern.
_RAW_DTYPES: dict[str, np.dtype] = {
    "f32": np.dtype("<f4"), "f16": np.dtype("<f2"), "bf16": np.dtype("<u2"),
    "i32": np.dtype("<i4"), "u8": np.dtype("u1"),
}
# Same width as a real "crc32:%08x", so the header written before the data is
# exactly as long as the final one (see write()).
_PLACEHOLDER_CHECKSUM = "crc32:00000000"

_FIX_EXPORT = "re-export the model with `edgevlm export`"
_FIX_COPY = ("the copy was interrupted or the data was damaged; copy the file again "
             "(in binary mode) or re-export the model with `edgevlm export`")
_FIX_UPGRADE = "upgrade edgevlm to read it"


class FormatError(ValueError):
    """The file is not a valid .evlm; the message says what is wrong and how to fix it."""


def _err(path: Path, what: str, fix: str) -> FormatError:
    return FormatError(f"{path}: {what}. To fix: {fix}.")


def _align_up(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _shape(shape: Sequence[int]) -> tuple[int, ...]:
    # operator.index rejects floats (2.5 must not silently become 2).
    return tuple(operator.index(d) for d in shape)


@dataclass(frozen=True)
class TensorRecord:
    """One tensor's entry in the JSON header; offset is relative to data_offset."""

    name: str
    qtype: str               # "f32", "f16", "bf16", "i32", "u8" raw; anything else is opaque
    bits: int                # bits per weight (32 for f32, 4 for q4, ...)
    group_size: int          # quantisation group size; 0 for raw qtypes
    shape: tuple[int, ...]   # logical tensor shape (not the packed blob's)
    offset: int              # multiple of ALIGN, relative to data_offset
    nbytes: int              # blob length in bytes
    checksum: str            # "crc32:%08x" of the blob
    # Free-form JSON (e.g. export-time error).  hash=False: dicts are unhashable
    # and records should still be usable as set members / dict keys.
    extra: dict[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", _shape(self.shape))

    @property
    def quantized(self) -> bool:
        return self.qtype not in _RAW_DTYPES

    @property
    def dtype(self) -> np.dtype:
        """dtype of the view: the raw dtype, or uint8 for an opaque quantised blob."""
        return _RAW_DTYPES.get(self.qtype, np.dtype(np.uint8))


@dataclass(frozen=True, eq=False)  # eq=False: ndarray == ndarray is elementwise, not a bool
class TensorBlob:
    """What a writer hands to write().  ``data`` (any dtype) is written as its raw C-order
    little-endian bytes; for raw qtypes it must have that qtype's dtype and exactly ``shape``."""

    name: str
    qtype: str
    bits: int
    group_size: int
    shape: tuple[int, ...]
    data: np.ndarray
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", _shape(self.shape))


def _json_problem(obj: Any, where: str) -> str | None:
    """Describe the first value under obj that would not survive a JSON round trip."""
    if obj is None or isinstance(obj, (str, bool, int)):
        return None
    if isinstance(obj, float):
        return None if math.isfinite(obj) else f"{where} is {obj!r} (NaN/inf are not valid JSON)"
    if isinstance(obj, (list, tuple)):
        return next((p for i, v in enumerate(obj) if (p := _json_problem(v, f"{where}[{i}]"))), None)
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, str):
                return f"{where} has a non-string key {k!r} (JSON keys are strings)"
            if p := _json_problem(v, f"{where}[{k!r}]"):
                return p
        return None
    return (f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}, which is not "
            "JSON-serialisable (convert numpy values with .item() or .tolist())")


def _raw_problem(qtype: str, bits: int, group_size: int, shape: tuple[int, ...], nbytes: int) -> str | None:
    """For raw qtypes, check bits / group_size / nbytes against the dtype; None if fine."""
    dt = _RAW_DTYPES.get(qtype)
    if dt is None:
        return None
    if bits != dt.itemsize * 8:
        return f"qtype {qtype} has {dt.itemsize * 8} bits, but bits is {bits}"
    if group_size != 0:
        return f"qtype {qtype} is unquantised, so group_size must be 0, not {group_size}"
    want = math.prod(shape) * dt.itemsize
    if nbytes != want:
        return f"shape {shape} x {dt.itemsize} B ({qtype}) is {want} bytes, but nbytes is {nbytes}"
    return None


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_blob(i: int, b: Any) -> None:
    if not isinstance(b, TensorBlob):
        raise TypeError(f"tensors[{i}] is a {type(b).__name__}, expected TensorBlob")
    where = f"tensors[{i}] ({b.name!r})"
    if not (isinstance(b.name, str) and b.name and isinstance(b.qtype, str) and b.qtype):
        raise ValueError(f"{where}: name and qtype must be non-empty str, got qtype {b.qtype!r}")
    if not _is_int(b.bits) or not 1 <= b.bits <= 64 or not _is_int(b.group_size) or b.group_size < 0:
        raise ValueError(f"{where}: need 1 <= bits <= 64 and group_size >= 0, got {b.bits!r}, {b.group_size!r}")
    if any(d < 0 for d in b.shape):
        raise ValueError(f"{where}: negative dimension in shape {b.shape}")
    if not isinstance(b.data, np.ndarray) or b.data.dtype.hasobject:
        raise TypeError(f"{where}: data must be a numpy array of plain values (object arrays hold "
                        f"pointers, not bytes), got {type(b.data).__name__}")
    dt = _RAW_DTYPES.get(b.qtype)
    if dt is not None:
        if b.data.dtype.newbyteorder("<") != dt:
            raise ValueError(f"{where}: qtype {b.qtype} needs {dt} data, got {b.data.dtype}; "
                             f"convert with .{'view' if b.qtype == 'bf16' else 'astype'}(np.{dt.name})")
        if b.data.shape != b.shape:
            raise ValueError(f"{where}: data shape {b.data.shape} != declared shape {b.shape}")
    if p := _raw_problem(b.qtype, b.bits, b.group_size, b.shape, b.data.nbytes):
        raise ValueError(f"{where}: {p}")
    if not isinstance(b.extra, dict) or (p := _json_problem(b.extra, "extra")):
        raise ValueError(f"{where}: extra is not a JSON-serialisable dict: {p or type(b.extra).__name__}")


def _header_bytes(metadata: dict[str, Any], records: list[TensorRecord]) -> bytes:
    tensors = [{**dataclasses.asdict(r), "shape": list(r.shape)} for r in records]
    doc = {"format_version": FORMAT_VERSION, "metadata": metadata, "tensors": tensors}
    return json.dumps(doc, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")


def _stream_blob(f: io.BufferedWriter, data: np.ndarray) -> tuple[int, int]:
    """Write data's little-endian C-order bytes to f; return (crc32, bytes written).

    Copies only when the input is non-contiguous or big-endian, one tensor at a time.
    """
    le = data.dtype.newbyteorder("<")
    if data.dtype != le:
        data = data.astype(le)
    flat = np.ascontiguousarray(data).reshape(-1).view(np.uint8)  # (nbytes,) uint8, no copy
    crc = 0
    for i in range(0, flat.size, _CHUNK):
        piece = flat[i:i + _CHUNK]
        crc = zlib.crc32(piece, crc)
        f.write(piece)
    return crc, flat.size


def _fsync_dir(directory: Path) -> None:
    # On POSIX the rename is durable only once the directory entry is flushed.
    # Windows cannot open directories (and NTFS journals the rename), so skip it.
    if os.name == "posix":
        fd = os.open(directory, os.O_RDONLY)
        try:
            with contextlib.suppress(OSError):  # some filesystems refuse fsync on directories
                os.fsync(fd)
        finally:
            os.close(fd)


def write(path: str | os.PathLike[str], metadata: dict[str, Any], tensors: Sequence[TensorBlob], *,
          progress: Callable[[int, int, str], None] | None = None) -> None:
    """Atomically write an .evlm file.

    ``tensors`` must be a Sequence (list/tuple): every blob's size is needed to
    lay out the header before any data is written, and the data is then
    streamed blob by blob (never concatenated in memory).  ``progress(done_bytes,
    total_bytes, name)`` is called after each tensor.  Raises ValueError for
    duplicate names or non-JSON metadata (naming the bad key).  The file
    appears under ``path`` only when complete; on any exception the temp file
    is removed and an existing file at ``path`` is left untouched.
    """
    path = Path(path)
    if not isinstance(tensors, Sequence):
        raise TypeError("tensors must be a Sequence (e.g. a list) of TensorBlob: all sizes are "
                        f"needed before the header is written, got {type(tensors).__name__}")
    if not isinstance(metadata, dict):
        raise TypeError(f"metadata must be a dict, got {type(metadata).__name__}")
    if p := _json_problem(metadata, "metadata"):
        raise ValueError(f"metadata is not JSON-serialisable: {p}")
    records: list[TensorRecord] = []
    seen: set[str] = set()
    end = 0  # end of the data region so far, relative to data_offset
    for i, b in enumerate(tensors):
        _check_blob(i, b)
        if b.name in seen:
            raise ValueError(f"duplicate tensor name {b.name!r} (tensors[{i}]); names must be unique")
        seen.add(b.name)
        offset = _align_up(end)
        records.append(TensorRecord(b.name, b.qtype, b.bits, b.group_size, b.shape, offset,
                                    b.data.nbytes, _PLACEHOLDER_CHECKSUM, dict(b.extra)))
        end = offset + b.data.nbytes
    # Checksums are only known after streaming the data, which comes after the
    # header.  The placeholder has the same width, so lay out with it now and
    # overwrite the header in place at the end.
    header = _header_bytes(metadata, records)
    data_offset = _align_up(PREFIX_SIZE + len(header))
    total = sum(r.nbytes for r in records)

    # Same directory as the target so os.replace is a rename, never a copy.
    # os.open (not mkstemp) so the final file gets the usual umask permissions.
    import secrets  # here, not at the top: it pulls in hashlib/OpenSSL (~3.6 MB RSS) for every reader

    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with io.open(fd, "wb") as f:
            f.seek(data_offset)
            pos, done, final = data_offset, 0, []
            for b, rec in zip(tensors, records, strict=True):
                f.write(bytes(data_offset + rec.offset - pos))  # < ALIGN bytes of padding
                crc, n = _stream_blob(f, b.data)
                if n != rec.nbytes:
                    raise RuntimeError(f"tensor {b.name!r} changed size while being written")
                final.append(dataclasses.replace(rec, checksum=f"crc32:{crc:08x}"))
                pos = data_offset + rec.offset + n
                done += n
                if progress is not None:
                    progress(done, total, b.name)
            header2 = _header_bytes(metadata, final)
            if len(header2) != len(header):
                raise RuntimeError("internal error: header length changed after checksumming")
            f.seek(0)
            f.write(_PREFIX.pack(MAGIC, FORMAT_VERSION, 0, len(header2), data_offset, pos,
                                 zlib.crc32(header2), bytes(20)))
            f.write(header2)
            f.write(bytes(data_offset - PREFIX_SIZE - len(header2)))
            f.flush()
            os.fsync(f.fileno())  # data on disk before the rename makes it visible
        os.replace(tmp, path)
    except BaseException:  # incl. KeyboardInterrupt: never leave temp files behind
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


class EvlmFile:
    """An open .evlm file: ``metadata``, ``records`` and zero-copy tensor views.

    Views are read-only slices of one mmap of the whole file.  They stay valid
    after close(): the mapping is unmapped when the last view is collected.
    """

    def __init__(self, path: Path, mm: mmap.mmap, version: int, metadata: dict[str, Any],
                 records: dict[str, TensorRecord], data_offset: int) -> None:
        self.path = path
        self.version = version
        self.metadata = metadata
        self.records = records  # name -> record, in file order
        self._mm: mmap.mmap | None = mm
        self._data_offset = data_offset
        # (file_size,) read-only uint8 view of the mapping; every tensor is a slice.
        self._buf: np.ndarray | None = np.frombuffer(mm, dtype=np.uint8)

    def _blob(self, rec: TensorRecord) -> np.ndarray:
        if self._buf is None:
            raise ValueError(f"{self.path}: file is closed")
        start = self._data_offset + rec.offset
        return self._buf[start:start + rec.nbytes]

    def __getitem__(self, name: str) -> np.ndarray:
        rec = self.records.get(name)
        if rec is None:
            import difflib  # error path only

            close = difflib.get_close_matches(name, self.records, n=3)
            some = list(self.records)[:5]
            raise KeyError(f"no tensor {name!r} in {self.path} ({len(self.records)} tensors)"
                           + (f"; did you mean {close}?" if close else "")
                           + (f"; first names: {some}" if some else ""))
        blob = self._blob(rec)
        return blob if rec.quantized else blob.view(rec.dtype).reshape(rec.shape)

    def __contains__(self, name: object) -> bool:
        return name in self.records

    def __iter__(self) -> Iterator[str]:
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)

    def __enter__(self) -> EvlmFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._buf is None else f"{len(self.records)} tensors"
        return f"<EvlmFile {str(self.path)!r} v{self.version}, {state}>"

    def verify(self) -> None:
        """Check every tensor's checksum; FormatError naming the bad tensors."""
        bad = []
        for rec in self.records.values():
            actual = f"crc32:{zlib.crc32(self._blob(rec)):08x}"
            if actual != rec.checksum:
                bad.append(f"{rec.name!r} (expected {rec.checksum}, got {actual})")
        if bad:
            more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
            raise _err(self.path, f"checksum mismatch in {len(bad)} of {len(self.records)} tensors: "
                       f"{', '.join(bad[:3])}{more}", _FIX_COPY)

    def close(self) -> None:
        mm, self._mm, self._buf = self._mm, None, None
        if mm is not None:
            with contextlib.suppress(BufferError):  # views still out: unmapped when they are gone
                mm.close()


def _bad_magic(path: Path, head: bytes, size: int) -> FormatError:
    convert = "convert the original checkpoint with `edgevlm export`"
    safetensors = len(head) >= 9 and head[8:9] == b"{" and struct.unpack_from("<Q", head)[0] <= size - 8
    what, fix = next((w, f) for hit, w, f in [  # (looks like it?, what it is, how to fix)
        (head.startswith(b"PK"), "it looks like a zip archive (a PyTorch .pt/.pth checkpoint or .npz)", convert),
        (head.startswith(b"GGUF"), "it is a GGUF (llama.cpp) file", convert),
        (safetensors, "it looks like a safetensors file", convert),
        (len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5,
         "it looks like a pickle (legacy torch.save); edgevlm never unpickles files", convert),
        (head.startswith(b"EVLM"), "the magic was altered, typically by a text-mode transfer converting "
         "newlines", "copy the file again in binary mode (no newline conversion)"),
        (True, "it is not an .evlm file", f"check the path, or {_FIX_EXPORT}"),
    ] if hit)
    return _err(path, f"bad magic: expected {MAGIC!r}, got {head[:8]!r}; {what}", fix)


# JSON type of each record field, as the reader checks it.
_RECORD_TYPES = {"name": str, "qtype": str, "bits": int, "group_size": int, "shape": list,
                 "offset": int, "nbytes": int, "checksum": str, "extra": dict}


def _parse_record(path: Path, i: int, d: Any, data_offset: int, size: int) -> TensorRecord:
    where = f"header tensors[{i}]"
    if not isinstance(d, dict):
        raise _err(path, f"{where} is a {type(d).__name__}, not an object", _FIX_EXPORT)
    d = {"extra": {}, **d}  # extra is optional for readers
    for key, typ in _RECORD_TYPES.items():
        v = d.get(key)
        if not isinstance(v, typ) or isinstance(v, bool):
            raise _err(path, f"{where}: {key!r} should be {typ.__name__}, got {v!r}", _FIX_EXPORT)
    where = f"{where} ({d['name']!r})"
    ints = [d["bits"], d["group_size"], d["offset"], d["nbytes"], *d["shape"]]
    if not all(_is_int(v) and v >= 0 for v in ints):
        raise _err(path, f"{where}: bits/group_size/offset/nbytes/shape must be non-negative "
                   "integers", _FIX_EXPORT)
    rec = TensorRecord(**{k: d[k] for k in _RECORD_TYPES})
    if rec.offset % ALIGN:
        raise _err(path, f"{where}: offset {rec.offset} is not aligned to a multiple of {ALIGN}", _FIX_EXPORT)
    end = data_offset + rec.offset + rec.nbytes
    if end > size:
        raise _err(path, f"{where}: data runs past the end of the file (ends at byte {end}, "
                   f"file has {size})", _FIX_EXPORT)
    if p := _raw_problem(rec.qtype, rec.bits, rec.group_size, rec.shape, rec.nbytes):
        raise _err(path, f"{where}: {p}", _FIX_EXPORT)
    algo, _, digest = rec.checksum.partition(":")
    if algo != "crc32" or len(digest) != 8 or not all(c in "0123456789abcdef" for c in digest):
        raise _err(path, f"{where}: unsupported checksum {rec.checksum!r} (this edgevlm knows crc32)",
                   f"{_FIX_UPGRADE}, or {_FIX_EXPORT}")
    return rec


def _parse(path: Path, mm: mmap.mmap) -> EvlmFile:
    size = len(mm)
    (_, version, flags, header_len, data_offset, file_size, header_crc,
     reserved) = _PREFIX.unpack_from(mm, 0)
    if version > FORMAT_VERSION:
        raise _err(path, f"this file was written by a newer edgevlm (format version {version}; "
                   f"this edgevlm reads up to {FORMAT_VERSION})", _FIX_UPGRADE)
    if version < 1:
        raise _err(path, f"unknown format version {version} (valid: 1..{FORMAT_VERSION}); the prefix "
                   "is corrupt", _FIX_EXPORT)
    if flags or any(reserved):
        raise _err(path, f"unknown flags 0x{flags:08x} / non-zero reserved bytes: written by a newer "
                   "edgevlm, or corrupt", f"{_FIX_UPGRADE}, or {_FIX_EXPORT}")
    if size < file_size:
        raise _err(path, f"file is truncated: expected {file_size} bytes, found {size} "
                   f"({file_size - size} bytes missing)", _FIX_COPY)
    if size > file_size:
        raise _err(path, f"file has {size - file_size} trailing bytes beyond its declared size "
                   f"{file_size} (appended to or corrupt)", _FIX_COPY)
    if data_offset % ALIGN or not PREFIX_SIZE + header_len <= data_offset <= size:
        raise _err(path, f"data_offset {data_offset} must be a multiple of {ALIGN} between the "
                   f"header end ({PREFIX_SIZE + header_len}) and the file size ({size})", _FIX_EXPORT)
    header = mm[PREFIX_SIZE:PREFIX_SIZE + header_len]
    if (actual := zlib.crc32(header)) != header_crc:
        raise _err(path, f"header checksum mismatch: expected crc32 {header_crc:08x}, got "
                   f"{actual:08x}", _FIX_COPY)
    try:
        doc = json.loads(header.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _err(path, f"header is not valid UTF-8 JSON ({e})", _FIX_EXPORT) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("metadata"), dict) \
            or not isinstance(doc.get("tensors"), list) or doc.get("format_version") != version:
        raise _err(path, "header JSON must be an object with format_version "
                   f"(= {version}), metadata (object) and tensors (list)", _FIX_EXPORT)
    records: dict[str, TensorRecord] = {}
    for i, d in enumerate(doc["tensors"]):
        rec = _parse_record(path, i, d, data_offset, size)
        if rec.name in records:
            raise _err(path, f"duplicate tensor name {rec.name!r} in header", _FIX_EXPORT)
        records[rec.name] = rec
    return EvlmFile(path, mm, version, doc["metadata"], records, data_offset)


def open(path: str | os.PathLike[str], *, verify: bool = False) -> EvlmFile:  # noqa: A001
    """Map and validate an .evlm file (read-only); ``verify=True`` also checks every checksum."""
    path = Path(path)
    with io.open(path, "rb") as f:
        head = f.read(PREFIX_SIZE)
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise _err(path, "file is empty (0 bytes; truncated to nothing)", _FIX_COPY)
        if head[:8] != MAGIC[:len(head)]:
            raise _bad_magic(path, head, size)
        if size < PREFIX_SIZE:
            raise _err(path, f"file is truncated: {size} bytes, smaller than the {PREFIX_SIZE}-byte "
                       "prefix", _FIX_COPY)
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # stays valid after f closes
    ef = None
    try:
        ef = _parse(path, mm)
        if verify:
            ef.verify()
    except BaseException:
        if ef is None:
            mm.close()
        else:
            ef.close()  # also closes mm (after dropping its own view of it)
        raise
    return ef


def verify(path: str | os.PathLike[str]) -> None:
    """Open ``path``, check every checksum, close; FormatError on any problem."""
    with open(path) as f:
        f.verify()
