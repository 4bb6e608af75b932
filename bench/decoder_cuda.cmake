# CUDA decoder benchmarks (only with CUDA): fused qmoe-v1 kernels against dense bf16 cuBLAS on the
# Switch expert shapes, and a grouped 128-expert MoE layer. Exits with a message when no GPU.
if(QMOE_HAVE_CUDA AND TARGET qmoe_decoder_cuda)
  qmoe_add_bench(bench_decoder_cuda SOURCES ${CMAKE_CURRENT_LIST_DIR}/decoder_cuda_bench.cpp
                 LIBS qmoe_decoder_cuda qmoe_encoder CUDA::cudart CUDA::cublas)
endif()
