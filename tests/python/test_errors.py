"""Every documented bad input raises the documented exception, with the library's message."""

import ml_dtypes
import numpy as np
import pytest

import qmoe
from conftest import encode_rtn, sparse_weights

W = np.linspace(-1, 1, 6 * 10, dtype=np.float32).reshape(6, 10)
S, L = qmoe.ternarize_rtn(W)
M = qmoe.encode(S, L)
M5 = qmoe.encode(S, L, codec="qmoe-p5")


def nan_weights():
    w = W.copy()
    w[2, 3] = np.nan
    return w


def bad_symbols():
    s = S.copy()
    s[0, 0] = 3
    return s


BAD_CALLS = {
    # ternarize_rtn
    "ternarize float64": (lambda: qmoe.ternarize_rtn(W.astype(np.float64)), ValueError, "float64"),
    "ternarize int": (lambda: qmoe.ternarize_rtn(np.ones((2, 2), np.int32)), ValueError, "int32"),
    "ternarize 1-D": (lambda: qmoe.ternarize_rtn(W[0]), ValueError, "dimensions"),
    "ternarize 3-D": (lambda: qmoe.ternarize_rtn(W[None]), ValueError, "dimensions"),
    "ternarize not contiguous": (lambda: qmoe.ternarize_rtn(W[:, ::2]), ValueError, "C-contiguous"),
    "ternarize transposed": (lambda: qmoe.ternarize_rtn(W.T), ValueError, "C-contiguous"),
    "ternarize NaN": (lambda: qmoe.ternarize_rtn(nan_weights()), ValueError, "non-finite"),
    "ternarize inf f16": (lambda: qmoe.ternarize_rtn(np.full((2, 2), np.inf, np.float16)), ValueError, "non-finite"),
    "ternarize uint16 without bf16": (lambda: qmoe.ternarize_rtn(W.view(np.uint16)), ValueError, "bf16=True"),
    "ternarize bf16 flag on float32": (lambda: qmoe.ternarize_rtn(W, bf16=True), ValueError, "bf16=True"),
    "ternarize None": (lambda: qmoe.ternarize_rtn(None), ValueError, "None"),
    # encode
    "encode symbols int64": (lambda: qmoe.encode(S.astype(np.int64), L), ValueError, "uint8"),
    "encode symbols 1-D": (lambda: qmoe.encode(S[0], L), ValueError, "dimensions"),
    "encode symbol 3": (lambda: qmoe.encode(bad_symbols(), L), ValueError, "symbol"),
    "encode levels float32": (lambda: qmoe.encode(S, L.astype(np.float32)), ValueError, "levels"),
    "encode levels wrong rows": (lambda: qmoe.encode(S, L[:3]), ValueError, "shape"),
    "encode levels wrong cols": (lambda: qmoe.encode(S, np.zeros((6, 3), np.uint16)), ValueError, "shape"),
    "encode unknown codec": (lambda: qmoe.encode(S, L, codec="zstd"), ValueError, "unknown codec"),
    "encode unknown codec lists the codecs": (
        lambda: qmoe.encode(S, L, codec="qmoe-v4"), ValueError,
        r"unknown codec 'qmoe-v4' \(expected 'qmoe-v1', 'qmoe-v2', 'qmoe-v3', 'qmoe-g4', 'qmoe-p5', or 'auto'\)"),
    "encode unknown target": (lambda: qmoe.encode(S, L, target="tpu"), ValueError,
                              r"unknown target 'tpu' \(expected 'any', 'cpu' or 'gpu'\)"),
    "transcode unknown target": (lambda: qmoe.transcode(M, target="CPU"), ValueError, "unknown target 'CPU'"),
    "transcode unknown codec lists the codecs": (lambda: qmoe.transcode(M, codec="v3"), ValueError,
                                                 "'qmoe-v3'"),
    "encode unknown dtype": (lambda: qmoe.encode(S, L, original_dtype="F8"), ValueError, "dtype"),
    # CompressedMatrix products
    "matvec wrong length": (lambda: M.matvec(np.ones(9, np.float32)), ValueError, "10 elements"),
    "matvec 2-D": (lambda: M.matvec(np.ones((1, 10), np.float32)), ValueError, "dimensions"),
    "matvec float64": (lambda: M.matvec(np.ones(10)), ValueError, "float64"),
    "matvec strided": (lambda: M.matvec(np.ones(20, np.float32)[::2]), ValueError, "C-contiguous"),
    "matmul wrong cols": (lambda: M5.matmul(np.ones((3, 9), np.float32)), ValueError, "shape"),
    "matmul 1-D": (lambda: M.matmul(np.ones(10, np.float32)), ValueError, "dimensions"),
    "matmul Fortran order": (lambda: M.matmul(np.ones((10, 3), np.float32).T), ValueError, "C-contiguous"),
    # from_tensors
    "from_tensors unknown codec": (lambda: qmoe.CompressedMatrix.from_tensors("auto", (6, 10), levels=L), ValueError,
                                   r"unknown codec 'auto' \(expected 'qmoe-v1', 'qmoe-v2', 'qmoe-v3', 'qmoe-g4', 'qmoe-p5'\)"),
    "from_tensors v3 without dictionary": (lambda: qmoe.CompressedMatrix.from_tensors(
        "qmoe-v3", (6, 10), levels=L, codes=M.codes, row_offsets=M.row_offsets), ValueError, "qmoe-v3 needs dictionary"),
    "from_tensors v1 with dictionary": (lambda: qmoe.CompressedMatrix.from_tensors(
        "qmoe-v1", (6, 10), levels=L, codes=M.codes, row_offsets=M.row_offsets, dictionary=qmoe.v3_dictionary(0.9)[0]),
        ValueError, "only for qmoe-v2 and qmoe-v3"),
    "from_tensors v1 without codes": (lambda: qmoe.CompressedMatrix.from_tensors("qmoe-v1", (6, 10), levels=L),
                                      ValueError, "codes"),
    "from_tensors p5 with codes": (lambda: qmoe.CompressedMatrix.from_tensors(
        "qmoe-p5", (6, 10), levels=L, packed=M5.packed, codes=M.codes), ValueError, "only for qmoe-v1"),
    "from_tensors codes int32": (lambda: qmoe.CompressedMatrix.from_tensors(
        "qmoe-v1", (6, 10), levels=L, codes=M.codes.astype(np.int32), row_offsets=M.row_offsets), ValueError, "uint16"),
    "from_tensors negative shape": (lambda: qmoe.CompressedMatrix.from_tensors("qmoe-p5", (-1, 10), levels=L,
                                                                               packed=M5.packed), ValueError, "negative"),
    # Hessians and GPTQ
    "hessian negative columns": (lambda: qmoe.HessianAccumulator(-1), ValueError, "negative"),
    "hessian negative cap": (lambda: qmoe.HessianAccumulator(4, token_cap=-2), ValueError, "negative"),
    "hessian add wrong columns": (lambda: qmoe.HessianAccumulator(4).add(np.ones((2, 5), np.float32)), ValueError,
                                  "4 columns"),
    "hessian add 1-D": (lambda: qmoe.HessianAccumulator(4).add(np.ones(4, np.float32)), ValueError, "tokens, columns"),
    "hessian add float64": (lambda: qmoe.HessianAccumulator(4).add(np.ones((2, 4))), ValueError, "float64"),
    "hessian add column stride": (lambda: qmoe.HessianAccumulator(4).add(np.ones((3, 8), np.float32)[:, ::2]),
                                  ValueError, "contiguous"),
    "hessian add NaN": (lambda: qmoe.HessianAccumulator(2).add(np.array([[1, np.nan]], np.float32)), ValueError,
                        "finite"),
    "hessian merge sizes": (lambda: qmoe.HessianAccumulator(2).merge(qmoe.HessianAccumulator(3)), ValueError, "dimension"),
    "token cap no experts": (lambda: qmoe.expert_token_cap(10, 0), ValueError, "num_experts"),
    "gptq wrong hessian shape": (lambda: qmoe.gptq(W, np.eye(9, dtype=np.float32)), ValueError, r"\(10, 10\)"),
    "gptq hessian float64": (lambda: qmoe.gptq(W, np.eye(10)), ValueError, "float64"),
    "gptq NaN weights": (lambda: qmoe.gptq(nan_weights()), ValueError, "non-finite"),
    "gptq unknown grid": (lambda: qmoe.gptq(W, grid="binary"), ValueError, "unknown grid"),
    "gptq negative percdamp": (lambda: qmoe.gptq(W, np.eye(10, dtype=np.float32), percdamp=-1.0), ValueError, "percdamp"),
    "gptq zero blocksize": (lambda: qmoe.gptq(W, np.eye(10, dtype=np.float32), blocksize=0), ValueError, "blocksize"),
    "compress uniform grid": (lambda: qmoe.compress_matrix(W, grid="uniform2"), ValueError, "ternary"),
    "compress unknown codec": (lambda: qmoe.compress_matrix(W, codec="qmoe-v9"), ValueError, "unknown codec"),
    "v3_dictionary p0 out of range": (lambda: qmoe.v3_dictionary(1.0), ValueError, "p0"),
}


@pytest.mark.parametrize("case", sorted(BAD_CALLS))
def test_bad_arguments_raise(case):
    call, exc, match = BAD_CALLS[case]
    with pytest.raises(exc, match=match) as info:
        call()
    assert str(info.value), "the exception carries a message"
    if exc is ValueError:
        assert not isinstance(info.value, qmoe.FormatError)


def test_format_error_is_a_runtime_error_not_a_value_error():
    assert issubclass(qmoe.FormatError, RuntimeError)
    assert not issubclass(qmoe.FormatError, ValueError)
    assert qmoe.FormatError.__doc__


def corrupt_stream_cases():
    rng = np.random.default_rng(7)
    m, _, _ = encode_rtn(sparse_weights(rng, 4, 30), "qmoe-v1")
    p, _, _ = encode_rtn(sparse_weights(rng, 4, 30), "qmoe-p5")
    offsets = m.row_offsets.copy()
    offsets[-1] += 1
    decreasing = m.row_offsets.copy()
    decreasing[1], decreasing[2] = decreasing[2] + 1, decreasing[1]
    packed = p.packed.copy()
    packed[0] = 243
    levels = m.levels.copy()
    levels[0, 0] = np.array([1.0], ml_dtypes.bfloat16).view(np.uint16)[0]  # lo > 0
    v1 = dict(codes=m.codes, row_offsets=m.row_offsets, levels=m.levels)
    return {
        "offsets past the codes": ("qmoe-v1", dict(v1, row_offsets=offsets), "row_offsets"),
        "decreasing offsets": ("qmoe-v1", dict(v1, row_offsets=decreasing), "row_offsets"),
        "too few offsets": ("qmoe-v1", dict(v1, row_offsets=m.row_offsets[:-1]), "row_offsets"),
        "codes cut short": ("qmoe-v1", dict(v1, codes=m.codes[:-1], row_offsets=np.minimum(m.row_offsets, m.codes.size - 1)),
                            "row"),
        "p5 byte above 242": ("qmoe-p5", dict(packed=packed, levels=p.levels), "242"),
        "p5 too few bytes": ("qmoe-p5", dict(packed=p.packed[:-1], levels=p.levels), "bytes"),
        "positive low level": ("qmoe-v1", dict(v1, levels=levels), "lo"),
        "levels of the wrong size": ("qmoe-v1", dict(v1, levels=m.levels[:-1]), "levels"),
    }


@pytest.mark.parametrize("case", sorted(corrupt_stream_cases()))
def test_malformed_streams_raise_format_error(case):
    codec, kw, match = corrupt_stream_cases()[case]
    with pytest.raises(qmoe.FormatError, match=match):
        qmoe.CompressedMatrix.from_tensors(codec, (4, 30), **kw)


def test_bad_files_raise_format_error(tmp_path):
    with pytest.raises(qmoe.FormatError, match="nope"):
        qmoe.load(tmp_path / "nope.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\xff" * 64)
    with pytest.raises(qmoe.FormatError, match="garbage"):
        qmoe.load(garbage)
    good = tmp_path / "good.safetensors"
    qmoe.save(good, {"m": M, "x": np.ones(100, np.float32)})
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-10])
    with pytest.raises(qmoe.FormatError, match="truncated"):
        qmoe.load(truncated)
    with pytest.raises(qmoe.FormatError):
        qmoe.load_metadata(truncated)
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(qmoe.FormatError):
        qmoe.load(empty_dir)
    with pytest.raises(qmoe.FormatError):
        qmoe.load_hessians(garbage)


def test_plain_safetensors_is_not_a_container(tmp_path):
    from safetensors.numpy import save_file

    path = tmp_path / "plain.safetensors"
    save_file({"x": np.ones(3, np.float32)}, str(path))
    with pytest.raises(qmoe.FormatError, match="not a qmoe container"):
        qmoe.load(path)


def test_bad_save_arguments_raise_value_error(tmp_path):
    out = tmp_path / "o.safetensors"
    cases = {
        "reserved name": ({"qmoe.x": np.ones(2, np.float32)}, "reserved"),
        "reserved member suffix": ({"w.qmoe_codes": np.ones(2, np.float32)}, "reserved"),
        "complex dtype": ({"z": np.ones(2, np.complex64)}, "cannot be stored"),
        "object dtype": ({"o": np.array([None, 1], dtype=object)}, "cannot be stored"),
        "big-endian": ({"b": np.ones(2, ">f4")}, "big-endian"),
        "not contiguous": ({"n": np.ones((4, 4), np.float32)[:, ::2]}, "C-contiguous"),
        "non-str name": ({3: np.ones(2, np.float32)}, "str"),
    }
    for case, (tensors, match) in cases.items():
        with pytest.raises(ValueError, match=match):
            qmoe.save(out, tensors)
        assert not out.exists(), case
    with pytest.raises(ValueError, match="reserved"):
        qmoe.save(out, {"x": np.ones(2, np.float32)}, metadata={"format": "other"})
    with pytest.raises(ValueError):
        qmoe.save(out, {"x": np.ones(2, np.float32)}, shard_size=-1)
    with pytest.raises(ValueError):
        qmoe.save_hessians(tmp_path / "h.safetensors", {"a.xtx": qmoe.HessianAccumulator(2)})
    assert not out.exists()
