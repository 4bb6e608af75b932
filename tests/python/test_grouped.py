"""qmoe.grouped_matmul: one MoE layer's experts in one CPU call."""

import numpy as np
import pytest

import qmoe
from conftest import sparse_weights


def experts(rng, count, rows, cols):
    out = []
    for _ in range(count):
        sym, lv = qmoe.ternarize_rtn(sparse_weights(rng, rows, cols))
        out.append(qmoe.encode(sym, lv, codec="auto"))
    return out


def test_top2_layer_matches_per_expert_products(rng):
    n, d, f, E = 37, 48, 40, 5
    ws = experts(rng, E, f, d)
    x = rng.standard_normal((n, d)).astype(np.float32)
    tokens = [[] for _ in range(E)]
    probs = [[] for _ in range(E)]
    for t in range(n):
        for e in rng.choice(E, size=2, replace=False):
            tokens[e].append(t)
            probs[e].append(float(rng.uniform(0.1, 0.9)))
    tokens[3] = []  # an expert without tokens
    probs[3] = []
    want = np.zeros((n, f), dtype=np.float64)
    for e in range(E):
        for t, p in zip(tokens[e], probs[e]):
            want[t] += p * ws[e].matvec(x[t]).astype(np.float64)
    tok = [np.asarray(t, dtype=np.int64) for t in tokens]
    y = qmoe.grouped_matmul(ws, x, tok, scales=probs, accumulate=True)
    assert y.shape == (n, f) and y.dtype == np.float32
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    for threads in (1, 2, 3):
        y2 = qmoe.grouped_matmul(ws, x, tok, scales=probs, accumulate=True, threads=threads)
        assert np.array_equal(y, y2)


def test_up_projection_into_assignment_slots_and_out(rng):
    n, d, f, E = 20, 33, 17, 3
    ws = experts(rng, E, f, d)
    x = rng.standard_normal((n, d)).astype(np.float32)
    tokens = [np.arange(0, n, 3), np.arange(1, n, 3), np.arange(2, n, 3)]
    slots, nxt = [], 0
    for t in tokens:
        slots.append(np.arange(nxt, nxt + len(t)))
        nxt += len(t)
    h = qmoe.grouped_matmul(ws, x, tokens, out_rows=slots)
    assert h.shape == (nxt, f)
    for e in range(E):
        np.testing.assert_allclose(h[slots[e]], ws[e].matmul(x[tokens[e]]), rtol=1e-6, atol=1e-6)
    # Into a caller's array, adding to what is there.
    out = np.ones((nxt + 2, f), dtype=np.float32)
    got = qmoe.grouped_matmul(ws, x, tokens, out_rows=slots, out=out, accumulate=True)
    assert got is out or np.shares_memory(got, out)
    np.testing.assert_allclose(out[:nxt], h + 1.0, rtol=1e-6, atol=1e-6)
    assert np.all(out[nxt:] == 1.0)


def test_bad_arguments_raise_before_writing(rng):
    n, d, f = 6, 10, 7
    ws = experts(rng, 2, f, d)
    x = rng.standard_normal((n, d)).astype(np.float32)
    out = np.full((n, f), 5.0, dtype=np.float32)
    ok = [np.array([0, 1]), np.array([2])]
    cases = [
        (dict(tokens=[np.array([0, n])] + ok[1:]), "tokens\\[0\\]\\[1\\] = 6 is outside 0..5"),
        (dict(tokens=[np.array([-1])] + ok[1:]), "outside"),
        (dict(tokens=ok[:1]), "one entry per matrix"),
        (dict(tokens=[np.array([0.5])] + ok[1:]), "expected integers"),
        (dict(tokens=ok, scales=[[1.0], [1.0]]), "scales\\[0\\]: length differs"),
        (dict(tokens=ok, out_rows=[np.array([0]), np.array([1])]), "out_rows\\[0\\]: length differs"),
        (dict(tokens=ok, out_rows=[np.array([0, n]), np.array([1])]), "out_rows\\[0\\]\\[1\\]"),
    ]
    for kwargs, msg in cases:
        with pytest.raises(ValueError, match=msg):
            qmoe.grouped_matmul(ws, x, out=out, accumulate=True, **kwargs)
        assert np.all(out == 5.0)
    with pytest.raises(ValueError, match="differs from"):
        qmoe.grouped_matmul([ws[0], experts(rng, 1, f + 1, d)[0]], x, ok)
    with pytest.raises(ValueError, match="float32"):
        qmoe.grouped_matmul(ws, x, ok, out=out.astype(np.float64))
    with pytest.raises(ValueError, match="columns"):
        qmoe.grouped_matmul(ws, x, ok, out=np.zeros((n, f + 1), dtype=np.float32))
    with pytest.raises(ValueError, match="at least one"):
        qmoe.grouped_matmul([], x, [])
