"""Shared helpers of the qmoe Python tests. Seeds are fixed and printed on failure."""

import numpy as np
import pytest

import qmoe

SEED = 20231025


@pytest.fixture
def rng(request):
    seed = SEED + sum(map(ord, request.node.name))
    print(f"seed {seed}")
    return np.random.default_rng(seed)


def bf16_bits_to_float(bits):
    """bfloat16 bit patterns (uint16) -> float32, exactly (test-side check of the C++ output)."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def dense_from_ternary(symbols, levels):
    """The float matrix a (symbols, levels) pair stands for: 0, lo or hi of each row."""
    lv = bf16_bits_to_float(levels)
    out = np.zeros(symbols.shape, dtype=np.float32)
    lo = np.broadcast_to(lv[:, :1], symbols.shape)
    hi = np.broadcast_to(lv[:, 1:], symbols.shape)
    out[symbols == 1] = lo[symbols == 1]
    out[symbols == 2] = hi[symbols == 2]
    return out


def sparse_weights(rng, rows, cols, zero_fraction=0.9):
    """Weights whose round-to-nearest ternarization is mostly zeros (like QMoE's experts)."""
    w = rng.standard_normal((rows, cols)).astype(np.float32) * 0.1
    big = rng.random((rows, cols)) > zero_fraction
    w[big] += np.sign(w[big]) * 1.0
    return w


def nmse(got, want):
    """Normalised squared error, the measure the C++ kernel tests use."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    denom = float(np.sum(want * want))
    return float(np.sum((got - want) ** 2)) / max(denom, 1e-30)


CODECS = ["qmoe-v1", "qmoe-v2", "qmoe-v3", "qmoe-g4", "qmoe-p5"]
# to_cuda() takes every codec (qmoe-v3 and qmoe-g4 are converted to qmoe-v2 on upload).
GPU_CODECS = CODECS


def encode_rtn(w, codec="qmoe-v1"):
    s, l = qmoe.ternarize_rtn(w)
    return qmoe.encode(s, l, codec=codec), s, l
