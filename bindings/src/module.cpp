// The Python module `qmoe._qmoe`: a thin layer over the C++ library, one source per library module
// (format, encoder, decoder_cpu, decoder_cuda, gptq, switch; common.h holds what they share). Every
// function checks the dtype, shape and contiguity of its numpy arguments, releases the GIL, calls
// the C++ API and turns qmoe's exceptions into Python ones (InvalidArgument -> ValueError,
// FormatError -> qmoe.FormatError, any other qmoe::Error -> RuntimeError). No format, packing or
// numeric logic lives here: the only data transformation is widening float16/bfloat16 inputs to
// float32 for C++ calls that take float32 (with the library's own conversions from
// qmoe/core/bf16.h).
//
// The order of the bind_* calls matters: a signature that names a class shows its Python name only
// when the class is registered before it, so CompressedMatrix comes first.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include <omp.h>

#include "common.h"
#include "qmoe/gptq/hessian.h"

PYBIND11_MODULE(_qmoe, m) {
  using namespace qmoe::python;
  m.doc() = "qmoe: sub-1-bit compression of Mixture-of-Experts expert weights (C++ extension).";
  m.attr("__version__") = QMOE_VERSION;

  bind_errors(m);
  py::class_<PyCompressed> matrix = bind_format(m);
  bind_decoder_cpu(m, matrix);
  bind_decoder_cuda(m, matrix);
  bind_encoder(m);
  bind_gptq(m);
  bind_switch(m);

  m.def(
      "build_info",
      [] {
        py::dict d;
        d["version"] = QMOE_VERSION;
#if defined(QMOE_NATIVE_BUILD)
        d["native"] = true;
#else
        d["native"] = false;
#endif
#ifdef QMOE_PY_CUDA
        d["cuda_kernels"] = true;
#else
        d["cuda_kernels"] = false;
#endif
        d["cuda_devices"] = cuda_device_count();
        d["cpu_simd_level"] = cpu_simd_level();
        d["cpu_simd_levels"] = cpu_simd_levels();
        d["gptq_kernel"] = std::string(qmoe::gptq_kernel());
        d["openmp_threads"] = omp_get_max_threads();
        return d;
      },
      R"doc(
What this installation is and runs, as a dict: version, native (built with QMOE_NATIVE, so it
runs only on CPUs like the one that built it), cuda_kernels (built with the CUDA kernels),
cuda_devices, cpu_simd_level, cpu_simd_levels, gptq_kernel (the float32 products of GPTQ and the
Hessian sums: 'avx512', 'avx2' or 'portable'), openmp_threads. Raises ValueError like
cpu_simd_level() when QMOE_CPU_SIMD is invalid.
)doc");
}
