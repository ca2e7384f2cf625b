"""Bit layouts of ternary weights: ours, transformers', GGUF TQ1_0/TQ2_0 and bitnet.cpp's I2_S.

Every layout is one pack/unpack pair over ternary codes int8[N, K] in {-1, 0, 1} (N = output
features, K = input features, as in `formats`). All layouts store 2-bit codes `w + 1` in
{0, 1, 2} except TQ1_0 and our 1.6-bit layout (5 trits per byte). numpy only, vectorised:
these run on every matrix of a 2B-parameter model at convert time.

- ours (`pack_ours`): the layout the native kernels read as one linear stream; see its docstring.
- ours at 1.6 bits (`pack_ours_tq1`): the same stream with 5 trits per byte, measured against
  the 2-bit layout by `benchmarks/bench_layout.py`.
- transformers (`pack_hf`): `integrations/bitnet.py` `pack_weights`, blocked along axis 0.
- TQ2_0 / TQ1_0 (`pack_tq2_0`, `pack_tq1_0`): llama.cpp's ternary types, blocks of 256 with an
  fp16 scale, byte-identical to gguf-py's `gguf.quants.quantize`.
- I2_S (`pack_i2_s`): bitnet.cpp's x86 layout (QK = 128) with one fp32 scale per tensor.
"""

from __future__ import annotations

import numpy as np

KBLOCK = 256  # K values per block of our layout (one 64-byte load per row and 2-bit plane)
ROWS = 4  # rows interleaved per group of our layout (one kernel step)
QK_K = 256  # weights per TQ1_0 / TQ2_0 block
TQ2_0_BLOCK_BYTES = 66  # qs[64] + fp16 d
TQ1_0_BLOCK_BYTES = 54  # qs[48] + qh[4] + fp16 d
QK_I2_S = 128  # weights per I2_S block on x86 (32 bytes)
I2_S_TAIL_BYTES = 32  # fp32 scale, then padding to 32 bytes

_SHIFTS = np.array([0, 2, 4, 6], dtype=np.uint8)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _check_codes(codes: np.ndarray) -> np.ndarray:
    """Validate ternary codes int8[N, K] and return them as uint8 `w + 1` in {0, 1, 2}."""
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"ternary codes must be a 2-D array [N, K], got shape {codes.shape}")
    if not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"ternary codes must be an integer array, got dtype {codes.dtype}")
    if codes.size and (codes.min() < -1 or codes.max() > 1):
        raise ValueError(
            f"ternary codes must be in {{-1, 0, 1}}, found values in [{codes.min()}, {codes.max()}]"
        )
    return (codes.astype(np.int8) + np.int8(1)).view(np.uint8)


def _check_packed(packed: np.ndarray, shape: tuple[int, ...], layout: str) -> np.ndarray:
    packed = np.asarray(packed)
    if packed.dtype != np.uint8:
        raise ValueError(f"{layout} packed weights must be uint8, got dtype {packed.dtype}")
    if packed.shape != shape:
        raise ValueError(f"{layout} packed weights must have shape {shape}, got {packed.shape}")
    return packed


def _check_nk(n: int, k: int) -> None:
    if int(n) != n or int(k) != k or n < 1 or k < 1:
        raise ValueError(f"n and k must be positive integers, got n={n}, k={k}")


def _codes_from_u8(u: np.ndarray, layout: str) -> np.ndarray:
    """uint8 `w + 1` -> int8 w, rejecting the unused 2-bit code 3."""
    if u.size and u.max() > 2:
        raise ValueError(f"{layout} data holds the unused 2-bit code 3: corrupt or not {layout}")
    return u.view(np.int8) - np.int8(1)


def _as_bytes(data, size: int, layout: str) -> np.ndarray:
    """Any bytes-like or uint8 array -> flat uint8 view of exactly `size` bytes."""
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8:
            raise ValueError(f"{layout} data must be uint8, got dtype {data.dtype}")
        flat = data.reshape(-1)
    else:
        flat = np.frombuffer(data, dtype=np.uint8)
    if flat.size != size:
        raise ValueError(f"{layout} data must hold {size} bytes for this shape, got {flat.size}")
    return flat


# --- transformers (integrations/bitnet.py) -------------------------------------------------------


def pack_hf(codes: np.ndarray) -> np.ndarray:
    """transformers' packed layout: codes int8[N, K] -> uint8[ceil(N/4), K].

    Blocked along axis 0 with R = ceil(N/4): byte [j, k] holds rows j, R+j, 2R+j, 3R+j in bits
    0-1, 2-3, 4-5, 6-7 as `w + 1`. Rows past N (N not a multiple of 4) are zero bits, as
    `pack_weights` leaves them (they would decode as -1; `unpack_hf` drops them).
    """
    u = _check_codes(codes)
    n, k = u.shape
    r = _cdiv(n, ROWS)
    full = np.zeros((ROWS * r, k), dtype=np.uint8)
    full[:n] = u
    planes = full.reshape(ROWS, r, k) << _SHIFTS[:, None, None]
    return np.bitwise_or.reduce(planes, axis=0)


def unpack_hf(packed: np.ndarray, n: int) -> np.ndarray:
    """Inverse of `pack_hf`: uint8[ceil(n/4), K] -> codes int8[n, K]."""
    packed = np.asarray(packed)
    if packed.ndim != 2:
        raise ValueError(f"transformers packed weights must be 2-D, got shape {packed.shape}")
    _check_nk(n, 1)
    _check_packed(packed, (_cdiv(n, ROWS), packed.shape[1]), "transformers")
    planes = (packed[None, :, :] >> _SHIFTS[:, None, None]) & np.uint8(3)
    return _codes_from_u8(planes.reshape(-1, packed.shape[1])[:n], "transformers")


# --- ours ----------------------------------------------------------------------------------------


def ours_packed_shape(n: int, k: int) -> tuple[int, int]:
    """Shape (ceil(n/4), Kpad) of our packed layout, Kpad = k rounded up to a multiple of 256."""
    _check_nk(n, k)
    return _cdiv(n, ROWS), _cdiv(k, KBLOCK) * KBLOCK


def pack_ours(codes: np.ndarray) -> np.ndarray:
    """Our kernel layout: codes int8[N, K] -> uint8[ceil(N/4), Kpad], Kpad = ceil(K/256)*256.

    Rows go in groups of 4 (N padded with zero-weight rows), K is padded with zero weights to
    Kpad. Group g's bytes are a sequence of K-blocks b of 256 values; inside block b the rows
    r = 0..3 follow each other, 64 bytes each; byte m of row r holds `w + 1` of
    k = 256*b + 64*j + m at bit shift 2*j, j = 0..3. So the kernel reads one linear stream, a
    64-byte load yields four planes of 64 consecutive k values (shift + mask), and one load of
    activations serves the 4 rows of the group.
    """
    u = _check_codes(codes)
    n, k = u.shape
    g, kpad = ours_packed_shape(n, k)
    full = np.ones((ROWS * g, kpad), dtype=np.uint8)  # code 1 = weight 0
    full[:n, :k] = u
    # [g, r, b, j, m] -> OR over j of plane j << 2j -> [g, r, b, m] -> [g, b, r, m]
    v = full.reshape(g, ROWS, kpad // KBLOCK, 4, 64) << _SHIFTS[:, None]
    packed = np.bitwise_or.reduce(v, axis=3)
    return np.ascontiguousarray(packed.transpose(0, 2, 1, 3)).reshape(g, kpad)


def unpack_ours(packed: np.ndarray, n: int, k: int) -> np.ndarray:
    """Inverse of `pack_ours`: uint8[ceil(n/4), Kpad] -> codes int8[n, k]."""
    g, kpad = ours_packed_shape(n, k)
    packed = _check_packed(packed, (g, kpad), "bitnet158")
    v = packed.reshape(g, kpad // KBLOCK, ROWS, 1, 64) >> _SHIFTS[:, None]  # [g, b, r, j, m]
    u = (v & np.uint8(3)).transpose(0, 2, 1, 3, 4).reshape(ROWS * g, kpad)
    return _codes_from_u8(np.ascontiguousarray(u[:n, :k]), "bitnet158")


# --- ours, 1.6 bits (5 trits per byte) -----------------------------------------------------------

# A byte holds the codes t0..t4 (`w + 1`) of five weights. Of 3^5 = 243 tuples in 256 bytes,
# split as a = 9*t0 + 3*t1 + t2 (27 values) and c = 3*t3 + t4 (9 values):
#   byte = 64 * (a // 7) + 7 * c + a % 7,
# so c = (byte & 63) // 7 depends on the low 6 bits only: the AVX-512 kernel decodes (t3, t4)
# with one 64-entry byte permute (vpermb) and (t0, t1, t2) with a 256-entry one (two vpermi2b
# and a blend on bit 7); llama.cpp's TQ1_0 encoding (base-3 fixed point) needs ~4 more
# instructions per 64 weights. The 13 bytes with byte & 63 == 63 or a > 26 are never written.
TQ1_KBLOCK = 320  # K values per 64-byte block of a row (5 planes of 64)
_T5_CODE_ONE = 1  # `w + 1` of a zero weight


def _t5_bytes(t: np.ndarray) -> np.ndarray:
    """uint8 codes [..., 5, m] (axis -2 = t0..t4) -> the bytes [..., m] that hold them."""
    t = t.astype(np.uint16)
    a = 9 * t[..., 0, :] + 3 * t[..., 1, :] + t[..., 2, :]
    c = 3 * t[..., 3, :] + t[..., 4, :]
    return (64 * (a // 7) + 7 * c + a % 7).astype(np.uint8)


def _t5_codes(b: np.ndarray) -> np.ndarray:
    """Bytes [..., m] -> uint8 codes [..., 5, m]; ValueError on a byte the packer never writes."""
    d = b & np.uint8(63)
    a = 7 * (b >> np.uint8(6)) + d % np.uint8(7)
    c = d // np.uint8(7)
    if b.size and (d.max() == 63 or a.max() > 26):
        raise ValueError("bitnet158 1.6-bit data holds a byte no weights encode to: corrupt")
    return np.stack([a // 9, a // 3 % 3, a % 3, c // 3, c % 3], axis=-2).astype(np.uint8)


def ours_tq1_packed_shape(n: int, k: int) -> tuple[int, int]:
    """Shape (ceil(n/4), 256 * ceil(k/320)) of our 1.6-bit layout (`pack_ours_tq1`)."""
    _check_nk(n, k)
    return _cdiv(n, ROWS), _cdiv(k, TQ1_KBLOCK) * ROWS * 64


def pack_ours_tq1(codes: np.ndarray) -> np.ndarray:
    """Our 1.6-bit kernel layout: codes int8[N, K] -> uint8[ceil(N/4), 256 * ceil(K/320)].

    Like `pack_ours` with 5 trits per byte: rows in groups of 4 (N padded with zero weights),
    K padded with zero weights to a multiple of 320. Group g is a sequence of K-blocks b of 320
    values; inside a block the rows r = 0..3 follow each other, 64 bytes each; byte m of row r
    holds the codes `w + 1` of k = 320*b + 64*i + m, i = 0..4, encoded as described above. One
    64-byte load thus yields five planes of 64 consecutive k values.
    """
    u = _check_codes(codes)
    n, k = u.shape
    g, nbytes = ours_tq1_packed_shape(n, k)
    nb = nbytes // (ROWS * 64)
    full = np.full((ROWS * g, nb * TQ1_KBLOCK), _T5_CODE_ONE, dtype=np.uint8)
    full[:n, :k] = u
    b = _t5_bytes(full.reshape(g, ROWS, nb, 5, 64))  # [g, r, b, m]
    return np.ascontiguousarray(b.transpose(0, 2, 1, 3)).reshape(g, nbytes)


def unpack_ours_tq1(packed: np.ndarray, n: int, k: int) -> np.ndarray:
    """Inverse of `pack_ours_tq1`: uint8[ceil(n/4), 256 * ceil(k/320)] -> codes int8[n, k]."""
    g, nbytes = ours_tq1_packed_shape(n, k)
    packed = _check_packed(packed, (g, nbytes), "bitnet158 1.6-bit")
    nb = nbytes // (ROWS * 64)
    t = _t5_codes(packed.reshape(g, nb, ROWS, 64))  # [g, b, r, i, m]
    u = t.transpose(0, 2, 1, 3, 4).reshape(ROWS * g, nb * TQ1_KBLOCK)
    return np.ascontiguousarray(u[:n, :k]).view(np.int8) - np.int8(1)


# --- GGUF TQ2_0 / TQ1_0 (llama.cpp ggml-common.h block_tq2_0 / block_tq1_0) ---------------------


def _tq_blocks(codes: np.ndarray, scale) -> tuple[np.ndarray, np.ndarray]:
    """codes -> (uint8 `w + 1` [N, K/256, 256], fp16 d bytes [N, K/256, 2]).

    ggml's quantizer sets d = absmax of the block, so d = scale for a block with a nonzero
    weight and d = 0 for an all-zero block; we do the same to stay byte-identical.
    """
    u = _check_codes(codes)
    n, k = u.shape
    if k % QK_K:
        raise ValueError(f"TQ1_0/TQ2_0 need K to be a multiple of {QK_K}, got K={k}")
    blocks = u.reshape(n, k // QK_K, QK_K)
    scale = np.broadcast_to(np.asarray(scale, dtype=np.float32), (n, k // QK_K))
    if not np.all(np.isfinite(scale)) or np.any(scale < 0):
        raise ValueError("TQ1_0/TQ2_0 scale must be finite and non-negative")
    nonzero = np.any(blocks != 1, axis=-1)
    with np.errstate(over="ignore"):
        d = np.where(nonzero, scale, np.float32(0)).astype(np.float16)
    if not np.all(np.isfinite(d)):
        raise ValueError("TQ1_0/TQ2_0 scale overflows fp16")
    return blocks, d.view(np.uint8).reshape(n, k // QK_K, 2)


def _tq_split(data, n: int, k: int, block_bytes: int, layout: str) -> tuple[np.ndarray, np.ndarray]:
    """Raw blocks uint8[n, K/256, block_bytes] and their d as float32[n, K/256]."""
    _check_nk(n, k)
    if k % QK_K:
        raise ValueError(f"{layout} needs K to be a multiple of {QK_K}, got K={k}")
    flat = _as_bytes(data, n * (k // QK_K) * block_bytes, layout)
    blocks = flat.reshape(n, k // QK_K, block_bytes)
    d = np.ascontiguousarray(blocks[..., -2:]).view(np.float16)[..., 0].astype(np.float32)
    return blocks, d


def pack_tq2_0(codes: np.ndarray, scale) -> np.ndarray:
    """GGUF TQ2_0: codes int8[N, K] (K % 256 == 0), scale -> uint8[N, K/256*66].

    Block of 256: qs[64] then fp16 d. In each 32-byte half c of qs, byte m holds elements
    128*c + 32*l + m at shift 2*l (l = 0..3). `scale` is one float or float32[N, K/256].
    """
    blocks, d = _tq_blocks(codes, scale)
    n, nb, _ = blocks.shape
    planes = blocks.reshape(n, nb, 2, 4, 32) << _SHIFTS[:, None]  # [.., c, l, m]
    qs = np.bitwise_or.reduce(planes, axis=3).reshape(n, nb, 64)
    return np.concatenate([qs, d], axis=-1).reshape(n, nb * TQ2_0_BLOCK_BYTES)


def unpack_tq2_0(data, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of `pack_tq2_0`: bytes of [n, k/256*66] -> (codes int8[n, k], d float32[n, k/256])."""
    blocks, d = _tq_split(data, n, k, TQ2_0_BLOCK_BYTES, "TQ2_0")
    qs = blocks[..., :64].reshape(n, k // QK_K, 2, 1, 32) >> _SHIFTS[:, None]
    codes = _codes_from_u8((qs & np.uint8(3)).reshape(n, k), "TQ2_0")
    return codes, d


# TQ1_0 stores base-3 numbers of 5 (or 4) trits t_0..t_4, most significant first, as the byte
# ceil(value * 256 / 243): the fixed-point fraction value/243 in 8 bits. Trit i is then the
# integer part of 3 * frac(byte * 3^i / 256), i.e. ((byte * 3^i mod 256) * 3) >> 8.
_POW3 = np.array([81, 27, 9, 3, 1], dtype=np.uint16)


def _trits_to_byte(trits: np.ndarray) -> np.ndarray:
    """[..., 5, m] uint8 trits (axis -2 most significant first) -> uint8[..., m]."""
    value = np.einsum("...im,i->...m", trits.astype(np.uint16), _POW3)
    return ((value * 256 + 242) // 243).astype(np.uint8)


def _byte_to_trits(q: np.ndarray, count: int) -> np.ndarray:
    """uint8[..., m] -> [..., count, m] trits, most significant first."""
    shifted = q[..., None, :] * _POW3[::-1][:count, None].astype(np.uint8)  # wraps mod 256
    return ((shifted.astype(np.uint16) * 3) >> 8).astype(np.uint8)


def pack_tq1_0(codes: np.ndarray, scale) -> np.ndarray:
    """GGUF TQ1_0: codes int8[N, K] (K % 256 == 0), scale -> uint8[N, K/256*54].

    Block of 256: qs[48], qh[4], fp16 d. qs[m] (m < 32) holds elements 32*i + m, i = 0..4;
    qs[32 + m] (m < 16) holds 160 + 16*i + m; qh[m] (m < 4) holds 240 + 4*i + m for i = 0..3 plus
    a zero fifth trit. Trit i is digit 4 - i of the base-3 number.
    """
    blocks, d = _tq_blocks(codes, scale)
    n, nb, _ = blocks.shape
    qs0 = _trits_to_byte(blocks[..., :160].reshape(n, nb, 5, 32))
    qs1 = _trits_to_byte(blocks[..., 160:240].reshape(n, nb, 5, 16))
    qh_trits = np.zeros((n, nb, 5, 4), dtype=np.uint8)
    qh_trits[..., :4, :] = blocks[..., 240:].reshape(n, nb, 4, 4)
    qh = _trits_to_byte(qh_trits)
    return np.concatenate([qs0, qs1, qh, d], axis=-1).reshape(n, nb * TQ1_0_BLOCK_BYTES)


def unpack_tq1_0(data, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of `pack_tq1_0`: bytes of [n, k/256*54] -> (codes int8[n, k], d float32[n, k/256])."""
    blocks, d = _tq_split(data, n, k, TQ1_0_BLOCK_BYTES, "TQ1_0")
    nb = k // QK_K
    parts = [
        _byte_to_trits(blocks[..., :32], 5).reshape(n, nb, 160),
        _byte_to_trits(blocks[..., 32:48], 5).reshape(n, nb, 80),
        _byte_to_trits(blocks[..., 48:52], 4).reshape(n, nb, 16),
    ]
    codes = _codes_from_u8(np.concatenate(parts, axis=-1).reshape(n, k), "TQ1_0")
    return codes, d


# --- bitnet.cpp I2_S (src/ggml-bitnet-mad.cpp quantize_i2_s, x86) -------------------------------


def pack_i2_s(codes: np.ndarray, scale: float) -> np.ndarray:
    """bitnet.cpp I2_S (x86): codes int8[N, K] (K % 128 == 0), scale -> uint8[N*K/4 + 32].

    The row-major codes are cut into blocks of 128; in block i, byte i*32 + m holds elements
    128*i + m, +32, +64, +96 at shifts 6, 4, 2, 0. A 32-byte tail follows: the fp32 tensor
    scale (little-endian, the multiplier: W = codes * scale), then zeros.
    """
    u = _check_codes(codes)
    n, k = u.shape
    if k % QK_I2_S:
        raise ValueError(f"I2_S needs K to be a multiple of {QK_I2_S}, got K={k}")
    scale = np.float32(scale)
    if not np.isfinite(scale):
        raise ValueError(f"I2_S scale must be finite, got {scale}")
    planes = u.reshape(-1, 4, 32) << _SHIFTS[::-1, None]
    out = np.zeros(n * k // 4 + I2_S_TAIL_BYTES, dtype=np.uint8)
    out[: n * k // 4] = np.bitwise_or.reduce(planes, axis=1).reshape(-1)
    out[n * k // 4 : n * k // 4 + 4] = np.array([scale], dtype="<f4").view(np.uint8)
    return out


def unpack_i2_s(data, n: int, k: int) -> tuple[np.ndarray, np.float32]:
    """Inverse of `pack_i2_s`: N*K/4 + 32 bytes -> (codes int8[n, k], scale float32).

    Only the first 4 bytes of the tail are read: bitnet.cpp leaves the other 28 uninitialised.
    """
    _check_nk(n, k)
    if k % QK_I2_S:
        raise ValueError(f"I2_S needs K to be a multiple of {QK_I2_S}, got K={k}")
    flat = _as_bytes(data, n * k // 4 + I2_S_TAIL_BYTES, "I2_S")
    body = flat[: n * k // 4].reshape(-1, 1, 32)
    u = (body >> _SHIFTS[::-1, None]) & np.uint8(3)
    codes = _codes_from_u8(u.reshape(n, k), "I2_S")
    scale = flat[n * k // 4 : n * k // 4 + 4].copy().view("<f4")[0]
    return codes, np.float32(scale)
