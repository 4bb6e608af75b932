"""CPU kernel SIMD levels and build information: qmoe.cpu_simd_level(), set_cpu_simd_level(),
cpu_simd_levels(), build_info()."""

import os
import subprocess
import sys

import numpy as np
import pytest

import qmoe
from conftest import sparse_weights

ALL_LEVELS = ["scalar", "avx2", "avx512"]


@pytest.fixture
def restore_level():
    before = qmoe.cpu_simd_level()
    yield
    qmoe.set_cpu_simd_level(before)


def test_levels_are_ordered_and_include_scalar():
    levels = qmoe.cpu_simd_levels()
    assert levels[0] == "scalar"
    assert levels == [l for l in ALL_LEVELS if l in levels]
    assert qmoe.cpu_simd_level() in levels


def test_every_supported_level_computes_the_same_product(rng, restore_level):
    w = sparse_weights(rng, 67, 301)
    m = qmoe.encode(*qmoe.ternarize_rtn(w), codec="qmoe-v1")
    dense = m.decode().astype(np.float64)
    x = rng.standard_normal(301).astype(np.float32)
    X = rng.standard_normal((9, 301)).astype(np.float32)
    for level in qmoe.cpu_simd_levels():
        qmoe.set_cpu_simd_level(level)
        assert qmoe.cpu_simd_level() == level
        assert qmoe.build_info()["cpu_simd_level"] == level
        y = m.matvec(x)
        Y = m.matmul(X)
        want, want_batch = dense @ x, X.astype(np.float64) @ dense.T
        scale = np.abs(dense) @ np.abs(x) + 1e-30
        assert np.max(np.abs(y - want) / scale) < 1e-5, level
        scale_b = np.abs(X.astype(np.float64)) @ np.abs(dense).T + 1e-30
        assert np.max(np.abs(Y - want_batch) / scale_b) < 1e-5, level


def test_bad_levels_raise_and_change_nothing(restore_level):
    before = qmoe.cpu_simd_level()
    with pytest.raises(ValueError, match="unknown SIMD level 'sse9'"):
        qmoe.set_cpu_simd_level("sse9")
    for level in ALL_LEVELS:
        if level not in qmoe.cpu_simd_levels():
            with pytest.raises(ValueError, match="not supported"):
                qmoe.set_cpu_simd_level(level)
    assert qmoe.cpu_simd_level() == before


def test_build_info():
    info = qmoe.build_info()
    assert info["version"] == qmoe.__version__
    assert isinstance(info["native"], bool)
    assert info["cuda_kernels"] == qmoe.built_with_cuda
    assert info["cuda_devices"] == qmoe.cuda_device_count()
    assert info["cpu_simd_levels"] == qmoe.cpu_simd_levels()
    assert info["cpu_simd_level"] in info["cpu_simd_levels"]
    assert info["gptq_kernel"] in ("portable", "avx2", "avx512")
    assert info["openmp_threads"] >= 1


@pytest.mark.parametrize("value,ok", [("scalar", True), ("bogus", False)])
def test_environment_variable(value, ok):
    code = "import qmoe, numpy as np\n" \
           "m = qmoe.encode(*qmoe.ternarize_rtn(np.eye(4, dtype=np.float32)))\n" \
           "print(qmoe.cpu_simd_level(), m.matvec(np.arange(4, dtype=np.float32)).tolist())\n"
    env = dict(os.environ, QMOE_CPU_SIMD=value)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    if ok:
        assert r.returncode == 0, r.stderr
        assert r.stdout.split()[0] == "scalar"
        assert "[0.0, 1.0, 2.0, 3.0]" in r.stdout
    else:
        assert r.returncode != 0
        assert "ValueError" in r.stderr and "QMOE_CPU_SIMD='bogus'" in r.stderr
