# Calibrated compression phase by phase (forward, Hessians, GPTQ, encode, write) against the dense
# fp32 GEMM rate measured in the same run: a switch-base-8-shaped model, one switch-c-2048-shaped
# block.
if(TARGET qmoe_switch)
  qmoe_add_bench(bench_compress SOURCES ${CMAKE_CURRENT_LIST_DIR}/compress_bench.cpp
                 LIBS qmoe_switch qmoe_core)
endif()
