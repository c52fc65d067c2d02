# cmake --install gives a lipforcing-config.cmake: a host project with find_package(lipforcing) configures,
# builds and links against the installed library.
set(prefix ${BUILD}/install-test)
file(REMOVE_RECURSE ${prefix} ${BUILD}/consumer-build)
execute_process(COMMAND ${CMAKE_COMMAND} --install ${BUILD} --prefix ${prefix} RESULT_VARIABLE rc OUTPUT_QUIET)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "cmake --install failed")
endif()
execute_process(COMMAND ${CMAKE_COMMAND} -S ${SOURCE}/native/tests/consumer -B ${BUILD}/consumer-build
                        -G ${GENERATOR} -DCMAKE_PREFIX_PATH=${prefix} RESULT_VARIABLE rc OUTPUT_VARIABLE out
                        ERROR_VARIABLE out)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "configuring a find_package(lipforcing) project failed:\n${out}")
endif()
execute_process(COMMAND ${CMAKE_COMMAND} --build ${BUILD}/consumer-build RESULT_VARIABLE rc OUTPUT_VARIABLE out
                ERROR_VARIABLE out)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "building it failed:\n${out}")
endif()
execute_process(COMMAND ${BUILD}/consumer-build/consumer RESULT_VARIABLE rc OUTPUT_VARIABLE out)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "the consumer exited ${rc}: ${out}")
endif()
message("${out}")
