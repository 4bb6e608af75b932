"""The CUDA path: CompressedMatrix.to_cuda() and CudaMatrix, against the CPU results."""

import ml_dtypes
import numpy as np
import pytest

import qmoe
from conftest import GPU_CODECS, encode_rtn, nmse, sparse_weights


def test_device_count_never_raises():
    n = qmoe.cuda_device_count()
    assert isinstance(n, int) and n >= 0
    if not qmoe.built_with_cuda:
        assert n == 0


def test_to_cuda_without_a_device_raises_runtime_error(rng):
    if qmoe.cuda_device_count() > 0:
        pytest.skip("a CUDA device is present; the no-device error cannot be observed")
    m, _, _ = encode_rtn(sparse_weights(rng, 4, 10))
    with pytest.raises(RuntimeError, match="CUDA") as info:
        m.to_cuda()
    assert not isinstance(info.value, qmoe.FormatError)


def test_to_cuda_in_a_build_without_cuda_says_so(rng):
    if qmoe.built_with_cuda:
        pytest.skip("qmoe was built with the CUDA kernels: the no-kernels error cannot be observed")
    m, _, _ = encode_rtn(sparse_weights(rng, 6, 40), "qmoe-v3")
    with pytest.raises(RuntimeError, match="without the CUDA kernels"):
        m.to_cuda()


@pytest.mark.parametrize("codec", ["qmoe-v3", "qmoe-g4"])
def test_to_cuda_converts_the_cpu_codecs(rng, codec):
    # qmoe-v3 and qmoe-g4 are CPU codecs: to_cuda() converts them to qmoe-v2 on upload.
    if not qmoe.built_with_cuda:
        pytest.skip("qmoe was built without the CUDA kernels")
    m, _, _ = encode_rtn(sparse_weights(rng, 6, 40), codec)
    if qmoe.cuda_device_count() == 0:
        with pytest.raises(RuntimeError, match="no CUDA device"):
            m.to_cuda()
        return
    g = m.to_cuda()
    assert g.codec == codec
    np.testing.assert_array_equal(g.decode(), m.decode())


needs_gpu = pytest.mark.skipif(qmoe.cuda_device_count() == 0,
                               reason="no CUDA device (or qmoe built without the CUDA kernels)")


@needs_gpu
@pytest.mark.parametrize("codec", GPU_CODECS)
@pytest.mark.parametrize("n", [1, 5, 32, 33, 100])
def test_gpu_products_match_the_cpu(rng, codec, n):
    w = sparse_weights(rng, 67, 301)
    m, _, _ = encode_rtn(w, codec)
    g = m.to_cuda()
    assert g.shape == m.shape and g.codec == codec and g.device == 0
    np.testing.assert_array_equal(g.decode(), m.decode())
    X = rng.standard_normal((n, 301)).astype(np.float32)
    assert nmse(g.matmul(X), m.matmul(X, int8_activations=False)) < 1e-10
    assert nmse(g.matvec(X[0]), m.matvec(X[0], int8_activations=False)) < 1e-10
    assert nmse(g.matmul(X.astype(ml_dtypes.bfloat16)),
                m.matmul(X.astype(ml_dtypes.bfloat16), int8_activations=False)) < 1e-10


@needs_gpu
def test_gpu_bad_arguments(rng):
    m, _, _ = encode_rtn(sparse_weights(rng, 8, 16))
    g = m.to_cuda()
    with pytest.raises(ValueError, match="columns"):
        g.matmul(np.ones((2, 15), np.float32))
    with pytest.raises(ValueError, match="float64"):
        g.matvec(np.ones(16))
    with pytest.raises(ValueError, match="does not exist"):
        m.to_cuda(device=qmoe.cuda_device_count())
