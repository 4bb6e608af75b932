qmoe_add_bench(bench_gptq SOURCES ${CMAKE_CURRENT_LIST_DIR}/gptq_bench.cpp LIBS qmoe_gptq)
# Layer-level accuracy at equal bits per weight: round to nearest, QMoE's recipe and qmoe's
# ternary options (not a Google Benchmark: one run prints a markdown table).
add_executable(bench_layer_error ${CMAKE_CURRENT_LIST_DIR}/layer_error.cpp)
target_link_libraries(bench_layer_error PRIVATE qmoe_gptq qmoe_format qmoe_warnings)
