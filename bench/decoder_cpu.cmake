# bench_decoder_cpu: fused decode x vector / small batch against dense fp32 Eigen and the reference
# decoder, experts streamed from memory. The dense baseline's translation unit gets AVX2/FMA so
# Eigen runs its vectorised kernels (the benchmark checks the CPU first).
if(TARGET qmoe_decoder_cpu AND TARGET qmoe_encoder)
  qmoe_add_bench(bench_decoder_cpu
    SOURCES ${CMAKE_CURRENT_LIST_DIR}/decoder_cpu_bench.cpp ${CMAKE_CURRENT_LIST_DIR}/decoder_cpu_dense.cpp
    LIBS qmoe_decoder_cpu qmoe_encoder Eigen3::Eigen OpenMP::OpenMP_CXX)
  if(CMAKE_SYSTEM_PROCESSOR MATCHES "^(x86_64|AMD64|amd64)$")
    set_source_files_properties(${CMAKE_CURRENT_LIST_DIR}/decoder_cpu_dense.cpp PROPERTIES
      COMPILE_OPTIONS "-mavx2;-mfma")
  endif()
endif()
