"""Triton device helpers that read the packed bytes: one place per type for the unpack, shared by
the dequant, GEMV and GEMM kernels (so the bit-exact dequant test covers the matmul's unpack).

Two ways through a row (diagrams: csrc/qtypes/q*.h; constants: layout.Geometry):

* Chunks (full units). A full unit is two 16-byte chunks of low-plane bytes; chunk t of a block
  is unit u = t // 2, half h = t % 2. Plane p of the chunk's bytes holds the 16 consecutive codes
  ``k = k0 + u*UNIT + 32p + 16h + j`` (j = 0..15), all of one group (groups are multiples of 16),
  so a chunk is one 16-byte vector load and every code is a shift and a mask in registers:
    q4:  (b >> 4p) & 15                      q2, q2b: (b >> 2p) & 3          q8: int8(b)
    q3:  ((b >> 2p) & 3) | ((hb >> (2p + h)) & 1) << 2,  hb = high-bit byte j of the unit
* Tail (the last, shorter unit of U = K - KF codes, q2/q3/q4/q2b only): natural code order, one
  gather per code, the same formulas with S = U/4 (q4: U/2) low bytes and H = U/8 high bytes.

Type codes QT are layout.QKind: 0 q2, 1 q3, 2 q4, 3 q8, 4 q2b.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def load_chunks(qs_row, u, h, jj, valid, QT: tl.constexpr, UB: tl.constexpr):
    """qs_row: pointer(s) to the block's first byte per row [BN, 1, 1]; u, h: [1, T, 1];
    jj: [1, 1, 16] -> (low bytes, high-bit bytes (q3; else the low bytes again)) uint8 [BN, T, 16]."""
    lo = tl.load(qs_row + u * UB + h * 16 + jj, mask=valid, other=0)
    if QT == 1:
        hi = tl.load(qs_row + u * UB + 32 + jj, mask=valid, other=0)
    else:
        hi = lo
    return lo, hi


@triton.jit
def plane_codes(lo, hi, h, p: tl.constexpr, QT: tl.constexpr):
    """Codes of plane p of the chunk bytes: int32 [BN, T, 16] (q8: -127..127, else 0..2^bits-1)."""
    if QT == 2:
        q = ((lo >> (4 * p)) & 15).to(tl.int32)
    elif QT == 3:
        q = lo.to(tl.int8, bitcast=True).to(tl.int32)
    elif QT == 1:
        q = ((lo >> (2 * p)) & 3).to(tl.int32) | (((hi.to(tl.int32) >> (2 * p + h)) & 1) << 2)
    else:
        q = ((lo >> (2 * p)) & 3).to(tl.int32)
    return q


@triton.jit
def plane_codes_f32(lo, hi, h, p: tl.constexpr, QT: tl.constexpr):
    """plane_codes as exact float32 without an int->float conversion instruction (those issue at
    1/8 of the FMA rate on sm_80/sm_90 and would bound the GEMV): OR the code into the mantissa of
    2^23 and subtract 2^23 (q8: the biased code q + 128 = byte ^ 0x80, minus 2^23 + 128)."""
    if QT == 3:
        v = (lo ^ 0x80).to(tl.int32)
        f = (v | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0
    else:
        f = (plane_codes(lo, hi, h, p, QT) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
    return f


@triton.jit
def plane_codes_f16(lo, hi, h, p: tl.constexpr, QT: tl.constexpr):
    """plane_codes as exact float16, the same trick with 1024 = 0x6400 (codes < 1024 fit the
    10-bit mantissa): the GEMM's dequantization stays in fp16 registers, no float conversions."""
    if QT == 3:
        v = (lo ^ 0x80).to(tl.int16)
        f = (v | 0x6400).to(tl.float16, bitcast=True) - 1152.0
    else:
        f = (plane_codes(lo, hi, h, p, QT).to(tl.int16) | 0x6400).to(tl.float16, bitcast=True) - 1024.0
    return f


@triton.jit
def tail_codes(qs_rows, i, U, QT: tl.constexpr):
    """Codes of the tail unit in natural order. qs_rows: pointers to each row's tail bytes [BN, 1];
    i: code index in the tail [1, TW]; U: codes in the tail -> int32 [BN, TW] (0 where i >= U)."""
    valid = i < U
    if QT == 2:
        S = U // 2  # q4 tail: U = 32 codes in 16 bytes, byte j = q[j] | q[j + 16] << 4
        b = tl.load(qs_rows + i % S, mask=valid, other=0)
        q = ((b >> (4 * (i // S))) & 15).to(tl.int32)
    else:
        S = U // 4
        b = tl.load(qs_rows + i % S, mask=valid, other=0)
        q = ((b >> (2 * (i // S))) & 3).to(tl.int32)
        if QT == 1:
            H = U // 8
            hb = tl.load(qs_rows + S + i % H, mask=valid, other=0).to(tl.int32)
            q = q | (((hb >> (i // H)) & 1) << 2)
    return q


@triton.jit
def group_params(sc_ptr, mn_ptr, c_ptr, z_ptr, rows, gi, G, ZB, QT: tl.constexpr):
    """Per-group dequant parameters, float32, broadcast of rows [BN, 1...] and group index gi.

    q2/q3/q4: (scale, min)  w = scale * q + min
    q8:       (scale, scale; the second is unused)  w = scale * q
    q2b:      (S, z)  S = d[n // 16, g] * (c[n, g] - m[n // 16, g]),  w = S * (q - z)
    """
    if QT == 4:
        blk = (rows // 16) * G + gi
        d = tl.load(sc_ptr + blk)
        m = tl.load(mn_ptr + blk)
        c = (tl.load(c_ptr + rows * (G // 2) + gi // 2) >> (4 * (gi & 1))) & 15
        z = (tl.load(z_ptr + rows * ZB + gi // 4) >> (2 * (gi & 3))) & 3
        s = d * (c.to(tl.float32) - m)
        off = z.to(tl.float32)
    elif QT == 3:
        s = tl.load(sc_ptr + rows * G + gi).to(tl.float32)
        off = s
    else:
        s = tl.load(sc_ptr + rows * G + gi).to(tl.float32)
        off = tl.load(mn_ptr + rows * G + gi).to(tl.float32)
    return s, off


@triton.jit
def dequant_values(q, s, off, QT: tl.constexpr):
    """Weights in s's dtype from codes and group_params, in the reference's order of operations
    (csrc/qtypes/qtype.h, q2b.h): separate multiply and add, so they match numpy bit for bit
    where the compiler does not contract them (the dequant kernel turns fp fusion off)."""
    qf = q.to(s.dtype)  # int codes -> float32; float16 codes (GEMM) stay as they are
    if QT == 4:
        w = s * (qf - off)
    elif QT == 3:
        w = s * qf
    else:
        w = s * qf + off
    return w


# ---- fast code planes (GPU only): PTX on whole 32-bit words ------------------------------------
# The uint8 path above costs ~20 SASS instructions per code on sm_90 (byte extracts, 16-bit
# conversions, shifts and masks per element). With ``tl.inline_asm_elementwise(pack=4)`` the four
# bytes of one register arrive as one 32-bit word and each code becomes one LOP3 and one FMA:
#   f = (v & (MASK << pos)) | 0x4B000000     float32 bits: 2^23 + c * 2^pos      (pos + bits <= 23)
#   q = fma(f, 2^-pos, -(2^(23-pos) + bias))  exact: (2^23 + c 2^pos) 2^-pos is exact, and so is the
#                                             difference (an integer below 2^16)
# Bytes 0 and 1 sit at pos = 8j + shift in v; bytes 2 and 3 at the same positions in v >> 16 (one
# shift per word: bits 16..23 would reach the exponent). q8's codes are int8: v = w ^ 0x80808080
# gives c = q + 128 (bias 128). The interpreter cannot run PTX: there the pure-Triton planes above
# run instead (FAST = False), and tests/test_triton_kernels.py checks these constants in numpy.

def word_plane_terms(bits: int, plane: int, signed: bool) -> list[tuple[int, int, int, int]]:
    """Per byte j = 0..3 of a word: (source (0: v, 1: v >> 16), mask, fma scale bits, fma addend
    bits), such that fma(float_bits((src & mask) | 0x4B000000), scale, addend) is the code of
    ``plane`` in byte j (bits: 2, 4 or 8 per code; signed: q8)."""
    out = []
    for j in range(4):
        pos = 8 * (j % 2) + bits * plane
        if pos + bits > 23:
            raise ValueError(f"[word_plane_terms] code bits {pos}..{pos + bits - 1} leave the float32 mantissa")
        bias = 128 if signed else 0
        scale = f32_bits(2.0 ** -pos)
        addend = f32_bits(-(2.0 ** (23 - pos) + bias))
        out.append((j // 2, ((1 << bits) - 1) << pos, scale, addend))
    return out


def f32_bits(v: float) -> int:
    import struct

    return struct.unpack("<I", struct.pack("<f", v))[0]


def word_plane_asm(bits: int, plane: int, signed: bool) -> str:
    """PTX for one pack of 4 bytes ($4) -> 4 float32 codes ($0..$3) of ``plane``."""
    lines = ["{", ".reg .b32 v, h;"]
    lines.append("xor.b32 v, $4, 0x80808080;" if signed else "mov.b32 v, $4;")
    lines.append("shr.b32 h, v, 16;")
    for j, (src, mask, scale, addend) in enumerate(word_plane_terms(bits, plane, signed)):
        lines.append(f"lop3.b32 ${j}, {'h' if src else 'v'}, {mask:#x}, 0x4b000000, 0xea;")  # (a & b) | c
        lines.append(f"fma.rn.f32 ${j}, ${j}, 0f{scale:08X}, 0f{addend:08X};")
    lines.append("}")
    return "\n".join(lines)


_ASM_Q2_0 = tl.constexpr(word_plane_asm(2, 0, False))
_ASM_Q2_1 = tl.constexpr(word_plane_asm(2, 1, False))
_ASM_Q2_2 = tl.constexpr(word_plane_asm(2, 2, False))
_ASM_Q2_3 = tl.constexpr(word_plane_asm(2, 3, False))
_ASM_Q4_0 = tl.constexpr(word_plane_asm(4, 0, False))
_ASM_Q4_1 = tl.constexpr(word_plane_asm(4, 1, False))
_ASM_Q8_0 = tl.constexpr(word_plane_asm(8, 0, True))


@triton.jit
def _word_asm(lo, asm: tl.constexpr):
    return tl.inline_asm_elementwise(asm, "=r,=r,=r,=r,r", [lo], dtype=tl.float32, is_pure=True, pack=4)


@triton.jit
def plane_codes_fast(lo, hi, h, p: tl.constexpr, QT: tl.constexpr, FAST: tl.constexpr):
    """plane_codes_f32 (same values, float32 [BN, T, 16]); FAST: through the PTX above (q2, q4,
    q8, q2b on a GPU), else the pure-Triton planes (q3, and the interpreter)."""
    if FAST:
        if QT == 2:
            if p == 0:
                f = _word_asm(lo, _ASM_Q4_0)
            else:
                f = _word_asm(lo, _ASM_Q4_1)
        elif QT == 3:
            f = _word_asm(lo, _ASM_Q8_0)
        else:  # q2, q2b: 2-bit crumbs
            if p == 0:
                f = _word_asm(lo, _ASM_Q2_0)
            elif p == 1:
                f = _word_asm(lo, _ASM_Q2_1)
            elif p == 2:
                f = _word_asm(lo, _ASM_Q2_2)
            else:
                f = _word_asm(lo, _ASM_Q2_3)
    else:
        f = plane_codes_f32(lo, hi, h, p, QT)
    return f
