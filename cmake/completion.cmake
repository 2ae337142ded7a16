# Writes `AVIARY completion bash` to OUT (cmake/package.cmake runs it at build time).
execute_process(COMMAND ${AVIARY} completion bash OUTPUT_FILE ${OUT} RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "${AVIARY} completion bash failed: ${rc}")
endif()
