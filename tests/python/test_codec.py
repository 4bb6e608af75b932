"""Round trips through ternarize_rtn / encode / decode, and the CPU products from Python."""

import gc

import ml_dtypes
import numpy as np
import pytest

import qmoe
from conftest import CODECS, bf16_bits_to_float, dense_from_ternary, encode_rtn, nmse, sparse_weights

SHAPES = [(1, 1), (1, 2), (3, 7), (5, 33), (16, 64), (7, 255), (33, 130)]


def rtn_expected(w):
    """Round-to-nearest as documented (test-side oracle): levels are bf16(min/max(row, 0))."""
    w = w.astype(np.float32)
    lo = np.minimum(w.min(axis=1), 0).astype(ml_dtypes.bfloat16).astype(np.float32)
    hi = np.maximum(w.max(axis=1), 0).astype(ml_dtypes.bfloat16).astype(np.float32)
    zero_row = (lo == 0) & (hi == 0)
    lo[zero_row], hi[zero_row] = -1.0, 1.0
    s = np.zeros(w.shape, dtype=np.uint8)
    s[w > hi[:, None] / 2] = 2
    s[w < lo[:, None] / 2] = 1
    return s, lo, hi


@pytest.mark.parametrize("shape", SHAPES)
def test_ternarize_rtn_follows_the_documented_rule(rng, shape):
    w = rng.standard_normal(shape).astype(np.float32)
    w[0, :] = 0.0  # a zero row gets (-1, +1)
    s, l = qmoe.ternarize_rtn(w)
    assert s.dtype == np.uint8 and s.shape == shape
    assert l.dtype == np.uint16 and l.shape == (shape[0], 2)
    want_s, want_lo, want_hi = rtn_expected(w)
    np.testing.assert_array_equal(s, want_s)
    np.testing.assert_array_equal(bf16_bits_to_float(l[:, 0]), want_lo)
    np.testing.assert_array_equal(bf16_bits_to_float(l[:, 1]), want_hi)
    assert bf16_bits_to_float(l[0]).tolist() == [-1.0, 1.0]


@pytest.mark.parametrize("codec", CODECS + ["auto"])
@pytest.mark.parametrize("shape", SHAPES)
def test_encode_decode_round_trip(rng, codec, shape):
    w = sparse_weights(rng, *shape)
    m, s, l = encode_rtn(w, codec)
    assert m.shape == shape and (m.rows, m.cols) == shape
    assert m.codec in CODECS
    if codec != "auto":
        assert m.codec == codec
    np.testing.assert_array_equal(m.decode_symbols(), s)
    dense = m.decode()
    assert dense.dtype == np.float32 and dense.shape == shape
    np.testing.assert_array_equal(dense, dense_from_ternary(s, l))
    np.testing.assert_array_equal(m.levels, l)


def test_empty_matrices_round_trip():
    for shape in [(0, 5), (4, 0), (0, 0)]:
        w = np.zeros(shape, dtype=np.float32)
        s, l = qmoe.ternarize_rtn(w)
        assert s.shape == shape and l.shape == (shape[0], 2)
        for codec in CODECS:
            m = qmoe.encode(s, l, codec=codec)
            assert m.shape == shape
            assert m.decode().shape == shape
            assert m.bits_per_weight == 0.0 or shape[0] * shape[1] > 0
            assert m.matvec(np.zeros(shape[1], np.float32)).shape == (shape[0],)


@pytest.mark.parametrize("target,codec", [("any", "qmoe-v1"), ("cpu", "qmoe-g4"), ("gpu", "qmoe-v2")])
def test_automatic_codec_follows_the_target(rng, target, codec):
    w = sparse_weights(rng, 16, 200)
    s, l = qmoe.ternarize_rtn(w)
    m = qmoe.encode(s, l, codec="auto", target=target)
    assert m.codec == codec
    np.testing.assert_array_equal(m.decode_symbols(), s)
    t = qmoe.transcode(qmoe.encode(s, l), codec="auto", target=target)
    assert t.codec == codec
    assert qmoe.transcode(m, target=target).codec == codec  # codec defaults to "auto"
    with pytest.raises(ValueError, match="unknown target"):
        qmoe.encode(s, l, codec="auto", target="tpu")


def test_encoding_is_deterministic(rng):
    w = sparse_weights(rng, 40, 300)
    a, _, _ = encode_rtn(w)
    b, _, _ = encode_rtn(w)
    np.testing.assert_array_equal(a.codes, b.codes)
    np.testing.assert_array_equal(a.row_offsets, b.row_offsets)
    s, l = qmoe.ternarize_rtn(w)
    c = qmoe.encode(s, l, threads=1)
    np.testing.assert_array_equal(a.codes, c.codes)


def test_sparse_matrix_is_below_one_bit(rng):
    w = sparse_weights(rng, 256, 1024, zero_fraction=0.92)
    m, s, _ = encode_rtn(w, "qmoe-v1")
    assert (s == 0).mean() > 0.88
    assert m.bits_per_weight < 1.0
    assert m.code_bits_per_weight < m.bits_per_weight
    # nbytes counts the codes, the row offsets and the levels.
    assert m.nbytes == m.codes.nbytes + m.row_offsets.nbytes + m.levels.nbytes
    assert m.bits_per_weight == pytest.approx(m.nbytes * 8 / w.size)
    assert "qmoe-v1" in repr(m)


def test_raw_tensors(rng):
    w = sparse_weights(rng, 9, 21)
    v1, _, l = encode_rtn(w, "qmoe-v1")
    assert v1.codes.dtype == np.uint16 and v1.codes.ndim == 1
    assert v1.row_offsets.dtype == np.int32 and v1.row_offsets.shape == (10,)
    assert v1.row_offsets[0] == 0 and v1.row_offsets[-1] == v1.codes.size
    assert v1.packed is None
    p5, _, _ = encode_rtn(w, "qmoe-p5")
    assert p5.codes is None and p5.row_offsets is None
    assert p5.packed.dtype == np.uint8 and p5.packed.size == 9 * 5  # ceil(21/5) bytes a row
    assert p5.packed.max() <= 242
    for arr in [v1.codes, v1.row_offsets, v1.levels, p5.packed]:
        assert not arr.flags.writeable
        with pytest.raises(ValueError):
            arr[0] = 1


def test_raw_tensor_views_keep_the_matrix_alive(rng):
    w = sparse_weights(rng, 8, 50)
    m, _, _ = encode_rtn(w)
    codes, want = m.codes, m.codes.copy()
    del m
    gc.collect()
    np.testing.assert_array_equal(codes, want)


@pytest.mark.parametrize("codec", CODECS)
def test_from_tensors_round_trip(rng, codec):
    w = sparse_weights(rng, 12, 37)
    m, s, l = encode_rtn(w, codec)
    if codec == "qmoe-v1":
        m2 = qmoe.CompressedMatrix.from_tensors(codec, m.shape, levels=m.levels, codes=m.codes,
                                                row_offsets=m.row_offsets, original_dtype="BF16")
    elif codec in ("qmoe-v2", "qmoe-v3"):
        m2 = qmoe.CompressedMatrix.from_tensors(codec, m.shape, levels=m.levels, codes=m.codes,
                                                row_offsets=m.row_offsets, dictionary=m.dictionary)
        assert m2.dictionary_id == m.dictionary_id
    elif codec == "qmoe-g4":
        assert m.codes is None and m.packed is None and m.dictionary is None
        assert m.group_offsets.dtype == np.int32 and m.group_offsets.shape == (2 * (12 // 4 + 1),)
        m2 = qmoe.CompressedMatrix.from_tensors(codec, m.shape, levels=m.levels, tokens=m.tokens,
                                                kinds=m.kinds, group_offsets=m.group_offsets)
    else:
        m2 = qmoe.CompressedMatrix.from_tensors(codec, m.shape, levels=m.levels.view(ml_dtypes.bfloat16),
                                                packed=m.packed)
    assert m2.codec == codec and m2.shape == m.shape
    np.testing.assert_array_equal(m2.decode_symbols(), s)
    assert m2.original_dtype == ("BF16" if codec == "qmoe-v1" else "F32")


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("shape", SHAPES)
def test_matvec_matches_the_decoded_matrix(rng, codec, shape):
    w = sparse_weights(rng, *shape)
    m, _, _ = encode_rtn(w, codec)
    x = rng.standard_normal(shape[1]).astype(np.float32)
    y = m.matvec(x, int8_activations=False)
    assert y.dtype == np.float32 and y.shape == (shape[0],)
    want = m.decode().astype(np.float64) @ x.astype(np.float64)
    assert nmse(y, want) < 1e-10
    np.testing.assert_array_equal(m.matvec(x, threads=1), m.matvec(x, threads=2))
    # int8 inputs (qmoe-g4 on CPUs with the kernel): within half a quantization step per weight.
    bound = np.abs(m.decode()).astype(np.float64) @ np.full(shape[1], np.abs(x).max() / 254 * (1 + 1e-6))
    assert np.all(np.abs(m.matvec(x).astype(np.float64) - want) <= bound + 1e-6 * np.abs(want) + 1e-30)


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("n", [0, 1, 3, 32, 33, 70])
def test_matmul_matches_the_decoded_matrix(rng, codec, n):
    w = sparse_weights(rng, 19, 45)
    m, _, _ = encode_rtn(w, codec)
    X = rng.standard_normal((n, 45)).astype(np.float32)
    Y = m.matmul(X, int8_activations=False)
    assert Y.dtype == np.float32 and Y.shape == (n, 19)
    want = X.astype(np.float64) @ m.decode().astype(np.float64).T
    if n:
        assert nmse(Y, want) < 1e-10
        np.testing.assert_allclose(Y[0], m.matvec(X[0], int8_activations=False), rtol=1e-5, atol=1e-5)


def test_half_precision_inputs(rng):
    # Values exactly representable in float16 and bfloat16: every dtype gives the same answer.
    w = (rng.integers(-8, 9, size=(6, 30)) / 8).astype(np.float32)
    s32, l32 = qmoe.ternarize_rtn(w)
    for variant in [dict(w=w.astype(np.float16)),
                    dict(w=w.astype(ml_dtypes.bfloat16)),
                    dict(w=w.astype(ml_dtypes.bfloat16).view(np.uint16), bf16=True)]:
        s, l = qmoe.ternarize_rtn(**variant)
        np.testing.assert_array_equal(s, s32)
        np.testing.assert_array_equal(l, l32)
    m = qmoe.encode(s32, l32)
    x = (rng.integers(-4, 5, size=30) / 4).astype(np.float32)
    y = m.matvec(x)
    np.testing.assert_array_equal(m.matvec(x.astype(np.float16)), y)
    np.testing.assert_array_equal(m.matvec(x.astype(ml_dtypes.bfloat16)), y)
    np.testing.assert_array_equal(m.matvec(x.astype(ml_dtypes.bfloat16).view(np.uint16), bf16=True), y)
    X = np.stack([x, -x])
    np.testing.assert_array_equal(m.matmul(X.astype(np.float16)), m.matmul(X))


def test_levels_as_bfloat16_are_accepted(rng):
    w = sparse_weights(rng, 5, 20)
    s, l = qmoe.ternarize_rtn(w)
    a = qmoe.encode(s, l)
    b = qmoe.encode(s, l.view(ml_dtypes.bfloat16))
    np.testing.assert_array_equal(a.codes, b.codes)
    np.testing.assert_array_equal(a.levels, b.levels)


class ArrayLike:
    """An object numpy converts through __array__, as it does CPU torch tensors."""

    def __init__(self, a):
        self.a = a

    def __array__(self, dtype=None, copy=None):
        return self.a


def test_array_likes_are_converted(rng):
    w = sparse_weights(rng, 3, 10)
    s, l = qmoe.ternarize_rtn(w)
    s2, l2 = qmoe.ternarize_rtn(ArrayLike(w))
    np.testing.assert_array_equal(s, s2)
    np.testing.assert_array_equal(l, l2)
    m = qmoe.encode(s, l)
    x = np.ones(10, np.float32)
    np.testing.assert_array_equal(m.matvec(ArrayLike(x)), m.matvec(x))
    # A Python list of floats becomes float64, which is refused rather than silently narrowed.
    with pytest.raises(ValueError, match="float64"):
        m.matvec([0.0] * 10)


def test_calls_from_several_threads(rng):
    from concurrent.futures import ThreadPoolExecutor

    w = sparse_weights(rng, 64, 512)
    m, _, _ = encode_rtn(w)
    xs = [rng.standard_normal(512).astype(np.float32) for _ in range(16)]
    want = [m.matvec(x) for x in xs]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(m.matvec, xs))
    for g, e in zip(got, want):
        np.testing.assert_array_equal(g, e)


def order0_entropy(p0):
    p1 = (1 - p0) / 2
    return -(p0 * np.log2(p0) + 2 * p1 * np.log2(p1))


@pytest.mark.parametrize("p0", [0.885, 0.95])
def test_v2_is_smaller_than_v1_and_near_the_entropy(rng, p0):
    u = rng.random((128, 3072))
    s = np.where(u < p0, 0, np.where(u < p0 + (1 - p0) / 2, 1, 2)).astype(np.uint8)
    l = np.tile(np.array([0xBF80, 0x3F80], np.uint16), (128, 1))  # (-1, +1)
    v1 = qmoe.encode(s, l, codec="qmoe-v1")
    v2 = qmoe.encode(s, l, codec="qmoe-v2")
    np.testing.assert_array_equal(v2.decode_symbols(), s)
    h = order0_entropy(p0)
    assert h * 0.99 < v2.code_bits_per_weight < v1.code_bits_per_weight
    if p0 == 0.885:
        assert v2.code_bits_per_weight < 1.07 * h
    else:
        assert v2.code_bits_per_weight < 0.7 * v1.code_bits_per_weight
    # The dictionary: 65536 uint32 entry words, named by the XXH3-64 of their bytes.
    d = v2.dictionary
    assert d.dtype == np.uint32 and d.shape == (65536,) and not d.flags.writeable
    assert len(v2.dictionary_id) == 16 and v1.dictionary is None and v1.dictionary_id is None
    widths = d >> 26
    assert widths.min() >= 1 and widths.max() == 63


def test_v2_dictionary_parameters(rng):
    w = sparse_weights(rng, 20, 300)
    s, l = qmoe.ternarize_rtn(w)
    a = qmoe.encode(s, l, codec="qmoe-v2", v2_max_width=32, fitted_p0=0.9)
    assert int((a.dictionary >> 26).max()) <= 32
    np.testing.assert_array_equal(a.decode_symbols(), s)
    b = qmoe.encode(s, l, codec="qmoe-v2", v2_max_width=32, fitted_p0=0.9)
    assert a.dictionary_id == b.dictionary_id
    with pytest.raises(ValueError):
        qmoe.encode(s, l, codec="qmoe-v2", v2_max_width=64)
    with pytest.raises(ValueError):
        qmoe.encode(s, l, codec="qmoe-v2", fitted_p0=1.0)
    # v2_p0: the deprecated spelling of fitted_p0, the same dictionary with a warning; not both.
    with pytest.warns(DeprecationWarning, match="fitted_p0"):
        c = qmoe.encode(s, l, codec="qmoe-v2", v2_max_width=32, v2_p0=0.9)
    assert c.dictionary_id == a.dictionary_id
    with pytest.warns(DeprecationWarning):
        assert qmoe.transcode(c, codec="qmoe-v3", v2_p0=0.9).codec == "qmoe-v3"
    with pytest.raises(ValueError, match="together"):
        qmoe.encode(s, l, codec="qmoe-v2", fitted_p0=0.9, v2_p0=0.9)


def test_v2_from_tensors_rejects_a_broken_dictionary(rng):
    m, _, _ = encode_rtn(sparse_weights(rng, 4, 70), "qmoe-v2")
    d = m.dictionary.copy()
    d[5] = 0  # width 0
    with pytest.raises(qmoe.FormatError, match="entry 5"):
        qmoe.CompressedMatrix.from_tensors("qmoe-v2", m.shape, levels=m.levels, codes=m.codes,
                                           row_offsets=m.row_offsets, dictionary=d)
    with pytest.raises(ValueError, match="dictionary"):
        qmoe.CompressedMatrix.from_tensors("qmoe-v2", m.shape, levels=m.levels, codes=m.codes,
                                           row_offsets=m.row_offsets)
    with pytest.raises(ValueError, match="dictionary"):
        qmoe.CompressedMatrix.from_tensors("qmoe-v1", m.shape, levels=m.levels, codes=m.codes,
                                           row_offsets=m.row_offsets, dictionary=m.dictionary)


def test_transcode_between_codecs(rng):
    w = sparse_weights(rng, 30, 500)
    s, l = qmoe.ternarize_rtn(w)
    v1 = qmoe.encode(s, l, codec="qmoe-v1", original_dtype="BF16")
    v2 = qmoe.transcode(v1, codec="qmoe-v2")
    assert v2.codec == "qmoe-v2" and v2.original_dtype == "BF16"
    direct = qmoe.encode(s, l, codec="qmoe-v2")
    np.testing.assert_array_equal(v2.codes, direct.codes)
    assert v2.dictionary_id == direct.dictionary_id
    back = qmoe.transcode(v2, codec="qmoe-v1")
    np.testing.assert_array_equal(back.codes, v1.codes)
    np.testing.assert_array_equal(back.decode(), v1.decode())
    with pytest.raises(ValueError):
        qmoe.transcode(v1, codec="qmoe-v9")


def test_v2_dictionary_matches_the_spec_example():
    d, dict_id = qmoe.v2_dictionary(57 / 64)
    assert d.dtype == np.uint32 and d.shape == (65536,)
    assert dict_id == "ed96d927233f97b2"  # format/SPEC.md section 4.3.2
    assert int(d[20000]) == 0x60C57549
    with pytest.raises(ValueError):
        qmoe.v2_dictionary(1.5)


@pytest.mark.parametrize("shape", SHAPES + [(0, 5), (4, 0), (8, 64)])
def test_v3_round_trip_codes_rows_in_pairs(rng, shape):
    w = sparse_weights(rng, *shape)
    m, s, l = encode_rtn(w, "qmoe-v3")
    assert m.codec == "qmoe-v3" and m.shape == shape and "qmoe-v3" in repr(m)
    np.testing.assert_array_equal(m.decode_symbols(), s)
    np.testing.assert_array_equal(m.decode(), dense_from_ternary(s, l))
    np.testing.assert_array_equal(m.levels, l)
    # A pair's codes are its even row's range; every odd row's range is empty.
    ro = m.row_offsets
    assert ro.shape == (shape[0] + 1,) and ro[0] == 0 and ro[-1] == m.codes.size
    odd = np.arange(1, shape[0], 2)
    np.testing.assert_array_equal(ro[odd], ro[odd + 1])
    assert m.packed is None
    d = m.dictionary
    assert d.dtype == np.uint32 and d.shape == (65536,) and not d.flags.writeable
    assert len(m.dictionary_id) == 16
    assert m.nbytes == m.codes.nbytes + m.row_offsets.nbytes + m.levels.nbytes


def test_v3_size_between_v2_and_v1(rng):
    # format/SPEC.md section 4.4: ~0.69 bits per weight at P(0) = 0.885 against 0.666 for qmoe-v2
    # and 0.737 for qmoe-v1.
    p0 = 0.885
    u = rng.random((128, 3072))
    s = np.where(u < p0, 0, np.where(u < p0 + (1 - p0) / 2, 1, 2)).astype(np.uint8)
    l = np.tile(np.array([0xBF80, 0x3F80], np.uint16), (128, 1))  # (-1, +1)
    v1, v2, v3 = (qmoe.encode(s, l, codec=c) for c in ("qmoe-v1", "qmoe-v2", "qmoe-v3"))
    np.testing.assert_array_equal(v3.decode_symbols(), s)
    assert v2.code_bits_per_weight < v3.code_bits_per_weight < v1.code_bits_per_weight
    assert v3.code_bits_per_weight == pytest.approx(0.689, abs=0.01)


def test_v3_dictionary_matches_the_spec_example(rng):
    d, dict_id = qmoe.v3_dictionary(57 / 64)
    assert d.dtype == np.uint32 and d.shape == (65536,)
    assert dict_id == "11ccb88076bd615f"  # format/SPEC.md section 4.4.2
    assert int(d[20000]) == 0x300C40B9
    assert (d >> 26).min() >= 1 and (d >> 26).max() <= 63 and not ((d >> 25) & 1).any()
    assert dict_id != qmoe.v2_dictionary(57 / 64)[1]
    # The encoder uses it for that zero fraction.
    s, l = qmoe.ternarize_rtn(sparse_weights(rng, 6, 90))
    m = qmoe.encode(s, l, codec="qmoe-v3", fitted_p0=57 / 64)
    assert m.dictionary_id == dict_id
    np.testing.assert_array_equal(m.dictionary, d)
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError):
            qmoe.v3_dictionary(bad)
    with pytest.raises(TypeError):
        qmoe.v3_dictionary(0.9, 32)  # no max_width for qmoe-v3


def test_transcode_to_and_from_v3(rng):
    w = sparse_weights(rng, 31, 500)  # odd height: the last pair has a row of zeros
    s, l = qmoe.ternarize_rtn(w)
    v1 = qmoe.encode(s, l, codec="qmoe-v1", original_dtype="BF16")
    v3 = qmoe.transcode(v1, codec="qmoe-v3")
    assert v3.codec == "qmoe-v3" and v3.original_dtype == "BF16"
    direct = qmoe.encode(s, l, codec="qmoe-v3")
    np.testing.assert_array_equal(v3.codes, direct.codes)
    np.testing.assert_array_equal(v3.row_offsets, direct.row_offsets)
    assert v3.dictionary_id == direct.dictionary_id
    # To qmoe-v2 (the GPU's codec): the codes of encoding with qmoe-v2 directly.
    v2 = qmoe.transcode(v3, codec="qmoe-v2")
    np.testing.assert_array_equal(v2.codes, qmoe.encode(s, l, codec="qmoe-v2").codes)
    back = qmoe.transcode(v3, codec="qmoe-v1")
    np.testing.assert_array_equal(back.codes, v1.codes)
    np.testing.assert_array_equal(v3.decode(), v1.decode())


def test_v3_from_tensors(rng):
    m, s, _ = encode_rtn(sparse_weights(rng, 5, 70), "qmoe-v3")
    kw = dict(levels=m.levels, codes=m.codes, row_offsets=m.row_offsets)
    m2 = qmoe.CompressedMatrix.from_tensors("qmoe-v3", m.shape, dictionary=m.dictionary, **kw)
    assert m2.codec == "qmoe-v3" and m2.dictionary_id == m.dictionary_id
    np.testing.assert_array_equal(m2.decode_symbols(), s)
    with pytest.raises(ValueError, match="qmoe-v3 needs dictionary"):
        qmoe.CompressedMatrix.from_tensors("qmoe-v3", m.shape, **kw)
    d = m.dictionary.copy()
    d[5] |= np.uint32(1 << 25)  # the reserved bit
    with pytest.raises(qmoe.FormatError, match="qmoe-v3 dictionary entry 5"):
        qmoe.CompressedMatrix.from_tensors("qmoe-v3", m.shape, dictionary=d, **kw)
    # Row 1 given the last code of pair 0.
    ro = m.row_offsets.copy()
    assert ro[1] > 0 and ro[1] == ro[2]
    ro[1] -= 1
    with pytest.raises(qmoe.FormatError, match="row 1 has codes"):
        qmoe.CompressedMatrix.from_tensors("qmoe-v3", m.shape, dictionary=m.dictionary,
                                           **dict(kw, row_offsets=ro))
