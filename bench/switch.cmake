# Switch forward pass: eval and calibration tokens/s on a switch-base-8-shaped model with random
# weights, dense and compressed experts, 1 thread and all threads.
if(TARGET qmoe_switch)
  set(_switch_bench_libs qmoe_switch)
  if(TARGET qmoe_encoder)
    list(APPEND _switch_bench_libs qmoe_encoder)
  endif()
  qmoe_add_bench(bench_switch SOURCES ${CMAKE_CURRENT_LIST_DIR}/switch_eval.cpp LIBS ${_switch_bench_libs})
endif()
