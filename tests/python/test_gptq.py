"""Hessian accumulation and GPTQ from Python."""

import ml_dtypes
import numpy as np
import pytest

import qmoe
from conftest import dense_from_ternary


def calibration(rng, tokens, cols, rank=8):
    """Structured inputs: strongly correlated features (low rank plus a little noise), where
    GPTQ's error feedback has something to exploit."""
    basis = rng.standard_normal((rank, cols)).astype(np.float32)
    x = rng.standard_normal((tokens, rank)).astype(np.float32) @ basis
    return x + 0.05 * rng.standard_normal((tokens, cols)).astype(np.float32)


def output_error(w, q, x):
    d = (w.astype(np.float64) - q.astype(np.float64)) @ x.astype(np.float64).T
    return float(np.sum(d * d)) / x.shape[0]


def test_hessian_is_two_over_n_xtx(rng):
    x = rng.standard_normal((700, 48)).astype(np.float32)
    acc = qmoe.HessianAccumulator(48)
    assert acc.columns == 48 and acc.count == 0 and acc.hessian() is None
    assert acc.add(x) == 700
    assert acc.count == 700 and acc.dropped == 0
    h = acc.hessian()
    assert h.dtype == np.float32 and h.shape == (48, 48)
    want = 2.0 / 700 * (x.astype(np.float64).T @ x.astype(np.float64))
    np.testing.assert_allclose(h, want, rtol=1e-4, atol=1e-4)
    s = acc.sum()
    assert s.dtype == np.float64
    np.testing.assert_allclose(s, x.astype(np.float64).T @ x.astype(np.float64), rtol=1e-5, atol=1e-3)
    assert "count=700" in repr(acc)


def test_hessian_input_layouts(rng):
    big = rng.standard_normal((300, 80)).astype(np.float32)
    x = np.ascontiguousarray(big[:, :32])
    ref = qmoe.HessianAccumulator(32)
    ref.add(x)
    # Rows with a stride (a column slice of a larger batch) are read in place.
    strided = qmoe.HessianAccumulator(32)
    strided.add(big[:, :32])
    np.testing.assert_array_equal(strided.sum(), ref.sum())
    # (batch, seq, columns) activations: all leading dimensions are tokens.
    seq = qmoe.HessianAccumulator(32)
    assert seq.add(x.reshape(3, 100, 32)) == 300
    np.testing.assert_array_equal(seq.sum(), ref.sum())
    # float16 and bfloat16 are widened; the values here are exact in both.
    xq = (np.round(x * 4) / 4).astype(np.float32)
    exact = qmoe.HessianAccumulator(32)
    exact.add(xq)
    for variant in [dict(x=xq.astype(np.float16)), dict(x=xq.astype(ml_dtypes.bfloat16)),
                    dict(x=xq.astype(ml_dtypes.bfloat16).view(np.uint16), bf16=True)]:
        a = qmoe.HessianAccumulator(32)
        a.add(**variant)
        np.testing.assert_array_equal(a.sum(), exact.sum())


def test_hessian_merge_and_cap(rng):
    x = rng.standard_normal((1000, 16)).astype(np.float32)
    whole = qmoe.HessianAccumulator(16)
    whole.add(x)
    a, b = qmoe.HessianAccumulator(16), qmoe.HessianAccumulator(16)
    a.add(x[:400])
    b.add(x[400:])
    a.merge(b)
    assert a.count == 1000
    # Blocks of tokens are multiplied in float32, so the split changes the rounding slightly.
    tol = 1e-6 * np.abs(whole.sum()).max()
    np.testing.assert_allclose(a.sum(), whole.sum(), rtol=1e-5, atol=tol)
    capped = qmoe.HessianAccumulator(16, token_cap=600)
    assert capped.token_cap == 600
    assert capped.add(x[:500]) == 500
    assert capped.add(x[500:]) == 100
    assert capped.count == 600 and capped.dropped == 400
    first = qmoe.HessianAccumulator(16)
    first.add(x[:600])
    np.testing.assert_allclose(capped.sum(), first.sum(), rtol=1e-5, atol=tol)
    self_merged = qmoe.HessianAccumulator(16)
    self_merged.add(x[:10])
    self_merged.merge(self_merged)
    assert self_merged.count == 20


def test_expert_token_cap():
    assert qmoe.expert_token_cap(1000, 8) == 500
    assert qmoe.expert_token_cap(1000, 8, multiplier=1.0) == 125
    assert qmoe.expert_token_cap(1, 1000) == 1


def test_hessian_file_round_trip(rng, tmp_path):
    accs = {}
    for i, cols in enumerate([8, 24]):
        a = qmoe.HessianAccumulator(cols)
        a.add(rng.standard_normal((50 + i, cols)).astype(np.float32))
        accs[f"encoder.block.{i}.expert"] = a
    path = tmp_path / "h.safetensors"
    qmoe.save_hessians(path, accs)
    back = qmoe.load_hessians(str(path))
    assert sorted(back) == sorted(accs)
    for name, a in accs.items():
        assert back[name].count == a.count and back[name].columns == a.columns
        np.testing.assert_array_equal(back[name].sum(), a.sum())


def test_gptq_beats_round_to_nearest_on_structured_data(rng):
    rows, cols = 64, 128
    x = calibration(rng, 2048, cols)
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    acc = qmoe.HessianAccumulator(cols)
    acc.add(x)
    res = qmoe.gptq(w, acc.hessian())
    assert res.status == "ok" and not res.fallback and res.reason == ""
    assert res.grid == "ternary" and res.lambda_ > 0 and res.dead_inputs == 0
    q_gptq = dense_from_ternary(res.symbols, res.levels)
    s_rtn, l_rtn = qmoe.ternarize_rtn(w)
    q_rtn = dense_from_ternary(s_rtn, l_rtn)
    e_gptq, e_rtn = output_error(w, q_gptq, x), output_error(w, q_rtn, x)
    print(f"output error: gptq {e_gptq:.4g}, rtn {e_rtn:.4g}")
    assert e_gptq < 0.5 * e_rtn
    # output_loss is ||(W - Q) X^T||^2 / n for H = (2/n) X^T X.
    assert res.output_loss == pytest.approx(e_gptq, rel=1e-3)
    symbols, levels, loss = res  # unpacks as (symbols, levels, loss)
    assert symbols is res.symbols and levels is res.levels and loss == res.loss
    assert res.dequantized is None


def test_gptq_options_and_determinism(rng):
    x = calibration(rng, 512, 96)
    w = rng.standard_normal((20, 96)).astype(np.float32)
    acc = qmoe.HessianAccumulator(96)
    acc.add(x)
    h = acc.hessian()
    a = qmoe.gptq(w, h, threads=1)
    b = qmoe.gptq(w, h, threads=2)
    np.testing.assert_array_equal(a.symbols, b.symbols)
    np.testing.assert_array_equal(a.levels, b.levels)
    assert a.loss == b.loss
    for kw in [dict(actorder=True), dict(blocksize=7), dict(percdamp=0.01), dict(double_precision=True),
               dict(grid="ternary-sym")]:
        r = qmoe.gptq(w, h, **kw)
        assert r.status == "ok" and r.symbols.shape == w.shape
    u = qmoe.gptq(w, h, grid="uniform3")
    assert u.symbols is None and u.levels is None
    assert u.dequantized.shape == w.shape and u.dequantized.dtype == np.float32
    # More levels: smaller error than the ternary grid.
    assert u.output_loss < a.output_loss


def test_gptq_without_hessian_is_round_to_nearest(rng):
    w = rng.standard_normal((10, 40)).astype(np.float32)
    r = qmoe.gptq(w)
    assert r.fallback and r.status == "fallback-rtn" and r.reason
    s, l = qmoe.ternarize_rtn(w)
    np.testing.assert_array_equal(r.symbols, s)
    np.testing.assert_array_equal(r.levels, l)
    # An all-zero Hessian falls back too, and never throws.
    z = qmoe.gptq(w, np.zeros((40, 40), np.float32))
    assert z.fallback
    np.testing.assert_array_equal(z.symbols, s)


def test_compress_matrix_is_gptq_then_encode(rng):
    x = calibration(rng, 600, 64)
    w = rng.standard_normal((24, 64)).astype(np.float32)
    acc = qmoe.HessianAccumulator(64)
    acc.add(x)
    h = acc.hessian()
    r = qmoe.gptq(w, h)
    want = qmoe.encode(r.symbols, r.levels, codec="qmoe-v1")
    m = qmoe.compress_matrix(w, h, codec="qmoe-v1")
    assert isinstance(m, qmoe.CompressedMatrix)
    np.testing.assert_array_equal(m.codes, want.codes)
    np.testing.assert_array_equal(m.decode_symbols(), r.symbols)
    assert m.original_dtype == "F32"
    m2, stats = qmoe.compress_matrix(w, h, with_stats=True)
    assert m2.codec in ("qmoe-v1", "qmoe-p5")
    assert stats["status"] == "ok" and stats["loss"] == pytest.approx(r.loss)
    assert stats["zero_fraction"] == pytest.approx(float((r.symbols == 0).mean()))
    half = qmoe.compress_matrix(w.astype(np.float16))
    assert half.original_dtype == "F16"
    bf = qmoe.compress_matrix(w.astype(ml_dtypes.bfloat16))
    assert bf.original_dtype == "BF16"


def test_ternary_options_and_rate_control(rng):
    x = calibration(rng, 800, 96)
    w = rng.standard_normal((64, 96)).astype(np.float32)
    acc = qmoe.HessianAccumulator(96)
    acc.add(x)
    h = acc.hessian()
    base = qmoe.gptq(w, h)
    # Refit rounds only lower GPTQ's loss; fitted levels differ from QMoE's (min, max).
    refit = qmoe.gptq(w, h, refit=3, levels="fit")
    assert refit.loss < base.loss
    assert not np.array_equal(refit.levels, base.levels)
    # A zero penalty trades error for zeros.
    pen = qmoe.gptq(w, h, zero_penalty=4.0)
    assert (pen.symbols == 0).mean() > (base.symbols == 0).mean()
    # Rate control lands within its tolerance, with either knob, and says what it found (96-wide
    # rows: qmoe-v1's codes, row offsets and levels take at least 1.33 bits per weight).
    for knob in ("threshold", "penalty"):
        m, stats = qmoe.compress_matrix(w, h, target_bits=1.6, rate_knob=knob, rate_tolerance=0.003,
                                        with_stats=True, refit=1)
        assert stats["bits_per_weight"] == pytest.approx(1.6, abs=0.003)
        assert m.bits_per_weight == pytest.approx(stats["bits_per_weight"])
        assert stats["rate_steps"] >= 1
        if knob == "penalty":
            assert stats["zero_penalty"] != 0.0 and stats["zero_threshold"] == 0.5
    with pytest.raises(ValueError, match="not reached"):
        qmoe.compress_matrix(w, h, target_bits=0.05)
    with pytest.raises(ValueError):
        qmoe.gptq(w, h, levels="median")
    with pytest.raises(ValueError):
        qmoe.compress_matrix(w, h, target_bits=1.0, rate_knob="zeros")
