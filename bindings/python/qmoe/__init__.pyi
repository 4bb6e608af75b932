"""Type stubs of the qmoe module (the C++ extension qmoe._qmoe, re-exported by qmoe)."""

import os
import pathlib
from typing import Any, Callable, Iterator, Literal, Mapping, Optional, Sequence, Union, overload

import numpy as np
import numpy.typing as npt

__version__: str

PathLike = Union[str, os.PathLike[str]]
# float32, float16, ml_dtypes.bfloat16, or uint16 bfloat16 bit patterns (with bf16=True).
FloatArray = npt.ArrayLike
CodecName = Literal["qmoe-v1", "qmoe-v2", "qmoe-v3", "qmoe-g4", "qmoe-p5"]
# to_cuda() takes every codec: qmoe-v3 and qmoe-g4 (CPU codecs) are converted to qmoe-v2 on upload.
CudaCodecName = CodecName
TargetName = Literal["any", "cpu", "gpu"]
GridName = Literal["ternary", "ternary-sym", "uniform2", "uniform3", "uniform4"]

class FormatError(RuntimeError):
    """A file or encoded stream that is malformed, truncated or inconsistent."""

class CompressedMatrix:
    """An encoded ternary matrix (rows x cols); immutable."""

    @staticmethod
    def from_tensors(
        codec: CodecName,
        shape: tuple[int, int],
        *,
        levels: npt.ArrayLike,
        codes: Optional[npt.ArrayLike] = None,
        row_offsets: Optional[npt.ArrayLike] = None,
        packed: Optional[npt.ArrayLike] = None,
        dictionary: Optional[npt.ArrayLike] = None,
        tokens: Optional[npt.ArrayLike] = None,
        kinds: Optional[npt.ArrayLike] = None,
        group_offsets: Optional[npt.ArrayLike] = None,
        original_dtype: str = "F32",
    ) -> CompressedMatrix: ...
    @property
    def shape(self) -> tuple[int, int]: ...
    @property
    def rows(self) -> int: ...
    @property
    def cols(self) -> int: ...
    @property
    def codec(self) -> CodecName: ...
    @property
    def original_dtype(self) -> str: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def bits_per_weight(self) -> float: ...
    @property
    def code_bits_per_weight(self) -> float: ...
    @property
    def codes(self) -> Optional[npt.NDArray[np.uint16]]: ...
    @property
    def row_offsets(self) -> Optional[npt.NDArray[np.int32]]: ...
    @property
    def tokens(self) -> Optional[npt.NDArray[np.uint8]]: ...
    @property
    def kinds(self) -> Optional[npt.NDArray[np.uint8]]: ...
    @property
    def group_offsets(self) -> Optional[npt.NDArray[np.int32]]: ...
    @property
    def dictionary(self) -> Optional[npt.NDArray[np.uint32]]: ...
    @property
    def dictionary_id(self) -> Optional[str]: ...
    @property
    def packed(self) -> Optional[npt.NDArray[np.uint8]]: ...
    @property
    def levels(self) -> npt.NDArray[np.uint16]: ...
    def decode(self) -> npt.NDArray[np.float32]: ...
    def decode_symbols(self) -> npt.NDArray[np.uint8]: ...
    def matvec(
        self, x: FloatArray, *, bf16: bool = False, threads: int = 0, int8_activations: bool = True
    ) -> npt.NDArray[np.float32]: ...
    def matmul(
        self, X: FloatArray, *, bf16: bool = False, threads: int = 0, int8_activations: bool = True
    ) -> npt.NDArray[np.float32]: ...
    def to_cuda(self, device: int = 0) -> CudaMatrix: ...

class CudaMatrix:
    """A compressed matrix on a GPU, used from host numpy arrays."""

    @property
    def shape(self) -> tuple[int, int]: ...
    @property
    def codec(self) -> CudaCodecName: ...
    @property
    def device(self) -> int: ...
    def matvec(self, x: FloatArray, *, bf16: bool = False) -> npt.NDArray[np.float32]: ...
    def matmul(self, X: FloatArray, *, bf16: bool = False) -> npt.NDArray[np.float32]: ...
    def decode(self) -> npt.NDArray[np.float32]: ...
    def forward_device(
        self, x_ptr: int, y_ptr: int, n: int, *, dtype: Literal["F32", "BF16", "F16"] = "F32",
        ldx: int = 0, ldy: int = 0, stream: int = 0
    ) -> None: ...

class CompressedExperts:
    """One top-1 MoE layer's compressed experts, run in two grouped CPU kernel calls."""

    def __init__(self, wi: Sequence[CompressedMatrix], wo: Sequence[CompressedMatrix]) -> None: ...
    @property
    def num_experts(self) -> int: ...
    @property
    def d_model(self) -> int: ...
    @property
    def d_ff(self) -> int: ...
    def forward(
        self,
        X: FloatArray,
        expert: npt.ArrayLike,
        scales: Optional[npt.ArrayLike] = None,
        *,
        out: Optional[npt.NDArray[np.float32]] = None,
        bf16: bool = False,
        threads: int = 0,
    ) -> npt.NDArray[np.float32]: ...

def switch_eval(
    model: PathLike,
    tokens: PathLike,
    *,
    expert_capacity: int = 0,
    batch_pairs: int = 8,
    dense_experts: bool = False,
    logits: bool = False,
) -> dict[str, Any]: ...
def calibration_hessians(
    checkpoint: PathLike,
    tokens: PathLike,
    *,
    excluded_ids: Sequence[int] = ...,
    token_cap_multiplier: float = 4.0,
    expert_capacity: int = 0,
    exclude_ignored_targets: bool = True,
) -> dict[str, HessianAccumulator]: ...

# True when this build has the CUDA kernels (nvcc was found when it was installed).
built_with_cuda: bool

def cuda_device_count() -> int: ...
def cpu_simd_level() -> Literal["scalar", "avx2", "avx512"]: ...
def set_cpu_simd_level(level: Literal["scalar", "avx2", "avx512"]) -> None: ...
def cpu_simd_levels() -> list[str]: ...
def build_info() -> dict[str, Any]: ...
def grouped_matmul(
    weights: Sequence[CompressedMatrix],
    X: FloatArray,
    tokens: Sequence[npt.ArrayLike],
    *,
    scales: Optional[Sequence[npt.ArrayLike]] = None,
    out_rows: Optional[Sequence[npt.ArrayLike]] = None,
    out: Optional[npt.NDArray[np.float32]] = None,
    accumulate: bool = False,
    bf16: bool = False,
    threads: int = 0,
    int8_activations: bool = True,
) -> npt.NDArray[np.float32]: ...
def ternarize_rtn(
    w: FloatArray, *, bf16: bool = False
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint16]]: ...
def encode(
    symbols: npt.ArrayLike,
    levels: npt.ArrayLike,
    *,
    codec: Union[CodecName, Literal["auto"]] = "qmoe-v1",
    original_dtype: str = "F32",
    threads: int = 0,
    v2_max_width: int = 63,
    fitted_p0: Optional[float] = None,
    target: TargetName = "any",
    v2_p0: Optional[float] = None,
) -> CompressedMatrix: ...
def v2_dictionary(p0: float, max_width: int = 63) -> tuple[npt.NDArray[np.uint32], str]: ...
def v3_dictionary(p0: float) -> tuple[npt.NDArray[np.uint32], str]: ...
def transcode(
    matrix: CompressedMatrix,
    *,
    codec: Union[CodecName, Literal["auto"]] = "auto",
    threads: int = 0,
    v2_max_width: int = 63,
    fitted_p0: Optional[float] = None,
    target: TargetName = "any",
    v2_p0: Optional[float] = None,
) -> CompressedMatrix: ...

class HessianAccumulator:
    """Streaming sum of x x^T over calibration tokens, for GPTQ's Hessian."""

    def __init__(self, columns: int, *, token_cap: int = 0) -> None: ...
    @property
    def columns(self) -> int: ...
    @property
    def count(self) -> int: ...
    @property
    def dropped(self) -> int: ...
    @property
    def token_cap(self) -> int: ...
    def add(self, x: FloatArray, *, bf16: bool = False, threads: int = 0) -> int: ...
    def merge(self, other: HessianAccumulator) -> None: ...
    def hessian(self) -> Optional[npt.NDArray[np.float32]]: ...
    def sum(self) -> npt.NDArray[np.float64]: ...

def save_hessians(path: PathLike, accumulators: Mapping[str, HessianAccumulator]) -> None: ...
def load_hessians(path: PathLike) -> dict[str, HessianAccumulator]: ...
def expert_token_cap(total_tokens: int, num_experts: int, multiplier: float = 4.0) -> int: ...

class GptqResult:
    """The result of gptq(); unpacks as (symbols, levels, loss)."""

    @property
    def symbols(self) -> Optional[npt.NDArray[np.uint8]]: ...
    @property
    def levels(self) -> Optional[npt.NDArray[np.uint16]]: ...
    @property
    def dequantized(self) -> Optional[npt.NDArray[np.float32]]: ...
    @property
    def grid(self) -> GridName: ...
    @property
    def status(self) -> Literal["ok", "fallback-rtn"]: ...
    @property
    def reason(self) -> str: ...
    @property
    def fallback(self) -> bool: ...
    @property
    def loss(self) -> float: ...
    @property
    def output_loss(self) -> float: ...
    @property
    def lambda_(self) -> float: ...
    @property
    def dead_inputs(self) -> int: ...
    def __iter__(self) -> Iterator[Any]: ...

def gptq(
    w: FloatArray,
    h: Optional[FloatArray] = None,
    *,
    grid: GridName = "ternary",
    percdamp: float = 0.1,
    blocksize: int = 128,
    actorder: bool = False,
    double_precision: bool = False,
    threads: int = 0,
    bf16: bool = False,
    levels: Literal["minmax", "fit"] = "minmax",
    zero_threshold: float = 0.5,
    zero_penalty: float = 0.0,
    refit: int = 0,
) -> GptqResult: ...
@overload
def compress_matrix(
    w: FloatArray,
    h: Optional[FloatArray] = None,
    *,
    grid: Literal["ternary", "ternary-sym"] = "ternary",
    percdamp: float = 0.1,
    blocksize: int = 128,
    actorder: bool = False,
    codec: Union[CodecName, Literal["auto"]] = "auto",
    threads: int = 0,
    bf16: bool = False,
    with_stats: Literal[False] = False,
    levels: Literal["minmax", "fit"] = "minmax",
    zero_threshold: float = 0.5,
    zero_penalty: float = 0.0,
    refit: int = 0,
    target_bits: float = 0.0,
    rate_knob: Literal["threshold", "penalty"] = "threshold",
    rate_tolerance: float = 0.002,
) -> CompressedMatrix: ...
@overload
def compress_matrix(
    w: FloatArray,
    h: Optional[FloatArray] = None,
    *,
    grid: Literal["ternary", "ternary-sym"] = "ternary",
    percdamp: float = 0.1,
    blocksize: int = 128,
    actorder: bool = False,
    codec: Union[CodecName, Literal["auto"]] = "auto",
    threads: int = 0,
    bf16: bool = False,
    with_stats: Literal[True],
    levels: Literal["minmax", "fit"] = "minmax",
    zero_threshold: float = 0.5,
    zero_penalty: float = 0.0,
    refit: int = 0,
    target_bits: float = 0.0,
    rate_knob: Literal["threshold", "penalty"] = "threshold",
    rate_tolerance: float = 0.002,
) -> tuple[CompressedMatrix, dict[str, Any]]: ...
def save(
    path: PathLike,
    tensors: Mapping[str, Union[CompressedMatrix, npt.ArrayLike]],
    *,
    metadata: Optional[Mapping[str, str]] = None,
    shard_size: int = 0,
) -> list[pathlib.Path]: ...
def load(
    path: PathLike, *, verify_checksums: bool = False, raw_bf16: bool = False
) -> dict[str, Union[CompressedMatrix, npt.NDArray[Any]]]: ...
def load_metadata(path: PathLike) -> dict[str, str]: ...
def codecs() -> list[dict[str, Any]]: ...
def compress_checkpoint(
    checkpoint: PathLike,
    output: PathLike,
    *,
    hessians: Optional[PathLike] = None,
    calib_tokens: Optional[PathLike] = None,
    sequential: bool = True,
    threads: int = 0,
    max_memory: int = 0,
    shard_size: int = 0,
    resume: bool = False,
    cast_bf16: bool = False,
    codec: Union[CodecName, Literal["auto"]] = "auto",
    target: TargetName = "any",
    percdamp: float = 0.1,
    blocksize: int = 128,
    actorder: bool = False,
    check_disk: bool = True,
    progress: Optional[Callable[[dict[str, Any]], None]] = None,
    note: Optional[Callable[[str], None]] = None,
    levels: Literal["minmax", "fit"] = "minmax",
    zero_threshold: float = 0.5,
    zero_penalty: float = 0.0,
    refit: Optional[int] = None,
    target_bits: float = 0.0,
    rate_knob: Literal["threshold", "penalty"] = "threshold",
    rate_tolerance: float = 0.002,
    rate_scope: Literal["matrix", "all"] = "matrix",
) -> dict[str, Any]: ...
