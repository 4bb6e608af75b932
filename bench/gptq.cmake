qmoe_add_bench(bench_gptq SOURCES ${CMAKE_CURRENT_LIST_DIR}/gptq_bench.cpp LIBS qmoe_gptq)
