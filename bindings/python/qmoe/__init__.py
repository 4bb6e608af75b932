"""qmoe: sub-1-bit compression of Mixture-of-Experts expert weights.

Ternary weights (per-row levels lo <= 0 <= hi) found by round-to-nearest or GPTQ, coded with a
65536-entry dictionary (qmoe-v1; qmoe-v2 and qmoe-v3 fit their dictionary to the matrix, qmoe-v3
coding rows in pairs) or base-3 packing (qmoe-p5), stored in a safetensors-compatible container
and multiplied straight from the codes.

Every function is implemented in C++ (the extension module ``qmoe._qmoe``); this package only
re-exports it. Arguments are numpy arrays, or anything ``numpy.asarray`` accepts (CPU torch
tensors are read without a copy); float inputs may be float32, float16 or bfloat16
(``ml_dtypes.bfloat16``, or uint16 bit patterns with ``bf16=True``). Bad arguments raise
``ValueError``, malformed files or streams raise ``qmoe.FormatError`` (a ``RuntimeError``), other
library failures raise ``RuntimeError``; the message is the library's. Heavy calls release the GIL.

Main entry points: ``ternarize_rtn``, ``HessianAccumulator``, ``gptq``, ``encode``,
``compress_matrix`` -> ``CompressedMatrix`` (``.decode()``, ``.matvec()``, ``.matmul()`` on the
CPU; ``.to_cuda()`` when the module was built with the CUDA kernels), ``grouped_matmul`` (one MoE
layer's experts in one CPU call), ``save`` / ``load``
(containers), ``save_hessians`` / ``load_hessians``, ``compress_checkpoint`` (``qmoe compress``),
``CompressedExperts`` (one MoE layer's compressed experts), ``switch_eval`` and
``calibration_hessians`` (the C++ Switch forward pass).

``qmoe.torch`` (``pip install qmoe[torch]``; imported on its own, never by ``import qmoe``) runs
compressed experts inside PyTorch and Hugging Face transformers models.

Importing qmoe imports ml_dtypes, which registers bfloat16 with numpy: the BF16 tensors of a qmoe
container (its levels) then load with any safetensors reader, e.g. safetensors.numpy.load_file.
"""

import ml_dtypes  # noqa: F401  (registers numpy's bfloat16: containers load with safetensors.numpy)

from ._qmoe import *  # noqa: F401,F403
from ._qmoe import __version__  # noqa: F401
from . import _qmoe as _ext

__all__ = [name for name in dir(_ext) if not name.startswith("_")]
