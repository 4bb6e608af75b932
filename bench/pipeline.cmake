if(TARGET qmoe_switch)
  qmoe_add_bench(bench_pipeline SOURCES ${CMAKE_CURRENT_LIST_DIR}/pipeline_bench.cpp LIBS qmoe_switch qmoe_encoder)
endif()
