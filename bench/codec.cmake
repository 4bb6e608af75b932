qmoe_add_bench(bench_codec SOURCES ${CMAKE_CURRENT_LIST_DIR}/codec_bench.cpp LIBS qmoe_encoder)
