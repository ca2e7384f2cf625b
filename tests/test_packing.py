"""packing.py against independent references: transformers' pack_weights/unpack_weights, gguf-py's
TQ1_0/TQ2_0 quantizer and dequantizer, and per-element index formulas written from each layout's
definition (ours, bitnet.cpp's I2_S)."""

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize
from transformers.integrations import bitnet as hf_bitnet

from bitnet158 import packing

# transformers wraps unpack_weights in torch.compile; the eager function is the reference.
hf_unpack = getattr(hf_bitnet.unpack_weights, "__wrapped__", hf_bitnet.unpack_weights)


def ternary(rng, n, k):
    return rng.integers(-1, 2, size=(n, k)).astype(np.int8)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


# --- transformers --------------------------------------------------------------------------------


@pytest.mark.parametrize("n,k", [(1, 1), (3, 5), (4, 7), (5, 16), (13, 33), (640, 256)])
def test_hf_matches_transformers(rng, n, k):
    codes = ternary(rng, n, k)
    theirs = hf_bitnet.pack_weights(torch.from_numpy(codes.copy())).numpy()  # modifies its input
    ours = packing.pack_hf(codes)
    assert ours.dtype == np.uint8 and ours.shape == (-(-n // 4), k)
    np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(packing.unpack_hf(theirs, n), codes)
    # transformers always unpacks 4*ceil(n/4) rows; the first n are the weights
    unpacked = hf_unpack(torch.from_numpy(ours), dtype=torch.int8).numpy()
    np.testing.assert_array_equal(unpacked[:n], codes)


def test_hf_errors():
    with pytest.raises(ValueError, match="must be in"):
        packing.pack_hf(np.array([[0, 2]], dtype=np.int8))
    with pytest.raises(ValueError, match="integer"):
        packing.pack_hf(np.zeros((4, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="2-D"):
        packing.pack_hf(np.zeros(4, dtype=np.int8))
    with pytest.raises(ValueError, match="shape"):
        packing.unpack_hf(np.zeros((2, 8), dtype=np.uint8), 4)  # 4 rows pack into 1, not 2
    with pytest.raises(ValueError, match="code 3"):
        packing.unpack_hf(np.full((1, 8), 0xFF, dtype=np.uint8), 4)


# --- ours ----------------------------------------------------------------------------------------


def ours_by_formula(packed, n, k):
    """Decode every element by the layout's definition: row 4g+r, k = 256b + 64j + m lives in
    byte (g, 256b + 64r + m) at shift 2j."""
    rows, cols = np.meshgrid(np.arange(n), np.arange(k), indexing="ij")
    g, r = rows // 4, rows % 4
    b, j, m = cols // 256, (cols % 256) // 64, cols % 64
    byte = packed[g, 256 * b + 64 * r + m]
    return ((byte >> (2 * j)) & 3).astype(np.int8) - 1


@pytest.mark.parametrize(
    "n,k", [(1, 1), (3, 100), (4, 256), (5, 300), (9, 512), (17, 2560), (6, 3200)]
)
def test_ours_layout_and_roundtrip(rng, n, k):
    codes = ternary(rng, n, k)
    packed = packing.pack_ours(codes)
    g, kpad = -(-n // 4), -(-k // 256) * 256
    assert packed.shape == (g, kpad) == packing.ours_packed_shape(n, k)
    assert packed.dtype == np.uint8 and packed.flags.c_contiguous
    np.testing.assert_array_equal(ours_by_formula(packed, n, k), codes)
    # padding rows and columns hold zero weights (code 1)
    padded = ours_by_formula(packed, 4 * g, kpad)
    assert not padded[n:].any() and not padded[:, k:].any()
    np.testing.assert_array_equal(packing.unpack_ours(packed, n, k), codes)


def test_ours_errors(rng):
    packed = packing.pack_ours(ternary(rng, 5, 300))
    with pytest.raises(ValueError, match=r"shape \(2, 512\)"):
        packing.unpack_ours(packed[:1], 5, 300)
    with pytest.raises(ValueError, match="shape"):
        packing.unpack_ours(packed, 9, 300)
    with pytest.raises(ValueError, match="uint8"):
        packing.unpack_ours(packed.view(np.int8), 5, 300)
    with pytest.raises(ValueError, match="positive"):
        packing.ours_packed_shape(0, 256)
    with pytest.raises(ValueError, match="must be in"):
        packing.pack_ours(np.full((2, 2), -2, dtype=np.int8))


# --- ours, 1.6 bits --------------------------------------------------------------------------------


def t5_byte(t0, t1, t2, t3, t4):
    """The byte of the codes t0..t4 (`w + 1`), by the equation in packing.py's comment."""
    a, c = 9 * t0 + 3 * t1 + t2, 3 * t3 + t4
    return 64 * (a // 7) + 7 * c + a % 7


def ours_tq1_by_formula(packed, n, k):
    """Decode every element by the definition: row 4g+r, k = 320b + 64i + m lives in byte
    (g, 256b + 64r + m) as its i-th code; the byte -> codes map is inverted by a table."""
    table = np.full((256, 5), -9, dtype=np.int8)
    for t in np.ndindex(3, 3, 3, 3, 3):
        table[t5_byte(*t)] = t
    rows, cols = np.meshgrid(np.arange(n), np.arange(k), indexing="ij")
    g, r = rows // 4, rows % 4
    b, i, m = cols // 320, (cols % 320) // 64, cols % 64
    return table[packed[g, 256 * b + 64 * r + m], i] - 1


@pytest.mark.parametrize(
    "n,k", [(1, 1), (3, 100), (4, 320), (5, 321), (4097, 300), (6, 6912), (2, 2560)]
)
def test_ours_tq1_layout_and_roundtrip(rng, n, k):
    codes = ternary(rng, n, k)
    packed = packing.pack_ours_tq1(codes)
    g, nb = -(-n // 4), -(-k // 320)
    assert packed.shape == (g, 256 * nb) == packing.ours_tq1_packed_shape(n, k)
    assert packed.dtype == np.uint8 and packed.flags.c_contiguous
    np.testing.assert_array_equal(ours_tq1_by_formula(packed, n, k), codes)
    # padding rows and columns hold zero weights
    padded = ours_tq1_by_formula(packed, 4 * g, 320 * nb)
    assert not padded[n:].any() and not padded[:, k:].any()
    np.testing.assert_array_equal(packing.unpack_ours_tq1(packed, n, k), codes)


def test_ours_tq1_is_1_6_bits_and_every_byte_decodes_or_is_refused():
    # 1.6 bits per weight when K is a multiple of 320; 5 trits in each of 243 distinct bytes
    assert np.prod(packing.ours_tq1_packed_shape(8, 3200)) * 8 == 1.6 * 8 * 3200
    written = {t5_byte(*t): t for t in np.ndindex(3, 3, 3, 3, 3)}
    assert len(written) == 243 and max(written) < 256
    zero = t5_byte(1, 1, 1, 1, 1)
    for byte in range(256):
        packed = np.full((1, 256), zero, dtype=np.uint8)
        packed[0, 130] = byte  # row 2, byte 2: the codes of k = 2, 66, 130, 194, 258
        if byte in written:
            expected = np.zeros((3, 320), dtype=np.int8)
            expected[2, 2::64] = np.array(written[byte]) - 1
            np.testing.assert_array_equal(packing.unpack_ours_tq1(packed, 3, 320), expected)
        else:
            with pytest.raises(ValueError, match="corrupt"):
                packing.unpack_ours_tq1(packed, 3, 320)


def test_ours_tq1_errors(rng):
    packed = packing.pack_ours_tq1(ternary(rng, 5, 330))
    with pytest.raises(ValueError, match=r"shape \(2, 512\)"):
        packing.unpack_ours_tq1(packed[:1], 5, 330)
    with pytest.raises(ValueError, match="shape"):
        packing.unpack_ours_tq1(packed, 5, 300)  # one block of 320, not two
    with pytest.raises(ValueError, match="uint8"):
        packing.unpack_ours_tq1(packed.view(np.int8), 5, 330)
    with pytest.raises(ValueError, match="positive"):
        packing.ours_tq1_packed_shape(3, 0)
    with pytest.raises(ValueError, match="must be in"):
        packing.pack_ours_tq1(np.full((2, 2), 2, dtype=np.int8))


# --- GGUF TQ1_0 / TQ2_0 ----------------------------------------------------------------------------

TQ = [
    (GGMLQuantizationType.TQ2_0, packing.pack_tq2_0, packing.unpack_tq2_0, 66),
    (GGMLQuantizationType.TQ1_0, packing.pack_tq1_0, packing.unpack_tq1_0, 54),
]


@pytest.mark.parametrize("qtype,pack,unpack,block_bytes", TQ)
@pytest.mark.parametrize("n,k,scale", [(1, 256, 1.0), (3, 512, 1.555), (8, 2560, 0.0123)])
def test_tq_matches_gguf(rng, qtype, pack, unpack, block_bytes, n, k, scale):
    codes = ternary(rng, n, k)
    codes[0, :256] = 0  # an all-zero block: gguf writes d = 0
    if n > 1:
        codes[-1, -256:] = 1  # a block of +1 only
    weights = codes.astype(np.float32) * np.float32(scale)
    ours = pack(codes, scale)
    assert ours.shape == (n, k // 256 * block_bytes)
    assert gguf.GGML_QUANT_SIZES[qtype] == (256, block_bytes)
    np.testing.assert_array_equal(ours, quantize(weights, qtype))
    d16 = np.float32(np.float16(scale))
    np.testing.assert_array_equal(dequantize(ours, qtype), codes * d16)
    back, d = unpack(ours, n, k)
    np.testing.assert_array_equal(back, codes)
    expected_d = np.full((n, k // 256), d16, dtype=np.float32)
    expected_d[0, 0] = 0
    np.testing.assert_array_equal(d, expected_d)


@pytest.mark.parametrize("qtype,pack,unpack,block_bytes", TQ)
def test_tq_unpack_of_gguf_data(rng, qtype, pack, unpack, block_bytes):
    """Any float data gguf quantizes (one d per block) decodes to gguf's own dequantization."""
    weights = rng.standard_normal((5, 768)).astype(np.float32)
    data = quantize(weights, qtype)
    codes, d = unpack(data.tobytes(), 5, 768)
    per_elem_d = np.repeat(d, 256, axis=1)
    np.testing.assert_array_equal(codes * per_elem_d, dequantize(data, qtype))
    np.testing.assert_array_equal(pack(codes, d), data)  # per-block scales round-trip too


@pytest.mark.parametrize("qtype,pack,unpack,block_bytes", TQ)
def test_tq_errors(rng, qtype, pack, unpack, block_bytes):
    with pytest.raises(ValueError, match="multiple of 256"):
        pack(ternary(rng, 2, 300), 1.0)
    with pytest.raises(ValueError, match="multiple of 256"):
        unpack(np.zeros(2 * block_bytes, np.uint8), 2, 300)
    with pytest.raises(ValueError, match="bytes"):
        unpack(np.zeros(2 * block_bytes - 1, np.uint8), 2, 256)
    with pytest.raises(ValueError, match="scale"):
        pack(ternary(rng, 2, 256), -1.0)
    with pytest.raises(ValueError, match="fp16"):
        pack(ternary(rng, 2, 256), 1e6)


# --- bitnet.cpp I2_S -----------------------------------------------------------------------------


def i2_s_by_formula(codes, scale):
    """bitnet.cpp quantize_i2_s (x86, ACT_PARALLEL): flat index i*128 + j goes to byte
    i*32 + j%32 at shift 6 - 2*(j//32); the fp32 scale follows the n*k/4 bytes."""
    flat = codes.reshape(-1).astype(np.int64) + 1
    idx = np.arange(flat.size)
    i, j = idx // 128, idx % 128
    body = np.zeros(flat.size // 4, dtype=np.int64)
    np.bitwise_or.at(body, i * 32 + j % 32, flat << (6 - 2 * (j // 32)))
    return body.astype(np.uint8), np.float32(scale).tobytes()


@pytest.mark.parametrize("n,k", [(1, 128), (3, 256), (4, 2560), (7, 384)])
def test_i2_s_layout_and_roundtrip(rng, n, k):
    codes = ternary(rng, n, k)
    data = packing.pack_i2_s(codes, 1.555)
    body, scale_bytes = i2_s_by_formula(codes, 1.555)
    assert data.shape == (n * k // 4 + 32,) and data.dtype == np.uint8
    np.testing.assert_array_equal(data[: n * k // 4], body)
    assert data[n * k // 4 : n * k // 4 + 4].tobytes() == scale_bytes
    assert not data[n * k // 4 + 4 :].any()
    # bitnet.cpp leaves the last 28 tail bytes uninitialised: they must not matter
    dirty = data.copy()
    dirty[n * k // 4 + 4 :] = 0xAB
    back, scale = packing.unpack_i2_s(dirty.tobytes(), n, k)
    np.testing.assert_array_equal(back, codes)
    assert scale == np.float32(1.555) and isinstance(scale, np.float32)


def test_i2_s_errors(rng):
    with pytest.raises(ValueError, match="multiple of 128"):
        packing.pack_i2_s(ternary(rng, 2, 100), 1.0)
    with pytest.raises(ValueError, match="bytes"):
        packing.unpack_i2_s(np.zeros(2 * 128 // 4, np.uint8), 2, 128)  # tail missing
    with pytest.raises(ValueError, match="finite"):
        packing.pack_i2_s(ternary(rng, 2, 128), np.inf)
